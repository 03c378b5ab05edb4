"""Automatic fake signals (notes §4.2, §4.3, obs #13; spec §12.4): the counter,
one announced round at ~15 s, further silent rounds every 15 retries, what a
round does to each kind of task, the restart at a reversal."""

from __future__ import annotations

import trio

from klpfs.kernel.printk import KERN_NOTICE
from klpfs.kernel.sched import TIF_PATCH_PENDING, TaskKind

from .conftest import SIGNAL_LINE, settle, spec

P = spec("lp_p", {None: ["cmdline_proc_show"]})


async def until(t: float) -> None:
    """Sleep until absolute time t (since boot at 0)."""
    await trio.sleep(t - trio.current_time())


async def test_counter_and_first_line_only(m, autojump_clock):
    """notes §4.2: the counter is reset at the start; the synchronous attempt
    makes it 1, every retry adds 1; the attempt that sees 15 (about 15 s after
    the start) signals and prints the notice; later rounds (30, 45) are silent
    (obs #13: once at ~15 s, nothing at ~30 s)."""
    holder = m.sleeper("cmdline_proc_show", comm="msleeper", state="D")
    assert m.load(P) == 0
    assert m.lp.klp_signals_cnt == 1
    await until(5.5)
    assert m.lp.klp_signals_cnt == 6
    await until(14.5)
    assert SIGNAL_LINE not in m.lines()
    await until(15.5)
    times = m.times_of(SIGNAL_LINE)
    assert len(times) == 1 and 14.5 <= times[0] <= 16.0, f"ENGINE BUG (obs #13): {times}"
    assert [r.level for r in m.records() if r.text == SIGNAL_LINE] == [KERN_NOTICE]
    await until(46.5)
    assert len(m.times_of(SIGNAL_LINE)) == 1, "ENGINE BUG (obs #13): no second line at ~30 s"
    assert m.lp.klp_signals_cnt == 47
    assert m.state("lp_p") == (1, 1)                 # a D kthread is not moved (obs #13)
    assert holder.patch_state == 0
    m.sched.wake(holder)


async def test_user_task_in_interruptible_sleep(m, autojump_clock):
    """notes §4.3: a user task in an interruptible sleep in the old function is
    woken by the fake signal, switches on its way to user mode, restarts the
    call (now reaching the new function); the transition completes at the
    next retry."""
    u = m.sleeper("cmdline_proc_show", comm="ucat", kind=TaskKind.USER, state="S")
    assert m.load(P) == 0
    await until(14.5)
    assert u.patch_state == 0 and m.state("lp_p") == (1, 1)
    await until(15.5)
    assert SIGNAL_LINE in m.lines()
    assert u.patch_state == 1 and TIF_PATCH_PENDING not in u.flags
    assert u.activity is not None and u.activity.impl.name == "lp_p__cmdline_proc_show"
    await until(16.5)
    assert m.state("lp_p") == (1, 0)
    assert m.times_of("livepatch: 'lp_p': patching complete")[0] == 16.0


async def test_user_task_in_uninterruptible_sleep_not_moved(m, autojump_clock):
    """notes §4.3: signal_wake_up/set_notify_signal do not end a D sleep."""
    u = m.sleeper("cmdline_proc_show", comm="ud", kind=TaskKind.USER, state="D")
    assert m.load(P) == 0
    await until(16.5)
    assert SIGNAL_LINE in m.lines()
    assert u.patch_state == 0 and m.state("lp_p") == (1, 1)
    assert u.activity is not None and u.activity.impl.name == "cmdline_proc_show"
    m.sched.wake(u)


async def test_kthread_in_interruptible_sleep_woken(m, autojump_clock):
    """notes §4.3: a kthread in S is woken (wake_up_state(TASK_INTERRUPTIBLE));
    it does not switch by itself but passes the next stack check."""
    k = m.sleeper("cmdline_proc_show", comm="kts", state="S")
    assert m.load(P) == 0
    await until(15.5)
    assert k.activity is None, "woken out of the old function"
    assert k.patch_state == 0 or m.version in ("6.11", "6.12", "6.14")
    await until(16.5)
    assert k.patch_state in (1, -1)
    assert m.state("lp_p") == (1, 0)


async def test_kthread_in_uninterruptible_sleep_not_moved(m, autojump_clock):
    """obs #13: it does not move a kthread sleeping in msleep() (state D)."""
    k = m.sleeper("cmdline_proc_show", comm="ktd", state="D")
    assert m.load(P) == 0
    await until(31.5)
    assert k.activity is not None and k.patch_state == 0
    assert m.state("lp_p") == (1, 1)
    m.sched.wake(k)


