"""Reversing the unpatching of a patch that a forced patch sits on: the stack
check of a func at the bottom of a non-singular func_stack checks the
original function (the kernel reads the list head as a klp_func there)."""

from __future__ import annotations

import pytest

from .conftest import Machine, autojump_clock, make_machine, settle  # noqa: F401


@pytest.mark.parametrize("version", ["6.1", "6.14"])
async def test_reverse_of_a_patch_below_a_forced_one(nursery, autojump_clock, version: str) -> None:
    m = make_machine(nursery, version)
    k = m.kthread("holder")
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    m.sched.enter(k, m.sym("cmdline_proc_show"), "D")            # asleep in the sample's function
    assert (await m.insmod("klp-stack-a"))["ok"]
    await settle()
    assert m.transition("klp_stack_a") == b"1\n"                  # the holder is in the previous func
    assert m.write("klp_stack_a/force", b"1") == 1
    await settle()
    assert m.transition("klp_stack_a") == b"0\n"
    assert m.write("livepatch_sample/enabled", b"0") == 1          # held: the holder is in its new_func
    await settle()
    assert m.transition("livepatch_sample") == b"1\n"
    assert m.write("livepatch_sample/enabled", b"1") == 1          # reverse: target back to patched
    await settle(2.5)
    # The holder sits in the sample's function, not in the original below it: it switches.
    assert (m.enabled("livepatch_sample"), m.transition("livepatch_sample")) == (b"1\n", b"0\n")
    assert m.call("cmdline_proc_show", m.kthread()) == "klp_stack_a: this has been live patched"
