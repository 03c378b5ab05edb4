"""The size /proc/modules and lsmod show (m_show(): init + core layout) for modules
from Python and TOML files: what layout_sections() and layout_symtab() make of the
small C module each stands for -- text, read-only data, data and the kept symbols,
each rounded up to a page: 16384 for the small test modules of the 6.1 kernel
observed (6.12 obs #8 records "16384 for all" on 6.1, 12288 for the plain ones on
6.12), more for more text, and the two pages of the init area on top while init
runs ("Loading")."""

from __future__ import annotations

import pytest

from klpfs.kernel.module import source_layout
from klpfs.sysfs.kernfs import Kernfs

from modules.test_kapi import source
from .conftest import LATER, Machine, make_machine, settle

SLOW_INIT = source('''
    def slow_init():
        msleep(1000)
        return 0


    def slow_exit():
        pass


    module_init(slow_init)
    module_exit(slow_exit)
    MODULE_LICENSE("GPL")
''')


def proc_modules(m: Machine) -> list[str]:
    data = Kernfs.read(m.node("proc/modules"))
    assert isinstance(data, bytes)
    return data.decode().splitlines()


@pytest.mark.parametrize("version", LATER)
async def test_small_modules_are_16384(nursery, version, autojump_clock) -> None:
    """16384 each before 6.4; from 6.4 (module_memory, 6.12 obs #8) a plain module's
    symbols share its data's page, 12288, while a livepatch module keeps 16384."""
    m = make_machine(nursery, version)
    assert (await m.insmod("livepatch-sample"))["ok"]
    assert (await m.insmod("klp-busy"))["ok"]
    taints = "(OE)" if version != "5.1" else "(O)"  # unsigned: E where the loader checks signatures
    plain = 12288 if version in ("6.11", "6.12", "6.14") else 16384
    assert proc_modules(m) == [f"klp_busy {plain} 0 - Live 0x0000000000000000 {taints}",
                               "livepatch_sample 16384 1 - Live 0x0000000000000000 (K)"]
    assert (await m.ctl("lsmod"))["modules"] == [{"name": "klp_busy", "size": plain, "refcnt": 0},
                                                 {"name": "livepatch_sample", "size": 16384, "refcnt": 1}]


async def test_text_past_a_page_takes_another(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    big = "\n".join(f"[[function]]\nname = \"fn{i}\"\nsize = 0x400\n" for i in range(5))
    assert (await m.insmod_text("big.toml", f"[module]\n{big}"))["ok"]
    assert proc_modules(m) == ["big 20480 0 - Live 0x0000000000000000"]  # 0x1400 of text: two pages


async def test_init_area_counts_while_loading(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    nursery.start_soon(m.insmod_text, "slow.py", SLOW_INIT)
    await settle(0.5)
    mod = m.module("slow")
    assert mod is not None
    core, init = source_layout(mod)
    assert (core, init) == (16384, 8192)
    assert proc_modules(m) == ["slow 24576 0 - Loading 0x0000000000000000"]
    await settle(1)
    assert proc_modules(m) == ["slow 16384 0 - Live 0x0000000000000000"]

