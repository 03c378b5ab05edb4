"""A real livepatch module, built against Debian's 6.1 headers, that patches a function
outside the built-in image: it loads when the build's symbols (--kallsyms) have that
function, and is refused with the kernel's message when they do not; and a module
built for another release is refused once --release names it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from elf import build
from elf.conftest import module_name
from elf.test_real_modules import insmod_ko
from profiles.conftest import Machine, make_machine, settle
from profiles.conftest import autojump_clock  # noqa: F401  (the mock clock fixture)

from klpfs.host import vermagic_flags
from klpfs.kernel.kallsyms_file import parse_kallsyms
from klpfs.kernel.symvers import SymversError, module_layout_crc
from klpfs.profiles import get_profile
from klpfs.system import System

OUTSIDE = "klpfs_only_in_the_map"
STEM = "klpfs-ko-outside"
SOURCE = f"""\
// SPDX-License-Identifier: GPL-2.0
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/livepatch.h>

static void klpfs_outside(void)
{{
}}

static struct klp_func funcs[] = {{
	{{ .old_name = "{OUTSIDE}", .new_func = klpfs_outside, }},
	{{ }}
}};

static struct klp_object objs[] = {{
	{{ .funcs = funcs, }},
	{{ }}
}};

static struct klp_patch patch = {{
	.mod = THIS_MODULE,
	.objs = objs,
}};

static int __init klpfs_outside_init(void)
{{
	return klp_enable_patch(&patch);
}}

static void __exit klpfs_outside_exit(void)
{{
}}

module_init(klpfs_outside_init);
module_exit(klpfs_outside_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
"""
MAP = f"""\
ffffffff81000000 T _stext
ffffffff81000100 T {OUTSIDE}
ffffffff81000180 D data
"""


@pytest.fixture(scope="module")
def ko() -> Path:
    try:
        return build.build_modules({STEM: SOURCE})[STEM]
    except build.KbuildUnavailable as e:
        if os.environ.get("KLPFS_KBUILD_OPTIONAL") == "1":
            pytest.skip(f"cannot build kernel modules here: {e}")
        raise


async def test_loads_with_the_builds_symbols(ko: Path, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        system = System("6.1", symbols=parse_kallsyms(MAP.splitlines(), "System.map"))
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        name = module_name(STEM)
        assert await insmod_ko(m, ko) == {"ok": True, "name": name}
        await settle(2.5)
        assert m.tree(name) == ["enabled", "force", "transition", "vmlinux/", f"vmlinux/{OUTSIDE},1/",
                                "vmlinux/patched"]
        assert m.read(f"{name}/vmlinux/patched") == b"1\n"
        nursery.cancel_scope.cancel()


async def test_refused_without_them(ko: Path, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        reply = await insmod_ko(m, ko)
        assert (reply["ok"], reply["errno"]) == (False, errno.EINVAL)
        assert f"livepatch: symbol '{OUTSIDE}' not found in symbol table" in m.lines()
        nursery.cancel_scope.cancel()


async def test_with_modversions_the_release_is_not_compared(ko: Path, autojump_clock) -> None:
    """same_magic() with modversions skips the release; the module_layout CRC is one
    build's, so --release leaves none to check, and the rest of the vermagic decides."""
    async with trio.open_nursery() as nursery:
        system = System("6.1", release="6.1.0-28-amd64", symbols=parse_kallsyms(MAP.splitlines(), "map"))
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        assert await insmod_ko(m, ko) == {"ok": True, "name": module_name(STEM)}
        nursery.cancel_scope.cancel()


async def test_symvers_crc_decides(ko: Path, autojump_clock, tmp_path: Path) -> None:
    """check_modstruct_version(): the CRC Module.symvers gives module_layout must be the module's."""
    symvers = tmp_path / "Module.symvers"
    symvers.write_text("0x12345678\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n")
    async with trio.open_nursery() as nursery:
        system = System("6.1", release="6.1.0-28-amd64", module_layout_crc=module_layout_crc(str(symvers)))
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod_ko(m, ko)
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.lines()[-1] == f"{module_name(STEM)}: disagrees about version of symbol module_layout"
        nursery.cancel_scope.cancel()


async def test_without_modversions_the_whole_vermagic_counts(ko: Path, autojump_clock) -> None:
    """A build without CONFIG_MODVERSIONS: same_magic() is strcmp(), the release included."""
    async with trio.open_nursery() as nursery:
        system = System("6.1")
        system.profile = system.profile.built_as("6.1.0-28-amd64", "SMP preempt mod_unload ")
        nursery.start_soon(system.run)
        m = Machine(system, "6.1")
        reply = await insmod_ko(m, ko)
        assert (reply["ok"], reply["errno"]) == (False, errno.ENOEXEC)
        assert m.lines()[-1] == (f"{module_name(STEM)}: version magic '6.1.0-50-amd64 SMP preempt mod_unload "
                                 "modversions ' should be '6.1.0-28-amd64 SMP preempt mod_unload '")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("text", "message"), [
    ("0x1\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n", "{path}: no CRC for module_layout (not a Module.symvers of a "
                                                "kernel with modversions)"),
    ("0xzz\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n", "{path}:1: '0xzz' is not a CRC"),
])
def test_bad_symvers(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "Module.symvers"
    path.write_text(text)
    with pytest.raises(SymversError) as caught:
        module_layout_crc(str(path))
    assert str(caught.value) == message.format(path=path)


def test_host_vermagic_from_debians_config() -> None:
    """--kernel host's vermagic from a configuration: Debian 6.1's makes the vermagic its
    modules carry (the modules above were built against these headers)."""
    try:
        headers = build.prepare_headers()
    except build.KbuildUnavailable as e:
        if os.environ.get("KLPFS_KBUILD_OPTIONAL") == "1":
            pytest.skip(f"cannot fetch the headers here: {e}")
        raise
    flags = vermagic_flags((headers / ".config").read_text())
    assert f"{build.RELEASE} {flags}" == get_profile("6.1").vermagic
    assert flags == "SMP preempt mod_unload modversions "
