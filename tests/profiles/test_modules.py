"""Module coming/going on 5.1+ (notes §8, §12.8; obs #17): every listed patch
is processed; modules loading or unloading during a transition; the
coming error path undoing the patches before the failing one."""

from __future__ import annotations

from .conftest import ORIGINAL, cb, logging_callbacks, settle, spec, target_module


def tmod(m):
    return target_module("tmod", ["tmod_fn"], printk=m.printk)


async def test_module_loading_during_patching_transition(m, autojump_clock):
    """notes §12.8 / §8.1: pre_patch + patch at load, post_patch deferred to the
    completion of the patching transition (not at load)."""
    cbs = {None: logging_callbacks(m.printk, "lp_p"), "tmod": logging_callbacks(m.printk, "lp_p")}
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(spec("lp_p", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == 0
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_p' to loading module 'tmod'",
        cb("lp_p", "pre_patch", "tmod", "COMING"),
        "tmod: tmod_init",
    ]
    m.sched.wake(holder)
    await settle()
    assert m.take() == [
        cb("lp_p", "post_patch"),
        cb("lp_p", "post_patch", "tmod", "LIVE"),
        "livepatch: 'lp_p': patching complete",
    ]


async def test_module_loading_during_unpatching_transition(m, autojump_clock):
    """notes §12.8 / §8.1: during an unpatching transition the module is still
    patched (pre_patch + patch, no post_patch); at completion its gated
    post_unpatch runs."""
    cbs = {None: logging_callbacks(m.printk, "lp_p"), "tmod": logging_callbacks(m.printk, "lp_p")}
    assert m.load(spec("lp_p", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.write("lp_p/enabled", b"0") == 1
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_p' to loading module 'tmod'",
        cb("lp_p", "pre_patch", "tmod", "COMING"),
        "tmod: tmod_init",
    ]
    k = m.kthread()
    assert m.call("tmod_fn", k, module="tmod") == ORIGINAL         # switched tasks: unpatched
    m.sched.wake(holder)
    await settle()
    assert m.take() == [
        cb("lp_p", "post_unpatch"),
        cb("lp_p", "post_unpatch", "tmod", "LIVE"),
        "livepatch: 'lp_p': unpatching complete",
    ]


async def test_module_unloading_during_transition(m, autojump_clock):
    """notes §12.8: unloading during a transition: no pre_unpatch for the
    transition patch, "reverting ...", post_unpatch."""
    cbs = {"tmod": logging_callbacks(m.printk, "lp_p")}
    assert m.load(tmod(m)) == 0
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(spec("lp_p", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == 0
    m.take()
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_p' on unloading module 'tmod'",
        cb("lp_p", "post_unpatch", "tmod", "GOING"),
    ]
    m.sched.wake(holder)
    await settle()
    assert m.take() == ["livepatch: 'lp_p': patching complete"]


async def test_every_listed_patch_in_list_order(m, autojump_clock):
    """notes §8.1 / §12.1: coming walks every listed patch oldest first, each
    pushes on top, so the newest wins; going reverts them in list order."""
    assert m.load(spec("lp_a", {"tmod": ["tmod_fn"]})) == 0
    await settle()
    assert m.load(spec("lp_b", {"tmod": ["tmod_fn"]})) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == [
        "livepatch: applying patch 'lp_a' to loading module 'tmod'",
        "livepatch: applying patch 'lp_b' to loading module 'tmod'",
        "tmod: tmod_init",
    ]
    assert m.call("tmod_fn", m.kthread(), module="tmod") == "lp_b:tmod_fn"
    assert m.rmmod("tmod") == 0
    assert m.take() == [
        "tmod: tmod_exit",
        "livepatch: reverting patch 'lp_a' on unloading module 'tmod'",
        "livepatch: reverting patch 'lp_b' on unloading module 'tmod'",
    ]


async def test_coming_failure_undoes_earlier_patches(m, autojump_clock):
    """notes §8.1 error path: the failing patch logs the refusal; the patches
    before it are undone as on going (pre_unpatch, "reverting", post_unpatch);
    the load fails with the callback's value."""
    cba = {"tmod": logging_callbacks(m.printk, "lp_a")}
    cbb = {"tmod": logging_callbacks(m.printk, "lp_b", pre_patch_ret=-19)}
    assert m.load(spec("lp_a", {"tmod": ["tmod_fn"]}, callbacks=cba)) == 0
    await settle()
    assert m.load(spec("lp_b", {"tmod": ["tmod_fn"]}, callbacks=cbb)) == 0
    await settle()
    m.take()
    assert m.load(tmod(m)) == -19
    assert m.take() == [
        "livepatch: applying patch 'lp_a' to loading module 'tmod'",
        cb("lp_a", "pre_patch", "tmod", "COMING"),
        cb("lp_a", "post_patch", "tmod", "COMING"),
        "livepatch: applying patch 'lp_b' to loading module 'tmod'",
        cb("lp_b", "pre_patch", "tmod", "COMING"),
        "livepatch: pre-patch callback failed for object 'tmod'",
        "livepatch: patch 'lp_b' failed for module 'tmod', refusing to load module 'tmod'",
        cb("lp_a", "pre_unpatch", "tmod", "COMING"),
        "livepatch: reverting patch 'lp_a' on unloading module 'tmod'",
        cb("lp_a", "post_unpatch", "tmod", "COMING"),
    ]
    assert m.module("tmod") is None
    assert m.state("lp_a") == (1, 0) and m.state("lp_b") == (1, 0)


async def test_module_only_in_replaced_patches(m, autojump_clock):
    """notes §6.3: after the replace completes its dynamic objects are gone: a
    module that only the replaced patches named loads unpatched, silently."""
    assert m.load(spec("lp_a", {"tmod": ["tmod_fn"]})) == 0
    await settle()
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    await settle()
    assert m.ls() == ["lp_r"]
    m.take()
    assert m.load(tmod(m)) == 0
    assert m.take() == ["tmod: tmod_init"]
    assert m.call("tmod_fn", m.kthread(), module="tmod") == ORIGINAL


async def test_replace_enable_failure_leaves_replaced_patches(m, autojump_clock):
    """notes §2.6 / §5.1: a replace patch that fails to enable is freed with its
    nops; the older patches are untouched."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show", "version_proc_show"]})) == 0
    await settle()
    cbs = {None: {"pre_patch": lambda mod, obj: -19}}
    assert m.load(spec("lp_r", {None: ["meminfo_proc_show"]}, replace=True, callbacks=cbs)) == -19
    assert m.ls() == ["lp_a"] and m.listed() == ["lp_a"]
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "lp_a:cmdline_proc_show"
    assert m.call("version_proc_show", k) == "lp_a:version_proc_show"
    assert m.call("meminfo_proc_show", k) == ORIGINAL


async def test_enable_failure_at_second_object(m, autojump_clock):
    """notes §2.6 error path: pre_patch of the second object fails: the cancel
    completes as unpatching -- post_unpatch only for the object whose
    pre_patch succeeded, then "unpatching complete"; the load fails."""
    assert m.load(tmod(m)) == 0
    cbs = {None: logging_callbacks(m.printk, "lp_f"),
           "tmod": logging_callbacks(m.printk, "lp_f", pre_patch_ret=-19)}
    m.take()
    assert m.load(spec("lp_f", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == -19
    assert [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")] == [
        "livepatch: enabling patch 'lp_f'",
        cb("lp_f", "pre_patch"),
        cb("lp_f", "pre_patch", "tmod", "LIVE"),
        "livepatch: pre-patch callback failed for object 'tmod'",
        "livepatch: failed to enable patch 'lp_f'",
        cb("lp_f", "post_unpatch"),
        "livepatch: 'lp_f': unpatching complete",
    ]
    assert m.ls() == [] and m.module("lp_f") is None
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL
