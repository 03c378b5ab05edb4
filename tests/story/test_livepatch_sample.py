"""The life of the kernel's livepatch-sample on the 4.15 profile, end to end."""

from __future__ import annotations

import errno

import trio
import trio.testing

from klpfs.kernel.kallsyms import FuncDef, const_body
from klpfs.kernel.sched import TASK_UNINTERRUPTIBLE, TaskKind
from klpfs.modules.livepatch_module import FuncSpec, ObjectSpec, PatchModuleSpec
from klpfs.sysfs.kernfs import Kernfs
from klpfs.system import System

PATCHED = "this has been live patched\n"
SAMPLE = PatchModuleSpec(
    "livepatch_sample",
    [FuncDef("livepatch_cmdline_proc_show", 0x30, const_body(PATCHED))],
    [ObjectSpec(None, [FuncSpec("cmdline_proc_show", "livepatch_cmdline_proc_show")])],
)
P = "sys/kernel/livepatch/livepatch_sample"


def read(system: System, path: str) -> str:
    data = Kernfs.read(system.kernfs.walk(path), 0, 4096)
    assert isinstance(data, bytes), data
    return data.decode()


def write(system: System, path: str, text: str) -> int:
    return Kernfs.write(system.kernfs.walk(path), text.encode())


def log_since(system: System, start: int) -> list[str]:
    return system.kernel.log.lines()[start:]


async def test_sample_lifecycle(system: System, autojump_clock: trio.testing.MockClock) -> None:
    kernel = system.kernel
    cmdline = kernel.kallsyms.find("cmdline_proc_show")
    console = kernel.console
    original = kernel.call(cmdline, console).output
    assert original.startswith("BOOT_IMAGE=")

    # A kworker sleeps inside cmdline_proc_show (the original body) for 5 s.
    worker = kernel.sched.add("kworker/0:2", TaskKind.KTHREAD, kernel.sched.tasks[3].base, ppid=2)
    assert kernel.sched.enter(worker, cmdline, TASK_UNINTERRUPTIBLE, seconds=5.0) is cmdline

    # insmod: register + enable; the transition starts and is held by the worker.
    assert kernel.modules.load_module(SAMPLE.build(system.livepatch)) == 0
    assert read(system, f"{P}/enabled") == "1\n"
    assert read(system, f"{P}/transition") == "1\n"
    assert read(system, "sys/module/livepatch_sample/refcnt") == "1\n"
    assert kernel.log.lines()[:4] == [
        "livepatch_sample: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'livepatch_sample'",
        "livepatch: 'livepatch_sample': initializing patching transition",
        "livepatch: 'livepatch_sample': starting patching transition",
    ]
    assert f"livepatch: klp_check_stack: kworker/0:2:{worker.pid} is sleeping on function cmdline_proc_show" \
        in kernel.log.lines()

    # Tasks already switched get the new body; the held worker still the old one.
    assert console.patch_state == 1
    assert kernel.call(cmdline, console).output == PATCHED
    assert worker.patch_state == 0
    assert kernel.call(cmdline, worker).output == original

    # The retry every second keeps failing while the worker sleeps there.
    await trio.sleep(4.5)
    assert read(system, f"{P}/transition") == "1\n"
    assert read(system, f"/proc/{worker.pid}/patch_state") == "0\n"

    # It wakes at 5 s; the retry at 6 s completes the transition.
    await trio.sleep(1.6)
    assert read(system, f"{P}/transition") == "0\n"
    assert worker.patch_state == -1
    assert kernel.call(cmdline, worker).output == PATCHED
    assert read(system, "proc/cmdline") == PATCHED
    assert kernel.log.lines()[-2:] == [
        "livepatch: 'livepatch_sample': completing patching transition",
        "livepatch: 'livepatch_sample': patching complete",
    ]

    # Unregistering (the module's exit) is refused while enabled: rmmod is EAGAIN.
    assert kernel.modules.delete_module("livepatch_sample") == -errno.EWOULDBLOCK

    # Disable reverses cleanly and releases the module reference.
    start = len(kernel.log.lines())
    assert write(system, f"{P}/enabled", "0\n") == 2
    assert read(system, f"{P}/enabled") == "0\n"
    await trio.sleep(2)
    assert read(system, f"{P}/transition") == "0\n"
    assert read(system, "proc/cmdline") == original
    assert read(system, "sys/module/livepatch_sample/refcnt") == "0\n"
    assert [line for line in log_since(system, start) if "swapper" not in line] == [
        "livepatch: 'livepatch_sample': initializing unpatching transition",
        "livepatch: 'livepatch_sample': starting unpatching transition",
        "livepatch: 'livepatch_sample': completing unpatching transition",
        "livepatch: 'livepatch_sample': unpatching complete",
    ]

    # 4.15 re-enables through sysfs.
    assert write(system, f"{P}/enabled", "1\n") == 2
    await trio.sleep(2)
    assert read(system, "proc/cmdline") == PATCHED
    assert write(system, f"{P}/enabled", "0\n") == 2
    await trio.sleep(2)

    # Disabled: rmmod runs the exit, which unregisters; the tree goes.
    assert kernel.modules.delete_module("livepatch_sample") == 0
    assert system.kernfs.walk(P) is None
    assert system.kernfs.walk("sys/module/livepatch_sample") is None
    assert system.livepatch.klp_patches == []
    assert read(system, "proc/cmdline") == original
