"""/proc under `klpfs run`: the emulated kernel's /proc over the run's real procfs.

The mount's proc/ directory becomes a union of two trees: the emulated
kernel's (its files, its tasks' pid directories) and the procfs of the run's
PID namespace, mounted at a hidden directory.  For each name:

* in /proc itself, "self" and "thread-self" name the caller as the run's
  namespace knows it (proc_self_get_link(), proc_thread_self_get_link());
  a caller from outside the run gets the console shell, as on a plain mount;
* a pid that is a real process of the run is its real directory, except
  that patch_state and stack (also in task/<tid>/) are the emulated task's:
  the process is registered as a user task (realtasks.py); so is the
  unlisted /proc/<tid> of one of its threads, with the process's task;
* any other pid the emulated kernel has is its task's emulated directory,
  and any other file it has is the emulated file, both served by
  KernfsOperations with all of their rules; its other directories (sys,
  sys/kernel) are merged with the real ones, the emulated names first;
* everything else is the real entry, passed through: directories listed
  and looked up, regular files opened, read and written by the daemon,
  symlinks answered with the real link's text.  A link inside a pid
  directory (exe, cwd, root, fd/N, ns/...) answers readlink(2) with its
  text, and any other walk with the path of the real magic link in the
  hidden procfs, which the walk then follows as the kernel would.

Real entries are never cached by the kernel (timeouts of 0): processes come
and go, and the next lookup must ask.  Their inode numbers live above
UNION_INO_BASE and are dropped when the kernel forgets them; a merged
directory keeps its emulated node's number, so the invalidations kernfs
sends for its emulated children reach the right directory.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyfuse3

from klpfs.kernel.kernel import Kernel
from klpfs.sysfs.kernfs import Kernfs, KernfsNode

from .caller import Callers
from .operations import SEQ_SIZE_BOUND, KernfsOperations, _answer
from .realtasks import RealTasks


UNION_INO_BASE = 1 << 40
UNION_FH_BASE = 1 << 62
"""Handles of real files and union directories, apart from KernfsOperations' own."""
OVERLAY = ("patch_state", "stack")
"""The files of a real process's directory that are its emulated task's."""
_OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND
_DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM


class Kind(enum.Enum):
    MERGED = "merged"            # an emulated directory over a real one: proc, proc/sys, ...
    REAL = "real"                # a real entry, passed through
    TASK = "task"                # a real process's or thread's directory, with OVERLAY emulated
    THREADS = "threads"          # a real process's task/: its entries are TASK directories
    SELF = "self"
    THREAD_SELF = "thread-self"


@dataclass(eq=False, slots=True)
class UNode:
    ino: int
    kind: Kind
    rel: str
    """Path in the real procfs, "" for its root."""
    kn: KernfsNode | None = None
    """MERGED: the emulated directory."""
    pid: int = 0
    """TASK, THREADS: the process whose emulated task gives the OVERLAY files."""
    nlookup: int = 0


class Spec(NamedTuple):
    """A real entry found by a lookup or listing, before it has an inode number."""

    kind: Kind
    rel: str
    pid: int = 0


Target = KernfsNode | UNode | Spec
Entry = tuple[Target, os.stat_result | None]


@dataclass(eq=False, slots=True)
class _Listing:
    node: UNode
    entries: list[tuple[str, Target, os.stat_result | None]] | None = field(default=None)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _in_pid_dir(rel: str) -> bool:
    return rel.split("/", 1)[0].isdigit()


