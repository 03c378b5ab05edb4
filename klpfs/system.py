"""One emulated machine: the kernel, livepatch and the kernfs tree that is mounted.

PLACEHOLDER while the engine is written: builds only the skeleton tree.
"""

from __future__ import annotations

import trio

from klpfs.sysfs.kernfs import Kernfs


class System:
    """Construct inside trio.run (the kernel reads trio's clock)."""

    def __init__(self, kernel_version: str = "4.15") -> None:
        self.kernfs = Kernfs()
        root = self.kernfs.root
        sys_dir = self.kernfs.create_dir(root, "sys")
        kernel = self.kernfs.create_dir(sys_dir, "kernel")
        self.kernfs.create_dir(kernel, "livepatch")
        self.kernfs.create_dir(sys_dir, "module")
        self.kernfs.create_dir(root, "proc")

    async def run(self) -> None:
        """Run the kernel's background work until cancelled."""
        await trio.sleep_forever()
