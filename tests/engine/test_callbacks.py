"""§5 callbacks: one test per row of the "when each runs" table, plus the
post_unpatch gating rule."""

from __future__ import annotations

import errno

from .conftest import ORIGINAL, cb_line, demo_callbacks, settle, spec, target_module


def demo_spec(m, objs=None, rets=None, name="lp_cb"):
    """A callbacks-demo-like patch: vmlinux cmdline_proc_show, tmod tfunc, and an
    object for a module that is never loaded; all four callbacks everywhere."""
    objs = objs or {None: ["cmdline_proc_show"], "tmod": ["tfunc"], "absent": ["x"]}
    cbs = {o: demo_callbacks(m.printk, pre_patch_ret=rets) for o in objs}
    return spec(name, objs, callbacks=cbs)


def tmod(m, funcs=("tfunc",), **kw):
    return target_module("tmod", list(funcs), printk=m.printk, **kw)


async def loaded_enabled(m, with_tmod=True):
    if with_tmod:
        assert m.load(tmod(m)) == 0
    assert m.load(demo_spec(m)) == 0
    await settle()
    assert m.state("lp_cb") == (1, 0)
    m.take()


# --- enable / completion / disable / completion ----------------------------

async def test_row_enable_pre_patch_per_loaded_object(m, autojump_clock):
    """§5 row "enable": pre_patch for each loaded object in array order (the
    object is patched right after its own pre_patch); none for unloaded ones."""
    assert m.load(tmod(m)) == 0
    m.take()
    assert m.load(demo_spec(m)) == 0
    assert [ln for ln in m.take() if "demo:" in ln] == [
        cb_line("pre_patch"), cb_line("pre_patch", "tmod", "LIVE")]


async def test_row_patching_completes_post_patch(m, autojump_clock):
    """§5 row "patching transition completes": post_patch for every loaded object,
    array order, before the "patching complete" notice."""
    assert m.load(tmod(m)) == 0
    assert m.load(demo_spec(m)) == 0
    m.take()
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing patching transition",
        cb_line("post_patch"),
        cb_line("post_patch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': patching complete",
    ]


async def test_row_disable_pre_unpatch_patched_objects(m, autojump_clock):
    """§5 row "disable": pre_unpatch for each patched object before "starting
    unpatching transition"."""
    await loaded_enabled(m)
    assert m.write("lp_cb/enabled", b"0") == 1
    assert m.take_lp() == [
        "livepatch: 'lp_cb': initializing unpatching transition",
        cb_line("pre_unpatch"),
        cb_line("pre_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': starting unpatching transition",
    ]


async def test_row_unpatching_completes_post_unpatch(m, autojump_clock):
    """§5 row "unpatching transition completes": objects unpatched first, then
    post_unpatch for loaded objects, before "unpatching complete"."""
    await loaded_enabled(m)
    t = m.kthread()
    calls = []
    obj = m.patch("lp_cb").objs[0]
    inner = obj.callbacks.post_unpatch
    obj.callbacks.post_unpatch = lambda o: (calls.append(m.call("cmdline_proc_show", t)), inner(o))[1]
    assert m.write("lp_cb/enabled", b"0") == 1
    m.take()
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        cb_line("post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': unpatching complete",
    ]
    assert calls == [ORIGINAL]


# --- enable failing at object k ------------------------------------------------

async def test_row_enable_fails_in_pre_patch_of_object_2(m, autojump_clock):
    """§5 row "enable fails at object k" (pre_patch failed): object 1 was
    pre-patched and patched; object 2's pre_patch ran and failed (flag false);
    the cancel unpatches and runs post_unpatch only for object 1."""
    assert m.load(tmod(m)) == 0
    m.take()
    s = demo_spec(m, {None: ["cmdline_proc_show"], "tmod": ["tfunc"], "absent": ["x"]},
                  rets={"tmod": -errno.EPERM})
    assert m.load(s) == -errno.EPERM
    assert m.take() == [
        "lp_cb: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_cb'",
        "livepatch: 'lp_cb': initializing patching transition",
        cb_line("pre_patch"),
        cb_line("pre_patch", "tmod", "LIVE"),
        "livepatch: pre-patch callback failed for object 'tmod'",
        "livepatch: failed to enable patch 'lp_cb'",
        "livepatch: 'lp_cb': canceling patching transition, going to unpatch",
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        "livepatch: 'lp_cb': unpatching complete",
    ]
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL
    assert m.lp.klp_ops == []


async def test_row_enable_fails_in_patching_object_2(m, autojump_clock):
    """§5 row "enable fails at object k" (patching failed): object 2's pre_patch
    succeeded so its flag is true: post_unpatch runs for objects 1 and 2."""
    assert m.load(tmod(m, notrace=("tfunc",))) == 0
    m.take()
    assert m.load(demo_spec(m)) == -errno.EINVAL
    assert m.take() == [
        "lp_cb: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_cb'",
        "livepatch: 'lp_cb': initializing patching transition",
        cb_line("pre_patch"),
        cb_line("pre_patch", "tmod", "LIVE"),
        "livepatch: failed to find location for function 'tfunc'",
        "livepatch: failed to patch object 'tmod'",
        "livepatch: failed to enable patch 'lp_cb'",
        "livepatch: 'lp_cb': canceling patching transition, going to unpatch",
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        cb_line("post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': unpatching complete",
    ]
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL


async def test_pre_patch_failure_vmlinux_exact_log(m, autojump_clock):
    """§8.13 "Enable whose vmlinux pre_patch returns -19": exact lines; insmod
    fails with ENODEV."""
    s = demo_spec(m, {None: ["cmdline_proc_show"]}, rets={"vmlinux": -errno.ENODEV})
    assert m.load(s) == -errno.ENODEV
    assert m.take() == [
        "lp_cb: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_cb'",
        "livepatch: 'lp_cb': initializing patching transition",
        cb_line("pre_patch"),
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        "livepatch: failed to enable patch 'lp_cb'",
        "livepatch: 'lp_cb': canceling patching transition, going to unpatch",
        "livepatch: 'lp_cb': completing unpatching transition",
        "livepatch: 'lp_cb': unpatching complete",
    ]


# --- module loads / unloads -----------------------------------------------------

async def test_row_module_loads_while_enabled(m, autojump_clock):
    """§5 row "module loads while patch enabled": applying notice, pre_patch,
    patch, post_patch (patch not in transition), then the module's init."""
    await loaded_enabled(m, with_tmod=False)
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_cb' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        cb_line("post_patch", "tmod", "COMING"),
        "tmod: tmod_init",
    ]
    assert m.call("tfunc", m.kthread(), module="tmod") == "lp_cb:tfunc"


async def test_row_module_loads_during_patching_transition(m, autojump_clock):
    """§5 row "module loads while in transition" / §13.9: pre_patch and patch now,
    post_patch only at completion; per-task selection applies to the new funcs
    at once."""
    blocker = m.blocker()
    assert m.load(demo_spec(m)) == 0
    switched = m.kthread("switched")
    await settle(0.5)
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_cb' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        "tmod: tmod_init",
    ]
    assert blocker.patch_state == 0
    assert m.call("tfunc", blocker, module="tmod") == ORIGINAL
    await settle(1)
    assert switched.patch_state == 1
    assert m.call("tfunc", switched, module="tmod") == "lp_cb:tfunc"
    m.sched.rest(blocker)
    m.take()
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing patching transition",
        cb_line("post_patch"),
        cb_line("post_patch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': patching complete",
    ]


