"""Documentation/livepatch/callbacks.txt (4.15), tests 1-9, replayed with the
shipped sample module files: the kernel log must match line for line.

The transcripts were taken with dynamic debug on for the livepatch core's
transition messages but not for the per-task ones, so those are left out of
the comparison.  Test 6's cancel line is the code's wording (spec §8.8).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.control.samples import find_module_file
from klpfs.sysfs.kernfs import Kernfs
from klpfs.system import System

DEMO = "livepatch_callbacks_demo"
ENABLED = f"sys/kernel/livepatch/{DEMO}/enabled"
LIVE = "[MODULE_STATE_LIVE] Normal state"
COMING = "[MODULE_STATE_COMING] Full formed, running module_init"
GOING = "[MODULE_STATE_GOING] Going away"


def cb(name: str, target: str = "vmlinux", state: str = LIVE) -> str:
    return f"{DEMO}: {name}_callback: " + (target if target == "vmlinux" else f"{target} -> {state}")


def lp(text: str) -> str:
    return f"livepatch: {text}"


def transition(direction: str, *middle: str) -> list[str]:
    """initializing ... <middle> ... starting."""
    return [lp(f"'{DEMO}': initializing {direction} transition"), *middle,
            lp(f"'{DEMO}': starting {direction} transition")]


def completion(direction: str, *middle: str) -> list[str]:
    return [lp(f"'{DEMO}': completing {direction} transition"), *middle, lp(f"'{DEMO}': {direction} complete")]


MOD_INIT = "livepatch_callbacks_mod: livepatch_callbacks_mod_init"
MOD_EXIT = "livepatch_callbacks_mod: livepatch_callbacks_mod_exit"
ENABLING = lp(f"enabling patch '{DEMO}'")
APPLYING = lp(f"applying patch '{DEMO}' to loading module 'livepatch_callbacks_mod'")
REVERTING = lp(f"reverting patch '{DEMO}' on unloading module 'livepatch_callbacks_mod'")
DISABLE_VMLINUX = [*transition("unpatching", cb("pre_unpatch")),
                   *completion("unpatching", cb("post_unpatch"))]


class Story:
    def __init__(self, system: System):
        self.system = system
        self.control = Control(system)
        self.mark = 0

    async def insmod(self, name: str, *params: str) -> dict:
        path = find_module_file(name)
        assert path is not None
        return await self.control.handle({"cmd": "insmod", "path": str(path), "text": path.read_text(),
                                          "params": list(params)})

    async def rmmod(self, name: str) -> dict:
        return await self.control.handle({"cmd": "rmmod", "name": name})

    def write(self, path: str, value: str) -> int:
        return Kernfs.write(self.system.kernfs.walk(path), value.encode())

    def log(self) -> list[str]:
        """Lines since the last call, without the per-task debug lines."""
        lines = self.system.kernel.log.lines()
        new, self.mark = lines[self.mark:], len(lines)
        return [line for line in new if "klp_try_switch_task" not in line and "klp_check_stack" not in line]


@pytest.fixture
async def story(system: System) -> Story:
    s = Story(system)
    await s.insmod("livepatch-sample")
    s.write("sys/kernel/livepatch/livepatch_sample/enabled", "0")
    await trio.sleep(2)
    assert (await s.rmmod("livepatch_sample"))["ok"]
    s.log()  # the TAINT_LIVEPATCH line is printed once per boot; start after it
    return s


async def test_1_target_loaded_first(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    assert (await story.insmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [MOD_INIT]
    assert (await story.insmod("livepatch-callbacks-demo"))["ok"]
    await trio.sleep(2)
    assert story.log() == [ENABLING,
                           *transition("patching", cb("pre_patch"), cb("pre_patch", "livepatch_callbacks_mod")),
                           *completion("patching", cb("post_patch"), cb("post_patch", "livepatch_callbacks_mod"))]
    assert story.write(ENABLED, "0\n") == 2
    await trio.sleep(2)
    assert story.log() == [*transition("unpatching", cb("pre_unpatch"), cb("pre_unpatch", "livepatch_callbacks_mod")),
                           *completion("unpatching", cb("post_unpatch"), cb("post_unpatch", "livepatch_callbacks_mod"))]
    assert (await story.rmmod("livepatch-callbacks-demo"))["ok"]
    assert (await story.rmmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [MOD_EXIT]


async def test_2_livepatch_loaded_first(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    assert (await story.insmod("livepatch-callbacks-demo"))["ok"]
    await trio.sleep(2)
    assert story.log() == [ENABLING, *transition("patching", cb("pre_patch")),
                           *completion("patching", cb("post_patch"))]
    assert (await story.insmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [APPLYING, cb("pre_patch", "livepatch_callbacks_mod", COMING),
                           cb("post_patch", "livepatch_callbacks_mod", COMING), MOD_INIT]
    story.write(ENABLED, "0\n")
    await trio.sleep(2)
    assert story.log() == [*transition("unpatching", cb("pre_unpatch"), cb("pre_unpatch", "livepatch_callbacks_mod")),
                           *completion("unpatching", cb("post_unpatch"), cb("post_unpatch", "livepatch_callbacks_mod"))]
    assert (await story.rmmod("livepatch-callbacks-demo"))["ok"]
    assert (await story.rmmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [MOD_EXIT]


@pytest.mark.parametrize("demo_first", [False, True], ids=["test_3", "test_4"])
async def test_3_4_target_unloaded_while_enabled(story: Story, demo_first: bool,
                                                 autojump_clock: trio.testing.MockClock) -> None:
    if demo_first:
        await story.insmod("livepatch-callbacks-demo")
        await trio.sleep(2)
        await story.insmod("livepatch-callbacks-mod")
    else:
        await story.insmod("livepatch-callbacks-mod")
        await story.insmod("livepatch-callbacks-demo")
        await trio.sleep(2)
    story.log()
    assert (await story.rmmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [MOD_EXIT, cb("pre_unpatch", "livepatch_callbacks_mod", GOING), REVERTING,
                           cb("post_unpatch", "livepatch_callbacks_mod", GOING)]
    story.write(ENABLED, "0\n")
    await trio.sleep(2)
    assert story.log() == DISABLE_VMLINUX


async def test_5_target_never_loaded(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    await story.insmod("livepatch-callbacks-demo")
    await trio.sleep(2)
    assert story.log() == [ENABLING, *transition("patching", cb("pre_patch")),
                           *completion("patching", cb("post_patch"))]
    story.write(ENABLED, "0\n")
    await trio.sleep(2)
    assert story.log() == DISABLE_VMLINUX
    assert (await story.rmmod("livepatch-callbacks-demo"))["ok"]


async def test_6_vmlinux_pre_patch_fails(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    await story.insmod("livepatch-callbacks-mod")
    story.log()
    reply = await story.insmod("livepatch-callbacks-demo", "pre_patch_ret=-19")
    assert reply == {"ok": False, "errno": 19, "error": "No such device"}
    assert story.log() == [ENABLING, lp(f"'{DEMO}': initializing patching transition"), cb("pre_patch"),
                           lp("pre-patch callback failed for object 'vmlinux'"),
                           lp(f"failed to enable patch '{DEMO}'"),
                           lp(f"'{DEMO}': canceling patching transition, going to unpatch"),
                           *completion("unpatching")]
    assert story.system.kernfs.walk(f"sys/kernel/livepatch/{DEMO}") is None
    assert story.system.kernel.modules.find_module(DEMO) is None
    assert (await story.rmmod("livepatch-callbacks-mod"))["ok"]
    assert story.log() == [MOD_EXIT]


async def test_7_module_pre_patch_fails(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    await story.insmod("livepatch-callbacks-demo")
    await trio.sleep(2)
    story.log()
    param = story.system.kernfs.walk(f"sys/module/{DEMO}/parameters/pre_patch_ret")
    assert Kernfs.write(param, b"-19\n") == 4
    reply = await story.insmod("livepatch-callbacks-mod")
    assert reply["errno"] == 19
    assert story.log() == [APPLYING, cb("pre_patch", "livepatch_callbacks_mod", COMING),
                           lp("pre-patch callback failed for object 'livepatch_callbacks_mod'"),
                           lp(f"patch '{DEMO}' failed for module 'livepatch_callbacks_mod', "
                              "refusing to load module 'livepatch_callbacks_mod'")]
    story.write(ENABLED, "0\n")
    await trio.sleep(2)
    assert story.log() == DISABLE_VMLINUX


async def test_8_busy_module_quick(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    await story.insmod("livepatch-callbacks-busymod", "sleep_secs=0")
    await trio.sleep(0.5)
    assert story.log() == ["livepatch_callbacks_busymod: livepatch_callbacks_mod_init",
                           "livepatch_callbacks_busymod: busymod_work_func, sleeping 0 seconds ...",
                           "livepatch_callbacks_busymod: busymod_work_func exit"]
    await story.insmod("livepatch-callbacks-demo")
    await trio.sleep(2)
    busy = "livepatch_callbacks_busymod"
    assert story.log() == [ENABLING, *transition("patching", cb("pre_patch"), cb("pre_patch", busy)),
                           *completion("patching", cb("post_patch"), cb("post_patch", busy))]
    story.write(ENABLED, "0\n")
    await trio.sleep(2)
    assert story.log() == [*transition("unpatching", cb("pre_unpatch"), cb("pre_unpatch", busy)),
                           *completion("unpatching", cb("post_unpatch"), cb("post_unpatch", busy))]
    await story.rmmod("livepatch-callbacks-demo")
    assert (await story.rmmod("livepatch-callbacks-busymod"))["ok"]
    assert story.log() == ["livepatch_callbacks_busymod: livepatch_callbacks_mod_exit"]


async def test_9_busy_module_holds_the_transition(story: Story, autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    await story.insmod("livepatch-callbacks-busymod", "sleep_secs=30")
    await trio.sleep(0.5)
    assert story.log() == ["livepatch_callbacks_busymod: livepatch_callbacks_mod_init",
                           "livepatch_callbacks_busymod: busymod_work_func, sleeping 30 seconds ..."]
    await story.insmod("livepatch-callbacks-demo")
    await trio.sleep(2)
    busy = "livepatch_callbacks_busymod"
    assert story.log() == [ENABLING, *transition("patching", cb("pre_patch"), cb("pre_patch", busy))]
    assert Kernfs.read(story.system.kernfs.walk(f"sys/kernel/livepatch/{DEMO}/transition"), 0, 9) == b"1\n"
    await story.insmod("livepatch-callbacks-mod")
    assert story.log() == [APPLYING, cb("pre_patch", "livepatch_callbacks_mod", COMING), MOD_INIT]
    await story.rmmod("livepatch-callbacks-mod")
    assert story.log() == [MOD_EXIT, REVERTING, cb("post_unpatch", "livepatch_callbacks_mod", GOING)]
    assert story.write(ENABLED, "0\n") == 2
    await trio.sleep(2)
    assert story.log() == [lp(f"'{DEMO}': reversing transition from patching to unpatching"),
                           lp(f"'{DEMO}': starting unpatching transition"),
                           *completion("unpatching", cb("post_unpatch"), cb("post_unpatch", busy))]
    assert (await story.rmmod("livepatch-callbacks-demo"))["ok"]
    # rmmod waits for the work (cancel_delayed_work_sync) before the exit runs.
    assert (await story.rmmod("livepatch-callbacks-busymod"))["ok"]
    assert trio.current_time() - start == pytest.approx(30, abs=0.1)
    assert story.log() == ["livepatch_callbacks_busymod: busymod_work_func exit",
                           "livepatch_callbacks_busymod: livepatch_callbacks_mod_exit"]
