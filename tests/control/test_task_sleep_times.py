"""`klpfs task sleep --seconds`: a time that no jiffies value holds is EINVAL,
and the emulated timers (and the next timed sleep) carry on."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.kernel.timers import MAX_SECONDS
from klpfs.system import System

NOT_A_TIME = f"is not a time: must be from 0 to {MAX_SECONDS} seconds (MAX_JIFFY_OFFSET jiffies)"


async def sleep_in(system: System, pid: int, seconds: object) -> dict:
    return await Control(system).handle({"cmd": "task_sleep", "pid": pid, "func": "cmdline_proc_show",
                                         "seconds": seconds, "interruptible": False})


async def kthread(system: System) -> int:
    added = await Control(system).handle({"cmd": "task_add", "comm": "sleeper", "kind": "kthread", "ppid": None})
    return added["task"]["pid"]


@pytest.mark.parametrize("seconds, shown", [
    (float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf"), (-1, "-1"), (-0.001, "-0.001"),
    (MAX_SECONDS + 1, str(MAX_SECONDS + 1)), (1e300, "1e+300"),
])
async def test_no_time_is_einval(system: System, autojump_clock: trio.testing.MockClock,
                                 seconds: float, shown: str) -> None:
    pid = await kthread(system)
    assert await sleep_in(system, pid, seconds) == {"ok": False, "errno": errno.EINVAL,
                                                    "error": f"seconds: {shown} {NOT_A_TIME}"}
    assert system.kernel.sched.find(pid).activity is None
    # The timers still run: the next timed sleep ends on time.
    assert (await sleep_in(system, pid, 1.5))["task"]["state"] == "D"
    await trio.sleep(1)
    assert system.kernel.sched.find(pid).state == "D"
    await trio.sleep(1)
    assert system.kernel.sched.find(pid).state == "S"


async def test_a_time_must_be_a_number(system: System) -> None:
    reply = Control(system).task_sleep(1, "cmdline_proc_show", "5", False)  # type: ignore[arg-type]
    assert reply == {"ok": False, "errno": errno.EINVAL, "error": "seconds: must be a number of seconds, not '5'"}


async def test_the_longest_time_is_taken(system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = await kthread(system)
    assert (await sleep_in(system, pid, MAX_SECONDS))["task"]["state"] == "D"
    await trio.sleep(10)
    assert system.kernel.sched.find(pid).state == "D"
