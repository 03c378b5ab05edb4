"""`enabled` and `force` writes on 5.1+ (notes §3.3-§3.5, obs #6-#11, #14):
the decision table, EBUSY while another transition runs, reversal both
ways, loading during a transition, the window where a disabled patch is
not yet freed."""

from __future__ import annotations

import pytest

from .conftest import EBUSY, EINVAL, ENODEV, FORCE_LINE, ORIGINAL, settle, spec, tick

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})


async def hold(m, func="cmdline_proc_show"):
    """A kthread asleep (D) in `func` (whatever implementation it reaches)."""
    return m.sleeper(func, comm="holder")


# ---------------------------------------------------------------------------
# the decision table (notes §3.3)
# ---------------------------------------------------------------------------

async def test_enabled_idle(m, autojump_clock):
    """notes §3.3 row "enabled, idle": 1 is EINVAL (no re-enable, same value),
    0 starts unpatching and returns the byte count."""
    assert m.load(A) == 0
    await settle()
    assert m.state("lp_a") == (1, 0)
    for v in (b"1", b"Y", b"yes", b"on", b"10"):
        assert m.write("lp_a/enabled", v) == -EINVAL, v            # obs #7
    assert m.write("lp_a/enabled", b"0\n") == 2
    assert m.read("lp_a/enabled") == b"0\n"


async def test_kstrtobool_errors(m, autojump_clock):
    """obs #6: anything kstrtobool rejects is EINVAL; off spellings with junk
    after them disable; a 0-byte write returns 0 and does nothing."""
    assert m.load(A) == 0
    await settle()
    for v in (b"2", b"-1", b"x", b" 1", b"true", b"\n", b"\0", b"o", b"oz"):
        assert m.write("lp_a/enabled", v) == -EINVAL, v
    assert m.write("lp_a/enabled", b"") == 0
    assert m.state("lp_a") == (1, 0)
    assert m.write("lp_a/enabled", b"0junk") == 5
    assert m.enabled("lp_a") == b"0\n"


@pytest.mark.parametrize("spelling", [b"0x1", b"no way", b"OFF", b"N", b"n"])
async def test_off_spellings_disable(m, spelling, autojump_clock):
    """obs #6: `0x1`, `no way`, `OFF` all disable."""
    assert m.load(A) == 0
    await settle()
    assert m.write("lp_a/enabled", spelling) == len(spelling)
    await settle()
    assert not m.exists("lp_a")


async def test_patching_transition_patch(m, autojump_clock):
    """notes §3.3 row "patching": 1 EINVAL, 0 reverses (count returned, obs #14);
    enabled reads 0 and transition 1 right after."""
    t = await hold(m)
    assert m.load(A) == 0
    assert m.state("lp_a") == (1, 1)
    assert m.write("lp_a/enabled", b"1") == -EINVAL
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)
    await settle()
    # the holder sleeps in the original: the reversal completes at the next retry (obs #14)
    assert not m.exists("lp_a")
    assert m.module("lp_a") is not None and m.refcnt("lp_a") == 0
    m.sched.wake(t)


async def test_unpatching_transition_patch(m, autojump_clock):
    """notes §3.3 row "unpatching": 0 EINVAL, 1 reverses to patching (obs #9:
    count returned, enabled=1, transition=1, then "patching complete")."""
    assert m.load(A) == 0
    await settle()
    t = await hold(m)                     # sleeps in lp_a's replacement: holds the unpatching
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)
    assert m.write("lp_a/enabled", b"0") == -EINVAL
    m.take()
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.state("lp_a") == (1, 1)
    await settle()
    assert m.state("lp_a") == (1, 0)
    assert m.take() == ["livepatch: 'lp_a': starting patching transition",
                        "livepatch: 'lp_a': patching complete"]
    m.sched.wake(t)


