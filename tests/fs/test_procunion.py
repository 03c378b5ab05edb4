"""ProcUnionOperations called directly, over a directory standing in for the run's procfs."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from klpfs.fs.procunion import UNION_INO_BASE, ProcUnionOperations
from klpfs.fs.realtasks import RealTasks
from klpfs.system import System

CALLER = SimpleNamespace(pid=4242)
"""A FUSE request from the run's shell (host tid 4242 is pid 10000 inside)."""
OUTSIDER = SimpleNamespace(pid=1)


class FakeCallers:
    def __init__(self) -> None:
        self.reading = True
        self.fail = False

    def ids(self, host_tid: int) -> tuple[int, int] | None:
        if self.fail:
            raise RuntimeError("boom")
        return (10000, 10000) if host_tid == CALLER.pid else None

    def reading_link(self, host_tid: int) -> bool:
        return self.reading


def stat_line(pid: int, comm: str, ppid: int, start: int) -> str:
    return f"{pid} ({comm}) S {ppid} " + " ".join(["0"] * 16) + f" {start} 0 0\n"


@pytest.fixture
def real_proc(tmp_path: Path) -> Path:
    """init (1), a shell (10000) with a thread, a child of it (10001), sys/kernel, mounts."""
    for pid, comm, ppid, start in ((1, "klpfs-init", 0, 1), (10000, "sh", 1, 5), (10001, "cat", 10000, 6)):
        d = tmp_path / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "stat").write_text(stat_line(pid, comm, ppid, start))
        (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\n")
        (d / "exe").symlink_to("/usr/bin/sh")
        (d / "fd" / "0").symlink_to("pipe:[77]")
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "task" / str(pid) / "comm").write_text(f"{comm}\n")
    (tmp_path / "10000/task/10002").mkdir()
    (tmp_path / "10002").mkdir()  # a thread: not listed by a real procfs, but there
    (tmp_path / "10002/status").write_text("Name:\tsh\nTgid:\t10000\n")
    (tmp_path / "sys/kernel").mkdir(parents=True)
    (tmp_path / "sys/kernel/pid_max").write_text("32768\n")
    (tmp_path / "mounts").symlink_to("self/mounts")
    (tmp_path / "self").symlink_to("10000")
    return tmp_path


class Union:
    def __init__(self, system: System, real_proc: Path) -> None:
        self.system = system
        self.callers = FakeCallers()
        self.tasks = RealTasks(system.kernel, str(real_proc))
        self.ops = ProcUnionOperations(system.kernfs, system.kernel, self.tasks, self.callers)  # type: ignore[arg-type]
        proc = system.kernfs.lookup(system.kernfs.root, "proc")
        assert proc is not None
        self.proc = proc.ino

    async def walk(self, path: str, ctx: object = CALLER) -> pyfuse3.EntryAttributes:
        ino = self.proc
        attrs = await self.ops.getattr(ino, ctx)
        for name in path.split("/"):
            attrs = await self.ops.lookup(ino, name.encode(), ctx)
            ino = attrs.st_ino
        return attrs

    async def read(self, path: str) -> bytes:
        ino = (await self.walk(path)).st_ino
        fh = (await self.ops.open(ino, os.O_RDONLY, CALLER)).fh
        try:
            return await self.ops.read(fh, 0, 4096)
        finally:
            await self.ops.release(fh)

    async def listdir(self, path: str) -> list[str]:
        ino = (await self.walk(path)).st_ino if path else self.proc
        fh = await self.ops.opendir(ino, CALLER)
        names: list[str] = []
        real_reply = pyfuse3.readdir_reply
        try:
            pyfuse3.readdir_reply = lambda token, name, attrs, next_id: names.append(name.decode()) or True
            await self.ops.readdir(fh, 0, None)  # type: ignore[arg-type]
        finally:
            pyfuse3.readdir_reply = real_reply
            await self.ops.releasedir(fh)
        return names


@pytest.fixture
async def union(system: System, real_proc: Path) -> Union:
    return Union(system, real_proc)


