"""/dev/kmsg on the emulated log, as kernel/printk/printk.c's devkmsg_* do it.

Only the kernel's side is here, without any file system: what a write
stores, what a read returns, where a seek goes.  The FUSE layer
(klpfs/fs/kmsg.py) turns syscalls into these calls and does the waiting.

* a write is one record: an optional "<N>" prefix gives the level (N & 7) and
  the facility (N >> 3, LOG_USER when 0), the text stops at a NUL, is cut to
  LOG_LINE_MAX - 1 bytes and loses one trailing newline; writes longer than
  LOG_LINE_MAX are EINVAL; more than 10 writes in 5 s on one open file are
  dropped, and counted when it is closed (the default printk.devkmsg=ratelimit);
* a read is one record in the extended format
  ``prio,seq,usec,flags[,caller];text\\n`` plus `` KEY=VALUE\\n`` lines, with
  bytes outside printable ASCII and the backslash as ``\\xNN``; EINVAL (the
  record is consumed all the same) if it does not fit, EPIPE once if the
  reader's next record was dropped from the ring, EAGAIN if none is there yet.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable
from dataclasses import dataclass

from klpfs.kernel.printk import KERN_WARNING, LOG_CONT, LOG_KERN, LOG_NEWLINE, LOG_USER, LogRecord, Printk

CONSOLE_LOG_MAX = 1024
PREFIX_MAX = 32
"""Without CONFIG_PRINTK_CALLER (Debian's and Ubuntu's kernels); 48 with it."""
PREFIX_MAX_CALLER = 48
RATELIMIT_INTERVAL = 5.0
"""DEFAULT_RATELIMIT_INTERVAL (5 * HZ), in seconds of the emulated clock."""
RATELIMIT_BURST = 10
"""DEFAULT_RATELIMIT_BURST."""


def log_line_max(printk_caller: bool = False) -> int:
    """LOG_LINE_MAX: the longest write /dev/kmsg takes, and one more than the longest text."""
    return CONSOLE_LOG_MAX - (PREFIX_MAX_CALLER if printk_caller else PREFIX_MAX)


@dataclass(frozen=True)
class KmsgLine:
    """What one write to /dev/kmsg asks to store."""

    facility: int
    level: int
    text: bytes
    flags: int


def parse_write(data: bytes, default_level: int, printk_caller: bool = False) -> KmsgLine:
    """devkmsg_write's "<N>" prefix, then vprintk_store's "%s" formatting of the rest.

    The prefix is simple_strtoul's: decimal digits (none is 0), kept modulo
    2**32, and only if '>' follows.  The text then ends at a NUL and is cut
    to fit the reserved size (LOG_LINE_MAX with its terminating NUL) before
    one trailing newline is stripped.
    """
    level, facility, line = default_level, LOG_USER, data
    if line[:1] == b"<":
        digits = len(line) - 1 - len(line[1:].lstrip(b"0123456789"))
        if line[1 + digits:2 + digits] == b">":
            u = int(line[1:1 + digits] or b"0") & 0xFFFFFFFF
            level = u & 7
            if (u >> 3) & 0xFF:
                facility = (u >> 3) & 0xFF
            line = line[2 + digits:]
    text = line.split(b"\0", 1)[0][:log_line_max(printk_caller) - 1]
    flags = 0
    if text.endswith(b"\n"):
        text = text[:-1]
        flags |= LOG_NEWLINE
    return KmsgLine(facility, level, text, flags)


def _escape(data: bytes, end: bytes) -> bytes:
    """msg_add_ext_text(): non-printable bytes and the backslash as \\xNN, then `end`."""
    return b"".join(b"\\x%02x" % c if c < 0x20 or c >= 0x7F or c == 0x5C else bytes((c,))
                    for c in data) + end


def format_ext(record: LogRecord, printk_caller: bool = False) -> bytes:
    """info_print_ext_header() + msg_print_ext_body(): what one read of /dev/kmsg returns."""
    caller = b""
    if printk_caller:
        kind = "C" if record.caller & 0x80000000 else "T"
        caller = f",caller={kind}{record.caller & ~0x80000000}".encode()
    header = b"%d,%d,%d,%c%s;" % ((record.facility << 3) | record.level, record.seq, record.usec,
                                  ord("c") if record.flags & LOG_CONT else ord("-"), caller)
    body = _escape(record.text.encode("utf-8", "surrogateescape"), b"\n")
    for key, value in record.dev_info:
        if value:  # msg_add_dict_text() skips an empty value
            body += b" " + _escape(key.encode(), b"=") + _escape(value.encode(), b"\n")
    return header + body


@dataclass
class Ratelimit:
    """___ratelimit() with RATELIMIT_MSG_ON_RELEASE: at most `burst` per `interval`;
    the rest are counted in `missed`, reported by ratelimit_state_exit()."""

    now: Callable[[], float]
    interval: float = RATELIMIT_INTERVAL
    burst: int = RATELIMIT_BURST
    begin: float | None = None
    printed: int = 0
    missed: int = 0

    def __call__(self) -> bool:
        now = self.now()
        if self.begin is None:
            self.begin = now
        if now > self.begin + self.interval:  # time_is_before_jiffies(begin + interval)
            self.begin, self.printed = now, 0
        if self.burst > self.printed:
            self.printed += 1
            return True
        self.missed += 1
        return False


class DevkmsgUser:
    """struct devkmsg_user: one open file's next record and its write ratelimit.

    `comm` and `pid` are the opener's: the name ratelimit_state_exit() reports
    and the caller id of the records it writes (the process is a real one,
    outside the emulated task list).
    """

    def __init__(self, log: Printk, now: Callable[[], float], comm: str = "", pid: int = 0,
                 printk_caller: bool = False) -> None:
        self.log = log
        self.comm = comm
        self.pid = pid
        self.printk_caller = printk_caller
        self.ratelimit = Ratelimit(now)
        self.seq = log.first_seq  # devkmsg_open()

    def write(self, data: bytes) -> int:
        """devkmsg_write(): the byte count (even when ratelimited), or -EINVAL."""
        if len(data) > log_line_max(self.printk_caller):
            return -errno.EINVAL
        if not self.ratelimit():
            return len(data)
        line = parse_write(bytes(data), self.log.console_printk[1], self.printk_caller)
        self.log.emit(line.level, line.text.decode("utf-8", "surrogateescape"), line.facility,
                      caller=self.pid, flags=line.flags)
        return len(data)

    def read(self, count: int) -> bytes | int:
        """devkmsg_read() without the wait: the next record, or -EAGAIN, -EPIPE, -EINVAL."""
        record = self.log.read_valid(self.seq)
        if record is None:
            return -errno.EAGAIN
        if record.seq != self.seq:
            self.seq = record.seq  # our last seen message is gone: report and reset
            return -errno.EPIPE
        data = format_ext(record, self.printk_caller)
        self.seq = record.seq + 1
        return -errno.EINVAL if len(data) > count else data

    def poll(self) -> int:
        """devkmsg_poll(): readable once a record is there, in error too if ours was dropped."""
        record = self.log.read_valid(self.seq)
        if record is None:
            return 0
        if record.seq != self.seq:
            return select.POLLIN | select.POLLRDNORM | select.POLLERR | select.POLLPRI
        return select.POLLIN | select.POLLRDNORM

    def llseek(self, whence: int) -> int:
        """devkmsg_llseek() with offset 0: 0, or -EINVAL for another whence."""
        if whence == os.SEEK_SET:
            self.seq = self.log.first_seq
        elif whence == os.SEEK_DATA:
            self.seq = self.log.clear_seq  # after the last SYSLOG_ACTION_CLEAR (dmesg -C)
        elif whence == os.SEEK_END:
            self.seq = self.log.next_seq
        else:
            return -errno.EINVAL
        return 0

    def release(self) -> None:
        """devkmsg_release(): ratelimit_state_exit() reports the writes it dropped."""
        if self.ratelimit.missed:
            self.log.emit(KERN_WARNING, f"{self.comm}: {self.ratelimit.missed} output lines suppressed "
                          "due to ratelimiting", LOG_KERN, caller=self.pid)
            self.ratelimit.missed = 0
