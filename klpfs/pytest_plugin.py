"""pytest plugin: a mounted klpfs emulator per test, and a client for it.

Installed with klpfs (entry point `pytest11`), so any project's tests can ask
for it.  Needs root and /dev/fuse; the test is skipped where they are missing.

    def test_my_tool(klpfs_emulator):
        klpfs_emulator.insmod("livepatch-sample")
        klpfs_emulator.wait_for("sys/kernel/livepatch/livepatch_sample/transition", "0")
        assert klpfs_emulator.read("proc/cmdline") == "this has been live patched\\n"

    @pytest.mark.klpfs(kernel="6.1", speed=10)
    def test_on_6_1(klpfs_emulator): ...
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klpfs.control.client import request
from klpfs.control.samples import find_module_file
from klpfs.fs.child import DEADLINE, MountedChild


class KlpfsError(Exception):
    """The emulator refused a request; `errno` is the kernel's answer."""

    def __init__(self, reply: dict[str, Any]):
        super().__init__(reply["error"])
        self.errno: int = reply["errno"]


class Emulator:
    """A mounted emulator: its path, files, and the control commands as methods."""

    def __init__(self, path: Path, kernel: str):
        self.path = path
        self.kernel = kernel

    def __truediv__(self, relative: str) -> Path:
        return self.path / relative

    def _request(self, cmd: str, **args: Any) -> dict[str, Any]:
        reply = request(str(self.path), cmd, **args)
        if not reply["ok"]:
            raise KlpfsError(reply)
        return reply

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()

    def write(self, relative: str, value: str) -> None:
        """Like `echo value > file`: OSError carries the kernel's errno."""
        (self.path / relative).write_text(value + "\n")

    def wait_for(self, relative: str, value: str, timeout: float = DEADLINE) -> None:
        """Poll a file until it reads `value` (a trailing newline is ignored)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.read(relative).rstrip("\n") == value:
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{relative} did not read {value!r} within {timeout}s")
            time.sleep(0.01)

    def insmod(self, module: str, *params: str) -> None:
        """Load a module file, or a shipped sample by name."""
        path = find_module_file(module)
        if path is None:
            raise FileNotFoundError(module)
        self._request("insmod", path=str(path), text=path.read_text(), params=list(params))

    def rmmod(self, name: str) -> None:
        self._request("rmmod", name=name)

    def lsmod(self) -> list[str]:
        return [m["name"] for m in self._request("lsmod")["modules"]]

    def dmesg(self) -> list[str]:
        return [r["text"] for r in self._request("dmesg")["records"]]

    def debug(self, enable: bool) -> None:
        self._request("debug", enable=enable)

    def add_task(self, comm: str, kthread: bool = False) -> int:
        reply = self._request("task_add", comm=comm, kind="kthread" if kthread else "user", ppid=None)
        return reply["task"]["pid"]

    def sleep_in(self, pid: int, function: str, seconds: float | None = None) -> None:
        """Make task `pid` call `function` and sleep inside it (holding a transition)."""
        self._request("task_sleep", pid=pid, func=function, seconds=seconds, interruptible=False)

    def wake(self, pid: int) -> None:
        self._request("task_wake", pid=pid)

    def call(self, function: str, pid: int | None = None) -> tuple[str, str]:
        """(the implementation that answered, its output)."""
        reply = self._request("call", func=function, pid=pid)
        return reply["impl"], reply["output"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "klpfs(kernel='4.15', speed=1): options of the klpfs_emulator fixture")


@pytest.fixture
def klpfs_emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """A klpfs mount with its own daemon, unmounted after the test."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("klpfs_emulator needs root, /dev/fuse and fusermount3")
    marker = request.node.get_closest_marker("klpfs")
    options = marker.kwargs if marker is not None else {}
    kernel = str(options.get("kernel", "4.15"))
    path = Path(tempfile.mkdtemp(prefix="klpfs-pytest-"))
    try:
        with tempfile.TemporaryFile() as log:
            child = MountedChild(path, kernel, [f"speed={options.get('speed', 1)}"], log)
            try:
                yield Emulator(path, kernel)
            finally:
                child.stop()
    finally:
        path.rmdir()
