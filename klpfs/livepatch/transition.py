"""The per-task consistency model (kernel/livepatch/transition.c, spec §8).

A transition moves every task from the initial state to klp_target_state.
Tasks switch when they are seen not to be inside the code being replaced
(klp_try_switch_task), on return to user space and in the idle loop
(klp_update_patch_state), or when forced.  An unsuccessful attempt re-arms
the retry work for the next whole second.

From 6.4 a transition also points the cond_resched static call at
klp_cond_resched while it runs; the rewrite IPIs every CPU, so the idle
CPUs switch their idle tasks before the first attempt looks at them, and a
transition that no task blocks completes inside the write that started it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from klpfs.kernel.printk import KERN_NOTICE, KERN_WARNING
from klpfs.kernel.sched import TIF_PATCH_PENDING, TaskKind
from klpfs.kernel.timers import round_jiffies_relative
from klpfs.livepatch.callbacks import klp_post_patch_callback, klp_post_unpatch_callback
from klpfs.livepatch.debug import CANCEL, COMPLETE, INIT, REVERSE, RUNNING, SLEEPING, UNRELIABLE
from klpfs.livepatch.patch import klp_find_ops, klp_unpatch_objects
from klpfs.livepatch.structs import (
    KLP_PATCHED, KLP_UNDEFINED, KLP_UNPATCHED, MAX_STACK_ENTRIES, STACK_ERR_BUF_SIZE, KlpFunc, KlpPatch,
    klp_is_object_loaded)
from klpfs.profiles import FORCE_GLOBAL, FORCE_LISTED

if TYPE_CHECKING:
    from klpfs.kernel.sched import Task
    from klpfs.livepatch.core import Livepatch


SIGNALS_TIMEOUT = 15
COND_RESCHED = "cond_resched"
"""The static call cond_resched() goes through (PREEMPT_DYNAMIC, kernel/sched/core.c)."""


def _direction(state: int) -> str:
    return "patching" if state == KLP_PATCHED else "unpatching"


def klp_complete_transition(lp: Livepatch) -> None:
    """Finish: drop the old funcs (unpatching), reset every task, run post callbacks."""
    patch = lp.klp_transition_patch
    assert patch is not None
    target = lp.klp_target_state
    lp.pr_debug(COMPLETE, f"'{patch.name}': completing {_direction(target)} transition")
    if patch.replace and target == KLP_PATCHED:
        lp.klp_unpatch_replaced_patches(patch)
        if not lp.profile.replaced_freed_after_callbacks:
            lp.klp_free_replaced_patches_async(patch)
        lp.klp_discard_nops(patch)
    if target == KLP_UNPATCHED:
        klp_unpatch_objects(lp, patch)
    immediate_func = False
    if not lp.immediate(patch):
        for func in _funcs(patch):
            func.transition = False
            immediate_func |= lp.func_immediate(func)
        sched = lp.kernel.sched
        for task in sched.all_tasks():
            task.patch_state = KLP_UNDEFINED
    for obj in patch.objs or ():
        if not klp_is_object_loaded(obj):
            continue
        if target == KLP_PATCHED:
            klp_post_patch_callback(obj)
        else:
            klp_post_unpatch_callback(obj)
    lp.pr(KERN_NOTICE, f"'{patch.name}': {_direction(target)} complete")
    # §4.5/§8.11: with registered patches (4.x) the module is released here,
    # except for immediate patches and after any forced transition (4.16's
    # global klp_forced).  From 5.1 the free path releases it (§12.4).
    if (lp.profile.register_api and target == KLP_UNPATCHED and not lp.immediate(patch)
            and not immediate_func and not lp.klp_forced):
        assert patch.mod is not None
        lp.kernel.modules.module_put(patch.mod)
    lp.klp_target_state = KLP_UNDEFINED
    lp.klp_transition_patch = None


def klp_cancel_transition(lp: Livepatch) -> None:
    """The enable error path: go straight to an unpatching completion (§8.8)."""
    if lp.klp_target_state != KLP_PATCHED:
        return
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr_debug(CANCEL, f"'{patch.name}': canceling patching transition, going to unpatch")
    lp.klp_target_state = KLP_UNPATCHED
    klp_complete_transition(lp)


def klp_update_patch_state(lp: Livepatch, task: Task) -> None:
    """The switch on return to user space and in the idle loop (§8.1)."""
    if TIF_PATCH_PENDING in task.flags:
        task.flags.discard(TIF_PATCH_PENDING)
        task.patch_state = lp.klp_target_state


def _check_stack_func(lp: Livepatch, func: KlpFunc, trace: list[int]) -> bool:
    """True if some return address lies in the code this task must not be in."""
    if lp.func_immediate(func):
        return False
    if lp.klp_target_state == KLP_UNPATCHED:
        assert func.new_func is not None
        start, size = func.new_func.addr, func.new_size
    else:
        ops = klp_find_ops(lp, func.old_addr)
        assert ops is not None
        below = ops.func_stack.index(func) + 1
        if len(ops.func_stack) == 1 or below == len(ops.func_stack):
            # The original function.  The second case is a func at the bottom of a
            # stack that is not singular (a reversed unpatching of a patch that a
            # forced one now sits on): klp_check_stack_func() takes list_next_entry()
            # of it, which is the list head read as a klp_func, and compares the
            # stack with whatever range that garbage gives.  The code below such a
            # func is the original function, so that is what is checked here.
            start, size = func.old_addr, func.old_size
        else:
            prev = ops.func_stack[below]
            assert prev.new_func is not None
            start, size = prev.new_func.addr, prev.new_size
    return any(start <= address < start + size for address in trace)


def klp_check_stack(lp: Livepatch, task: Task) -> tuple[str, str] | None:
    """None if the task may switch, else the debug callsite and line that say why."""
    where = "klp_try_switch_task" if lp.profile.stack_check_in_try_switch else "klp_check_stack"
    trace = lp.kernel.sched.stack_trace_reliable(task, MAX_STACK_ENTRIES)
    if trace is None:
        return UNRELIABLE, f"{where}: {task.comm}:{task.pid} has an unreliable stack"
    patch = lp.klp_transition_patch
    assert patch is not None
    for obj in patch.objs or ():
        if not obj.patched:
            continue
        for func in obj.funcs or ():
            if _check_stack_func(lp, func, trace):
                return SLEEPING, f"{where}: {task.comm}:{task.pid} is sleeping on function {func.old_name}"
    return None


def klp_try_switch_task(lp: Livepatch, task: Task) -> bool:
    if task.patch_state == lp.klp_target_state:
        return True
    if not lp.reliable_stacks:
        return False
    if lp.kernel.sched.task_curr(task):
        lp.pr_debug(RUNNING, f"klp_try_switch_task: {task.comm}:{task.pid} is running"[: STACK_ERR_BUF_SIZE - 1])
        return False
    return _switch_after_stack_check(lp, task)


def _switch_after_stack_check(lp: Livepatch, task: Task) -> bool:
    err = klp_check_stack(lp, task)
    if err is not None:
        site, text = err
        lp.pr_debug(site, text[: STACK_ERR_BUF_SIZE - 1])
        return False
    task.flags.discard(TIF_PATCH_PENDING)
    task.patch_state = lp.klp_target_state
    return True


def klp_cond_resched_switch(lp: Livepatch, task: Task) -> None:
    """6.4-6.15: a busy task with the pending flag runs klp_try_switch_task on
    itself at cond_resched(): no "is running" test (it is current), the usual
    stack check and debug line otherwise."""
    if lp.klp_transition_patch is None or TIF_PATCH_PENDING not in task.flags:
        return
    if task.patch_state == lp.klp_target_state or not lp.reliable_stacks:
        return
    _switch_after_stack_check(lp, task)


def klp_cond_resched_enable(lp: Livepatch) -> None:
    """sched_dynamic_klp_enable() (6.4+): cond_resched() calls klp_cond_resched, which
    runs __klp_sched_try_switch().  A reversal finds it so already; otherwise the
    rewrite IPIs every CPU (Sched.static_call_update)."""
    if lp.profile.cond_resched_switch:
        lp.kernel.sched.static_call_update(COND_RESCHED, "klp_cond_resched")


def klp_cond_resched_disable(lp: Livepatch) -> None:
    """sched_dynamic_klp_disable(): back to the preemption model's __cond_resched."""
    if lp.profile.cond_resched_switch:
        lp.kernel.sched.static_call_update(COND_RESCHED, "__cond_resched")


