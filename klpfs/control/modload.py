"""Turning a parsed module file into a loadable Module, and its life as code:
parameters from the insmod command line, init (its steps, the livepatch
sample's register+enable, its delayed work and kthreads) and exit.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from klpfs.control.modfile import Callback, ModuleFile, ModuleFileError, time_error
from klpfs.kernel.kallsyms import FuncDef
from klpfs.kernel.params import ParamSpec
from klpfs.kernel.module import MODULE_STATE_TEXT, Module
from klpfs.kernel import wait
from klpfs.kernel.printk import KERN_ERR
from klpfs.kernel.sched import TASK_INTERRUPTIBLE
from klpfs.kernel.timers import seconds_to_jiffies
from klpfs.kernel.workqueue import DelayedWork, Work, cancel_work_sync, queue_delayed_work
from klpfs.livepatch.structs import KlpObject, KlpState
from klpfs.modules.livepatch_module import (
    ObjectSpec, FuncSpec, build_klp_patch, klp_sample_exit, klp_sample_init)
from klpfs.modules.program import Frame, IfPrevState, ModuleCode, ShadowAlloc, ShadowFree

if TYPE_CHECKING:
    from klpfs.kernel.sched import Task
    from klpfs.profiles import Profile
    from klpfs.system import System



def check_profile(mf: ModuleFile, profile: Profile) -> None:
    """Fields and APIs that do not exist in the running kernel (the .ko would not build):
    ModuleFileError naming the key and the release that has it."""
    this = f"(this is {profile.version})"
    if mf.replace and not profile.atomic_replace:
        raise ModuleFileError(f"{mf.path}: patch.replace: atomic replace needs kernel 5.1 or later {this}")
    if mf.states and not profile.system_states:
        raise ModuleFileError(f"{mf.path}: patch.state: system states need kernel 5.5 or later {this}")
    immediate = mf.immediate or any(f.immediate for o in mf.objs or () for f in o.funcs)
    if immediate and not profile.immediate:
        raise ModuleFileError(f"{mf.path}: patch: immediate was removed in 4.16 {this}")
    for step in mf.all_steps():
        if isinstance(step, IfPrevState) and not profile.system_states:
            raise ModuleFileError(f"{mf.path}: if_prev_state: system states need kernel 5.5 or later {this}")
        ctor_dtor = (isinstance(step, ShadowFree) and step.dtor_log is not None
                     or isinstance(step, ShadowAlloc) and step.ctor_ret is not None)
        if ctor_dtor and not profile.shadow_ctor_dtor:
            raise ModuleFileError(f"{mf.path}: shadow variable constructors and destructors "
                                  f"(ctor_ret, dtor_log) need kernel 4.17 or later {this}")


def build_module(mf: ModuleFile, system: System) -> Module:
    """A fresh Module for this load of the file, its parameters at their defaults."""
    lp = system.livepatch
    mod = Module(mf.name, livepatch=mf.livepatch, out_of_tree=mf.out_of_tree, signed=mf.signed,
                 params={name: p.default for name, p in mf.params.items()},
                 param_specs={name: ParamSpec(p.type, p.perm, p.description, var=name)
                              for name, p in mf.params.items()})
    mod.data["file"] = Path(mf.path)
    code = ModuleCode(system.kernel, lp, system.structures, mod)
    mod.data["code"] = code
    mod.funcs = [FuncDef(f.name, f.size, code.body(f.name, f.steps), not f.notrace) for f in mf.functions]
    mod.init = lambda m: _init(mf, system, code, m)
    mod.exit = lambda m: _exit(mf, system, code, m)
    return mod


def _object_specs(mf: ModuleFile, code: ModuleCode) -> list[ObjectSpec]:
    specs = []
    for obj in mf.objs or ():
        callbacks = {name: _callback(code, name, cb) for name, cb in obj.callbacks.items()}
        specs.append(ObjectSpec(obj.name, [FuncSpec(f.old_name, f.new_func, f.old_sympos, f.immediate)
                                           for f in obj.funcs], callbacks))
    return specs


def _bad_param_time(mf: ModuleFile, mod: Module) -> str | None:
    """The first time taken from a parameter that insmod set to no time (a negative
    number of seconds, or 0 for a period): a message naming the key and the parameter."""
    for pt in mf.param_times:
        value = mod.params[pt.param]
        problem = time_error(value, pt.positive)
        if problem is not None:
            return f"{mf.name}: {pt.key}: parameter {pt.param}={value}: {problem}"
    return None


def _init(mf: ModuleFile, system: System, code: ModuleCode, mod: Module) -> int:
    """The module's init.  First it refuses (-EINVAL) a parameter that makes one of its
    times no time, as a C module checks its parameters before using them."""
    kernel = system.kernel
    bad = _bad_param_time(mf, mod)
    if bad is not None:
        kernel.printk(KERN_ERR, bad)
        return -errno.EINVAL
    code.run(mf.init_steps, Frame(mf.init_func))
    ret = int(code.value(mf.init_ret))
    if ret:
        return ret
    if mf.objs is not None:
        patch = build_klp_patch(mod, _object_specs(mf, code), mf.immediate, mf.replace,
                                [KlpState(state_id, version) for state_id, version in mf.states])
        ret = klp_sample_init(system.livepatch, mod, patch)
        if ret:
            return ret
    works = []
    for w in mf.work:
        every = None if w.every is None else seconds_to_jiffies(code.seconds(w.every))
        dwork = DelayedWork(_work_func(code, w.func, every))
        queue_delayed_work(kernel, dwork, seconds_to_jiffies(code.seconds(w.delay)))
        works.append(dwork)
    mod.data["work"] = works
    mod.data["kthreads"] = [_kthread_run(system, code, kt.func, kt.comm) for kt in mf.kthreads]
    return 0


def _work_func(code: ModuleCode, func: str, every: int | None) -> Callable[[Work], None]:
    """The work: call the module's function, then re-arm itself `every` jiffies later
    (schedule_delayed_work() at the end of the work function, as the samples do).
    A period is whole jiffies, at least one: the kernel's timers fire on ticks."""
    def work_fn(work: Work) -> None:
        code.call(func, Frame(func))
        if every is not None:
            assert isinstance(work, DelayedWork)
            queue_delayed_work(code.kernel, work, every)
    return work_fn


