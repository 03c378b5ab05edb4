"""KernfsOperations called directly, without FUSE, the way s3ql tests its Operations."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Iterator
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from klpfs.fs.invalidate import Invalidator
from klpfs.fs.operations import CACHE_TIMEOUT, KernfsOperations
from klpfs.sysfs.kernfs import PAGE_SIZE, ROOT_INO, Kernfs, KernfsNode


class RecordingNotifier:
    """Stands in for the kernel: records what it is told, optionally blocking first."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.gate = threading.Event()
        self.gate.set()

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        self.gate.wait()
        self.sent.append(("entry", parent_ino, name))

    def invalidate_attrs(self, ino: int) -> None:
        self.sent.append(("attrs", ino))


class Tree:
    def __init__(self) -> None:
        self.kernfs = Kernfs(now=lambda: 1700000000.25)
        self.value = "1"
        self.stores: list[bytes] = []
        k = self.kernfs
        self.rw = k.create_file(k.root, "rw", 0o644, lambda: f"{self.value}\n", self._store)
        self.ro = k.create_file(k.root, "ro", 0o444, lambda: "ro\n")
        self.wo = k.create_file(k.root, "wo", 0o200, store=self._store)
        self.einval = k.create_file(k.root, "einval", 0o200, store=lambda data: -errno.EINVAL)
        self.raises = k.create_file(k.root, "raises", 0o644, self._raise, self._raise)
        self.dir = k.create_dir(k.root, "dir")
        self.sub = k.create_dir(self.dir, "sub")
        self.leaf = k.create_dir(self.sub, "leaf")
        self.f = k.create_file(self.sub, "f", 0o444, lambda: "f\n")
        self.notifier = RecordingNotifier()
        self.ops = KernfsOperations(self.kernfs, Invalidator(self.notifier))

    def _store(self, data: bytes) -> int:
        self.stores.append(data)
        return len(data)

    def _raise(self, *args: object) -> int:
        raise RuntimeError("bug")


@pytest.fixture
def tree() -> Iterator[Tree]:
    tree = Tree()
    yield tree
    tree.ops.close()


