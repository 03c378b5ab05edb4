"""System states (5.5+: of our profiles 6.1, 6.11, 6.14; notes §9, §2.3-§2.4,
spec §12.5): the compatibility rule and its message, klp_get_state and
klp_get_prev_state (directly and through a module file's if_prev_state)."""

from __future__ import annotations

import errno

import pytest

from klpfs.kernel.printk import KERN_ERR
from klpfs.livepatch.state import klp_get_prev_state, klp_get_state

from .conftest import EBUSY, EINVAL, SIX, settle, spec

six = pytest.mark.parametrize("version", SIX)


def incompatible(name: str) -> str:
    return f"livepatch: Livepatch patch ({name}) is not compatible with the already installed livepatches."


def state_patch(name: str, func: str, states: list[tuple[int, int]], *, replace: bool = False,
                prev_id: int | None = None) -> str:
    """A module file: patches `func`; carries `states`; every callback of its
    vmlinux object logs what klp_get_prev_state(prev_id) returns."""
    lines = ["[[function]]", f'name = "{name}_{func}"', "size = 0x40", f'output = "{name}\\n"', ""]
    if replace:
        lines += ["[patch]", "replace = true", ""]
    for sid, ver in states:
        lines += ["[[patch.state]]", f"id = {sid}", f"version = {ver}", ""]
    lines += ["[[patch.object]]", 'name = "vmlinux"', "",
              "[[patch.object.func]]", f'old_name = "{func}"', f'new_func = "{name}_{func}"', ""]
    if prev_id is not None:
        for cb in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
            lines += [f"[patch.object.callbacks.{cb}]",
                      f'run = [{{ if_prev_state = {prev_id}, '
                      'then = [{ log = "{__func__}: prev {prev_version}" }], '
                      f'else = [{{ log = "{{__func__}}: no prev" }}] }}]', ""]
    return "\n".join(lines)


async def load(m, name, func, states, **kw) -> dict:
    return await m.insmod_text(f"{name}.toml", state_patch(name, func, states, **kw))


@six
async def test_compatibility_rule(m, autojump_clock):
    """notes §9: a non-replace patch may leave a state out but not downgrade it;
    the same or a newer version is fine; a replace patch must carry every
    installed state.  Incompatible -> the pr_err and EINVAL; nothing in
    sysfs, no "enabling patch", module not loaded."""
    assert (await load(m, "st_a", "cmdline_proc_show", [(1, 2)]))["ok"]
    await settle()
    assert (await load(m, "st_b", "version_proc_show", []))["ok"]          # leaves state 1 alone
    await settle()
    m.take()
    reply = await load(m, "st_c", "meminfo_proc_show", [(1, 1)])           # downgrade
    assert reply["ok"] is False and reply["errno"] == errno.EINVAL, reply
    assert m.take() == [incompatible("st_c")]
    assert [r.level for r in m.records() if r.text == incompatible("st_c")] == [KERN_ERR]
    assert m.ls() == ["st_a", "st_b"] and m.module("st_c") is None
    reply = await load(m, "st_r", "cmdline_proc_show", [], replace=True)   # replace without state 1
    assert reply["errno"] == errno.EINVAL
    assert m.take() == [incompatible("st_r")]
    reply = await load(m, "st_r2", "cmdline_proc_show", [(2, 1)], replace=True)
    assert reply["errno"] == errno.EINVAL
    assert (await load(m, "st_c2", "meminfo_proc_show", [(1, 2)]))["ok"]   # same version
    await settle()
    assert (await load(m, "st_c3", "loadavg_proc_show", [(1, 3), (5, 0)]))["ok"]   # newer + new state
    await settle()
    m.take()
    reply = await load(m, "st_r3", "cmdline_proc_show", [(1, 3)], replace=True)    # misses 5
    assert reply["errno"] == errno.EINVAL
    assert (await load(m, "st_r4", "cmdline_proc_show", [(1, 3), (5, 1)], replace=True))["ok"]
    await settle()
    assert m.ls() == ["st_r4"]


