"""`klpfs mount --kernel 6.12`, read with real programs: the lines of
/work/shared/spec/linux-6.12-observed.md (6.12 obs #N), byte for byte where
they give bytes -- the patch directory with `replace`, a transition over
inside `insmod`, the padding symbols in /proc/kallsyms, module sizes,
enabled_functions, a kthread's /proc/<pid>/stack and the kernel's threads."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from fusemount import DEADLINE, KLPFS, Mount

LP = "sys/kernel/livepatch"
SAMPLE = f"{LP}/livepatch_sample"
HANDLER = "klp_ftrace_handler+0x0/0x100"
USER_TASKS = ["agetty", "bash", "cron", "login", "sshd", "systemd", "systemd-journal", "systemd-udevd"]
"""The image's user processes, the same on every profile."""


def klpfs(m: Mount, *args: str) -> str:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], check=True, capture_output=True,
                          text=True, timeout=DEADLINE).stdout


@pytest.fixture
def m(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs(kernel="6.12")


def test_patch_directory_and_a_transition_over_inside_insmod(m: Mount) -> None:
    """6.12 obs #1, #2, #9: `replace` 444 root:root size 4096 reading 0; transition
    already 0 when insmod returns; the handler line of enabled_functions."""
    klpfs(m, "insmod", "livepatch-sample")
    assert m.sh(f"cat {SAMPLE}/transition; ls {SAMPLE}; cat {SAMPLE}/replace; "
                f"stat -c '%a %s %U:%G' {SAMPLE}/replace").stdout.splitlines() == [
        "0", "enabled", "force", "replace", "transition", "vmlinux", "0", "444 4096 root:root"]
    assert m.run(["cat", "sys/kernel/tracing/enabled_functions"]).stdout == (
        f"cmdline_proc_show (1)   I     M \ttramp: 0xffffffffc0100000 ({HANDLER}) ->{HANDLER}\n")
    assert klpfs(m, "dmesg").splitlines()[-1].endswith("livepatch: 'livepatch_sample': patching complete")


def test_kallsyms_modules_and_a_kthreads_stack(m: Mount) -> None:
    """6.12 obs #7, #8, #10: a module function's padding symbol before it, the plain
    module at 12288 beside the livepatch one at 16384, and the stack of a kthread
    sleeping in a module function down to ret_from_fork_asm."""
    klpfs(m, "insmod", "livepatch-sample")
    klpfs(m, "insmod", "klp-busy")
    assert m.sh("grep busy_fn proc/kallsyms | cut -d' ' -f2-").stdout == (
        "t __pfx_busy_fn\t[klp_busy]\nt busy_fn\t[klp_busy]\n")
    assert m.run(["cat", "proc/modules"]).stdout == (
        "klp_busy 12288 0 - Live 0x0000000000000000 (OE)\n"
        "livepatch_sample 16384 1 - Live 0x0000000000000000 (K)\n")
    pid = next(line.split()[0] for line in klpfs(m, "ps").splitlines() if " klp_busy " in line)
    assert m.run(["cat", f"proc/{pid}/stack"]).stdout == (
        "[<0>] busy_fn+0x20/0x40 [klp_busy]\n"
        "[<0>] kthread+0xd2/0x100\n"
        "[<0>] ret_from_fork+0x34/0x50\n"
        "[<0>] ret_from_fork_asm+0x1a/0x30\n")


def test_the_kernels_threads(m: Mount) -> None:
    """6.12 obs #12: /proc shows the 60 kernel threads of the notes (kworker/R-
    rescuers, full names) beside the image's user processes, and `klpfs ps`
    the same tasks with the idle tasks."""
    from profiles.test_obs612 import KTHREADS_6_12
    comms = m.sh("cat proc/[0-9]*/comm | LC_ALL=C sort").stdout.splitlines()
    assert comms == sorted(KTHREADS_6_12 + USER_TASKS)
    pids = sorted(int(line.split()[0]) for line in klpfs(m, "ps").splitlines()[1:])
    listed = sorted(int(p) for p in m.sh("ls proc").stdout.split() if p.isdigit())
    assert pids == [0, 0, *listed]
