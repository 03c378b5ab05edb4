"""Whatever a timer's callback raises stays in that callback: a kernel fault is an
oops (in the log, taint D) and a bug of klpfs's own is logged, and either way the
timers after it -- the transition's retries, wake-ups, works -- still fire.  One
timer loop serves the whole emulated kernel, so without this one faulting
callback would stop time for good."""

from __future__ import annotations

import logging

from klpfs.kernel.oops import PageFault

from .conftest import Machine, make_machine, settle


def later(m: Machine, seconds: float, fired: list[str], name: str) -> None:
    m.kernel.timers.call_later(seconds, lambda: fired.append(name))


async def test_a_fault_in_a_timer_callback_is_an_oops(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    fired: list[str] = []

    def faulting() -> None:
        raise PageFault(m.kernel, 0xffffffffc0401000, "sysfs_kf_seq_show", 0x1d, ["seq_read"])
    m.kernel.timers.call_later(1.0, faulting)
    later(m, 1.0, fired, "same time")
    later(m, 2.0, fired, "later")
    m.take()
    await settle(3)
    lines = m.take()
    assert lines[0] == "BUG: unable to handle page fault for address: ffffffffc0401000"
    assert lines[-1] == "---[ end trace 0000000000000000 ]---"
    assert m.kernel.modules.tainted & 1 << 7  # D
    assert fired == ["same time", "later"]


async def test_a_bug_in_a_timer_callback_is_logged(nursery, autojump_clock, caplog) -> None:
    m = make_machine(nursery, "6.1")
    fired: list[str] = []

    def buggy() -> None:
        raise KeyError("no such thing")
    m.kernel.timers.call_later(1.0, buggy)
    later(m, 2.0, fired, "later")
    with caplog.at_level(logging.ERROR, logger="klpfs.kernel.kernel"):
        await settle(3)
    assert [r.getMessage() for r in caplog.records] == ["a timer callback failed"]
    assert fired == ["later"]

