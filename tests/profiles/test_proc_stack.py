"""/proc/<pid>/stack as proc_pid_stack() prints it: stack_trace_save_tsk() leaves out
the scheduler's functions (.sched.text, in_sched_functions()), so a kthread
sleeping in msleep() starts at msleep (6.12 obs #10 shows the 6.1 file:
`msleep+0x29/0x40`, `busy_fn+...`, `klp_busy_thread...`, `kthread`,
`ret_from_fork`, and the 6.12 one, whose sizes the 6.11 to 6.14 profiles show).  The
livepatch stack check still sees every frame, and `klpfs ps` names the function the
task sleeps in."""

from __future__ import annotations

import pytest

from klpfs.kernel.sched import TaskKind
from klpfs.sysfs.kernfs import Kernfs

from modules.test_kapi import source
from .conftest import LATER, Machine, make_machine, settle

KLP_BUSY = source('''
    busy_thread = None


    def busy_fn():
        msleep(1000)


    def klp_busy_thread(data):
        while not kthread_should_stop():
            busy_fn()
        return 0


    def klp_busy_init():
        global busy_thread
        busy_thread = kthread_run(klp_busy_thread, None, "klp_busy")
        return 0


    def klp_busy_exit():
        kthread_stop(busy_thread)


    module_init(klp_busy_init)
    module_exit(klp_busy_exit)
    MODULE_LICENSE("GPL")
''')


def proc_stack(m: Machine, pid: int) -> list[str]:
    data = Kernfs.read(m.node(f"proc/{pid}/stack"))
    assert isinstance(data, bytes)
    return data.decode().splitlines()


@pytest.mark.parametrize("version", LATER)
async def test_kthread_in_msleep_starts_at_msleep(nursery, version, autojump_clock) -> None:
    m = make_machine(nursery, version)
    assert (await m.insmod_text("klp_busy.py", KLP_BUSY))["ok"]
    await settle(0.5)
    task = next(t for t in m.sched.tasks.values() if t.comm == "klp_busy")
    module_frames = ["[<0>] busy_fn+0x18/0x30 [klp_busy]", "[<0>] klp_busy_thread+0x28/0x50 [klp_busy]"]
    if version in ("6.11", "6.12", "6.14"):
        # 6.12 obs #10: that kernel's msleep and kthread, ret_from_fork in C under ret_from_fork_asm (6.5).
        assert proc_stack(m, task.pid) == [
            "[<0>] msleep+0x2b/0x40", *module_frames, "[<0>] kthread+0xd2/0x100",
            "[<0>] ret_from_fork+0x34/0x50", "[<0>] ret_from_fork_asm+0x1a/0x30"]
    else:
        assert proc_stack(m, task.pid) == [
            "[<0>] msleep+0x18/0x30", *module_frames, "[<0>] kthread+0x9c/0x138", "[<0>] ret_from_fork+0x1a/0x35"]
    # The consistency model's stack check walks the whole stack, scheduler included.
    assert [s.name for s in reversed(m.sched.stack(task))][:4] == ["__schedule", "schedule", "schedule_timeout",
                                                                  "msleep"]
    ps = {t["pid"]: t for t in (await m.ctl("ps"))["tasks"]}
    assert ps[task.pid]["where"] == "busy_fn [klp_busy]"  # below the sleeping primitive
    assert ps[1]["where"] == "ep_poll"                     # schedule_hrtimeout_range is __sched


async def test_user_task_in_nanosleep_and_resting_kthread(nursery, autojump_clock) -> None:
    """do_nanosleep(), schedule() and __schedule() are __sched: a process in nanosleep()
    shows hrtimer_nanosleep first; a kthread with nothing to do shows its thread function."""
    m = make_machine(nursery, "6.1")
    user = m.sched.add("sleep", TaskKind.USER, m.kernel.kallsyms.find_each(
        ("entry_SYSCALL_64_after_hwframe", "do_syscall_64", "SyS_nanosleep", "hrtimer_nanosleep",
         "do_nanosleep")), ppid=1)
    assert proc_stack(m, user.pid) == [
        "[<0>] hrtimer_nanosleep+0x6c/0xd8",
        "[<0>] SyS_nanosleep+0x48/0x90",
        "[<0>] do_syscall_64+0x9e/0x13c",
        "[<0>] entry_SYSCALL_64_after_hwframe+0x1e/0x3d"]
    assert proc_stack(m, 3) == [  # kworker/0:0
        "[<0>] worker_thread+0x1f0/0x3e0",
        "[<0>] kthread+0x9c/0x138",
        "[<0>] ret_from_fork+0x1a/0x35"]