def _kthread_run(system: System, code: ModuleCode, func: str, comm: str) -> Task:
    """A kthread that calls the module's function once, then waits until kthread_stop()."""
    kernel = system.kernel

    def threadfn(_: object) -> int:
        code.call(func, Frame(func))
        while not kernel.kthreads.should_stop():
            wait.sleep(kernel, TASK_INTERRUPTIBLE, None, wait.SCHEDULE)
        return 0
    task = kernel.kthreads.create(threadfn, None, comm)
    kernel.kthreads.wake_up_process(task)
    return task


def _callback(code: ModuleCode, name: str, cb: Callback) -> Callable[[Module, KlpObject], int | None]:
    """A callback of the module file: its steps, then its return value."""
    def run(mod: Module, kobj: KlpObject) -> int | None:
        target = f"{kobj.mod.name} -> {MODULE_STATE_TEXT[kobj.mod.state]}" if kobj.mod else "vmlinux"
        code.run(cb.steps, Frame(f"{name}_callback", target=target))
        return int(code.value(cb.ret))
    return run


def _exit(mf: ModuleFile, system: System, code: ModuleCode, mod: Module) -> None:
    kernel = system.kernel
    for work in cast("list[DelayedWork]", mod.data.get("work", [])):
        cancel_work_sync(kernel, work)
    code.run(mf.exit_steps, Frame(mf.exit_func))
    for task in cast("list[Task]", mod.data.get("kthreads", [])):
        kernel.kthreads.stop(task)
    if mf.objs is not None:
        klp_sample_exit(system.livepatch, mod)
