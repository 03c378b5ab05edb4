"""test-livepatch.sh of the kernel's livepatch selftests, case by case, on the
shipped Python modules: the kernel log of each case equals the script's
check_result text line for line.  The 6.1 script tree runs on the 6.1 and
6.14 profiles, the 6.12 tree on 6.14.

The module function patching cases (test_klp_mod_target and its patch
test_klp_mod_patch) are in neither tree; their expected lines are written
here, with the load commands in the form of the tree the case runs with.
"""

from __future__ import annotations

import trio
import trio.testing

from modules.klp_selftest import Selftest, runs
from profiles.conftest import autojump_clock  # noqa: F401

SCRIPT = "test-livepatch.sh"
MOD_LIVEPATCH = "test_klp_livepatch"
"""$MOD_LIVEPATCH in the 6.1 tree, $MOD_LIVEPATCH1 in the 6.12 tree."""
MOD_REPLACE = "test_klp_atomic_replace"
MOD_SYSCALL = "test_klp_syscall"
MOD_DEMO = "test_klp_callbacks_demo"
MOD_TARGET = "test_klp_mod_target"
MOD_TARGET_PATCH = "test_klp_mod_patch"
PATCHED = "this has been live patched"


def selftest(nursery: trio.Nursery, run: tuple[str, str]) -> Selftest:
    tree, profile = run
    return Selftest(nursery, tree, profile, SCRIPT)


async def grep_live_patched(st: Selftest) -> None:
    """grep 'live patched' /proc/cmdline > /dev/kmsg; the same of /proc/meminfo."""
    await st.grep_to_kmsg("live patched", "cmdline_proc_show")
    await st.grep_to_kmsg("live patched", "meminfo_proc_show")


@runs()
async def test_basic_function_patching(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                       run: tuple[str, str]) -> None:
    st = selftest(nursery, run)
    lp = MOD_LIVEPATCH
    original = await st.cat_cmdline()
    st.start_test("basic function patching")

    await st.load_lp(lp)
    assert await st.cat_cmdline() == f"{lp}: {PATCHED}"

    await st.disable_lp(lp)
    await st.unload_lp(lp)
    assert await st.cat_cmdline() == original

    st.check_result()


@runs()
async def test_multiple_livepatches(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                    run: tuple[str, str]) -> None:
    st = selftest(nursery, run)
    lp = MOD_LIVEPATCH
    st.start_test("multiple livepatches")

    await st.load_lp(lp)
    await grep_live_patched(st)

    await st.load_lp(MOD_REPLACE, "replace=0")
    await grep_live_patched(st)

    await st.disable_lp(MOD_REPLACE)
    await st.unload_lp(MOD_REPLACE)
    await grep_live_patched(st)

    await st.disable_lp(lp)
    await st.unload_lp(lp)
    await grep_live_patched(st)

    st.check_result()


@runs()
async def test_atomic_replace_livepatch(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                        run: tuple[str, str]) -> None:
    st = selftest(nursery, run)
    lp = MOD_LIVEPATCH
    st.start_test("atomic replace livepatch")

    await st.load_lp(lp)
    await grep_live_patched(st)

    if st.tree == "6.1":
        await st.load_lp(MOD_REPLACE, "replace=1")
        await grep_live_patched(st)

        await st.unload_lp(lp)
        await grep_live_patched(st)
    else:
        # 6.12: two more livepatches, all three replaced by the atomic replace one.
        for mod in (MOD_SYSCALL, MOD_DEMO):
            await st.load_lp(mod)
        assert len(st.livepatches()) == 3

        await st.load_lp(MOD_REPLACE, "replace=1")
        await grep_live_patched(st)

        await st.loop_until(lambda: len(st.livepatches()) == 1, "Expecting only one moduled listed")
        # These modules were disabled by the atomic replace.
        for mod in (MOD_DEMO, MOD_SYSCALL, lp):
            await st.unload_lp(mod)
        await grep_live_patched(st)

    await st.disable_lp(MOD_REPLACE)
    await st.unload_lp(MOD_REPLACE)
    await grep_live_patched(st)

    st.check_result()


