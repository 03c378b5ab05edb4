"""The exact kernel logs the issue asks for, per profile, through module
files as the CLI loads them: load, disable, atomic replace over two stacked
patches, a held transition signalled automatically, a target module loaded
before and after its patch (obs "Kernel log lines", #13, #15, #17, #19, #22;
notes §11, §12.11; selftest transcripts test-callbacks.sh / test-livepatch.sh)."""

from __future__ import annotations

import trio

from .conftest import SIGNAL_LINE, check_fn, completes_in_write, settle

SAMPLE = "livepatch_sample"
DEMO = "livepatch_callbacks_demo"
MOD = "livepatch_callbacks_mod"
LIVE = "[MODULE_STATE_LIVE] Normal state"
COMING = "[MODULE_STATE_COMING] Full formed, running module_init"
GOING = "[MODULE_STATE_GOING] Going away"

REPLACE = """
[[function]]
name = "klp_replace_cmdline_proc_show"
size = 0x30
output = "klp_replace: this has been live patched\\n"

[patch]
replace = true

[[patch.object]]
name = "vmlinux"

[[patch.object.func]]
old_name = "cmdline_proc_show"
new_func = "klp_replace_cmdline_proc_show"
"""


def oot_taint(m, name: str, livepatch: bool) -> list[str]:
    """obs #22: the once-per-boot lines of the first out-of-tree unsigned
    (livepatch) module, in the kernel's order."""
    lines = [f"{name}: loading out-of-tree module taints kernel."]
    if livepatch:
        lines.append(f"{name}: tainting kernel with TAINT_LIVEPATCH")
    if m.kernel.modules._sig_msgs:          # the profile's kernel checks signatures
        lines.append(f"{name}: module verification failed: signature and/or required key missing - tainting kernel")
    return lines


async def test_load_and_disable(m, autojump_clock):
    """obs "Kernel log lines" / notes §12.11: load = enabling, starting,
    (first retry) complete; disable = starting unpatching, complete; the
    module is then removable with no line."""
    in_write = completes_in_write(m.version)            # 6.12 obs #2, #3
    assert (await m.insmod("livepatch-sample"))["ok"]
    loaded = [f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH", f"livepatch: enabling patch '{SAMPLE}'",
              f"livepatch: '{SAMPLE}': starting patching transition"]
    patched = [f"livepatch: '{SAMPLE}': patching complete"]
    assert m.take() == (loaded + patched if in_write else loaded)
    assert m.state(SAMPLE) == ((1, 0) if in_write else (1, 1))   # obs #5: transition 1 right after insmod
    await settle()
    assert m.take() == ([] if in_write else patched)
    assert (await m.ctl("call", func="cmdline_proc_show", pid=None))["output"] == "this has been live patched\n"
    assert m.write(f"{SAMPLE}/enabled", b"0") == 1
    unpatching = [f"livepatch: '{SAMPLE}': starting unpatching transition"]
    unpatched = [f"livepatch: '{SAMPLE}': unpatching complete"]
    assert m.take() == (unpatching + unpatched if in_write else unpatching)
    await settle()
    assert m.take() == ([] if in_write else unpatched)
    assert not m.exists(SAMPLE)
    assert (await m.rmmod_ctl(SAMPLE))["ok"]
    assert m.take() == []


async def test_load_and_disable_debug(md, version, autojump_clock):
    """The same at debug level (notes §12.11), idle-task lines aside."""
    m = md
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert m.take_lp() == [
        f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{SAMPLE}'",
        f"livepatch: '{SAMPLE}': initializing patching transition",
        f"livepatch: '{SAMPLE}': starting patching transition",
        f"livepatch: '{SAMPLE}': completing patching transition",
        f"livepatch: '{SAMPLE}': patching complete",
    ]
    assert m.write(f"{SAMPLE}/enabled", b"0") == 1
    await settle()
    assert m.take_lp() == [
        f"livepatch: '{SAMPLE}': initializing unpatching transition",
        f"livepatch: '{SAMPLE}': starting unpatching transition",
        f"livepatch: '{SAMPLE}': completing unpatching transition",
        f"livepatch: '{SAMPLE}': unpatching complete",
    ]


