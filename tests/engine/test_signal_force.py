"""§2.6 / §8.10 / §8.11 the 4.16 `signal` and `force` attributes; their absence
on 4.15; the absence of `immediate` on 4.16."""

from __future__ import annotations

import errno

import pytest

from klpfs.kernel.printk import KERN_NOTICE, KERN_WARNING
from klpfs.kernel.sched import TIF_PATCH_PENDING, TaskKind
from klpfs.sysfs.kernfs import Kernfs

from .conftest import ORIGINAL, settle, spec

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})
ATTRS = ["signal", "force"]
SIGNAL_LINE = "livepatch: signaling remaining tasks"
FORCE_LINE = "livepatch: forcing remaining tasks to the patched state"


def levels(m, text):
    return [r.level for r in m.records() if r.text == text]


# ---------------------------------------------------------------------------
# presence / absence per profile
# ---------------------------------------------------------------------------

async def test_no_signal_force_on_415(m, autojump_clock):
    """§0/§2.1: vanilla 4.15 has no signal and no force attributes."""
    assert m.register_only(A) == 0
    assert sorted(m.lp_node("lp_a").children) == ["enabled", "transition", "vmlinux"]
    assert m.lp_node("lp_a/signal") is None and m.lp_node("lp_a/force") is None


@pytest.mark.parametrize("attr", ATTRS)
async def test_attrs_0200_and_not_readable(m16, autojump_clock, attr):
    """§2.1/§2.2: signal and force are 0200: opening them for reading is EACCES
    (even for root); opening for writing works."""
    m = m16
    assert m.register_only(A) == 0
    node = m.lp_node(f"lp_a/{attr}")
    assert node.mode & 0o7777 == 0o200
    assert Kernfs.open_check(node, True, False) == -errno.EACCES
    assert Kernfs.open_check(node, True, True) == -errno.EACCES
    assert Kernfs.open_check(node, False, True) == 0


async def test_immediate_patch_not_honoured_on_416(m16, autojump_clock):
    """§0/§12.2: 4.16 has no klp_patch.immediate: a patch cannot skip the
    consistency model (either the engine refuses it, or the transition is per
    task: a task asleep in the old function holds it)."""
    m = m16
    sleeper = m.sleeper("cmdline_proc_show")
    ret = m.load(spec("lp_i", {None: ["cmdline_proc_show"]}, immediate=True))
    if ret == 0:
        assert m.state("lp_i") == (1, 1) and sleeper.patch_state == 0, (
            "ENGINE BUG (§12.2): on 4.16 `immediate` does not exist, yet the patch was applied "
            f"immediately: (enabled, transition)={m.state('lp_i')}, sleeper state {sleeper.patch_state}")


async def test_immediate_func_not_honoured_on_416(m16, autojump_clock):
    """§0/§12.2: 4.16 has no klp_func.immediate: the stack check does not skip
    the func, and the module reference is released after a normal disable."""
    m = m16
    sleeper = m.sleeper("cmdline_proc_show", comm="in_orig")
    ret = m.load(spec("lp_f", {None: [("cmdline_proc_show", 0, True)]}))
    if ret != 0:
        return
    assert sleeper.patch_state == 0, (
        "ENGINE BUG (§12.2): on 4.16 func->immediate does not exist, yet the stack check "
        "ignored a task asleep in the old function")
    m.sched.wake(sleeper)
    await settle()
    assert m.write("lp_f/enabled", b"0") == 1
    await settle()
    assert m.refcnt("lp_f") == 0, (
        "ENGINE BUG (§8.11/§12.2): on 4.16 the module reference is released after a normal "
        "(unforced) disable; func->immediate does not exist")


# ---------------------------------------------------------------------------
# §2.6 the handlers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("attr", ATTRS)
@pytest.mark.parametrize("value", [b"0", b"0\n", b"n", b"off"])
async def test_zero_always_succeeds_without_effect(m16, autojump_clock, attr, value):
    """§2.6 step 2 / §13.5: a false value returns the byte count with no check and
    no effect: with no transition, with another patch in transition, and with
    this patch in transition."""
    m = m16
    assert m.load(A) == 0
    await settle()
    assert m.register_only(B) == 0
    m.take()
    assert m.write(f"lp_a/{attr}", value) == len(value)           # no transition
    spin = m.blocker()
    assert m.write("lp_b/enabled", b"1") == 1
    m.take()
    assert m.write(f"lp_a/{attr}", value) == len(value)           # other in transition
    assert m.write(f"lp_b/{attr}", value) == len(value)           # this one in transition
    assert m.take() == []
    assert spin.patch_state == 0
    assert m.lp.klp_forced is False
    assert m.state("lp_b") == (1, 1)


