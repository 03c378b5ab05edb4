"""The vmlinux a profile boots: its observed kernel's image (Profile.image) with
the profile's rules applied to the kernel threads it starts.

Which threads run follows the rules that created or removed them (rcu_bh,
watchdog/N), a workqueue rescuer is named as the profile's kernel names it
(kworker/R-<workqueue> from 6.6), and every kernel thread's stack starts
with the fork frames of the profile's kernel.
"""

from __future__ import annotations

from klpfs.kernel.image import Image, TaskDef, load_image
from klpfs.kernel.sched import TASK_COMM_LEN
from klpfs.profiles import Profile, Rule

KTHREADD_PID = 2


def fork_frames(profile: Profile) -> tuple[str, ...]:
    """Where a new kernel thread's stack starts, outermost first: ret_from_fork, entered
    from ret_from_fork_asm once ret_from_fork() is C (6.5)."""
    return ("ret_from_fork_asm", "ret_from_fork") if profile.has(Rule.RET_FROM_FORK_ASM) else ("ret_from_fork",)


def boot_image(profile: Profile) -> Image:
    """The image with its kernel threads among the boot tasks, in pid order."""
    image = load_image(profile.release, kernel=profile.image)
    fork = list(fork_frames(profile))
    for k in image.kthreads:
        if k.rule is not None and not profile.has(Rule[k.rule]):
            continue
        # init_rescuer(): the rescuer's own name, or kworker/R-<workqueue> (format_worker_id()).
        name = f"kworker/R-{k.rescuer}" if k.rescuer is not None and profile.has(Rule.RESCUER_KWORKER) else k.name
        comm = name[: TASK_COMM_LEN - 1]
        # wq_worker_comm(): a kworker shows the workqueue it last ran after its name.
        shown = f"{name}-{k.desc}" if k.desc is not None else name
        ppid = 0 if k.pid == KTHREADD_PID else KTHREADD_PID
        image.tasks.append(TaskDef(k.pid, comm, "kthread", ppid, fork + k.stack, shown if shown != comm else None))
    image.tasks.sort(key=lambda t: t.pid)
    return image