def klp_try_complete_transition(lp: Livepatch) -> None:
    """Try every task and idle task once; complete, or retry next second (§8.5)."""
    patch = lp.klp_transition_patch
    assert patch is not None
    if not lp.immediate(patch):
        sched = lp.kernel.sched
        complete = True
        for task in sched.user_and_kthreads():
            complete &= klp_try_switch_task(lp, task)
        for idle in sched.idle_tasks:
            if sched.cpu_online[idle.cpu]:
                complete &= klp_try_switch_task(lp, idle)
            elif idle.patch_state != lp.klp_target_state:
                idle.flags.discard(TIF_PATCH_PENDING)
                idle.patch_state = lp.klp_target_state
        if not complete:
            # 5.1+: fake signals every SIGNALS_TIMEOUT unsuccessful attempts.  The count is
            # kept on every profile: `klpfs status` shows it as the transition's attempts.
            if lp.profile.auto_signals and lp.klp_signals_cnt and not lp.klp_signals_cnt % SIGNALS_TIMEOUT:
                klp_send_signals(lp)
            lp.klp_signals_cnt += 1
            lp.klp_transition_work.schedule(round_jiffies_relative(lp.kernel.now(), 1.0))
            return
    klp_cond_resched_disable(lp)
    klp_complete_transition(lp)
    if not lp.profile.register_api:
        if not patch.enabled:
            lp.klp_free_patch_async(patch)
        elif patch.replace and lp.profile.replaced_freed_after_callbacks:
            lp.klp_free_replaced_patches_async(patch)


