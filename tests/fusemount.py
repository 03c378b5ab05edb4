"""Real FUSE mounts for tests: start a daemon, wait until it serves, always clean up.

A `Mount` runs a foreground daemon (``klpfs mount -f`` or any command that
mounts on the path it is given) in its own session, waits on the mount table
with a deadline, and on `stop` unmounts and reaps it whatever state the test
left it in.  Its stderr goes to a file, not a pipe: the auto_unmount helper
fusermount3 inherits it and lives as long as the mount.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from klpfs.fs.mountinfo import FSTYPE, find_mount

DEADLINE = 10.0
KLPFS = [str(Path(sys.executable).with_name("klpfs"))]
"""The console script of the venv running the tests."""
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def require_fuse() -> None:
    """Skip the calling test where real mounts are impossible."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("FUSE tests need root, /dev/fuse and fusermount3")


def wait_until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Poll predicate until it is true; fail the test naming what never happened."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def is_klpfs_mount(path: str | Path) -> bool:
    entry = find_mount(str(path))
    return entry is not None and entry.fstype == FSTYPE


def make_mountpoint() -> Path:
    """An empty directory every user can reach (tests also run as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="klpfs-test-"))
    path.chmod(0o755)
    return path


class Mount:
    """One mounted daemon; `argv` is completed with the mountpoint."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.path = make_mountpoint()
        self.argv = [*argv, str(self.path)]
        self.errors_expected = False
        self._stderr = tempfile.TemporaryFile()
        self.proc: subprocess.Popen[bytes] | None = None

    def __truediv__(self, relative: str) -> Path:
        return self.path / relative

    def start(self) -> Mount:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     start_new_session=True)
        proc = self.proc
        wait_until(lambda: self.mounted() or proc.poll() is not None, f"{self.argv} to mount")
        if not self.mounted():
            raise AssertionError(f"{self.argv} exited {proc.returncode}:\n{self.log()}")
        return self

    def mounted(self) -> bool:
        return is_klpfs_mount(self.path)

    def log(self) -> str:
        """The daemon's stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def run(self, argv: Sequence[str], user: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """A command run in the mountpoint (as nobody if user="nobody")."""
        prefix = NOBODY if user == "nobody" else []
        return subprocess.run([*prefix, *argv], cwd=self.path, capture_output=True,
                              text=True, check=check, timeout=DEADLINE)

    def sh(self, script: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """dash, Debian's sh: its write errors are all "I/O error", its open errors exact."""
        return self.run(["sh", "-c", script], user)

    def bash(self, script: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """bash names the errno of a failed write ("write error: Invalid argument")."""
        return self.run(["bash", "-c", script], user)

    def stop(self) -> None:
        """Unmount and reap, whatever happened; then complain about a dirty log."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=DEADLINE)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.mounted():
                subprocess.run(["fusermount3", "-uz", str(self.path)], check=False)
            wait_until(lambda: not self.mounted(), f"{self.path} to be unmounted")
            self.path.rmdir()
        finally:
            log = self.log()
            self._stderr.close()
        if not self.errors_expected and ("Traceback" in log or " ERROR " in log):
            raise AssertionError(f"the daemon logged errors:\n{log}")

