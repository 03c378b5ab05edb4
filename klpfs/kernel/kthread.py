"""Kernel threads for module code (kernel/kthread.c).

kthread_create() makes a task that waits in kthread() until woken;
wake_up_process() starts its thread function on a stack of its own;
kthread_stop() asks it to stop, wakes it, and waits for it to exit.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klpfs.kernel.sched import TASK_UNINTERRUPTIBLE, TaskKind
from klpfs.kernel.wait import WAIT_FOR_COMPLETION, WaitQueueHead, wait_event

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.sched import Task

KTHREAD_STOP = ("kthread_stop", *WAIT_FOR_COMPLETION)


@dataclass(eq=False)
class Kthread:
    """struct kthread: what kthread_stop() and kthread_should_stop() look at."""

    threadfn: Callable[[object], object]
    data: object
    started: bool = False
    should_stop: bool = False
    exited: bool = False
    result: object = 0
    exit_wait: WaitQueueHead = field(default_factory=WaitQueueHead)


class Kthreads:
    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self._threads: dict[int, Kthread] = {}
        kernel.sched.task_notifiers.append(self._task_event)

    def create(self, threadfn: Callable[[object], object], data: object, comm: str) -> Task:
        """kthread_create(): a new kernel thread, not yet running its function."""
        kernel = self._kernel
        task = kernel.sched.add(comm, TaskKind.KTHREAD, kernel.sched.kthread_base(), ppid=2)
        self._threads[task.pid] = Kthread(threadfn, data)
        return task

    def wake_up_process(self, task: Task) -> bool:
        """Start a created kthread; wake any other task that sleeps (TASK_NORMAL)."""
        kt = self._threads.get(task.pid)
        if kt is not None and not kt.started:
            kt.started = True
            self._kernel.code.start(task, lambda: self._main(task, kt))
            return True
        if task.activity is not None and task.state != "R":
            self._kernel.sched.wake(task)
            return True
        return False

    def _main(self, task: Task, kt: Kthread) -> None:
        """kthread(): run the thread function unless stopped first, then do_exit."""
        kt.result = -errno.EINTR if kt.should_stop else kt.threadfn(kt.data)
        self._kernel.sched.exit(task)

    def should_stop(self) -> bool:
        task = self._kernel.code.current
        kt = self._threads.get(task.pid) if task is not None else None
        return kt is not None and kt.should_stop

    def stop(self, task: Task) -> object:
        """kthread_stop(): the thread's return value once it has exited."""
        kt = self._threads.get(task.pid)
        if kt is None:
            raise RuntimeError(f"kthread_stop: {task.comm}:{task.pid} is not a kthread")
        kt.should_stop = True
        if not kt.exited:
            if not kt.started:
                kt.started = True
                self._kernel.code.start(task, lambda: self._main(task, kt))
            else:
                self.wake_up_process(task)
            wait_event(self._kernel, kt.exit_wait, lambda: kt.exited, TASK_UNINTERRUPTIBLE, None, KTHREAD_STOP)
        return kt.result

    def _task_event(self, event: str, task: Task) -> None:
        if event != "exit":
            return
        kt = self._threads.get(task.pid)
        if kt is not None:
            kt.exited = True
            kt.exit_wait.wake_up(self._kernel, 0)
