"""A Kernfs tree as a FUSE file system, with sysfs's rules for real syscalls.

What a process sees must be what it would see under /sys:

* sysfs attributes report size 4096, proc files and directories size 0, directories 2 + subdirectories
  links, everything belongs to root, timestamps are the node's creation time;
* opening an attribute applies Kernfs.open_check for the access mode, so a
  0444 file cannot be opened for writing and a 0200 one not for reading,
  even by root (ordinary permission checks are the kernel's, through the
  ``default_permissions`` mount option);
* every open file is direct I/O: a read always reaches the show callback, so
  a value changed in the background is read at once, never from page cache;
  like seq_file, a read at offset 0 runs show() and later reads continue
  from that snapshot;
* splice, sendfile and copy_file_range, which since Linux 6.5 read even a
  direct-I/O file through the page cache up to the kernel's idea of its size,
  get the value too: `SpliceSizes` makes that size fit each open for reading,
  and stat still shows the file's own;
* a handle opened before its node was removed answers ENODEV, by read and by
  splice (its cached pages are dropped);
* chmod, chown, utime and truncate are accepted as sysfs accepts them
  (a truncate changes nothing); creating anything is refused as sysfs does;
* a node with file operations of its own (dev/kmsg, see kmsg.py) skips
  the attribute rules: its open, read, write, poll and release decide.

The kernel may cache entries and attributes for a day: `Invalidator` pushes
every removal to it, and a stat of a removed inode answers ESTALE, which
makes the kernel walk the path again and get ENOENT.  Missing names are
never cached (ENOENT, not a zero inode).

Each handler turns an unexpected exception into a logged EIO, so a bug in a
show or store callback fails one syscall and the mount stays up.  A show or
store that faults in the emulated kernel (klpfs.kernel.oops.KernelFault: a
force-removed patch module's attributes, a show that overflows the kernel
stack) is an oops of the process that opened the file, which is then killed,
as the kernel kills it.  Handlers can be called directly, without FUSE
(``ctx`` is unused and may be None).
"""

from __future__ import annotations

import bisect
import copy
import errno
import logging
import os
import select
import signal
import stat
import time
from typing import TypeVar

import pyfuse3

from klpfs.kernel.oops import KernelFault
from klpfs.sysfs.kernfs import PAGE_SIZE, Kernfs, KernfsNode, OpenFile

from .invalidate import PAGE_CACHE_SPLICE, FuseNotifier, Invalidator, SpliceSizes

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0
"""Seconds the kernel may trust an entry or attributes; removals are pushed."""

_ACCESS = ((True, False), (False, True), (True, True), (False, False))
"""(want_read, want_write) for each O_ACCMODE value; 3 means neither."""

_DOT, _DOTDOT = 1, 2
"""Directory offsets after "." and ".."; a child's is its inode number + 2."""

_DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
"""DEFAULT_POLLMASK: what the kernel answers for a file system without poll."""

SEQ_SIZE_BOUND = 1 << 30
"""Longer than any seq_file show (kallsyms, dynamic_debug/control) or real /proc file
read through a union: the size a splice is given to read one whole."""

_T = TypeVar("_T")


def _checked(result: _T | int) -> _T:
    """A node's own file operation's result, a negative errno raised as FUSEError."""
    if isinstance(result, int) and result < 0:
        raise pyfuse3.FUSEError(-result)
    return result  # type: ignore[return-value]


def _is_show_file(node: KernfsNode) -> bool:
    """A regular file read through show(), not one with file operations of its own."""
    return node.fops is None and stat.S_ISREG(node.mode)


def _answer(exc: Exception, op: str, arg: object) -> pyfuse3.FUSEError:
    """What a handler raises for exc: a FUSEError as it is; anything else is a
    bug, logged with its traceback, and the caller gets EIO."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    log.exception("%s(%r) failed", op, arg)
    return pyfuse3.FUSEError(errno.EIO)


class _Handle:
    """An open file or directory.

    ``data`` is, for a file, the bytes of the last show() (the seq_file
    buffer); for a directory, the children listed since the last rewind,
    in inode order, with their inode numbers for resuming.  ``file`` is the
    open file of a node with its own file operations (dev/kmsg), which
    then answers reads, writes and polls itself.
    """

    __slots__ = ("node", "data", "inos", "file", "reading", "truncating", "pid")

    def __init__(self, node: KernfsNode, file: OpenFile | None = None, reading: bool = False,
                 truncating: bool = False, pid: int = 0) -> None:
        self.node = node
        self.pid = pid
        """The process that opened it (the FUSE caller): who oopses if a read or write faults."""
        self.data: bytes | list[KernfsNode] | None = None
        self.inos: list[int] = []
        self.file = file
        self.reading = reading
        """Opened for reading: counted by SpliceSizes until released."""
        self.truncating = truncating
        """Opened with O_TRUNC for writing, and SpliceSizes not told yet."""


def size_bound(node: KernfsNode) -> int:
    """No show of the file is longer, and no size we answer for it larger: a page
    (Kernfs.read cuts a show below it), unless a seq_file's show, read whole."""
    return SEQ_SIZE_BOUND if node.seq else max(node.size, PAGE_SIZE)