async def test_reverse_both_ways_back_to_back(m, autojump_clock):
    """obs #14: `0` then `1` back to back works (two "starting ... transition" lines)."""
    t = await hold(m)
    assert m.load(A) == 0
    m.take()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.take() == ["livepatch: 'lp_a': starting unpatching transition",
                        "livepatch: 'lp_a': starting patching transition"]
    assert m.state("lp_a") == (1, 1)
    m.sched.wake(t)
    await settle()
    assert m.state("lp_a") == (1, 0)


async def test_other_patch_during_transition(m, autojump_clock):
    """notes §3.3 / obs #11: while any patch is in transition, 0 to another
    enabled patch is EBUSY, 1 to it EINVAL, force 1 on it EINVAL (force 0 is
    a no-op success); the transition patch's current target value is EINVAL."""
    assert m.load(B) == 0
    await settle()
    t = await hold(m)
    assert m.load(A) == 0
    assert m.state("lp_a") == (1, 1)
    assert m.write("lp_b/enabled", b"0") == -EBUSY
    assert m.write("lp_b/enabled", b"1") == -EINVAL
    assert m.write("lp_b/force", b"1") == -EINVAL
    assert m.write("lp_b/force", b"0") == 1
    assert m.write("lp_a/enabled", b"1") == -EINVAL
    assert m.state("lp_b") == (1, 0)
    m.sched.wake(t)
    await settle()
    assert m.write("lp_b/enabled", b"0") == 1


async def test_no_stacking_rule(m, autojump_clock):
    """notes §3.4 / obs #18: any enabled patch can be disabled in any order when
    no transition runs (the 4.x stacking rule is gone); disabling the top one
    lets the one below show through."""
    a = spec("lp_a", {None: ["cmdline_proc_show"]})
    b = spec("lp_b", {None: ["cmdline_proc_show"]})
    assert m.load(a) == 0
    await settle()
    assert m.load(b) == 0
    await settle()
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "lp_b:cmdline_proc_show"
    assert m.write("lp_a/enabled", b"0") == 1          # the lower one first
    await settle()
    assert not m.exists("lp_a")
    assert m.call("cmdline_proc_show", k) == "lp_b:cmdline_proc_show"
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == -17   # still loaded: EEXIST
    assert m.rmmod("lp_a") == 0
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == 0   # reloading puts it on top
    await settle()
    assert m.call("cmdline_proc_show", k) == "lp_a:cmdline_proc_show"
    assert m.write("lp_a/enabled", b"0") == 1          # the top one
    await settle()
    assert m.call("cmdline_proc_show", k) == "lp_b:cmdline_proc_show"
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    assert m.call("cmdline_proc_show", k) == ORIGINAL


# ---------------------------------------------------------------------------
# the window between klp_free_patch_start and klp_free_patch_finish (notes §5.1)
# ---------------------------------------------------------------------------

async def test_disabled_not_yet_freed(m, version, autojump_clock):
    """notes §3.3 row "disabled, not yet freed" / §5.1: when the unpatching
    completes inside the write, the object and function dirs are gone at
    once, the patch dir (attributes only) stays until the free work runs:
    enabled reads 0, transition 0, both writes EINVAL, force 1 EINVAL.
    Then the directory goes and stale handles get ENODEV (obs #9)."""
    for cpu in range(len(m.sched.cpu_online)):    # no idle task to wait for:
        m.sched.set_cpu_online(cpu, False)        # the unpatching completes in the write (obs #5)
    assert m.load(A) == 0
    await settle()
    enabled = m.lp_node("lp_a/enabled")
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.read("lp_a/transition") == b"0\n", "the unpatching should complete inside the write"
    assert m.exists("lp_a")
    assert not m.exists("lp_a/vmlinux"), "ENGINE BUG (notes §5.1): object dirs go at free start"
    assert [c for c in m.ls("lp_a") if m.lp_node(f"lp_a/{c}").is_dir] == []
    assert m.state("lp_a") == (0, 0)
    assert m.write("lp_a/enabled", b"1") == -EINVAL
    assert m.write("lp_a/enabled", b"0") == -EINVAL
    assert m.write("lp_a/force", b"1") == -EINVAL
    await tick()
    assert not m.exists("lp_a")
    from klpfs.sysfs.kernfs import Kernfs
    assert Kernfs.write(enabled, b"1") == -ENODEV
    assert Kernfs.read(enabled, 0, 10) == -ENODEV


