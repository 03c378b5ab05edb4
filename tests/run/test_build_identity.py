"""`klpfs run --kernel host` and `--release`: the command sees the build's release in
uname, /proc/version and /lib/modules/<release>."""

from __future__ import annotations

import os
import subprocess

from fusemount import DEADLINE, KLPFS, require_fuse

SCRIPT = 'uname -r; cut -d" " -f3 /proc/version; [ -d "/lib/modules/$(uname -r)/build" ] && echo kdir'


def klpfs_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", *args, "--", "sh", "-c", SCRIPT], capture_output=True, text=True,
                          timeout=6 * DEADLINE)


def test_kernel_host_is_the_running_release() -> None:
    require_fuse()
    res = klpfs_run("--kernel", "host")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [os.uname().release, os.uname().release, "kdir"]


def test_release_overrides_the_profiles() -> None:
    require_fuse()
    res = klpfs_run("--kernel", "6.1", "--release", "6.1.0-28-amd64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["6.1.0-28-amd64", "6.1.0-28-amd64", "kdir"]
