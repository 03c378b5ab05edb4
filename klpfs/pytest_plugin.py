"""pytest plugin: a mounted klpfs emulator per test, and a client for it.

Installed with klpfs (entry point `pytest11`), so any project's tests can ask
for it.  Needs root and /dev/fuse; the test is skipped where they are missing.

    def test_my_tool(klpfs_emulator):
        klpfs_emulator.insmod("livepatch-sample")
        klpfs_emulator.wait()                      # as `klpfs wait`: the transition is over
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

import pytest

from klpfs.control.client import Client, Refused
from klpfs.control.lpview import transition_lines
from klpfs.control.replies import LivepatchState
from klpfs.control.samples import find_module_file
from klpfs.fs.child import DEADLINE, MountedChild

KlpfsError = Refused
"""The emulator refused a request: `errno` is the kernel's answer (klpfs.control.client.Refused)."""


class Emulator:
    """A mounted emulator: its path, files, and the control commands as methods."""

    def __init__(self, path: Path, kernel: str):
        self.path = path
        self.kernel = kernel
        self.client = Client(str(path))
        """The typed control client (klpfs.control.client.Client) of this emulator."""

    def __truediv__(self, relative: str) -> Path:
        return self.path / relative

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

    def wait(self, timeout: float = DEADLINE) -> None:
        """Until no transition is under way, as `klpfs wait`; AssertionError naming the
        tasks that hold it if it is still under way after `timeout` seconds."""
        state = self.client.wait(timeout)
        if state.transition is not None:
            raise AssertionError("\n".join([f"the transition was still under way after {timeout}s:",
                                            *transition_lines(state.transition, state.now, stacks=True)]))

    def status(self) -> LivepatchState:
        """The patches and the transition, as `klpfs status --json` has them."""
        return self.client.livepatch()

    def insmod(self, module: str, *params: str) -> None:
        """Load a module file, or a shipped sample by name."""
        path = find_module_file(module)
        if path is None:
            raise FileNotFoundError(module)
        self.client.insmod(path, params)

    def rmmod(self, name: str) -> None:
        self.client.rmmod(name)

    def lsmod(self) -> list[str]:
        return [m.name for m in self.client.lsmod()]

    def dmesg(self) -> list[str]:
        return [r.text for r in self.client.dmesg()]

    def debug(self, enable: bool) -> None:
        self.client.debug(enable)

    def add_task(self, comm: str, kthread: bool = False) -> int:
        return self.client.task_add(comm, kthread).pid

    def sleep_in(self, pid: int, function: str, seconds: float | None = None) -> None:
        """Make task `pid` call `function` and sleep inside it (holding a transition)."""
        self.client.task_sleep(pid, function, seconds)

    def wake(self, pid: int) -> None:
        self.client.task_wake(pid)

    def call(self, function: str, pid: int | None = None) -> tuple[str, str]:
        """(the implementation that answered, its output)."""
        result = self.client.call(function, pid)
        return result.impl.name, result.output


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "klpfs(kernel='4.15', speed=1, kallsyms=None, release=None, symvers=None): "
                                       "options of the klpfs_emulator fixture (kallsyms: a /proc/kallsyms dump or "
                                       "System.map the emulated vmlinux takes its symbols from; release: its uname "
                                       "-r; symvers: its Module.symvers, the module_layout CRC)")


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
            build = [f"{name}={options[name]}" for name in ("kallsyms", "release", "symvers")
                     if options.get(name)]
            child = MountedChild(path, kernel, [f"speed={options.get('speed', 1)}", *build], log)
            try:
                yield Emulator(path, kernel)
            finally:
                child.stop()
    finally:
        path.rmdir()
