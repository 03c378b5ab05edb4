"""Kernel messages per release (notes §2, §4.4, §11, obs #22, DESIGN "the
kernel messages of each release"): debug texts (klp_check_stack vs
klp_try_switch_task), missing reliable stacks (5.1 error vs 5.2+ warnings),
the order of klp_enable_patch's checks, name limits, the vmlinux module
name, taint lines."""

from __future__ import annotations

import errno

import pytest

from klpfs.kernel.module import Module
from klpfs.kernel.printk import KERN_DEBUG, KERN_ERR, KERN_WARNING
from klpfs.livepatch.structs import KlpFunc, KlpObject, KlpPatch

from .conftest import EINVAL, SIX, check_fn, settle, spec, target_module

P = spec("lp_p", {None: ["cmdline_proc_show"]})
NO_CM = "livepatch: This architecture doesn't have support for the livepatch consistency model."
NEVER = "livepatch: The livepatch transition may never complete."


# ---------------------------------------------------------------------------
# debug lines
# ---------------------------------------------------------------------------

async def test_debug_line_texts(md, version, autojump_clock):
    """notes §4.4: "is sleeping on function" and "has an unreliable stack" name
    klp_check_stack up to 5.15 and klp_try_switch_task from 5.16; "is
    running" always names klp_try_switch_task (obs: `livepatch:
    klp_try_switch_task: klp_busy:432 is sleeping on function busy_fn`)."""
    m = md
    sl = m.sleeper("cmdline_proc_show", comm="ksleep")
    un = m.kthread("kunrel")
    un.reliable_stack = False
    run = m.blocker("krun")
    assert m.load(P) == 0
    lines = m.take()
    fn = check_fn(version)
    assert f"livepatch: {fn}: ksleep:{sl.pid} is sleeping on function cmdline_proc_show" in lines, \
        f"ENGINE BUG (notes §4.4): {version} names {fn}"
    assert f"livepatch: {fn}: kunrel:{un.pid} has an unreliable stack" in lines
    assert f"livepatch: klp_try_switch_task: krun:{run.pid} is running" in lines
    assert all(r.level == KERN_DEBUG for r in m.records() if "klp_" in r.text and ":" in r.text
               and ("sleeping" in r.text or "running" in r.text or "unreliable" in r.text))


async def test_debug_transition_lines(md, autojump_clock):
    """spec §9 #24, #26, #31, #32 (unchanged in 5.x/6.x, notes §11): the
    initializing/completing/reversing/canceling debug texts around the
    notices, in order."""
    m = md
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    assert m.take_lp()[-3:-1] == ["livepatch: 'lp_p': initializing patching transition",
                                  "livepatch: 'lp_p': starting patching transition"]
    assert m.write("lp_p/enabled", b"0") == 1
    assert m.take_lp() == ["livepatch: 'lp_p': reversing transition from patching to unpatching",
                           "livepatch: 'lp_p': starting unpatching transition"]
    assert m.write("lp_p/enabled", b"1") == 1
    assert m.take_lp() == ["livepatch: 'lp_p': reversing transition from unpatching to patching",
                           "livepatch: 'lp_p': starting patching transition"]
    m.sched.wake(holder)
    await settle()
    assert m.take_lp() == ["livepatch: 'lp_p': completing patching transition",
                           "livepatch: 'lp_p': patching complete"]
    cbs = {None: {"pre_patch": lambda mod, obj: -19}}
    assert m.load(spec("lp_f", {None: ["version_proc_show"]}, callbacks=cbs)) == -19
    assert m.take_lp() == [
        "livepatch: enabling patch 'lp_f'",
        "livepatch: 'lp_f': initializing patching transition",
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        "livepatch: failed to enable patch 'lp_f'",
        "livepatch: 'lp_f': canceling patching transition, going to unpatch",
        "livepatch: 'lp_f': completing unpatching transition",
        "livepatch: 'lp_f': unpatching complete",
    ]


async def test_disable_debug_order(md, autojump_clock):
    """notes §12.11 / §3.4: disable = (debug) initializing unpatching, then the
    pre_unpatch callbacks, then "starting unpatching transition"; no
    "disabling patch" line in any version (notes §11)."""
    m = md
    from .conftest import cb, logging_callbacks
    assert m.load(spec("lp_c", {None: ["cmdline_proc_show"]},
                       callbacks={None: logging_callbacks(m.printk, "lp_c")})) == 0
    await settle()
    m.take()
    assert m.write("lp_c/enabled", b"0") == 1
    await settle()
    assert m.take_lp() == [
        "livepatch: 'lp_c': initializing unpatching transition",
        cb("lp_c", "pre_unpatch"),
        "livepatch: 'lp_c': starting unpatching transition",
        "livepatch: 'lp_c': completing unpatching transition",
        cb("lp_c", "post_unpatch"),
        "livepatch: 'lp_c': unpatching complete",
    ]


