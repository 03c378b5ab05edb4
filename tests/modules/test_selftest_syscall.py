"""test-syscall.sh of the kernel's livepatch selftests (6.12 tree; 6.1 has no
such script) on the shipped Python module test_klp_syscall, on the 6.14
profile: the kernel log equals the script's check_result text line for line.

The script starts one ./test_klp-call_getpid per online CPU: processes that
call syscall(SYS_getpid) in a loop.  Here each is an emulated user task,
busy in user mode, that every tick enters the kernel and calls
__x64_sys_getpid through the kernel's call path (so ftrace sends it to the
original or to the patch's lp_sys_getpid by its patch state) and goes back
to user space, where a pending patch state switch is done.  A process that
is running is never switched by the transition's stack check; only that
return to user space switches it, after which its getpid() reaches
lp_sys_getpid and counts its pid off /sys/kernel/test_klp_syscall/npids.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
import trio

from klpfs.kernel.sched import Task, TaskKind
from klpfs.kernel.timers import TICK, Timer
from klpfs.livepatch.structs import KLP_PATCHED, KLP_UNDEFINED, KLP_UNPATCHED

from modules.klp_selftest import MAX_RETRIES, RETRY_INTERVAL, Selftest, run_id
from profiles.conftest import Machine, autojump_clock  # noqa: F401

SCRIPT = "test-syscall.sh"
MOD_SYSCALL = "test_klp_syscall"
NPIDS = f"sys/kernel/{MOD_SYSCALL}/npids"
MAXPROC = 128
GETPID_PROGRAM = "test_klp-call_getpid"
SYSCALL_ENTRY = ("entry_SYSCALL_64_after_hwframe", "do_syscall_64")
"""A user task's kernel stack below the syscall's own function."""

RUNS = [("6.12", "6.12"), ("6.12", "6.14")]


def runs() -> pytest.MarkDecorator:
    """Parametrize a case over RUNS (the script exists in the 6.12 tree only)."""
    return pytest.mark.parametrize("run", RUNS, ids=run_id)


class UserProcess:
    """A user process of the emulated machine that makes syscalls."""

    def __init__(self, m: Machine, task: Task):
        self.kernel = m.kernel
        self.task = task
        getpid = m.kernel.kallsyms.find("__x64_sys_getpid")
        assert getpid is not None
        self.getpid = getpid
        self.calls = 0

    @property
    def pid(self) -> int:
        return self.task.pid

    def syscall_getpid(self) -> object:
        """One syscall(SYS_getpid): __x64_sys_getpid through ftrace as this task,
        then the exit to user space, which services pending work flags
        (klp_update_patch_state for TIF_PATCH_PENDING)."""
        kernel = self.kernel
        ret = kernel.code.guarded(kernel.invoke, self.getpid, self.task, (), fallback=-errno.EFAULT)
        self.calls += 1
        kernel.sched._return_to_user(self.task)
        return ret


class CallGetpid(UserProcess):
    """`./test_klp-call_getpid &`: a child of the shell that calls
    syscall(SYS_getpid) in a loop (here once a tick) until a signal ends it."""

    def __init__(self, m: Machine):
        kernel = m.kernel
        super().__init__(m, kernel.sched.add(GETPID_PROGRAM, TaskKind.USER, kernel.kallsyms.find_each(SYSCALL_ENTRY),
                                             ppid=kernel.console.pid))
        kernel.sched.run(self.task)  # busy in user mode between two calls
        self._timer: Timer | None = kernel.timers.call_later(TICK, self._loop)

    def _loop(self) -> None:
        self.syscall_getpid()
        self._timer = self.kernel.timers.call_later(TICK, self._loop)

    def kill(self) -> None:
        """`kill $pid`: SIGTERM, which the program does not handle, so it exits."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.kernel.sched.exit(self.task)


def selftest(nursery: trio.Nursery, run: tuple[str, str]) -> Selftest:
    tree, profile = run
    return Selftest(nursery, tree, profile, SCRIPT)


def start_getpid_processes(st: Selftest) -> list[CallGetpid]:
    """NPROC=$(getconf _NPROCESSORS_ONLN); one process per CPU, at most MAXPROC."""
    nproc = sum(st.m.sched.cpu_online)
    return [CallGetpid(st.m) for _ in range(min(nproc, MAXPROC))]


async def loop_until(cond: Callable[[], bool]) -> bool:
    """functions.sh's loop_until without `|| die`: False after MAX_RETRIES."""
    for _ in range(MAX_RETRIES + 1):
        if cond():
            return True
        await trio.sleep(RETRY_INTERVAL)
    return False


