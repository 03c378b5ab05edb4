"""The kernel API for Python modules: `from klpfs.kapi import *` is a
module's `#include <linux/...>`.

Names and arguments follow the C API so a kernel module transliterates
line by line (see docs/modules.md).  What C passes by address, Python
passes as the object (`complete(busymod_work_started)`); a C variable that a
parameter or WRITE_ONCE changes is a module global; jiffies are ints.

Each call finds the module it was made from through the caller's globals
(THIS_MODULE of the file the call is written in, as in C), and the running
task through the emulated kernel.  Nothing here may be called except from
module code that klpfs loaded.
"""

from __future__ import annotations

import errno as _errno
import math as _math
import operator as _operator
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from klpfs.kernel import printk as _printk
from klpfs.kernel import wait as _wait
from klpfs.kernel import workqueue as _wq
from klpfs.kernel.code import code_location
from klpfs.kernel.kallsyms import KSym
from klpfs.kernel.memory import Mem, addr_of
from klpfs.kernel.module import PAGE_SIZE, Module, ModuleState
from klpfs.kernel.params import PARAM_TYPES, ParamSpec
from klpfs.kernel.printf import KMALLOC_MAX_SIZE, vsnprintf
from klpfs.kernel.sched import TASK_INTERRUPTIBLE, TASK_RUNNING, TASK_UNINTERRUPTIBLE, Task
from klpfs.kernel.seq_file import SeqFile
from klpfs.kernel.timers import HZ, LONG_MAX, MAX_JIFFY_OFFSET
from klpfs.livepatch import state as _state
from klpfs.livepatch.structs import KlpCallbacks, KlpFunc, KlpObject, KlpPatch, KlpState
from klpfs.modules.pydebug import module_callsite

if TYPE_CHECKING:
    from klpfs.modules.pymodule import KFunc
    from klpfs.profiles import Profile
    from klpfs.system import System

# -- errno, NULL, GFP, states --------------------------------------------------------

globals().update({name: getattr(_errno, name) for name in dir(_errno) if name.startswith("E")})
NULL = None
GFP_KERNEL = 0xCC0
GFP_ATOMIC = 0xA20
GFP_NOWAIT = 0x800
MODULE_STATE_LIVE = ModuleState.LIVE
MODULE_STATE_COMING = ModuleState.COMING
MODULE_STATE_GOING = ModuleState.GOING
MODULE_STATE_UNFORMED = ModuleState.UNFORMED
NR_CPUS = 64
MAX_SCHEDULE_TIMEOUT = _wait.MAX_SCHEDULE_TIMEOUT

KERN_EMERG, KERN_ALERT, KERN_CRIT, KERN_ERR, KERN_WARNING, KERN_NOTICE, KERN_INFO, KERN_DEBUG = (
    f"\x01{level}" for level in range(8))
KERN_LEVEL = {f"\x01{level}": level for level in range(8)}


def KERNEL_VERSION(a: int, b: int, c: int = 0) -> int:
    """KERNEL_VERSION(); compared with LINUX_VERSION_CODE in an `if`, decided at build time."""
    from klpfs.modules.pymodule import kernel_version
    return kernel_version(a, b, c)


# -- the module behind each call ---------------------------------------------------------

class ModuleContext:
    """A loaded Python module: its namespace, what it declared, what it created."""

    def __init__(self, system: System, module: Module, filename: str, funcs: dict[str, KFunc]):
        from klpfs.modules.pymodule import PyModuleInfo
        self.system = system
        self.kernel = system.kernel
        self.module = module
        self.filename = filename
        self.funcs = funcs
        self.ns: dict[str, Any] = {}
        self.info: PyModuleInfo = PyModuleInfo()
        self.procs: list[Any] = []
        self.kobjects: list[Any] = []
        self.kthreads: list[Task] = []

    def bind(self, fn: Callable[..., Any]) -> KFunc:
        """Decorates every top-level def: the function becomes the body of its symbol."""
        kf = self.funcs[fn.__name__]
        kf.body = fn
        return kf

    def release(self) -> None:
        """When the module is freed: what its code created and its exit left behind goes too."""
        kernel = self.kernel
        for task in self.kthreads:
            if not task.exited:
                kernel.sched.exit(task)
        for node in self.procs + self.kobjects:
            self.system.kernfs.remove(node)
        self.procs.clear()
        self.kobjects.clear()

    def remove_node(self, node: Any) -> None:
        """A proc entry or kobject the module created goes (once: a second remove is a no-op)."""
        for created in (self.procs, self.kobjects):
            if node in created:
                created.remove(node)
                self.system.kernfs.remove(node)

    def printk(self, level: int, fmt: str, args: tuple[Any, ...]) -> None:
        self.kernel.printk(level, self.pr_text(fmt, args))

    def pr_text(self, fmt: str, args: tuple[Any, ...]) -> str:
        """A pr_*() message: the module's pr_fmt() applied, formatted, without its newline.
        It is formatted after its KERN_<level> prefix, into the record's reserve."""
        pr_fmt = self.ns.get("pr_fmt")
        if callable(pr_fmt):
            fmt = pr_fmt(fmt)
        text = self.format(fmt, args, _printk.LOG_LINE_MAX - _printk.KERN_PREFIX_LEN)
        return text[:-1] if text.endswith("\n") else text

    def format(self, fmt: str, args: tuple[Any, ...], size: int = KMALLOC_MAX_SIZE) -> str:
        """vsnprintf() into a buffer of `size`: the largest kmalloc() buffer unless the call's is smaller."""
        return vsnprintf(fmt, args, self.symbol, size)

    def symbol(self, addr: int) -> str:
        sym = self.kernel.kallsyms.lookup(addr)
        if sym is None:
            return f"{addr:#x}"
        return f"{sym.name}+{addr - sym.addr:#x}/{sym.size:#x}" + (f" [{sym.module}]" if sym.module else "")