class KernfsOperations(pyfuse3.Operations):
    """Serves one Kernfs; registers itself as its listener (see `close`)."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, kernfs: Kernfs, invalidator: Invalidator | None = None,
                 page_cache_splice: bool | None = None) -> None:
        """`page_cache_splice`: manage the kernel's file sizes for splice (SpliceSizes);
        by default when this kernel needs it and a real one is told (no invalidator given)."""
        super().__init__()
        self.kernfs = kernfs
        if page_cache_splice is None:
            page_cache_splice = invalidator is None and PAGE_CACHE_SPLICE
        self.invalidator = invalidator if invalidator is not None else Invalidator(FuseNotifier())
        self.sizes = SpliceSizes(self.invalidator, page_cache_splice)
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 0
        self._fileinfo = pyfuse3.FileInfo(direct_io=True, keep_cache=False)
        self._statfs = pyfuse3.StatvfsData()
        self._statfs.f_bsize = self._statfs.f_frsize = PAGE_SIZE
        self._statfs.f_namemax = 255
        kernfs.listeners.append(self)
        kernfs.subdir_listeners.append(self.lazy_dirs_changed)
        kernfs.settlers.append(self.settle)

    def close(self) -> None:
        """Stop following the tree."""
        self.kernfs.listeners.remove(self)
        self.kernfs.subdir_listeners.remove(self.lazy_dirs_changed)
        self.kernfs.settlers.remove(self.settle)

    async def settle(self) -> None:
        """Until the kernel has been told of every change to the tree so far."""
        if self.invalidator.pending:
            await self.invalidator.settle()

    def shutdown(self) -> None:
        """The mount is going away: reads waiting in open files (dev/kmsg) end, so
        the FUSE loop can stop (it waits for every request it has taken)."""
        for handle in list(self._handles.values()):
            if handle.file is not None:
                try:
                    handle.file.shutdown()
                except Exception:
                    log.exception("shutting down %r", handle.node)

    # -- following the tree (called from inside engine operations) ----------

    def node_added(self, node: KernfsNode) -> None:
        try:
            if node.is_dir and node.parent is not None and not node.made_lazily:
                self._subdirs_changed(node.parent, 1)
        except Exception:
            log.exception("following the addition of %r", node)

    def node_removed(self, node: KernfsNode) -> None:
        try:
            self._attrs.pop(node.ino, None)
            if node.is_dir and node.parent is not None:
                self._subdirs_changed(node.parent, -1)
            if _is_show_file(node):
                self.sizes.removed(node.ino, size_bound(node))
            self.invalidator.node_removed(node)
        except Exception:
            log.exception("following the removal of %r", node)

    def lazy_dirs_changed(self, parent: KernfsNode, delta: int) -> None:
        """A task came or went whose /proc directory was never made: /proc's link count follows."""
        try:
            self._subdirs_changed(parent, delta)
        except Exception:
            log.exception("following a lazy subdirectory of %r", parent)

    def _subdirs_changed(self, parent: KernfsNode, delta: int) -> None:
        attrs = self._attrs.get(parent.ino)
        if attrs is not None:
            attrs.st_nlink += delta
        self.invalidator.nlink_changed(parent)

    # -- inodes and their attributes ----------------------------------------

    def _attr(self, node: KernfsNode) -> pyfuse3.EntryAttributes:
        """The node's attributes; kept (and changed by setattr) while it lives."""
        attrs = self._attrs.get(node.ino)
        if attrs is not None:
            return attrs
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.st_mode = node.mode
        attrs.entry_timeout = attrs.attr_timeout = CACHE_TIMEOUT
        if node.fops is not None:
            attrs.attr_timeout = 0  # the kernel asks every time: its getattr tells of seeks
        attrs.st_size = node.size
        if node.children is not None:
            attrs.st_nlink = 2 + self.kernfs.subdir_count(node)
        seconds = int(node.ctime)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = (
            seconds * 1_000_000_000 + round((node.ctime - seconds) * 1e9))
        if node.active:
            self._attrs[node.ino] = attrs
        return attrs

    def _handing_out(self, node: KernfsNode) -> pyfuse3.EntryAttributes:
        """The attributes a lookup, getattr, readdir or setattr answers (see SpliceSizes)."""
        attrs = self._attr(node)
        if _is_show_file(node) and self.sizes.handing_out(node.ino, attrs.st_size, size_bound(node)):
            attrs = copy.copy(attrs)
            attrs.attr_timeout = 0
        return attrs

    def _inode(self, inode: int) -> KernfsNode:
        """A live node, or a removed one still open (fstat works on it)."""
        node = self.kernfs.get(inode)
        if node is not None:
            return node
        for handle in self._handles.values():
            if handle.node.ino == inode:
                return handle.node
        # The kernel still had the dentry cached: ESTALE makes it look again.
        raise pyfuse3.FUSEError(errno.ESTALE)

    def _open(self, node: KernfsNode, file: OpenFile | None = None, reading: bool = False,
              truncating: bool = False, pid: int = 0) -> int:
        self._next_fh += 1
        self._handles[self._next_fh] = _Handle(node, file, reading, truncating, pid)
        return self._next_fh

    def _oops(self, fault: KernelFault, pid: int) -> pyfuse3.FUSEError:
        """A show or store faulted in the kernel: the process in the system call oopses
        (page_fault_oops(), handle_stack_overflow()), so the oops is logged and the process
        killed with SIGKILL, as make_task_dead() ends it; the call's own answer goes to nobody."""
        fault.die(*self.oops_caller(pid))
        if pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return pyfuse3.FUSEError(errno.EFAULT)

    def oops_caller(self, pid: int) -> tuple[int, str, int, int]:
        """(pid, comm, cpu, uid) an oops names for process `pid` (a FUSE caller)."""
        comm, uid = "?", 0
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f.read().decode(errors="replace").splitlines():
                    key, _, value = line.partition(":")
                    if key == "Name":
                        comm = value.strip()
                    elif key == "Uid" and len(value.split()) > 1:
                        uid = int(value.split()[1])  # the effective one
        except (OSError, ValueError):
            pass
        return pid, comm, 0, uid

    # -- handlers -------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: object) -> pyfuse3.EntryAttributes:
        try:
            parent = self.kernfs.get(parent_inode)
            if parent is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = self.kernfs.lookup(parent, name.decode("utf-8", "surrogateescape"))
            if node is None:
                if name == b".":
                    node = parent
                elif name == b"..":
                    node = parent.parent or parent
                else:
                    raise pyfuse3.FUSEError(errno.ENOENT)
            return self._handing_out(node)
        except Exception as exc:
            raise _answer(exc, "lookup", (parent_inode, name)) from None

    async def getattr(self, inode: int, ctx: object) -> pyfuse3.EntryAttributes:
        try:
            node = self.kernfs.get(inode)
            if node is not None and node.fops is not None:
                node.fops.getattr(getattr(ctx, "pid", 0))
            return self._handing_out(node if node is not None else self._inode(inode))
        except Exception as exc:
            raise _answer(exc, "getattr", inode) from None

    async def readlink(self, inode: int, ctx: object) -> bytes:
        try:
            node = self._inode(inode)
            if not stat.S_ISLNK(node.mode) or node.show is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return node.show().encode()
        except Exception as exc:
            raise _answer(exc, "readlink", inode) from None

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: object) -> pyfuse3.EntryAttributes:
        """kernfs_iop_setattr: mode, owner and times stick; a size is ignored."""
        try:
            handle = self._handles.get(fh) if fh is not None else None
            node = handle.node if handle is not None else self._inode(inode)
            attrs = self._attr(node)
            if fields.update_mode:
                self.kernfs.chmod(node, attr.st_mode)
                attrs.st_mode = node.mode
            if fields.update_uid:
                attrs.st_uid = attr.st_uid
            if fields.update_gid:
                attrs.st_gid = attr.st_gid
            if fields.update_atime:
                attrs.st_atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                attrs.st_mtime_ns = attr.st_mtime_ns
            if (fields.update_mode or fields.update_uid or fields.update_gid
                    or fields.update_atime or fields.update_mtime):
                attrs.st_ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
            return self._handing_out(node)
        except Exception as exc:
            raise _answer(exc, "setattr", inode) from None

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        try:
            node = self.kernfs.get(inode)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENODEV)  # removed after the lookup
            if node.fops is not None:
                file = _checked(node.fops.open(flags, getattr(ctx, "pid", 0)))
                self._fileinfo.fh = self._open(node, file)
                return self._fileinfo
            want_read, want_write = _ACCESS[flags & os.O_ACCMODE]
            err = Kernfs.open_check(node, want_read, want_write)
            if err:
                raise pyfuse3.FUSEError(-err)
            fh = self._open(node, reading=want_read, truncating=want_write and bool(flags & os.O_TRUNC),
                            pid=getattr(ctx, "pid", 0))
            self.sizes.opened(node.ino, size_bound(node), want_read)  # before fuse_open() drops pages
            fileinfo = self._fileinfo
            fileinfo.fh = fh
            return fileinfo
        except Exception as exc:
            raise _answer(exc, "open", inode) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            await self.settle()
            handle = self._handles[fh]
            if handle.file is not None:
                return _checked(await handle.file.read(off, size))
            data = handle.data
            if off == 0 or not isinstance(data, bytes):
                try:
                    shown = Kernfs.read(handle.node)
                except KernelFault as fault:
                    raise self._oops(fault, handle.pid) from None
                if isinstance(shown, int):
                    raise pyfuse3.FUSEError(-shown)
                handle.data = data = shown
            elif not handle.node.active:
                raise pyfuse3.FUSEError(errno.ENODEV)
            return data[off:off + size]
        except Exception as exc:
            raise _answer(exc, "read", fh) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """sysfs ignores the offset: every write is a whole store."""
        try:
            handle = self._handles[fh]
            if handle.file is not None:
                return _checked(handle.file.write(off, buf))
            node = handle.node
            try:
                result = Kernfs.write(node, buf)
            except KernelFault as fault:
                raise self._oops(fault, handle.pid) from None
            if node.active:
                self.sizes.written(node.ino, size_bound(node), off + max(result, 0))
                await self._truncated(handle)
            await self.settle()
            if result < 0:
                raise pyfuse3.FUSEError(-result)
            return result
        except Exception as exc:
            raise _answer(exc, "write", fh) from None

    async def _truncated(self, handle: _Handle) -> None:
        """fuse_open() zeroed the kernel's size of an O_TRUNC open's file: tell SpliceSizes
        at the first write, or at the release."""
        if handle.truncating:
            handle.truncating = False
            await self.sizes.truncated(handle.node.ino, size_bound(handle.node))

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        try:
            self.sizes.released(handle.node.ino, handle.reading)
            if handle.node.active:
                await self._truncated(handle)
            if handle.file is not None:
                handle.file.release()
        except Exception as exc:
            raise _answer(exc, "release", fh) from None

    async def poll(self, inode: int, fh: int, poll_handle: pyfuse3.PollHandle | None,
                   ctx: object) -> int:
        """A node's own poll; every other file is always ready, as without poll support."""
        try:
            handle = self._handles.get(fh)
            if handle is None or handle.file is None:
                return _DEFAULT_POLLMASK
            return handle.file.poll(poll_handle)
        except Exception as exc:
            raise _answer(exc, "poll", fh) from None

    async def opendir(self, inode: int, ctx: object) -> int:
        try:
            node = self.kernfs.get(inode)
            if node is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if not node.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return self._open(node)
        except Exception as exc:
            raise _answer(exc, "opendir", inode) from None

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List ".", "..", then the children as of the last rewind, in inode order.

        Offsets are inode numbers (never reused), so a child removed between
        two calls is skipped and no other entry is lost or listed twice.
        """
        try:
            handle = self._handles[fh]
            node = handle.node
            if start_id < _DOT and not pyfuse3.readdir_reply(token, b".", self._attr(node), _DOT):
                return
            if start_id < _DOTDOT and not pyfuse3.readdir_reply(
                    token, b"..", self._attr(node.parent or node), _DOTDOT):
                return
            if start_id == 0 or handle.data is None:
                children = self.kernfs.listdir(node)
                handle.data = children
                handle.inos = [child.ino for child in children]
            listing = handle.data
            assert isinstance(listing, list)
            for i in range(bisect.bisect_right(handle.inos, start_id - _DOTDOT), len(listing)):
                child = listing[i]
                if child.active and not pyfuse3.readdir_reply(
                        token, child.name.encode("utf-8", "surrogateescape"),
                        self._handing_out(child), child.ino + _DOTDOT):
                    return
        except Exception as exc:
            raise _answer(exc, "readdir", fh) from None

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def statfs(self, ctx: object) -> pyfuse3.StatvfsData:
        return self._statfs

    # -- what sysfs refuses (vfs_create: EACCES; the other inode ops: EPERM) --

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: object) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EACCES)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)
