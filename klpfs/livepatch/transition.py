"""The per-task consistency model (kernel/livepatch/transition.c).

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
    from klpfs.kernel.kallsyms import KSym
    from klpfs.kernel.sched import Sched, Task
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
        with lp.kernel.code.untraced():
            for task in lp.kernel.sched.all_tasks():
                task.patch_state = KLP_UNDEFINED
    for obj in patch.objs or ():
        if not klp_is_object_loaded(obj):
            continue
        if target == KLP_PATCHED:
            klp_post_patch_callback(obj)
        else:
            klp_post_unpatch_callback(obj)
    lp.pr(KERN_NOTICE, f"'{patch.name}': {_direction(target)} complete")
    # With registered patches (4.x) the module is released here,
    # except for immediate patches and after any forced transition (4.16's
    # global klp_forced).  From 5.1 the free path releases it
    # (klp_free_patch_finish() in kernel/livepatch/core.c).
    if (lp.profile.register_api and target == KLP_UNPATCHED and not lp.immediate(patch)
            and not immediate_func and not lp.klp_forced):
        assert patch.mod is not None
        lp.kernel.modules.module_put(patch.mod)
    lp.klp_target_state = KLP_UNDEFINED
    lp.klp_transition_patch = None


def klp_cancel_transition(lp: Livepatch) -> None:
    """The enable error path: go straight to an unpatching completion."""
    if lp.klp_target_state != KLP_PATCHED:
        return
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr_debug(CANCEL, f"'{patch.name}': canceling patching transition, going to unpatch")
    lp.klp_target_state = KLP_UNPATCHED
    klp_complete_transition(lp)


def klp_update_patch_state(lp: Livepatch, task: Task) -> None:
    """The switch on return to user space and in the idle loop."""
    if TIF_PATCH_PENDING in task.flags:
        task.flags.discard(TIF_PATCH_PENDING)
        task.patch_state = lp.klp_target_state


StackRange = tuple[int, int, str | None]
"""[start, end) of code no task may sleep in, and the name of the func it is for."""


def _check_range(lp: Livepatch, func: KlpFunc) -> tuple[int, int] | None:
    """(start, size) of the code klp_check_stack_func() looks for on a stack, or None
    when the func is immediate."""
    if lp.func_immediate(func):
        return None
    if lp.klp_target_state == KLP_UNPATCHED:
        assert func.new_func is not None
        return func.new_func.addr, func.new_size
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
        return func.old_addr, func.old_size
    prev = ops.func_stack[below]
    assert prev.new_func is not None
    return prev.new_func.addr, prev.new_size


def klp_stack_ranges(lp: Livepatch) -> list[StackRange]:
    """What klp_check_stack() compares every stack with, func by func in the order it
    walks them (klp_for_each_object, klp_for_each_func): the same for every task of a
    pass, so a pass works it out once."""
    patch = lp.klp_transition_patch
    assert patch is not None
    ranges: list[StackRange] = []
    for obj in patch.objs or ():
        if not obj.patched:
            continue
        for func in obj.funcs or ():
            where = _check_range(lp, func)
            if where is not None:
                start, size = where
                ranges.append((start, start + size, func.old_name))
    return ranges


class StackCheck:
    """What klp_check_stack() compares stacks with, worked out once for a pass over
    every task: the ranges, and the trace of each resting stack that many tasks share
    (the kthreads resting on the same frames), so that no such stack is built twice."""

    __slots__ = ("ranges", "_resting")

    def __init__(self, lp: Livepatch):
        self.ranges = klp_stack_ranges(lp)
        self._resting: dict[int, tuple[list[KSym], list[int] | None]] = {}
        """id(base) -> (base, the trace of a task resting on it); base is kept so the id stays its."""

    def trace(self, sched: Sched, task: Task) -> list[int] | None:
        """stack_trace_reliable() of the task."""
        base = sched.resting_base(task) if task.reliable_stack else None
        if base is None:
            return sched.stack_trace_reliable(task, MAX_STACK_ENTRIES)
        known = self._resting.get(id(base))
        if known is None:
            known = self._resting[id(base)] = (base, sched.stack_trace_reliable(task, MAX_STACK_ENTRIES))
        return known[1]


def klp_check_stack(lp: Livepatch, task: Task, check: StackCheck | None = None) -> tuple[str, str] | None:
    """None if the task may switch, else the debug callsite and line that say why.

    `check`: the pass's StackCheck, when the caller checks many tasks."""
    if check is None:
        check = StackCheck(lp)
    trace = check.trace(lp.kernel.sched, task)
    if trace is None:
        return UNRELIABLE, f"{_check_site(lp)}: {task.comm}:{task.pid} has an unreliable stack"
    for start, end, name in check.ranges:
        for address in trace:
            if start <= address < end:
                return SLEEPING, f"{_check_site(lp)}: {task.comm}:{task.pid} is sleeping on function {name}"
    return None


