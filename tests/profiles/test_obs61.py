"""Rows of /work/shared/spec/linux-6.1-observed.md not covered elsewhere in
this directory, on 6.1 and the later profiles (where unchanged): #5, #8,
#12, #14, #23 and the ftrace refusal of notes §2.6.  (Rows #1-#4, #6, #7,
#9-#11 and #13-#22 have their own tests in the other files.)"""

from __future__ import annotations

import pytest

from klpfs.kernel.ftrace import FTRACE_OPS_FL_IPMODIFY, FtraceOps
from klpfs.kernel.sched import TaskKind
from klpfs.sysfs.kernfs import Kernfs

from .conftest import EACCES, EBUSY, IN_WRITE, SIX, settle, spec

six = pytest.mark.parametrize("version", SIX)
before_in_write = pytest.mark.parametrize("version", [v for v in SIX if v not in IN_WRITE])
"""Rows #5 and #8 as 6.1 shows them; 6.12 obs #2 and #4 replace them from 6.4 (test_obs612.py)."""
P = spec("lp_p", {None: ["cmdline_proc_show"]})


@before_in_write
async def test_row5_transition_after_insmod(m, autojump_clock):
    """obs #5: transition reads 1 straight after insmod, then finishes within
    about 2 s (the retry runs once a second); open(O_WRONLY) is EACCES."""
    assert m.load(P) == 0
    assert m.read("lp_p/transition") == b"1\n"
    assert Kernfs.open_check(m.lp_node("lp_p/transition"), False, True) == -EACCES
    await settle(1.9)
    assert m.read("lp_p/transition") == b"0\n"
    done = m.times_of("livepatch: 'lp_p': patching complete")
    assert len(done) == 1 and 0 < done[0] <= 2.0


@before_in_write
async def test_row8_disable(m, autojump_clock):
    """obs #8: enabled reads 0 immediately, transition 1; the directory stays
    until the unpatching completes, then the whole tree disappears; the
    module stays loaded with refcnt 0."""
    assert m.load(P) == 0
    await settle()
    assert m.write("lp_p/enabled", b"0") == 1
    assert m.state("lp_p") == (0, 1)
    assert m.tree("lp_p")
    await settle(1.9)
    assert not m.exists("lp_p")
    assert m.module("lp_p") is not None and m.refcnt("lp_p") == 0


@six
async def test_row12_patch_state(m, autojump_clock):
    """obs #12: /proc/*/patch_state -1 when idle; during a transition 0 or 1;
    tasks sleeping elsewhere switch at once; only the task sleeping inside
    the old function stays at its initial state; a new process of a
    switched parent reads 1; patched is 1 as soon as the transition starts."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    user = m.user("usleep")
    m.sched.enter(user, m.sym("meminfo_proc_show"), "S")
    every = list(m.sched.tasks.values())
    assert all(m.proc_patch_state(t) == b"-1\n" for t in every)
    assert m.load(P) == 0
    assert m.proc_patch_state(holder) == b"0\n"
    assert m.proc_patch_state(user) == b"1\n"
    others = [t for t in every if t is not holder]
    assert all(m.proc_patch_state(t) == b"1\n" for t in others)
    shell = m.kernel.console
    child = m.sched.add("cat", TaskKind.USER, shell.base, ppid=shell.pid)
    assert m.proc_patch_state(child) == b"1\n"
    assert m.patched("lp_p") == 1
    m.sched.wake(holder)
    await settle()
    assert all(m.proc_patch_state(t) == b"-1\n" for t in m.sched.tasks.values())


@six
async def test_row14_reverse_logs(boot, version, autojump_clock):
    """obs #14: writing 0 during patching returns the count and logs only
    "starting unpatching transition" (plus "reversing transition ..." at
    debug level); enabled 0, transition 1; completes quickly when the stuck
    task is on the old side."""
    for debug in (False, True):
        m = boot(version, debug=debug)
        holder = m.sleeper("cmdline_proc_show", comm="holder")
        assert m.load(P) == 0
        m.take()
        assert m.write("lp_p/enabled", b"0\n") == 2
        expected = ["livepatch: 'lp_p': starting unpatching transition"]
        if debug:
            expected.insert(0, "livepatch: 'lp_p': reversing transition from patching to unpatching")
        assert m.take_lp() == expected
        assert m.state("lp_p") == (0, 1)
        await settle()
        assert not m.exists("lp_p")
        m.sched.wake(holder)


@six
async def test_row23_ftrace_handler(m, autojump_clock):
    """obs #23: while enabled the function has the livepatch ftrace handler;
    none after disable.  notes §6.3: after an atomic replace the handlers of
    functions only the nops covered are removed (a holder keeps the replace
    transition open)."""
    cmd = m.sym("cmdline_proc_show").addr
    ver = m.sym("version_proc_show").addr
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show", "version_proc_show"]})) == 0
    assert cmd in m.kernel.ftrace.hooks and ver in m.kernel.ftrace.hooks
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    assert ver in m.kernel.ftrace.hooks                      # the nop, during the transition
    m.sched.wake(holder)
    await settle()
    assert cmd in m.kernel.ftrace.hooks
    assert ver not in m.kernel.ftrace.hooks, "ENGINE BUG (notes §6.3): nop handlers removed at completion"
    assert m.write("lp_r/enabled", b"0") == 1
    await settle()
    assert m.kernel.ftrace.hooks == {}


async def test_ftrace_ebusy_transcript(m, autojump_clock):
    """notes §2.6: another IPMODIFY ftrace user owns the function: the patch
    fails to enable with EBUSY and this transcript."""
    foreign = FtraceOps(lambda ip, task: None, FTRACE_OPS_FL_IPMODIFY)
    m.kernel.ftrace.set_filter_ip(foreign, m.sym("cmdline_proc_show").addr)
    assert m.kernel.ftrace.register_ftrace_function(foreign) == 0
    assert m.load(P) == -EBUSY
    lines = [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")]
    assert lines == [
        "livepatch: enabling patch 'lp_p'",
        "livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)",
        "livepatch: failed to patch object 'vmlinux'",
        "livepatch: failed to enable patch 'lp_p'",
        "livepatch: 'lp_p': unpatching complete",
    ]
    assert m.ls() == [] and m.module("lp_p") is None


@six
async def test_row2_no_signal_replace_stack_order_on_6_1_only(m, version, autojump_clock):
    """obs #2: 6.1 has no replace, stack_order or signal attribute."""
    assert m.load(P) == 0
    names = set(m.ls("lp_p"))
    assert "signal" not in names
    if version == "6.1":
        assert names == {"enabled", "transition", "force", "vmlinux"}


@six
async def test_row2_stat_sizes_and_modes(m, version, autojump_clock):
    """obs #2: through the filesystem operations, attributes stat with size
    4096 and their modes, directories with size 0 and 0755."""
    import stat as st

    from klpfs.fs.operations import KernfsOperations
    ops = KernfsOperations(m.kernfs)
    try:
        assert m.load(P) == 0
        for rel, mode, size in (("lp_p", 0o755, 0), ("lp_p/enabled", 0o644, 4096),
                                ("lp_p/transition", 0o444, 4096), ("lp_p/force", 0o200, 4096),
                                ("lp_p/vmlinux", 0o755, 0), ("lp_p/vmlinux/patched", 0o444, 4096),
                                ("lp_p/vmlinux/cmdline_proc_show,1", 0o755, 0)):
            attrs = await ops.getattr(m.lp_node(rel).ino, None)
            assert (st.S_IMODE(attrs.st_mode), attrs.st_size) == (mode, size), rel
    finally:
        m.kernfs.listeners.remove(ops)
