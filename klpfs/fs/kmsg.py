"""/dev/kmsg through FUSE: klpfs/kernel/devkmsg.py's semantics behind real syscalls.

The file is a regular file (S_IFREG, 0644), not a character device: for an
S_IFCHR inode the kernel would open the device its rdev names (the host's
own /dev/kmsg, or nothing on a nodev mount) and never send us a read.

What FUSE hides, and how each open file (a `KmsgFile`) makes up for it:

* Seeks never reach the daemon: the kernel answers lseek(2) itself with the
  file offset (pyfuse3 has no FUSE_LSEEK handler, so SEEK_DATA falls back to
  generic_file_llseek too).  Two things give them away.  Reads are direct
  I/O, so each carries the offset the kernel keeps: after a read of n bytes
  at o the next comes at o + n unless the reader seeked, SEEK_SET 0 brings
  it to 0 and SEEK_END to the file's size, KMSG_SIZE, further than any run
  of reads gets.  And for SEEK_END and SEEK_DATA the kernel first asks for
  the file's attributes (fuse_update_attributes), which are never cached,
  so the daemon's getattr learns when the seek happened and by which
  process: the record position is taken then, not at the next read.  (The
  first such ask since the last read counts: opening the file again to
  write to it asks too, and a reader may do that after its seek.)
* SEEK_DATA (the first record after the last clear) leaves the offset at 0
  like SEEK_SET.  A read at 0 after the opener's process asked for the
  attributes is taken for SEEK_DATA: util-linux dmesg seeks SEEK_DATA right
  after opening.  A stat or fstat(2) asks too, so a reader that fstats and
  reads from 0 (cat) starts after the clear point, where the kernel starts
  at the first record; a read at 0 without is SEEK_SET, or the first read.
  A seek by another process than the opener is seen only at the next read.
* lseek returns the offset the kernel computed (KMSG_SIZE for SEEK_END),
  not devkmsg_llseek's 0, and a non-zero offset is not ESPIPE.
* open() receives the file's flags as open(2) left them, less O_CREAT,
  O_EXCL and O_NOCTTY (O_CLOEXEC belongs to the descriptor; O_LARGEFILE
  is added): O_NONBLOCK is there, O_TRUNC and O_APPEND too.  Reads do not
  get the flags, so an O_NONBLOCK set later with fcntl(2) is not seen.
* A blocking read waits in the daemon.  FUSE tells the daemon of a signal
  with FUSE_INTERRUPT, which pyfuse3 does not pass on, and the reader cannot
  even die meanwhile; so the wait looks at the opener's pending signals
  every INTERRUPT_POLL seconds and answers EINTR as wait_event_interruptible
  would (a read is not restarted after a handled signal, as the kernel's is).
  Each waiting read holds one of pyfuse3's worker tasks (99 at most).
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable
from typing import Protocol

import trio

from klpfs.kernel.devkmsg import DevkmsgUser
from klpfs.kernel.printk import LogRecord, Printk

log = logging.getLogger(__name__)

KMSG_SIZE = 1 << 62
"""st_size of dev/kmsg: where SEEK_END puts the offset."""
INTERRUPT_POLL = 0.1
"""Seconds (real time) between looks at a blocked reader's pending signals."""


class PollHandle(Protocol):
    def notify(self) -> None: ...


def signal_pending(pid: int) -> bool:
    """Whether task pid has a signal pending that it does not block (/proc/PID/status).

    A fatal signal adds SIGKILL to every thread's own pending set; a gone
    task is no reason to stop waiting (the reader is then someone else)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except (OSError, ValueError):
        return False
    try:
        pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
        return bool(pending & ~int(fields["SigBlk"], 16))
    except (KeyError, ValueError):
        return False


def task_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().rstrip("\n")
    except OSError:
        return ""


def task_tgid(pid: int) -> int:
    """The process a thread belongs to (its own pid if /proc does not say)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pid


