"""The `clear` control op (syslog's SYSLOG_ACTION_CLEAR) and `dmesg` since the clear point,
as the dmesg shim asks for them."""

from __future__ import annotations

import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.kernel.printk import KERN_INFO, KERN_WARNING
from klpfs.system import System


async def handle(system: System, cmd: str, **args: object) -> dict:
    return await Control(system).handle({"cmd": cmd, **args})


async def test_clear_sets_where_since_clear_starts(system: System, autojump_clock: trio.testing.MockClock) -> None:
    log = system.kernel.log
    log.printk(KERN_INFO, "before")
    assert await handle(system, "clear") == {"ok": True}
    await trio.sleep(1.5)
    system.kmsg.open(0, 0).write(0, b"after\n")
    everything = (await handle(system, "dmesg"))["records"]
    assert [r["text"] for r in everything][-2:] == ["before", "after"]
    assert (await handle(system, "dmesg", since_clear=True))["records"] == [
        {"seq": everything[-1]["seq"], "level": "warn", "facility": 1, "time": 1.5, "text": "after"}]
    assert log.lines()[-2:] == ["before", "after"]


async def test_undecodable_bytes_show_escaped(system: System, autojump_clock: trio.testing.MockClock) -> None:
    system.kmsg.open(0, 0).write(0, b"<4>bad \xff byte")
    (record,) = (await handle(system, "dmesg", since_clear=True))["records"][-1:]
    assert (record["level"], record["text"]) == ("warn", "bad \\xff byte")
    assert system.kernel.log.records[-1].level == KERN_WARNING