async def test_reenable_impossible_after_free(m, autojump_clock):
    """obs #9 / notes §12.2: once the directory is gone the patch cannot be
    enabled again except by rmmod + insmod."""
    assert m.load(A) == 0
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert not m.exists("lp_a")
    assert m.lp_node("lp_a/enabled") is None                 # open: ENOENT
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == -17   # module still loaded
    assert m.rmmod("lp_a") == 0
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == 0
    assert m.state("lp_a")[0] == 1


# ---------------------------------------------------------------------------
# loading during a transition (notes §2.6, obs #11)
# ---------------------------------------------------------------------------

async def test_load_during_transition_is_ebusy(m, autojump_clock):
    """obs #11 / notes §2.6: loading a patch while another is in transition is
    EBUSY from the module's init: no kernel line, no directory left, module
    not loaded; the same while unpatching."""
    assert m.load(spec("lp_z", {None: ["meminfo_proc_show"]})) == 0   # the once-per-boot taint line
    await settle()
    t = await hold(m)
    assert m.load(A) == 0
    m.take()
    assert m.load(B) == -EBUSY
    assert m.take() == [], "ENGINE BUG (obs #11): no kernel line for the EBUSY load"
    assert m.ls() == ["lp_a", "lp_z"]
    assert m.module("lp_b") is None
    m.sched.wake(t)
    await settle()
    t = m.sleeper("cmdline_proc_show", comm="holder2")     # now in lp_a's code
    assert m.write("lp_a/enabled", b"0") == 1
    m.take()
    assert m.load(B) == -EBUSY
    assert m.take() == []
    assert m.ls() == ["lp_a", "lp_z"]
    m.sched.wake(t)


# ---------------------------------------------------------------------------
# force (notes §3.5, obs #10)
# ---------------------------------------------------------------------------

async def test_force_values_without_transition(m, autojump_clock):
    """obs #10: no transition: 1/Y/yes EINVAL, 0/N success (no-op, count),
    2 and \\n EINVAL, 0 bytes 0."""
    assert m.load(A) == 0
    await settle()
    for v in (b"1", b"Y", b"yes", b"2", b"\n"):
        assert m.write("lp_a/force", v) == -EINVAL, v
    assert m.write("lp_a/force", b"0") == 1
    assert m.write("lp_a/force", b"N\n") == 2
    assert m.write("lp_a/force", b"") == 0
    assert m.state("lp_a") == (1, 0)


async def test_force_patching_completes_at_next_retry(m, autojump_clock):
    """obs #10: during a transition 1 succeeds, logs the warning, and the
    transition completes at the next retry (<= 1 s)."""
    t = await hold(m)
    assert m.load(A) == 0
    await settle()
    m.take()
    assert m.write("lp_a/force", b"1") == 1
    assert m.take() == [FORCE_LINE]
    assert m.state("lp_a") == (1, 1)
    await settle(1.0)
    assert m.state("lp_a") == (1, 0)
    assert m.take() == ["livepatch: 'lp_a': patching complete"]
    m.sched.wake(t)


async def test_force_unpatching_same_text(m, autojump_clock):
    """obs #10: the same text when unpatching."""
    assert m.load(A) == 0
    await settle()
    t = await hold(m)
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()                        # past the first retry: retries now come every second
    m.take()
    assert m.write("lp_a/force", b"1") == 1
    assert m.take() == [FORCE_LINE]
    await settle(1.0)
    assert m.take() == ["livepatch: 'lp_a': unpatching complete"]
    await settle()
    assert not m.exists("lp_a")
    m.sched.wake(t)
