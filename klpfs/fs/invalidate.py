"""Telling the kernel's FUSE caches about tree changes, without ever deadlocking.

The kernel caches our dentries and attributes for a long time (that is what
makes path walks cheap), so every structural change has to be pushed to it:

* a removed node: its dentry is invalidated, so the next lookup asks us and
  gets ENOENT (or finds a re-created node under the same name at once);
* a directory gaining or losing a subdirectory: its attributes (nlink).

A notification must not be sent from the trio thread: the kernel takes the
parent directory's inode lock to deliver it, and that lock may be held by a
process waiting for a reply only the trio thread can give.  So notifications
are queued here and delivered in batches from a worker thread.

Entries are invalidated without ``deleted=``: that variant also locks the
removed inode itself, which a writer holds while its store removes its own
file, so a handler could never wait for it.  Plain invalidation unhashes the
dentry (and with it the whole subtree), which is all lookups need; real sysfs
sends no inotify event on removal either.  For the same reason only the
topmost node of a removed subtree is sent.

Handlers that hand out values (open, read, write) first `settle()` the queue,
so whatever a process learns from a value (a transition finished, a patch is
gone) is already true of the dentry cache when it looks next.  Lookups and
readdirs never wait: their callers hold directory locks a delivery may need.

The kernel also caches file sizes and pages, which splice(2), sendfile(2)
and copy_file_range(2) read even from direct-I/O files: `SpliceSizes` keeps
those right for files opened for reading, and a file removed while open has
its pages dropped (see `Invalidator.file_went_stale`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Protocol

import pyfuse3
import trio

from klpfs.sysfs.kernfs import KernfsNode

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 2.0
"""Seconds a handler waits for deliveries; only a kernel-side stall reaches it."""


def release_at_least(release: str, version: tuple[int, int]) -> bool:
    """Whether a kernel release string ("6.1.0-18-amd64") is at least (major, minor)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match[1]), int(match[2])) >= version


PAGE_CACHE_SPLICE = release_at_least(os.uname().release, (6, 5))
"""Whether this kernel's splice reads a FUSE file through the page cache even with
FOPEN_DIRECT_IO: fuse_splice_read() is filemap_splice_read() since Linux 6.5; before,
the generic splice read called ->read_iter, a direct read that asked us every time."""


class Notifier(Protocol):
    """Where notifications go: from a worker thread, except those that cannot wait for
    a lock a process holds while it waits for us (SpliceSizes knows when)."""

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None: ...

    def invalidate_attrs(self, ino: int) -> None: ...

    def extend(self, ino: int, size: int) -> None:
        """Make the kernel's size of ino at least size (and forget its cached size)."""

    def invalidate_data(self, ino: int) -> None:
        """Drop the kernel's cached pages and attributes of ino."""