@six
async def test_compat_einval_wins_over_ebusy(m, autojump_clock):
    """notes §9: the compatibility check runs before the "transition running"
    test, so an incompatible patch gets EINVAL (with the message) even while
    another transition runs; a compatible one gets EBUSY."""
    assert (await load(m, "st_a", "cmdline_proc_show", [(1, 2)]))["ok"]
    await settle()
    holder = m.sleeper("version_proc_show", comm="holder")
    assert (await load(m, "st_b", "version_proc_show", []))["ok"]
    assert m.state("st_b") == (1, 1)
    m.take()
    assert (await load(m, "st_c", "meminfo_proc_show", [(1, 1)]))["errno"] == EINVAL
    assert m.take() == [incompatible("st_c")]
    assert (await load(m, "st_d", "meminfo_proc_show", [(1, 2)]))["errno"] == EBUSY
    assert m.take() == []
    m.sched.wake(holder)


@six
async def test_get_prev_state_in_replace_callbacks(m, autojump_clock):
    """notes §9 / §1 (5.5): klp_get_prev_state() in the replace patch's
    callbacks sees the replaced patch's state -- in post_patch too, since
    5.5 keeps the replaced patches until after post_patch."""
    assert (await load(m, "st_a", "cmdline_proc_show", [(1, 2)]))["ok"]
    await settle()
    m.take()
    assert (await load(m, "st_r", "cmdline_proc_show", [(1, 3)], replace=True, prev_id=1))["ok"]
    await settle()
    assert m.take() == [
        "livepatch: enabling patch 'st_r'",
        "st_r: pre_patch_callback: prev 2",
        "livepatch: 'st_r': starting patching transition",
        "st_r: post_patch_callback: prev 2",
        "livepatch: 'st_r': patching complete",
    ], "ENGINE BUG (notes §9): post_patch of a replace patch sees the replaced patch's state"


@six
async def test_get_prev_state_newest_before_transition_patch(m, autojump_clock):
    """notes §9: the state from the newest patch before the transition patch
    that has it; during a plain disable of P it sees the patches loaded
    before P, not P itself nor later ones."""
    assert (await load(m, "st_a", "cmdline_proc_show", [(1, 1)]))["ok"]
    await settle()
    assert (await load(m, "st_b", "version_proc_show", [(1, 2)]))["ok"]
    await settle()
    assert (await load(m, "st_p", "meminfo_proc_show", [(1, 4)], prev_id=1))["ok"]
    await settle()
    assert (await load(m, "st_q", "loadavg_proc_show", [(1, 5)]))["ok"]
    await settle()
    m.take()
    assert m.write("st_p/enabled", b"0") == 1
    await settle()
    assert m.take() == [
        "st_p: pre_unpatch_callback: prev 2",
        "livepatch: 'st_p': starting unpatching transition",
        "st_p: post_unpatch_callback: prev 2",
        "livepatch: 'st_p': unpatching complete",
    ]


@six
async def test_get_prev_state_none(m, autojump_clock):
    """notes §9: no older patch has the state -> NULL (the else branch); with
    no transition klp_get_prev_state() returns NULL."""
    assert (await load(m, "st_a", "cmdline_proc_show", [], prev_id=7))["ok"]
    await settle()
    assert "st_a: pre_patch_callback: no prev" in m.lines()
    assert "st_a: post_patch_callback: no prev" in m.lines()
    assert m.lp.klp_transition_patch is None
    assert klp_get_prev_state(m.lp, 7) is None


@six
async def test_get_state_direct(m, autojump_clock):
    """notes §9: klp_get_state(patch, id) -> the patch's entry with that id, else NULL;
    klp_get_prev_state during a transition, directly."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]}, states=[(3, 7), (4, 1)])) == 0
    await settle()
    pa = m.patch("lp_a")
    assert klp_get_state(pa, 3).version == 7
    assert klp_get_state(pa, 4).version == 1
    assert klp_get_state(pa, 5) is None
    holder = m.sleeper("version_proc_show", comm="holder")
    assert m.load(spec("lp_b", {None: ["version_proc_show"]}, states=[(3, 9)])) == 0
    assert m.lp.klp_transition_patch is m.patch("lp_b")
    st = klp_get_prev_state(m.lp, 3)
    assert st is not None and st.version == 7
    assert klp_get_prev_state(m.lp, 4).version == 1
    assert klp_get_prev_state(m.lp, 5) is None
    m.sched.wake(holder)


@six
async def test_engine_compat_check_before_sysfs(m, autojump_clock):
    """notes §2.4 step 6: the incompatible patch never reaches sysfs (no
    directory flickers) and takes no module reference."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]}, states=[(1, 2)])) == 0
    await settle()
    added = []

    class L:
        def node_added(self, node):
            added.append(node.path)

        def node_removed(self, node):
            pass
    listener = L()
    m.kernfs.listeners.append(listener)
    assert m.load(spec("lp_c", {None: ["meminfo_proc_show"]}, states=[(1, 1)])) == -EINVAL
    m.kernfs.listeners.remove(listener)
    assert [p for p in added if "/livepatch/" in p] == []


