"""Under `klpfs run`, through the real tools: the 6.1 observations on module sizes
(lsmod, /proc/modules), `rmmod -f` of an enabled patch and the oops of the next
reader of its attributes (obs #21), and tracefs's enabled_functions (obs #23)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fusemount import DEADLINE, KLPFS, require_fuse

PATH = f"{Path(KLPFS[0]).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
WAIT = "while [ \"$(cat $P/transition)\" != 0 ]; do sleep 0.1; done\n"
"""Poll until the transition is over (the tools under test cannot wait for it otherwise)."""


def klpfs_run(kernel: str, script: str, path: str = PATH) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", "--kernel", kernel, "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=6 * DEADLINE, env={**os.environ, "PATH": path})


def test_module_sizes() -> None:
    """16384 for small modules, as /proc/modules shows them on 6.1 (6.12 obs #8)."""
    require_fuse()
    res = klpfs_run("6.1", "insmod livepatch-sample.ko && modprobe klp-busy && lsmod && cat /proc/modules")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "Module                  Size  Used by",
        "klp_busy               16384  0",
        "livepatch_sample       16384  1",
        "klp_busy 16384 0 - Live 0x0000000000000000 (OE)",
        "livepatch_sample 16384 1 - Live 0x0000000000000000 (K)"]


def test_rmmod_force_and_the_oops_of_the_next_reader() -> None:
    """obs #21 on 6.1 (CONFIG_MODULE_FORCE_UNLOAD): rmmod -f returns 0, taints R
    (45056 -> 45064), /sys/module/<m> goes, /sys/kernel/livepatch/<m>/ stays, and
    `cat enabled` oopses: the shell sees 137 and the log has the oops."""
    require_fuse()
    script = "P=/sys/kernel/livepatch/klp_stack_a\ninsmod klp-stack-a.ko || exit 10\n" + WAIT + r"""
cat /proc/sys/kernel/tainted
rmmod -f klp_stack_a; echo "rmmod=$?"
cat /proc/sys/kernel/tainted
[ -e /sys/module/klp_stack_a ] || echo "no /sys/module/klp_stack_a"
ls $P
sh -c "echo \$\$; exec cat $P/enabled"; echo "cat=$?"
dmesg | sed -n '/BUG: unable/,$p' | sed 's/^\[[ 0-9.]*\] //'
cat /proc/sys/kernel/tainted
"""
    res = klpfs_run("6.1", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    pid = int(lines[8])  # cat's, which sh exec'd
    assert lines[:8] == ["45056", "rmmod=0", "45064", "no /sys/module/klp_stack_a", "enabled", "force",
                         "transition", "vmlinux"]
    assert lines[9:] == [
        "cat=137",
        "BUG: unable to handle page fault for address: ffffffffc0002058",
        "#PF: supervisor read access in kernel mode",
        "#PF: error_code(0x0000) - not-present page",
        "Oops: 0000 [#1] PREEMPT SMP NOPTI",
        f"CPU: {pid % 2} PID: {pid} Comm: cat Tainted: G  R        OE K    6.1.0-50-amd64 #1 ",
        "RIP: 0010:sysfs_kf_seq_show+0x1d/0x100",
        "Call Trace:",
        " <TASK>",
        " seq_read+0x1e0/0x3c0",
        " __vfs_read+0x1d/0x3a",
        " vfs_read+0x47/0x8e",
        " SyS_read+0x2a/0x55",
        " do_syscall_64+0x9e/0x13c",
        " entry_SYSCALL_64_after_hwframe+0x1e/0x3d",
        " </TASK>",
        "CR2: ffffffffc0002058",
        "---[ end trace 0000000000000000 ]---",
        "45192"]  # and D (oops_end())
    assert "Killed" in res.stderr


def test_rmmod_force_per_profile_and_tool(tmp_path: Path) -> None:
    """busybox's rmmod -f asks for O_TRUNC too; a kernel without CONFIG_MODULE_FORCE_UNLOAD
    (Ubuntu's 6.14) refuses a module in use as without -f."""
    require_fuse()
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox is not installed (scripts/setup installs Debian's busybox)"
    (tmp_path / "rmmod").symlink_to(busybox)
    script = ("insmod livepatch-sample.ko; P=/sys/kernel/livepatch/livepatch_sample\n" + WAIT
              + 'rmmod -f livepatch_sample; echo "rmmod=$?"; cat /proc/sys/kernel/tainted')
    res = klpfs_run("6.1", script, f"{tmp_path}:{PATH}")
    assert (res.stdout.splitlines(), res.stderr) == (["rmmod=0", "32776"], "")
    res = klpfs_run("latest", script)
    assert res.stdout.splitlines() == ["rmmod=1", "32768"]
    assert res.stderr == ("rmmod: ERROR: could not remove module livepatch_sample: "
                          "Resource temporarily unavailable\n")


def test_enabled_functions() -> None:
    """obs #23: while the patch is enabled the patched function is listed with
    klp_ftrace_handler; empty again after disable.  Both tracefs mount points."""
    require_fuse()
    script = "P=/sys/kernel/livepatch/livepatch_sample\n" + r"""
stat -c '%a %U' /sys/kernel/tracing /sys/kernel/tracing/enabled_functions
cat /sys/kernel/tracing/enabled_functions; echo "empty=$?"
insmod livepatch-sample.ko
cat /sys/kernel/tracing/enabled_functions
cat /sys/kernel/debug/tracing/enabled_functions | cat -A
""" + WAIT + r"""
echo 0 > $P/enabled
while [ -e $P ]; do sleep 0.1; done
wc -c < /sys/kernel/tracing/enabled_functions
"""
    res = klpfs_run("6.1", script)
    assert res.returncode == 0, res.stderr
    handler = "klp_ftrace_handler+0x0/0x110"
    assert res.stdout.splitlines() == [
        "700 root", "440 root", "empty=0",
        f"cmdline_proc_show (1)   I  \ttramp: 0xffffffffc0100000 ({handler}) ->{handler}",
        f"cmdline_proc_show (1)   I  ^Itramp: 0xffffffffc0100000 ({handler}) ->{handler}$",
        "0"]
