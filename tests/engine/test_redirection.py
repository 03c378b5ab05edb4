"""§6 klp_ops / func stacks and §6.3 "which function runs", through kernel.call,
with two patches stacked on the same function."""

from __future__ import annotations

import pytest

from .conftest import ORIGINAL, settle, spec

P1 = spec("lp_1", {None: ["cmdline_proc_show", "meminfo_proc_show"]})
P2 = spec("lp_2", {None: ["cmdline_proc_show", "version_proc_show"]})
NEW1 = "lp_1:cmdline_proc_show"
NEW2 = "lp_2:cmdline_proc_show"


async def two_tasks_in_transition(m, write_path, data, *, load=None):
    """Start a transition with `write` (or `load`) and return (stuck, switched):
    stuck is a spinning kthread still in the initial state, switched one that
    passed the stack check."""
    stuck = m.blocker("stuck")
    switched = m.kthread("switched")
    if load is not None:
        assert m.load(load) == 0
    else:
        assert m.write(write_path, data) == len(data)
    await settle(0.5)
    return stuck, switched


async def test_one_ops_per_function_shared_by_patches(m, autojump_clock):
    """§6.1: one klp_ops per patched address; its func stack holds the newest
    patch's func on top."""
    assert m.load(P1) == 0
    await settle()
    assert m.load(P2) == 0
    await settle()
    addr = m.sym("cmdline_proc_show").addr
    ops = [o for o in m.lp.klp_ops if o.func_stack and o.func_stack[0].old_addr == addr]
    assert len(ops) == 1
    p1, p2 = m.patch("lp_1"), m.patch("lp_2")
    assert ops[0].func_stack == [p2.objs[0].funcs[0], p1.objs[0].funcs[0]]
    assert len(m.lp.klp_ops) == 3          # cmdline, meminfo, version
    # unpatching P2 pops its funcs; version's ops goes away entirely
    assert m.write("lp_2/enabled", b"0") == 1
    await settle()
    assert ops[0].func_stack == [p1.objs[0].funcs[0]]
    assert len(m.lp.klp_ops) == 2
    assert m.write("lp_1/enabled", b"0") == 1
    await settle()
    assert m.lp.klp_ops == []
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL


async def test_no_transition_top_runs_for_every_task(m, autojump_clock):
    """§6.3 row 1: top not in transition -> top.new_func for any task."""
    assert m.load(P1) == 0
    await settle()
    for t in m.all_tasks():
        assert m.call("cmdline_proc_show", t) == NEW1
    assert m.load(P2) == 0
    await settle()
    for t in m.all_tasks():
        assert m.call("cmdline_proc_show", t) == NEW2
        assert m.call("meminfo_proc_show", t) == "lp_1:meminfo_proc_show"


async def test_single_patch_patching(m, autojump_clock):
    """§6.3 rows 2/3, depth 1, patching: state 1 -> new; state 0 -> original."""
    stuck, switched = await two_tasks_in_transition(m, None, None, load=P1)
    assert (stuck.patch_state, switched.patch_state) == (0, 1)
    assert m.call("cmdline_proc_show", switched) == NEW1
    assert m.call("cmdline_proc_show", stuck) == ORIGINAL


async def test_single_patch_unpatching(m, autojump_clock):
    """§6.3, depth 1, unpatching: state 1 (not yet switched) -> new; state 0 -> original."""
    assert m.load(P1) == 0
    await settle()
    stuck, switched = await two_tasks_in_transition(m, "lp_1/enabled", b"0")
    assert (stuck.patch_state, switched.patch_state) == (1, 0)
    assert m.call("cmdline_proc_show", stuck) == NEW1
    assert m.call("cmdline_proc_show", switched) == ORIGINAL


