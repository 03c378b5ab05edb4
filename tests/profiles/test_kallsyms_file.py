"""--kallsyms: the emulated vmlinux takes its symbols from a build's /proc/kallsyms or
System.map: addresses and types as the file gives them, sizes by distance to the next
symbol, sympos over the file's duplicates with klp_find_object_symbol()'s messages."""

from __future__ import annotations

import pytest
import trio

from klpfs.kernel.kallsyms_file import KallsymsFileError, parse_kallsyms
from klpfs.sysfs.kernfs import Kernfs
from klpfs.system import System

from .conftest import EINVAL, Machine, autojump_clock, settle, spec  # noqa: F401

BASE = 0xFFFFFFFF81000000
DUMP = f"""\
{BASE:016x} T _stext
{BASE + 0x100:016x} t dup_fn
{BASE + 0x140:016x} T outside_fn
{BASE + 0x1a0:016x} t dup_fn
{BASE + 0x1c0:016x} T cmdline_proc_show
{BASE + 0x200:016x} W weak_fn
{BASE + 0x220:016x} t dup_fn
{BASE + 0x300:016x} D some_data
{BASE + 0x308:016x} d dup_fn
ffffffffc0001000 t mod_fn\t[host_module]
"""


def boot_with(nursery: trio.Nursery, text: str, version: str = "6.1") -> Machine:
    system = System(kernel_version=version, symbols=parse_kallsyms(text.splitlines(), "dump"))
    nursery.start_soon(system.run)
    return Machine(system, version)


def proc(m: Machine, rel: str) -> list[str]:
    data = Kernfs.read(m.node(rel), 0, 1 << 22)
    assert isinstance(data, bytes)
    return data.decode().splitlines()


@pytest.mark.parametrize(("text", "message"), [
    ("", "dump: no symbols (an empty file?)"),
    (f"{BASE:016x} D data\n{BASE + 8:016x} b bss\n",
     "dump: no text symbols (types T, t, W or w): not a kernel's symbol table"),
    ("0000000000000000 T _stext\n0000000000000000 t f\n",
     "dump: every address is zero: a /proc/kallsyms read without root (kptr_restrict); read it as root"),
    (f"{BASE:016x} T _stext\n{BASE + 4:016x} T\n",
     f"dump:2: not an `ADDRESS TYPE NAME` line: '{BASE + 4:016x} T'"),
    (f"{BASE:016x} T _stext\n\n{BASE + 4:016x} Q f\n",
     f"dump:3: not an `ADDRESS TYPE NAME` line: '{BASE + 4:016x} Q f'"),
    ("ffffffffzz000000 T _stext\n", "dump:1: 'ffffffffzz000000' is not a hexadecimal address"),
])
def test_bad_files(text: str, message: str) -> None:
    with pytest.raises(KallsymsFileError) as caught:
        parse_kallsyms(text.splitlines(), "dump")
    assert str(caught.value) == message


def test_module_lines_are_left_out() -> None:
    symbols = parse_kallsyms(DUMP.splitlines(), "dump")
    assert symbols.names[-2:] == ["some_data", "dup_fn"]
    assert symbols.kinds[-2:] == ["D", "d"]
    assert "mod_fn" not in symbols.names


async def test_listing_sizes_and_behaviour(nursery, autojump_clock) -> None:
    m = boot_with(nursery, DUMP)
    lines = proc(m, "proc/kallsyms")
    file_lines = DUMP.splitlines()[:-1]
    assert lines[:len(file_lines)] == file_lines
    # The image's functions the file lacks follow it, so the boot tasks still run.
    appended = [line.split() for line in lines[len(file_lines):]]
    assert all(kind == "T" and int(addr, 16) > BASE + 0x308 for addr, kind, _ in appended)
    assert "msleep" in [name for _, _, name in appended]
    kallsyms = m.kernel.kallsyms
    assert [(s.addr - BASE, s.size) for s in kallsyms.find_all("dup_fn")] == [
        (0x100, 0x40), (0x1A0, 0x20), (0x220, 0xE0), (0x308, 0x100)]
    outside = kallsyms.find("outside_fn")
    assert outside is not None and outside.size == 0x60
    assert kallsyms.lookup(BASE + 0x150) is outside
    # cmdline_proc_show keeps its behaviour at the file's address.
    cmdline = kallsyms.find("cmdline_proc_show")
    assert cmdline is not None and cmdline.addr == BASE + 0x1C0 and cmdline.size == 0x40
    assert proc(m, "proc/cmdline") == [m.kernel.image.cmdline]
    assert (await m.insmod("test_klp_livepatch"))["ok"]
    assert proc(m, "proc/kallsyms")[:len(lines)] == lines
    assert proc(m, "proc/kallsyms")[len(lines)].endswith(" t livepatch_cmdline_proc_show\t[test_klp_livepatch]")