async def test_self_is_the_callers_real_directory_with_its_emulated_patch_state(union: Union) -> None:
    self_ino = (await union.walk("self")).st_ino
    assert await union.ops.readlink(self_ino, CALLER) == b"10000"
    assert await union.ops.readlink(self_ino, OUTSIDER) == b"812"  # the console shell, as on a plain mount
    thread_self = (await union.walk("thread-self")).st_ino
    assert await union.ops.readlink(thread_self, CALLER) == b"10000/task/10000"
    assert stat.S_ISDIR((await union.walk("10000")).st_mode)
    assert await union.read("10000/patch_state") == b"-1\n"
    assert await union.read("10000/task/10000/patch_state") == b"-1\n"
    assert await union.read("10000/status") == b"Name:\tsh\nTgid:\t10000\n"  # the real file
    assert await union.read("10000/stack") == b"".join(  # the emulated task's, resting in a system call
        f"[<0>] {name}\n".encode() for name in await _stack_names(union, 10000))
    assert await union.read("10002/patch_state") == b"-1\n"  # a thread, looked up by its tid


async def _stack_names(union: Union, pid: int) -> list[str]:
    from klpfs.kernel.sched import stack_lines
    sched = union.system.kernel.sched
    task = sched.find(pid)
    assert task is not None
    return [line.removeprefix("[<0>] ") for line in stack_lines(sched.stack(task))]


async def test_processes_become_tasks_inheriting_their_parents_state(union: Union) -> None:
    sched = union.system.kernel.sched
    console = union.system.kernel.console
    console.patch_state = 1
    sched.refresh()  # what `klpfs ps` does first
    shell, child = sched.find(10000), sched.find(10001)
    assert shell is not None and child is not None
    assert (shell.comm, shell.ppid, shell.patch_state) == ("sh", console.pid, 1)
    assert (child.comm, child.ppid) == ("cat", 10000)
    assert sched.find(1).comm == "systemd"  # the namespace's init is no task
    new = sched.add("insmod", shell.kind, [])
    assert new.pid < 10000  # the emulator's own pids continue below the run's
    Path(union.tasks.proc_dir, "10001/stat").unlink()
    sched.refresh()
    assert sched.find(10001) is None and child.exited


async def test_links_answer_readlink_with_text_and_walks_with_the_magic_link(union: Union, real_proc: Path) -> None:
    exe = (await union.walk("10000/exe")).st_ino
    fd0 = (await union.walk("10000/fd/0")).st_ino
    assert await union.ops.readlink(exe, CALLER) == b"/usr/bin/sh"
    assert await union.ops.readlink(fd0, CALLER) == b"pipe:[77]"
    union.callers.reading = False  # an open() walking through the link
    assert await union.ops.readlink(fd0, CALLER) == f"{real_proc}/10000/fd/0".encode()
    mounts = (await union.walk("mounts")).st_ino
    assert await union.ops.readlink(mounts, CALLER) == b"self/mounts"  # not in a pid directory: its text


async def test_listing_and_merged_directories(union: Union) -> None:
    names = await union.listdir("")
    assert names[:2] == [".", ".."]
    assert {"cmdline", "sys", "mounts", "self", "thread-self", "1", "812", "10000", "10001"} <= set(names)
    assert len(names) == len(set(names))
    assert names.index("self") < names.index("1") < names.index("812") < names.index("10000")
    assert set(await union.listdir("sys/kernel")) >= {"pid_max", "tainted", "ftrace_enabled"}
    assert await union.read("sys/kernel/pid_max") == b"32768\n"
    assert await union.read("sys/kernel/tainted") == b"0\n"
    assert set(await union.listdir("10000")) >= {"status", "exe", "fd", "task", "patch_state", "stack"}
    assert set(await union.listdir("10000/task")) == {".", "..", "10000", "10002"}
    assert await union.read("1/comm") == b"systemd\n"  # the emulated init hides the namespace's


async def test_inodes_are_forgotten_and_errors_are_answers(union: Union) -> None:
    attrs = await union.walk("10000/status")
    assert attrs.st_ino > UNION_INO_BASE and attrs.entry_timeout == 0
    await union.ops.forget([(attrs.st_ino, 1)])
    with pytest.raises(pyfuse3.FUSEError) as gone:
        await union.ops.getattr(attrs.st_ino, CALLER)
    assert gone.value.errno == errno.ESTALE
    with pytest.raises(pyfuse3.FUSEError) as missing:
        await union.walk("10000/nosuch")
    assert missing.value.errno == errno.ENOENT
    union.callers.fail = True
    self_ino = (await union.walk("self")).st_ino
    with pytest.raises(pyfuse3.FUSEError) as bug:
        await union.ops.readlink(self_ino, CALLER)
    assert bug.value.errno == errno.EIO
