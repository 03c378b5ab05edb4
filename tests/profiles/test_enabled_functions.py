"""tracefs's enabled_functions (obs #23; 6.12 obs #9 gives the 6.1 and 6.12 lines):
t_show() of each function an ftrace ops is attached to.  A patched function has
livepatch's ops, with IPMODIFY (`I`), a trampoline of its own and
klp_ftrace_handler behind it; the file is empty again once the patch is gone.
The same tracefs is at /sys/kernel/tracing and, through debugfs's automount, at
/sys/kernel/debug/tracing: its root 0700, the file 0440 (TRACE_MODE_READ)."""

from __future__ import annotations

import stat

import pytest

from klpfs.sysfs.kernfs import Kernfs

from .conftest import Machine, make_machine, settle, spec

TRAMPOLINE = "0xffffffffc0100000"
"""The first trampoline: module_alloc() space after the patch module's own."""
HANDLER = "klp_ftrace_handler+0x0/0x110"
HANDLER_6_12 = "klp_ftrace_handler+0x0/0x100"
"""6.12 obs #9: the handler's size in the 6.12 kernel observed (the 6.11 and 6.14 profiles' vmlinux is its)."""
LINES = {
    # 4.x and 5.1 (x86 without DYNAMIC_FTRACE_WITH_ARGS): the ops saves regs, `R`; no D column yet.
    "4.15": "cmdline_proc_show (1) R I",
    "5.1": "cmdline_proc_show (1) R I",
    "6.1": "cmdline_proc_show (1)   I  ",
    "6.11": "cmdline_proc_show (1)   I     M ",  # as 6.12: the O and M columns
    "6.12": "cmdline_proc_show (1)   I     M ",
    "6.14": "cmdline_proc_show (1)   I     M ",
}
PATHS = ("sys/kernel/tracing/enabled_functions", "sys/kernel/debug/tracing/enabled_functions")


def enabled_functions(m: Machine) -> list[str]:
    texts = []
    for path in PATHS:
        data = Kernfs.read(m.node(path))
        assert isinstance(data, bytes)
        texts.append(data.decode())
    assert texts[0] == texts[1]
    return texts[0].splitlines()


@pytest.mark.parametrize("version", list(LINES))
async def test_patched_function_listed_while_enabled(nursery, version, autojump_clock) -> None:
    m = make_machine(nursery, version)
    assert enabled_functions(m) == []
    assert (await m.insmod("livepatch-sample"))["ok"]
    handler = HANDLER_6_12 if version in ("6.11", "6.12", "6.14") else HANDLER
    assert enabled_functions(m) == [f"{LINES[version]}\ttramp: {TRAMPOLINE} ({handler}) ->{handler}"]
    await settle(2.5)
    assert m.write("livepatch_sample/enabled", b"0") == 1
    await settle(2.5)
    assert enabled_functions(m) == []


async def test_modes_and_module_functions(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    for root in ("sys/kernel/tracing", "sys/kernel/debug/tracing"):
        assert stat.S_IMODE(m.node(root).mode) == 0o700
        assert stat.S_IMODE(m.node(f"{root}/enabled_functions").mode) == 0o440
    assert stat.S_IMODE(make_machine(nursery, "5.1").node(PATHS[0]).mode) == 0o444
    # A module's function carries its module's name (print_rec()); records in address order.
    assert (await m.insmod("klp-busy"))["ok"]
    assert m.load(spec("lp_m", {None: ["meminfo_proc_show"], "klp_busy": ["busy_fn"]})) == 0
    names = [line.split(" (1)")[0] for line in enabled_functions(m)]
    assert names == ["meminfo_proc_show", "busy_fn [klp_busy]"]
