"""klp_ops, func stacks and the ftrace handler (kernel/livepatch/patch.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, cast

from klpfs.kernel.ftrace import FTRACE_OPS_FL_IPMODIFY, FTRACE_OPS_FL_PERMANENT, FTRACE_OPS_FL_SAVE_REGS, FtraceOps
from klpfs.kernel.oops import PageFault
from klpfs.kernel.printk import KERN_ERR
from klpfs.kernel.sched import stack_trace_save_tsk
from klpfs.livepatch.structs import KLP_UNPATCHED, KlpFunc, KlpObject, KlpOps, KlpPatch

if TYPE_CHECKING:
    from klpfs.kernel.sched import Task
    from klpfs.livepatch.core import Livepatch


def klp_find_ops(lp: Livepatch, old_addr: int) -> KlpOps | None:
    for ops in lp.klp_ops:
        if ops.func_stack and ops.func_stack[0].old_addr == old_addr:
            return ops
    return None


def klp_ftrace_handler(ops: KlpOps, ip: int, task: Task, lp: Livepatch | None = None) -> int | None:
    """Which function runs instead of ip for this task.

    A func whose module `rmmod -f` freed is still on the stack: reading it faults,
    and the caller of the patched function oopses."""
    if not ops.func_stack:
        return None
    func = ops.func_stack[0]
    if func.freed_at and lp is not None:
        kernel = lp.kernel
        trace = [func.old_name or "?"] + [sym.name for sym in stack_trace_save_tsk(kernel.sched.stack(task))]
        sym = kernel.kallsyms.find("klp_ftrace_handler")
        raise PageFault(kernel, func.freed_at, "klp_ftrace_handler", sym.size // 2 if sym is not None else 0,
                        trace)
    # A task not yet switched keeps the code it had: the entry below, or
    # the original when there is none.  -1 (no transition) counts as patched.
    if func.transition and task.patch_state == KLP_UNPATCHED:
        if len(ops.func_stack) == 1:
            return None
        func = ops.func_stack[1]
    if func.nop:
        return None
    assert func.new_func is not None
    return func.new_func.addr


def klp_patch_func(lp: Livepatch, func: KlpFunc) -> int:
    if not func.old_addr or func.patched:
        return -errno.EINVAL
    ftrace = lp.kernel.ftrace
    ops = klp_find_ops(lp, func.old_addr)
    if ops is not None:
        ops.func_stack.insert(0, func)
        func.patched = True
        return 0
    ftrace_loc = ftrace.ftrace_location(func.old_addr)
    if not ftrace_loc:
        lp.pr(KERN_ERR, f"failed to find location for function '{func.old_name}'")
        return -errno.EINVAL
    flags = FTRACE_OPS_FL_IPMODIFY | (FTRACE_OPS_FL_PERMANENT if lp.profile.ftrace_permanent else 0)
    if lp.profile.ftrace_save_regs:
        flags |= FTRACE_OPS_FL_SAVE_REGS
    handler = lp.kernel.kallsyms.find("klp_ftrace_handler")
    new_ops = KlpOps(FtraceOps(lambda ip, task: klp_ftrace_handler(new_ops, ip, cast("Task", task), lp), flags,
                               handler.addr if handler is not None else 0), [func])
    ops = new_ops
    lp.klp_ops.append(ops)
    ret = ftrace.set_filter_ip(ops.fops, ftrace_loc)
    if ret:
        lp.pr(KERN_ERR, f"failed to set ftrace filter for function '{func.old_name}' ({ret})")
    else:
        ret = ftrace.register_ftrace_function(ops.fops)
        if ret:
            lp.pr(KERN_ERR, f"failed to register ftrace handler for function '{func.old_name}' ({ret})")
            ftrace.set_filter_ip(ops.fops, ftrace_loc, remove=True)
    if ret:
        lp.klp_ops.remove(ops)
        return ret
    func.patched = True
    return 0


def klp_unpatch_func(lp: Livepatch, func: KlpFunc) -> None:
    if not func.patched or not func.old_addr:
        return
    ops = klp_find_ops(lp, func.old_addr)
    if ops is None:
        return
    if len(ops.func_stack) == 1:
        ftrace = lp.kernel.ftrace
        ftrace.unregister_ftrace_function(ops.fops)
        ftrace.set_filter_ip(ops.fops, ftrace.ftrace_location(func.old_addr), remove=True)
        ops.func_stack.clear()
        lp.klp_ops.remove(ops)
    else:
        ops.func_stack.remove(func)
    func.patched = False


def klp_patch_object(lp: Livepatch, obj: KlpObject) -> int:
    if obj.patched:
        return -errno.EINVAL
    for func in obj.funcs or ():
        ret = klp_patch_func(lp, func)
        if ret:
            klp_unpatch_object(lp, obj)
            return ret
    obj.patched = True
    return 0


def klp_unpatch_object(lp: Livepatch, obj: KlpObject) -> None:
    for func in obj.funcs or ():
        if func.patched:
            klp_unpatch_func(lp, func)
    obj.patched = False


def klp_unpatch_objects(lp: Livepatch, patch: KlpPatch) -> None:
    for obj in patch.objs or ():
        if obj.patched:
            klp_unpatch_object(lp, obj)