@pytest.mark.parametrize("version", ["5.1"])
async def test_states_refused_on_5_1(m, autojump_clock):
    """notes §1: states and klp_get_prev_state arrived in 5.5: a module file
    using them does not build for 5.1 (refused, nothing loaded)."""
    reply = await load(m, "st_a", "cmdline_proc_show", [(1, 1)])
    assert reply["ok"] is False and reply.get("file_error") and reply["errno"] == errno.ENOEXEC
    reply = await load(m, "st_b", "cmdline_proc_show", [], prev_id=1)
    assert reply["ok"] is False and reply.get("file_error")
    assert m.kernel.modules.modules == {}


@six
async def test_post_unpatch_tells_reversal_from_disable(m, autojump_clock):
    """notes §9 (system-state.rst): post_unpatch tells a reversed transition
    (the replaced patch is still there: prev state found) from a disable of
    the cumulative patch (nothing before it: NULL)."""
    assert (await load(m, "st_a", "cmdline_proc_show", [(1, 2)]))["ok"]
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")        # in st_a's code
    assert (await load(m, "st_r", "cmdline_proc_show", [(1, 3)], replace=True, prev_id=1))["ok"]
    assert m.state("st_r") == (1, 1)
    m.take()
    assert m.write("st_r/enabled", b"0") == 1
    await settle()
    assert m.take() == ["livepatch: 'st_r': starting unpatching transition",
                        "st_r: post_unpatch_callback: prev 2",
                        "livepatch: 'st_r': unpatching complete"]
    m.sched.wake(holder)
    assert (await m.rmmod_ctl("st_r"))["ok"]
    assert (await load(m, "st_r", "cmdline_proc_show", [(1, 3)], replace=True, prev_id=1))["ok"]
    await settle()
    assert m.ls() == ["st_r"]
    m.take()
    assert m.write("st_r/enabled", b"0") == 1
    await settle()
    assert m.take() == ["st_r: pre_unpatch_callback: no prev",
                        "livepatch: 'st_r': starting unpatching transition",
                        "st_r: post_unpatch_callback: no prev",
                        "livepatch: 'st_r': unpatching complete"]


@six
async def test_warnings_then_compat_error(boot, version, autojump_clock):
    """notes §2.4: the no-reliable-stack warnings come before the compatibility
    check (steps 5 and 6)."""
    m = boot(version, reliable_stacks=False)
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]}, states=[(1, 2)])) == 0
    m.take()
    assert m.load(spec("lp_c", {None: ["meminfo_proc_show"]}, states=[(1, 1)])) == -EINVAL
    assert m.take() == [
        "livepatch: This architecture doesn't have support for the livepatch consistency model.",
        "livepatch: The livepatch transition may never complete.",
        incompatible("lp_c"),
    ]


@six
async def test_state_id_0_ends_the_array(m, autojump_clock):
    """notes §9: the kernel iterates klp_patch.states up to the first entry
    with id 0 (klp_for_each_state); entries after it do not exist for the
    compatibility check or klp_get_state."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]}, states=[(0, 1), (1, 2)])) == 0
    await settle()
    assert klp_get_state(m.patch("lp_a"), 1) is None, \
        "ENGINE BUG (notes §9): states after an id-0 entry are not part of the array"
    assert m.load(spec("lp_c", {None: ["meminfo_proc_show"]}, states=[(1, 1)])) == 0