class ProcUnionOperations(KernfsOperations):
    """KernfsOperations whose proc/ directory is the union described above."""

    def __init__(self, kernfs: Kernfs, kernel: Kernel, real_tasks: RealTasks, callers: Callers) -> None:
        super().__init__(kernfs)
        proc = kernfs.lookup(kernfs.root, "proc")
        assert proc is not None and proc.is_dir
        self._proc = proc
        self._kernel = kernel
        self._tasks = real_tasks
        self._callers = callers
        self._real_root = real_tasks.proc_dir
        self._nodes: dict[int, UNode] = {}
        self._keys: dict[tuple[Kind, str], UNode] = {}
        self._next_ino = UNION_INO_BASE
        self._next_union_fh = UNION_FH_BASE
        self._files: dict[int, int] = {}
        self._sized: dict[int, tuple[int, bool]] = {}
        """Handles of real files of size 0 (most of /proc): their inode and whether opened
        for reading, for SpliceSizes, as the emulated files' are."""
        self._listings: dict[int, _Listing] = {}
        self._root = self._merged(proc, "")
        self._self = self._node(Kind.SELF, "self")
        self._thread_self = self._node(Kind.THREAD_SELF, "thread-self")

    # -- the union's nodes ------------------------------------------------------

    def _real(self, rel: str) -> str:
        return f"{self._real_root}/{rel}" if rel else self._real_root

    def _merged(self, kn: KernfsNode, rel: str) -> UNode:
        node = self._nodes.get(kn.ino)
        if node is None:
            node = self._nodes[kn.ino] = UNode(kn.ino, Kind.MERGED, rel, kn=kn)
        return node

    def _node(self, kind: Kind, rel: str, pid: int = 0) -> UNode:
        """The inode of a real entry: the one the kernel knows, or a new number."""
        node = self._keys.get((kind, rel))
        if node is None:
            self._next_ino += 1
            node = UNode(self._next_ino, kind, rel, pid=pid)
            self._nodes[node.ino] = self._keys[(kind, rel)] = node
        return node

    def _resolve(self, target: Target) -> KernfsNode | UNode:
        return self._node(*target) if isinstance(target, Spec) else target

    def _drop_if_unused(self, node: UNode) -> None:
        if node.nlookup <= 0 and node.kind in (Kind.REAL, Kind.TASK, Kind.THREADS):
            self._nodes.pop(node.ino, None)
            if self._keys.get((node.kind, node.rel)) is node:
                del self._keys[(node.kind, node.rel)]

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self._real(rel))
        except OSError:
            return None

    def _task_dir(self, pid: int) -> KernfsNode | None:
        """The emulated task's own directory, proc/<pid>/task/<pid>, holding the OVERLAY files."""
        node = self.kernfs.lookup(self._proc, str(pid))
        tasks = self.kernfs.lookup(node, "task") if node is not None else None
        return self.kernfs.lookup(tasks, str(pid)) if tasks is not None else None

    def _overlay(self, pid: int, name: str) -> KernfsNode | None:
        task_dir = self._task_dir(pid)
        return self.kernfs.lookup(task_dir, name) if task_dir is not None else None

    # -- what a name is -----------------------------------------------------------

    def _child(self, parent: UNode, name: str) -> Entry | None:
        """The entry `name` of a union directory, with the real entry's stat if it is one."""
        rel = _join(parent.rel, name)
        if parent.kind is Kind.MERGED:
            if parent is self._root:
                if name == "self":
                    return self._self, None
                if name == "thread-self":
                    return self._thread_self, None
                if name.isdigit():
                    return self._pid_entry(int(name))
            assert parent.kn is not None
            emulated = self.kernfs.lookup(parent.kn, name)
            if emulated is not None:
                # A directory is merged even while the real procfs is not there yet:
                # the kernel keeps the entry, and it must lead to the union later.
                if emulated.is_dir:
                    return self._merged(emulated, rel), None
                return emulated, None
            return self._real_entry(Kind.REAL, rel)
        if parent.kind is Kind.TASK:
            if name in OVERLAY:
                overlay = self._overlay(parent.pid, name)
                if overlay is not None:
                    return overlay, None
            if name == "task" and "/" not in parent.rel:
                return self._real_entry(Kind.THREADS, rel, parent.pid)
            return self._real_entry(Kind.REAL, rel)
        if parent.kind is Kind.THREADS:
            return self._real_entry(Kind.TASK, rel, parent.pid) if name.isdigit() else None
        if parent.kind is Kind.REAL:
            return self._real_entry(Kind.REAL, rel)
        return None

    def _real_entry(self, kind: Kind, rel: str, pid: int = 0) -> Entry | None:
        st = self._lstat(rel)
        if st is None:
            return None
        if kind is not Kind.REAL and not stat.S_ISDIR(st.st_mode):
            kind = Kind.REAL
        return Spec(kind, rel, pid), st

    def _pid_entry(self, pid: int) -> Entry | None:
        """/proc/<pid>: a run's process (seen now if new), else an emulated task, else a real one."""
        name = str(pid)
        if self._tasks.task(pid) is None and self.kernfs.lookup(self._proc, name) is None:
            self._tasks.sync()
        if self._tasks.task(pid) is not None:
            entry = self._real_entry(Kind.TASK, name, pid)
            if entry is not None:
                return entry
            self._tasks.sync()  # it exited: its task goes too
        emulated = self.kernfs.lookup(self._proc, name)
        if emulated is not None:
            return emulated, None
        tgid = self._tasks.thread_group(pid)
        if tgid is not None and self._tasks.task(tgid) is not None:
            return self._real_entry(Kind.TASK, name, tgid)  # a thread's own, unlisted, directory
        return self._real_entry(Kind.REAL, name)

    def _list(self, node: UNode) -> list[tuple[str, Target, os.stat_result | None]]:
        """A union directory's entries, as of now."""
        entries: list[tuple[str, Target, os.stat_result | None]] = []
        names: list[str] = []
        if node.kind is Kind.MERGED:
            if node is self._root:
                self._tasks.sync()
            assert node.kn is not None
            names += [name for name in self.kernfs.names(node.kn) if node is not self._root or name != "self"]
        try:
            with os.scandir(self._real(node.rel)) as it:
                real = [entry.name for entry in it]
        except OSError as exc:
            if node.kind is not Kind.MERGED:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            real = []
        known = set(names)
        names += [name for name in real if name not in known]
        if node is self._root:
            names = ([n for n in names if not n.isdigit() and n not in ("self", "thread-self")]
                     + ["self", "thread-self"] + sorted((n for n in names if n.isdigit()), key=int))
        elif node.kind is Kind.TASK:
            names += [name for name in OVERLAY if name not in names and self._overlay(node.pid, name)]
        for name in names:
            child = self._child(node, name)
            if child is not None:
                entries.append((name, *child))
        return entries

    # -- attributes -------------------------------------------------------------

    def _uattr(self, node: UNode, st: os.stat_result | None) -> pyfuse3.EntryAttributes:
        """A real entry's attributes under our inode number; never cached by the kernel."""
        if node.kind in (Kind.SELF, Kind.THREAD_SELF):
            st = self._lstat("self")
            attrs = pyfuse3.EntryAttributes()
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_nlink = 1
            if st is not None:
                attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = st.st_mtime_ns
        else:
            if st is None:
                st = self._lstat(node.rel)
            if node.kind is Kind.MERGED and (st is None or not stat.S_ISDIR(st.st_mode)):
                assert node.kn is not None
                return self._attr(node.kn)  # no real directory (yet): the emulated one alone
            if st is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attrs = pyfuse3.EntryAttributes()
            attrs.st_mode = st.st_mode
            attrs.st_nlink = st.st_nlink
            attrs.st_uid = st.st_uid
            attrs.st_gid = st.st_gid
            attrs.st_rdev = st.st_rdev
            attrs.st_size = st.st_size
            attrs.st_blksize = st.st_blksize
            attrs.st_blocks = st.st_blocks
            attrs.st_atime_ns = st.st_atime_ns
            attrs.st_mtime_ns = st.st_mtime_ns
            attrs.st_ctime_ns = st.st_ctime_ns
        attrs.st_ino = node.ino
        attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    def _entry(self, target: Target, st: os.stat_result | None) -> pyfuse3.EntryAttributes:
        """The reply to a lookup; a real entry's lookup count goes up."""
        node = self._resolve(target)
        if isinstance(node, KernfsNode):
            return self._handing_out(node)
        try:
            attrs = self._uattr(node, st)
        except BaseException:
            self._drop_if_unused(node)
            raise
        node.nlookup += 1
        return attrs

    # -- handlers -----------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: object) -> pyfuse3.EntryAttributes:
        parent = self._nodes.get(parent_inode)
        if parent is None:
            return await super().lookup(parent_inode, name, ctx)
        try:
            child = self._child(parent, name.decode("utf-8", "surrogateescape"))
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attrs = self._entry(*child)
            if stat.S_ISREG(attrs.st_mode) and attrs.st_size == 0 and attrs.st_ino >= UNION_INO_BASE:
                self.sizes.handing_out(attrs.st_ino, 0, SEQ_SIZE_BOUND)
            return attrs
        except Exception as exc:
            raise _answer(exc, "lookup", (parent_inode, name)) from None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            node = self._nodes.get(inode)
            if node is not None:
                node.nlookup -= nlookup
                self._drop_if_unused(node)

    async def getattr(self, inode: int, ctx: object) -> pyfuse3.EntryAttributes:
        node = self._nodes.get(inode)
        if node is None:
            return await super().getattr(inode, ctx)
        try:
            attrs = self._uattr(node, None)
            if stat.S_ISREG(attrs.st_mode) and attrs.st_size == 0:
                self.sizes.handing_out(node.ino, 0, SEQ_SIZE_BOUND)
            return attrs
        except Exception as exc:
            raise _answer(exc, "getattr", inode) from None

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: object) -> pyfuse3.EntryAttributes:
        """A truncate before an O_TRUNC open (`echo 1 > /proc/sys/...`) is no change;
        anything else is refused as proc_setattr() refuses a mode or owner change."""
        node = self._nodes.get(inode)
        if node is None:
            return await super().setattr(inode, attr, fields, fh, ctx)
        try:
            if (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime
                    or fields.update_mtime):
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._uattr(node, None)
        except Exception as exc:
            raise _answer(exc, "setattr", inode) from None

    async def readlink(self, inode: int, ctx: object) -> bytes:
        node = self._nodes.get(inode)
        if node is None:
            return await super().readlink(inode, ctx)
        try:
            host_tid = getattr(ctx, "pid", 0)
            if node.kind in (Kind.SELF, Kind.THREAD_SELF):
                tgid, tid = self._caller(host_tid)
                return (str(tgid) if node.kind is Kind.SELF else f"{tgid}/task/{tid}").encode()
            path = self._real(node.rel)
            text = os.readlink(path)
            if _in_pid_dir(node.rel) and not self._callers.reading_link(host_tid):
                return os.fsencode(path)  # the walk goes on in the real magic link
            return os.fsencode(text)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            raise _answer(exc, "readlink", inode) from None

    def oops_caller(self, pid: int) -> tuple[int, str, int, int]:
        """A run's process oopses under its pid in the run's namespace, its task's CPU."""
        _, comm, cpu, uid = super().oops_caller(pid)
        ids = self._callers.ids(pid)
        if ids is None:
            return pid, comm, cpu, uid
        if self._tasks.task(ids[0]) is None:
            self._tasks.sync()  # a process seen for the first time
        task = self._tasks.task(ids[0])
        return ids[1], comm, task.cpu if task is not None else cpu, uid

    def _caller(self, host_tid: int) -> tuple[int, int]:
        """(tgid, tid) for self and thread-self, registering a process seen for the first time."""
        ids = self._callers.ids(host_tid)
        if ids is None:
            console = self._kernel.console.pid
            return console, console
        if self._tasks.task(ids[0]) is None:
            self._tasks.sync()
        return ids

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        node = self._nodes.get(inode)
        if node is None:
            return await super().open(inode, flags, ctx)
        try:
            if node.kind is not Kind.REAL:
                raise pyfuse3.FUSEError(errno.EISDIR)
            # Non-blocking: a read that would wait (/proc/kmsg) must not stop the daemon.
            fd = os.open(self._real(node.rel),
                         (flags & _OPEN_FLAGS) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
            self._next_union_fh += 1
            fh = self._next_union_fh
            self._files[fh] = fd
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # a splice reads it as an emulated file
                reading = flags & os.O_ACCMODE != os.O_WRONLY
                self._sized[fh] = (node.ino, reading)
                self.sizes.opened(node.ino, SEQ_SIZE_BOUND, reading)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            raise _answer(exc, "open", inode) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        fd = self._files.get(fh)
        if fd is None:
            return await super().read(fh, off, size)
        try:
            try:
                return os.pread(fd, size, off)
            except OSError as exc:
                if exc.errno != errno.ESPIPE:
                    raise
                return os.read(fd, size)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            raise _answer(exc, "read", fh) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fd = self._files.get(fh)
        if fd is None:
            return await super().write(fh, off, buf)
        try:
            try:
                return os.pwrite(fd, buf, off)
            except OSError as exc:
                if exc.errno != errno.ESPIPE:
                    raise
                return os.write(fd, buf)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:
            raise _answer(exc, "write", fh) from None

    async def release(self, fh: int) -> None:
        fd = self._files.pop(fh, None)
        if fd is None:
            return await super().release(fh)
        sized = self._sized.pop(fh, None)
        if sized is not None:
            self.sizes.released(*sized)
        try:
            os.close(fd)
        except OSError:
            pass

    async def poll(self, inode: int, fh: int, poll_handle: pyfuse3.PollHandle | None, ctx: object) -> int:
        if fh in self._files:
            return _DEFAULT_POLLMASK
        return await super().poll(inode, fh, poll_handle, ctx)

    async def opendir(self, inode: int, ctx: object) -> int:
        node = self._nodes.get(inode)
        if node is None:
            return await super().opendir(inode, ctx)
        if node.kind in (Kind.SELF, Kind.THREAD_SELF):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._next_union_fh += 1
        self._listings[self._next_union_fh] = _Listing(node)
        return self._next_union_fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """".", "..", then the entries as of the last rewind; offsets are positions in that list."""
        listing = self._listings.get(fh)
        if listing is None:
            return await super().readdir(fh, start_id, token)
        try:
            node = listing.node
            if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._uattr(node, None), 1):
                return
            if start_id < 2 and not pyfuse3.readdir_reply(token, b"..", self._uattr(node, None), 2):
                return
            if start_id == 0 or listing.entries is None:
                listing.entries = self._list(node)
            entries = listing.entries
            for i in range(max(0, start_id - 2), len(entries)):
                name, target, st = entries[i]
                entry = self._resolve(target)
                if isinstance(entry, KernfsNode):
                    if not entry.active:
                        continue
                    attrs = self._handing_out(entry)
                else:
                    try:
                        attrs = self._uattr(entry, st)
                    except pyfuse3.FUSEError:
                        self._drop_if_unused(entry)
                        continue
                if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"), attrs, i + 3):
                    if isinstance(entry, UNode):
                        self._drop_if_unused(entry)
                    return
                if isinstance(entry, UNode):
                    entry.nlookup += 1
        except Exception as exc:
            raise _answer(exc, "readdir", fh) from None

    async def releasedir(self, fh: int) -> None:
        if self._listings.pop(fh, None) is None:
            await super().releasedir(fh)

    def shutdown(self) -> None:
        super().shutdown()
        for fd in self._files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._files.clear()
