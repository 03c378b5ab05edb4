"""A test-only machine: a Kernfs tree exercising every generic sysfs rule.

Run as ``python fakefs.py MNT`` it serves in the foreground through the same
`klpfs.fs.mount.mount` as ``klpfs mount -f``.  Tests drive it through files:

    rw        0644  "1\\n"; store accepts "0"/"1" (+ newline), else EINVAL
    ro        0444  "ro\\n"
    wo        0200  store takes anything, records its length (see wo_seen)
    wo_seen   0444  "<calls> <length of last store>\\n"
    einval    0644  "0\\n"; every store is EINVAL
    ebusy     0644  "0\\n"; every store is EBUSY
    raises    0644  show and store raise RuntimeError (a bug in a callback)
    long      0444  5000 bytes of show output (sysfs keeps PAGE_SIZE - 1)
    dir/      0755  subdirectories a/ and b/, attribute f (0444)
    ctl/remove        0200  remove the paths written (whitespace separated), now
    ctl/remove_later  0200  have a background trio task remove them
    ctl/removals      0444  how many nodes the background task has removed
    ctl/mkdir         0200  create the directories written
    ctl/mkfiles       0200  "DIR N": create DIR/f0000 .. f<N-1>, 0444
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

import trio

from klpfs.fs.mount import MountOptions, mount
from klpfs.sysfs.kernfs import Kernfs, KernfsNode, Store


class FakeMachine:
    """Constructed inside trio, like System."""

    def __init__(self, mountpoint: str) -> None:
        self.kernfs = Kernfs()
        self.rw = "1"
        self.wo_calls = 0
        self.wo_length = 0
        self.removals = 0
        self._later_send, self._later_recv = trio.open_memory_channel[list[str]](100)
        k = self.kernfs
        root = k.root
        k.create_file(root, "rw", 0o644, lambda: f"{self.rw}\n", self._store_rw)
        k.create_file(root, "ro", 0o444, lambda: "ro\n")
        k.create_file(root, "wo", 0o200, store=self._store_wo)
        k.create_file(root, "wo_seen", 0o444, lambda: f"{self.wo_calls} {self.wo_length}\n")
        k.create_file(root, "einval", 0o644, lambda: "0\n", lambda data: -errno.EINVAL)
        k.create_file(root, "ebusy", 0o644, lambda: "0\n", lambda data: -errno.EBUSY)
        k.create_file(root, "raises", 0o644, self._raise, self._raise)
        k.create_file(root, "long", 0o444, lambda: "x" * 5000)
        directory = k.create_dir(root, "dir")
        k.create_dir(directory, "a")
        k.create_dir(directory, "b")
        k.create_file(directory, "f", 0o444, lambda: "f\n")
        ctl = k.create_dir(root, "ctl")
        k.create_file(ctl, "remove", 0o200, store=self._command(self._remove))
        k.create_file(ctl, "remove_later", 0o200, store=self._store_remove_later)
        k.create_file(ctl, "removals", 0o444, lambda: f"{self.removals}\n")
        k.create_file(ctl, "mkdir", 0o200, store=self._command(self._mkdir))
        k.create_file(ctl, "mkfiles", 0o200, store=self._store_mkfiles)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for paths in self._later_recv:
            for path in paths:
                self.removals += self._remove(path)

    def _store_rw(self, data: bytes) -> int:
        if data.rstrip(b"\n") not in (b"0", b"1"):
            return -errno.EINVAL
        self.rw = data.decode().strip()
        return len(data)

    def _store_wo(self, data: bytes) -> int:
        self.wo_calls += 1
        self.wo_length = len(data)
        return len(data)

    def _raise(self, *args: object) -> int:
        raise RuntimeError("a bug in a callback")

    def _node(self, path: str) -> KernfsNode:
        node = self.kernfs.walk(path)
        if node is None:
            raise FileNotFoundError(path)
        return node

    def _command(self, action: Callable[[str], object]) -> Store:
        def store(data: bytes) -> int:
            for path in data.decode().split():
                action(path)
            return len(data)
        return store

    def _remove(self, path: str) -> int:
        self.kernfs.remove(self._node(path))
        return 1

    def _mkdir(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        self.kernfs.create_dir(self._node(parent), name)

    def _store_remove_later(self, data: bytes) -> int:
        self._later_send.send_nowait(data.decode().split())
        return len(data)

    def _store_mkfiles(self, data: bytes) -> int:
        path, count = data.decode().split()
        directory = self._node(path)
        for i in range(int(count)):
            self.kernfs.create_file(directory, f"f{i:04d}", 0o444, lambda: "file\n")
        return len(data)


if __name__ == "__main__":
    sys.exit(mount(FakeMachine, sys.argv[1], MountOptions(), foreground=True))