async def fuse_errno(call: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


async def test_attributes_are_sysfs_ones(tree: Tree) -> None:
    rw = await tree.ops.lookup(ROOT_INO, b"rw", None)
    assert (rw.st_ino, rw.st_mode, rw.st_size, rw.st_nlink) == (tree.rw.ino, 0o100644, PAGE_SIZE, 1)
    assert (rw.st_uid, rw.st_gid) == (0, 0)
    assert rw.st_mtime_ns == rw.st_ctime_ns == rw.st_atime_ns == 1700000000250000000
    assert rw.entry_timeout == rw.attr_timeout == CACHE_TIMEOUT
    directory = await tree.ops.getattr(tree.dir.ino, None)
    assert (directory.st_mode, directory.st_size, directory.st_nlink) == (0o40755, 0, 3)
    assert (await tree.ops.getattr(tree.sub.ino, None)).st_nlink == 3  # leaf/, not f
    assert (await tree.ops.lookup(tree.dir.ino, b"..", None)).st_ino == ROOT_INO


async def test_missing_name_is_enoent_not_a_cached_negative_entry(tree: Tree) -> None:
    assert await fuse_errno(tree.ops.lookup(ROOT_INO, b"nope", None)) == errno.ENOENT


@pytest.mark.parametrize(("name", "flags", "expected"), [
    ("rw", os.O_RDONLY, 0), ("rw", os.O_WRONLY, 0), ("rw", os.O_RDWR, 0),
    ("ro", os.O_RDONLY, 0), ("ro", os.O_WRONLY, errno.EACCES), ("ro", os.O_RDWR, errno.EACCES),
    ("wo", os.O_WRONLY, 0), ("wo", os.O_RDONLY, errno.EACCES), ("wo", os.O_RDWR, errno.EACCES),
])
async def test_open_applies_the_kernfs_mode_rule(tree: Tree, name: str, flags: int,
                                                 expected: int) -> None:
    node = getattr(tree, name)
    if expected:
        assert await fuse_errno(tree.ops.open(node.ino, flags, None)) == expected
    else:
        info = await tree.ops.open(node.ino, flags | os.O_TRUNC, None)
        assert info.direct_io


async def test_reads_continue_from_the_shown_snapshot_like_seq_file(tree: Tree) -> None:
    fh = (await tree.ops.open(tree.rw.ino, os.O_RDONLY, None)).fh
    assert await tree.ops.read(fh, 0, 1) == b"1"
    tree.value = "0"
    assert await tree.ops.read(fh, 1, 4096) == b"\n"
    assert await tree.ops.read(fh, 2, 4096) == b""
    assert await tree.ops.read(fh, 0, 4096) == b"0\n"


async def test_writes_follow_the_sysfs_rules(tree: Tree) -> None:
    fh = (await tree.ops.open(tree.wo.ino, os.O_WRONLY, None)).fh
    assert await tree.ops.write(fh, 0, b"") == 0
    assert tree.stores == []
    assert await tree.ops.write(fh, 7, b"x" * 5000) == PAGE_SIZE
    assert tree.stores == [b"x" * PAGE_SIZE]
    fh = (await tree.ops.open(tree.einval.ino, os.O_WRONLY, None)).fh
    assert await fuse_errno(tree.ops.write(fh, 0, b"1\n")) == errno.EINVAL


async def test_handles_on_a_removed_node_go_stale(tree: Tree) -> None:
    reader = (await tree.ops.open(tree.rw.ino, os.O_RDONLY, None)).fh
    assert await tree.ops.read(reader, 0, 4096) == b"1\n"
    writer = (await tree.ops.open(tree.rw.ino, os.O_WRONLY, None)).fh
    tree.kernfs.remove(tree.rw)
    assert await fuse_errno(tree.ops.read(reader, 0, 4096)) == errno.ENODEV
    assert await fuse_errno(tree.ops.read(reader, 1, 4096)) == errno.ENODEV
    assert await fuse_errno(tree.ops.write(writer, 0, b"0\n")) == errno.ENODEV
    assert (await tree.ops.getattr(tree.rw.ino, None)).st_mode == 0o100644  # fstat
    assert await fuse_errno(tree.ops.open(tree.rw.ino, os.O_RDONLY, None)) == errno.ENODEV
    await tree.ops.release(reader)
    await tree.ops.release(writer)
    # A cached dentry: ESTALE sends the kernel back to lookup, which says ENOENT.
    assert await fuse_errno(tree.ops.getattr(tree.rw.ino, None)) == errno.ESTALE
    assert await fuse_errno(tree.ops.lookup(ROOT_INO, b"rw", None)) == errno.ENOENT


async def test_a_bug_answers_eio_and_is_logged(tree: Tree, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fh = (await tree.ops.open(tree.raises.ino, os.O_RDWR, None)).fh
    with caplog.at_level(logging.ERROR, "klpfs.fs.operations"):
        assert await fuse_errno(tree.ops.read(fh, 0, 4096)) == errno.EIO
        assert await fuse_errno(tree.ops.write(fh, 0, b"1")) == errno.EIO

        def broken(ino: int) -> KernfsNode:
            raise KeyError(ino)
        monkeypatch.setattr(tree.kernfs, "get", broken)
        assert await fuse_errno(tree.ops.getattr(12345, None)) == errno.EIO
        assert await fuse_errno(tree.ops.lookup(ROOT_INO, b"rw", None)) == errno.EIO
        assert await fuse_errno(tree.ops.open(tree.ro.ino, os.O_RDONLY, None)) == errno.EIO
        assert await fuse_errno(tree.ops.opendir(ROOT_INO, None)) == errno.EIO
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [
        RuntimeError, RuntimeError, KeyError, KeyError, KeyError, KeyError]


async def test_setattr_keeps_mode_owner_and_times_and_ignores_size(tree: Tree) -> None:
    fields = pyfuse3.SetattrFields()
    attr = pyfuse3.EntryAttributes()
    assert (await tree.ops.setattr(tree.rw.ino, attr, fields, None, None)).st_size == PAGE_SIZE
    attr.st_mode = stat.S_IFREG | 0o444
    attr.st_uid = 65534
    fields = _fields(update_mode=True, update_uid=True)
    changed = await tree.ops.setattr(tree.rw.ino, attr, fields, None, None)
    assert (changed.st_mode, changed.st_uid, changed.st_gid) == (0o100444, 65534, 0)
    assert (await tree.ops.getattr(tree.rw.ino, None)).st_mode == 0o100444
    assert changed.st_ctime_ns > changed.st_mtime_ns
    assert await fuse_errno(tree.ops.open(tree.rw.ino, os.O_WRONLY, None)) == errno.EACCES


def _fields(**updates: bool) -> pyfuse3.SetattrFields:
    """SetattrFields is read-only from Python: a stand-in with the same attributes."""
    fields = type("Fields", (), {name: False for name in dir(pyfuse3.SetattrFields())
                                 if name.startswith("update_")})()
    for name, value in updates.items():
        setattr(fields, name, value)
    return fields


@pytest.mark.parametrize(("call", "expected"), [
    ("create", errno.EACCES), ("mkdir", errno.EPERM), ("mknod", errno.EPERM),
    ("unlink", errno.EPERM), ("rmdir", errno.EPERM), ("symlink", errno.EPERM),
])
async def test_the_tree_cannot_be_changed_from_outside(tree: Tree, call: str,
                                                       expected: int) -> None:
    args = {"create": (ROOT_INO, b"x", 0o644, os.O_WRONLY, None),
            "mkdir": (ROOT_INO, b"x", 0o755, None), "mknod": (ROOT_INO, b"x", 0o644, 0, None),
            "unlink": (ROOT_INO, b"rw", None), "rmdir": (ROOT_INO, b"dir", None),
            "symlink": (ROOT_INO, b"x", b"rw", None)}[call]
    assert await fuse_errno(getattr(tree.ops, call)(*args)) == expected


async def test_a_removed_subtree_is_one_entry_invalidation(tree: Tree) -> None:
    await tree.ops.getattr(tree.dir.ino, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.ops.invalidator.run)
        tree.kernfs.remove(tree.sub)
        assert tree.ops.invalidator.pending
        await tree.ops.invalidator.settle()
        nursery.cancel_scope.cancel()
    assert tree.notifier.sent == [("entry", tree.dir.ino, b"sub"), ("attrs", tree.dir.ino)]
    assert (await tree.ops.getattr(tree.dir.ino, None)).st_nlink == 2


async def test_new_subdirectories_update_the_parents_links(tree: Tree) -> None:
    assert (await tree.ops.getattr(tree.dir.ino, None)).st_nlink == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.ops.invalidator.run)
        tree.kernfs.create_dir(tree.dir, "new")
        tree.kernfs.create_file(tree.dir, "file", 0o444, lambda: "")
        await tree.ops.invalidator.settle()
        nursery.cancel_scope.cancel()
    assert (await tree.ops.getattr(tree.dir.ino, None)).st_nlink == 4
    assert tree.notifier.sent == [("attrs", tree.dir.ino)]


async def test_nothing_is_queued_while_not_mounted(tree: Tree) -> None:
    tree.kernfs.remove(tree.sub)
    assert not tree.ops.invalidator.pending


async def test_reads_wait_until_removals_reached_the_kernel(tree: Tree) -> None:
    """What a read reveals (something is gone) must already hold for path lookups."""
    fh = (await tree.ops.open(tree.ro.ino, os.O_RDONLY, None)).fh
    results: list[bytes] = []
    done = trio.Event()
    tree.notifier.gate.clear()
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.ops.invalidator.run)
        tree.kernfs.remove(tree.sub)

        async def read() -> None:
            results.append(await tree.ops.read(fh, 0, 4096))
            done.set()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        tree.notifier.gate.set()
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert results == [b"ro\n"]
    assert tree.notifier.sent[0] == ("entry", tree.dir.ino, b"sub")