async def test_only_pending_tasks_are_signalled(m, autojump_clock):
    """notes §4.3: only tasks with TIF_PATCH_PENDING; a kthread asleep (S)
    elsewhere, already switched, is left alone."""
    m.sleeper("cmdline_proc_show", comm="ktd", state="D")
    other = m.sleeper("meminfo_proc_show", comm="other", state="S")
    assert m.load(P) == 0
    assert other.patch_state == 1
    await until(15.5)
    assert SIGNAL_LINE in m.lines()
    assert other.activity is not None and other.activity.impl.name == "meminfo_proc_show"


async def test_silent_rounds_every_15_retries(m, autojump_clock):
    """notes §4.2: signals again at 30, 45 ... without the notice: a pending
    kthread in S at 30 s is woken then."""
    blocker = m.sleeper("cmdline_proc_show", comm="ktd", state="D")
    assert m.load(P) == 0
    await until(20.5)
    base = [m.kernel.kallsyms.find(n) for n in ("ret_from_fork", "kthread")]
    child = m.sched.add("kchild", TaskKind.KTHREAD, base, ppid=blocker.pid)   # inherits unpatched + pending
    assert child.patch_state == 0 and TIF_PATCH_PENDING in child.flags
    m.sched.enter(child, m.sym("cmdline_proc_show"), "S")
    await until(29.5)
    assert child.activity is not None
    await until(30.5)
    assert child.activity is None, "ENGINE BUG (notes §4.2): signals again at cnt 30"
    assert len(m.times_of(SIGNAL_LINE)) == 1
    m.sched.wake(blocker)


async def test_reversal_restarts_the_count(m, autojump_clock):
    """notes §4.2: the counter is reset at every start and at every reversal:
    a reversed transition that stays stuck prints the notice again ~15 s
    after the reversal."""
    assert m.load(P) == 0
    await settle()
    assert m.state("lp_p") == (1, 0)
    m.sleeper("cmdline_proc_show", comm="ktd", state="D")   # in lp_p's code
    assert m.write("lp_p/enabled", b"0") == 1          # t = 1.5
    await until(3.5)
    k2 = m.sleeper("cmdline_proc_show", comm="kt2", state="D")   # switched already: the original
    assert k2.activity.impl.name == "cmdline_proc_show"          # it blocks the way back
    await until(10.5)
    # sync attempt at 1.5 (-> 1), first retry at round_jiffies(2.5) = 3.0, then 4 ... 10
    assert m.lp.klp_signals_cnt == 9
    assert m.write("lp_p/enabled", b"1") == 1          # reversal to patching at 10.5
    assert m.lp.klp_signals_cnt == 0
    await until(17.5)
    # the first start's round would have come at 17.0; the reversal moved it to 26.0
    assert SIGNAL_LINE not in m.lines(), "ENGINE BUG (notes §4.2): count reset at reversal"
    await until(26.5)
    assert m.times_of(SIGNAL_LINE) == [26.0]
    m.sched.wake(k2)
    await settle()
    assert m.state("lp_p") == (1, 0)


async def test_reversed_stuck_transition_prints_again(m, autojump_clock):
    """notes §4.2: after a reversal the notice comes again, 15 retries later."""
    ktd = m.sleeper("cmdline_proc_show", comm="ktd", state="D")        # original: blocks patching
    assert m.load(P) == 0
    await until(16.5)
    assert len(m.times_of(SIGNAL_LINE)) == 1
    k2 = m.sleeper("cmdline_proc_show", comm="kt2", state="D")
    # kt2 entered while unswitched? it is a new kthread (child of kthreadd, already
    # patched) so it reaches the new code and blocks the reversal.
    assert k2.activity.impl.name == "lp_p__cmdline_proc_show"
    m.sched.wake(ktd)
    assert m.write("lp_p/enabled", b"0") == 1          # reversal at 16.5
    await until(31.0)
    assert len(m.times_of(SIGNAL_LINE)) == 1
    await until(32.5)
    times = m.times_of(SIGNAL_LINE)
    assert len(times) == 2 and 31.0 <= times[1] <= 32.5, f"ENGINE BUG (notes §4.2): {times}"
    m.sched.wake(k2)


async def test_user_task_with_unreliable_stack(m, autojump_clock):
    """notes §4.3: a user task whose stack cannot be checked, asleep (S)
    elsewhere, is made to leave the kernel by the fake signal and switches
    on its way to user mode."""
    u = m.user("uunrel")
    u.reliable_stack = False
    m.sched.enter(u, m.sym("meminfo_proc_show"), "S")
    assert m.load(P) == 0
    await until(14.5)
    assert u.patch_state == 0
    await until(15.5)
    assert u.patch_state == 1
    await until(16.5)
    assert m.state("lp_p") == (1, 0)
