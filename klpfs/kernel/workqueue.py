"""Work items on the system workqueue (kernel/workqueue.c) for module code.

A queued work runs on an idle kworker, inside process_one_work(), through
the ftrace call path: a patch that replaces the work function takes effect
for the next run, and a work function that sleeps keeps its kworker (and
its own function) busy, as a blocking work item does in the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from klpfs.kernel.sched import TASK_UNINTERRUPTIBLE, TaskKind
from klpfs.kernel.timers import HZ, MAX_JIFFY_OFFSET, Timer, ticks
from klpfs.kernel.wait import WAIT_FOR_COMPLETION, WaitQueueHead, wait_event

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.sched import Task

FLUSH_WORK = ("__flush_work", *WAIT_FOR_COMPLETION)


class Work:
    """struct work_struct: pending until a kworker picks it up, then running."""

    def __init__(self, func: Callable[[Work], object]):
        self.func = func
        self.pending = False
        self.worker: Task | None = None
        """The kworker running it now."""
        self.done = WaitQueueHead()
        self.canceling = False
        """cancel_work_sync() is under way (WORK_OFFQ_CANCELING): queueing it does nothing."""


class DelayedWork(Work):
    """struct delayed_work: a work queued when its timer fires."""

    def __init__(self, func: Callable[[Work], object]):
        super().__init__(func)
        self.timer: Timer | None = None


def queue_work(kernel: Kernel, work: Work) -> bool:
    """schedule_work(): False if it was already pending, or is being cancelled."""
    if work.pending or work.canceling:
        return False
    work.pending = True
    kernel.timers.call_later(0, lambda: _execute(kernel, work))
    return True


def queue_delayed_work(kernel: Kernel, dwork: DelayedWork, delay: int) -> bool:
    """schedule_delayed_work(dwork, delay): False if it was already pending.

    `delay` is in jiffies, as in C.  As __queue_delayed_work() does, a delay of 0
    queues the work at once; otherwise its timer expires `delay` ticks after the
    current one (jiffies + delay), on a tick: a work that re-arms itself runs at
    most once a jiffy, never faster than the kernel's timer wheel could fire it."""
    if not 0 <= delay <= MAX_JIFFY_OFFSET:
        raise ValueError(f"queue_delayed_work: delay {delay} is not 0 to MAX_JIFFY_OFFSET jiffies")
    if dwork.pending or dwork.canceling:
        return False
    dwork.pending = True

    def fire() -> None:
        dwork.timer = None
        _execute(kernel, dwork)
    now = kernel.now()
    dwork.timer = kernel.timers.call_at(now if delay == 0 else (ticks(now) + delay) / HZ, fire)
    return True


def _execute(kernel: Kernel, work: Work) -> None:
    """process_one_work() on an idle kworker."""
    if not work.pending:
        return
    work.pending = False
    worker = idle_kworker(kernel)
    work.worker = worker
    process_one_work = kernel.kallsyms.find_each(("process_one_work",))[0]

    def run() -> None:
        worker.frames.append(process_one_work)
        work.func(work)

    def finished(_: object) -> None:
        work.worker = None
        if not worker.exited:
            kernel.sched.rest(worker)
        work.done.wake_up(kernel, 0)
    kernel.code.start(worker, run).add_done_callback(finished)


def flush_work(kernel: Kernel, work: Work) -> bool:
    """Wait until the work is neither pending nor running; True if it had to wait."""
    if not work.pending and work.worker is None:
        return False
    if work.worker is not None and work.worker is kernel.code.current:
        raise RuntimeError("flush_work: a work item flushing itself deadlocks")
    wait_event(kernel, work.done, lambda: not work.pending and work.worker is None,
               TASK_UNINTERRUPTIBLE, None, FLUSH_WORK)
    return True


def cancel_work(kernel: Kernel, work: Work) -> bool:
    """cancel_delayed_work()/cancel_work(): drop a pending run; True if there was one."""
    if not work.pending:
        return False
    work.pending = False
    if isinstance(work, DelayedWork) and work.timer is not None:
        work.timer.cancel()
        work.timer = None
    return True


def cancel_work_sync(kernel: Kernel, work: Work) -> bool:
    """cancel_*_sync(): drop a pending run and wait for a running one.  While it waits
    the work is marked canceling, so a run that queues it again (a work that re-arms
    itself) queues nothing and the wait ends, as __cancel_work_timer() keeps the
    work's PENDING bit until the running instance has finished."""
    was_pending = cancel_work(kernel, work)
    work.canceling = True
    try:
        flush_work(kernel, work)
    finally:
        work.canceling = False
    return was_pending


def idle_kworker(kernel: Kernel) -> Task:
    """A kworker with nothing to do, as the workqueue would pick; a new one if all are busy."""
    sched = kernel.sched
    for task in sched.tasks.values():
        if (task.kind is TaskKind.KTHREAD and task.comm.startswith("kworker/") and task.activity is None
                and not task.comm.startswith("kworker/R-")  # a rescuer (6.6 on) runs no ordinary work
                and not task.frames and kernel.code.running(task) is None):
            return task
    template = next(t for t in sched.tasks.values() if t.comm.startswith("kworker/"))
    return sched.add(f"kworker/u{len(sched.cpu_online) * 2}:{len(sched.tasks)}", TaskKind.KTHREAD,
                     template.base, ppid=2)
