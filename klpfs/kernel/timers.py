"""Kernel timers and delayed work on trio's clock.

Engine operations are synchronous; only time passing is asynchronous.  One
trio task (`run`) sleeps until the earliest deadline and fires what is due,
so under trio.testing.MockClock a multi-second kernel story is instant.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

HZ = 250
"""CONFIG_HZ of Debian's kernels: the tick, the granularity of every timer."""
TICK = 1.0 / HZ
LONG_MAX = (1 << 63) - 1
MAX_JIFFY_OFFSET = (LONG_MAX >> 1) - 1
"""The longest relative timeout the kernel represents (include/linux/jiffies.h):
msecs_to_jiffies() and usecs_to_jiffies() saturate at it."""
MAX_SECONDS = MAX_JIFFY_OFFSET // HZ
"""The longest time, in seconds, klpfs accepts anywhere a time enters the emulator
(MAX_JIFFY_OFFSET jiffies, about 585 million years at HZ=250)."""


def time_problem(seconds: object) -> str | None:
    """Why `seconds` is no time the kernel could wait, or None if it is one.

    A time becomes jiffies on its way into the kernel, so it must be a number
    from 0 to MAX_JIFFY_OFFSET jiffies: NaN, infinities, negative times and
    longer ones have no jiffies value (and a NaN deadline would stop the timers)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return f"must be a number of seconds, not {seconds!r}"
    if isinstance(seconds, float) and not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        return f"{seconds!r} is not a time: must be from 0 to {MAX_SECONDS} seconds (MAX_JIFFY_OFFSET jiffies)"
    return None


def seconds_to_jiffies(seconds: float) -> int:
    """usecs_to_jiffies() of a time taken to whole microseconds: rounded up to whole
    jiffies, so any time above zero is at least one tick, as the timer wheel has
    no finer granularity; 0 stays 0 (queued at once)."""
    if seconds <= 0:
        return 0
    usecs = max(1, round(seconds * 1_000_000))
    return min(-(-usecs * HZ // 1_000_000), MAX_JIFFY_OFFSET)


def ticks(seconds: float) -> int:
    """The jiffies counted `seconds` after boot; a tick that floating point puts a hair
    before its instant still counts (no 749-jiffy gaps in a 750-jiffy period)."""
    return int(seconds * HZ + 1e-6)


class Timer:
    """A pending call; cancel() before it fires to drop it."""

    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _call(fn: Callable[[], None]) -> None:
    fn()


class Timers:
    """Deadline-ordered callbacks, fired by the one `run` task in order.

    `speed` is emulated seconds per second of trio's clock: 1 is the kernel's
    own timing; 10 runs a stuck transition's retries ten times a second.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self.boot_time = trio.current_time()
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._scope: trio.CancelScope | None = None
        self.guard: Callable[[Callable[[], None]], None] = _call
        """How a callback is called: the kernel contains what a callback's code may raise,
        so that no fault of one timer stops the others."""

    def now(self) -> float:
        """Emulated seconds since boot."""
        return (trio.current_time() - self.boot_time) * self.speed

    def _clock(self, when: float) -> float:
        """trio's clock when `when` emulated seconds since boot come."""
        return self.boot_time + when / self.speed

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Call fn at `when` seconds since boot; a NaN is refused here, before it can
        become the deadline `run` sleeps to (trio would raise there, stopping every timer)."""
        if math.isnan(when):
            raise ValueError("a timer cannot expire at NaN")
        timer = Timer(when, fn)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, self._clock(when))
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + delay, fn)

    def fire_due(self) -> None:
        """Run every callback whose deadline has passed, earliest first.

        Only those armed before this pass: one armed while it runs for a time already
        come (a work that queues itself again at once) waits for the next pass, after
        `run` has let the rest of the daemon in, as a kworker running the same work
        over and over still lets the kernel's other tasks run (process_one_work()'s
        cond_resched() in workqueue.c)."""
        now = self.now()
        armed = next(self._order)
        while self._heap and self._heap[0][0] <= now and self._heap[0][1] < armed:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                self.guard(timer.fn)

    async def run(self) -> None:
        while True:
            deadline = self._clock(self._heap[0][0]) if self._heap else math.inf
            with trio.CancelScope(deadline=deadline) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            self.fire_due()


def round_jiffies_relative(now: float, delay: float) -> float:
    """round_jiffies_relative(): a delay whose expiry falls on a whole second.

    Like the kernel, expiries less than a quarter second past a whole second
    are rounded down, others up, and a result in the past keeps the delay.
    """
    expiry = now + delay
    rem = expiry % 1.0
    rounded = expiry - rem if rem < 0.25 else expiry - rem + 1.0
    return rounded - now if rounded > now else delay


class DelayedWork:
    """schedule_delayed_work(): arming an already-pending work does nothing (queue_delayed_work_on()
    in kernel/workqueue.c)."""

    def __init__(self, timers: Timers, fn: Callable[[], None]):
        self._timers = timers
        self._fn = fn
        self._timer: Timer | None = None

    def schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = self._timers.call_later(delay, self._run)

    @property
    def expires(self) -> float | None:
        """When the pending work runs, in emulated seconds since boot (its timer's
        expires while delayed_work_pending()); None when it is not pending."""
        return None if self._timer is None else self._timer.deadline

    def _run(self) -> None:
        self._timer = None
        self._fn()