async def test_atomic_replace_over_two_stacked_patches(m, autojump_clock):
    """obs #18 / #19 / notes §6.3: klp-stack-a, klp-stack-b (b wins), then a
    replace patch: only the replace patch's lines, none for the replaced
    ones; the stacked modules stay loaded (refcnt 0) and unload silently."""
    assert (await m.insmod("klp-stack-a"))["ok"]
    await settle()
    assert (await m.insmod("klp-stack-b"))["ok"]
    await settle()
    assert (await m.ctl("call", func="cmdline_proc_show", pid=None))["output"] == \
        "klp_stack_b: this has been live patched\n"
    assert (await m.insmod_text("klp-replace.toml", REPLACE))["ok"]
    await settle()
    assert m.take() == oot_taint(m, "klp_stack_a", livepatch=True) + [
        "livepatch: enabling patch 'klp_stack_a'",
        "livepatch: 'klp_stack_a': starting patching transition",
        "livepatch: 'klp_stack_a': patching complete",
        "livepatch: enabling patch 'klp_stack_b'",
        "livepatch: 'klp_stack_b': starting patching transition",
        "livepatch: 'klp_stack_b': patching complete",
        "livepatch: enabling patch 'klp_replace'",
        "livepatch: 'klp_replace': starting patching transition",
        "livepatch: 'klp_replace': patching complete",
    ]
    assert m.ls() == ["klp_replace"]
    assert (await m.ctl("call", func="cmdline_proc_show", pid=None))["output"] == \
        "klp_replace: this has been live patched\n"
    lsmod = {d["name"]: d["refcnt"] for d in (await m.ctl("lsmod"))["modules"]}
    assert lsmod == {"klp_stack_a": 0, "klp_stack_b": 0, "klp_replace": 1}
    assert (await m.rmmod_ctl("klp_stack_a"))["ok"] and (await m.rmmod_ctl("klp_stack_b"))["ok"]
    assert m.take() == []


async def test_held_transition_signalled_automatically(md, version, autojump_clock):
    """obs #13 / notes §4.2-§4.4: klp-busy's kthread sleeps (S) in busy_fn and
    holds klp-busy-patch's transition; the debug line every second names
    the profile's function; at ~15 s "signaling remaining tasks" once, the
    kthread is woken out of busy_fn, and the next retry completes."""
    m = md
    assert (await m.insmod("klp-busy"))["ok"]
    pid = next(t.pid for t in m.sched.tasks.values() if t.comm == "klp_busy")
    assert (await m.insmod("klp-busy-patch"))["ok"]
    sleeping = f"livepatch: {check_fn(version)}: klp_busy:{pid} is sleeping on function busy_fn"
    expected_start = oot_taint(m, "klp_busy", livepatch=False) + [
        "klp_busy: busy_fn: sleeping",
        "klp_busy_patch: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'klp_busy_patch'",
        "livepatch: 'klp_busy_patch': initializing patching transition",
        "livepatch: 'klp_busy_patch': starting patching transition",
        sleeping,
    ]
    assert m.take_lp() == expected_start
    await trio.sleep(14.5)
    assert m.take_lp() == [sleeping] * 14
    await trio.sleep(2.0)
    assert m.take_lp() == [
        sleeping,
        SIGNAL_LINE,
        "klp_busy: busy_fn: woken",
        "livepatch: 'klp_busy_patch': completing patching transition",
        "livepatch: 'klp_busy_patch': patching complete",
    ]
    assert m.times_of(SIGNAL_LINE) == [15.0]
    assert m.times_of("livepatch: 'klp_busy_patch': patching complete") == [16.0]