async def test_row_module_loads_during_unpatching_transition(m, autojump_clock):
    """§7.1 note / §13.9: a module loading during an *unpatching* transition is
    still patched (pre_patch, no post_patch), and is unpatched with post_unpatch
    when that transition completes."""
    await loaded_enabled(m, with_tmod=False)
    blocker = m.blocker()
    assert m.write("lp_cb/enabled", b"0") == 1
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_cb' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        "tmod: tmod_init",
    ]
    assert blocker.patch_state == 1
    assert m.call("tfunc", blocker, module="tmod") == "lp_cb:tfunc"
    m.sched.rest(blocker)
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        cb_line("post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': unpatching complete",
    ]
    assert m.call("tfunc", blocker, module="tmod") == ORIGINAL


async def test_row_module_load_patch_object_fails(m, autojump_clock):
    """§5 row "module loads, patch_object fails" / §7.1 e: post_unpatch (gated,
    pre_patch succeeded) for that object, then the load is refused."""
    await loaded_enabled(m, with_tmod=False)
    assert m.load(tmod(m, notrace=("tfunc",))) == -errno.EINVAL
    assert m.take() == [
        "livepatch: applying patch 'lp_cb' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        "livepatch: failed to find location for function 'tfunc'",
        "livepatch: failed to apply patch 'lp_cb' to module 'tmod' (-22)",
        cb_line("post_unpatch", "tmod", "COMING"),
        "livepatch: patch 'lp_cb' failed for module 'tmod', refusing to load module 'tmod'",
    ]
    assert m.module("tmod") is None


async def test_row_module_unloads_while_enabled(m, autojump_clock):
    """§5 row "module unloads while patch enabled": after the module's exit:
    pre_unpatch, reverting notice, unpatch, post_unpatch."""
    await loaded_enabled(m)
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        cb_line("pre_unpatch", "tmod", "GOING"),
        "livepatch: reverting patch 'lp_cb' on unloading module 'tmod'",
        cb_line("post_unpatch", "tmod", "GOING"),
    ]
    # the object dirs stay (§7.2)
    assert m.lp_node("lp_cb/tmod/tfunc,1") is not None
    # disable later: the unloaded object gets no callbacks
    assert m.write("lp_cb/enabled", b"0") == 1
    await settle()
    assert "tmod" not in " ".join(ln for ln in m.take() if "demo:" in ln)


