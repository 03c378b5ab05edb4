"""/proc/<pid> made on demand: proc_pid_lookup() and proc_pid_readdir() make a task's
directory when it is first looked up or listed, so forking costs no kernfs nodes, while
everything a reader sees stays as if every task's directory were always there."""

from __future__ import annotations

import errno

import trio

from klpfs.kernel.sched import Task, TaskKind
from klpfs.sysfs.kernfs import Kernfs, KernfsNode

from .conftest import Machine

TASK_DIR_NODES = 13
"""/proc/<pid> and task/ and task/<pid>, and comm, stat, status, patch_state, stack in each pid dir."""


def count_nodes(node: KernfsNode) -> int:
    """The nodes the tree holds under node, itself included, without making lazy ones."""
    return 1 + sum(count_nodes(child) for child in (node.children or {}).values())


def fork(m: Machine, comm: str = "worker", pid: int | None = None) -> Task:
    return m.sched.add(comm, TaskKind.KTHREAD, m.sched.find(2).base, ppid=2, pid=pid)


class Recorder:
    """A kernfs listener that keeps what it is told."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []

    def node_added(self, node: KernfsNode) -> None:
        self.added.append(node.path)

    def node_removed(self, node: KernfsNode) -> None:
        self.removed.append(node.path)


async def test_forking_makes_no_nodes_until_a_lookup(m, autojump_clock) -> None:
    before = count_nodes(m.kernfs.root)
    tasks = [fork(m) for _ in range(10_000)]
    assert count_nodes(m.kernfs.root) == before
    assert m.node(f"proc/{tasks[5000].pid}/comm") is not None
    assert count_nodes(m.kernfs.root) == before + TASK_DIR_NODES


async def test_inodes_stay_while_the_task_lives_and_go_at_exit(m, autojump_clock) -> None:
    t = fork(m)
    directory = m.node(f"proc/{t.pid}")
    status = m.node(f"proc/{t.pid}/task/{t.pid}/patch_state")
    assert directory is not None and status is not None
    assert m.node(f"proc/{t.pid}") is directory
    assert m.node(f"proc/{t.pid}/task/{t.pid}/patch_state").ino == status.ino
    assert Kernfs.read(status) == b"-1\n"
    m.sched.exit(t)
    assert m.node(f"proc/{t.pid}") is None
    assert Kernfs.read(status) == -errno.ENODEV
    assert m.kernfs.get(directory.ino) is None


async def test_an_inode_number_is_never_reused_by_a_new_task_of_the_same_pid(m, autojump_clock) -> None:
    t = fork(m, pid=4000)
    old = m.node("proc/4000").ino
    m.sched.exit(t)
    fork(m, pid=4000)
    assert m.node("proc/4000").ino > old


async def test_listing_shows_every_task_in_inode_order(m, autojump_clock) -> None:
    tasks = [fork(m) for _ in range(50)]
    m.node(f"proc/{tasks[30].pid}")  # one made before the listing, the rest by it
    proc = m.node("proc")
    names = m.kernfs.names(proc)
    pids = [str(t) for t in m.sched.tasks]
    assert [name for name in names if name.isdigit()] == [str(tasks[30].pid)] + [p for p in pids if p != str(
        tasks[30].pid)]
    listed = m.kernfs.listdir(proc)
    assert sorted(n.name for n in listed if n.name.isdigit()) == sorted(pids)
    assert [n.ino for n in listed] == sorted(n.ino for n in listed)
    assert m.kernfs.subdir_count(proc) == sum(1 for n in listed if n.is_dir)


async def test_names_make_no_nodes(m, autojump_clock) -> None:
    fork(m)
    before = count_nodes(m.kernfs.root)
    m.kernfs.names(m.node("proc"))
    m.kernfs.subdir_count(m.node("proc"))
    assert count_nodes(m.kernfs.root) == before


async def test_lookups_of_names_that_are_no_live_pid_find_nothing(m, autojump_clock) -> None:
    t = fork(m)
    before = count_nodes(m.kernfs.root)
    for name in (f"0{t.pid}", f"+{t.pid}", "999999", "0", "nosuch"):
        assert m.node(f"proc/{name}") is None, name
    assert count_nodes(m.kernfs.root) == before


async def test_only_a_made_directory_is_announced_and_removed(m, autojump_clock) -> None:
    recorder = Recorder()
    m.kernfs.listeners.append(recorder)
    quiet = fork(m)
    seen = fork(m)
    m.sched.exit(quiet)
    assert recorder.added == recorder.removed == []
    m.node(f"proc/{seen.pid}")
    assert len(recorder.added) == TASK_DIR_NODES
    assert recorder.added[0] == f"/proc/{seen.pid}"
    m.sched.exit(seen)
    assert len(recorder.removed) == TASK_DIR_NODES
    assert recorder.removed[-1] == f"/proc/{seen.pid}"


async def test_stat_start_time_is_the_fork_time_not_the_lookup_time(m, autojump_clock) -> None:
    await trio.sleep(5)
    t = fork(m)
    await trio.sleep(3)
    fields = Kernfs.read(m.node(f"proc/{t.pid}/stat")).split()
    assert fields[21] == str(round(t.start_time * 100)).encode()
    assert round(t.start_time) == round(m.kernel.now() - 3)
