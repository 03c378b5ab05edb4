"""A small kernfs: the tree of directories and attributes behind sysfs.

It carries the rules every sysfs file obeys, whoever registered it, so the
livepatch code only supplies show/store callbacks (spec §2.2):

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
from collections.abc import Awaitable, Callable
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


class KernfsNode:
    """One directory or attribute; an attribute has show and/or store."""

    __slots__ = ("name", "mode", "parent", "children", "ino", "show", "store", "active", "ctime", "size",
                 "fops", "seq")

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
        if parent.children is None:
            return None
        return parent.children.get(name)

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
