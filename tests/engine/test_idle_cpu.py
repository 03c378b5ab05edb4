"""Whether a CPU is idle, from per-CPU counts of running tasks kept as tasks fork, run,
sleep, wake, migrate and exit (rq->nr_running): checked against a count made from
scratch after every step of random sequences."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from klpfs.kernel.sched import TASK_INTERRUPTIBLE, TASK_RUNNING, TASK_UNINTERRUPTIBLE, Sched, Task, TaskKind
from klpfs.system import System


def counted(sched: Sched) -> list[int]:
    """nr_running made from scratch: the task list's running tasks on each CPU."""
    counts = [0] * len(sched.cpu_online)
    for task in sched.tasks.values():
        if task.state == TASK_RUNNING:
            counts[task.cpu] += 1
    return counts


class IdleCpus(RuleBasedStateMachine):
    """Runs inside a trio test: the emulated kernel reads trio's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.system = System("4.15")
        self.sched = self.system.kernel.sched
        self.func = self.system.kernel.kallsyms.find("cmdline_proc_show")
        self.mine: list[Task] = []

    @initialize()
    def some_tasks(self) -> None:
        for kind in (TaskKind.KTHREAD, TaskKind.USER):
            self.fork(kind)

    @rule(kind=st.sampled_from([TaskKind.KTHREAD, TaskKind.USER]))
    def fork(self, kind: TaskKind) -> None:
        base = self.sched.find(2).base if kind is TaskKind.KTHREAD else self.sched.find(1).base
        self.mine.append(self.sched.add("t", kind, base, ppid=2 if kind is TaskKind.KTHREAD else 1))

    def pick(self, data: st.DataObject) -> Task:
        return data.draw(st.sampled_from(self.mine))

    @rule(data=st.data())
    def run(self, data: st.DataObject) -> None:
        if self.mine:
            self.sched.run(self.pick(data))

    @rule(data=st.data())
    def rest(self, data: st.DataObject) -> None:
        if self.mine:
            self.sched.rest(self.pick(data))

    @rule(data=st.data(), state=st.sampled_from([TASK_RUNNING, TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE]))
    def enter(self, data: st.DataObject, state: str) -> None:
        if self.mine:
            self.sched.enter(self.pick(data), self.func, state)

    @rule(data=st.data())
    def wake(self, data: st.DataObject) -> None:
        if self.mine:
            self.sched.wake(self.pick(data))

    @rule(data=st.data(), cpu=st.integers(0, 1))
    def migrate(self, data: st.DataObject, cpu: int) -> None:
        if self.mine:
            self.pick(data).cpu = cpu

    @rule(cpu=st.integers(0, 1), online=st.booleans())
    def hotplug(self, cpu: int, online: bool) -> None:
        self.sched.set_cpu_online(cpu, online)

    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        if self.mine:
            task = self.pick(data)
            self.mine.remove(task)
            self.sched.exit(task)

    @invariant()
    def counts_match_the_task_list(self) -> None:
        assert self.sched.nr_running == counted(self.sched)

    @invariant()
    def idle_means_online_with_nothing_running(self) -> None:
        expected = counted(self.sched)
        for idle in self.sched.idle_tasks:
            assert self.sched.idle_running(idle) == (self.sched.cpu_online[idle.cpu] and expected[idle.cpu] == 0)


async def test_idle_cpu_bookkeeping_follows_every_task_event(autojump_clock) -> None:
    run_state_machine_as_test(IdleCpus, settings=settings(max_examples=60, stateful_step_count=40, deadline=None))


async def test_an_exited_task_no_longer_counts(autojump_clock) -> None:
    sched = System("4.15").kernel.sched
    task = sched.add("busy", TaskKind.KTHREAD, sched.find(2).base, ppid=2)
    others = counted(sched)[task.cpu]
    sched.run(task)
    assert sched.nr_running[task.cpu] == others + 1
    sched.exit(task)
    assert sched.nr_running[task.cpu] == others
    task.state = TASK_RUNNING
    task.cpu = 1 - task.cpu
    assert sched.nr_running == counted(sched)