# -- test_klp_mod_target and test_klp_mod_patch ------------------------------------------

def command(st: Selftest, mod: str) -> str:
    """The load command's log line in the tree's form."""
    return f"% modprobe {mod}" if st.tree == "6.1" else f"% insmod test_modules/{mod}.ko"


def patching(mod: str) -> list[str]:
    return [f"livepatch: enabling patch '{mod}'",
            f"livepatch: '{mod}': initializing patching transition",
            f"livepatch: '{mod}': starting patching transition",
            f"livepatch: '{mod}': completing patching transition",
            f"livepatch: '{mod}': patching complete"]


def unpatching(mod: str) -> list[str]:
    return [f"% echo 0 > /sys/kernel/livepatch/{mod}/enabled",
            f"livepatch: '{mod}': initializing unpatching transition",
            f"livepatch: '{mod}': starting unpatching transition",
            f"livepatch: '{mod}': completing unpatching transition",
            f"livepatch: '{mod}': unpatching complete"]


def proc_target(st: Selftest) -> str:
    """`$(cat /proc/test_klp_mod_target)`, read through the kernfs tree."""
    return st.cat(f"proc/{MOD_TARGET}").rstrip("\n")


@runs()
async def test_module_function_patching(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                        run: tuple[str, str]) -> None:
    """Target module loaded first: klp_enable_patch patches its show function."""
    st = selftest(nursery, run)
    st.start_test("module function patching")

    await st.load_mod(MOD_TARGET)
    assert proc_target(st) == f"{MOD_TARGET}: original output"

    await st.load_lp(MOD_TARGET_PATCH)
    assert proc_target(st) == f"{MOD_TARGET_PATCH}: {PATCHED}"

    await st.disable_lp(MOD_TARGET_PATCH)
    await st.unload_lp(MOD_TARGET_PATCH)
    assert proc_target(st) == f"{MOD_TARGET}: original output"

    await st.unload_mod(MOD_TARGET)
    assert not st.exists(f"proc/{MOD_TARGET}")

    assert st.result() == [
        command(st, MOD_TARGET),
        f"{MOD_TARGET}: test_klp_mod_target_init",
        command(st, MOD_TARGET_PATCH),
        *patching(MOD_TARGET_PATCH),
        *unpatching(MOD_TARGET_PATCH),
        f"% rmmod {MOD_TARGET_PATCH}",
        f"% rmmod {MOD_TARGET}",
        f"{MOD_TARGET}: test_klp_mod_target_exit",
    ]


@runs()
async def test_module_function_patching_livepatch_first(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
                                                        run: tuple[str, str]) -> None:
    """Livepatch loaded first: the module coming notifier patches the target as it loads."""
    st = selftest(nursery, run)
    st.start_test("module function patching (livepatch first)")

    await st.load_lp(MOD_TARGET_PATCH)
    await st.load_mod(MOD_TARGET)
    assert proc_target(st) == f"{MOD_TARGET_PATCH}: {PATCHED}"

    await st.disable_lp(MOD_TARGET_PATCH)
    await st.unload_lp(MOD_TARGET_PATCH)
    assert proc_target(st) == f"{MOD_TARGET}: original output"

    await st.unload_mod(MOD_TARGET)

    assert st.result() == [
        command(st, MOD_TARGET_PATCH),
        *patching(MOD_TARGET_PATCH),
        command(st, MOD_TARGET),
        f"livepatch: applying patch '{MOD_TARGET_PATCH}' to loading module '{MOD_TARGET}'",
        f"{MOD_TARGET}: test_klp_mod_target_init",
        *unpatching(MOD_TARGET_PATCH),
        f"% rmmod {MOD_TARGET_PATCH}",
        f"% rmmod {MOD_TARGET}",
        f"{MOD_TARGET}: test_klp_mod_target_exit",
    ]
