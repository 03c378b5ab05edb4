"""Atomic replace over two stacked patches (notes §6, §4.5, §5, obs #19):
nop functions and dynamic objects, coexisting directories, what completion
frees (and when, 5.1 vs 5.5+), no lines and no callbacks for replaced
patches, the replaced patches' modules, writes during the replace
transition, reversal, a later patch stacking on top."""

from __future__ import annotations

from .conftest import (
    EAGAIN, EBUSY, EINVAL, ORIGINAL, Recorder, cb, check_fn, logging_callbacks, settle, spec, target_module,
    tick)


def patches(m, callbacks: bool = False):
    cbs = (lambda p: {None: logging_callbacks(m.printk, p)}) if callbacks else (lambda p: None)
    a = spec("lp_a", {None: ["cmdline_proc_show"]}, callbacks=cbs("lp_a"))
    b = spec("lp_b", {None: ["version_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs("lp_b"))
    r = spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True, callbacks=cbs("lp_r"))
    return a, b, r


async def stacked(m, callbacks: bool = False):
    """tmod loaded; lp_a and lp_b enabled and complete; returns lp_r's spec."""
    a, b, r = patches(m, callbacks)
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.load(a) == 0
    await settle()
    assert m.load(b) == 0
    await settle()
    assert m.listed() == ["lp_a", "lp_b"]
    m.take()
    return r


async def test_replace_lifecycle(m, version, autojump_clock):
    """obs #19 / notes §6: right after insmod all directories coexist, the
    replace patch with nop dirs (vmlinux/version_proc_show,1) and a whole
    dynamic object (tmod/tmod_fn,1); a task not yet switched still runs the
    old patches, a switched one the new patch and the originals for the nops.
    On completion the replaced patches' directories vanish with no line for
    them (only "'lp_r': patching complete"), the nop dirs go, the modules
    stay loaded with refcnt 0 and can be removed."""
    r = await stacked(m)
    holder = m.sleeper("cmdline_proc_show", comm="holder")        # in lp_a's code: holds lp_r
    assert holder.activity.impl.name == "lp_a__cmdline_proc_show"
    assert m.load(r) == 0
    assert m.ls() == ["lp_a", "lp_b", "lp_r"]
    assert m.state("lp_r") == (1, 1) and m.state("lp_a") == (1, 0) and m.state("lp_b") == (1, 0)
    assert m.exists("lp_r/vmlinux/version_proc_show,1")
    assert m.exists("lp_r/tmod/tmod_fn,1")
    assert m.take() == ["livepatch: enabling patch 'lp_r'", "livepatch: 'lp_r': starting patching transition"]
    switched = m.kthread("switched")            # child of kthreadd, which switched at once
    assert switched.patch_state == 1
    assert m.call("cmdline_proc_show", switched) == "lp_r:cmdline_proc_show"
    assert m.call("version_proc_show", switched) == ORIGINAL, "ENGINE BUG (notes §6.2): a nop runs the original"
    assert m.call("tmod_fn", switched, module="tmod") == ORIGINAL
    assert m.call("cmdline_proc_show", holder) == "lp_a:cmdline_proc_show"
    assert m.call("version_proc_show", holder) == "lp_b:version_proc_show"
    assert m.call("tmod_fn", holder, module="tmod") == "lp_b:tmod_fn"
    m.sched.wake(holder)
    await settle()
    assert m.take() == ["livepatch: 'lp_r': patching complete"], (
        "ENGINE BUG (notes §6.3): no lines for replaced patches")
    assert m.ls() == ["lp_r"]
    assert not m.exists("lp_r/vmlinux/version_proc_show,1") and not m.exists("lp_r/tmod")
    assert m.state("lp_r") == (1, 0)
    assert m.listed() == ["lp_r"]
    for n in ("lp_a", "lp_b"):
        assert m.module(n) is not None and m.refcnt(n) == 0, f"ENGINE BUG (obs #19): {n} refcnt"
    assert m.refcnt("lp_r") == 1
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "lp_r:cmdline_proc_show"
    assert m.call("version_proc_show", k) == ORIGINAL
    assert m.call("tmod_fn", k, module="tmod") == ORIGINAL
    assert m.rmmod("lp_a") == 0 and m.rmmod("lp_b") == 0
    assert m.rmmod("lp_r") == -EAGAIN


async def test_writes_to_replaced_patch_during_replace(m, autojump_clock):
    """notes §3.3 row "replaced patch during a replace transition" / §6.4 / obs
    #19: 0 is EBUSY, 1 EINVAL, force 1 EINVAL."""
    r = await stacked(m)
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(r) == 0
    for n in ("lp_a", "lp_b"):
        assert m.write(f"{n}/enabled", b"0") == -EBUSY
        assert m.write(f"{n}/enabled", b"1") == -EINVAL
        assert m.write(f"{n}/force", b"1") == -EINVAL
        assert m.state(n) == (1, 0)
    m.sched.wake(holder)


async def test_reversing_replace_keeps_replaced_patches(m, autojump_clock):
    """notes §6.4 / obs #19: writing 0 to the replace patch reverses it; at
    completion the whole replace patch (nop dirs included) is freed, the
    replaced patches stay enabled with their functions active."""
    r = await stacked(m)
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(r) == 0
    m.take()
    assert m.write("lp_r/enabled", b"0") == 1
    assert m.state("lp_r") == (0, 1)
    await settle()          # the holder sleeps in lp_a's code: nothing blocks the way back
    assert m.take() == ["livepatch: 'lp_r': starting unpatching transition",
                        "livepatch: 'lp_r': unpatching complete"]
    assert m.ls() == ["lp_a", "lp_b"]
    assert m.state("lp_a") == (1, 0) and m.state("lp_b") == (1, 0)
    assert m.listed() == ["lp_a", "lp_b"]
    assert m.refcnt("lp_r") == 0 and m.refcnt("lp_a") == 1 and m.refcnt("lp_b") == 1
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "lp_a:cmdline_proc_show"
    assert m.call("version_proc_show", k) == "lp_b:version_proc_show"
    assert m.call("tmod_fn", k, module="tmod") == "lp_b:tmod_fn"
    m.sched.wake(holder)


async def test_later_patch_stacks_on_top(m, autojump_clock):
    """obs #19 / notes §6.5: a non-replace patch loaded after the replace patch
    stacks on top; the replace patch under it can be disabled."""
    r = await stacked(m)
    assert m.load(r) == 0
    await settle()
    assert m.ls() == ["lp_r"]
    assert m.load(spec("lp_c", {None: ["cmdline_proc_show"]})) == 0
    await settle()
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "lp_c:cmdline_proc_show"
    assert m.write("lp_r/enabled", b"0") == 1
    await settle()
    assert m.ls() == ["lp_c"]
    assert m.call("cmdline_proc_show", k) == "lp_c:cmdline_proc_show"
    assert m.refcnt("lp_r") == 0


async def test_no_callbacks_of_replaced_patches(m, autojump_clock):
    """notes §4.5 step 7 / §6.3: no callback of a replaced patch runs (neither
    pre_unpatch nor post_unpatch); only the new patch's pre/post_patch."""
    r = await stacked(m, callbacks=True)
    assert m.load(r) == 0
    await settle()
    assert m.take() == [
        "livepatch: enabling patch 'lp_r'",
        cb("lp_r", "pre_patch"),
        "livepatch: 'lp_r': starting patching transition",
        cb("lp_r", "post_patch"),
        "livepatch: 'lp_r': patching complete",
    ]


async def test_replace_completion_order(m, version, autojump_clock):
    """notes §6.3 / §1 (5.5): nop dirs and dynamic objects go before the new
    patch's post_patch callbacks on every profile.  5.1-5.4: the replaced
    patches' object and function dirs go before post_patch and before
    "patching complete"; 5.5+: they are kept until after the post_patch
    callbacks (and the notice).  The replaced patch dirs go last (free work),
    each module reference drops after its dir went."""
    r = await stacked(m, callbacks=True)
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(r) == 0
    await settle()
    rec = Recorder(m, watch=("lp_a", "lp_b"))
    m.sched.wake(holder)
    await settle()
    rec.close()
    post = rec.index("log", cb("lp_r", "post_patch"))
    done = rec.index("log", "livepatch: 'lp_r': patching complete")
    assert rec.index("rm", "lp_r/vmlinux/version_proc_show,1") < post
    assert rec.index("rm", "lp_r/tmod") < post
    a_obj = rec.index("rm", "lp_a/vmlinux")
    b_obj = rec.index("rm", "lp_b/tmod")
    if version == "5.1":
        assert a_obj < post and b_obj < post and a_obj < done, \
            "ENGINE BUG (notes §6.3, 5.1-5.4): replaced patches freed before post_patch"
    else:
        assert a_obj > done and b_obj > done, \
            f"ENGINE BUG (notes §9, 5.5+ on {version}): replaced patches kept until after post_patch"
    for n in ("lp_a", "lp_b"):
        assert rec.index("rm", n) > rec.index("rm", f"{n}/vmlinux" if n == "lp_a" else f"{n}/tmod")
        assert rec.refs_at("rm", n)[n] == 1
    assert m.refcnt("lp_a") == 0 and m.refcnt("lp_b") == 0


async def test_nop_stack_check_while_patching(md, version, autojump_clock):
    """notes §4.4 / §6.2: a task sleeping in an older patch's replacement of a
    function the replace patch only nops blocks the transition ("is sleeping
    on function version_proc_show"); the original does not."""
    m = md
    r = await stacked(m)
    holder = m.sleeper("version_proc_show", comm="vholder")       # in lp_b's code
    assert holder.activity.impl.name == "lp_b__version_proc_show"
    assert m.load(r) == 0
    line = (f"livepatch: {check_fn(version)}: vholder:{holder.pid} is sleeping on function "
            "version_proc_show")
    assert line in m.take_lp(), "ENGINE BUG (notes §4.4): nop funcs are checked"
    await settle()
    assert m.state("lp_r") == (1, 1)
    m.sched.wake(holder)
    await settle()
    assert m.state("lp_r") == (1, 0)


async def test_reversal_blocked_by_original_function(md, version, autojump_clock):
    """notes §6.2: while unpatching (reversal) a nop's checked range is the
    original function: a task sleeping in the original blocks the reversal
    of a replace patch."""
    m = md
    r = await stacked(m)
    holder = m.sleeper("cmdline_proc_show", comm="holder")        # holds lp_r's patching
    assert m.load(r) == 0
    orig = m.sleeper("version_proc_show", comm="oholder")          # switched: reaches the original via the nop
    assert orig.activity.impl.name == "version_proc_show"
    m.take()
    assert m.write("lp_r/enabled", b"0") == 1
    await settle()
    line = f"livepatch: {check_fn(version)}: oholder:{orig.pid} is sleeping on function version_proc_show"
    assert line in m.take_lp(), "ENGINE BUG (notes §6.2): reversal checks the nop's original"
    assert m.state("lp_r") == (0, 1)
    m.sched.wake(orig)
    await settle()
    assert not m.exists("lp_r")
    m.sched.wake(holder)


async def test_target_module_going_and_coming_during_replace(m, autojump_clock):
    """notes §6.2 / §8.1: during the replace transition, every listed patch is
    processed in list order; the dynamic object is treated like a static one
    (no callbacks): "reverting" for lp_b then lp_r on unload, "applying" for
    lp_b then lp_r on reload."""
    r = await stacked(m)
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(r) == 0
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "livepatch: reverting patch 'lp_b' on unloading module 'tmod'",
        "livepatch: reverting patch 'lp_r' on unloading module 'tmod'",
    ]
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_b' to loading module 'tmod'",
        "livepatch: applying patch 'lp_r' to loading module 'tmod'",
    ]
    k = m.kthread()
    assert m.call("tmod_fn", k, module="tmod") == ORIGINAL
    assert m.call("tmod_fn", holder, module="tmod") == "lp_b:tmod_fn"
    m.sched.wake(holder)
    await settle()
    assert m.ls() == ["lp_r"]
    assert m.call("tmod_fn", k, module="tmod") == ORIGINAL