# ---------------------------------------------------------------------------
# no reliable stacks (notes §2.1 step 4, §2.2, §11)
# ---------------------------------------------------------------------------

async def test_no_reliable_stacks_5_1(boot, autojump_clock):
    """notes §2.1: 5.1 refuses: pr_err and -EOPNOTSUPP, before any sysfs or
    module reference."""
    m = boot("5.1", reliable_stacks=False)
    assert m.load(P) == -errno.EOPNOTSUPP
    lines = [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")]
    assert lines == [NO_CM]
    assert [r.level for r in m.records() if r.text == NO_CM] == [KERN_ERR]
    assert m.ls() == [] and m.module("lp_p") is None


@pytest.mark.parametrize("version", SIX)
async def test_no_reliable_stacks_warns_and_continues(boot, version, autojump_clock):
    """notes §2.2 / §2.4 step 5: 5.2+: two warnings, enabling continues; the
    stack check then fails silently (no per-task debug line, notes §4.4), so
    sleeping kthreads never switch; force completes it."""
    m = boot(version, reliable_stacks=False, debug=True)
    k = m.kthread("kslp")
    assert m.load(P) == 0
    lines = [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")]
    assert lines[:3] == [NO_CM, NEVER, "livepatch: enabling patch 'lp_p'"]
    assert [r.level for r in m.records() if r.text in (NO_CM, NEVER)] == [KERN_WARNING, KERN_WARNING]
    assert not [ln for ln in lines if "klp_try_switch_task" in ln or "klp_check_stack" in ln]
    await settle(20.5)
    assert m.state("lp_p") == (1, 1) and k.patch_state == 0
    assert m.write("lp_p/force", b"1") == 1
    await settle()
    assert m.state("lp_p") == (1, 0)


# ---------------------------------------------------------------------------
# klp_enable_patch's checks (notes §2.1 vs §2.4)
# ---------------------------------------------------------------------------

def raw_patch_module(m, name: str, objs, livepatch: bool = True) -> Module:
    """A module whose init calls klp_enable_patch() on a hand-built klp_patch."""
    lp = m.lp
    mod = Module(name, [], livepatch=livepatch)

    def init(mo: Module) -> int:
        patch = KlpPatch(mo, objs() if objs is not None else None)
        mo.data["patch"] = patch
        return lp.klp_enable_patch(patch)
    mod.init = init
    mod.exit = lambda mo: None
    return mod


async def test_not_a_livepatch_module(m, autojump_clock):
    """spec §9 #13 / notes §2: "module %s is not marked as a livepatch module" -> EINVAL."""
    assert m.load(spec("lp_x", livepatch=False)) == -EINVAL
    assert m.take() == ["livepatch: module lp_x is not marked as a livepatch module"]
    assert m.ls() == []


async def test_check_order_null_funcs_non_livepatch(m, version, autojump_clock):
    """notes §2.1 vs §2.4: 5.1 checks the livepatch marking before the objects
    (a non-livepatch module with an object without funcs gets the message);
    5.17+ checks objs/funcs first (EINVAL with no message)."""
    mod = raw_patch_module(m, "lp_raw", lambda: [KlpObject(None, None)], livepatch=False)
    assert m.load(mod) == -EINVAL
    lines = m.take()
    if version == "5.1":
        assert lines == ["livepatch: module lp_raw is not marked as a livepatch module"], \
            f"ENGINE BUG (notes §2.1): 5.1 checks the livepatch marking first: {lines}"
    else:
        assert lines == [], f"notes §2.4: 5.17+ checks funcs first, silently: {lines}"


async def test_check_order_null_objs_no_reliable_stack(boot, autojump_clock):
    """notes §2.1: on 5.1 the reliable-stack check (EOPNOTSUPP + message)
    comes before klp_init_patch_early's objs check (EINVAL)."""
    m = boot("5.1", reliable_stacks=False)
    mod = raw_patch_module(m, "lp_raw", None)
    ret = m.load(mod)
    lines = [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")]
    assert (ret, lines) == (-errno.EOPNOTSUPP, [NO_CM]), \
        f"ENGINE BUG (notes §2.1): 5.1 order: reliable-stack check before objs: {ret} {lines}"


async def test_null_funcs_livepatch_module(m, autojump_clock):
    """notes §2.1 step 6 / §2.4 step 2: an object without funcs -> EINVAL,
    silently, nothing in sysfs."""
    mod = raw_patch_module(m, "lp_raw", lambda: [KlpObject(None, [KlpFunc("cmdline_proc_show",
                                                                            None)]), KlpObject(None, None)])
    assert m.load(mod) == -EINVAL
    assert [ln for ln in m.take() if not ln.endswith("TAINT_LIVEPATCH")] == []
    assert m.ls() == []


# ---------------------------------------------------------------------------
# name limits (notes §2.5, §12.10)
# ---------------------------------------------------------------------------

async def test_old_name_limit(m, version, autojump_clock):
    """notes §2.5 d / §12.10: old_name >= KSYM_NAME_LEN -> EINVAL (silent);
    KSYM_NAME_LEN is 128 up to 6.0 and 512 from 6.1.  Module objects whose
    module is not loaded need no symbol lookup, so a 128-char name loads on
    6.1+."""
    name128 = "f" * 128
    ret = m.load(spec("lp_n", {"absent": [name128]}))
    if version == "5.1":
        assert ret == -EINVAL, f"ENGINE BUG (notes §12.10): 128 chars on 5.1 -> {ret}"
        assert m.ls() == []
    else:
        assert ret == 0, f"ENGINE BUG (notes §12.10): 128 chars on {version} -> {ret}"
        assert m.exists(f"lp_n/absent/{name128},1")
        await settle()
        assert m.write("lp_n/enabled", b"0") == 1
        await settle()
        assert m.rmmod("lp_n") == 0
    assert m.load(spec("lp_m", {"absent": ["g" * 127]})) == 0
    await settle()
    if version != "5.1":
        assert m.load(spec("lp_o", {"absent": ["h" * 511]})) == 0
        await settle()
        m.take()
        assert m.load(spec("lp_q", {"absent": ["i" * 512]})) == -EINVAL
        assert m.take() == []


async def test_object_name_limit(m, autojump_clock):
    """notes §2.5 a: a module object name of 56+ characters -> EINVAL."""
    assert m.load(spec("lp_n", {"m" * 56: ["f"]})) == -EINVAL
    assert m.ls() == []
    assert m.load(spec("lp_o", {"m" * 55: ["f"]})) == 0


async def test_vmlinux_module_name(m, version, autojump_clock):
    """notes §8.1 / §11: 5.8+ refuses a module literally named vmlinux in the
    coming hook (pr_err "vmlinux.ko: invalid module name", EINVAL); 5.1 has
    no such check."""
    ret = m.load(target_module("vmlinux", ["vfn"]))
    if version == "5.1":
        assert ret == 0
    else:
        assert ret == -EINVAL
        assert m.take()[-1:] == ["livepatch: vmlinux.ko: invalid module name"]
        assert [r.level for r in m.records() if "vmlinux.ko" in r.text] == [KERN_ERR]
        assert m.module("vmlinux") is None


# ---------------------------------------------------------------------------
# taint lines (obs #22, notes §11)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["6.1"])
async def test_taint_lines_6_1(m, autojump_clock):
    """obs #22: the first out-of-tree unsigned livepatch module logs, once per
    boot: out-of-tree, TAINT_LIVEPATCH, verification failed; tainted 0 ->
    45056 (O+E+K), stays after unload; /proc/modules "(OEK)",
    /sys/module/<m>/taint "OEK"."""
    from klpfs.sysfs.kernfs import Kernfs
    assert Kernfs.read(m.node("proc/sys/kernel/tainted"), 0, 20) == b"0\n"
    assert (await m.insmod("klp-stack-a"))["ok"]
    assert m.take()[:4] == [
        "klp_stack_a: loading out-of-tree module taints kernel.",
        "klp_stack_a: tainting kernel with TAINT_LIVEPATCH",
        "klp_stack_a: module verification failed: signature and/or required key missing - tainting kernel",
        "livepatch: enabling patch 'klp_stack_a'",
    ]
    assert m.kernel.modules.tainted == 45056
    assert Kernfs.read(m.node("proc/sys/kernel/tainted"), 0, 20) == b"45056\n"
    taint = Kernfs.read(m.node("sys/module/klp_stack_a/taint"), 0, 20)
    modules = Kernfs.read(m.node("proc/modules"), 0, 4096).decode()
    assert (taint, "(OEK)" in modules) == (b"OEK\n", True), (
        f"ENGINE BUG (obs #22): module taint flags in the kernel's order O, E, K: "
        f"/sys/module/klp_stack_a/taint={taint!r}, /proc/modules={modules!r}")
    await settle()
    m.take()
    assert (await m.insmod("klp-stack-b"))["ok"]
    assert m.take()[0] == "livepatch: enabling patch 'klp_stack_b'"
    await settle()
    for n in ("klp_stack_b", "klp_stack_a"):
        assert m.write(f"{n}/enabled", b"0") == 1
        await settle()
        assert (await m.rmmod_ctl(n))["ok"]
    assert m.kernel.modules.tainted == 45056


@pytest.mark.parametrize("version", ["6.1"])
async def test_taint_rmmod_force(m, autojump_clock):
    """obs #21: rmmod -f of an enabled patch taints R: 45056 -> 45064."""
    from klpfs.kernel.module import O_TRUNC
    assert (await m.insmod("klp-stack-a"))["ok"]
    await settle()
    assert m.rmmod("klp_stack_a", O_TRUNC | 0o4000) == 0
    assert m.kernel.modules.tainted == 45064, (
        f"ENGINE BUG (obs #21): TAINT_FORCED_RMMOD is bit 3: 45056 -> 45064, got {m.kernel.modules.tainted}")
    assert m.exists("klp_stack_a")


async def test_no_unknown_or_compiler_lines(m, autojump_clock):
    """notes §11: nothing printed for the EBUSY enable refusal, no "disabling
    patch" line, nothing about replaced patches in a whole replace story."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == 0
    await settle()
    assert m.load(spec("lp_r", {None: ["version_proc_show"]}, replace=True)) == 0
    await settle()
    text = "\n".join(m.lines())
    assert "lp_a'" not in text.split("livepatch: 'lp_a': patching complete", 1)[1]
    assert "disabling" not in text


async def test_symbol_error_before_enabling(m, autojump_clock):
    """notes §2.5 e / §2.4 step 9: a symbol that cannot be resolved fails
    klp_init_patch (spec §9 #1), before "enabling patch"; the half-built tree
    is removed, the module reference dropped, the load fails with EINVAL."""
    assert m.load(spec("lp_z", {None: ["meminfo_proc_show"]})) == 0
    await settle()
    m.take()
    assert m.load(spec("lp_s", {None: ["cmdline_proc_show", "no_such_function"]})) == -EINVAL
    assert m.take() == ["livepatch: symbol 'no_such_function' not found in symbol table"]
    assert m.ls() == ["lp_z"] and m.module("lp_s") is None
    assert m.load(spec("lp_t", {None: ["type_show"]})) == -EINVAL
    assert m.take() == ["livepatch: unresolvable ambiguity for symbol 'type_show' in object '(null)'"]
    assert m.load(spec("lp_u", {None: [("type_show", 4)]})) == -EINVAL
    assert m.take() == ["livepatch: symbol position 4 for symbol 'type_show' in object 'vmlinux' not found"]


@pytest.mark.parametrize("version", ["6.1"])
async def test_message_levels(m, autojump_clock):
    """spec §9 levels (unchanged, notes §11) and the loader's (obs #22):
    notices for enable/start/complete/apply/revert/signal and the taint
    lines but out-of-tree (warn); warnings for force and failures."""
    from klpfs.kernel.printk import KERN_NOTICE
    assert (await m.insmod("klp-busy"))["ok"]
    assert (await m.insmod("klp-busy-patch"))["ok"]
    await settle(16.5)
    assert m.write("klp_busy_patch/enabled", b"0") == 1
    await settle()
    assert (await m.rmmod_ctl("klp_busy"))["ok"]
    levels = {r.text: r.level for r in m.records()}
    assert levels["klp_busy: loading out-of-tree module taints kernel."] == KERN_WARNING
    assert levels["klp_busy: module verification failed: signature and/or required key missing - "
                  "tainting kernel"] == 5
    assert levels["klp_busy_patch: tainting kernel with TAINT_LIVEPATCH"] == KERN_NOTICE
    for text in ("livepatch: enabling patch 'klp_busy_patch'",
                 "livepatch: 'klp_busy_patch': starting patching transition",
                 "livepatch: signaling remaining tasks",
                 "livepatch: 'klp_busy_patch': patching complete",
                 "livepatch: 'klp_busy_patch': starting unpatching transition",
                 "livepatch: 'klp_busy_patch': unpatching complete"):
        assert levels[text] == KERN_NOTICE, text
