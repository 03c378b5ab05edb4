"""The `livepatch` control command (klpfs status, wait, watch): the patches, the transition
and every task it waits for, asked the questions klp_try_switch_task() asks, under a
mock clock.  The retry work runs on whole seconds (round_jiffies_relative), the first
attempt inside klp_enable_patch(); the automatic fake signals (5.1+) go out at the
attempt that finds klp_signals_cnt a non-zero multiple of 15."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.control.samples import find_module_file
from klpfs.kernel.sched import stack_lines
from klpfs.sysfs.kernfs import Kernfs
from klpfs.system import System

SIGNALING = "livepatch: signaling remaining tasks"


async def handle(system: System, cmd: str, **args: object) -> dict:
    return await Control(system).handle({"cmd": cmd, **args})


async def load_sample(system: System) -> None:
    path = find_module_file("livepatch-sample")
    assert path is not None
    reply = await handle(system, "insmod", path=str(path), text=path.read_text(), params=[])
    assert reply == {"ok": True, "name": "livepatch_sample"}


async def holder(system: System, function: str = "cmdline_proc_show") -> int:
    """A kthread sleeping (D) inside `function`: it holds a transition that patches it."""
    pid = (await handle(system, "task_add", comm="holder", kind="kthread", ppid=None))["task"]["pid"]
    assert (await handle(system, "task_sleep", pid=pid, func=function, seconds=None, interruptible=False))["ok"]
    return pid


def blocker(system: System, pid: int, reason: str, function: str | None) -> dict:
    task = system.kernel.sched.find(pid)
    assert task is not None
    return {"task": Control(system).task_info(task), "reason": reason, "function": function,
            "stack": stack_lines(system.kernel.sched.stack(task))}


@pytest.fixture
async def booted(request: pytest.FixtureRequest) -> AsyncIterator[System]:
    """A System of the profile the test is parametrized with, reliable stacks or not."""
    version, reliable = request.param
    async with trio.open_nursery() as nursery:
        machine = System(version, reliable_stacks=reliable)
        nursery.start_soon(machine.run)
        yield machine
        nursery.cancel_scope.cancel()


async def test_no_patch_no_transition(system: System, autojump_clock: trio.testing.MockClock) -> None:
    await trio.sleep(1.5)
    assert await handle(system, "livepatch") == {"ok": True, "kernel": "4.15", "now": 1.5, "speed": 1.0,
                                                 "patches": [], "transition": None}


async def test_a_held_transition(system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = await holder(system)
    await load_sample(system)
    await trio.sleep(2.5)
    state = await handle(system, "livepatch")
    tasks = len(list(system.kernel.sched.all_tasks()))
    assert state == {
        "ok": True, "kernel": "4.15", "now": 2.5, "speed": 1.0,
        "patches": [{"name": "livepatch_sample", "enabled": True, "transition": True}],
        "transition": {"patch": "livepatch_sample", "direction": "patching", "tasks": tasks,
                       "switched": tasks - 1, "attempts": 3, "next_retry": 3.0, "next_signal": None,
                       "blocking": [blocker(system, pid, "sleeping", "cmdline_proc_show")]}}
    assert state["transition"]["blocking"][0]["stack"] == [
        "[<0>] msleep+0x18/0x30", "[<0>] cmdline_proc_show+0x15/0x2a", "[<0>] kthread+0x9c/0x138",
        "[<0>] ret_from_fork+0x1a/0x35"]
    assert state["transition"]["blocking"][0]["task"]["patch_state"] == 0


async def test_a_woken_holder_is_pending_until_the_next_attempt(
        system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = await holder(system)
    await load_sample(system)
    await trio.sleep(1.5)
    assert (await handle(system, "task_wake", pid=pid))["ok"]
    transition = (await handle(system, "livepatch"))["transition"]
    assert (transition["attempts"], transition["blocking"]) == (2, [blocker(system, pid, "pending", None)])
    await trio.sleep(1)
    state = await handle(system, "livepatch")
    assert (state["patches"], state["transition"]) == (
        [{"name": "livepatch_sample", "enabled": True, "transition": False}], None)


async def test_a_busy_kthread_is_running(system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = (await handle(system, "task_add", comm="spinner", kind="kthread", ppid=None))["task"]["pid"]
    assert (await handle(system, "task_run", pid=pid))["ok"]
    await load_sample(system)
    await trio.sleep(1.5)
    assert (await handle(system, "livepatch"))["transition"]["blocking"] == [blocker(system, pid, "running", None)]


async def test_an_unreliable_stack(system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = await holder(system, "ep_poll")
    task = system.kernel.sched.find(pid)
    assert task is not None
    task.reliable_stack = False
    await load_sample(system)
    await trio.sleep(1.5)
    assert (await handle(system, "livepatch"))["transition"]["blocking"] == [
        blocker(system, pid, "unreliable_stack", None)]


@pytest.mark.parametrize("booted", [("6.1", False)], indirect=True)
async def test_no_reliable_stacks_holds_every_task(booted: System, autojump_clock: trio.testing.MockClock) -> None:
    await load_sample(booted)
    await trio.sleep(1.5)
    transition = (await handle(booted, "livepatch"))["transition"]
    tasks = list(booted.kernel.sched.all_tasks())
    # Only the switches on the way out of the kernel remain (the idle loop, return to user space).
    waiting = [t.pid for t in tasks if t.patch_state != 1]
    assert (transition["tasks"], transition["switched"]) == (len(tasks), len(tasks) - len(waiting))
    assert {b["reason"] for b in transition["blocking"]} == {"no_reliable_stacks"}
    assert [b["task"]["pid"] for b in transition["blocking"]] == waiting
    assert len(waiting) > len(tasks) // 2


@pytest.mark.parametrize("system", ["5.1"], indirect=True)
async def test_the_next_fake_signal_is_where_the_engine_sends_it(
        system: System, autojump_clock: trio.testing.MockClock) -> None:
    await holder(system)
    await load_sample(system)
    await trio.sleep(2.5)
    transition = (await handle(system, "livepatch"))["transition"]
    assert (transition["attempts"], transition["next_retry"], transition["next_signal"]) == (3, 3.0, 15.0)
    await trio.sleep(12)  # 14.5
    assert SIGNALING not in system.kernel.log.lines()
    transition = (await handle(system, "livepatch"))["transition"]
    assert (transition["attempts"], transition["next_retry"], transition["next_signal"]) == (15, 15.0, 15.0)
    await trio.sleep(1)  # 15.5
    assert system.kernel.log.lines().count(SIGNALING) == 1
    transition = (await handle(system, "livepatch"))["transition"]
    assert (transition["attempts"], transition["next_retry"], transition["next_signal"]) == (16, 16.0, 30.0)


@pytest.mark.parametrize("system", ["5.1"], indirect=True)
async def test_a_reversal_counts_its_attempts_afresh(system: System, autojump_clock: trio.testing.MockClock) -> None:
    await holder(system)
    await load_sample(system)
    await trio.sleep(2.5)
    enabled = system.kernfs.walk("sys/kernel/livepatch/livepatch_sample/enabled")
    assert enabled is not None and Kernfs.write(enabled, b"0") == 1
    transition = (await handle(system, "livepatch"))["transition"]
    assert (transition["direction"], transition["attempts"], transition["next_retry"],
            transition["next_signal"]) == ("unpatching", 0, 3.0, 18.0)
