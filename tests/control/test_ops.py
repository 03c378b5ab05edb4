"""The control operations against a running system, as the CLI's daemon runs them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.control.samples import find_module_file
from klpfs.livepatch.debug import livepatch_debug
from klpfs.system import System

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
"""The TOML versions of the kernel's samples, kept as examples of the format."""


async def handle(system: System, cmd: str, **args: object) -> dict:
    return await Control(system).handle({"cmd": cmd, **args})


async def insmod(system: System, name: str, *params: str, text: str | None = None) -> dict:
    path = find_module_file(name)
    return await handle(system, "insmod", path=str(path or name), text=text or path.read_text(),
                        params=list(params))


async def test_insmod_lsmod_rmmod(system: System, autojump_clock: trio.testing.MockClock) -> None:
    assert await insmod(system, "livepatch-sample") == {"ok": True, "name": "livepatch_sample"}
    assert await insmod(system, "livepatch-sample") == {"ok": False, "errno": errno.EEXIST,
                                                        "error": "File exists"}
    lsmod = await handle(system, "lsmod")
    # A page each of text, read-only data, data and symbols, as a small module on 6.1.
    assert lsmod["modules"] == [{"name": "livepatch_sample", "size": 16384, "refcnt": 1}]
    assert await handle(system, "rmmod", name="livepatch-sample.ko") == {
        "ok": False, "errno": errno.EWOULDBLOCK, "error": "Resource temporarily unavailable",
        "in_use": True, "name": "livepatch_sample"}
    await trio.sleep(2)
    system.livepatch.klp_disable_patch(system.kernel.modules.find_module("livepatch_sample").data["patch"])
    await trio.sleep(2)
    assert await handle(system, "rmmod", name="livepatch_sample") == {"ok": True, "name": "livepatch_sample"}
    assert (await handle(system, "rmmod", name="livepatch_sample"))["not_loaded"] is True


async def test_bad_file_changes_nothing(system: System, autojump_clock: trio.testing.MockClock) -> None:
    before = system.kernel.log.lines()
    reply = await insmod(system, "/tmp/x.toml", text="[module]\nname = 1\n")
    assert reply["errno"] == errno.ENOEXEC and reply["file_error"] is True
    assert reply["error"] == "/tmp/x.toml: module.name: must be a str, not 1"
    assert system.kernel.modules.modules == {} and system.kernel.log.lines() == before


@pytest.mark.parametrize("system", ["4.16"], indirect=True)
async def test_immediate_is_refused_on_4_16(system: System, autojump_clock: trio.testing.MockClock) -> None:
    example = EXAMPLES / "livepatch-sample.toml"
    text = example.read_text().replace("[[patch.object]]", "[patch]\nimmediate = true\n\n[[patch.object]]")
    reply = await insmod(system, str(example), text=text)
    assert reply["file_error"] and "immediate was removed in 4.16 (this is 4.16)" in reply["error"]
    assert system.kernel.modules.modules == {}


async def test_module_parameters(system: System, autojump_clock: trio.testing.MockClock) -> None:
    reply = await insmod(system, "livepatch-callbacks-busymod", "sleep_secs=zz")
    assert reply["errno"] == errno.EINVAL
    assert system.kernel.log.lines()[-1] == "livepatch_callbacks_busymod: `zz' invalid for parameter `sleep_secs'"
    assert system.kernel.modules.modules == {}
    assert (await insmod(system, "livepatch-callbacks-busymod", "bogus=1", "sleep_secs=0x3"))["ok"]
    assert "livepatch_callbacks_busymod: unknown parameter 'bogus' ignored" in system.kernel.log.lines()
    await trio.sleep(0.1)
    assert "livepatch_callbacks_busymod: busymod_work_func, sleeping 3 seconds ..." in system.kernel.log.lines()


async def test_tasks_and_calls(system: System, autojump_clock: trio.testing.MockClock) -> None:
    added = await handle(system, "task_add", comm="worker", kind="kthread", ppid=None)
    pid = added["task"]["pid"]
    assert added["task"] == {"pid": pid, "comm": "worker", "kind": "kthread", "state": "S",
                             "patch_state": -1, "where": "kthread"}
    slept = await handle(system, "task_sleep", pid=pid, func="cmdline_proc_show", seconds=None,
                         interruptible=False)
    assert slept["impl"] == "cmdline_proc_show" and slept["task"]["state"] == "D"
    assert slept["task"]["where"] == "cmdline_proc_show"
    assert (await insmod(system, "livepatch-sample"))["ok"]
    call = await handle(system, "call", func="cmdline_proc_show", pid=pid)
    assert (call["impl"], call["impl_module"], call["task"]["patch_state"]) == ("cmdline_proc_show", None, 0)
    console = await handle(system, "call", func="cmdline_proc_show", pid=None)
    assert (console["impl"], console["impl_module"]) == ("livepatch_cmdline_proc_show", "livepatch_sample")
    assert console["output"] == "this has been live patched\n"
    await trio.sleep(5)
    assert system.livepatch.klp_transition_patch is not None
    assert (await handle(system, "task_wake", pid=pid))["task"]["where"] == "kthread"
    await trio.sleep(1.5)
    assert system.livepatch.klp_transition_patch is None
    assert (await handle(system, "task_wake", pid=pid))["errno"] == errno.EINVAL
    assert (await handle(system, "task_run", pid=pid))["task"]["state"] == "R"
    assert (await handle(system, "task_exit", pid=pid)) == {"ok": True}
    assert (await handle(system, "task_exit", pid=pid))["errno"] == errno.ESRCH
    assert (await handle(system, "task_exit", pid=1))["errno"] == errno.EPERM
    assert (await handle(system, "call", func="nope", pid=None))["errno"] == errno.ENOENT


async def test_ps_and_debug(system: System, autojump_clock: trio.testing.MockClock) -> None:
    tasks = (await handle(system, "ps"))["tasks"]
    assert [t["comm"] for t in tasks[:2]] == ["swapper/0", "swapper/1"]
    assert tasks[2] == {"pid": 1, "comm": "systemd", "kind": "user", "state": "S", "patch_state": -1,
                        "where": "ep_poll"}  # the first line of /proc/1/stack: schedule_hrtimeout_range is __sched
    assert tasks[0]["state"] == "R" and tasks[0]["where"] == "do_idle"
    assert (await handle(system, "debug", enable=None))["enabled"] is True
    assert (await handle(system, "debug", enable=False))["enabled"] is False
    assert livepatch_debug(system.kernel.dyndbg) is False


async def test_malformed_requests(system: System) -> None:
    assert (await handle(system, "reboot"))["error"] == "unknown command 'reboot'"
    assert "bad arguments for task_wake" in (await handle(system, "task_wake"))["error"]