@pytest.mark.parametrize("attr", ATTRS)
async def test_one_without_own_transition_einval(m16, autojump_clock, attr):
    """§2.6 step 3 / §13.5: a true value is EINVAL unless this patch is the one in
    transition: no transition at all, or another patch in transition."""
    m = m16
    assert m.register_only(A) == 0
    assert m.write(f"lp_a/{attr}", b"1") == -errno.EINVAL          # disabled, idle
    assert m.write("lp_a/enabled", b"1") == 1
    await settle()
    assert m.write(f"lp_a/{attr}", b"1") == -errno.EINVAL          # enabled, idle
    assert m.register_only(B) == 0
    m.blocker()
    assert m.write("lp_b/enabled", b"1") == 1
    m.take()
    assert m.write(f"lp_a/{attr}", b"1") == -errno.EINVAL          # other in transition
    assert m.take() == []
    assert m.lp.klp_forced is False


@pytest.mark.parametrize("attr", ATTRS)
@pytest.mark.parametrize("value", [b"2", b"x", b"", b"\n", b"o", b" 1"])
async def test_parse_error_einval(m16, autojump_clock, attr, value):
    """§2.6 step 1: parse errors are EINVAL (a 0-byte write is 0, §2.2)."""
    m = m16
    m.blocker()
    assert m.load(A) == 0
    want = 0 if value == b"" else -errno.EINVAL
    assert m.write(f"lp_a/{attr}", value) == want


# ---------------------------------------------------------------------------
# §8.10 signal
# ---------------------------------------------------------------------------

async def test_signal_effects(m16, autojump_clock):
    """§8.10: notice "signaling remaining tasks"; for each pending non-idle task:
    a user task in an interruptible sleep gets a fake signal, leaves toward user
    space and switches there; a kthread in an interruptible sleep is woken (and
    switches only at a later stack check); uninterruptible sleepers are left
    alone.  Nothing completes synchronously."""
    m = m16
    u_s = m.sleeper("cmdline_proc_show", comm="u_s", kind=TaskKind.USER, state="S")
    u_d = m.sleeper("cmdline_proc_show", comm="u_d", kind=TaskKind.USER, state="D")
    k_s = m.sleeper("cmdline_proc_show", comm="k_s", state="S")
    k_d = m.sleeper("cmdline_proc_show", comm="k_d", state="D")
    assert m.load(A) == 0
    await settle(0.5)
    m.take()
    assert m.write("lp_a/signal", b"1\n") == 2
    assert m.take() == [SIGNAL_LINE]
    assert levels(m, SIGNAL_LINE) == [KERN_NOTICE]
    assert u_s.patch_state == 1                         # switched on its way to user space
    assert k_s.patch_state == 0                         # woken, not switched yet
    assert k_s.activity is None                         # it left the function
    assert (u_d.patch_state, k_d.patch_state) == (0, 0)
    assert u_d.activity is not None and k_d.activity is not None
    assert m.state("lp_a") == (1, 1)
    await settle(1)
    assert k_s.patch_state == 1                         # passed the next stack check
    assert m.state("lp_a") == (1, 1)                    # the D sleepers still hold it
    m.sched.wake(u_d)
    m.sched.wake(k_d)
    await settle()
    assert m.state("lp_a") == (1, 0)


async def test_signal_not_for_idle_or_switched_tasks(m16, autojump_clock):
    """§8.10: only tasks still pending are signalled/woken: a kthread that already
    switched stays asleep where it was; idle tasks are not included."""
    m = m16
    k = m.sleeper("meminfo_proc_show", comm="k_clean", state="S")
    spin = m.blocker()
    assert m.load(A) == 0
    assert k.patch_state == 1
    act = k.activity
    assert m.write("lp_a/signal", b"1") == 1
    assert k.activity is act                            # not pending: not woken
    assert spin.patch_state == 0


async def test_signal_repeatable(m16, autojump_clock):
    """§2.6: repeated writes repeat the action and the message."""
    m = m16
    m.blocker()
    assert m.load(A) == 0
    m.take()
    for _ in range(3):
        assert m.write("lp_a/signal", b"1") == 1
    assert m.take() == [SIGNAL_LINE] * 3


async def test_signal_during_unpatching(m16, autojump_clock):
    """§2.6/§8.10: signal works for an unpatching transition too."""
    m = m16
    assert m.load(A) == 0
    await settle()
    u = m.sleeper("cmdline_proc_show", comm="u_s", kind=TaskKind.USER, state="S")
    assert m.write("lp_a/enabled", b"0") == 1
    assert u.patch_state == 1
    assert m.write("lp_a/signal", b"1") == 1
    assert u.patch_state == 0
    await settle()
    assert m.state("lp_a") == (0, 0)


# ---------------------------------------------------------------------------
# §8.11 force
# ---------------------------------------------------------------------------

