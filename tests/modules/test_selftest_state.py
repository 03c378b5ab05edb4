"""test-state.sh of the kernel's livepatch selftests, case by case, on the
shipped Python modules test_klp_state, test_klp_state2 and test_klp_state3:
the kernel log of each case equals the script's check_result text line for
line.  The 6.1 script tree runs on the 6.1 and 6.14 profiles, the 6.12 tree
on 6.14.

Then what the cases rely on, checked directly: the system state the
callbacks change (console_loglevel) and how a cumulative patch finds the
state of the patch it replaces (klp_get_prev_state) across module loads.
"""

from __future__ import annotations

from typing import Any

import trio

from klpfs.control.shims import mod_strerror
from klpfs.control.samples import find_module_file
from klpfs.kernel.printk import CONSOLE_LOGLEVEL_DEFAULT, CONSOLE_LOGLEVEL_MOTORMOUTH
from klpfs.livepatch.structs import KlpState

from modules.klp_selftest import Selftest, runs
from profiles.conftest import autojump_clock  # noqa: F401

SCRIPT = "test-state.sh"
MOD_LIVEPATCH = "test_klp_state"
MOD_LIVEPATCH2 = "test_klp_state2"
MOD_LIVEPATCH3 = "test_klp_state3"
CONSOLE_LOGLEVEL_STATE = 1


class StateSelftest(Selftest):
    """The shared replay, with insmod's own words for a refused module (6.12 tree)."""

    def _tool_error(self, mod: str, reply: dict[str, Any]) -> str:
        """modprobe prints strerror(); kmod's insmod has its own text for some
        errnos (EINVAL: "Invalid parameters")."""
        if self.tree == "6.1":
            return f"modprobe: ERROR: could not insert '{mod}': {reply['error']}"
        return f"insmod: ERROR: could not insert module test_modules/{mod}.ko: {mod_strerror(reply['errno'])}"


def selftest(nursery: trio.Nursery, run: tuple[str, str]) -> StateSelftest:
    tree, profile = run
    return StateSelftest(nursery, tree, profile, SCRIPT)


def loglevel(st: Selftest) -> int:
    """console_loglevel of the emulated kernel."""
    return st.m.kernel.log.console_printk[0]


def state_of(st: Selftest, mod: str) -> KlpState:
    """The CONSOLE_LOGLEVEL_STATE entry of a loaded patch module's klp_patch."""
    patch = st.m.patch(mod)
    return next(s for s in patch.states if s.id == CONSOLE_LOGLEVEL_STATE)


# -- the script's cases ---------------------------------------------------------------------------

@runs()
async def test_system_state_modification(nursery, autojump_clock, run) -> None:
    """Load and remove a module that modifies the system state."""
    st = selftest(nursery, run)
    st.start_test("system state modification")

    await st.load_lp(MOD_LIVEPATCH)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_taking_over_system_state_modification(nursery, autojump_clock, run) -> None:
    """Take over system state change by a cumulative patch."""
    st = selftest(nursery, run)
    st.start_test("taking over system state modification")

    await st.load_lp(MOD_LIVEPATCH)
    await st.load_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH)
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH2)

    st.check_result()


@runs()
async def test_compatible_cumulative_livepatches(nursery, autojump_clock, run) -> None:
    """Take over system state change by a cumulative patch, and back."""
    st = selftest(nursery, run)
    st.start_test("compatible cumulative livepatches")

    await st.load_lp(MOD_LIVEPATCH2)
    await st.load_lp(MOD_LIVEPATCH3)
    await st.unload_lp(MOD_LIVEPATCH2)
    await st.load_lp(MOD_LIVEPATCH2)
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH3)

    st.check_result()


@runs()
async def test_incompatible_cumulative_livepatches(nursery, autojump_clock, run) -> None:
    """Failure caused by incompatible cumulative livepatches (a state downgrade)."""
    st = selftest(nursery, run)
    st.start_test("incompatible cumulative livepatches")

    await st.load_lp(MOD_LIVEPATCH2)
    await st.load_failing_mod(MOD_LIVEPATCH)
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH2)

    st.check_result()


