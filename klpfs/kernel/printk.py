"""The kernel log: a ring of records with levels and timestamps.

pr_debug lines are dropped unless debug is switched on, as with a distro
kernel's CONFIG_DYNAMIC_DEBUG where they are off until enabled (spec §0).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

KERN_EMERG, KERN_ALERT, KERN_CRIT, KERN_ERR, KERN_WARNING, KERN_NOTICE, KERN_INFO, KERN_DEBUG = range(8)
LEVEL_NAMES = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
LOG_BUF_RECORDS = 1 << 14


@dataclass(frozen=True, slots=True)
class LogRecord:
    seq: int
    level: int
    timestamp: float
    text: str

    def format(self) -> str:
        """The line as dmesg prints it."""
        return f"[{self.timestamp:12.6f}] {self.text}"


class Printk:
    """printk(): append, tell listeners (dmesg -w), forget the oldest past the ring size."""

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.records: deque[LogRecord] = deque(maxlen=LOG_BUF_RECORDS)
        self.debug_enabled = False
        self.listeners: list[Callable[[LogRecord], None]] = []
        self._seq = 0

    def printk(self, level: int, text: str) -> None:
        if level == KERN_DEBUG and not self.debug_enabled:
            return
        record = LogRecord(self._seq, level, self._now(), text)
        self._seq += 1
        self.records.append(record)
        for listener in self.listeners:
            listener(record)

    def lines(self) -> list[str]:
        """The texts currently in the ring, oldest first (what tests compare)."""
        return [r.text for r in self.records]
