"""A `klpfs mount -f` daemon run as a child process: started, waited for until
it serves, and stopped (for `klpfs run` and the pytest plugin)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from klpfs.fs.mountinfo import FSTYPE, find_mount

DEADLINE = 10.0


class MountFailed(Exception):
    """The daemon exited or did not mount in time; the message carries its log."""


def is_mounted(path: str | Path) -> bool:
    entry = find_mount(str(path))
    return entry is not None and entry.fstype == FSTYPE


class MountedChild:
    def __init__(self, mountpoint: Path, kernel: str, options: Sequence[str], log: IO[bytes],
                 env: dict[str, str] | None = None):
        self.mountpoint = mountpoint
        self._log = log
        argv = [sys.executable, "-m", "klpfs", "mount", "-f", "--kernel", kernel,
                *[f"-o{option}" for option in options], str(mountpoint)]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + DEADLINE
        while not is_mounted(mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log.seek(0)
                raise MountFailed(f"klpfs did not mount: {log.read().decode(errors='replace').strip()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (the daemon unmounts), then make sure the mount is gone."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)
        deadline = time.monotonic() + DEADLINE
        while is_mounted(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.01)