def _check_site(lp: Livepatch) -> str:
    """The function whose pr_debug() tells why a stack check failed."""
    return "klp_try_switch_task" if lp.profile.stack_check_in_try_switch else "klp_check_stack"


def klp_try_switch_task(lp: Livepatch, task: Task, check: StackCheck | None = None) -> bool:
    """`check`: the pass's StackCheck, when the caller tries many tasks."""
    if task.patch_state == lp.klp_target_state:
        return True
    if not lp.reliable_stacks:
        return False
    if lp.kernel.sched.task_curr(task):
        lp.pr_debug(RUNNING, f"klp_try_switch_task: {task.comm}:{task.pid} is running"[: STACK_ERR_BUF_SIZE - 1])
        return False
    return _switch_after_stack_check(lp, task, check)


def _switch_after_stack_check(lp: Livepatch, task: Task, check: StackCheck | None = None) -> bool:
    err = klp_check_stack(lp, task, check)
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
    """Try every task and idle task once; complete, or retry next second."""
    patch = lp.klp_transition_patch
    assert patch is not None
    if not lp.immediate(patch):
        sched = lp.kernel.sched
        check = StackCheck(lp)
        target = lp.klp_target_state
        complete = True
        with lp.kernel.code.untraced():
            for task in sched.user_and_kthreads():
                if task.patch_state != target and not klp_try_switch_task(lp, task, check):
                    complete = False
            for idle in sched.idle_tasks:
                if sched.cpu_online[idle.cpu]:
                    complete &= klp_try_switch_task(lp, idle, check)
                elif idle.patch_state != target:
                    idle.flags.discard(TIF_PATCH_PENDING)
                    idle.patch_state = target
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
    """Flag every task that still has to switch."""
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr(KERN_NOTICE, f"'{patch.name}': starting {_direction(lp.klp_target_state)} transition")
    lp.klp_signals_cnt = 0
    if lp.immediate(patch):
        return
    sched = lp.kernel.sched
    target = lp.klp_target_state
    with lp.kernel.code.untraced():
        for task in sched.all_tasks():
            if task.patch_state != target:
                sched.set_flag(task, TIF_PATCH_PENDING)
    klp_cond_resched_enable(lp)


def klp_init_transition(lp: Livepatch, patch: KlpPatch, state: int) -> None:
    """Every task to the initial state, every func of the patch in transition."""
    lp.klp_transition_patch = patch
    lp.klp_target_state = state
    lp.pr_debug(INIT, f"'{patch.name}': initializing {_direction(state)} transition")
    if lp.immediate(patch):
        return
    initial_state = KLP_UNPATCHED if state == KLP_PATCHED else KLP_PATCHED
    with lp.kernel.code.untraced():
        for task in lp.kernel.sched.all_tasks():
            task.patch_state = initial_state
    for func in _funcs(patch):
        func.transition = True


def klp_reverse_transition(lp: Livepatch) -> None:
    """Turn the running transition round; the retry work completes it."""
    patch = lp.klp_transition_patch
    assert patch is not None
    lp.pr_debug(REVERSE, f"'{patch.name}': reversing transition from "
                + ("patching to unpatching" if lp.klp_target_state == KLP_PATCHED else "unpatching to patching"))
    patch.enabled = not patch.enabled
    lp.klp_target_state = KLP_UNPATCHED if lp.klp_target_state == KLP_PATCHED else KLP_PATCHED
    with lp.kernel.code.untraced():
        for task in lp.kernel.sched.all_tasks():
            task.flags.discard(TIF_PATCH_PENDING)
    klp_start_transition(lp)


def klp_send_signals(lp: Livepatch) -> None:
    """Nudge the tasks still pending: wake kthreads, fake-signal user tasks.

    The automatic rounds of 5.1+ announce only the first.
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
    """Switch every remaining task without a stack check."""
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
