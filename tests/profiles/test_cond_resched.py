"""6.4-6.15 (our 6.11, 6.12 and 6.14): a task with TIF_PATCH_PENDING checks its own
stack at cond_resched() and switches unless it is in the code being
replaced (notes §4.6, §1 6.4 / 6.16)."""

from __future__ import annotations

import pytest
import trio

from klpfs.kernel.sched import TIF_PATCH_PENDING

from .conftest import IN_WRITE, settle, spec

COND_RESCHED = IN_WRITE
"""The profiles with klp_cond_resched (6.4-6.15)."""

P = spec("lp_p", {None: ["cmdline_proc_show"]})


def cond_resched_profile(version: str) -> bool:
    return version in COND_RESCHED


async def test_busy_kthread_switches_at_cond_resched(m, version, autojump_clock):
    """notes §4.6: 6.11/6.14: a CPU-bound kthread switches at its next
    cond_resched() (within a tick); 5.1/6.1: it is "running" at every stack
    check and holds the transition for good."""
    k = m.blocker("kspin")
    assert m.load(P) == 0
    assert k.patch_state == 0
    await settle(0.5)
    if cond_resched_profile(version):
        assert k.patch_state == 1 and TIF_PATCH_PENDING not in k.flags, \
            f"ENGINE BUG (notes §4.6): {version} switches busy kthreads at cond_resched"
        await settle()
        assert m.state("lp_p") == (1, 0)
    else:
        assert k.patch_state == 0
        await settle(5.0)
        assert m.state("lp_p") == (1, 1) and k.patch_state == 0


async def test_busy_kthread_inside_patched_function_does_not_switch(md, version, autojump_clock):
    """notes §4.6: a busy kthread inside the function being patched never
    switches at cond_resched()."""
    m = md
    k = m.kthread("kin")
    m.sched.enter(k, m.sym("cmdline_proc_show"), "R")
    assert m.load(P) == 0
    await settle(3.0)
    assert k.patch_state == 0
    assert m.state("lp_p") == (1, 1)
    m.sched.rest(k)
    await settle()
    assert m.state("lp_p") == (1, 0)


@pytest.mark.parametrize("version", COND_RESCHED)
async def test_cond_resched_failed_check_debug_line(md, version, autojump_clock):
    """notes §4.6: "then it prints the 'sleeping on function' debug line from
    klp_try_switch_task each time" -- the cond_resched() check of a busy
    task inside the patched function goes through klp_try_switch_task(current),
    which reports -EADDRINUSE as "is sleeping on function", not "is running"."""
    m = md
    k = m.kthread("kin")
    m.sched.enter(k, m.sym("cmdline_proc_show"), "R")
    assert m.load(P) == 0
    await settle(2.5)
    line = f"livepatch: klp_try_switch_task: kin:{k.pid} is sleeping on function cmdline_proc_show"
    assert line in m.lines(), (
        "ENGINE BUG (notes §4.6; documented deviation in transition.py): the cond_resched() "
        "self-check prints the 'is sleeping on function' debug line on every failed attempt")
    m.sched.rest(k)


async def test_msleep_kthread_only_via_periodic_check(m, version, autojump_clock):
    """notes §4.6: a kthread sleeping in msleep() (D) still only switches
    through the periodic stack check (here: sleeping elsewhere, at once; a
    holder keeps the transition open)."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    k = m.kthread("kms")
    m.sched.enter(k, m.sym("meminfo_proc_show"), "D")
    assert m.load(P) == 0
    assert k.patch_state == 1                  # the synchronous stack check
    m.sched.wake(holder)


@pytest.mark.parametrize("version", COND_RESCHED)
async def test_busy_user_task_in_kernel_switches_at_cond_resched(m, version, autojump_clock):
    """notes §4.6: the hook is "a task with the pending flag" at cond_resched():
    a user task busy inside a kernel function that is not being patched
    switches there too (not only kthreads)."""
    u = m.user("ubusy")
    m.sched.enter(u, m.sym("meminfo_proc_show"), "R")
    assert m.load(P) == 0
    assert u.patch_state == 0
    await settle(0.5)
    assert u.patch_state == 1, \
        "ENGINE BUG (notes §4.6): any task busy in the kernel switches at cond_resched on 6.4-6.15"
    m.sched.rest(u)


@pytest.mark.parametrize("version", COND_RESCHED)
async def test_reversal_with_cond_resched(m, version, autojump_clock):
    """notes §4.7: 6.4+ enables the scheduler hook again at a reversal: a busy
    kthread follows the new direction at its next cond_resched(), before
    the next retry."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    k = m.blocker("kspin")
    assert m.load(P) == 0
    await trio.sleep(0.5)
    assert k.patch_state == 1
    assert m.write("lp_p/enabled", b"0") == 1
    await trio.sleep(0.3)
    assert m.state("lp_p") == (0, 1)
    assert k.patch_state == 0 and TIF_PATCH_PENDING not in k.flags
    await settle()
    assert not m.exists("lp_p")
    m.sched.wake(holder)


@pytest.mark.parametrize("version", COND_RESCHED)
async def test_no_reliable_stacks_no_cond_resched_switch(boot, version, autojump_clock):
    """notes §4.6 / §4.4: the cond_resched() hook calls klp_try_switch_task(current),
    which fails at once on an arch without reliable stacks (5.3+): a busy
    kthread then never switches there."""
    m = boot(version, reliable_stacks=False)
    k = m.blocker("kspin")
    assert m.load(P) == 0
    await settle(0.5)
    assert k.patch_state == 0, \
        "ENGINE BUG (notes §4.4/§4.6): no reliable stacks -> klp_try_switch_task fails, also at cond_resched"
    assert m.state("lp_p") == (1, 1)
