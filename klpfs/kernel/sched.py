"""Tasks, their kernel stacks, and the places where they pass through
"return to user space" and "the idle loop".

Each task has a resting stack (what it sits in when it has nothing to do)
and may sleep inside, or run inside, some function.  Entering a function
goes through the ftrace call path as the task itself, so a task that
sleeps inside a patched function holds whichever implementation it
entered: the original, an older patch's or the new one.

Work flags (TIF_*) that have a handler registered in `exit_work` are
serviced where the kernel services them: when a user task returns to user
space and when an idle task goes round the idle loop.  A user task running
in user mode and the idle task of an idle CPU get there within a tick, and
an idle CPU at once when an IPI reaches it (`static_call_update`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from klpfs.kernel.timers import TICK, Timer, Timers

if TYPE_CHECKING:
    from klpfs.kernel.kallsyms import Kallsyms, KSym

TASK_RUNNING = "R"
TASK_INTERRUPTIBLE = "S"
TASK_UNINTERRUPTIBLE = "D"
TASK_COMM_LEN = 16

TIF_PATCH_PENDING = "TIF_PATCH_PENDING"
TIF_SIGPENDING = "TIF_SIGPENDING"

REST_FRAMES = ("schedule", "__schedule")
IDLE_REST_FRAMES = ("schedule_idle", "__schedule")
KTHREAD_BASE = ("ret_from_fork", "kthread")
"""The stack a new kernel thread rests on until 6.5 (Sched.kthread_base: the profile's)."""
USER_BASE = ("entry_SYSCALL_64_after_hwframe", "do_syscall_64", "SyS_nanosleep", "hrtimer_nanosleep",
             "do_nanosleep")
"""The stack a new user process rests on: sleeping in nanosleep."""
SLEEP_FRAMES = {
    TASK_INTERRUPTIBLE: ("schedule_timeout", "schedule", "__schedule"),
    TASK_UNINTERRUPTIBLE: ("msleep", "schedule_timeout", "schedule", "__schedule"),
}
SCHED_TEXT = frozenset({
    "__schedule", "schedule", "schedule_idle", "schedule_preempt_disabled", "schedule_timeout",
    "schedule_hrtimeout_range", "do_nanosleep", "wait_for_completion", "__wait_for_common",
    "mutex_lock", "__mutex_lock",
})
"""The image's functions that the kernel marks __sched (kernel/sched/core.c, kernel/time/timer.c,
kernel/time/hrtimer.c, kernel/sched/completion.c, kernel/locking/mutex.c): they live in
.sched.text, where in_sched_functions() finds them, so /proc/<pid>/stack never shows them."""
SLEEP_PRIMITIVES = frozenset({"msleep", "msleep_interruptible"})
"""Sleeping functions outside .sched.text: /proc/<pid>/stack starts with them (`msleep+0x29/0x40`
on a 6.1 kernel), while `klpfs ps` names the function that called them."""
MAX_STACK_TRACE_DEPTH = 64
"""The entries proc_pid_stack() asks stack_trace_save_tsk() for (fs/proc/base.c)."""


class TaskKind(enum.Enum):
    USER = "user"
    KTHREAD = "kthread"
    IDLE = "idle"


class Activity:
    """What the task is doing beyond resting: inside `impl` (called as `func`),
    sleeping or running.  `on_wake` resumes module code that slept in a
    sleeping primitive; `sleep_frames` are that primitive's frames (msleep,
    schedule_timeout, ...), and then `impl` is the code's innermost function."""

    __slots__ = ("func", "impl", "state", "wake_at", "timer", "on_wake", "sleep_frames")

    def __init__(self, func: KSym | None, impl: KSym | None, state: str, wake_at: float | None,
                 on_wake: Callable[[], object] | None, sleep_frames: list[KSym] | None = None):
        self.func = func
        self.impl = impl
        self.state = state
        self.wake_at = wake_at
        self.timer: Timer | None = None
        self.on_wake = on_wake
        self.sleep_frames = sleep_frames


class Task:
    """task_struct, reduced to what livepatch and /proc look at."""

    __slots__ = ("pid", "comm", "name", "kind", "_cpu", "ppid", "base", "_state", "activity", "frames",
                 "reliable_stack", "flags", "patch_state", "_tick", "exited", "start_time", "_nr_running")

    def __init__(self, pid: int, comm: str, kind: TaskKind, base: list[KSym], cpu: int = 0,
                 ppid: int = 0, state: str = TASK_INTERRUPTIBLE, name: str | None = None):
        self.pid = pid
        self.comm = comm[: TASK_COMM_LEN - 1]
        self.name = name
        """What /proc shows in place of comm, if anything (proc_task_name(): a kthread's
        full name, a kworker's with its workqueue)."""
        self.kind = kind
        self._nr_running: list[int] | None = None
        """The per-CPU running counts of the run queues the task is on (Sched.add)."""
        self._cpu = cpu
        self.ppid = ppid
        self.base = base
        self._state = state
        self.activity: Activity | None = None
        self.frames: list[KSym] = []
        """The functions whose code the task is executing, outermost first (Kernel.call)."""
        self.reliable_stack = True
        self.flags: set[str] = set()
        self.patch_state = -1
        self._tick: Timer | None = None
        self.exited = False
        self.start_time = 0.0
        """Seconds since boot when the task was forked (task_struct's start_time)."""

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        """The CPU's running count follows, as rq->nr_running follows enqueue and dequeue."""
        counts = self._nr_running
        if counts is not None:
            counts[self._cpu] += (state == TASK_RUNNING) - (self._state == TASK_RUNNING)
        self._state = state

    @property
    def cpu(self) -> int:
        return self._cpu

    @cpu.setter
    def cpu(self, cpu: int) -> None:
        """A running task migrates its count to its new CPU's run queue."""
        counts = self._nr_running
        if counts is not None and self._state == TASK_RUNNING:
            counts[self._cpu] -= 1
            counts[cpu] += 1
        self._cpu = cpu

    def enqueue(self, nr_running: list[int]) -> None:
        """Counted in nr_running from now on, as a task of the task list."""
        self._nr_running = nr_running
        nr_running[self._cpu] += self._state == TASK_RUNNING

    def dequeue(self) -> None:
        """Counted no more (the task exits)."""
        counts = self._nr_running
        if counts is not None:
            counts[self._cpu] -= self._state == TASK_RUNNING
        self._nr_running = None

    @property
    def proc_name(self) -> str:
        """The name /proc/<pid>/comm, stat and status show."""
        return self.name if self.name is not None else self.comm

    @property
    def in_user(self) -> bool:
        """A user task running with no kernel frames (busy in user mode)."""
        return (self.kind is TaskKind.USER and self.state == TASK_RUNNING and self.activity is None
                and not self.frames)

    def __repr__(self) -> str:
        return f"<Task {self.comm}:{self.pid} {self.kind.value} {self.state}>"


class Sched:
    """The task list, CPUs, and the scheduler events livepatch cares about."""

    def __init__(self, timers: Timers, kallsyms: Kallsyms, resolve: Callable[[KSym, Task], KSym],
                 nr_cpus: int):
        self._timers = timers
        self._kallsyms = kallsyms
        self._resolve = resolve
        self.tasks: dict[int, Task] = {}
        self.idle_tasks: list[Task] = []
        self.cpu_online = [True] * nr_cpus
        self.nr_running = [0] * nr_cpus
        """Per CPU, the tasks of the task list in TASK_RUNNING on it (rq->nr_running less
        the idle task): kept as tasks change, so whether a CPU is idle is one look."""
        self.exit_work: dict[str, Callable[[Task], None]] = {}
        """Flag -> handler run on return to user space and in the idle loop."""
        self.resched_work: dict[str, Callable[[Task], None]] = {}
        """Flag -> handler a task busy in kernel code runs at cond_resched(); it
        keeps running it every tick while the flag stays set."""
        self.task_notifiers: list[Callable[[str, Task], None]] = []
        """Told ("fork" | "exit", task), for the /proc view."""
        self.fork_frames: tuple[str, ...] = ("ret_from_fork",)
        """Where a new kernel thread's stack starts, outermost first (the profile's)."""
        self.static_calls: dict[str, str] = {}
        """Static call key -> the function its call sites call, once updated."""
        self.task_sources: list[Callable[[], None]] = []
        """Bring the task list up to date with tasks that live outside the
        emulator (the real processes of a `klpfs run`); see `refresh`."""
        self._next_pid = 1
        self._rest = kallsyms.find_each(REST_FRAMES)
        self._idle_rest = kallsyms.find_each(IDLE_REST_FRAMES)
        self._sleep = {state: kallsyms.find_each(names) for state, names in SLEEP_FRAMES.items()}

    # -- the task list ---------------------------------------------------------

    def user_and_kthreads(self) -> Iterator[Task]:
        """for_each_process_thread: every task but the idle tasks."""
        return iter(list(self.tasks.values()))

    def all_tasks(self) -> Iterator[Task]:
        yield from self.tasks.values()
        yield from self.idle_tasks

    def kthread_base(self) -> list[KSym]:
        """The stack a new kernel thread rests on: its fork frames, then kthread()."""
        return self._kallsyms.find_each((*self.fork_frames, "kthread"))

    def find(self, pid: int) -> Task | None:
        return self.tasks.get(pid)

    def refresh(self) -> None:
        """Before the task list is shown: tasks living elsewhere come and go first."""
        for source in self.task_sources:
            source()

    def add_idle(self, cpu: int, base: list[KSym]) -> Task:
        task = Task(0, f"swapper/{cpu}", TaskKind.IDLE, base, cpu=cpu, state=TASK_RUNNING)
        self.idle_tasks.append(task)
        return task

    def add(self, comm: str, kind: TaskKind, base: list[KSym], ppid: int = 0,
            pid: int | None = None, foreign: bool = False, name: str | None = None) -> Task:
        """A new task, copying its parent's patch state and pending flag (klp_copy_process() in
        kernel/livepatch/transition.c).

        `foreign`: the pid was handed out outside the emulator (a real process
        of `klpfs run`), so it does not move where the emulator's own pids
        continue from.  `name`: Task.name.
        """
        if pid is None:
            pid = self._next_pid
            while pid in self.tasks:  # alloc_pid(): idr_alloc_cyclic() skips ids in use
                pid += 1
        if not foreign:
            self._next_pid = max(self._next_pid, pid + 1)
        task = Task(pid, comm, kind, base, cpu=pid % len(self.cpu_online), ppid=ppid, name=name)
        task.start_time = self._timers.now()
        parent = self.tasks.get(ppid)
        if parent is not None:
            task.patch_state = parent.patch_state
            if TIF_PATCH_PENDING in parent.flags:
                task.flags.add(TIF_PATCH_PENDING)
        self.tasks[pid] = task
        task.enqueue(self.nr_running)
        for notify in self.task_notifiers:
            notify("fork", task)
        return task

    def exit(self, task: Task) -> None:
        self._end_activity(task)
        self._cancel_tick(task)
        task.exited = True
        del self.tasks[task.pid]
        task.dequeue()
        self._cpu_changed(task.cpu)
        for notify in self.task_notifiers:
            notify("exit", task)

    # -- stacks -----------------------------------------------------------------

    def stack(self, task: Task) -> list[KSym]:
        """The task's kernel call chain, outermost first."""
        if task.in_user:
            return []
        if task.kind is TaskKind.IDLE:
            return task.base if self.idle_running(task) else task.base + self._idle_rest
        act = task.activity
        frames = task.base + task.frames
        if act is None:
            return frames if task.frames else frames + self._rest
        if act.sleep_frames is None:
            assert act.impl is not None
            frames = frames + [act.impl]
        if act.state != TASK_RUNNING:
            frames = frames + (act.sleep_frames if act.sleep_frames is not None else self._sleep[act.state])
        return frames

    def resting_base(self, task: Task) -> list[KSym] | None:
        """The base of a task resting on it: every task resting on the same base has the
        same stack (stack()), its base then the resting frames.  None for any other task."""
        if task.activity is None and not task.frames and task.kind is not TaskKind.IDLE and not task.in_user:
            return task.base
        return None

    def stack_trace_reliable(self, task: Task, max_entries: int) -> list[int] | None:
        """save_stack_trace_tsk_reliable: return addresses innermost first, or None."""
        frames = self.stack(task)
        if not task.reliable_stack or len(frames) > max_entries:
            return None
        return [sym.addr + sym.return_offset for sym in reversed(frames)]  # where each frame returns to

    # -- CPUs --------------------------------------------------------------------

    def task_curr(self, task: Task) -> bool:
        """Is the task executing on a CPU right now?"""
        if task.kind is TaskKind.IDLE:
            return self.idle_running(task)
        return task.state == TASK_RUNNING

    def idle_running(self, idle: Task) -> bool:
        """An online CPU with no task of the task list running on it runs its idle task."""
        cpu = idle.cpu
        return self.cpu_online[cpu] and not self.nr_running[cpu]

    def set_cpu_online(self, cpu: int, online: bool) -> None:
        self.cpu_online[cpu] = online
        self._cpu_changed(cpu)

    def _cpu_changed(self, cpu: int) -> None:
        if cpu < len(self.idle_tasks):
            self._arm_tick(self.idle_tasks[cpu])

    # -- what tasks do -------------------------------------------------------------

    def enter(self, task: Task, func: KSym, state: str, seconds: float | None = None) -> KSym:
        """The task calls func (through ftrace) and sleeps there, or runs there.

        Returns the implementation it entered.
        """
        impl = self._resolve(func, task)
        self.sleep_in(task, func, impl, state, seconds)
        return impl

    def sleep_in(self, task: Task, func: KSym | None, impl: KSym | None, state: str, seconds: float | None = None,
                 on_wake: Callable[[], object] | None = None, sleep_frames: list[KSym] | None = None) -> None:
        """The task, already inside impl, sleeps (or spins) there.

        A user task busy in user mode enters the kernel to do so.  When the
        sleep ends, on_wake runs (the rest of the function) before the task
        returns from it.
        """
        self._end_activity(task)
        act = Activity(func, impl, state, None if seconds is None else self._timers.now() + seconds, on_wake,
                       sleep_frames)
        if act.wake_at is not None:
            act.timer = self._timers.call_at(act.wake_at, lambda: self.wake(task))
        task.activity = act
        task.state = state
        self._cpu_changed(task.cpu)

    def sleep_code(self, task: Task, state: str, seconds: float | None, sleep_frames: list[KSym],
                   on_wake: Callable[[], object]) -> None:
        """Module code of task sleeps in a sleeping primitive (its frames given);
        on_wake resumes the code.  The caller then gives the CPU back."""
        inner = task.frames[-1] if task.frames else None
        self.sleep_in(task, inner, inner, state, seconds, on_wake, sleep_frames)

    def tasks_in(self, syms: list[KSym]) -> list[Task]:
        """Tasks whose stack holds one of these functions (a module's code, say)."""
        ids = {id(sym) for sym in syms}
        return [t for t in self.tasks.values()
                if any(id(f) in ids for f in t.frames)
                or t.activity is not None and id(t.activity.impl) in ids]

    def run(self, task: Task) -> None:
        """Make the task busy: a user task in user mode, a kthread in its resting code."""
        self._end_activity(task)
        task.state = TASK_RUNNING
        self._cpu_changed(task.cpu)
        self._arm_tick(task)

    def rest(self, task: Task) -> None:
        """Back to the resting sleep, as a task with nothing to do."""
        self._end_activity(task)
        task.state = TASK_INTERRUPTIBLE
        self._cpu_changed(task.cpu)

    def wake(self, task: Task) -> None:
        """The sleep inside a function ends: the function returns.

        A user task then goes back out to user space (a switch point) before it
        rests again; a kthread just rests again.
        """
        act = task.activity
        if task.exited or act is None:
            return
        self._end_activity(task)
        if act.on_wake is not None:
            task.state = TASK_RUNNING
            act.on_wake()
            if task.exited or task.activity is not None or task.frames:
                return
        if task.kind is TaskKind.USER:
            self._return_to_user(task)
        task.state = TASK_INTERRUPTIBLE
        self._cpu_changed(task.cpu)

    def signal_wake_up(self, task: Task) -> None:
        """A fake signal: TIF_SIGPENDING without a queued signal (klp_send_signals() in
        kernel/livepatch/transition.c).

        A user task in an interruptible sleep leaves the kernel toward user
        space and then restarts the interrupted call (re-entering the function
        through ftrace for the time that is left); a busy one is kicked at
        its next tick; an uninterruptible sleeper is untouched.
        """
        task.flags.add(TIF_SIGPENDING)
        act = task.activity
        if task.state == TASK_INTERRUPTIBLE and not (act is not None and act.sleep_frames is not None):
            self._return_to_user(task)
            if act is not None:
                remaining = None if act.wake_at is None else max(0.0, act.wake_at - self._timers.now())
                self._end_activity(task)
                impl = None if act.func is None else self._resolve(act.func, task)
                self.sleep_in(task, act.func, impl, act.state, remaining, act.on_wake)
        elif task.state == TASK_RUNNING:
            self._arm_tick(task)

    def wake_up_interruptible(self, task: Task) -> None:
        """wake_up_state(TASK_INTERRUPTIBLE) of a kthread: an interruptible
        sleep inside a function ends early; a resting kthread rests again."""
        if task.state == TASK_INTERRUPTIBLE and task.activity is not None:
            self.wake(task)

    # -- code patching ----------------------------------------------------------------

    def static_call_update(self, key: str, func: str) -> None:
        """static_call_update(): point static call `key`'s call sites at `func`.

        __static_call_update() returns early when the key already calls `func`;
        otherwise the sites are rewritten with text_poke_bp(), which ends in
        text_poke_sync(): on_each_cpu(do_sync_core), an IPI to every CPU.
        """
        if self.static_calls.get(key) == func:
            return
        self.static_calls[key] = func
        self.ipi_all_cpus()

    def ipi_all_cpus(self) -> None:
        """A call-function IPI to every online CPU (on_each_cpu()).

        An idle CPU leaves do_idle()'s loop: call_function_single_prep_ipi() sets
        TIF_NEED_RESCHED on its polling idle task instead of interrupting it, and
        on its way round the idle task passes the loop's switch point, the work
        after schedule_idle().  A CPU running a task just goes back to it.
        """
        for idle in self.idle_tasks:
            if self.idle_running(idle):
                self._return_to_user(idle)

    # -- switch points ---------------------------------------------------------------

    def set_flag(self, task: Task, flag: str) -> None:
        """set_tsk_thread_flag; a task about to pass a switch point will do so."""
        task.flags.add(flag)
        self._arm_tick(task)

    def _return_to_user(self, task: Task) -> None:
        """exit_to_usermode_loop, or an idle task's way round do_idle(): service the
        pending work flags."""
        for flag in list(task.flags):
            handler = self.exit_work.get(flag)
            if handler is not None:
                handler(task)
        task.flags.discard(TIF_SIGPENDING)

    def _work_for(self, task: Task) -> dict[str, Callable[[Task], None]]:
        """The flag handlers this task will run within a tick, if any."""
        if task.kind is TaskKind.IDLE:
            return self.exit_work if self.idle_running(task) else {}
        if task.in_user:
            return self.exit_work
        if task.state == TASK_RUNNING:
            return self.resched_work
        return {}

    def _arm_tick(self, task: Task) -> None:
        if task._tick is None and task.flags and not self._work_for(task).keys().isdisjoint(task.flags):
            task._tick = self._timers.call_later(TICK, lambda: self._tick_fired(task))

    def _tick_fired(self, task: Task) -> None:
        task._tick = None
        if task.exited:
            return
        work = self._work_for(task)
        if work is self.exit_work:
            self._return_to_user(task)
        else:
            for flag in list(task.flags):
                if flag in work:
                    work[flag](task)
            self._arm_tick(task)

    def _cancel_tick(self, task: Task) -> None:
        if task._tick is not None:
            task._tick.cancel()
            task._tick = None

    def _end_activity(self, task: Task) -> None:
        act = task.activity
        if act is not None and act.timer is not None:
            act.timer.cancel()
        task.activity = None


def in_sched_functions(sym: KSym) -> bool:
    """in_sched_functions(): the address is in vmlinux's .sched.text (a module has none)."""
    return sym.module is None and sym.name in SCHED_TEXT


def stack_trace_save_tsk(frames: list[KSym]) -> list[KSym]:
    """What stack_trace_save_tsk() saves of a call chain (outermost first): the frames
    innermost first, scheduler functions skipped (stack_trace_consume_entry_nosched),
    at most MAX_STACK_TRACE_DEPTH.  The livepatch stack check sees every frame instead
    (stack_trace_save_tsk_reliable)."""
    return [sym for sym in reversed(frames) if not in_sched_functions(sym)][:MAX_STACK_TRACE_DEPTH]


def stack_lines(frames: list[KSym]) -> list[str]:
    """/proc/<pid>/stack lines of a call chain (outermost first), as proc_pid_stack()
    prints what stack_trace_save_tsk() saved: "[<0>] %pB" innermost first, the address
    hidden and a module function followed by its module's name."""
    return [f"[<0>] {sym.name}+{sym.return_offset:#x}/{sym.size:#x}" + (f" [{sym.module}]" if sym.module else "")
            for sym in stack_trace_save_tsk(frames)]
