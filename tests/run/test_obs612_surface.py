"""Under `klpfs run`, through the real tools and busybox's (the tools of the
6.12 observations): a transition that nothing blocks is over inside insmod
and inside `echo 0 > enabled` (6.12 obs #2-#5), and the oops of the reader of
a force-removed patch's attribute in 6.12's words (6.12 obs #11)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fusemount import DEADLINE, KLPFS, require_fuse

BUSYBOX = shutil.which("busybox")
SAMPLE = "/sys/kernel/livepatch/livepatch_sample"


@pytest.fixture
def busybox_path(tmp_path: Path) -> str:
    """A PATH whose insmod, rmmod and cat are busybox applets, as in the busybox
    system the 6.12 kernel was observed with; klpfs itself first."""
    if BUSYBOX is None:
        pytest.fail("busybox is not installed (scripts/setup installs Debian's busybox)")
    for tool in ("insmod", "rmmod", "cat"):
        (tmp_path / tool).symlink_to(BUSYBOX)
    return f"{tmp_path}:{Path(KLPFS[0]).parent}:{os.environ['PATH']}"


def klpfs_run(kernel: str, argv: list[str], path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path or f"{Path(KLPFS[0]).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return subprocess.run([*KLPFS, "run", "--kernel", kernel, "--", *argv], capture_output=True, text=True,
                          timeout=6 * DEADLINE, env=env)


IN_WRITE = ["6.11", "6.12", "6.14"]
"""The profiles from 6.4 on (klp_cond_resched: the idle CPUs switch as a transition starts)."""
STARTED = ["livepatch: enabling patch 'livepatch_sample'",
           "livepatch: 'livepatch_sample': starting patching transition"]


@pytest.mark.parametrize("kernel, transition, log", [
    *[(kernel, "0", [*STARTED, "livepatch: 'livepatch_sample': patching complete"]) for kernel in IN_WRITE],
    ("6.1", "1", ["livepatch_sample: tainting kernel with TAINT_LIVEPATCH", *STARTED]),
])
def test_transition_after_insmod(kernel: str, transition: str, log: list[str]) -> None:
    """6.12 obs #2 (obs #5 on 6.1): `transition` right after insmod, and the log."""
    require_fuse()
    res = klpfs_run(kernel, ["sh", "-c", f"insmod livepatch-sample.ko; cat {SAMPLE}/transition; "
                                         "dmesg | tail -3 | sed 's/^\\[[ 0-9.]*\\] //'"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [transition, *log]


@pytest.mark.parametrize("kernel", IN_WRITE)
def test_disable_is_over_before_the_next_command(busybox_path: str, kernel: str) -> None:
    """6.12 obs #4, #5 with busybox: `cat` on the same command line as `echo 0`
    finds no `enabled`; `echo 1` then finds no directory; rmmod succeeds at once,
    and a second one finds no module."""
    require_fuse()
    script = f"P={SAMPLE}\n" + r"""
insmod livepatch-sample.ko || exit 10
echo 0 > $P/enabled; cat $P/enabled; echo "cat=$?"
[ -e $P ] || echo "gone"
echo 1 > $P/enabled; echo "write=$?"
rmmod livepatch_sample; echo "rmmod=$?"
rmmod livepatch_sample; echo "again=$?"
"""
    res = klpfs_run(kernel, ["busybox", "sh", "-c", script], busybox_path)
    assert res.stdout.splitlines() == ["cat=1", "gone", "write=1", "rmmod=0", "again=1"]
    assert res.stderr.splitlines() == [
        f"cat: can't open '{SAMPLE}/enabled': No such file or directory",
        f"sh: can't create {SAMPLE}/enabled: nonexistent directory",
        "rmmod: can't unload module 'livepatch_sample': No such file or directory"]


def test_rmmod_force_oops_header(busybox_path: str) -> None:
    """6.12 obs #11: busybox `cat` of a force-removed patch's `enabled` is killed
    (137), its oops starts "Oops: Oops:", names the UID and the Debian build and
    spells the taints out on a line of its own; taint 45056 -> 45064 (then D)."""
    require_fuse()
    script = "P=/sys/kernel/livepatch/klp_stack_a\ninsmod klp-stack-a.ko || exit 10\n" + r"""
cat /proc/sys/kernel/tainted
rmmod -f klp_stack_a; echo "rmmod=$?"
cat /proc/sys/kernel/tainted
sh -c "echo \$\$; exec cat $P/enabled"; echo "cat=$?"
dmesg | sed -n '/BUG: unable/,/RIP:/p' | sed 's/^\[[ 0-9.]*\] //'
cat /proc/sys/kernel/tainted
"""
    res = klpfs_run("6.12", ["busybox", "sh", "-c", script], busybox_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    pid = int(lines[3])
    cpu = pid % 2
    assert lines[:3] == ["45056", "rmmod=0", "45064"]
    assert lines[4] == "cat=137"
    assert lines[5].startswith("BUG: unable to handle page fault for address: ffffffffc")
    assert lines[6:] == [
        "#PF: supervisor read access in kernel mode",
        "#PF: error_code(0x0000) - not-present page",
        "Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI",
        f"CPU: {cpu} UID: 0 PID: {pid} Comm: cat Tainted: G  R        OE K    6.12.118+deb12-amd64 #1  "
        "Debian 6.12.118-1~deb12u1",
        "Tainted: [R]=FORCED_RMMOD, [O]=OOT_MODULE, [E]=UNSIGNED_MODULE, [K]=LIVEPATCH",
        "RIP: 0010:sysfs_kf_seq_show+0x1d/0x100",
        "45192"]
