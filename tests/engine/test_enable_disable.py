"""§4 enable / disable / immediate / module references (4.15)."""

from __future__ import annotations

import errno

from klpfs.kernel.sched import TaskKind
from klpfs.livepatch.debug import livepatch_debug
from klpfs.system import System

from .conftest import ORIGINAL, cb_line, demo_callbacks, settle, spec, target_module

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})


# ---------------------------------------------------------------------------
# §4.2 enable: order of operations
# ---------------------------------------------------------------------------

async def test_enable_order_of_operations(m, autojump_clock):
    """§4.2 / §8.13: notice, init (debug), per loaded object in array order
    pre_patch then patch (interleaved), start, first attempt; unloaded objects
    get no callback; completion runs post_patch for loaded objects before the
    "patching complete" notice."""
    assert m.load(target_module("tmod", ["tfunc"])) == 0
    seen = []

    def pre(name):
        def cb(mod, obj):
            # the previous objects are already patched when this one's pre_patch runs
            seen.append((name, [o.patched for o in m.patch("lp_cb").objs]))
            m.printk(6, f"demo: pre_patch_callback: {name}")
        return cb

    cbs = {None: demo_callbacks(m.printk), "tmod": demo_callbacks(m.printk),
           "absent": demo_callbacks(m.printk)}
    cbs[None]["pre_patch"] = pre("vmlinux")
    cbs["tmod"]["pre_patch"] = pre("tmod")
    s = spec("lp_cb", {None: ["cmdline_proc_show"], "absent": ["x"], "tmod": ["tfunc"]}, callbacks=cbs)
    m.take()
    assert m.load(s) == 0
    assert m.take() == [
        "lp_cb: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_cb'",
        "livepatch: 'lp_cb': initializing patching transition",
        "demo: pre_patch_callback: vmlinux",
        "demo: pre_patch_callback: tmod",
        "livepatch: 'lp_cb': starting patching transition",
        "livepatch: klp_try_switch_task: swapper/0:0 is running",
        "livepatch: klp_try_switch_task: swapper/1:0 is running",
    ]
    # vmlinux object was patched before tmod's pre_patch ran; tmod was not yet.
    assert seen == [("vmlinux", [False, False, False]), ("tmod", [True, False, False])]
    await settle()
    assert m.take() == [
        "livepatch: 'lp_cb': completing patching transition",
        cb_line("post_patch"),
        cb_line("post_patch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': patching complete",
    ]


async def test_enable_completes_synchronously_when_every_task_can_switch(m, autojump_clock):
    """§4.2 step 8: the first completion attempt may finish at once, printing
    "patching complete" before insmod returns (here all CPUs are offline, so
    no idle task is running and every task passes the stack check)."""
    m.sched.set_cpu_online(0, False)
    m.sched.set_cpu_online(1, False)
    assert m.load(A) == 0
    assert m.take() == [
        "lp_a: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_a'",
        "livepatch: 'lp_a': initializing patching transition",
        "livepatch: 'lp_a': starting patching transition",
        "livepatch: 'lp_a': completing patching transition",
        "livepatch: 'lp_a': patching complete",
    ]
    assert m.state("lp_a") == (1, 0)


async def test_enable_api_errors(m, autojump_clock):
    """§4.2: klp_enable_patch: not registered -> EINVAL; some patch in transition
    (including this one) -> EBUSY; already enabled -> EINVAL; predecessor not
    enabled -> EBUSY."""
    lp = m.lp
    assert m.register_only(A) == 0
    assert m.register_only(B) == 0
    a, b = m.patch("lp_a"), m.patch("lp_b")
    assert lp.klp_enable_patch(b) == -errno.EBUSY            # predecessor disabled
    blocker = m.blocker()
    assert lp.klp_enable_patch(a) == 0
    assert lp.klp_enable_patch(a) == -errno.EBUSY            # itself in transition
    assert lp.klp_enable_patch(b) == -errno.EBUSY            # other in transition
    m.sched.rest(blocker)
    await settle()
    assert lp.klp_enable_patch(a) == -errno.EINVAL           # already enabled
    assert lp.klp_unregister_patch(b) == 0
    assert lp.klp_enable_patch(b) == -errno.EINVAL           # not registered


async def test_disable_api_errors(m, autojump_clock):
    """§4.3: klp_disable_patch: not registered -> EINVAL; not enabled -> EINVAL;
    a patch in transition (even this one, patching) -> EBUSY; successor
    enabled -> EBUSY."""
    lp = m.lp
    assert m.register_only(A) == 0
    assert m.register_only(B) == 0
    a, b = m.patch("lp_a"), m.patch("lp_b")
    assert lp.klp_disable_patch(a) == -errno.EINVAL           # not enabled
    blocker = m.blocker()
    assert lp.klp_enable_patch(a) == 0
    assert lp.klp_disable_patch(a) == -errno.EBUSY            # itself patching: only sysfs reverses
    m.sched.rest(blocker)
    await settle()
    assert lp.klp_enable_patch(b) == 0
    await settle()
    assert lp.klp_disable_patch(a) == -errno.EBUSY            # successor enabled
    assert lp.klp_disable_patch(b) == 0
    await settle()
    assert lp.klp_disable_patch(a) == 0
    await settle()
    assert lp.klp_unregister_patch(b) == 0
    assert lp.klp_disable_patch(b) == -errno.EINVAL           # not registered


async def test_disable_order_of_operations(m, autojump_clock):
    """§4.3 / §8.13: no "disabling patch" notice; init (debug), pre_unpatch for
    patched objects in array order, start; at completion the objects are
    unpatched, then post_unpatch, then "unpatching complete"."""
    assert m.load(target_module("tmod", ["tfunc"])) == 0
    cbs = {None: demo_callbacks(m.printk), "tmod": demo_callbacks(m.printk),
           "absent": demo_callbacks(m.printk)}
    s = spec("lp_cb", {None: ["cmdline_proc_show"], "absent": ["x"], "tmod": ["tfunc"]}, callbacks=cbs)
    assert m.load(s) == 0
    await settle()
    m.take()
    t = m.kthread()
    unpatched_at_post_unpatch = []
    orig = cbs["tmod"]["post_unpatch"]

    def post_unpatch(mod, obj):
        unpatched_at_post_unpatch.append(m.call("tfunc", t, module="tmod"))
        return orig(mod, obj)

    m.patch("lp_cb").objs[2].callbacks.post_unpatch = lambda obj: post_unpatch(None, obj)
    assert m.write("lp_cb/enabled", b"0\n") == 2
    await settle()
    assert m.take_lp() == [
        "livepatch: 'lp_cb': initializing unpatching transition",
        cb_line("pre_unpatch"),
        cb_line("pre_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': starting unpatching transition",
        "livepatch: 'lp_cb': completing unpatching transition",
        cb_line("post_unpatch"),
        cb_line("post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_cb': unpatching complete",
    ]
    assert unpatched_at_post_unpatch == [ORIGINAL]


async def test_debug_off_by_default(boot, autojump_clock):
    """§0 / §13.14: pr_debug lines are off by default; the notices remain."""
    m = boot(debug=False)
    assert livepatch_debug(m.system.kernel.dyndbg) is False
    assert livepatch_debug(System().kernel.dyndbg) is False
    assert m.load(A) == 0
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.take() == [
        "lp_a: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_a'",
        "livepatch: 'lp_a': starting patching transition",
        "livepatch: 'lp_a': patching complete",
        "livepatch: 'lp_a': starting unpatching transition",
        "livepatch: 'lp_a': unpatching complete",
    ]


async def test_taint_once_per_boot(m, autojump_clock):
    """§4.6: the first livepatch module prints the TAINT_LIVEPATCH notice, later
    ones do not."""
    assert m.load(A) == 0
    await settle()
    assert m.load(B) == 0
    lines = [ln for ln in m.lines() if "TAINT_LIVEPATCH" in ln]
    assert lines == ["lp_a: tainting kernel with TAINT_LIVEPATCH"]


# ---------------------------------------------------------------------------
# §4.1 immediate (4.15)
# ---------------------------------------------------------------------------

async def test_immediate_patch_is_synchronous(m, autojump_clock):
    """§4.1: an immediate patch skips the per-task model: the transition finishes
    inside the enable (transition never reads 1), task states stay -1, a task
    sleeping in the old function does not block, and every task calls the new
    function at once."""
    sleeper = m.sleeper("cmdline_proc_show")
    busy = m.blocker()
    assert m.load(spec("lp_i", immediate=True)) == 0
    assert m.take() == [
        "lp_i: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_i'",
        "livepatch: 'lp_i': initializing patching transition",
        "livepatch: 'lp_i': starting patching transition",
        "livepatch: 'lp_i': completing patching transition",
        "livepatch: 'lp_i': patching complete",
    ]
    assert m.state("lp_i") == (1, 0)
    assert all(t.patch_state == -1 for t in m.all_tasks())
    assert m.proc_patch_state(sleeper) == b"-1\n"
    for t in (sleeper, busy, m.kernel.console):
        assert m.call("cmdline_proc_show", t) == "lp_i:cmdline_proc_show"
    # disable: synchronous too
    assert m.write("lp_i/enabled", b"0") == 1
    assert m.state("lp_i") == (0, 0)
    assert m.take() == [
        "livepatch: 'lp_i': initializing unpatching transition",
        "livepatch: 'lp_i': starting unpatching transition",
        "livepatch: 'lp_i': completing unpatching transition",
        "livepatch: 'lp_i': unpatching complete",
    ]
    assert m.call("cmdline_proc_show", busy) == ORIGINAL


async def test_immediate_patch_module_never_released(m, autojump_clock):
    """§4.1/§4.5/§13.10: an immediate patch's module reference is never released:
    rmmod fails with EAGAIN even after disabling; each enable takes another."""
    assert m.load(spec("lp_i", immediate=True)) == 0
    assert m.refcnt("lp_i") == 1
    assert m.write("lp_i/enabled", b"0") == 1
    assert m.refcnt("lp_i") == 1
    assert m.rmmod("lp_i") == -errno.EAGAIN
    assert m.write("lp_i/enabled", b"1") == 1
    assert m.write("lp_i/enabled", b"0") == 1
    assert m.refcnt("lp_i") == 2
    assert m.rmmod("lp_i") == -errno.EWOULDBLOCK


async def test_immediate_patch_cancelled_enable_leaks_reference(m, autojump_clock):
    """§4.2 error path: for an immediate patch the cancel does not release the
    module reference."""
    rets = {"vmlinux": -errno.ENODEV}
    s = spec("lp_i", immediate=True, callbacks={None: demo_callbacks(m.printk, pre_patch_ret=rets)})
    assert m.register_only(s) == 0
    assert m.write("lp_i/enabled", b"1") == -errno.ENODEV
    assert m.refcnt("lp_i") == 1
    assert m.rmmod("lp_i") == -errno.EAGAIN


async def test_immediate_func_not_checked_on_stack(m, autojump_clock):
    """§4.1: a func with immediate set (patch not immediate): the transition runs
    per task (transition reads 1, tasks get states, a task in state 0 still
    gets the old code), but a task sleeping in that func does not block."""
    sleeper = m.sleeper("cmdline_proc_show", comm="sl_imm")
    sleeper2 = m.sleeper("version_proc_show", comm="sl_norm")
    s = spec("lp_f", {None: [("cmdline_proc_show", 0, True), "version_proc_show"]})
    assert m.load(s) == 0
    assert m.state("lp_f") == (1, 1)
    assert sleeper.patch_state == 1                       # not blocked by the immediate func
    assert sleeper2.patch_state == 0                      # blocked by the normal func
    assert m.take()[-3:] == [
        f"livepatch: klp_check_stack: sl_norm:{sleeper2.pid} is sleeping on function version_proc_show",
        "livepatch: klp_try_switch_task: swapper/0:0 is running",
        "livepatch: klp_try_switch_task: swapper/1:0 is running",
    ]
    # per-task selection still applies to the immediate func
    assert m.call("cmdline_proc_show", sleeper2) == ORIGINAL
    assert m.call("cmdline_proc_show", sleeper) == "lp_f:cmdline_proc_show"
    m.sched.wake(sleeper2)
    await settle()
    assert m.state("lp_f") == (1, 0)


async def test_immediate_func_module_never_released(m, autojump_clock):
    """§4.1/§4.5: if any func is immediate, the module reference is not released
    at the end of an unpatching transition."""
    s = spec("lp_f", {None: [("cmdline_proc_show", 0, True), "version_proc_show"]})
    assert m.load(s) == 0
    await settle()
    assert m.write("lp_f/enabled", b"0") == 1
    await settle()
    assert m.state("lp_f") == (0, 0)
    assert m.refcnt("lp_f") == 1
    assert m.rmmod("lp_f") == -errno.EAGAIN


# ---------------------------------------------------------------------------
# §4.5 module reference rules (non-immediate)
# ---------------------------------------------------------------------------

async def test_reference_taken_at_enable_released_at_disable(m, autojump_clock):
    """§4.5: taken at every enable, released when an unpatching transition
    completes; rmmod is EAGAIN while held and works after a completed disable
    (its exit unregisters the patch)."""
    assert m.load(A) == 0
    assert m.refcnt("lp_a") == 1
    assert m.rmmod("lp_a") == -errno.EAGAIN
    await settle()
    blocker = m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.refcnt("lp_a") == 1                       # not before completion
    assert m.rmmod("lp_a") == -errno.EAGAIN
    m.sched.rest(blocker)
    await settle()
    assert m.refcnt("lp_a") == 0
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.refcnt("lp_a") == 1
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.refcnt("lp_a") == 0
    assert m.rmmod("lp_a") == 0
    assert m.lp_node("lp_a") is None


async def test_reversed_enable_releases_reference(m, autojump_clock):
    """§4.5: a reversed enable (patching -> unpatching) releases at completion."""
    blocker = m.blocker()
    assert m.load(A) == 0
    assert m.write("lp_a/enabled", b"0") == 1
    m.sched.rest(blocker)
    await settle()
    assert m.state("lp_a") == (0, 0)
    assert m.refcnt("lp_a") == 0


async def test_reversed_disable_releases_nothing(m, autojump_clock):
    """§4.5: a reversed disable (unpatching -> patching) releases nothing; the
    enable's reference is the one still held."""
    assert m.load(A) == 0
    await settle()
    blocker = m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.write("lp_a/enabled", b"1") == 1
    m.sched.rest(blocker)
    await settle()
    assert m.state("lp_a") == (1, 0)
    assert m.refcnt("lp_a") == 1
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.refcnt("lp_a") == 0


async def test_cancelled_enable_releases_reference(m, autojump_clock):
    """§4.2 error path / §4.5: a cancelled enable releases the reference; from a
    module init, insmod fails with the callback's errno and the module is gone."""
    rets = {"vmlinux": -errno.ENODEV}
    s = spec("lp_cb", callbacks={None: demo_callbacks(m.printk, pre_patch_ret=rets)})
    assert m.load(s) == -errno.ENODEV
    assert m.module("lp_cb") is None
    assert m.lp_node("lp_cb") is None
    assert m.lp.klp_patches == []
    assert m.lp.klp_transition_patch is None


async def test_tasks_in_user_mode_and_module_code(m, autojump_clock):
    """§4.5/§8.7: after a normal disable completes, every task is back to -1 and
    the patch module can be removed."""
    u = m.user("ushell")
    m.sched.run(u)                                      # busy in user mode
    assert u.kind is TaskKind.USER
    assert m.load(A) == 0
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert all(t.patch_state == -1 for t in m.all_tasks())
    assert m.rmmod("lp_a") == 0


async def test_object_rollback_on_func_failure(m, autojump_clock):
    """§6.2 "patch an object": on the first failing func, the object's funcs
    already patched are unpatched again (no ops, no ftrace hook left)."""
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show", "__schedule"]})) == -errno.EINVAL
    assert "livepatch: failed to find location for function '__schedule'" in m.lines()
    assert m.lp.klp_ops == []
    assert m.kernel.ftrace.hooks == {}
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL


async def test_ftrace_hooks_follow_func_stacks(m, autojump_clock):
    """§6.2: the ftrace handler is registered when the first func for an address
    is patched and unregistered when the last one leaves."""
    addr = m.sym("cmdline_proc_show").addr
    assert m.load(A) == 0
    assert addr in m.kernel.ftrace.hooks
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert addr not in m.kernel.ftrace.hooks


async def test_immediate_callbacks_order(m, autojump_clock):
    """§4.1 + §5 + §8.7: an immediate enable runs pre_patch, then completes at
    once with post_patch; an immediate disable runs pre_unpatch then
    post_unpatch, all inside the write."""
    cbs = {None: demo_callbacks(m.printk)}
    assert m.load(spec("lp_i", immediate=True, callbacks=cbs)) == 0
    assert m.take()[1:] == [
        "livepatch: enabling patch 'lp_i'",
        "livepatch: 'lp_i': initializing patching transition",
        cb_line("pre_patch"),
        "livepatch: 'lp_i': starting patching transition",
        "livepatch: 'lp_i': completing patching transition",
        cb_line("post_patch"),
        "livepatch: 'lp_i': patching complete",
    ]
    assert m.write("lp_i/enabled", b"0") == 1
    assert m.take() == [
        "livepatch: 'lp_i': initializing unpatching transition",
        cb_line("pre_unpatch"),
        "livepatch: 'lp_i': starting unpatching transition",
        "livepatch: 'lp_i': completing unpatching transition",
        cb_line("post_unpatch"),
        "livepatch: 'lp_i': unpatching complete",
    ]


async def test_enable_api_during_own_unpatching_ebusy(m, autojump_clock):
    """§4.2 step 1: the API enable of a patch that is itself unpatching is EBUSY
    (only the sysfs store reverses)."""
    assert m.load(A) == 0
    await settle()
    m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.lp.klp_enable_patch(m.patch("lp_a")) == -errno.EBUSY
    assert m.state("lp_a") == (0, 1)


async def test_cancel_with_immediate_func_leaks_reference(m, autojump_clock):
    """§4.2 error path: with an immediate func the cancel does not release the
    module reference."""
    rets = {"vmlinux": -errno.EPERM}
    s = spec("lp_f", {None: [("cmdline_proc_show", 0, True)]},
             callbacks={None: demo_callbacks(m.printk, pre_patch_ret=rets)})
    assert m.register_only(s) == 0
    assert m.write("lp_f/enabled", b"1") == -errno.EPERM
    assert m.refcnt("lp_f") == 1


async def test_enable_skips_not_loaded_objects_silently(m, autojump_clock):
    """§4.2 step 7: objects that are not loaded are skipped with no message and
    no callback; their funcs are not patched."""
    cbs = {"absent": demo_callbacks(m.printk)}
    assert m.load(spec("lp_s", {"absent": ["x"]}, callbacks=cbs)) == 0
    await settle()
    assert not [ln for ln in m.lines() if "absent" in ln]
    assert m.patch("lp_s").objs[0].patched is False
    assert m.state("lp_s") == (1, 0)


async def test_taint_flag_k(m, autojump_clock):
    """§4.6: loading a livepatch module sets taint flag K (TAINT_LIVEPATCH, bit 15)."""
    assert m.kernel.modules.tainted & (1 << 15) == 0
    assert m.load(A) == 0
    assert m.kernel.modules.tainted & (1 << 15)
    assert "K" in m.kernel.modules.taint_letters()