def npids(st: Selftest) -> str:
    """`cat /sys/kernel/test_klp_syscall/npids`, through the kernfs tree."""
    return st.cat(NPIDS)


@runs()
async def test_patch_getpid_syscall_while_being_heavily_hammered(nursery, autojump_clock, run) -> None:
    st = selftest(nursery, run)
    st.start_test("patch getpid syscall while being heavily hammered")

    procs = start_getpid_processes(st)
    assert len(procs) == 2  # the image's two CPUs
    pid_list = ",".join(str(p.pid) for p in procs)
    await st.load_lp(MOD_SYSCALL, f"klp_pids={pid_list}")

    # wait for all tasks to transition to patched state
    await loop_until(lambda: npids(st) == "0\n")

    pending_pids = npids(st).rstrip("\n")
    st.log(f"{MOD_SYSCALL}: Remaining not livepatched processes: {pending_pids}")

    for p in procs:
        p.kill()

    await st.disable_lp(MOD_SYSCALL)
    await st.unload_lp(MOD_SYSCALL)

    # $pid_list is set while the script runs: the expected text names these pids.
    assert st.result() == [line.replace("$pid_list", pid_list) for line in st.expected()]


@runs()
async def test_running_processes_switch_on_return_to_user_space(nursery, autojump_clock, run) -> None:
    """While the transition waits, the getpid processes are running: the stack
    check leaves them alone; each switches at its next exit to user space, and
    its following getpid() reaches the patch and counts it off."""
    st = selftest(nursery, run)
    procs = start_getpid_processes(st)
    pid_list = ",".join(str(p.pid) for p in procs)
    reply = await st.m.insmod(MOD_SYSCALL, f"klp_pids={pid_list}")
    assert reply["ok"], reply
    ns = st.m.module(MOD_SYSCALL).params  # the module's static data
    assert (ns["npids"], ns["npids_pending"], ns["klp_pids"][:3]) == (2, 2, [procs[0].pid, procs[1].pid, 0])

    # Right after the enable: the transition is under way, the processes are
    # flagged and still unpatched (they were running at the first attempt).
    assert st.cat(f"sys/kernel/livepatch/{MOD_SYSCALL}/transition") == "1\n"
    assert [(p.task.patch_state, "TIF_PATCH_PENDING" in p.task.flags) for p in procs] == [(KLP_UNPATCHED, True)] * 2
    assert npids(st) == "2\n"

    # One tick: each process's getpid() ran the original, then it switched on the way out.
    await trio.sleep(TICK * 1.5)
    assert [(p.task.patch_state, "TIF_PATCH_PENDING" in p.task.flags) for p in procs] == [(KLP_PATCHED, False)] * 2
    assert npids(st) == "2\n"

    # The next getpid() of each is the patched one.
    await trio.sleep(TICK)
    assert npids(st) == "0\n"
    assert ns["klp_pids"][:2] == [0, 0]
    assert st.cat(f"sys/kernel/livepatch/{MOD_SYSCALL}/transition") == "1\n"

    await st.wait_transition(MOD_SYSCALL, "0", "failed to complete transition")
    for p in procs:
        p.kill()
    await st.disable_lp(MOD_SYSCALL)
    await st.unload_lp(MOD_SYSCALL)
    assert not st.exists(f"sys/kernel/{MOD_SYSCALL}")


@runs()
async def test_a_listed_pid_that_never_calls_getpid_stays_pending(nursery, autojump_clock, run) -> None:
    """npids counts calls, not switches: a listed process asleep elsewhere
    switches by the stack check and the transition completes, yet it stays
    pending until it calls getpid() in the patched state."""
    st = selftest(nursery, run)
    sleeper = UserProcess(st.m, st.m.user("sleeper"))  # asleep in a syscall
    await st.load_lp(MOD_SYSCALL, f"klp_pids={sleeper.pid}")
    assert sleeper.task.patch_state == KLP_UNDEFINED  # switched, and the transition is over
    assert npids(st) == "1\n"

    st.m.sched.run(sleeper.task)  # it wakes up and returns to user space
    assert sleeper.syscall_getpid() == sleeper.pid  # lp_sys_getpid returns task_tgid_vnr(current)
    assert npids(st) == "0\n"
    assert sleeper.syscall_getpid() == sleeper.pid  # counted once only
    assert npids(st) == "0\n"

    await st.disable_lp(MOD_SYSCALL)
    await st.unload_lp(MOD_SYSCALL)