def _ctx() -> ModuleContext:
    """The module whose code made the kapi call (two frames up: caller of the kapi function)."""
    ctx = sys._getframe(2).f_globals.get("__klpfs__")
    if ctx is None:
        raise RuntimeError("klpfs.kapi is for module code that klpfs loads (klpfs insmod FILE.py)")
    return cast(ModuleContext, ctx)


def _nearest_ctx() -> ModuleContext:
    """The module code nearest up the stack (for `current` and `jiffies`, read from anywhere)."""
    frame = sys._getframe(1)
    while frame is not None:
        ctx = frame.f_globals.get("__klpfs__")
        if ctx is not None:
            return cast(ModuleContext, ctx)
        frame = frame.f_back  # type: ignore[assignment]
    raise RuntimeError("`current` and `jiffies` are only meaningful in module code")


def describe_fault(e: BaseException, sources: set[str]) -> str:
    where = code_location(e.__traceback__, sources)
    what = f"{type(e).__name__}: {e}"
    return f"{where}: {what}" if where else what


# -- symbols a profile has -------------------------------------------------------------

def _gates(profile: Profile) -> dict[str, str]:
    """Symbol -> "unknown" (not in this kernel) or "version" (its signature differs)."""
    gates: dict[str, str] = {}
    for name in ("klp_register_patch", "klp_unregister_patch", "klp_disable_patch", "klp_have_reliable_stack"):
        if not profile.register_api:
            gates[name] = "unknown"
    for name in ("klp_get_state", "klp_get_prev_state", "klp_state"):
        if not profile.system_states:
            gates[name] = "unknown"
    for name in SHADOW_ARGS_BEFORE_4_17:
        if not profile.shadow_ctor_dtor:
            gates[name] = "version"
    return gates


SHADOW_ARGS_BEFORE_4_17 = {"klp_shadow_alloc": 5, "klp_shadow_get_or_alloc": 5, "klp_shadow_free": 2,
                           "klp_shadow_free_all": 1}
"""The shadow API before 4.17, without constructor or destructor: (obj, id, data, size,
gfp_flags), (obj, id) and (id).  A module is built against one kernel's headers, so it
calls these in that kernel's form; a call in the other form is the other kernel's."""


def unknown_symbols(profile: Profile) -> set[str]:
    """The kernel symbols this profile's kernel does not have (a .ko needing one: Unknown symbol)."""
    return {name for name, gate in _gates(profile).items() if gate == "unknown"}


def check_symbols(names: set[str], profile: Profile, modname: str,
                  arities: dict[str, set[int | None]] | None = None) -> tuple[str, int] | None:
    """simplify_symbols(): the first symbol the module needs that this kernel lacks.
    `arities`: for each name, the argument counts of the calls to it (None for a use
    other than a call); a shadow API function used only in this kernel's form is fine."""
    gates = _gates(profile)
    arities = arities or {}
    for name in sorted(names & gates.keys()):
        if gates[name] == "unknown":
            return f"{modname}: Unknown symbol {name} (err -2)", _errno.ENOENT
        if arities.get(name) == {SHADOW_ARGS_BEFORE_4_17.get(name)}:
            continue
        return f"{modname}: disagrees about version of symbol {name}", _errno.EINVAL
    if profile.shadow_ctor_dtor:
        for name in sorted(names & SHADOW_ARGS_BEFORE_4_17.keys()):
            if SHADOW_ARGS_BEFORE_4_17[name] in arities.get(name, set()):
                return f"{modname}: disagrees about version of symbol {name}", _errno.EINVAL
    return None


# -- module metadata ------------------------------------------------------------------------

def MODULE_LICENSE(license: str) -> None:
    _ctx().info.license = license


def MODULE_AUTHOR(author: str) -> None:
    _ctx().info.authors.append(author)


def MODULE_DESCRIPTION(description: str) -> None:
    _ctx().info.description = description


def MODULE_INFO(tag: str, value: str) -> None:
    """MODULE_INFO(livepatch, "Y") is `MODULE_INFO("livepatch", "Y")`."""
    _ctx().info.info[tag] = value


def MODULE_VERSION(version: str) -> None:
    _ctx().info.info["version"] = version


def module_init(fn: KFunc) -> None:
    _ctx().info.init = fn


def module_exit(fn: KFunc) -> None:
    _ctx().info.exit = fn


