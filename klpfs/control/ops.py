"""What the control commands do to a running System, with kernel-style results.

Every operation returns a JSON-able dict: {"ok": true, ...} or
{"ok": false, "errno": N, "error": "..."}.  Kept apart from the socket so
tests can drive it directly under a mock clock.
"""

from __future__ import annotations

import base64
import errno
import inspect
import os
from collections.abc import Awaitable
from typing import Any

from klpfs.control.arguments import wrong_argument
from klpfs.control.lpstate import livepatch_state
from klpfs.control.modfile import ModuleFile, ModuleFileError, parse_module_file
from klpfs.control.modload import build_module, check_profile
from klpfs.elf.kmod import (
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    KoError,
    build_ko_module,
    force_source_module,
)
from klpfs.control.samples import module_stem
from klpfs.modules.pymodule import PyModuleError, build_pymodule
from klpfs.kernel.kallsyms import KSym
from klpfs.kernel.module import DELETE_MODULE_STACK, INIT_MODULE_STACK, O_TRUNC, Module, module_size
from klpfs.kernel.oops import KernelFault
from klpfs.kernel.printk import LEVEL_NAMES, LogRecord
from klpfs.kernel.timers import time_problem
from klpfs.livepatch.debug import livepatch_debug, set_livepatch_debug
from klpfs.kernel.sched import (
    KTHREAD_BASE, SLEEP_PRIMITIVES, USER_BASE, TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE, Task, TaskKind,
    stack_trace_save_tsk)
from klpfs.system import System

Reply = dict[str, Any]


def ok(**fields: Any) -> Reply:
    return {"ok": True, **fields}


def fail(err: int, message: str = "", **fields: Any) -> Reply:
    return {"ok": False, "errno": err, "error": message or os.strerror(err), **fields}


class Failure(Exception):
    """An operation refused, carrying its reply."""

    def __init__(self, err: int, message: str = "", **fields: Any):
        super().__init__(message or os.strerror(err))
        self.reply = fail(err, message, **fields)


def record_dict(record: LogRecord) -> Reply:
    """A record for the CLI; bytes a /dev/kmsg write left undecodable show as \\xNN."""
    text = record.text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return {"seq": record.seq, "level": LEVEL_NAMES[record.level], "facility": record.facility,
            "time": record.timestamp, "text": text}


