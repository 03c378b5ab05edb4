"""/proc/<pid>/stat and /proc/<pid>/status of an emulated task.

Tools that walk /proc (ps, pgrep, kpatch's listing of stalled tasks) read
these to name a task and learn its state and parent; an emulated task must
answer them the way fs/proc/array.c does, with the fields livepatch cares
about (state, ppid, CPU) taken from the task and the rest as a quiet task
that has used no CPU time would show them.
"""

from __future__ import annotations

from klpfs.kernel.sched import TASK_INTERRUPTIBLE, TASK_RUNNING, TASK_UNINTERRUPTIBLE, Sched, Task, TaskKind

USER_HZ = 100
"""Clock ticks per second of the times in /proc/<pid>/stat (USER_HZ)."""
PF_KTHREAD_FLAGS = 0x00208040
"""task->flags of a kernel thread: PF_KTHREAD | PF_NOFREEZE | PF_FORKNOEXEC."""
PF_USER_FLAGS = 0x00400100
"""task->flags of a user process that exec'ed as root: PF_RANDOMIZE | PF_SUPERPRIV."""
SIGCHLD = 17
STATE_NAMES = {TASK_RUNNING: "R (running)", TASK_INTERRUPTIBLE: "S (sleeping)", TASK_UNINTERRUPTIBLE: "D (disk sleep)"}


def task_state(sched: Sched, task: Task) -> str:
    """task_state_index(): R while on a CPU, else how the task sleeps."""
    return TASK_RUNNING if sched.task_curr(task) else task.state


def _group_ids(task: Task) -> tuple[int, int]:
    """(pgrp, session): a user process leads its own; kernel threads have none."""
    return (0, 0) if task.kind is TaskKind.KTHREAD else (task.pid, task.pid)


def task_stat(sched: Sched, task: Task, start_ticks: int) -> str:
    """do_task_stat(): the 52 space-separated fields, comm in parentheses."""
    kthread = task.kind is TaskKind.KTHREAD
    pgrp, session = _group_ids(task)
    fields = [
        task_state(sched, task), task.ppid, pgrp, session,
        0, -1,                                   # tty_nr, tpgid: no controlling terminal
        PF_KTHREAD_FLAGS if kthread else PF_USER_FLAGS,
        0, 0, 0, 0,                              # minflt, cminflt, majflt, cmajflt
        0, 0, 0, 0,                              # utime, stime, cutime, cstime
        20, 0, 1, 0,                             # priority, nice, num_threads, itrealvalue
        start_ticks, 0, 0,                       # starttime, vsize, rss
        (1 << 64) - 1,                           # rsslim: RLIM_INFINITY
        0, 0, 0, 0, 0,                           # startcode, endcode, startstack, kstkesp, kstkeip
        0, 0, 0, 0,                              # signal, blocked, sigignore, sigcatch
        0, 0, 0,                                 # wchan (hidden), nswap, cnswap
        SIGCHLD, task.cpu, 0, 0,                 # exit_signal, processor, rt_priority, policy
        0, 0, 0,                                 # delayacct_blkio_ticks, guest_time, cguest_time
        0, 0, 0, 0, 0, 0, 0,                     # start_data .. env_end
        0,                                       # exit_code
    ]
    return f"{task.pid} ({task.proc_name}) " + " ".join(str(f) for f in fields) + "\n"


def task_status(sched: Sched, task: Task) -> str:
    """proc_pid_status(): the identity, state and scheduling lines."""
    pgrp, session = _group_ids(task)
    cpus = len(sched.cpu_online)
    lines = [
        ("Name", task.proc_name), ("Umask", "0022" if task.kind is TaskKind.USER else "0000"),
        ("State", STATE_NAMES.get(task_state(sched, task), "S (sleeping)")),
        ("Tgid", task.pid), ("Ngid", 0), ("Pid", task.pid), ("PPid", task.ppid), ("TracerPid", 0),
        ("Uid", "0\t0\t0\t0"), ("Gid", "0\t0\t0\t0"), ("FDSize", 64), ("Groups", " "),
        ("NStgid", task.pid), ("NSpid", task.pid), ("NSpgid", pgrp), ("NSsid", session),
        ("Threads", 1),
        ("Cpus_allowed_list", "0" if cpus == 1 else f"0-{cpus - 1}"),
        ("voluntary_ctxt_switches", 0), ("nonvoluntary_ctxt_switches", 0),
    ]
    return "".join(f"{name}:\t{value}\n" for name, value in lines)
