"""Turning a parsed module file into a loadable Module, and its life as code:
parameters from the insmod command line, init (its steps, the livepatch
sample's register+enable, its delayed work and kthreads) and exit.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

from klpfs.control.modfile import ModuleFile
from klpfs.kernel.kallsyms import FuncDef
from klpfs.kernel.params import param_set
from klpfs.kernel.module import MODULE_STATE_TEXT, Module
from klpfs.kernel.printk import KERN_ERR, KERN_WARNING
from klpfs.kernel.sched import KTHREAD_BASE, TaskKind
from klpfs.kernel.timers import Timer
from klpfs.livepatch.structs import KlpObject, KlpState
from klpfs.modules.livepatch_module import (
    ObjectSpec, FuncSpec, build_klp_patch, klp_sample_exit, klp_sample_init)
from klpfs.modules.program import Frame, ModuleCode

if TYPE_CHECKING:
    from klpfs.kernel.sched import Task
    from klpfs.system import System



def apply_params(mf: ModuleFile, args: list[str], system: System) -> dict[str, object] | int:
    """The module's parameter values for `insmod FILE k=v ...`, or -errno (logged as the kernel does)."""
    values: dict[str, object] = {name: param.default for name, param in mf.params.items()}
    for arg in args:
        name, eq, text = arg.partition("=")
        param = mf.params.get(name.replace("-", "_"))
        if param is None:
            system.kernel.printk(KERN_WARNING, f"{mf.name}: unknown parameter '{name}' ignored")
            continue
        value = param_set(param.type, text if eq else None)
        if value is None:
            system.kernel.printk(KERN_ERR, f"{mf.name}: `{text}' invalid for parameter `{name}'")
            return -errno.EINVAL
        values[name.replace("-", "_")] = value
    return values


def build_module(mf: ModuleFile, system: System, params: dict[str, object]) -> Module:
    """A fresh Module for this load of the file."""
    lp = system.livepatch
    mod = Module(mf.name, livepatch=mf.livepatch, out_of_tree=mf.out_of_tree, signed=mf.signed,
                 params=params, param_specs={name: (p.type, p.perm) for name, p in mf.params.items()})
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
        callbacks = {}
        for name, cb in obj.callbacks.items():
            def run(mod: Module, kobj: KlpObject, cb=cb, name=name) -> int:
                target = f"{kobj.mod.name} -> {MODULE_STATE_TEXT[kobj.mod.state]}" if kobj.mod else "vmlinux"
                code.run(cb.steps, Frame(f"{name}_callback", target=target))
                return int(code.value(cb.ret))
            callbacks[name] = run
        specs.append(ObjectSpec(obj.name, [FuncSpec(f.old_name, f.new_func, f.old_sympos, f.immediate)
                                           for f in obj.funcs], callbacks))
    return specs


def _init(mf: ModuleFile, system: System, code: ModuleCode, mod: Module) -> int:
    kernel = system.kernel
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
    mod.data["work"] = [DelayedWorkItem(system, code, work.func, code.value(work.delay),
                                        None if work.every is None else code.value(work.every))
                        for work in mf.work]
    threads: list[Task] = []
    mod.data["kthreads"] = threads
    base = kernel.kallsyms.find_each(KTHREAD_BASE)
    for kt in mf.kthreads:
        task = kernel.sched.add(kt.comm, TaskKind.KTHREAD, base, ppid=2)
        threads.append(task)
        code.call(kt.func, Frame(kt.func, task=task))
    return 0


def _exit(mf: ModuleFile, system: System, code: ModuleCode, mod: Module) -> None:
    for work in mod.data.get("work", []):
        work.cancel()
    code.run(mf.exit_steps, Frame(mf.exit_func))
    for task in mod.data.get("kthreads", []):
        if not task.exited:
            system.kernel.sched.exit(task)
    if mf.objs is not None:
        klp_sample_exit(system.livepatch, mod)


class DelayedWorkItem:
    """A module's delayed work: runs its function on a kworker, again every `every` seconds."""

    def __init__(self, system: System, code: ModuleCode, func: str, delay: float, every: float | None):
        self._system = system
        self._code = code
        self._func = func
        self._every = every
        self._timer: Timer = system.kernel.timers.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._code.call(self._func, Frame(self._func, task=_idle_kworker(self._system)))
        if self._every is not None:
            self._timer = self._system.kernel.timers.call_later(self._every, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


def _idle_kworker(system: System) -> Task:
    """A kworker with nothing to do, as the workqueue would pick; a new one if all are busy."""
    sched = system.kernel.sched
    for task in sched.tasks.values():
        if task.kind is TaskKind.KTHREAD and task.comm.startswith("kworker/") and task.activity is None:
            return task
    template = next(t for t in sched.tasks.values() if t.comm.startswith("kworker/"))
    return sched.add(f"kworker/u{len(sched.cpu_online) * 2}:{len(sched.tasks)}", TaskKind.KTHREAD,
                     template.base, ppid=2)
