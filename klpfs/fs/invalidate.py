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
"""

from __future__ import annotations

import logging
from typing import Protocol

import pyfuse3
import trio

from klpfs.sysfs.kernfs import KernfsNode

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 2.0
"""Seconds a handler waits for deliveries; only a kernel-side stall reaches it."""


class Notifier(Protocol):
    """Where notifications go; called from a worker thread."""

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None: ...

    def invalidate_attrs(self, ino: int) -> None: ...


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


class Invalidator:
    """Queue of changes to push to the kernel, and the task that pushes them.

    Changes are queued only while `run` is running, i.e. while something is
    mounted: before the mount the kernel has cached nothing.
    """

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._removed: list[KernfsNode] = []
        self._resized: list[KernfsNode] = []
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
                self._removed.clear()
                self._resized.clear()
                await trio.to_thread.run_sync(self._deliver, entries, dirs)
                self._delivered = upto
                self._delivery.unpark_all()
        finally:
            self._running = False
            self._removed.clear()
            self._resized.clear()
            self._delivered = self._queued
            self._delivery.unpark_all()

    def _deliver(self, entries: list[tuple[int, bytes]], dirs: set[int]) -> None:
        for parent_ino, name in entries:
            self._notifier.invalidate_entry(parent_ino, name)
        for ino in dirs:
            self._notifier.invalidate_attrs(ino)
