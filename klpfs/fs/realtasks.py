"""The real processes of a `klpfs run` as user tasks of the emulated kernel.

`klpfs run` gives its command a PID namespace whose procfs is mounted at a
hidden directory (see klpfs/control/pidns.py).  Every process in it but its
init is registered here as an emulated user task with its real pid and
comm, so `klpfs ps` lists it, a transition waits for it as for any task,
and its /proc/<pid>/patch_state reads its emulated state.  A process seen
for the first time gets its parent's patch state and pending flag, as
klp_copy_process() gives a child at fork: the console shell's for the run's
command (whose parent, the init, is no task).  It rests where a process
that is not running rests, in a system call, so a transition switches it
once it checks its stack (klp_try_switch_task()), and a fake signal sends
it out to user space like any sleeping user task.

Nothing tells a container about forks and exits (the proc connector answers
only the initial namespaces), so the namespace's procfs is polled, and also
read whenever a /proc lookup or `klpfs ps` needs it up to date.  A process
that is gone exits; a pid that came back for another process (a different
start time) is a new task.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from klpfs.kernel.kernel import Kernel
from klpfs.kernel.sched import TASK_COMM_LEN, USER_BASE, Task, TaskKind

log = logging.getLogger(__name__)

NS_INIT = 1
"""The namespace's init is klpfs's, not one of the command's processes."""
POLL_INTERVAL = 0.1
"""Seconds between two looks at the namespace's processes."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/<pid>/stat tells about a process that matters here."""

    comm: str
    ppid: int
    start: int
    """Start time in clock ticks since boot: tells a reused pid from its first holder."""


def read_stat(path: str) -> ProcStat | None:
    """Parse a /proc/<pid>/stat (the comm may hold spaces and parentheses); None if gone."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    head, _, tail = text.rpartition(") ")
    fields = tail.split()
    if "(" not in head or len(fields) < 20:
        return None
    return ProcStat(head.split("(", 1)[1], int(fields[1]), int(fields[19]))


@dataclass(slots=True)
class _Registered:
    task: Task
    start: int


class RealTasks:
    """Keeps the emulated task list in step with the processes under `proc_dir`."""

    def __init__(self, kernel: Kernel, proc_dir: str) -> None:
        self._kernel = kernel
        self.proc_dir = proc_dir
        self._known: dict[int, _Registered] = {}
        self._base = kernel.kallsyms.find_each(USER_BASE)
        kernel.sched.task_sources.append(self.sync)

    def task(self, pid: int) -> Task | None:
        """The emulated task standing for real process pid, if it is one."""
        known = self._known.get(pid)
        return known.task if known is not None and not known.task.exited else None

    def thread_group(self, tid: int) -> int | None:
        """The process a thread belongs to: /proc/<tid> answers for every thread, listed or not."""
        try:
            with open(f"{self.proc_dir}/{tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def sync(self) -> None:
        """Register the processes that came, exit the tasks of those that went."""
        try:
            names = os.listdir(self.proc_dir)
        except OSError:
            names = []
        sched = self._kernel.sched
        seen: list[tuple[int, int, ProcStat]] = []
        for name in names:
            if not name.isdigit() or int(name) == NS_INIT:
                continue
            stat = read_stat(f"{self.proc_dir}/{name}/stat")
            if stat is not None:
                seen.append((stat.start, int(name), stat))
        alive = {pid for _, pid, _ in seen}
        for pid, registered in list(self._known.items()):
            if pid not in alive or registered.task.exited:
                self._forget(pid)
        for _, pid, stat in sorted(seen):  # parents, started earlier, first
            known = self._known.get(pid)
            if known is not None and known.start != stat.start:
                self._forget(pid)
                known = None
            if known is not None:
                known.task.comm = stat.comm[: TASK_COMM_LEN - 1]  # an exec renames it
            elif sched.find(pid) is None:  # an emulated task holding this pid keeps it
                self._register(pid, stat)

    def _register(self, pid: int, stat: ProcStat) -> None:
        """copy_process() as the kernel would have done it: the parent's state is inherited."""
        parent = self.task(stat.ppid)
        ppid = parent.pid if parent is not None else self._kernel.console.pid
        task = self._kernel.sched.add(stat.comm, TaskKind.USER, self._base, ppid=ppid, pid=pid, foreign=True)
        self._known[pid] = _Registered(task, stat.start)

    def _forget(self, pid: int) -> None:
        """The process is gone: do_exit() of its task."""
        known = self._known.pop(pid)
        if not known.task.exited:
            self._kernel.sched.exit(known.task)

    async def run(self, interval: float = POLL_INTERVAL) -> None:
        """Poll until cancelled; a failing look is logged and the next one tried."""
        while True:
            try:
                self.sync()
            except Exception:
                log.exception("following the run's processes")
            await trio.sleep(interval)