class FuseNotifier:
    """The kernel's FUSE module, through pyfuse3's session."""

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry(parent_ino, name)
        except FileNotFoundError:
            pass  # the kernel never cached that entry
        except OSError:
            log.exception("invalidating entry %r in inode %d", name, parent_ino)

    def invalidate_attrs(self, ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except FileNotFoundError:
            pass  # the kernel does not know that inode
        except OSError:
            log.exception("invalidating attributes of inode %d", ino)

    def extend(self, ino: int, size: int) -> None:
        """One byte stored at size - 1: fuse_notify_store() sets i_size to the end of
        what it stores when that is past it, and fuse_write_update_attr() marks the
        size stale, so the next stat asks us again."""
        try:
            pyfuse3.notify_store(ino, size - 1, b"\0")
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOSYS):  # not cached; a kernel before 2.6.36
                log.exception("extending inode %d to %d bytes", ino, size)

    def invalidate_data(self, ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("invalidating the pages of inode %d", ino)


class Invalidator:
    """Queue of changes to push to the kernel, and the task that pushes them.

    Changes are queued only while `run` is running, i.e. while something is
    mounted: before the mount the kernel has cached nothing.
    """

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._removed: list[KernfsNode] = []
        self._resized: list[KernfsNode] = []
        self._stale: dict[int, int] = {}
        self._queued = 0
        self._delivered = 0
        self._running = False
        self._wakeup = trio.Event()
        self._delivery = trio.lowlevel.ParkingLot()

    @property
    def pending(self) -> bool:
        """Whether some queued change has not reached the kernel yet."""
        return self._queued != self._delivered

    def node_removed(self, node: KernfsNode) -> None:
        if self._running:
            self._removed.append(node)
            self._note()

    def nlink_changed(self, directory: KernfsNode) -> None:
        if self._running:
            self._resized.append(directory)
            self._note()

    @property
    def notifier(self) -> Notifier:
        return self._notifier

    def file_went_stale(self, ino: int, size: int) -> None:
        """A file still open was removed: its handles must read ENODEV (kernfs_fop_read_iter()
        finds no active reference), never the pages a splice cached.  Its pages are
        dropped and its size made `size`, past any offset a handle reached, so the next
        splice asks us.  Delivered before the batch's entries: once a process sees
        the removal, no handle finds the old pages."""
        if self._running:
            self._stale[ino] = size
            self._note()

    def _note(self) -> None:
        self._queued += 1
        self._wakeup.set()

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Return once everything queued so far has been delivered."""
        target = self._queued
        with trio.move_on_after(timeout) as scope:
            while self._delivered < target:
                await self._delivery.park()
        if scope.cancelled_caught:
            log.warning("cache invalidation still pending after %.1fs", timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver batches until cancelled; a batch under way is always finished."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                upto = self._queued
                entries = [(node.parent.ino, node.name.encode("utf-8", "surrogateescape"))
                           for node in self._removed
                           if node.parent is not None and node.parent.active]
                dirs = {node.ino for node in self._resized if node.active}
                stale = dict(self._stale)
                self._removed.clear()
                self._resized.clear()
                self._stale.clear()
                await trio.to_thread.run_sync(self._deliver, entries, dirs, stale)
                self._delivered = upto
                self._delivery.unpark_all()
        finally:
            self._running = False
            self._removed.clear()
            self._resized.clear()
            self._stale.clear()
            self._delivered = self._queued
            self._delivery.unpark_all()

    def _deliver(self, entries: list[tuple[int, bytes]], dirs: set[int], stale: dict[int, int]) -> None:
        # Dropping pages waits for a page being read, which waits for us: a thread's work.
        for ino, size in stale.items():
            self._notifier.invalidate_data(ino)
            self._notifier.extend(ino, size)
        for parent_ino, name in entries:
            self._notifier.invalidate_entry(parent_ino, name)
        for ino in dirs:
            self._notifier.invalidate_attrs(ino)


class SpliceSizes:
    """Keeps the kernel's size of each file opened for reading fit for splice.

    With PAGE_CACHE_SPLICE a splice from one of our files (sendfile, splice,
    copy_file_range: busybox cat, shutil.copyfile) is filemap_splice_read(), which

    * reads nothing at or past the inode's i_size, the size we answer to stat:
      0 for a proc file, so a splice from one ends at once;
    * fetches missing pages with a FUSE_READ of whole pages and takes a short
      reply for the end of the file: fuse_short_read() lowers i_size to where the
      data ended (fuse_read_update_size()), so an attribute then stats as 2, not
      4096, and a later splice stops there even if the value has grown; an
      O_TRUNC open sets i_size to 0 (fuse_open() with atomic_o_trunc), and a
      failed store leaves it there;
    * serves pages it cached to handles already open, whatever we would say now.

    So when a file is opened for reading and no other handle has it open for
    reading, its i_size is made larger than any show before the open returns
    (`Notifier.extend`, which also marks the cached size stale: the next stat
    asks us and shows the file's own size).  fuse_open() then drops the file's
    pages, so the splice asks for the show, and the short reply trims i_size to
    its length: the value, then end of file.  Later opens while it is open share
    that size: the kernel keeps one per inode.

    Whatever changes attr_version while a page read of the file is in flight
    makes the kernel skip that read's trim (fuse_read_update_size()), and the
    splice returns the page's zeros after the value; so does a size made larger
    while a trimmed page is cached.  Our store does both, so it is made only
    while no other handle is open for reading (then no page read is in flight,
    and none holds the lock of a page the store writes, which it would wait for:
    the store runs in the trio thread), or to undo an O_TRUNC open (which dropped
    the pages).  While handles are open for reading, a size we hand out that is
    smaller than a show (a proc file's 0: shutil.copyfile stats before it
    splices) must not be applied, or their splices would stop there: the
    attributes are marked stale first (fuse_reverse_inval_inode() bumps
    attr_version), so the kernel shows the size to stat without applying it
    (fuse_change_attributes_i() drops a reply older than attr_version).  An
    attribute's 4096 holds any show: the kernel applies it, and drops the pages
    as the size changes; it is answered as expiring at once, as a splice may
    trim the size after it (stat would show 2 again).  Either way, later opens
    of the file ask for its attributes (fuse_permission()) until no handle is
    open for reading.  What is left: a page read in flight while another process
    stats or opens the file, which reads zeros.
    """

    def __init__(self, invalidator: Invalidator, enabled: bool) -> None:
        self.enabled = enabled
        self._invalidator = invalidator
        self._readers: dict[int, int] = {}
        """Open handles with read access, per inode."""
        self._end: dict[int, int] = {}
        """At least the kernel's size of each inode stored to: the end of our last store,
        or of a write past it.  It only grows (by a byte a store), so that a store always
        extends i_size, even past a size the kernel took from us and has not applied yet:
        extending is what marks the cached size stale."""

    def _extend(self, ino: int, bound: int) -> None:
        end = self._end.get(ino, bound) + 1
        self._invalidator.notifier.extend(ino, end)
        self._end[ino] = end

    def opened(self, ino: int, bound: int, reading: bool) -> None:
        """A handle was opened; no show of the file is longer than `bound`, and no size we
        answer for it larger.  Call it last: after its checks the open must succeed."""
        if not (self.enabled and reading):
            return
        others = self._readers.get(ino, 0)
        self._readers[ino] = others + 1
        if not others:
            self._extend(ino, bound)

    def released(self, ino: int, reading: bool) -> None:
        if not (self.enabled and reading):
            return
        left = self._readers.get(ino, 0) - 1
        if left > 0:
            self._readers[ino] = left
        else:
            self._readers.pop(ino, None)

    def handing_out(self, ino: int, size: int, bound: int) -> bool:
        """A regular file's attributes, with `size`, are about to be answered (lookup,
        getattr, readdir).  True: answer them with an attr_timeout of 0."""
        if not (self.enabled and self._readers.get(ino)):
            return False
        if size < bound:
            self._invalidator.notifier.invalidate_attrs(ino)  # no page lock: no wait
            return False
        return True

    def written(self, ino: int, bound: int, end: int) -> None:
        """A write ended at `end`: the kernel extends i_size to it."""
        if self.enabled:
            self._end[ino] = max(self._end.get(ino, bound), end)

    async def truncated(self, ino: int, bound: int) -> None:
        """An O_TRUNC open of the file has set its i_size to 0 (call it at its first write
        or its release): open handles must go on reading."""
        if self.enabled and self._readers.get(ino):
            # A page it writes may be locked by a read that waits for us: in a thread.
            await trio.to_thread.run_sync(self._extend, ino, bound)

    def removed(self, ino: int, bound: int) -> None:
        """The file is gone; handles still open must reach us, and hear ENODEV."""
        if self.enabled and self._readers.get(ino):
            self._invalidator.file_went_stale(ino, self._end.get(ino, bound) + 1)
        self._end.pop(ino, None)