async def test_sympos_over_the_files_duplicates(nursery, autojump_clock) -> None:
    """klp_find_object_symbol(): data symbols count too (kallsyms_on_each_symbol walks them)."""
    m = boot_with(nursery, DUMP)
    m.take()
    assert m.load(spec("lp_a", {None: ["dup_fn"]})) == -EINVAL
    assert m.take() == ["lp_a: tainting kernel with TAINT_LIVEPATCH",
                        "livepatch: unresolvable ambiguity for symbol 'dup_fn' in object '(null)'"]
    assert m.load(spec("lp_b", {None: [("dup_fn", 5)]})) == -EINVAL
    assert m.take() == ["livepatch: symbol position 5 for symbol 'dup_fn' in object 'vmlinux' not found"]
    assert m.load(spec("lp_c", {None: ["msleep_interruptible_nowhere"]})) == -EINVAL
    assert m.take() == ["livepatch: symbol 'msleep_interruptible_nowhere' not found in symbol table"]
    assert m.load(spec("lp_d", {None: [("dup_fn", 1)]})) == 0
    await settle()
    assert m.load(spec("lp_e", {None: [("dup_fn", 3)]})) == 0
    await settle()
    dups = m.kernel.kallsyms.find_all("dup_fn")
    assert [p.objs[0].funcs[0].old_addr for p in m.lp.klp_patches] == [dups[0].addr, dups[2].addr]
    m.take()
    # Position N, the data symbol, resolves; ftrace has no location in data to patch.
    assert m.load(spec("lp_f", {None: [("dup_fn", 4)]})) == -EINVAL
    assert m.take() == ["livepatch: enabling patch 'lp_f'",
                        "livepatch: failed to find location for function 'dup_fn'",
                        "livepatch: failed to patch object 'vmlinux'",
                        "livepatch: failed to enable patch 'lp_f'",
                        "livepatch: 'lp_f': unpatching complete"]


async def test_a_symbol_only_function_is_patched(nursery, autojump_clock) -> None:
    """A function outside the image: patchable, the patch's behaviour is what runs."""
    m = boot_with(nursery, DUMP)
    task = m.kthread()
    assert m.call("outside_fn", task) == "<original>"
    assert m.load(spec("lp_o", {None: ["outside_fn"]})) == 0
    await settle()
    assert m.call("outside_fn", task) == "lp_o:outside_fn"


async def test_a_task_sleeps_in_a_file_function_with_its_size(nursery, autojump_clock) -> None:
    m = boot_with(nursery, DUMP)
    task = (await m.ctl("task_add", comm="sleeper", kind="kthread", ppid=None))["task"]
    assert (await m.ctl("task_sleep", pid=task["pid"], func="outside_fn", seconds=None,
                        interruptible=False))["ok"]
    assert "[<0>] outside_fn+0x30/0x60" in proc(m, f"proc/{task['pid']}/stack")
    reply = await m.ctl("ps")
    assert [t["where"] for t in reply["tasks"] if t["pid"] == task["pid"]] == ["outside_fn"]


async def test_release_names_another_build(nursery, autojump_clock) -> None:
    system = System(kernel_version="6.1", release="6.1.0-28-amd64")
    nursery.start_soon(system.run)
    assert system.profile.vermagic == "6.1.0-28-amd64 SMP preempt mod_unload modversions "
    assert system.profile.module_layout_crc is None
    assert system.kernel.release == "6.1.0-28-amd64"
    version = Kernfs.read(Machine(system, "6.1").node("proc/version"))
    assert isinstance(version, bytes) and version.startswith(b"Linux version 6.1.0-28-amd64 ")


async def test_call_means_the_function_not_a_data_symbol(nursery, autojump_clock) -> None:
    m = boot_with(nursery, f"{BASE - 0x1000:016x} D outside_fn\n{DUMP}")
    outside = m.kernel.kallsyms.find("outside_fn")
    assert outside is not None and (outside.addr, outside.kind) == (BASE + 0x140, "T")
    assert m.kernel.kallsyms.find("some_data") is None