def klp_start_transition(lp: Livepatch) -> None:
    """Flag every task that still has to switch (§8.3)."""
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr(KERN_NOTICE, f"'{patch.name}': starting {_direction(lp.klp_target_state)} transition")
    lp.klp_signals_cnt = 0
    if lp.immediate(patch):
        return
    sched = lp.kernel.sched
    for task in sched.all_tasks():
        if task.patch_state != lp.klp_target_state:
            sched.set_flag(task, TIF_PATCH_PENDING)
    klp_cond_resched_enable(lp)


def klp_init_transition(lp: Livepatch, patch: KlpPatch, state: int) -> None:
    """Every task to the initial state, every func of the patch in transition (§8.2)."""
    lp.klp_transition_patch = patch
    lp.klp_target_state = state
    lp.pr_debug(INIT, f"'{patch.name}': initializing {_direction(state)} transition")
    if lp.immediate(patch):
        return
    initial_state = KLP_UNPATCHED if state == KLP_PATCHED else KLP_PATCHED
    for task in lp.kernel.sched.all_tasks():
        task.patch_state = initial_state
    for func in _funcs(patch):
        func.transition = True


def klp_reverse_transition(lp: Livepatch) -> None:
    """Turn the running transition round; the retry work completes it (§8.9)."""
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr_debug(REVERSE, f"'{patch.name}': reversing transition from "
                + ("patching to unpatching" if lp.klp_target_state == KLP_PATCHED else "unpatching to patching"))
    patch.enabled = not patch.enabled
    lp.klp_target_state = KLP_UNPATCHED if lp.klp_target_state == KLP_PATCHED else KLP_PATCHED
    for task in lp.kernel.sched.all_tasks():
        task.flags.discard(TIF_PATCH_PENDING)
    klp_start_transition(lp)


def klp_send_signals(lp: Livepatch) -> None:
    """Nudge the tasks still pending (§8.10): wake kthreads, fake-signal user tasks.

    The automatic rounds of 5.1+ announce only the first (§12.4).
    """
    if not lp.profile.auto_signals or lp.klp_signals_cnt == SIGNALS_TIMEOUT:
        lp.pr(KERN_NOTICE, "signaling remaining tasks")
    sched = lp.kernel.sched
    for task in sched.user_and_kthreads():
        if TIF_PATCH_PENDING not in task.flags:
            continue
        if task.kind is TaskKind.KTHREAD:
            sched.wake_up_interruptible(task)
        else:
            sched.signal_wake_up(task)


def klp_force_transition(lp: Livepatch) -> None:
    """Switch every remaining task without a stack check (§8.11)."""
    lp.pr(KERN_WARNING, "forcing remaining tasks to the patched state")
    for task in lp.kernel.sched.all_tasks():
        klp_update_patch_state(lp, task)
    patch = lp.klp_transition_patch
    assert patch is not None
    marks = lp.profile.force_marks
    if marks == FORCE_GLOBAL:
        lp.klp_forced = True
    elif marks == FORCE_LISTED:
        for p in lp.klp_patches:
            p.forced = True
    elif lp.klp_target_state == KLP_UNPATCHED:
        patch.forced = True
    elif patch.replace:
        for p in lp.klp_patches:
            if p is not patch:
                p.forced = True


def klp_transition_work_fn(lp: Livepatch) -> None:
    if lp.klp_transition_patch is not None:
        klp_try_complete_transition(lp)


def _funcs(patch: KlpPatch) -> Iterator[KlpFunc]:
    for obj in patch.objs or ():
        yield from obj.funcs or ()
