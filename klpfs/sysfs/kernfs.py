"""A small kernfs: the tree of directories and attributes behind sysfs.

It carries the rules every sysfs file obeys, whoever registered it, so the
livepatch code only supplies show/store callbacks:

* opening an attribute for writing when its mode has no write bit, or for
  reading when it has no read bit, is EACCES even for root (kernfs_fop_open);
* a 0-byte write never reaches the store callback; a longer one is cut to
  PAGE_SIZE and the callback sees the bytes as written;
* a read shows at most a page less one byte, except a seq_file's (a debugfs
  or proc file whose show walks a list: dynamic_debug/control), shown whole;
* a removed node is dead for handles opened earlier (ENODEV, the kernfs
  "active reference" is gone) and invisible to new lookups (ENOENT).

Nothing here knows about livepatch.  Whoever shows the tree (the FUSE layer)
subscribes as a listener to learn of removals, so it can drop cached entries.
"""

from __future__ import annotations

import errno
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

PAGE_SIZE = 4096
ROOT_INO = 1

Show = Callable[[], str]
Store = Callable[[bytes], int]
"""A store callback returns the byte count it consumed or a negative errno."""


class OpenFile(Protocol):
    """One open of a node with its own file operations; errors are negative errnos."""

    async def read(self, offset: int, size: int) -> bytes | int: ...

    def write(self, offset: int, data: bytes) -> int: ...

    def poll(self, handle: Any) -> int: ...

    def release(self) -> None: ...

    def shutdown(self) -> None:
        """The mount is going away: end any read waiting here, now and later."""


class FileOps(Protocol):
    """A node's own file operations, used instead of show/store and the attribute
    rules (a character device's file_operations: /dev/kmsg)."""

    def open(self, flags: int, pid: int) -> OpenFile | int: ...

    def getattr(self, pid: int) -> None:
        """Process pid made the kernel ask for the node's attributes (stat, and
        lseek SEEK_END or SEEK_DATA): they are never cached for such a node."""


class KernfsListener(Protocol):
    """Told about structural changes, after they happen."""

    def node_added(self, node: KernfsNode) -> None: ...

    def node_removed(self, node: KernfsNode) -> None: ...


class LazyDirs(Protocol):
    """Subdirectories a directory lists and finds without holding nodes for them until
    asked (procfs's /proc/<pid>: proc_pid_lookup() and proc_pid_readdir() make a task's
    inode when it is looked up, so 100,000 tasks cost nothing until someone looks)."""

    def names(self) -> Iterable[str]:
        """Every such subdirectory's name, made or not."""

    def materialize(self, name: str) -> None:
        """Create the named subdirectory (and what it holds) if the name is one; called
        only while the directory has no child of that name."""


class KernfsNode:
    """One directory or attribute; an attribute has show and/or store."""

    __slots__ = ("name", "mode", "parent", "children", "ino", "show", "store", "active", "ctime", "size",
                 "fops", "seq", "lazy", "made_lazily")

    def __init__(self, name: str, mode: int, parent: KernfsNode | None, ino: int,
                 show: Show | None = None, store: Store | None = None, ctime: float = 0.0):
        self.name = name
        self.mode = mode
        self.parent = parent
        self.children: dict[str, KernfsNode] | None = {} if stat.S_ISDIR(mode) else None
        self.ino = ino
        self.show = show
        self.store = store
        self.active = True
        self.ctime = ctime
        self.size = PAGE_SIZE if self.children is None else 0
        """What stat reports: sysfs attributes claim a page, directories and proc files 0."""
        self.fops: FileOps | None = None
        self.seq = False
        """show() is a seq_file's: what it prints is not limited to a page."""
        self.lazy: LazyDirs | None = None
        """Subdirectories made on first lookup or listing (Kernfs.set_lazy)."""
        self.made_lazily = False
        """One of its parent's lazy subdirectories: counted among them before it was made."""

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def path(self) -> str:
        """Path from the tree's root, with a leading slash."""
        parts: list[str] = []
        node: KernfsNode | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<KernfsNode {self.path} {stat.filemode(self.mode)}>"


