"""What `klpfs run` gives a command besides /sys/kernel/livepatch: the
profile's release (uname, /lib/modules/<release>, KDIR), the emulated
kernel's /proc files, and kernel.ftrace_enabled."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fusemount import DEADLINE, KLPFS, require_fuse


def klpfs_run(kernel: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", "--kernel", kernel, "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=6 * DEADLINE)


def test_release_and_module_directories() -> None:
    require_fuse()
    script = ('uname -r; uname -s; r=$(uname -r); ls /lib/modules/$r; [ -d /lib/modules/$r/build ] && echo kdir; '
              'head -c 29 /proc/version; echo')
    res = klpfs_run("6.1", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["6.1.0-50-amd64", "Linux", "build", "modules.alias", "modules.builtin",
                                       "modules.dep", "modules.order", "modules.symbols", "kdir",
                                       "Linux version 6.1.0-50-amd64 "]
    assert not Path("/lib/modules/6.1.0-50-amd64").exists()
    assert os.uname().release != "6.1.0-50-amd64"


def test_proc_files_and_ftrace_enabled() -> None:
    """sysctl sees the emulated kernel.ftrace_enabled: turning it off under a patch
    is EBUSY on 6.1 (the patch's ftrace ops are permanent), and the host's stays."""
    require_fuse()
    host = Path("/proc/sys/kernel/ftrace_enabled").read_text()
    script = ("cat /proc/cmdline; modprobe livepatch-sample; cat /proc/cmdline; "
              "sysctl kernel.ftrace_enabled=0; echo rc=$?; sysctl -n kernel.ftrace_enabled")
    res = klpfs_run("6.1", script)
    assert res.stdout.splitlines()[1:] == ["this has been live patched", "rc=1", "1"]
    assert res.stdout.splitlines()[0].startswith("BOOT_IMAGE=/boot/vmlinuz root=UUID=")
    assert res.stderr == 'sysctl: setting key "kernel.ftrace_enabled": Device or resource busy\n'
    assert Path("/proc/sys/kernel/ftrace_enabled").read_text() == host


def test_ftrace_off_refuses_a_patch_on_6_1() -> None:
    require_fuse()
    script = ("sysctl -q kernel.ftrace_enabled=0; modprobe livepatch-sample; echo rc=$?; "
              "dmesg | grep -e 'failed to register' -e 'failed to enable'")
    res = klpfs_run("6.1", script)
    assert res.stdout.splitlines()[0] == "rc=1"
    assert [line.split("] ", 1)[1] for line in res.stdout.splitlines()[1:]] == [
        "livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)",
        "livepatch: failed to enable patch 'livepatch_sample'"]