async def test_replace_with_nothing_listed(m, autojump_clock):
    """notes §6.5: a replace patch may be loaded alone; it is just a patch."""
    _, _, r = patches(m)
    assert m.load(r) == 0
    await settle()
    assert m.ls() == ["lp_r"] and m.state("lp_r") == (1, 0)
    assert sorted(d for d in m.ls("lp_r/vmlinux") if d != "patched") == ["cmdline_proc_show,1"]


async def test_replace_over_replace(m, autojump_clock):
    """notes §6.5: nothing requires the replaced patches to be non-replace
    patches: a second replace patch replaces the first."""
    r = await stacked(m)
    assert m.load(r) == 0
    await settle()
    holder = m.sleeper("meminfo_proc_show", comm="holder")   # keeps lp_r2's transition open
    assert m.load(spec("lp_r2", {None: ["meminfo_proc_show"]}, replace=True)) == 0
    assert m.exists("lp_r2/vmlinux/cmdline_proc_show,1")
    m.sched.wake(holder)
    await settle()
    assert m.ls() == ["lp_r2"]
    assert not m.exists("lp_r2/vmlinux/cmdline_proc_show,1")
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == ORIGINAL
    assert m.call("meminfo_proc_show", k) == "lp_r2:meminfo_proc_show"
    assert m.refcnt("lp_r") == 0


async def test_replace_completing_inside_insmod(m, version, autojump_clock):
    """notes §12.6 / obs #5: the first completion attempt is synchronous: when
    it succeeds, the replaced patches are unpatched (and, their object dirs
    removed) before insmod returns; their patch dirs go with the free work."""
    r = await stacked(m)
    for cpu in range(len(m.sched.cpu_online)):
        m.sched.set_cpu_online(cpu, False)
    assert m.load(r) == 0
    assert m.read("lp_r/transition") == b"0\n"
    assert m.take() == ["livepatch: enabling patch 'lp_r'",
                        "livepatch: 'lp_r': starting patching transition",
                        "livepatch: 'lp_r': patching complete"]
    assert not m.exists("lp_a/vmlinux") and not m.exists("lp_b/vmlinux")
    assert m.listed() == ["lp_r"]
    await tick()
    assert m.ls() == ["lp_r"]
    assert m.refcnt("lp_a") == 0 and m.refcnt("lp_b") == 0
