"""§7 module coming / going notifiers."""

from __future__ import annotations

import errno

from klpfs.kernel.module import ModuleState

from .conftest import ORIGINAL, cb_line, demo_callbacks, settle, spec, target_module


def tmod(m, funcs=("tfunc",), **kw):
    return target_module("tmod", list(funcs), printk=m.printk, **kw)


async def test_patch_applied_to_loading_module(m, autojump_clock):
    """§7.1 c: an enabled patch is applied to a module loading later, with the
    notice; the module's functions are redirected for every task."""
    assert m.load(spec("lp_x", {None: ["cmdline_proc_show"], "tmod": ["tfunc"]})) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_x' to loading module 'tmod'",
        "tmod: tmod_init",
    ]
    for t in m.all_tasks():
        assert m.call("tfunc", t, module="tmod") == "lp_x:tfunc"


async def test_coming_runs_before_module_coming_notifiers(m, autojump_clock):
    """§7: the livepatch coming hook runs before the module's own COMING notifier
    chain and before its init."""
    m.kernel.modules.notifiers.append(
        lambda state, mod: m.printk(6, f"notifier: {state.name} {mod.name}")
        if mod.name == "tmod" else None)
    assert m.load(spec("lp_x", {"tmod": ["tfunc"]})) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_x' to loading module 'tmod'",
        "notifier: COMING tmod",
        "tmod: tmod_init",
        "notifier: LIVE tmod",
    ]


async def test_disabled_patch_resolves_silently(m, autojump_clock):
    """§7.1 a/b: a registered but disabled patch resolves its symbols in the new
    module (no message, no callbacks, no patching); enabling it later patches it."""
    cbs = {"tmod": demo_callbacks(m.printk)}
    assert m.register_only(spec("lp_x", {"tmod": ["tfunc"]}, callbacks=cbs)) == 0
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == ["tmod: tmod_init"]
    assert m.call("tfunc", m.kthread(), module="tmod") == ORIGINAL
    assert m.write("lp_x/enabled", b"1") == 1
    await settle()
    assert m.call("tfunc", m.kthread(), module="tmod") == "lp_x:tfunc"


async def test_disabled_patch_unresolvable_refuses_module(m, autojump_clock):
    """§7.1 a / §13.8: a disabled registered patch that cannot resolve its symbols
    in the new module blocks that module from loading."""
    assert m.register_only(spec("lp_x", {"tmod": ["no_such_function"]})) == 0
    m.take()
    assert m.load(tmod(m)) == -errno.EINVAL
    assert m.take() == [
        "livepatch: symbol 'no_such_function' not found in symbol table",
        "livepatch: failed to initialize patch 'lp_x' for module 'tmod' (-22)",
        "livepatch: patch 'lp_x' failed for module 'tmod', refusing to load module 'tmod'",
    ]
    assert m.module("tmod") is None
    assert m.state("lp_x") == (0, 0)


async def test_ambiguous_symbol_in_module_refuses_load(m, autojump_clock):
    """§7.1 a with §3.4: an ambiguity in the loading module refuses it too."""
    assert m.register_only(spec("lp_x", {"tmod": ["dup"]})) == 0
    m.take()
    assert m.load(tmod(m, funcs=("dup", "dup"))) == -errno.EINVAL
    assert m.take() == [
        "livepatch: unresolvable ambiguity for symbol 'dup' in object 'tmod'",
        "livepatch: failed to initialize patch 'lp_x' for module 'tmod' (-22)",
        "livepatch: patch 'lp_x' failed for module 'tmod', refusing to load module 'tmod'",
    ]


async def test_pre_patch_failure_refuses_module(m, autojump_clock):
    """§7.1 d: pre_patch failing for the loading module refuses it with that
    errno; the module's init never runs."""
    cbs = {"tmod": demo_callbacks(m.printk, pre_patch_ret={"tmod": -errno.ENODEV})}
    assert m.load(spec("lp_x", {None: ["cmdline_proc_show"], "tmod": ["tfunc"]}, callbacks=cbs)) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == -errno.ENODEV
    assert m.take() == [
        "livepatch: applying patch 'lp_x' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING"),
        "livepatch: pre-patch callback failed for object 'tmod'",
        "livepatch: patch 'lp_x' failed for module 'tmod', refusing to load module 'tmod'",
    ]
    assert m.module("tmod") is None
    # The failed object does not count as loaded afterwards: a disable runs no
    # callbacks for it (Ubuntu / later fix; vanilla 4.15 leaves obj->mod dangling).
    assert m.write("lp_x/enabled", b"0") == 1
    await settle()
    assert [ln for ln in m.take() if "tmod" in ln] == []


async def test_error_undoes_earlier_patches(m, autojump_clock):
    """§7.1 error path: patches before the failing one (list order) are undone as
    in going: pre_unpatch (not in transition), reverting notice, unpatch,
    post_unpatch."""
    c1 = {"tmod": demo_callbacks(m.printk, prefix="one")}
    c2 = {"tmod": demo_callbacks(m.printk, prefix="two", pre_patch_ret={"tmod": -errno.EPERM})}
    assert m.load(spec("lp_1", {"tmod": ["tfunc"]}, callbacks=c1)) == 0
    await settle()
    assert m.load(spec("lp_2", {"tmod": ["tfunc"]}, callbacks=c2)) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == -errno.EPERM
    assert m.take() == [
        "livepatch: applying patch 'lp_1' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING", prefix="one"),
        cb_line("post_patch", "tmod", "COMING", prefix="one"),
        "livepatch: applying patch 'lp_2' to loading module 'tmod'",
        cb_line("pre_patch", "tmod", "COMING", prefix="two"),
        "livepatch: pre-patch callback failed for object 'tmod'",
        "livepatch: patch 'lp_2' failed for module 'tmod', refusing to load module 'tmod'",
        cb_line("pre_unpatch", "tmod", "COMING", prefix="one"),
        "livepatch: reverting patch 'lp_1' on unloading module 'tmod'",
        cb_line("post_unpatch", "tmod", "COMING", prefix="one"),
    ]
    assert m.lp.klp_ops == [o for o in m.lp.klp_ops if o.func_stack and o.func_stack[0].old_addr]
    assert all(f.old_addr == 0 for p in ("lp_1", "lp_2") for f in m.patch(p).objs[0].funcs)


