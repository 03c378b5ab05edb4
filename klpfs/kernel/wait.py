"""Sleeping: schedule_timeout and msleep, completions, wait queues and
mutexes (kernel/time/timer.c, kernel/sched/completion.c, kernel/sched/wait.c,
kernel/locking/mutex.c), for module code running as a task.

A sleep leaves the task inside the sleeping primitive's own functions, on
top of the module functions it was called from, so /proc/<pid>/stack and
the livepatch stack check see what they would see in the kernel.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from klpfs.kernel.sched import TASK_INTERRUPTIBLE, TASK_RUNNING, TASK_UNINTERRUPTIBLE
from klpfs.kernel.timers import HZ

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.sched import Task

MAX_SCHEDULE_TIMEOUT = None
"""schedule_timeout() without a timeout: until woken."""

SCHEDULE = ("schedule", "__schedule")
SCHEDULE_TIMEOUT = ("schedule_timeout", *SCHEDULE)
WAIT_FOR_COMPLETION = ("wait_for_completion", "__wait_for_common", *SCHEDULE_TIMEOUT)
MUTEX_LOCK = ("mutex_lock", "__mutex_lock", "schedule_preempt_disabled", *SCHEDULE)


def check_seconds(seconds: float | None) -> None:
    """A timeout must be a finite, non-negative number of seconds (or None: forever)."""
    if seconds is not None and not 0 <= seconds < float("inf"):
        raise ValueError(f"invalid timeout {seconds!r}")


def sleep(kernel: Kernel, state: str, seconds: float | None, frames: tuple[str, ...]) -> float:
    """The current task's code sleeps inside `frames` until woken or the timeout;
    returns the seconds left (0 once the timeout has passed, as schedule_timeout)."""
    check_seconds(seconds)
    code = kernel.code
    code.check_sleep()
    task = code.current
    assert task is not None
    deadline = None if seconds is None else kernel.now() + seconds
    kernel.sched.sleep_code(task, state, seconds, kernel.kallsyms.find_each(frames),
                            lambda: code.resume(task))
    code.block()
    return 0.0 if deadline is None else max(0.0, deadline - kernel.now())


def schedule_timeout(kernel: Kernel, state: str, seconds: float | None) -> float:
    return sleep(kernel, state, seconds, SCHEDULE_TIMEOUT)


def msleep(kernel: Kernel, msecs: int, interruptible: bool = False) -> int:
    """msleep(); msleep_interruptible() returns early only for a real signal,
    which kernel threads never have, so both sleep the whole time here."""
    name = "msleep_interruptible" if interruptible else "msleep"
    state = TASK_INTERRUPTIBLE if interruptible else TASK_UNINTERRUPTIBLE
    # Jiffies resolution: msleep(m) sleeps msecs_to_jiffies(m) + 1 ticks.
    left = (-(-max(0, msecs) * HZ // 1000) + 1) / HZ
    while left > 0:
        left = sleep(kernel, state, left, (name, *SCHEDULE_TIMEOUT))
    return 0


def busy_wait(kernel: Kernel, seconds: float, name: str) -> None:
    """mdelay()/udelay(): the task spins on its CPU inside `name` for the time."""
    check_seconds(seconds)
    code = kernel.code
    code.check_sleep()
    task = code.current
    assert task is not None
    kernel.sched.sleep_code(task, TASK_RUNNING, seconds, kernel.kallsyms.find_each((name,)),
                            lambda: code.resume(task))
    code.block()


class WaitQueueHead:
    """wait_queue_head_t: the tasks waiting, woken in order."""

    def __init__(self) -> None:
        self.waiters: deque[Task] = deque()

    def wake_up(self, kernel: Kernel, nr: int = 1, states: str = TASK_INTERRUPTIBLE + TASK_UNINTERRUPTIBLE) -> None:
        """Wake up to nr waiters in one of `states` (0: all)."""
        woken = 0
        for task in list(self.waiters):
            if nr and woken >= nr:
                break
            if task.state in states:
                self.waiters.remove(task)
                kernel.sched.wake(task)
                woken += 1


def wait_event(kernel: Kernel, wq: WaitQueueHead, condition: Callable[[], object], state: str,
               seconds: float | None = None, frames: tuple[str, ...] = SCHEDULE) -> float | None:
    """wait_event*(): sleep until condition() holds; with a timeout, the seconds
    left (at least a tick when it held) or 0 when it timed out."""
    check_seconds(seconds)
    left = seconds
    while not condition():
        if left is not None and left <= 0:
            return 0.0
        wq.waiters.append(kernel.code.current)  # type: ignore[arg-type]
        try:
            remaining = sleep(kernel, state, left, frames)
        finally:
            if kernel.code.current in wq.waiters:
                wq.waiters.remove(kernel.code.current)  # type: ignore[arg-type]
        if left is not None:
            left = remaining
    return None if left is None else max(left, 1 / HZ)


class Completion:
    """struct completion: a count of done() and the waiters."""

    def __init__(self) -> None:
        self.done = 0
        self.wait = WaitQueueHead()

    def reinit(self) -> None:
        self.done = 0

    def complete(self, kernel: Kernel, all: bool = False) -> None:
        self.done = 1 << 30 if all else self.done + 1
        self.wait.wake_up(kernel, 0 if all else 1)

    def wait_for(self, kernel: Kernel, state: str = TASK_UNINTERRUPTIBLE, seconds: float | None = None,
                 frames: tuple[str, ...] = WAIT_FOR_COMPLETION) -> float | None:
        """Sleep until completed; consumes one done.  Returns like wait_event()."""
        left = wait_event(kernel, self.wait, lambda: self.done > 0, state, seconds, frames)
        if left == 0.0:
            return 0.0
        if self.done < 1 << 30:
            self.done -= 1
        return left


class Mutex:
    """struct mutex: one owner; others sleep in mutex_lock() until it is unlocked."""

    def __init__(self) -> None:
        self.owner: Task | None = None
        self.wait = WaitQueueHead()

    def lock(self, kernel: Kernel) -> None:
        me = kernel.current
        if self.owner is me:
            raise RuntimeError("mutex_lock: recursive locking (deadlock)")
        wait_event(kernel, self.wait, lambda: self.owner is None, TASK_UNINTERRUPTIBLE, None, MUTEX_LOCK)
        self.owner = me

    def trylock(self, kernel: Kernel) -> bool:
        if self.owner is not None:
            return False
        self.owner = kernel.current
        return True

    def unlock(self, kernel: Kernel) -> None:
        self.owner = None
        self.wait.wake_up(kernel, 1)