async def test_stacked_patching(m, autojump_clock):
    """§6.3, depth 2, P2 patching: state 1 -> P2's; state 0 -> the entry below
    (P1's), not the original.  P1-only funcs (top not in transition) -> P1's for
    everybody."""
    assert m.load(P1) == 0
    await settle()
    stuck, switched = await two_tasks_in_transition(m, None, None, load=P2)
    assert (stuck.patch_state, switched.patch_state) == (0, 1)
    assert m.call("cmdline_proc_show", switched) == NEW2
    assert m.call("cmdline_proc_show", stuck) == NEW1
    for t in (stuck, switched):
        assert m.call("meminfo_proc_show", t) == "lp_1:meminfo_proc_show"
    # version_proc_show only in P2 (depth 1 in its stack): 0 -> original
    assert m.call("version_proc_show", stuck) == ORIGINAL
    assert m.call("version_proc_show", switched) == "lp_2:version_proc_show"


async def test_stacked_unpatching(m, autojump_clock):
    """§6.3, depth 2, P2 unpatching: state 1 -> P2's; state 0 -> P1's."""
    assert m.load(P1) == 0
    await settle()
    assert m.load(P2) == 0
    await settle()
    stuck, switched = await two_tasks_in_transition(m, "lp_2/enabled", b"0")
    assert (stuck.patch_state, switched.patch_state) == (1, 0)
    assert m.call("cmdline_proc_show", stuck) == NEW2
    assert m.call("cmdline_proc_show", switched) == NEW1
    m.sched.rest(stuck)
    await settle()
    assert m.call("cmdline_proc_show", stuck) == NEW1


async def test_undefined_state_in_transition_runs_top(m, autojump_clock):
    """§6.3: a -1 state seen while the top func is in transition is treated like
    PATCHED (the kernel WARNs): top.new_func runs."""
    assert m.load(P1) == 0
    await settle()
    stuck, switched = await two_tasks_in_transition(m, None, None, load=P2)
    stuck.patch_state = -1
    assert m.call("cmdline_proc_show", stuck) == NEW2


@pytest.mark.parametrize("direction", ["patching", "unpatching"])
async def test_interrupt_like_call_uses_the_calling_task(m, autojump_clock, direction):
    """§6.3: the decision reads the *calling* task's state: the same function
    called by two tasks at the same instant gives two answers."""
    if direction == "unpatching":
        assert m.load(P1) == 0
        await settle()
        stuck, switched = await two_tasks_in_transition(m, "lp_1/enabled", b"0")
    else:
        stuck, switched = await two_tasks_in_transition(m, None, None, load=P1)
    assert {m.call("cmdline_proc_show", stuck), m.call("cmdline_proc_show", switched)} == {NEW1, ORIGINAL}


async def test_fork_inherits_for_call_selection(m, autojump_clock):
    """§6.3 / §8.12: a child forked during the transition inherits its parent's
    state, so it gets the same implementation as the parent."""
    stuck, switched = await two_tasks_in_transition(m, None, None, load=P1)
    kid_of_stuck = m.sched.add("kid0", stuck.kind, stuck.base, ppid=stuck.pid)
    kid_of_switched = m.sched.add("kid1", switched.kind, switched.base, ppid=switched.pid)
    assert m.call("cmdline_proc_show", kid_of_stuck) == ORIGINAL
    assert m.call("cmdline_proc_show", kid_of_switched) == NEW1


async def test_patch_of_a_patch_chains(m, autojump_clock):
    """A redirected call enters the new function at its start, where that
    function's own ftrace hook runs: a patch of lp_1's replacement wins."""
    assert m.load(P1) == 0
    await settle()
    chained = spec("lp_chain", {"lp_1": ["lp_1__cmdline_proc_show"]})
    assert m.load(chained) == 0
    await settle()
    for t in m.all_tasks():
        assert m.call("cmdline_proc_show", t) == "lp_chain:lp_1__cmdline_proc_show"
    assert m.write("lp_chain/enabled", b"0") == 1
    await settle()
    assert m.call("cmdline_proc_show", m.kthread()) == NEW1
