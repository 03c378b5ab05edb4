"""test-shadow-vars.sh of the kernel's livepatch selftests on the shipped
Python module test_klp_shadow_vars: the kernel log equals the script's
check_result text line for line, PTR numbers included.  The 6.1 script tree
runs on the 6.1 and 6.14 profiles, the 6.12 tree on 6.14.

The module numbers every pointer it prints by first appearance (ptr_id():
PTR0 is NULL, then each new object, shadow variable, constructor and
destructor in the order they are printed), so the lines check that the
shadow API hands back the very data it allocated, finds it again by
<obj, id>, and calls constructors and destructors with the right pointers.
"""

from __future__ import annotations

import re

import trio

from modules.klp_selftest import Selftest, runs
from profiles.conftest import autojump_clock  # noqa: F401

SCRIPT = "test-shadow-vars.sh"
MOD_TEST = "test_klp_shadow_vars"
SV_ID1, SV_ID2 = 0x1234, 0x1235


def selftest(nursery: trio.Nursery, run: tuple[str, str]) -> Selftest:
    tree, profile = run
    return Selftest(nursery, tree, profile, SCRIPT)


@runs()
async def test_basic_shadow_variable_api(nursery, autojump_clock, run) -> None:
    """load a module that exercises the shadow variable API"""
    st = selftest(nursery, run)
    st.start_test("basic shadow variable API")

    await st.load_mod(MOD_TEST)
    await st.unload_mod(MOD_TEST)

    st.check_result()


@runs()
async def test_every_shadow_variable_is_freed(nursery, autojump_clock, run) -> None:
    """Pass 4 frees the <obj, SV_ID1> variables one by one (the destructor runs
    for each), pass 6 the SV_ID2 ones at once: nothing is left in the table."""
    st = selftest(nursery, run)
    await st.load_mod(MOD_TEST)
    assert len(st.m.lp.shadow) == 0
    await st.unload_mod(MOD_TEST)


@runs()
async def test_ptr_numbering(nursery, autojump_clock, run) -> None:
    """The PTR numbers name distinct pointers consistently: the three objects are
    PTR1, PTR9 and PTR14; each object's two variables and the fields their
    constructors stored are distinct; the constructor (PTR4) and destructor
    (PTR17) are one pointer each; NULL is PTR0."""
    st = selftest(nursery, run)
    st.start_test("basic shadow variable API")
    await st.load_mod(MOD_TEST)
    lines = [line.removeprefix(f"{MOD_TEST}: ") for line in st.result()[1:]]

    def ptrs(pattern: str) -> list[tuple[int, ...]]:
        return [tuple(int(g) for g in m.groups()) for line in lines if (m := re.fullmatch(pattern, line))]

    alloc = ptrs(r"klp_shadow_(?:get_or_)?alloc\(obj=PTR(\d+), id=0x(?:1234|1235), size=8, "
                 r"gfp_flags=GFP_KERNEL\), ctor=PTR(\d+), ctor_data=PTR(\d+) = PTR(\d+)")
    ctor = ptrs(r"shadow_ctor: PTR(\d+) -> PTR(\d+)")
    dtor = ptrs(r"shadow_dtor\(obj=PTR(\d+), shadow_data=PTR(\d+)\)")
    free = ptrs(r"klp_shadow_free\(obj=PTR(\d+), id=0x1234, dtor=PTR(\d+)\)")
    free_all = ptrs(r"klp_shadow_free_all\(id=0x1235, dtor=PTR(\d+)\)")

    # Pass 1 allocates six variables, each through the constructor, which stores
    # the field pointer (ctor_data) in the new data (the returned pointer).
    assert [(o, c, d, v) for o, c, d, v in alloc[:6]] == [
        (1, 4, 2, 3), (1, 4, 5, 6), (9, 4, 7, 8), (9, 4, 10, 11), (14, 4, 12, 13), (14, 4, 15, 16)]
    assert ctor == [(v, d) for _, _, d, v in alloc[:6]]
    # Pass 3: get_or_alloc finds the SV_ID1 variables; the constructor does not run.
    assert alloc[6:] == [(1, 4, 2, 3), (9, 4, 7, 8), (14, 4, 12, 13)]
    # Pass 4: the destructor gets each object and its SV_ID1 data back.
    assert dtor == [(1, 3), (9, 8), (14, 13)]
    assert free == [(1, 17), (9, 17), (14, 17)]
    # Pass 6: no destructor (NULL).
    assert free_all == [(0,)]
    await st.unload_mod(MOD_TEST)


@runs()
async def test_loading_twice_numbers_afresh(nursery, autojump_clock, run) -> None:
    """Each load of the module has its own static data (ptr_id()'s count and
    list), so a second load in the same boot prints the same lines."""
    st = selftest(nursery, run)
    for _ in range(2):
        st.start_test("basic shadow variable API")
        await st.load_mod(MOD_TEST)
        await st.unload_mod(MOD_TEST)
        st.check_result()
