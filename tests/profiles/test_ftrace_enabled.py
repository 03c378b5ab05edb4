"""kernel.ftrace_enabled: from 5.5 livepatch's ftrace ops are permanent
(ftrace cannot be turned off under a patch, a patch cannot come while it is
off); before, turning it off silently stops every redirection."""

from __future__ import annotations

import errno

import pytest

from .conftest import ORIGINAL, Machine, autojump_clock, make_machine, settle  # noqa: F401


def ftrace_enabled(m: Machine) -> bytes | int:
    return m.kernfs.read(m.node("proc/sys/kernel/ftrace_enabled"), 0, 4096)


def set_ftrace_enabled(m: Machine, value: bytes) -> int:
    return m.kernfs.write(m.node("proc/sys/kernel/ftrace_enabled"), value)


@pytest.mark.parametrize("version", ["6.1", "6.14"])
async def test_permanent_ops(nursery, autojump_clock, version: str) -> None:
    m = make_machine(nursery, version)
    assert set_ftrace_enabled(m, b"0\n") == 2
    reply = await m.insmod("livepatch-sample")
    assert reply == {"ok": False, "errno": errno.EBUSY, "error": "Device or resource busy"}
    assert "livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)" in m.lines()
    assert set_ftrace_enabled(m, b"1") == 1
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert set_ftrace_enabled(m, b"0") == -errno.EBUSY
    assert ftrace_enabled(m) == b"1\n"
    assert m.call("cmdline_proc_show", m.kthread()) == "this has been live patched"


async def test_off_stops_redirection_before_5_5(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "5.1")
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    k = m.kthread()
    assert m.call("cmdline_proc_show", k) == "this has been live patched"
    assert set_ftrace_enabled(m, b"0") == 1
    assert ftrace_enabled(m) == b"0\n"
    assert m.call("cmdline_proc_show", k) == ORIGINAL
    assert set_ftrace_enabled(m, b"1") == 1
    assert m.call("cmdline_proc_show", k) == "this has been live patched"


@pytest.mark.parametrize("value", [b"x", b"1x", b"99999999999"])
async def test_bad_values(nursery, autojump_clock, value: bytes) -> None:
    m = make_machine(nursery, "6.1")
    assert set_ftrace_enabled(m, value) == -errno.EINVAL
    assert ftrace_enabled(m) == b"1\n"