class Kernfs:
    """The tree: inode numbers are stable for a node's life and never reused."""

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._next_ino = ROOT_INO + 1
        self.root = KernfsNode("", stat.S_IFDIR | 0o755, None, ROOT_INO, ctime=now())
        self._nodes: dict[int, KernfsNode] = {ROOT_INO: self.root}
        self.listeners: list[KernfsListener] = []
        self.subdir_listeners: list[Callable[[KernfsNode, int], None]] = []
        """Told (directory, +1 or -1) when a lazy subdirectory comes or goes without a
        node (lazy_dirs_changed): a directory's link count follows its subdirectories."""
        self._materializing: KernfsNode | None = None
        self.settlers: list[Callable[[], Awaitable[None]]] = []
        """Listeners that pass changes on later (to the kernel's FUSE caches): each
        returns once what it was told so far has arrived."""

    async def settle(self) -> None:
        """Until every change so far has reached whoever follows the tree, so that the
        process that made it (insmod, rmmod over the control socket) sees it in the
        mount as soon as it is told it is done, as sysfs is up to date when
        finit_module() or delete_module() returns."""
        for settle in list(self.settlers):
            await settle()

    # -- lookup ---------------------------------------------------------------

    def get(self, ino: int) -> KernfsNode | None:
        """The live node with this inode number, or None once it is removed."""
        return self._nodes.get(ino)

    def lookup(self, parent: KernfsNode, name: str) -> KernfsNode | None:
        """The child named `name`, made first if it is one of parent's lazy directories."""
        if parent.children is None:
            return None
        node = parent.children.get(name)
        if node is None and parent.lazy is not None and parent.active:
            self._materialize(parent, parent.lazy, name)
            node = parent.children.get(name)
        return node

    def _materialize(self, parent: KernfsNode, lazy: LazyDirs, name: str) -> None:
        """Have lazy make `name`; the subdirectory it adds to parent is marked made_lazily
        before anyone is told of it."""
        self._materializing = parent
        try:
            lazy.materialize(name)
        finally:
            self._materializing = None

    def listdir(self, parent: KernfsNode) -> list[KernfsNode]:
        """A directory's children in inode order, its lazy directories made first (readdir)."""
        if parent.children is None:
            return []
        lazy = parent.lazy
        if lazy is not None and parent.active:
            for name in list(lazy.names()):
                if name not in parent.children:
                    self._materialize(parent, lazy, name)
        return list(parent.children.values())

    def names(self, parent: KernfsNode) -> list[str]:
        """A directory's child names, lazy directories included, making none of them."""
        if parent.children is None:
            return []
        names = list(parent.children)
        if parent.lazy is not None:
            names += [name for name in parent.lazy.names() if name not in parent.children]
        return names

    def subdir_count(self, parent: KernfsNode) -> int:
        """How many subdirectories the directory has, lazy ones included (its nlink less 2)."""
        if parent.children is None:
            return 0
        count = sum(1 for child in parent.children.values() if child.is_dir)
        if parent.lazy is not None:
            count += sum(1 for name in parent.lazy.names() if name not in parent.children)
        return count

    def walk(self, path: str) -> KernfsNode | None:
        """Resolve a slash-separated path from the root."""
        node: KernfsNode | None = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if node is None:
                return None
            node = self.lookup(node, part)
        return node

    # -- creation and removal -------------------------------------------------

    def create_dir(self, parent: KernfsNode, name: str, mode: int = 0o755) -> KernfsNode:
        """Raises FileExistsError on a name clash, as kernfs_add_one does."""
        return self._add(parent, KernfsNode(name, stat.S_IFDIR | mode, parent, 0))

    @staticmethod
    def set_lazy(node: KernfsNode, lazy: LazyDirs) -> None:
        """From now on node lists and finds lazy's directories, made when first asked for."""
        assert node.children is not None, "only a directory has lazy subdirectories"
        node.lazy = lazy

    def lazy_dirs_changed(self, parent: KernfsNode, delta: int) -> None:
        """One of parent's lazy subdirectories came (+1) or went (-1) without a node
        having been made for it."""
        for listener in self.subdir_listeners:
            listener(parent, delta)

    def create_file(self, parent: KernfsNode, name: str, mode: int,
                    show: Show | None = None, store: Store | None = None, size: int = PAGE_SIZE,
                    fops: FileOps | None = None, seq: bool = False) -> KernfsNode:
        """`seq`: show() is a seq_file's, read whole however long."""
        node = KernfsNode(name, stat.S_IFREG | mode, parent, 0, show, store)
        node.size = size
        node.fops = fops
        node.seq = seq
        return self._add(parent, node)

    def create_link(self, parent: KernfsNode, name: str, target: Show) -> KernfsNode:
        """A symlink whose target is computed when it is read (procfs's /proc/self)."""
        node = KernfsNode(name, stat.S_IFLNK | 0o777, parent, 0, show=target)
        node.size = 0
        return self._add(parent, node)

    def _add(self, parent: KernfsNode, node: KernfsNode) -> KernfsNode:
        assert parent.children is not None, "parent must be a directory"
        if not parent.active:
            raise FileNotFoundError(errno.ENOENT, "parent removed", parent.path)
        if node.name in parent.children:
            raise FileExistsError(errno.EEXIST, "duplicate filename", f"{parent.path}/{node.name}")
        node.ino = self._next_ino
        node.ctime = self._now()
        node.made_lazily = parent is self._materializing and node.is_dir
        self._next_ino += 1
        parent.children[node.name] = node
        self._nodes[node.ino] = node
        for listener in self.listeners:
            listener.node_added(node)
        return node

    def remove(self, node: KernfsNode) -> None:
        """Remove a node and everything below it; handles on them go stale."""
        if not node.active:
            return
        if node.children:
            for child in list(node.children.values()):
                self.remove(child)
        node.active = False
        del self._nodes[node.ino]
        if node.parent is not None and node.parent.children is not None:
            node.parent.children.pop(node.name, None)
        for listener in self.listeners:
            listener.node_removed(node)

    # -- the attribute file rules (fs/kernfs/file.c, fs/sysfs/file.c) ---------

    @staticmethod
    def open_check(node: KernfsNode, want_read: bool, want_write: bool) -> int:
        """0, or the negative errno kernfs_fop_open gives, whoever the caller is."""
        if not node.active:
            return -errno.ENODEV
        if node.is_dir:
            return -errno.EISDIR if want_write else 0
        if want_write and (not node.mode & 0o222 or node.store is None):
            return -errno.EACCES
        if want_read and (not node.mode & 0o444 or node.show is None):
            return -errno.EACCES
        return 0

    @staticmethod
    def chmod(node: KernfsNode, mode: int) -> None:
        """Set the permission bits, as kernfs_setattr does; open_check obeys them."""
        node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)

    @staticmethod
    def read(node: KernfsNode, offset: int = 0, size: int | None = None) -> bytes | int:
        """Bytes at offset of a fresh show() (to its end when size is None), or
        -ENODEV for a removed node."""
        if not node.active:
            return -errno.ENODEV
        assert node.show is not None
        data = node.show().encode()
        if not node.seq:
            data = data[: PAGE_SIZE - 1]
        return data[offset:] if size is None else data[offset: offset + size]

    @staticmethod
    def write(node: KernfsNode, data: bytes) -> int:
        """Byte count consumed, or a negative errno from the store callback."""
        if not node.active:
            return -errno.ENODEV
        if not data:
            return 0
        assert node.store is not None
        return node.store(bytes(data[:PAGE_SIZE]))
