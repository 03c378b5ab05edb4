"""/proc/kallsyms: the emulated image's functions in address order, static
duplicates as 't', then each module's functions with its name, newest module first."""

from __future__ import annotations

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