async def test_error_in_disabled_later_patch_undoes_enabled_earlier(m, autojump_clock):
    """§7.1: a disabled later patch failing to resolve undoes an earlier enabled
    patch's application."""
    assert m.load(spec("lp_1", {"tmod": ["tfunc"]})) == 0
    await settle()
    assert m.register_only(spec("lp_2", {"tmod": ["nope"]})) == 0
    m.take()
    assert m.load(tmod(m)) == -errno.EINVAL
    assert m.take() == [
        "livepatch: applying patch 'lp_1' to loading module 'tmod'",
        "livepatch: symbol 'nope' not found in symbol table",
        "livepatch: failed to initialize patch 'lp_2' for module 'tmod' (-22)",
        "livepatch: patch 'lp_2' failed for module 'tmod', refusing to load module 'tmod'",
        "livepatch: reverting patch 'lp_1' on unloading module 'tmod'",
    ]


async def test_module_going_unpatches_and_forgets(m, autojump_clock):
    """§7.2: unload after exit; enabled patch: pre_unpatch, notice, unpatch,
    post_unpatch; the object forgets the module (sysfs dirs stay); a reload is
    patched again."""
    assert m.load(tmod(m)) == 0
    assert m.load(spec("lp_x", {"tmod": ["tfunc"]})) == 0
    await settle()
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_x' on unloading module 'tmod'",
    ]
    obj = m.patch("lp_x").objs[0]
    assert obj.mod is None and obj.patched is False
    assert all(f.old_addr == 0 for f in obj.funcs)
    assert m.lp_node("lp_x/tmod/tfunc,1") is not None
    assert m.lp.klp_ops == []
    assert m.load(tmod(m)) == 0
    assert m.call("tfunc", m.kthread(), module="tmod") == "lp_x:tfunc"


async def test_going_of_disabled_patch_is_silent(m, autojump_clock):
    """§7.2: for a patch neither enabled nor in transition, going only forgets."""
    assert m.load(tmod(m)) == 0
    assert m.register_only(spec("lp_x", {"tmod": ["tfunc"]})) == 0
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == ["tmod: tmod_exit"]


async def test_patched_module_not_pinned(m, autojump_clock):
    """§7.2: livepatch never pins patched modules: they can be removed any time,
    including mid-transition."""
    assert m.load(tmod(m)) == 0
    assert m.refcnt("tmod") == 0
    m.blocker()
    assert m.load(spec("lp_x", {"tmod": ["tfunc"]})) == 0
    assert m.refcnt("tmod") == 0
    assert m.rmmod("tmod") == 0


async def test_init_failure_after_coming_runs_going(m, autojump_clock):
    """§7: a load failing later (init error) after a successful coming calls the
    going hook: the freshly applied patch is reverted."""
    assert m.load(spec("lp_x", {"tmod": ["tfunc"]})) == 0
    await settle()
    m.take()
    assert m.load(tmod(m, init_ret=-errno.EIO)) == -errno.EIO
    assert m.take() == [
        "livepatch: applying patch 'lp_x' to loading module 'tmod'",
        "tmod: tmod_init",
        "livepatch: reverting patch 'lp_x' on unloading module 'tmod'",
    ]
    assert m.lp.klp_ops == []


async def test_livepatch_modules_pass_the_notifiers(m, autojump_clock):
    """§7: a patch can target another livepatch module, which is patched when it
    loads (livepatch modules pass through the notifiers like any module)."""
    assert m.load(spec("lp_meta", {"lp_inner": ["lp_inner__version_proc_show"]})) == 0
    await settle()
    m.take()
    assert m.load(spec("lp_inner", {None: ["version_proc_show"]})) == 0
    lines = m.take()
    assert lines[0] == "livepatch: applying patch 'lp_meta' to loading module 'lp_inner'"
    await settle()
    t = m.kthread()
    assert m.call("lp_inner__version_proc_show", t, module="lp_inner") == \
        "lp_meta:lp_inner__version_proc_show"


async def test_module_states_seen_by_callbacks(m, autojump_clock):
    """§11: callbacks see COMING at load, LIVE at enable/disable, GOING at unload."""
    cbs = {"tmod": demo_callbacks(m.printk)}
    assert m.load(spec("lp_x", {"tmod": ["tfunc"]}, callbacks=cbs)) == 0
    await settle()
    assert m.load(tmod(m)) == 0
    assert m.module("tmod").state is ModuleState.LIVE
    assert m.write("lp_x/enabled", b"0") == 1
    await settle()
    assert m.write("lp_x/enabled", b"1") == 1
    await settle()
    assert m.rmmod("tmod") == 0
    demo = [ln for ln in m.lines() if ln.startswith("demo:")]
    assert demo == [
        cb_line("pre_patch", "tmod", "COMING"), cb_line("post_patch", "tmod", "COMING"),
        cb_line("pre_unpatch", "tmod", "LIVE"), cb_line("post_unpatch", "tmod", "LIVE"),
        cb_line("pre_patch", "tmod", "LIVE"), cb_line("post_patch", "tmod", "LIVE"),
        cb_line("pre_unpatch", "tmod", "GOING"), cb_line("post_unpatch", "tmod", "GOING"),
    ]