class Control:
    def __init__(self, system: System):
        self.system = system
        self.kernel = system.kernel

    # -- modules ------------------------------------------------------------------

    async def insmod(self, path: str, text: str = "", params: list[str] | None = None,
                     data: bytes | str | None = None, behaviour: dict[str, str] | None = None,
                     flags: int = 0) -> Reply:
        """Load a module file: `text` for .py and TOML files, `data` (bytes, or base64 over
        the socket) for a .ko; `behaviour` {path, text}: the Python module that supplies a
        .ko's function bodies; `flags`: finit_module()'s MODULE_INIT_IGNORE_MODVERSIONS and
        MODULE_INIT_IGNORE_VERMAGIC (`insmod -f`)."""
        params = list(params or [])
        if flags & ~(MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC):
            # finit_module(): unknown flags are -EINVAL (a compressed file is never passed here).
            return fail(errno.EINVAL, f"insmod: unknown finit_module flags {flags:#x}")
        if data is not None:
            return await self._insmod_ko(path, data, params, behaviour, flags)
        if path.endswith(".py"):
            try:
                mod = build_pymodule(path, text, self.system)
            except PyModuleError as e:
                return fail(e.errno, str(e), file_error=e.errno == errno.ENOEXEC)
        else:
            try:
                mf = parse_module_file(path, text)
                self._check_profile(mf)
            except ModuleFileError as e:
                return fail(errno.ENOEXEC, str(e), file_error=True)
            mod = build_module(mf, self.system)
        try:
            force_source_module(mod, self.system, flags)
        except KoError as e:
            return fail(e.errno, str(e), file_error=True)
        return await self.init_module(mod, params)

    async def _insmod_ko(self, path: str, data: bytes | str, params: list[str],
                         behaviour: dict[str, str] | None, flags: int) -> Reply:
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                return fail(errno.EINVAL, "insmod: `data` is not base64")
        companion = None
        if behaviour is not None:
            companion = (str(behaviour.get("path", "")), str(behaviour.get("text", "")))
        try:
            mod = build_ko_module(path, data, self.system, companion, flags)
        except KoError as e:
            return fail(e.errno, str(e), file_error=e.errno == errno.ENOEXEC)
        return await self.init_module(mod, params)

    async def init_module(self, mod: Module, params: list[str], comm: str = "insmod") -> Reply:
        """finit_module() by a short-lived `insmod` process: the parameters are
        parsed, then init runs (and may sleep) as that process."""
        kernel = self.kernel
        task = kernel.spawn_user(comm, INIT_MODULE_STACK)
        try:
            ret = await kernel.modules.init_module(mod, task, params)
        finally:
            if not task.exited:
                kernel.sched.exit(task)
        if ret:
            fault = mod.data.get("fault")
            if fault:
                return fail(-ret, detail=f"{mod.data.get('file', mod.name)}: init faulted: {fault}")
            return fail(-ret)
        return ok(name=mod.name)

    def _check_profile(self, mf: ModuleFile) -> None:
        """Fields and APIs that do not exist in the running kernel (the .ko would not build)."""
        check_profile(mf, self.system.profile)

    async def rmmod(self, name: str, flags: int = 0) -> Reply:
        """delete_module(name, flags) by a short-lived `rmmod` process; a module in use is
        refused before that (`in_use`, as kmod's rmmod checks the refcount), unless the
        flags force it (O_TRUNC: `rmmod -f`), which the kernel then decides."""
        name = module_stem(name)
        modules = self.kernel.modules
        mod = modules.find_module(name)
        if mod is None:
            return fail(errno.ENOENT, not_loaded=True, name=name)
        if mod.refcnt and not flags & O_TRUNC:
            return fail(errno.EWOULDBLOCK, in_use=True, name=name)
        kernel = self.kernel
        task = kernel.spawn_user("rmmod", DELETE_MODULE_STACK)
        try:
            ret = await modules.delete_module_as(task, name, flags)
        finally:
            if not task.exited:
                kernel.sched.exit(task)
        return fail(-ret, name=name) if ret else ok(name=name)

    def lsmod(self) -> Reply:
        mods = [{"name": m.name, "size": module_size(m), "refcnt": m.refcnt}
                for m in reversed(self.kernel.modules.modules.values())]
        return ok(modules=mods)

    # -- the log ----------------------------------------------------------------------

    def dmesg(self, since_clear: bool = False, follow: bool = False) -> Reply:
        """The ring; since_clear: only what came after the last `clear`, as util-linux dmesg reads it.
        follow: the control socket keeps the connection and streams each new record after
        these (klpfs.control.server); only a stream can, so a direct call gets the ring."""
        log = self.kernel.log
        start = log.clear_seq if since_clear else 0
        return ok(records=[record_dict(r) for r in log.records if r.seq >= start])

    def clear(self) -> Reply:
        """syslog(SYSLOG_ACTION_CLEAR), as `dmesg -C` does."""
        self.kernel.log.clear()
        return ok()

    def debug(self, enable: bool | None) -> Reply:
        """`file kernel/livepatch/* +p` (or -p) to dynamic debug; whether any livepatch callsite prints."""
        if enable is not None:
            set_livepatch_debug(self.kernel.dyndbg, enable)
        return ok(enabled=livepatch_debug(self.kernel.dyndbg))

    # -- tasks ------------------------------------------------------------------------

    def _task(self, pid: int) -> Task:
        task = self.kernel.sched.find(pid)
        if task is None:
            raise Failure(errno.ESRCH, f"no such task: {pid}")
        return task

    def _func(self, name: str) -> KSym:
        sym = self.kernel.kallsyms.find_any(name)
        if sym is None:
            raise Failure(errno.ENOENT, f"no function {name!r} in the kernel or its modules")
        return sym

    def task_info(self, task: Task) -> Reply:
        """`where`: the first function of the task's /proc/<pid>/stack that is not a sleeping
        primitive (msleep): what it sleeps or runs in, as that file shows it."""
        trace = stack_trace_save_tsk(self.kernel.sched.stack(task))
        inner = next((s for s in trace if s.name not in SLEEP_PRIMITIVES), None)
        where = "" if inner is None else inner.name + (f" [{inner.module}]" if inner.module else "")
        state = "R" if self.kernel.sched.task_curr(task) else task.state
        return {"pid": task.pid, "comm": task.comm, "kind": task.kind.value, "state": state,
                "patch_state": task.patch_state, "where": where}

    def ps(self) -> Reply:
        sched = self.kernel.sched
        sched.refresh()
        return ok(tasks=[self.task_info(t) for t in (*sched.idle_tasks, *sched.tasks.values())])

    def task_add(self, comm: str, kind: str, ppid: int | None) -> Reply:
        if not 0 < len(comm) < 16:
            return fail(errno.EINVAL, "a task name (comm) has 1 to 15 characters")
        task_kind = TaskKind.KTHREAD if kind == "kthread" else TaskKind.USER
        if ppid is None:
            ppid = 2 if task_kind is TaskKind.KTHREAD else self.kernel.console.pid
        elif self.kernel.sched.find(ppid) is None:
            return fail(errno.ESRCH, f"no such parent task: {ppid}")
        names = KTHREAD_BASE if task_kind is TaskKind.KTHREAD else USER_BASE
        base = self.kernel.kallsyms.find_each(names)
        task = self.kernel.sched.add(comm, task_kind, base, ppid=ppid)
        return ok(task=self.task_info(task))

    def task_sleep(self, pid: int, func: str, seconds: float | None, interruptible: bool) -> Reply:
        """The task enters func and sleeps there: `seconds` (None: until woken) must be
        a time the kernel's timers hold (see time_problem()), or it is EINVAL."""
        problem = None if seconds is None else time_problem(seconds)
        if problem is not None:
            return fail(errno.EINVAL, f"seconds: {problem}")
        task = self._task(pid)
        if task.kind is TaskKind.IDLE:
            raise Failure(errno.EINVAL, "idle tasks only idle")
        sym = self._func(func)
        state = TASK_INTERRUPTIBLE if interruptible else TASK_UNINTERRUPTIBLE
        impl = self.kernel.sched.enter(task, sym, state, seconds)
        return ok(task=self.task_info(task), impl=impl.name, impl_module=impl.module)

    def task_wake(self, pid: int) -> Reply:
        task = self._task(pid)
        if task.activity is None:
            return fail(errno.EINVAL, f"task {pid} is not inside a function (nothing to wake from)")
        self.kernel.sched.wake(task)
        return ok(task=self.task_info(task))

    def task_run(self, pid: int) -> Reply:
        task = self._task(pid)
        self.kernel.sched.run(task)
        return ok(task=self.task_info(task))

    def task_exit(self, pid: int) -> Reply:
        task = self._task(pid)
        if pid in (1, 2):
            return fail(errno.EPERM, f"task {pid} ({task.comm}) cannot exit")
        self.kernel.sched.exit(task)
        return ok()

    def call(self, func: str, pid: int | None) -> Reply:
        kernel = self.kernel
        task = kernel.console if pid is None else self._task(pid)
        result = kernel.call(self._func(func), task)
        return ok(task=self.task_info(task), impl=result.impl.name, impl_module=result.impl.module,
                  output=result.output)

    def status(self) -> Reply:
        profile = self.system.profile
        return ok(kernel=profile.version, release=profile.release, vermagic=profile.vermagic)

    def livepatch(self) -> Reply:
        """The patches and the transition under way, with the tasks that hold it
        (klpfs.control.lpstate): what `klpfs status`, `wait` and `watch` show."""
        return ok(**livepatch_state(self.system, self.task_info))

    def parse(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A request's command and arguments, checked against the command's signature and
        annotations (klpfs.control.arguments); Failure (EINVAL) if they do not fit."""
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or cmd not in COMMANDS:
            raise Failure(errno.EINVAL, f"unknown command {cmd!r}")
        handler = getattr(self, cmd)
        args = {k: v for k, v in request.items() if k != "cmd"}
        try:
            inspect.signature(handler).bind(**args)
        except TypeError as e:
            raise Failure(errno.EINVAL, f"bad arguments for {cmd}: {e}") from None
        wrong = wrong_argument(handler, args)
        if wrong is not None:
            raise Failure(errno.EINVAL, f"bad arguments for {cmd}: {wrong}")
        return cmd, args

    async def handle(self, request: dict[str, Any]) -> Reply:
        """Run one request ({"cmd": name, ...arguments}); refusals become error replies."""
        try:
            cmd, args = self.parse(request)
        except Failure as f:
            return f.reply
        return await self.run(cmd, args)

    async def run(self, cmd: str, args: dict[str, Any]) -> Reply:
        """Run a command `parse` accepted."""
        try:
            reply: Reply | Awaitable[Reply] = getattr(self, cmd)(**args)
            if isinstance(reply, Awaitable):
                reply = await reply
        except Failure as f:
            return f.reply
        except KernelFault as fault:
            # A call into a force-removed patch module's code, or one that overflowed the
            # kernel stack: the oops is the calling task's (the console shell stands for the
            # client), and the request fails.
            task = fault.task or self.kernel.console
            fault.die(task.pid, task.comm, task.cpu)
            return fail(errno.EFAULT, str(fault))
        return reply


COMMANDS = {"insmod", "rmmod", "lsmod", "dmesg", "clear", "debug", "ps", "task_add", "task_sleep",
            "task_wake", "task_run", "task_exit", "call", "status", "livepatch"}