def notrace(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`notrace`: no ftrace location, so livepatch cannot patch the function."""
    return fn


def _param(ctx: ModuleContext, name: str, var: str, ptype: str, perm: int, array_max: int | None = None,
           nump: str | None = None) -> None:
    if ptype not in PARAM_TYPES:
        raise ValueError(f"module_param {name}: unknown type {ptype!r} (one of {', '.join(PARAM_TYPES)})")
    if var not in ctx.ns:
        raise NameError(f"module_param {name}: define the variable {var!r} first")
    if perm & ~0o777:
        raise ValueError(f"module_param {name}: bad permissions {perm:#o}")
    ctx.module.param_specs[name] = ParamSpec(ptype, perm, var=var, array_max=array_max, nump=nump)


def module_param(name: str, type: str, perm: int) -> None:
    """module_param(name, type, perm): the module global `name` is the parameter."""
    _param(_ctx(), name, name, type, perm)


def module_param_named(name: str, var: str, type: str, perm: int) -> None:
    _param(_ctx(), name, var, type, perm)


def module_param_array(name: str, type: str, nump: str | None, perm: int) -> None:
    """module_param_array(name, type, &nump, perm): `name` is a list (its length the
    array's size); `nump` names the global that counts the elements set, or None."""
    ctx = _ctx()
    array = ctx.ns.get(name)
    if not isinstance(array, list):
        raise TypeError(f"module_param_array {name}: the variable must be a list")
    _param(ctx, name, name, type, perm, len(array), nump)


def MODULE_PARM_DESC(name: str, description: str) -> None:
    spec = _ctx().module.param_specs.get(name)
    if spec is not None:
        spec.description = description


def READ_ONCE(value: Any) -> Any:
    return value


# -- printk -------------------------------------------------------------------------------

def _pr(level: int) -> Callable[..., None]:
    def pr(fmt: str, *args: Any) -> None:
        _ctx().printk(level, fmt, args)
    pr.__name__ = f"pr_{_printk.LEVEL_NAMES[level]}"
    return pr


pr_emerg = _pr(_printk.KERN_EMERG)
pr_alert = _pr(_printk.KERN_ALERT)
pr_crit = _pr(_printk.KERN_CRIT)
pr_err = _pr(_printk.KERN_ERR)
pr_warn = pr_warning = _pr(_printk.KERN_WARNING)
pr_notice = _pr(_printk.KERN_NOTICE)
pr_info = _pr(_printk.KERN_INFO)


def pr_debug(fmt: str, *args: Any) -> None:
    """pr_debug(): through this call's dynamic debug callsite, printed only while it has `p`."""
    caller = sys._getframe(1)
    ctx = _ctx()
    dp = module_callsite(ctx.module, ctx.filename, caller.f_code.co_name, caller.f_lineno, fmt)
    if dp.enabled:
        ctx.kernel.dyndbg.pr_debug(dp, ctx.pr_text(fmt, args))


def printk(fmt: str, *args: Any) -> None:
    """printk(KERN_INFO "..."): `printk(KERN_INFO + "...")`; no level is the default, KERN_WARNING."""
    level = KERN_LEVEL.get(fmt[:2])
    ctx = _ctx()
    if level is None:
        # No KERN_<level> prefix: the whole reserve holds text, at the default level.
        ctx.kernel.log.emit(_printk.KERN_WARNING, ctx.format(fmt, args, _printk.LOG_LINE_MAX).rstrip("\n"))
        return
    text = ctx.format(fmt[2:], args, _printk.LOG_LINE_MAX - _printk.KERN_PREFIX_LEN)
    ctx.kernel.printk(level, text.rstrip("\n"))


def WARN_ON(condition: Any) -> bool:
    """WARN_ON(cond): when cond is true, the kernel's warning report (its first
    and last lines, and the WARNING line naming the module's file, line and
    function); returns whether cond was true."""
    if not condition:
        return False
    ctx = _ctx()
    kernel = ctx.kernel
    frame = sys._getframe(1)
    fn = ctx.funcs.get(frame.f_code.co_name)
    if fn is not None and fn.sym is not None:
        # Offsets as the loader sizes functions: 16 bytes per source line.
        where = ctx.symbol(fn.addr + 0x10 * max(0, frame.f_lineno - frame.f_code.co_firstlineno))
    else:
        where = frame.f_code.co_name
    kernel.printk(_printk.KERN_WARNING, "------------[ cut here ]------------")
    kernel.printk(_printk.KERN_WARNING, f"WARNING: CPU: 0 PID: {kernel.current.pid} at "
                                        f"{frame.f_code.co_filename}:{frame.f_lineno} {where}")
    kernel.printk(_printk.KERN_WARNING, "---[ end trace 0000000000000000 ]---")
    return True


class Buffer:
    """A sysfs show function's page: sprintf/sysfs_emit write into it."""

    def __init__(self) -> None:
        self.text = ""


def sprintf(buf: Buffer, fmt: str, *args: Any) -> int:
    """sprintf(buf, ...) into a show function's buffer; returns the length written."""
    buf.text = _ctx().format(fmt, args, PAGE_SIZE)
    return len(buf.text)


def sysfs_emit(buf: Buffer, fmt: str, *args: Any) -> int:
    buf.text = _ctx().format(fmt, args, PAGE_SIZE)
    return len(buf.text)


def kasprintf(gfp: int, fmt: str, *args: Any) -> str:
    return _ctx().format(fmt, args)


def seq_printf(m: SeqFile, fmt: str, *args: Any) -> None:
    m.puts(_ctx().format(fmt, args))


def seq_puts(m: SeqFile, s: str) -> None:
    m.puts(s)


def seq_putc(m: SeqFile, c: str) -> None:
    m.puts(c)


# -- tasks, time and sleeping -----------------------------------------------------------------

class _Current:
    """`current`: the task running this code (current->pid, current->comm)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_current_task(), name)


def _current_task() -> Task:
    return _nearest_ctx().kernel.current


current = _Current()


def task_pid_nr(task: Task) -> int:
    return task.pid


def task_tgid_vnr(task: Task) -> int:
    return task.pid


class _Jiffies:
    """`jiffies`: the tick count now, wherever it is read."""

    def _now(self) -> int:
        from klpfs.modules.program import jiffies as now
        return now(_nearest_ctx().kernel.now())

    def __index__(self) -> int:
        return self._now()

    __int__ = __index__

    def __add__(self, other: int) -> int:
        return self._now() + other

    __radd__ = __add__

    def __sub__(self, other: int) -> int:
        return self._now() - other

    def __rsub__(self, other: int) -> int:
        return other - self._now()

    def __repr__(self) -> str:
        return "jiffies"


jiffies = _Jiffies()


class _ConsolePrintk:
    """console_printk[]: the running kernel's; `console_loglevel` is the C macro
    for console_printk[0], so module code reads and writes `console_printk[0]`."""

    def __getitem__(self, index: int) -> int:
        return _nearest_ctx().kernel.log.console_printk[index]

    def __setitem__(self, index: int, value: int) -> None:
        _nearest_ctx().kernel.log.console_printk[index] = int(value)

    def __repr__(self) -> str:
        return "console_printk"


console_printk = _ConsolePrintk()
CONSOLE_LOGLEVEL_DEFAULT = _printk.CONSOLE_LOGLEVEL_DEFAULT
CONSOLE_LOGLEVEL_MOTORMOUTH = _printk.CONSOLE_LOGLEVEL_MOTORMOUTH


def _c_integer(value: Any, api: str) -> int:
    """A C integer argument: an int as it is, a float truncated as C converts it.
    NaN and the infinities have no integer value (undefined behaviour in C): the
    call fails with a ValueError naming it, which the module's code reports."""
    if isinstance(value, float):
        if not _math.isfinite(value):
            raise ValueError(f"{api}: {value!r} is not a number a C integer can hold")
        return int(value)
    return _operator.index(value)


def _c_unsigned(value: Any, bits: int, api: str) -> int:
    """An unsigned C argument of `bits` bits: a negative or larger value wraps, as in C."""
    return _c_integer(value, api) & ((1 << bits) - 1)


def _to_jiffies(value: Any, unit: int, api: str) -> int:
    """msecs_to_jiffies()/usecs_to_jiffies() (`unit` per second) of an unsigned int:
    rounded up to whole jiffies; past jiffies_to_msecs(MAX_JIFFY_OFFSET) (an unsigned
    int too, so truncated) it saturates at MAX_JIFFY_OFFSET."""
    n = _c_unsigned(value, 32, api)
    if n > (MAX_JIFFY_OFFSET * (unit // HZ)) & 0xFFFFFFFF:
        return MAX_JIFFY_OFFSET
    return -(-n * HZ // unit)


def msecs_to_jiffies(msecs: int) -> int:
    return _to_jiffies(msecs, 1000, "msecs_to_jiffies")


def usecs_to_jiffies(usecs: int) -> int:
    return _to_jiffies(usecs, 1_000_000, "usecs_to_jiffies")


def jiffies_to_msecs(j: int) -> int:
    return j * 1000 // HZ


def time_after(a: int, b: int) -> bool:
    return ((int(b) - int(a)) & (1 << 64) - 1) >> 63 == 1


def time_before(a: int, b: int) -> bool:
    return time_after(b, a)


def time_after_eq(a: int, b: int) -> bool:
    return not time_before(a, b)


def time_before_eq(a: int, b: int) -> bool:
    return not time_after(a, b)


def _seconds(timeout: int | None, api: str) -> float | None:
    """A timeout in jiffies (a signed long) as seconds; MAX_SCHEDULE_TIMEOUT (None, or
    LONG_MAX and beyond, which a long cannot exceed) is no timeout at all."""
    if timeout is None:
        return None
    jiffies = _c_integer(timeout, api)
    return None if jiffies >= LONG_MAX else max(0, jiffies) / HZ


def _jiffies_left(seconds: float | None) -> int:
    return 0 if seconds is None else -(-int(seconds * HZ * 1000) // 1000)


def set_current_state(state: str) -> None:
    """set_current_state(TASK_INTERRUPTIBLE) before schedule()/schedule_timeout()."""
    ctx = _ctx()
    ctx.kernel.code.next_state[ctx.kernel.current.pid] = state


__set_current_state = set_current_state


def _next_state(ctx: ModuleContext) -> str:
    return ctx.kernel.code.next_state.pop(ctx.kernel.current.pid, TASK_RUNNING)


def schedule() -> None:
    """schedule(): sleep in the state set by set_current_state() until woken; TASK_RUNNING returns."""
    ctx = _ctx()
    state = _next_state(ctx)
    if state != TASK_RUNNING:
        _wait.sleep(ctx.kernel, state, None, _wait.SCHEDULE)


def schedule_timeout(timeout: int | None) -> int:
    """schedule_timeout(jiffies) in the state set before; returns the jiffies left."""
    ctx = _ctx()
    state = _next_state(ctx)
    if state == TASK_RUNNING:
        return int(timeout or 0)
    return _jiffies_left(_wait.schedule_timeout(ctx.kernel, state, _seconds(timeout, "schedule_timeout")))


def schedule_timeout_interruptible(timeout: int | None) -> int:
    seconds = _seconds(timeout, "schedule_timeout_interruptible")
    return _jiffies_left(_wait.schedule_timeout(_ctx().kernel, TASK_INTERRUPTIBLE, seconds))


def schedule_timeout_uninterruptible(timeout: int | None) -> int:
    seconds = _seconds(timeout, "schedule_timeout_uninterruptible")
    return _jiffies_left(_wait.schedule_timeout(_ctx().kernel, TASK_UNINTERRUPTIBLE, seconds))


def msleep(msecs: int) -> None:
    """msleep(unsigned int msecs)."""
    _wait.msleep(_ctx().kernel, _c_unsigned(msecs, 32, "msleep"))


def msleep_interruptible(msecs: int) -> int:
    return _wait.msleep(_ctx().kernel, _c_unsigned(msecs, 32, "msleep_interruptible"), interruptible=True)


def ssleep(seconds: int) -> None:
    """ssleep(unsigned int seconds): msleep(seconds * 1000), the product an unsigned int too."""
    _wait.msleep(_ctx().kernel, _c_unsigned(_c_integer(seconds, "ssleep") * 1000, 32, "ssleep"))


def usleep_range(min_us: int, max_us: int) -> None:
    """usleep_range(unsigned long min, unsigned long max)."""
    _wait.sleep(_ctx().kernel, TASK_UNINTERRUPTIBLE, _c_unsigned(min_us, 64, "usleep_range") / 1_000_000,
                ("usleep_range_state", *_wait.SCHEDULE))


def mdelay(msecs: int) -> None:
    """mdelay(): spin on the CPU (the task stays running) for the time."""
    _wait.busy_wait(_ctx().kernel, _c_unsigned(msecs, 64, "mdelay") / 1000, "__const_udelay")


def udelay(usecs: int) -> None:
    _wait.busy_wait(_ctx().kernel, _c_unsigned(usecs, 64, "udelay") / 1_000_000, "__const_udelay")


def cond_resched() -> None:
    """cond_resched(): where the kernel's 6.x livepatch lets a busy kthread switch itself."""
    ctx = _ctx()
    sched = ctx.kernel.sched
    task = ctx.kernel.current
    for flag in list(task.flags):
        handler = sched.resched_work.get(flag)
        if handler is not None:
            handler(task)


# -- completions, wait queues, locks ----------------------------------------------------------

Completion = _wait.Completion
WaitQueueHead = _wait.WaitQueueHead
Mutex = _wait.Mutex


def DECLARE_COMPLETION() -> _wait.Completion:
    """`static DECLARE_COMPLETION(done);` is `done = DECLARE_COMPLETION()`."""
    return _wait.Completion()


def init_completion(x: _wait.Completion) -> None:
    x.reinit()


reinit_completion = init_completion


def complete(x: _wait.Completion) -> None:
    x.complete(_ctx().kernel)


def complete_all(x: _wait.Completion) -> None:
    x.complete(_ctx().kernel, all=True)


def completion_done(x: _wait.Completion) -> bool:
    return x.done > 0


def try_wait_for_completion(x: _wait.Completion) -> bool:
    if x.done <= 0:
        return False
    if x.done < 1 << 30:
        x.done -= 1
    return True


def wait_for_completion(x: _wait.Completion) -> None:
    x.wait_for(_ctx().kernel)


def wait_for_completion_interruptible(x: _wait.Completion) -> int:
    x.wait_for(_ctx().kernel, TASK_INTERRUPTIBLE)
    return 0


def wait_for_completion_timeout(x: _wait.Completion, timeout: int) -> int:
    """The jiffies left (at least 1) when completed, 0 on timeout."""
    seconds = _seconds(timeout, "wait_for_completion_timeout")
    return _jiffies_left(x.wait_for(_ctx().kernel, TASK_UNINTERRUPTIBLE, seconds))


def DECLARE_WAIT_QUEUE_HEAD() -> _wait.WaitQueueHead:
    return _wait.WaitQueueHead()


def wait_event(wq: _wait.WaitQueueHead, condition: Callable[[], Any]) -> None:
    """wait_event(wq, cond): the condition is a callable, `lambda: flag`."""
    _wait.wait_event(_ctx().kernel, wq, condition, TASK_UNINTERRUPTIBLE)


def wait_event_interruptible(wq: _wait.WaitQueueHead, condition: Callable[[], Any]) -> int:
    _wait.wait_event(_ctx().kernel, wq, condition, TASK_INTERRUPTIBLE)
    return 0


def wait_event_timeout(wq: _wait.WaitQueueHead, condition: Callable[[], Any], timeout: int) -> int:
    seconds = _seconds(timeout, "wait_event_timeout")
    return _jiffies_left(_wait.wait_event(_ctx().kernel, wq, condition, TASK_UNINTERRUPTIBLE, seconds))


def wait_event_interruptible_timeout(wq: _wait.WaitQueueHead, condition: Callable[[], Any], timeout: int) -> int:
    seconds = _seconds(timeout, "wait_event_interruptible_timeout")
    return _jiffies_left(_wait.wait_event(_ctx().kernel, wq, condition, TASK_INTERRUPTIBLE, seconds))


def wake_up(wq: _wait.WaitQueueHead) -> None:
    wq.wake_up(_ctx().kernel, 1)


def wake_up_all(wq: _wait.WaitQueueHead) -> None:
    wq.wake_up(_ctx().kernel, 0)


def wake_up_interruptible(wq: _wait.WaitQueueHead) -> None:
    wq.wake_up(_ctx().kernel, 1, TASK_INTERRUPTIBLE)


def DEFINE_MUTEX() -> _wait.Mutex:
    return _wait.Mutex()


def mutex_init(lock: _wait.Mutex) -> None:
    lock.owner = None


def mutex_lock(lock: _wait.Mutex) -> None:
    lock.lock(_ctx().kernel)


def mutex_trylock(lock: _wait.Mutex) -> bool:
    return lock.trylock(_ctx().kernel)


def mutex_unlock(lock: _wait.Mutex) -> None:
    lock.unlock(_ctx().kernel)


def mutex_is_locked(lock: _wait.Mutex) -> bool:
    return lock.owner is not None


class Spinlock:
    """spinlock_t: code holding it never sleeps here, so it never contends."""


def DEFINE_SPINLOCK() -> Spinlock:
    return Spinlock()


def spin_lock(lock: Spinlock) -> None:
    pass


spin_unlock = spin_lock_init = spin_lock


def spin_lock_irqsave(lock: Spinlock) -> int:
    """`spin_lock_irqsave(&lock, flags)` is `flags = spin_lock_irqsave(lock)`."""
    return 0


def spin_unlock_irqrestore(lock: Spinlock, flags: int) -> None:
    pass


# -- kernel threads and work -------------------------------------------------------------------

def kthread_create(threadfn: Callable[[Any], Any], data: Any, namefmt: str, *args: Any) -> Task:
    ctx = _ctx()
    task = ctx.kernel.kthreads.create(threadfn, data, ctx.format(namefmt, args))
    ctx.kthreads.append(task)
    return task


def kthread_run(threadfn: Callable[[Any], Any], data: Any, namefmt: str, *args: Any) -> Task:
    """kthread_create() and wake_up_process(): the thread starts running its function."""
    ctx = _ctx()
    task = ctx.kernel.kthreads.create(threadfn, data, ctx.format(namefmt, args))
    ctx.kthreads.append(task)
    ctx.kernel.kthreads.wake_up_process(task)
    return task


def wake_up_process(task: Task) -> int:
    return int(_ctx().kernel.kthreads.wake_up_process(task))


def kthread_should_stop() -> bool:
    return _ctx().kernel.kthreads.should_stop()


def kthread_stop(task: Task) -> Any:
    return _ctx().kernel.kthreads.stop(task)


def IS_ERR(ptr: Any) -> bool:
    return isinstance(ptr, int) and not isinstance(ptr, bool) and -4095 <= ptr < 0


def PTR_ERR(ptr: Any) -> int:
    return ptr if IS_ERR(ptr) else 0


def ERR_PTR(err: int) -> int:
    return err


Work = _wq.Work
DelayedWork = _wq.DelayedWork


def DECLARE_WORK(func: Callable[[Any], Any]) -> _wq.Work:
    """`static DECLARE_WORK(work, fn);` is `work = DECLARE_WORK(fn)`."""
    return _wq.Work(func)


def DECLARE_DELAYED_WORK(func: Callable[[Any], Any]) -> _wq.DelayedWork:
    return _wq.DelayedWork(func)


def INIT_WORK(work: _wq.Work, func: Callable[[Any], Any]) -> None:
    work.func = func


INIT_DELAYED_WORK = INIT_WORK


def to_delayed_work(work: _wq.Work) -> _wq.Work:
    return work


def schedule_work(work: _wq.Work) -> bool:
    return _wq.queue_work(_ctx().kernel, work)


def schedule_delayed_work(dwork: _wq.DelayedWork, delay: int) -> bool:
    """delay in jiffies, as in C.  A negative one (an unsigned long past LONG_MAX) is in
    the past to the timer wheel: the work is queued at once; a longer one than
    MAX_JIFFY_OFFSET waits no longer than that."""
    return _wq.queue_delayed_work(_ctx().kernel, dwork,
                                  min(max(0, _c_integer(delay, "schedule_delayed_work")), MAX_JIFFY_OFFSET))


def flush_work(work: _wq.Work) -> bool:
    return _wq.flush_work(_ctx().kernel, work)


flush_delayed_work = flush_work


def cancel_work_sync(work: _wq.Work) -> bool:
    return _wq.cancel_work_sync(_ctx().kernel, work)


cancel_delayed_work_sync = cancel_work_sync


def cancel_delayed_work(dwork: _wq.DelayedWork) -> bool:
    return _wq.cancel_work(_ctx().kernel, dwork)


# -- memory ----------------------------------------------------------------------------------------

def kzalloc(size: int, flags: int = GFP_KERNEL) -> Mem:
    """A zeroed block with an address; store fields as attributes (`d.jiffies_expire = ...`)."""
    return _ctx().kernel.heap.kzalloc(size)


kmalloc = kzalloc


def kcalloc(n: int, size: int, flags: int = GFP_KERNEL) -> Mem:
    return _ctx().kernel.heap.kzalloc(n * size)


def kfree(ptr: Any) -> None:
    """Freed memory is the garbage collector's; nothing to do."""


def sizeof(obj: Any) -> int:
    """sizeof of a variable: a kmalloc'd block's size; anything else is a pointer (8).
    For a type, write its size (`kzalloc(4, ...)` for an int)."""
    return obj.size if isinstance(obj, Mem) else 8


def LIST_HEAD() -> list[Any]:
    """A list_head is a Python list: append, remove and iterate a copy to delete while walking."""
    return []


# -- /proc and sysfs -----------------------------------------------------------------------------------

class ProcDirEntry:
    """struct proc_dir_entry of a file a module created."""

    def __init__(self, name: str, node: Any):
        self.name = name
        self.node = node


def proc_create_single(name: str, mode: int, parent: Any, show: KFunc) -> ProcDirEntry:
    """/proc/<name>: reading it runs show(m, v) (through ftrace) as the reader."""
    ctx = _ctx()
    kernel = ctx.kernel
    if parent is not None:
        raise ValueError("proc_create_single: only entries directly in /proc are emulated")
    procfs = ctx.system.procfs

    def read() -> str:
        sym = show.sym if hasattr(show, "sym") else None
        if sym is None:
            return ""
        return kernel.call(sym, kernel.current).output
    node = procfs.create_file(name, mode or 0o444, read)
    ctx.procs.append(node)
    return ProcDirEntry(name, node)


def proc_remove(pde: ProcDirEntry | None) -> None:
    if pde is not None:
        _ctx().remove_node(pde.node)


def remove_proc_entry(name: str, parent: Any) -> None:
    ctx = _ctx()
    for node in [n for n in ctx.procs if n.name == name]:
        ctx.remove_node(node)


class KobjAttribute:
    """struct kobj_attribute: a file under a module's kobject."""

    def __init__(self, name: str, mode: int, show: Callable[..., Any] | None, store: Callable[..., Any] | None):
        self.name = name
        self.mode = mode
        self.show = show
        self.store = store
        self.attr = self


def __ATTR(name: str, mode: int, show: Callable[..., Any] | None, store: Callable[..., Any] | None) -> KobjAttribute:
    return KobjAttribute(name, mode, show, store)


def __ATTR_RO(name: str) -> KobjAttribute:
    """Uses the module's `<name>_show`, as the C macro does."""
    return KobjAttribute(name, 0o444, _ctx().ns[f"{name}_show"], None)


def __ATTR_WO(name: str) -> KobjAttribute:
    return KobjAttribute(name, 0o200, None, _ctx().ns[f"{name}_store"])


def __ATTR_RW(name: str) -> KobjAttribute:
    ns = _ctx().ns
    return KobjAttribute(name, 0o644, ns[f"{name}_show"], ns[f"{name}_store"])


class Kobject:
    def __init__(self, name: str, node: Any):
        self.name = name
        self.node = node


class _KernelKobj:
    """kernel_kobj: /sys/kernel."""


kernel_kobj = _KernelKobj()


def kobject_create_and_add(name: str, parent: Any) -> Kobject | None:
    """A directory under /sys/kernel (parent kernel_kobj)."""
    ctx = _ctx()
    if parent is not kernel_kobj:
        raise ValueError("kobject_create_and_add: only kernel_kobj is emulated as a parent")
    kernfs = ctx.system.kernfs
    node = kernfs.create_dir(ctx.system.kernel_kobj, name)
    ctx.kobjects.append(node)
    return Kobject(name, node)


def kobject_put(kobj: Kobject | None) -> None:
    if kobj is not None:
        _ctx().remove_node(kobj.node)


def sysfs_create_file(kobj: Kobject, attr: KobjAttribute) -> int:
    """The attribute's show/store run (guarded, as the reading or writing process) on each access."""
    ctx = _ctx()
    kernel = ctx.kernel
    show_fn, store_fn = attr.show, attr.store

    def show() -> str:
        buf = Buffer()
        assert show_fn is not None
        kernel.code.guarded(show_fn, kobj, attr, buf, fallback=0)
        return buf.text

    def store(data: bytes) -> int:
        assert store_fn is not None
        ret = kernel.code.guarded(store_fn, kobj, attr, data.decode("utf-8", "replace"), len(data),
                                  fallback=-_errno.EFAULT)
        return ret if isinstance(ret, int) else len(data)
    ctx.system.kernfs.create_file(kobj.node, attr.name, attr.mode, show if show_fn else None,
                                  store if store_fn else None)
    return 0


# -- livepatch ------------------------------------------------------------------------------------------

def _sym(fn: Any) -> KSym | None:
    if fn is None or isinstance(fn, KSym):
        return fn
    return getattr(fn, "sym", None)


def klp_func(old_name: str | None = None, new_func: Any = None, old_sympos: int = 0,
             immediate: bool = False) -> KlpFunc:
    """struct klp_func {.old_name, .new_func, .old_sympos}; new_func is one of the module's functions."""
    func = KlpFunc(old_name, None, old_sympos, immediate)
    func.new_func = new_func
    return func


def klp_callbacks(pre_patch: Any = None, post_patch: Any = None, pre_unpatch: Any = None,
                  post_unpatch: Any = None) -> KlpCallbacks:
    return KlpCallbacks(pre_patch, post_patch, pre_unpatch, post_unpatch)


def klp_object(name: str | None = None, funcs: list[KlpFunc] | None = None,
               callbacks: KlpCallbacks | None = None) -> KlpObject:
    """struct klp_object; name None is vmlinux."""
    return KlpObject(name, funcs if funcs is not None else [], callbacks or KlpCallbacks())


def klp_state(id: int = 0, version: int = 0, data: Any = None) -> KlpState:
    return KlpState(id, version, data)


def klp_patch(mod: Module | None = None, objs: list[KlpObject] | None = None, states: list[KlpState] | None = None,
              replace: bool = False, immediate: bool = False) -> KlpPatch:
    return KlpPatch(mod, objs, immediate=immediate, replace=replace, states=list(states or []))


def _prepare(ctx: ModuleContext, patch: KlpPatch) -> None:
    """Function pointers become symbols, callbacks become guarded calls through ftrace."""
    kernel = ctx.kernel
    for obj in patch.objs or ():
        for func in obj.funcs or ():
            if func.new_func is not None and not isinstance(func.new_func, KSym):
                func.new_func = _sym(func.new_func)
        cbs = obj.callbacks
        for name in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
            fn = getattr(cbs, name)
            if fn is not None and not getattr(fn, "_klpfs_guarded", False):
                setattr(cbs, name, _guarded_callback(kernel, fn, name == "pre_patch"))
    ctx.module.data["patch"] = patch


def _guarded_callback(kernel: Any, fn: Callable[[KlpObject], Any], returns: bool) -> Callable[[KlpObject], int]:
    def call(obj: KlpObject) -> int:
        ret = kernel.code.guarded(fn, obj, fallback=-_errno.EFAULT)
        return ret if returns and isinstance(ret, int) else 0
    call._klpfs_guarded = True  # type: ignore[attr-defined]
    return call


def klp_enable_patch(patch: KlpPatch) -> int:
    ctx = _ctx()
    _prepare(ctx, patch)
    return ctx.system.livepatch.klp_enable_patch(patch)


def klp_register_patch(patch: KlpPatch) -> int:
    """4.x: register before enabling."""
    ctx = _ctx()
    _prepare(ctx, patch)
    return ctx.system.livepatch.klp_register_patch(patch)


def klp_unregister_patch(patch: KlpPatch) -> int:
    return _ctx().system.livepatch.klp_unregister_patch(patch)


def klp_disable_patch(patch: KlpPatch) -> int:
    return _ctx().system.livepatch.klp_disable_patch(patch)


def klp_have_reliable_stack() -> bool:
    return _ctx().system.livepatch.reliable_stacks


def klp_get_state(patch: KlpPatch, id: int) -> KlpState | None:
    return _state.klp_get_state(patch, id)


def klp_get_prev_state(id: int) -> KlpState | None:
    return _state.klp_get_prev_state(_ctx().system.livepatch, id)


def _shadow_ctor(ctor: Callable[..., int] | None, obj: Any) -> Callable[[object, list[Any], Any], int] | None:
    if ctor is None:
        return None

    def run(_: object, cell: list[Any], ctor_data: Any) -> int:
        ret = ctor(obj, cell[0], ctor_data)
        return ret if isinstance(ret, int) else 0
    return run


def _shadow_alloc(ctx: ModuleContext, obj: Any, id: int, args: tuple[Any, ...], or_get: bool) -> Mem | None:
    """Both forms: (size, gfp_flags, ctor, ctor_data) from 4.17, (data, size, gfp_flags) before."""
    if len(args) == 3:
        value, size, _ = args
        ctor, ctor_data = None, None
    else:
        size, _, ctor, ctor_data = args
        value = None
    shadow = ctx.system.livepatch.shadow
    alloc = shadow.klp_shadow_get_or_alloc if or_get else shadow.klp_shadow_alloc
    # The kernel allocates a variable only when <obj, id> has none yet.
    data = None
    if shadow.klp_shadow_get(obj, id) is None:
        data = ctx.kernel.heap.kzalloc(size)
        if value is not None:
            data.value = value
    cell = alloc(obj, id, data, _shadow_ctor(ctor, obj), ctor_data)
    return None if cell is None else cell[0]  # type: ignore[return-value]


def klp_shadow_get(obj: Any, id: int) -> Mem | None:
    """The shadow data of <obj, id>, or None."""
    cell = _ctx().system.livepatch.shadow.klp_shadow_get(obj, id)
    return None if cell is None else cell[0]  # type: ignore[return-value]


def klp_shadow_alloc(obj: Any, id: int, *args: Any) -> Mem | None:
    """klp_shadow_alloc(obj, id, size, gfp_flags, ctor, ctor_data); before 4.17
    klp_shadow_alloc(obj, id, data, size, gfp_flags), where the new variable is a
    copy of *data: `data` is the value C's pointer points to (it becomes `.value`)."""
    return _shadow_alloc(_ctx(), obj, id, args, or_get=False)


def klp_shadow_get_or_alloc(obj: Any, id: int, *args: Any) -> Mem | None:
    """The same arguments as klp_shadow_alloc, in the running kernel's form."""
    return _shadow_alloc(_ctx(), obj, id, args, or_get=True)


def klp_shadow_free(obj: Any, id: int, dtor: Any = None) -> None:
    """klp_shadow_free(obj, id, dtor); before 4.17 klp_shadow_free(obj, id)."""
    _ctx().system.livepatch.shadow.klp_shadow_free(obj, id, dtor)


def klp_shadow_free_all(id: int, dtor: Any = None) -> None:
    """klp_shadow_free_all(id, dtor); before 4.17 klp_shadow_free_all(id)."""
    _ctx().system.livepatch.shadow.klp_shadow_free_all(id, dtor)


_INTERNAL = {"ModuleContext", "describe_fault", "check_symbols", "unknown_symbols", "SHADOW_ARGS_BEFORE_4_17",
             "KERN_LEVEL", "annotations", "sys", "Callable", "TYPE_CHECKING", "Any", "cast", "PrintfError",
             "code_location", "PARAM_TYPES",
             "ParamSpec", "KSym", "Module",
             "ModuleState", "Task", "SeqFile", "KlpCallbacks", "KlpFunc", "KlpObject", "KlpPatch", "KlpState",
             "Mem", "vsnprintf", "module_callsite"}
__all__ = [name for name in dir() if name not in _INTERNAL
           and (not name.startswith("_") or name.startswith("__ATTR") or name == "__set_current_state")]
