"""Which patches a forced transition pins for good (notes §5.3, obs #10):
5.1-5.17 every listed patch; 5.18+ (6.1, 6.11, 6.14) only the patches being
removed (the unpatching one, or the ones a replace patch replaces)."""

from __future__ import annotations

from .conftest import EAGAIN, FORCE_LINE, settle, spec

A = spec("lp_a", {None: ["version_proc_show"]})
B = spec("lp_b", {None: ["cmdline_proc_show"]})
C = spec("lp_c", {None: ["meminfo_proc_show"]})
R = spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)


async def disable_and_release(m, name):
    """Disable `name` (no holder), wait for the free; return its refcnt and rmmod result."""
    assert m.write(f"{name}/enabled", b"0") == 1
    await settle()
    assert not m.exists(name), f"{name} should be freed (its directory goes even when forced)"
    return m.refcnt(name), m.rmmod(name)


async def test_force_patching_non_replace(m, version, autojump_clock):
    """5.1: forcing B's patching pins every listed patch (A and B); a patch
    loaded afterwards (C) is unaffected.  6.1+: forcing a patching transition
    of a non-replace patch pins nothing."""
    assert m.load(A) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(B) == 0
    await settle()
    assert m.write("lp_b/force", b"1") == 1
    await settle()
    assert m.state("lp_b") == (1, 0)
    m.sched.wake(holder)
    assert m.load(C) == 0
    await settle()
    results = {n: await disable_and_release(m, n) for n in ("lp_a", "lp_b", "lp_c")}
    if version == "5.1":
        expected = {"lp_a": (1, -EAGAIN), "lp_b": (1, -EAGAIN), "lp_c": (0, 0)}
    else:
        expected = {"lp_a": (0, 0), "lp_b": (0, 0), "lp_c": (0, 0)}
    assert results == expected, f"ENGINE BUG (notes §5.3, {version}): force marks {results}"


async def test_force_unpatching(m, version, autojump_clock):
    """obs #10: forcing an unpatching transition leaves that module's reference
    held forever (refcnt 1, rmmod EAGAIN even after the task left the new
    code).  notes §5.3: on 5.1 every listed patch is pinned as well; on 6.1+
    only the unpatching one."""
    assert m.load(A) == 0
    await settle()
    assert m.load(B) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")      # in lp_b's replacement
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    m.take()
    assert m.write("lp_b/force", b"1") == 1
    assert m.take() == [FORCE_LINE]
    await settle()
    assert not m.exists("lp_b")
    m.sched.wake(holder)
    await settle()
    assert m.refcnt("lp_b") == 1 and m.rmmod("lp_b") == -EAGAIN, "ENGINE BUG (obs #10)"
    ref_a, rm_a = await disable_and_release(m, "lp_a")
    if version == "5.1":
        assert (ref_a, rm_a) == (1, -EAGAIN), "ENGINE BUG (notes §5.3, 5.1): every listed patch pinned"
    else:
        assert (ref_a, rm_a) == (0, 0), f"ENGINE BUG (notes §5.3, {version}): only the unpatching patch pinned"


async def test_force_replace(m, version, autojump_clock):
    """notes §5.3: forcing the patching transition of a replace patch pins the
    replaced patches (their dirs go at completion, their modules stay at
    refcnt 1) on every profile; the replace patch itself only on 5.1."""
    assert m.load(A) == 0
    await settle()
    assert m.load(B) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")      # in lp_b's replacement
    assert m.load(R) == 0
    await settle()
    assert m.write("lp_r/force", b"1") == 1
    await settle()
    assert m.ls() == ["lp_r"]
    m.sched.wake(holder)
    await settle()
    for n in ("lp_a", "lp_b"):
        assert m.refcnt(n) == 1 and m.rmmod(n) == -EAGAIN, f"ENGINE BUG (notes §5.3): {n} pinned"
    ref_r, rm_r = await disable_and_release(m, "lp_r")
    if version == "5.1":
        assert (ref_r, rm_r) == (1, -EAGAIN), "ENGINE BUG (notes §5.3, 5.1): the replace patch was listed"
    else:
        assert (ref_r, rm_r) == (0, 0)


async def test_later_patch_not_pinned_by_earlier_force(m, autojump_clock):
    """notes §1 (5.1) / §12.4: the flag is per patch: patches loaded after a
    forced transition can still be removed."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(B) == 0
    await settle()
    assert m.write("lp_b/force", b"1") == 1
    await settle()
    m.sched.wake(holder)
    assert m.load(C) == 0
    await settle()
    assert await disable_and_release(m, "lp_c") == (0, 0)
