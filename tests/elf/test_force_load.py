"""Forced loads of a real .ko (finit_module()'s MODULE_INIT_IGNORE_MODVERSIONS and
MODULE_INIT_IGNORE_VERMAGIC, which `insmod -f` passes): with CONFIG_MODULE_FORCE_LOAD
(Debian's 6.1) a skipped check goes through try_to_force_load(), which warns once and
taints F; without it (6.14 here) the forced load is -ENOEXEC and nothing is logged."""

from __future__ import annotations

import errno
from pathlib import Path

import trio

from elf.conftest import module_name
from profiles.conftest import Machine
from profiles.conftest import autojump_clock  # noqa: F401  (the mock clock fixture)

from klpfs.control.samples import find_module_file
from klpfs.elf.kmod import MODULE_INIT_IGNORE_MODVERSIONS, MODULE_INIT_IGNORE_VERMAGIC
from klpfs.sysfs.kernfs import Kernfs
from klpfs.kernel.printk import KERN_WARNING
from klpfs.system import System

TARGET = "klpfs-ko-target"
NAME = module_name(TARGET)
BOTH = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC
BUILT = "6.1.0-50-amd64 SMP preempt mod_unload modversions "
"""The fixture modules' vermagic (Debian 6.1.0-50-amd64's headers)."""
TAINTED_FOE = b"12290\n"
"""F (bit 1), O (12: out of tree), E (13: unsigned): a forced load of the target module."""


async def insmod(m: Machine, ko: Path, flags: int = 0) -> dict:
    return await m.ctl("insmod", path=str(ko), data=ko.read_bytes(), params=[], flags=flags)


def read(m: Machine, path: str) -> bytes:
    data = Kernfs.read(m.node(path), 0, 4096)
    assert isinstance(data, bytes), data
    return data


def no_modversions(release: str) -> System:
    """A 6.1 build without CONFIG_MODVERSIONS: the whole vermagic counts, the release too."""
    system = System("6.1")
    system.profile = system.profile.built_as(release, "SMP preempt mod_unload ")
    return system


