"""What `klpfs status`, `klpfs wait` and `klpfs watch` show of the livepatch core: its
patches, and the transition under way with every task that has not switched yet
and what holds it there.

Read only: each task is asked what the transition worker asks it
(klp_try_switch_task() in kernel/livepatch/transition.c), without switching it
or printing the worker's debug lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klpfs.kernel.sched import Task, stack_lines
from klpfs.livepatch.core import Livepatch
from klpfs.livepatch.debug import SLEEPING
from klpfs.livepatch.structs import KLP_PATCHED
from klpfs.livepatch.transition import SIGNALS_TIMEOUT, klp_check_stack
from klpfs.system import System

RETRY_PERIOD = 1.0
"""klp_try_complete_transition() re-arms its work for the next whole second
(round_jiffies_relative(HZ)): one attempt a second while a task holds the transition."""
SLEEPING_ON = " is sleeping on function "
"""The tail of klp_check_stack()'s message before the function it names."""

Describe = Callable[[Task], dict[str, Any]]
"""How the control commands describe a task (Control.task_info)."""


def livepatch_state(system: System, describe: Describe) -> dict[str, Any]:
    """The kernel profile, its clock (emulated seconds since boot, as dmesg's
    timestamps), the registered patches in klp_patches order, and the transition."""
    lp = system.livepatch
    system.kernel.sched.refresh()
    patches = [{"name": patch.name, "enabled": patch.enabled, "transition": patch is lp.klp_transition_patch}
               for patch in lp.klp_patches]
    return {"kernel": system.profile.version, "now": system.kernel.now(), "speed": system.kernel.timers.speed,
            "patches": patches, "transition": _transition(lp, describe)}


def _transition(lp: Livepatch, describe: Describe) -> dict[str, Any] | None:
    patch = lp.klp_transition_patch
    if patch is None:
        return None
    tasks = list(lp.kernel.sched.all_tasks())
    waiting = [task for task in tasks if task.patch_state != lp.klp_target_state]
    next_retry = lp.klp_transition_work.expires
    return {"patch": patch.name,
            "direction": "patching" if lp.klp_target_state == KLP_PATCHED else "unpatching",
            "tasks": len(tasks), "switched": len(tasks) - len(waiting), "attempts": lp.klp_signals_cnt,
            "next_retry": next_retry, "next_signal": next_signal(lp, next_retry),
            "blocking": [_blocker(lp, task, describe) for task in waiting]}


def next_signal(lp: Livepatch, next_retry: float | None) -> float | None:
    """When the automatic fake signals go out (5.1+), if no task switches meanwhile: at
    the first attempt that finds klp_signals_cnt a non-zero multiple of SIGNALS_TIMEOUT
    (klp_try_complete_transition()); None where signals are only sent by hand."""
    if not lp.profile.auto_signals or next_retry is None:
        return None
    attempts_before = -lp.klp_signals_cnt % SIGNALS_TIMEOUT if lp.klp_signals_cnt else SIGNALS_TIMEOUT
    return next_retry + attempts_before * RETRY_PERIOD


def _blocker(lp: Livepatch, task: Task, describe: Describe) -> dict[str, Any]:
    """Why the next attempt would leave `task` unswitched, in klp_try_switch_task()'s
    order: no reliable stacks at all, running on a CPU, or its stack (klp_check_stack());
    "pending" when nothing holds it and it switches at that attempt."""
    sched = lp.kernel.sched
    function = None
    if not lp.reliable_stacks:
        reason = "no_reliable_stacks"
    elif sched.task_curr(task):
        reason = "running"
    else:
        check = klp_check_stack(lp, task)
        if check is None:
            reason = "pending"
        elif check[0] == SLEEPING:
            reason, function = "sleeping", check[1].rpartition(SLEEPING_ON)[2]
        else:
            reason = "unreliable_stack"
    return {"task": describe(task), "reason": reason, "function": function,
            "stack": stack_lines(sched.stack(task))}
