"""The kernel log: a ring of records with levels and timestamps.

Every record printed is kept, KERN_DEBUG ones too: whether a pr_debug()
prints at all is its dynamic debug callsite's business (klpfs.kernel.dyndbg).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

KERN_EMERG, KERN_ALERT, KERN_CRIT, KERN_ERR, KERN_WARNING, KERN_NOTICE, KERN_INFO, KERN_DEBUG = range(8)
LEVEL_NAMES = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
LOG_BUF_RECORDS = 1 << 14
CONSOLE_LOGLEVEL_MIN = 1
CONSOLE_LOGLEVEL_DEFAULT = 7
CONSOLE_LOGLEVEL_MOTORMOUTH = 15
MESSAGE_LOGLEVEL_DEFAULT = 4
CONSOLE_LOG_MAX = 1024
"""The longest formatted record, prefix included (kernel/printk/printk.c)."""
LOG_LINE_MAX = CONSOLE_LOG_MAX - 32
"""CONSOLE_LOG_MAX - PREFIX_MAX (32 without CONFIG_PRINTK_CALLER, as Debian builds):
the most vprintk_store() reserves for one record's text, its terminating NUL included."""
KERN_PREFIX_LEN = 2
"""KERN_SOH and the level digit: printk_sprint() formats them into the reserve, then strips them."""


LOG_KERN, LOG_USER = 0, 1
"""Syslog facilities: printk's records are LOG_KERN, writes to /dev/kmsg LOG_USER unless they say."""
LOG_NEWLINE, LOG_CONT = 2, 8
"""printk_info flags: the text ended with a newline; it is a KERN_CONT fragment (shown as 'c')."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One printk_info and its text.

    `text` holds the kernel's bytes decoded with surrogateescape, so a write
    of arbitrary bytes to /dev/kmsg comes back byte for byte.  `caller` is
    printk_caller_id(): a task's pid, or 0x80000000 + CPU outside task context.
    """

    seq: int
    level: int
    timestamp: float
    """Seconds since boot, whole microseconds: what /dev/kmsg and dmesg show."""
    text: str
    facility: int = LOG_KERN
    flags: int = LOG_NEWLINE
    caller: int = 0
    dev_info: tuple[tuple[str, str], ...] = ()
    """(KEY, VALUE) pairs dev_printk() attaches (SUBSYSTEM, DEVICE); /dev/kmsg shows them."""

    @property
    def usec(self) -> int:
        return round(self.timestamp * 1_000_000)

    def format(self) -> str:
        """The line as dmesg prints it."""
        return f"[{self.timestamp:12.6f}] {self.text}"


def truncate_record(text: str, limit: int = LOG_LINE_MAX - 1) -> str:
    """The text vprintk_store() keeps: printk_sprint() formats into the LOG_LINE_MAX
    bytes reserved, so at most LOG_LINE_MAX - 1 bytes of it, fewer by the prefix it
    strips (a character cut in two keeps its first bytes, as the kernel's byte buffer does)."""
    if len(text) <= limit // 4:
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte: count characters
        return text[:limit]
    return text if len(data) <= limit else data[:limit].decode("utf-8", "surrogateescape")


class Printk:
    """printk(): append, tell listeners (dmesg -w), forget the oldest past the ring size."""

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.records: deque[LogRecord] = deque(maxlen=LOG_BUF_RECORDS)
        self.listeners: list[Callable[[LogRecord], None]] = []
        self._seq = 0
        self.clear_seq = 0
        """clear_seq: where SEEK_DATA on /dev/kmsg and syslog's READ_ALL start."""
        self.caller_id: Callable[[], int] = lambda: 0
        """printk_caller_id() for records the kernel itself prints (the Kernel sets it)."""
        self.console_printk = [CONSOLE_LOGLEVEL_DEFAULT, MESSAGE_LOGLEVEL_DEFAULT, CONSOLE_LOGLEVEL_MIN,
                               CONSOLE_LOGLEVEL_DEFAULT]
        """console_printk[]: console_loglevel (console_printk[0]), default_message_loglevel,
        minimum_console_loglevel, default_console_loglevel.  Only stored: no console is emulated."""

    def printk(self, level: int, text: str) -> None:
        """printk(KERN_<level> "..."): the level's prefix took its bytes of the reserve."""
        self.emit(level, truncate_record(text, LOG_LINE_MAX - 1 - KERN_PREFIX_LEN))

    def emit(self, level: int, text: str, facility: int = LOG_KERN, caller: int | None = None,
             flags: int = LOG_NEWLINE) -> LogRecord:
        """vprintk_store(): one record, whatever its level (/dev/kmsg writes come here directly)."""
        record = LogRecord(self._seq, level, round(self._now() * 1_000_000) / 1_000_000, truncate_record(text),
                           facility, flags, self.caller_id() if caller is None else caller)
        self._seq += 1
        self.records.append(record)
        for listener in self.listeners:
            listener(record)
        return record

    # -- reading by sequence number (the ring buffer's prb_* readers) -----------

    @property
    def first_seq(self) -> int:
        """prb_first_valid_seq(): the oldest record still in the ring."""
        return self.records[0].seq if self.records else self._seq

    @property
    def next_seq(self) -> int:
        """prb_next_seq(): the number the next record will get."""
        return self._seq

    def read_valid(self, seq: int) -> LogRecord | None:
        """prb_read_valid(): the record numbered seq, or the oldest after it if
        the ring has dropped it (the caller sees the jump), or None if it is yet to come."""
        if seq >= self._seq:
            return None
        return self.records[max(seq - self.first_seq, 0)]

    def clear(self) -> None:
        """syslog(SYSLOG_ACTION_CLEAR), `dmesg -C`: readers that honour it start after what is here now."""
        self.clear_seq = self._seq

    def lines(self) -> list[str]:
        """The texts currently in the ring, oldest first (what tests compare)."""
        return [r.text for r in self.records]