async def test_held_transition_default_level(m, autojump_clock):
    """The same story at the default log level."""
    assert (await m.insmod("klp-busy"))["ok"]
    assert (await m.insmod("klp-busy-patch"))["ok"]
    await trio.sleep(31.5)
    assert m.take() == oot_taint(m, "klp_busy", livepatch=False) + [
        "klp_busy: busy_fn: sleeping",
        "klp_busy_patch: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'klp_busy_patch'",
        "livepatch: 'klp_busy_patch': starting patching transition",
        SIGNAL_LINE,
        "klp_busy: busy_fn: woken",
        "livepatch: 'klp_busy_patch': patching complete",
    ]


async def test_target_module_loaded_before_its_patch(md, autojump_clock):
    """obs #15 / selftest test-callbacks.sh test 1: target first, then the
    patch; disable; unload both."""
    m = md
    assert (await m.insmod("livepatch-callbacks-mod"))["ok"]
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    await settle()
    assert m.write(f"{DEMO}/enabled", b"0") == 1
    await settle()
    assert (await m.rmmod_ctl(DEMO))["ok"]
    assert (await m.rmmod_ctl(MOD))["ok"]
    assert m.take_lp() == [
        f"{MOD}: livepatch_callbacks_mod_init",
        f"{DEMO}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{DEMO}'",
        f"livepatch: '{DEMO}': initializing patching transition",
        f"{DEMO}: pre_patch_callback: vmlinux",
        f"{DEMO}: pre_patch_callback: {MOD} -> {LIVE}",
        f"livepatch: '{DEMO}': starting patching transition",
        f"livepatch: '{DEMO}': completing patching transition",
        f"{DEMO}: post_patch_callback: vmlinux",
        f"{DEMO}: post_patch_callback: {MOD} -> {LIVE}",
        f"livepatch: '{DEMO}': patching complete",
        f"livepatch: '{DEMO}': initializing unpatching transition",
        f"{DEMO}: pre_unpatch_callback: vmlinux",
        f"{DEMO}: pre_unpatch_callback: {MOD} -> {LIVE}",
        f"livepatch: '{DEMO}': starting unpatching transition",
        f"livepatch: '{DEMO}': completing unpatching transition",
        f"{DEMO}: post_unpatch_callback: vmlinux",
        f"{DEMO}: post_unpatch_callback: {MOD} -> {LIVE}",
        f"livepatch: '{DEMO}': unpatching complete",
        f"{MOD}: livepatch_callbacks_mod_exit",
    ]


async def test_target_module_loaded_after_its_patch(md, version, autojump_clock):
    """obs #17 / selftest test-callbacks.sh tests 2-3: patch first (object dir
    with patched=0), then the target (patched synchronously in its load,
    callbacks with COMING, no transition), unload the target (exit first,
    then GOING callbacks around "reverting"), reload (re-patched)."""
    m = md
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    await settle()
    if version != "5.1":
        assert m.patched(DEMO, MOD) == 0
    assert (await m.insmod("livepatch-callbacks-mod"))["ok"]
    assert m.lp.klp_transition_patch is None
    if version != "5.1":
        assert m.patched(DEMO, MOD) == 1
    assert (await m.rmmod_ctl(MOD))["ok"]
    if version != "5.1":
        assert m.patched(DEMO, MOD) == 0
    assert m.state(DEMO) == (1, 0)
    assert (await m.insmod("livepatch-callbacks-mod"))["ok"]
    assert m.take_lp() == [
        f"{DEMO}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{DEMO}'",
        f"livepatch: '{DEMO}': initializing patching transition",
        f"{DEMO}: pre_patch_callback: vmlinux",
        f"livepatch: '{DEMO}': starting patching transition",
        f"livepatch: '{DEMO}': completing patching transition",
        f"{DEMO}: post_patch_callback: vmlinux",
        f"livepatch: '{DEMO}': patching complete",
        f"livepatch: applying patch '{DEMO}' to loading module '{MOD}'",
        f"{DEMO}: pre_patch_callback: {MOD} -> {COMING}",
        f"{DEMO}: post_patch_callback: {MOD} -> {COMING}",
        f"{MOD}: livepatch_callbacks_mod_init",
        f"{MOD}: livepatch_callbacks_mod_exit",
        f"{DEMO}: pre_unpatch_callback: {MOD} -> {GOING}",
        f"livepatch: reverting patch '{DEMO}' on unloading module '{MOD}'",
        f"{DEMO}: post_unpatch_callback: {MOD} -> {GOING}",
        f"livepatch: applying patch '{DEMO}' to loading module '{MOD}'",
        f"{DEMO}: pre_patch_callback: {MOD} -> {COMING}",
        f"{DEMO}: post_patch_callback: {MOD} -> {COMING}",
        f"{MOD}: livepatch_callbacks_mod_init",
    ]