@runs()
async def test_whole_script_in_one_boot(nursery, autojump_clock, run) -> None:
    """The four cases one after another on one machine, as the script runs them:
    each leaves nothing behind that changes the next one's log."""
    st = selftest(nursery, run)
    cases = [
        ("system state modification", [
            ("load_lp", MOD_LIVEPATCH), ("disable_lp", MOD_LIVEPATCH), ("unload_lp", MOD_LIVEPATCH)]),
        ("taking over system state modification", [
            ("load_lp", MOD_LIVEPATCH), ("load_lp", MOD_LIVEPATCH2), ("unload_lp", MOD_LIVEPATCH),
            ("disable_lp", MOD_LIVEPATCH2), ("unload_lp", MOD_LIVEPATCH2)]),
        ("compatible cumulative livepatches", [
            ("load_lp", MOD_LIVEPATCH2), ("load_lp", MOD_LIVEPATCH3), ("unload_lp", MOD_LIVEPATCH2),
            ("load_lp", MOD_LIVEPATCH2), ("disable_lp", MOD_LIVEPATCH2), ("unload_lp", MOD_LIVEPATCH2),
            ("unload_lp", MOD_LIVEPATCH3)]),
        ("incompatible cumulative livepatches", [
            ("load_lp", MOD_LIVEPATCH2), ("load_failing_mod", MOD_LIVEPATCH), ("disable_lp", MOD_LIVEPATCH2),
            ("unload_lp", MOD_LIVEPATCH2)]),
    ]
    for title, steps in cases:
        st.start_test(title)
        for helper, mod in steps:
            await getattr(st, helper)(mod)
        st.check_result()
        assert loglevel(st) == CONSOLE_LOGLEVEL_DEFAULT
    assert st.m.kernel.modules.modules == {}
    assert st.livepatches() == []


# -- the system state across module loads ----------------------------------------------------------

@runs()
async def test_console_loglevel_is_changed_and_restored(nursery, autojump_clock, run) -> None:
    """post_patch saves console_loglevel in the state's data and raises it to
    CONSOLE_LOGLEVEL_MOTORMOUTH; pre_unpatch puts the saved value back."""
    st = selftest(nursery, run)
    assert loglevel(st) == CONSOLE_LOGLEVEL_DEFAULT == 7

    await st.load_lp(MOD_LIVEPATCH)
    assert loglevel(st) == CONSOLE_LOGLEVEL_MOTORMOUTH == 15
    state = state_of(st, MOD_LIVEPATCH)
    assert (state.version, state.data.size, state.data.value) == (1, 4, 7)

    await st.disable_lp(MOD_LIVEPATCH)
    assert loglevel(st) == 7
    await st.unload_lp(MOD_LIVEPATCH)


@runs()
async def test_cumulative_patches_hand_the_state_data_on(nursery, autojump_clock, run) -> None:
    """klp_get_prev_state() during a replace patch's transition finds the state of
    the patch being replaced: the new patch takes over its data (the same
    allocation, not a copy) and leaves console_loglevel alone, through a
    chain of module loads state2 -> state3 -> state2 again."""
    st = selftest(nursery, run)

    await st.load_lp(MOD_LIVEPATCH2)
    first = state_of(st, MOD_LIVEPATCH2)
    assert (first.version, first.data.value, loglevel(st)) == (2, 7, 15)

    await st.load_lp(MOD_LIVEPATCH3)
    third = state_of(st, MOD_LIVEPATCH3)
    assert third.data is first.data
    assert loglevel(st) == 15

    await st.unload_lp(MOD_LIVEPATCH2)
    await st.load_lp(MOD_LIVEPATCH2)
    again = state_of(st, MOD_LIVEPATCH2)
    assert again is not first  # a new load: the module's structures are new
    assert again.data is first.data
    assert loglevel(st) == 15

    await st.disable_lp(MOD_LIVEPATCH2)
    assert loglevel(st) == 7
    await st.unload_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH3)


@runs()
async def test_refused_downgrade_leaves_the_installed_state(nursery, autojump_clock, run) -> None:
    """A patch that would downgrade a state is refused by klp_enable_patch
    before any of its callbacks runs: the installed patch keeps its state data
    and console_loglevel stays changed."""
    st = selftest(nursery, run)
    st.start_test("incompatible cumulative livepatches")

    await st.load_lp(MOD_LIVEPATCH2)
    installed = state_of(st, MOD_LIVEPATCH2)
    await st.load_failing_mod(MOD_LIVEPATCH)
    assert st.m.module(MOD_LIVEPATCH) is None
    assert state_of(st, MOD_LIVEPATCH2) is installed
    assert (installed.data.value, loglevel(st)) == (7, 15)
    assert st.result()[-2:] == [
        f"livepatch: Livepatch patch ({MOD_LIVEPATCH}) is not compatible with the already installed livepatches.",
        (f"modprobe: ERROR: could not insert '{MOD_LIVEPATCH}': Invalid argument" if st.tree == "6.1" else
         f"insmod: ERROR: could not insert module test_modules/{MOD_LIVEPATCH}.ko: Invalid parameters"),
    ]
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH2)


def test_state3_is_state2_included() -> None:
    """test_klp_state3.c is `#include "test_klp_state2.c"`: below their header
    comments the two Python files are the same source."""
    def body(name: str) -> list[str]:
        path = find_module_file(name)
        assert path is not None
        lines = path.read_text().splitlines()
        return lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):]

    assert body(MOD_LIVEPATCH3) == body(MOD_LIVEPATCH2)