async def test_vermagic_mismatch_refused_then_forced(kos: dict[str, Path], autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        system = no_modversions("6.1.0-28-amd64")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod(m, kos[TARGET])
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.take()[-1] == f"{NAME}: version magic '{BUILT}' should be '6.1.0-28-amd64 SMP preempt mod_unload '"
        assert read(m, "proc/sys/kernel/tainted") == b"0\n"

        assert await insmod(m, kos[TARGET], BOTH) == {"ok": True, "name": NAME}
        assert m.take()[0] == f"{NAME}: bad vermagic: kernel tainted."
        assert [r.level for r in m.records() if r.text == f"{NAME}: bad vermagic: kernel tainted."] == [KERN_WARNING]
        assert read(m, "proc/sys/kernel/tainted") == TAINTED_FOE
        assert read(m, "proc/modules").decode().endswith(" (FOE)\n")
        assert read(m, f"sys/module/{NAME}/taint") == b"FOE\n"
        nursery.cancel_scope.cancel()


async def test_the_warning_comes_once(kos: dict[str, Path], autojump_clock) -> None:
    """try_to_force_load() warns only while the kernel is not yet tainted F."""
    async with trio.open_nursery() as nursery:
        system = no_modversions("6.1.0-28-amd64")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        assert await insmod(m, kos[TARGET], BOTH) == {"ok": True, "name": NAME}
        assert (await m.rmmod_ctl(NAME))["ok"]
        m.take()
        assert await insmod(m, kos[TARGET], BOTH) == {"ok": True, "name": NAME}
        assert not [line for line in m.take() if line.endswith("kernel tainted.")]
        assert read(m, f"sys/module/{NAME}/taint") == b"FOE\n"
        nursery.cancel_scope.cancel()


async def test_ignore_vermagic_taints_a_matching_module(kos: dict[str, Path], autojump_clock) -> None:
    """check_modinfo() drops the vermagic whatever it says: a module built for this kernel taints too."""
    async with trio.open_nursery() as nursery:
        system = System("6.1")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        assert await insmod(m, kos[TARGET], MODULE_INIT_IGNORE_VERMAGIC) == {"ok": True, "name": NAME}
        assert f"{NAME}: bad vermagic: kernel tainted." in m.lines()
        assert read(m, "proc/sys/kernel/tainted") == TAINTED_FOE
        nursery.cancel_scope.cancel()


async def test_modversions_mismatch_forced(kos: dict[str, Path], autojump_clock) -> None:
    """MODULE_INIT_IGNORE_MODVERSIONS: check_version() finds no __versions and forces
    module_layout; the vermagic, now compared whole, is this kernel's."""
    async with trio.open_nursery() as nursery:
        system = System("6.1", module_layout_crc=0x12345678)
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod(m, kos[TARGET])
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.take()[-1] == f"{NAME}: disagrees about version of symbol module_layout"
        assert await insmod(m, kos[TARGET], MODULE_INIT_IGNORE_MODVERSIONS) == {"ok": True, "name": NAME}
        assert m.take()[0] == f"{NAME}: module_layout: kernel tainted."
        assert read(m, "proc/sys/kernel/tainted") == TAINTED_FOE
        nursery.cancel_scope.cancel()


async def test_ignoring_modversions_compares_the_release(kos: dict[str, Path], autojump_clock) -> None:
    """Without __versions same_magic() compares the release: another build's module is
    refused by --force-modversion alone, and loads with both flags (insmod -f)."""
    async with trio.open_nursery() as nursery:
        system = System("6.1", release="6.1.0-28-amd64", module_layout_crc=0x12345678)
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod(m, kos[TARGET], MODULE_INIT_IGNORE_MODVERSIONS)
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.take()[-2:] == [f"{NAME}: module_layout: kernel tainted.",
                                 f"{NAME}: version magic '{BUILT}' should be "
                                 "'6.1.0-28-amd64 SMP preempt mod_unload modversions '"]
        # The taint stays, as add_taint_module() left it, though the load failed.
        assert read(m, "proc/sys/kernel/tainted") == b"2\n"
        assert await insmod(m, kos[TARGET], BOTH) == {"ok": True, "name": NAME}
        assert not [line for line in m.take() if line.endswith("kernel tainted.")]
        nursery.cancel_scope.cancel()


async def test_without_force_load_refused(kos: dict[str, Path], autojump_clock) -> None:
    """6.14 (no CONFIG_MODULE_FORCE_LOAD): try_to_force_load() is -ENOEXEC, silently."""
    async with trio.open_nursery() as nursery:
        system = System("6.14")
        nursery.start_soon(system.run)
        m = Machine(system, "6.14")
        m.take()
        reply = await insmod(m, kos[TARGET], BOTH)
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.take() == []
        assert read(m, "proc/sys/kernel/tainted") == b"0\n"
        assert await insmod(m, kos[TARGET]) == {"ok": True, "name": NAME}
        nursery.cancel_scope.cancel()


async def test_unknown_flags_einval(kos: dict[str, Path], autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        system = System("6.1")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod(m, kos[TARGET], 8)
        assert (reply["ok"], reply["errno"]) == (False, errno.EINVAL)
        nursery.cancel_scope.cancel()


async def insmod_sample(m: Machine, flags: int) -> dict:
    path = find_module_file("livepatch-sample")
    assert path is not None
    return await m.ctl("insmod", path=str(path), text=path.read_text(), params=[], flags=flags)


async def test_module_file_forced(autojump_clock) -> None:
    """A .py module is built for the running kernel; ignoring its vermagic forces as for a .ko."""
    async with trio.open_nursery() as nursery:
        system = System("6.1")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        assert await insmod_sample(m, MODULE_INIT_IGNORE_VERMAGIC) == {"ok": True, "name": "livepatch_sample"}
        assert m.lines()[0] == "livepatch_sample: bad vermagic: kernel tainted."
        assert read(m, "sys/module/livepatch_sample/taint") == b"FK\n"
        nursery.cancel_scope.cancel()


async def test_module_file_forced_without_force_load(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        system = System("6.14")
        nursery.start_soon(system.run)
        m = Machine(system, "6.14")
        m.take()
        reply = await insmod_sample(m, MODULE_INIT_IGNORE_VERMAGIC)
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.take() == []
        nursery.cancel_scope.cancel()
