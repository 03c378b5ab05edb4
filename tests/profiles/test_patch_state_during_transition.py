"""While a transition runs every task reads 0 or 1 in /proc/<pid>/patch_state,
never -1 (obs #12): klp_init_transition() gives every task and idle task the
initial state, and copy_process() gives a child its parent's (klp_copy_process()).
A reverse (obs #14) only flips the target.  Checked at every timer event and
after every step of a stuck transition that is reversed both ways while tasks
come and go: short-lived insmod and rmmod processes, a kthread a module starts,
tasks forked from kthreadd and from the shell, kworkers made on demand."""

from __future__ import annotations

import pytest

from klpfs.kernel.sched import KTHREAD_BASE, TaskKind
from klpfs.kernel.workqueue import idle_kworker

from .conftest import LATER, Machine, make_machine, settle, tick


def states_during(m: Machine) -> set[int]:
    """Every task's patch_state, as /proc shows the listed ones and `klpfs ps` the idle ones."""
    shown = {int(m.proc_patch_state(t)) for t in m.sched.tasks.values()}
    return shown | {t.patch_state for t in m.sched.idle_tasks}


@pytest.mark.parametrize("version", LATER)
async def test_no_task_reads_minus_one_during_a_transition(nursery, version, autojump_clock) -> None:
    m = make_machine(nursery, version)
    seen: list[tuple[str, set[int]]] = []

    def check(where: str) -> None:
        running = m.lp.klp_transition_patch is not None
        states = states_during(m)
        seen.append((where, states))
        assert states <= ({0, 1} if running else {-1}), f"{where}: {states} (transition running: {running})"

    fire = m.kernel.timers.fire_due

    def fire_and_check() -> None:
        fire()
        check("timer")
    m.kernel.timers.fire_due = fire_and_check  # type: ignore[method-assign]

    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert (await m.insmod("livepatch-sample"))["ok"]
    check("patching")
    await settle(1.5)
    # A stuck patching transition; the holder's new function must be left before unpatching ends.
    assert m.write("livepatch_sample/enabled", b"0") == 1                # reverse: unpatching
    check("reversed to unpatching")
    assert m.write("livepatch_sample/enabled", b"1") == 1                # and back: patching
    check("reversed to patching")
    shell = m.kernel.console
    m.sched.add("cat", TaskKind.USER, shell.base, ppid=shell.pid)        # a process the shell forks
    m.sched.add("kt", TaskKind.KTHREAD, m.kernel.kallsyms.find_each(KTHREAD_BASE), ppid=2)
    for worker in [t for t in m.sched.tasks.values() if t.comm.startswith("kworker/")]:
        m.sched.enter(worker, m.sym("meminfo_proc_show"), "S")           # every kworker busy:
    assert idle_kworker(m.kernel).comm.startswith("kworker/u")           # a new one is made
    assert (await m.insmod("klp-busy"))["ok"]                            # insmod, and a kthread
    assert (await m.rmmod_ctl("livepatch_sample"))["in_use"]
    check("tasks created")
    assert m.write("livepatch_sample/enabled", b"0") == 1
    await tick()
    check("reversed again")
    m.sched.wake(holder)
    await settle(2.5)
    check("complete")
    assert seen[-1][1] == {-1} and not m.exists("livepatch_sample")