async def test_pre_patch_failure(m, autojump_clock):
    """obs #16: the load fails with ENODEV; the three livepatch lines; no
    post_unpatch; no directory; module not loaded."""
    reply = await m.insmod("livepatch-callbacks-demo", "pre_patch_ret=-19")
    assert reply["ok"] is False and reply["errno"] == 19
    assert m.take() == [
        f"{DEMO}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{DEMO}'",
        f"{DEMO}: pre_patch_callback: vmlinux",
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        f"livepatch: failed to enable patch '{DEMO}'",
        f"livepatch: '{DEMO}': unpatching complete",
    ]
    assert m.ls() == [] and m.module(DEMO) is None


async def test_target_refused_by_failing_pre_patch(m, autojump_clock):
    """obs #17: a failing pre_patch for a loading target makes its load fail
    with ENODEV and logs the refusal; the patch stays enabled."""
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    await settle()
    m.take()
    assert m.write(f"{DEMO}/enabled", b"0") == 1            # a fresh load with the parameter
    await settle()
    assert (await m.rmmod_ctl(DEMO))["ok"]
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    await settle()
    node = m.node(f"sys/module/{DEMO}/parameters/pre_patch_ret")
    from klpfs.sysfs.kernfs import Kernfs
    assert Kernfs.write(node, b"-19") == 3
    m.take()
    reply = await m.insmod("livepatch-callbacks-mod")
    assert reply["ok"] is False and reply["errno"] == 19
    assert m.take() == [
        f"livepatch: applying patch '{DEMO}' to loading module '{MOD}'",
        f"{DEMO}: pre_patch_callback: {MOD} -> {COMING}",
        f"livepatch: pre-patch callback failed for object '{MOD}'",
        f"livepatch: patch '{DEMO}' failed for module '{MOD}', refusing to load module '{MOD}'",
    ]
    assert m.state(DEMO) == (1, 0) and m.module(MOD) is None


async def test_callbacks_disabled_during_patching(m, autojump_clock):
    """obs #15: disabled during its own patching transition: no pre_unpatch,
    post_unpatch still runs (busymod's kworker sleeps in the original
    busymod_work_func and holds the patching)."""
    busy = "livepatch_callbacks_busymod"
    assert (await m.insmod("livepatch-callbacks-busymod", "sleep_secs=30"))["ok"]
    await trio.sleep(0.5)
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    await settle()
    assert m.state(DEMO) == (1, 1)
    m.take()
    assert m.write(f"{DEMO}/enabled", b"0") == 1
    await settle()
    assert m.take() == [
        f"livepatch: '{DEMO}': starting unpatching transition",
        f"{DEMO}: post_unpatch_callback: vmlinux",
        f"{DEMO}: post_unpatch_callback: {busy} -> {LIVE}",
        f"livepatch: '{DEMO}': unpatching complete",
    ]
    assert not m.exists(DEMO)
