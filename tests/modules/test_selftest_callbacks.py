"""test-callbacks.sh of the kernel's livepatch selftests, case by case, on the
shipped Python modules: the kernel log of each case equals the script's
check_result text line for line.  The 6.1 script tree runs on the 6.1 and
6.14 profiles, the 6.12 tree on 6.14.
"""

from __future__ import annotations

import trio
import trio.testing

from modules.klp_selftest import Selftest, runs
from profiles.conftest import autojump_clock  # noqa: F401

SCRIPT = "test-callbacks.sh"
MOD_LIVEPATCH = "test_klp_callbacks_demo"
MOD_LIVEPATCH2 = "test_klp_callbacks_demo2"
MOD_TARGET = "test_klp_callbacks_mod"
MOD_TARGET_BUSY = "test_klp_callbacks_busy"


def selftest(nursery: trio.Nursery, run: tuple[str, str]) -> Selftest:
    tree, profile = run
    return Selftest(nursery, tree, profile, SCRIPT)


@runs()
async def test_target_module_before_livepatch(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                              run: tuple[str, str]) -> None:
    """Target loaded first: its callbacks run with the patch's enable and disable."""
    st = selftest(nursery, run)
    st.start_test("target module before livepatch")

    await st.load_mod(MOD_TARGET)
    await st.load_lp(MOD_LIVEPATCH)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)
    await st.unload_mod(MOD_TARGET)

    st.check_result()


@runs()
async def test_module_coming_notifier(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                      run: tuple[str, str]) -> None:
    """Livepatch first: the target's pre/post-patch callbacks run as it comes."""
    st = selftest(nursery, run)
    st.start_test("module_coming notifier")

    await st.load_lp(MOD_LIVEPATCH)
    await st.load_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)
    await st.unload_mod(MOD_TARGET)

    st.check_result()


@runs()
async def test_module_going_notifier(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                     run: tuple[str, str]) -> None:
    """The target unloaded while patched: its pre/post-unpatch callbacks run as it goes."""
    st = selftest(nursery, run)
    st.start_test("module_going notifier")

    await st.load_mod(MOD_TARGET)
    await st.load_lp(MOD_LIVEPATCH)
    await st.unload_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_module_coming_and_module_going_notifiers(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                                        run: tuple[str, str]) -> None:
    st = selftest(nursery, run)
    st.start_test("module_coming and module_going notifiers")

    await st.load_lp(MOD_LIVEPATCH)
    await st.load_mod(MOD_TARGET)
    await st.unload_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_target_module_not_present(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                         run: tuple[str, str]) -> None:
    """Only vmlinux's callbacks run when no target module is ever loaded."""
    st = selftest(nursery, run)
    st.start_test("target module not present")

    await st.load_lp(MOD_LIVEPATCH)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_pre_patch_callback_enodev(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                         run: tuple[str, str]) -> None:
    """vmlinux's pre-patch callback fails: the livepatch module's load fails with it."""
    st = selftest(nursery, run)
    st.start_test("pre-patch callback -ENODEV")

    await st.load_mod(MOD_TARGET)
    await st.load_failing_mod(MOD_LIVEPATCH, "pre_patch_ret=-19")
    await st.unload_mod(MOD_TARGET)

    st.check_result()


@runs()
async def test_module_coming_pre_patch_callback_enodev(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                                       run: tuple[str, str]) -> None:
    """The pre-patch callback fails for a coming module: the module loader refuses it."""
    st = selftest(nursery, run)
    st.start_test("module_coming + pre-patch callback -ENODEV")

    await st.load_lp(MOD_LIVEPATCH)
    await st.set_pre_patch_ret(MOD_LIVEPATCH, "-19")
    await st.load_failing_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_multiple_target_modules(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                       run: tuple[str, str]) -> None:
    """The busy module's work function returns at once: the transition completes quickly."""
    st = selftest(nursery, run)
    st.start_test("multiple target modules")

    await st.load_mod(MOD_TARGET_BUSY, "block_transition=N")
    await st.load_lp(MOD_LIVEPATCH)
    await st.load_mod(MOD_TARGET)
    await st.unload_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)
    await st.unload_mod(MOD_TARGET_BUSY)

    st.check_result()


@runs()
async def test_busy_target_module(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                  run: tuple[str, str]) -> None:
    """A worker sits in a to-be-patched function: the transition stalls, so no post-patch
    callbacks run, and disabling reverses it."""
    st = selftest(nursery, run)
    st.start_test("busy target module")

    await st.load_mod(MOD_TARGET_BUSY, "block_transition=Y")
    await st.load_lp_nowait(MOD_LIVEPATCH)

    # Wait until the livepatch reports in-transition state, i.e. that it's
    # stalled on test_klp_callbacks_busy's busymod_work_func().
    await st.wait_transition(MOD_LIVEPATCH, "1", "failed to stall transition")

    await st.load_mod(MOD_TARGET)
    await st.unload_mod(MOD_TARGET)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH)
    await st.unload_mod(MOD_TARGET_BUSY)

    st.check_result()


@runs()
async def test_multiple_livepatches(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                    run: tuple[str, str]) -> None:
    st = selftest(nursery, run)
    st.start_test("multiple livepatches")

    await st.load_lp(MOD_LIVEPATCH)
    await st.load_lp(MOD_LIVEPATCH2)
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.disable_lp(MOD_LIVEPATCH)
    await st.unload_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()


@runs()
async def test_atomic_replace(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                              run: tuple[str, str]) -> None:
    """The replaced patch's unpatch callbacks never run; the replacing patch's do."""
    st = selftest(nursery, run)
    st.start_test("atomic replace")

    await st.load_lp(MOD_LIVEPATCH)
    await st.load_lp(MOD_LIVEPATCH2, "replace=1")
    await st.disable_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH2)
    await st.unload_lp(MOD_LIVEPATCH)

    st.check_result()