async def test_force_switches_everyone_completes_on_retry(m16, autojump_clock):
    """§8.11: warning "forcing remaining tasks to the patched state"; every pending
    task and idle task jumps to the target with no stack check; the transition
    completes on the next retry work (~1 s), not in the write."""
    m = m16
    spin = m.blocker("spin")
    sl = m.sleeper("cmdline_proc_show", comm="sl")
    assert m.load(A) == 0
    m.take()
    assert m.write("lp_a/force", b"1\n") == 2
    assert m.take() == [FORCE_LINE]
    assert levels(m, FORCE_LINE) == [KERN_WARNING]
    assert (spin.patch_state, sl.patch_state) == (1, 1)
    assert all(t.patch_state == 1 for t in m.all_tasks())
    assert all(TIF_PATCH_PENDING not in t.flags for t in m.all_tasks())
    assert m.state("lp_a") == (1, 1)
    assert m.lp.klp_forced is True
    await settle(1.5)
    assert m.state("lp_a") == (1, 0)
    assert m.take() == [
        "livepatch: 'lp_a': completing patching transition",
        "livepatch: 'lp_a': patching complete",
    ]
    assert m.call("cmdline_proc_show", spin) == "lp_a:cmdline_proc_show"


async def test_force_unpatching_says_patched(m16, autojump_clock):
    """§8.11: the message says "patched" even when the target is UNPATCHED."""
    m = m16
    assert m.load(A) == 0
    await settle()
    spin = m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    m.take()
    assert m.write("lp_a/force", b"1") == 1
    assert m.take() == [FORCE_LINE]
    assert spin.patch_state == 0
    await settle()
    assert m.state("lp_a") == (0, 0)
    assert m.call("cmdline_proc_show", spin) == ORIGINAL


async def test_forced_patch_module_never_released(m16, autojump_clock):
    """§8.11 / §13.10: after a forced transition the patch module is not released
    at a completed disable: rmmod fails EAGAIN; enable/disable loops grow the
    refcount."""
    m = m16
    spin = m.blocker()
    assert m.load(A) == 0
    assert m.write("lp_a/force", b"1") == 1
    m.sched.rest(spin)
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.state("lp_a") == (0, 0)
    assert m.refcnt("lp_a") == 1
    assert m.rmmod("lp_a") == -errno.EAGAIN
    for expected in (2, 3):
        assert m.write("lp_a/enabled", b"1") == 1
        await settle()
        assert m.write("lp_a/enabled", b"0") == 1
        await settle()
        assert m.refcnt("lp_a") == expected


async def test_force_blocks_release_of_every_later_patch(m16, autojump_clock):
    """§8.11: klp_forced is global and never reset: after any forced transition
    no patch module (even one loaded later, never forced) is ever released."""
    m = m16
    spin = m.blocker()
    assert m.load(A) == 0
    assert m.write("lp_a/enabled", b"0") == 1                     # reverse, then force the unpatching
    assert m.write("lp_a/force", b"1") == 1
    m.sched.rest(spin)
    await settle()
    assert m.state("lp_a") == (0, 0)
    assert m.rmmod("lp_a") == -errno.EAGAIN
    assert m.write("lp_a/enabled", b"1") == 1                     # A must be enabled for B to stack
    await settle()
    assert m.load(B) == 0                                         # loaded after the force
    await settle()
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    assert m.state("lp_b") == (0, 0)
    assert m.refcnt("lp_b") == 1
    assert m.rmmod("lp_b") == -errno.EAGAIN


async def test_unforced_416_releases_normally(m16, autojump_clock):
    """§8.11: without any forced transition the 4.16 module is released."""
    m = m16
    assert m.load(A) == 0
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.refcnt("lp_a") == 0
    assert m.rmmod("lp_a") == 0


async def test_force_repeatable(m16, autojump_clock):
    """§2.6: repeated force writes repeat the message."""
    m = m16
    m.blocker()
    assert m.load(A) == 0
    m.take()
    assert m.write("lp_a/force", b"1") == 1
    assert m.write("lp_a/force", b"y") == 1
    assert m.take() == [FORCE_LINE, FORCE_LINE]


async def test_reversal_and_enable_rules_unchanged_on_416(m16, autojump_clock):
    """§12.2: 4.16 keeps the 4.15 `enabled` semantics (re-enable, reversal,
    stacking)."""
    m = m16
    assert m.load(A) == 0
    await settle()
    assert m.load(B) == 0
    await settle()
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"0") == 1
    assert m.write("lp_b/enabled", b"1") == 1                     # reversal
    await settle()
    assert m.state("lp_b") == (1, 0)


@pytest.mark.parametrize("attr", ATTRS)
async def test_stale_store_after_unregistration(m16, autojump_clock, attr):
    """§2.6 steps 2-3: "0" returns success with no check at all (even for a patch
    no longer registered); "1" is EINVAL (not the transition patch)."""
    m = m16
    assert m.register_only(A) == 0
    store = m.lp_node(f"lp_a/{attr}").store
    assert m.rmmod("lp_a") == 0
    assert store(b"0\n") == 2
    assert store(b"1\n") == -errno.EINVAL
