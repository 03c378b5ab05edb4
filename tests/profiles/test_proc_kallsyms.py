"""/proc/kallsyms: the emulated image's functions in address order, static
duplicates as 't', then each module's functions with its name, newest module first."""

from __future__ import annotations

import pytest

from klpfs.sysfs.kernfs import Kernfs

from .conftest import Machine, autojump_clock, make_machine  # noqa: F401


def kallsyms(m: Machine) -> list[str]:
    data = Kernfs.read(m.node("proc/kallsyms"), 0, 1 << 20)
    assert isinstance(data, bytes)
    return data.decode().splitlines()


async def test_kallsyms(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    before = kallsyms(m)
    first = m.kernel.kallsyms.symbols(None)[0]
    assert before[0] == f"{first.addr:016x} T {first.name}"
    cmdline = m.sym("cmdline_proc_show")
    assert f"{cmdline.addr:016x} T cmdline_proc_show" in before
    assert [line.split()[1] for line in before if line.endswith(" type_show")] == ["t", "t", "t"]
    assert (await m.insmod("test_klp_callbacks_mod"))["ok"]
    assert (await m.insmod("test_klp_livepatch"))["ok"]
    after = kallsyms(m)
    assert after[:len(before)] == before
    added = [line.split(" ", 2)[1:] for line in after[len(before):]]
    assert added == [
        ["t", "livepatch_cmdline_proc_show\t[test_klp_livepatch]"],
        ["t", "test_klp_livepatch_init\t[test_klp_livepatch]"],
        ["t", "test_klp_livepatch_exit\t[test_klp_livepatch]"],
        ["t", "test_klp_callbacks_mod_init\t[test_klp_callbacks_mod]"],
        ["t", "test_klp_callbacks_mod_exit\t[test_klp_callbacks_mod]"],
    ]
    addrs = [int(line.split()[0], 16) for line in after[len(before):]]
    assert addrs[:3] == sorted(addrs[:3]) and addrs[3] < addrs[0]


@pytest.mark.parametrize("version", ["6.1", "6.11", "6.12", "6.14"])
async def test_padding_symbols(nursery, version, autojump_clock) -> None:
    """6.12 obs #7: with CONFIG_CALL_PADDING (6.2 on) every function, vmlinux's and a
    module's, has its padding first: `__pfx_<name>` 16 bytes before it, of its type."""
    m = make_machine(nursery, version)
    assert (await m.insmod("klp-busy"))["ok"]
    lines = kallsyms(m)
    cmdline, busy = m.sym("cmdline_proc_show"), m.sym("busy_fn", "klp_busy")
    at = lines.index(f"{cmdline.addr:016x} T cmdline_proc_show")
    module_at = lines.index(f"{busy.addr:016x} t busy_fn\t[klp_busy]")
    if version == "6.1":
        assert not any("__pfx_" in line for line in lines)
        return
    assert lines[at - 1] == f"{cmdline.addr - 16:016x} T __pfx_cmdline_proc_show"
    assert lines[module_at - 1] == f"{busy.addr - 16:016x} t __pfx_busy_fn\t[klp_busy]"
    assert len(lines) == 2 * len([line for line in lines if "__pfx_" not in line])
