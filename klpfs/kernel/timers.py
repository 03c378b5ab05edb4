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
TICK = 1.0 / HZ


class Timer:
    """A pending call; cancel() before it fires to drop it."""

    __slots__ = ("deadline", "fn", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None]):
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


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

    def now(self) -> float:
        """Emulated seconds since boot."""
        return (trio.current_time() - self.boot_time) * self.speed

    def _clock(self, when: float) -> float:
        """trio's clock when `when` emulated seconds since boot come."""
        return self.boot_time + when / self.speed

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Call fn at `when` seconds since boot."""
        timer = Timer(when, fn)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, self._clock(when))
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self.now() + delay, fn)

    def fire_due(self) -> None:
        """Run every callback whose deadline has passed, earliest first."""
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.fn()

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
    """schedule_delayed_work(): arming an already-pending work does nothing (spec §8.4)."""

    def __init__(self, timers: Timers, fn: Callable[[], None]):
        self._timers = timers
        self._fn = fn
        self._timer: Timer | None = None

    def schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = self._timers.call_later(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        self._fn()