class Kmsg:
    """The device: opens files, wakes waiting readers and pollers when a record arrives."""

    def __init__(self, printk: Printk, now: Callable[[], float], printk_caller: bool = False) -> None:
        self.printk = printk
        self.now = now
        self.printk_caller = printk_caller
        """CONFIG_PRINTK_CALLER: ",caller=T<pid>" in each record's header."""
        self.arrivals = trio.lowlevel.ParkingLot()
        self.pollers: dict[KmsgFile, PollHandle] = {}
        self.files: set[KmsgFile] = set()
        self.closed = False
        """The mount is going away: reads do not wait any more."""
        printk.listeners.append(self._record_added)

    def open(self, flags: int, pid: int) -> KmsgFile:
        """devkmsg_open()."""
        user = DevkmsgUser(self.printk, self.now, task_comm(pid), pid, self.printk_caller)
        file = KmsgFile(self, user, bool(flags & os.O_NONBLOCK), pid, task_tgid(pid))
        self.files.add(file)
        return file

    def getattr(self, pid: int) -> None:
        """Maybe a seek (SEEK_END, SEEK_DATA) by pid's process: its open files note where the log is."""
        if self.files:
            tgid = task_tgid(pid)
            for file in self.files:
                if file.tgid == tgid and file.seek_mark is None:
                    file.seek_mark = self.printk.next_seq

    def shutdown(self) -> None:
        self.closed = True
        self.arrivals.unpark_all()

    def _record_added(self, record: LogRecord) -> None:
        """A printk listener: it must not fail the printk."""
        self.arrivals.unpark_all()
        pollers, self.pollers = self.pollers, {}
        for handle in pollers.values():
            try:
                handle.notify()
            except Exception:
                log.exception("poll notification failed")


class KmsgFile:
    """One open file: a devkmsg_user plus the offset its next read should come at."""

    def __init__(self, device: Kmsg, user: DevkmsgUser, nonblock: bool, pid: int, tgid: int) -> None:
        self.device = device
        self.user = user
        self.nonblock = nonblock
        self.pid = pid
        self.tgid = tgid
        self.offset: int | None = None
        """Where the next read comes if nobody seeks; None before the first read."""
        self.seek_mark: int | None = None
        """prb_next_seq() when the opener's process first asked for the attributes since the last read."""

    def _follow_seeks(self, offset: int) -> None:
        """Move the record position as the seek that led to this offset did (devkmsg_llseek)."""
        user, mark = self.user, self.seek_mark
        self.seek_mark = None
        if offset == KMSG_SIZE and (mark is not None or offset != self.offset):
            user.llseek(os.SEEK_END)
            if mark is not None:
                user.seq = mark  # where the end was when the seek happened
        elif offset == 0 and mark is not None:
            user.llseek(os.SEEK_DATA)
        elif offset == 0 and self.offset not in (None, 0):
            user.llseek(os.SEEK_SET)
        self.offset = offset

    async def read(self, offset: int, size: int) -> bytes | int:
        """devkmsg_read(): one record, or a negative errno."""
        self._follow_seeks(offset)
        while True:
            result = self.user.read(size)
            if result != -errno.EAGAIN or self.nonblock:
                break
            if self.device.closed:
                return -errno.ECONNABORTED  # what the reader would get from the connection's end
            with trio.move_on_after(INTERRUPT_POLL):
                await self.device.arrivals.park()
            if signal_pending(self.pid):
                return -errno.EINTR
        if isinstance(result, bytes):
            self.offset = offset + len(result)
        return result

    def write(self, offset: int, data: bytes) -> int:
        """devkmsg_write(): the offset does not matter."""
        return self.user.write(data)

    def poll(self, handle: PollHandle | None) -> int:
        """devkmsg_poll(); without a record yet, `handle` is notified when one comes.

        A poll carries no offset: after a seek seen by getattr, SEEK_END or
        SEEK_DATA, it answers ready if either would be (a read then settles
        which); a rewind to 0 that no read has shown yet is not seen."""
        log = self.user.log
        if self.seek_mark is not None:
            start = min(self.seek_mark, max(log.clear_seq, log.first_seq))
            mask = select.POLLIN | select.POLLRDNORM if log.next_seq > start else 0
        else:
            mask = self.user.poll()
        if not mask and handle is not None:
            self.device.pollers[self] = handle
        return mask

    def shutdown(self) -> None:
        self.device.shutdown()

    def release(self) -> None:
        """devkmsg_release()."""
        self.device.pollers.pop(self, None)
        self.device.files.discard(self)
        self.user.release()