class LazyNumbers:
    """A directory's numbered subdirectories made on demand, as procfs's /proc/<pid>."""

    def __init__(self, kernfs: Kernfs, parent: KernfsNode) -> None:
        self.kernfs = kernfs
        self.parent = parent
        self.live: list[str] = []

    def names(self) -> list[str]:
        return list(self.live)

    def materialize(self, name: str) -> None:
        if name in self.live:
            self.kernfs.create_dir(self.parent, name)

    def add(self, name: str) -> None:
        self.live.append(name)
        self.kernfs.lazy_dirs_changed(self.parent, 1)

    def drop(self, name: str) -> None:
        self.live.remove(name)
        node = self.parent.children.get(name) if self.parent.children is not None else None
        if node is None:
            self.kernfs.lazy_dirs_changed(self.parent, -1)
        else:
            self.kernfs.remove(node)


async def test_a_lazy_directory_links_its_subdirectories_made_or_not(tree: Tree) -> None:
    numbers = LazyNumbers(tree.kernfs, tree.dir)
    tree.kernfs.set_lazy(tree.dir, numbers)
    numbers.add("7")

    async def nlink() -> int:
        return (await tree.ops.getattr(tree.dir.ino, None)).st_nlink

    assert await nlink() == 4  # sub/ and 7/
    numbers.add("8")
    assert await nlink() == 5
    assert (await tree.ops.lookup(tree.dir.ino, b"7", None)).st_mode == 0o40755
    assert await nlink() == 5
    numbers.drop("7")
    assert await nlink() == 4
    numbers.drop("8")
    assert await nlink() == 3
    assert await fuse_errno(tree.ops.lookup(tree.dir.ino, b"8", None)) == errno.ENOENT