async def test_row_module_unloads_during_transition(m, autojump_clock):
    """§5 row "module unloads while in transition": no pre_unpatch; reverting
    notice, unpatch, post_unpatch; completion then only covers loaded objects."""
    assert m.load(tmod(m)) == 0
    blocker = m.blocker()
    assert m.load(demo_spec(m)) == 0
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_cb' on unloading module 'tmod'",
        cb_line("post_unpatch", "tmod", "GOING"),
    ]
    m.sched.rest(blocker)
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing patching transition",
        cb_line("post_patch"),
        "livepatch: 'lp_cb': patching complete",
    ]


# --- reversals -----------------------------------------------------------------------

async def test_row_reverse_patching_to_unpatching(m, autojump_clock):
    """§5 row "transition reversed patching->unpatching": no pre_unpatch at all;
    at completion post_unpatch for the loaded objects."""
    assert m.load(tmod(m)) == 0
    blocker = m.blocker()
    assert m.load(demo_spec(m)) == 0
    m.take()
    assert m.write("lp_cb/enabled", b"0") == 1
    assert m.take() == [
        "livepatch: 'lp_cb': reversing transition from patching to unpatching",
        "livepatch: 'lp_cb': starting unpatching transition",
    ]
    m.sched.rest(blocker)
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        cb_line("post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': unpatching complete",
    ]


async def test_row_reverse_unpatching_to_patching(m, autojump_clock):
    """§5 row "transition reversed unpatching->patching": at completion post_patch
    runs again for every loaded object."""
    await loaded_enabled(m)
    blocker = m.blocker()
    assert m.write("lp_cb/enabled", b"0") == 1
    assert m.write("lp_cb/enabled", b"1") == 1
    m.take()
    m.sched.rest(blocker)
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing patching transition",
        cb_line("post_patch"),
        cb_line("post_patch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': patching complete",
    ]


# --- gating ---------------------------------------------------------------------------

async def test_post_unpatch_at_most_once_per_successful_pre_patch(m, autojump_clock):
    """§5 wrappers: post_unpatch runs only if pre_patch succeeded, once.  A module
    unloaded while enabled got its post_unpatch; when it is loaded again it is
    pre-patched again and, on the later disable, post-unpatched once more."""
    await loaded_enabled(m)
    assert m.rmmod("tmod") == 0
    assert m.load(tmod(m)) == 0
    m.take()
    assert m.write("lp_cb/enabled", b"0") == 1
    await settle()
    posts = [ln for ln in m.take() if "post_unpatch" in ln]
    assert posts == [cb_line("post_unpatch"), cb_line("post_unpatch", "tmod", "LIVE")]


async def test_callbacks_only_for_loaded_objects(m, autojump_clock):
    """§5: callbacks are only ever called for loaded objects (the "absent" module
    object never sees one) through a whole enable/disable cycle."""
    assert m.load(demo_spec(m)) == 0
    await settle()
    assert m.write("lp_cb/enabled", b"0") == 1
    await settle()
    demo = [ln for ln in m.lines() if ln.startswith("demo:")]
    assert demo == [cb_line(c) for c in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")]


async def test_callbacks_demo_story_stuck_transition_reversed(m, autojump_clock):
    """§5/§11 (callbacks.txt test 9 shape): a target module loads and unloads
    during a stuck patching transition, then the transition is reversed."""
    blocker = m.blocker()
    assert m.load(demo_spec(m)) == 0
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.rmmod("tmod") == 0
    assert m.write("lp_cb/enabled", b"0") == 1
    m.sched.rest(blocker)
    await settle()
    assert m.take_lp() == [
        "livepatch: applying patch 'lp_cb' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        "tmod: tmod_init",
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_cb' on unloading module 'tmod'",
        cb_line("post_unpatch", "tmod", "GOING"),
        "livepatch: 'lp_cb': reversing transition from patching to unpatching",
        "livepatch: 'lp_cb': starting unpatching transition",
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        "livepatch: 'lp_cb': unpatching complete",
    ]


async def test_row_module_unloads_during_unpatching_transition(m, autojump_clock):
    """§5 row "module unloads while in transition" (unpatching): no pre_unpatch
    (the disable already ran it); reverting notice and post_unpatch."""
    await loaded_enabled(m)
    m.blocker()
    assert m.write("lp_cb/enabled", b"0") == 1
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_cb' on unloading module 'tmod'",
        cb_line("post_unpatch", "tmod", "GOING"),
    ]


async def test_post_unpatch_gated_after_failed_module_pre_patch(m, autojump_clock):
    """§5 wrappers: a pre_patch that failed at module load leaves the flag false:
    nothing runs post_unpatch for it later."""
    rets = {"tmod": -errno.EPERM}
    assert m.load(demo_spec(m, rets=rets)) == 0
    await settle()
    assert m.load(tmod(m)) == -errno.EPERM
    rets["tmod"] = 0
    m.take()
    assert m.write("lp_cb/enabled", b"0") == 1
    await settle()
    assert [ln for ln in m.take() if "tmod" in ln] == []
