"""Module code as data: the steps a module's functions, callbacks, init and
exit perform, and the interpreter that runs them in the emulated kernel.

A step list is what a module file writes in place of C.  It is deliberately
small: print a line, produce output, sleep inside the function, allocate a
structure with a lifetime, call another function (through ftrace, so a
patch can replace it), walk expired structures, and use shadow variables.
Strings are format templates over the module's parameters and a few names
the running code knows ({__func__}, {obj}, {data}, {target}).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Union

from klpfs.kernel import wait
from klpfs.kernel.memory import addr_of, hashed_pointer
from klpfs.kernel.printk import KERN_INFO
from klpfs.kernel.sched import TASK_UNINTERRUPTIBLE
from klpfs.kernel.seq_file import SeqFile
from klpfs.kernel.timers import HZ, seconds_to_jiffies, ticks
from klpfs.livepatch.state import klp_get_prev_state

if TYPE_CHECKING:
    from klpfs.kernel.kallsyms import Body
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.module import Module
    from klpfs.livepatch.core import Livepatch
    from klpfs.livepatch.shadow import KlpShadow

Value = Union[int, float, str]
"""A number, or a "{param}" reference to one of the module's parameters."""

CONTEXT_NAMES = ("__func__", "obj", "data", "target", "jiffies", "expires", "prev_version")
"""Names a template may use besides the module's parameters."""

INITIAL_JIFFIES = (1 << 32) - 300 * HZ
"""jiffies start five minutes before wrapping, as in the kernel."""


def jiffies(seconds: float) -> int:
    """The tick count at `seconds` since boot."""
    return INITIAL_JIFFIES + ticks(seconds)


@dataclass(frozen=True)
class Log:
    fmt: str
    level: int = KERN_INFO


@dataclass(frozen=True)
class Output:
    text: str


@dataclass(frozen=True)
class Sleep:
    seconds: Value | None
    """None: until woken (`klpfs task wake`)."""
    state: str = TASK_UNINTERRUPTIBLE


@dataclass(frozen=True)
class New:
    """Allocate a structure, keep it on a named list until it expires, make it {obj}."""
    list: str
    expires: Value


@dataclass(frozen=True)
class Call:
    func: str


@dataclass(frozen=True)
class ForEach:
    """Take structures off a list (only the expired ones, or all) and run steps on each as {obj}."""
    list: str
    expired_only: bool
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class ShadowAlloc:
    id: int
    or_get: bool = False
    """klp_shadow_get_or_alloc rather than klp_shadow_alloc."""
    ctor_ret: Value | None = None
    """With a constructor (4.17 on) that returns this; non-zero fails the allocation."""


@dataclass(frozen=True)
class ShadowFree:
    id: int
    all: bool = False
    dtor_log: str | None = None


@dataclass(frozen=True)
class IfShadow:
    """Branch on klp_shadow_get(obj, id); in `then`, {data} is the variable's data."""
    id: int
    then: tuple[Step, ...] = ()
    otherwise: tuple[Step, ...] = ()


@dataclass(frozen=True)
class IfPrevState:
    """Branch on klp_get_prev_state(id) (5.5 on); in `then`, {prev_version} is its version."""
    id: int
    then: tuple[Step, ...] = ()
    otherwise: tuple[Step, ...] = ()


Step = Union[Log, Output, Sleep, New, Call, ForEach, ShadowAlloc, ShadowFree, IfShadow, IfPrevState]


def walk(steps: tuple[Step, ...]) -> Iterator[Step]:
    """Every step, nested ones included."""
    for step in steps:
        yield step
        if isinstance(step, ForEach):
            yield from walk(step.steps)
        elif isinstance(step, (IfShadow, IfPrevState)):
            yield from walk(step.then)
            yield from walk(step.otherwise)


@dataclass
class Frame:
    """One running piece of module code."""

    func: str
    obj: object = None
    target: str = ""
    data: object = None
    prev_version: str = ""


@dataclass
class Structures:
    """What module code allocates: structures with expiry times on named lists
    (stand-ins for list_heads).  Shared by every module, as kernel memory is,
    so a patch's replacement function can put a structure on the target's list."""

    expires: dict[int, float] = field(default_factory=dict)
    lists: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ModuleCode:
    """A loaded module's code: runs its step lists with its parameters, as
    the task that calls it, with the same sleeping primitives as Python modules."""

    kernel: Kernel
    livepatch: Livepatch
    structures: Structures
    module: Module

    @property
    def shadow(self) -> KlpShadow:
        return self.livepatch.shadow

    def value(self, v: Value) -> float:
        if isinstance(v, str):
            return float(self.module.params[v.strip("{}")])  # type: ignore[arg-type]
        return float(v)

    def seconds(self, v: Value) -> float:
        """A time: the file's own were checked when it was parsed, a parameter's when the
        module was loaded; one written negative through sysfs since then waits no time."""
        return max(0.0, self.value(v))

    def format(self, fmt: str, frame: Frame) -> str:
        names: dict[str, object] = dict(self.module.params)
        obj = addr_of(frame.obj) if frame.obj is not None else 0
        expires = self.structures.expires.get(obj, 0.0)
        data = frame.data
        names.update(__func__=frame.func, target=frame.target, prev_version=frame.prev_version,
                     obj=hashed_pointer(obj),
                     data=hashed_pointer(data) if isinstance(data, int) else data,
                     jiffies=f"{jiffies(self.kernel.now()):x}", expires=f"{jiffies(expires):x}")
        return fmt.format_map(names)

    def body(self, name: str, steps: tuple[Step, ...]) -> Body:
        """The body of function `name`: run its steps as the calling task.

        Its first argument is the object it works on ({obj}), or the
        seq_file of a show call, which gets the text its steps output."""
        def run(*args: object) -> str:
            first = args[0] if args else None
            m = first if isinstance(first, SeqFile) else None
            text = self.run(steps, Frame(name, obj=None if m is not None else first))
            if m is not None:
                m.puts(text)
            return text
        return run

    def run(self, steps: tuple[Step, ...], frame: Frame) -> str:
        """Run the steps; a Sleep sleeps the calling task inside the function."""
        out: list[str] = []
        kernel = self.kernel
        for step in steps:
            if isinstance(step, Log):
                kernel.printk(step.level, f"{self.module.name}: {self.format(step.fmt, frame)}")
            elif isinstance(step, Output):
                out.append(self.format(step.text, frame))
            elif isinstance(step, Sleep):
                self._sleep(step)
            elif isinstance(step, New):
                frame.obj = kernel.kmalloc()
                self.structures.expires[frame.obj] = kernel.now() + self.seconds(step.expires)
                self.structures.lists.setdefault(step.list, []).append(frame.obj)
            elif isinstance(step, Call):
                out.append(self.call(step.func, frame))
            elif isinstance(step, ForEach):
                out.append(self._for_each(step, frame))
            elif isinstance(step, ShadowAlloc):
                self._shadow_alloc(step, frame)
            elif isinstance(step, ShadowFree):
                self._shadow_free(step, frame)
            elif isinstance(step, IfShadow):
                cell = self.shadow.klp_shadow_get(frame.obj or 0, step.id)
                inner = replace(frame, data=None if cell is None else cell[0])
                out.append(self.run(step.then if cell is not None else step.otherwise, inner))
            elif isinstance(step, IfPrevState):
                state = klp_get_prev_state(self.livepatch, step.id)
                inner = replace(frame, prev_version="" if state is None else str(state.version))
                out.append(self.run(step.then if state is not None else step.otherwise, inner))
        return "".join(out)

    def _sleep(self, step: Sleep) -> None:
        """A timed sleep is msleep() (an uninterruptible one lasts its whole time) or
        schedule_timeout_interruptible() of whole jiffies; "forever" is
        schedule_timeout(MAX_SCHEDULE_TIMEOUT)."""
        kernel = self.kernel
        if step.seconds is None:
            wait.schedule_timeout(kernel, step.state, None)
        elif step.state == TASK_UNINTERRUPTIBLE:
            wait.msleep(kernel, int(self.seconds(step.seconds) * 1000))
        else:
            wait.schedule_timeout(kernel, step.state, seconds_to_jiffies(self.seconds(step.seconds)) / HZ)

    def _for_each(self, step: ForEach, frame: Frame) -> str:
        now = self.kernel.now()
        expires = self.structures.expires
        items = self.structures.lists.get(step.list, [])
        taken = [obj for obj in items if not step.expired_only or expires[obj] < now]
        self.structures.lists[step.list] = [obj for obj in items if obj not in taken]
        out = [self.run(step.steps, Frame(frame.func, obj)) for obj in taken]
        for obj in taken:
            expires.pop(obj, None)
        return "".join(out)

    def call(self, name: str, frame: Frame) -> str:
        """Call a function by name through the ftrace path, as the running task:
        this module's own first.  What it outputs becomes part of this output."""
        kernel = self.kernel
        sym = next((s for s in self.module.symbols if s.name == name), None) or kernel.kallsyms.find_any(name)
        if sym is None:
            return ""
        ret = kernel.invoke(sym, kernel.current, (frame.obj,))
        return ret if isinstance(ret, str) else ""

    def _shadow_alloc(self, step: ShadowAlloc, frame: Frame) -> None:
        alloc = self.shadow.klp_shadow_get_or_alloc if step.or_get else self.shadow.klp_shadow_alloc
        ctor_ret = step.ctor_ret
        if ctor_ret is None:
            alloc(frame.obj or 0, step.id, self.kernel.kmalloc())
            return

        def ctor(obj: object, cell: list[object], ctor_data: object) -> int:
            cell[0] = ctor_data
            return int(self.value(ctor_ret))
        alloc(frame.obj or 0, step.id, None, ctor, self.kernel.kmalloc())

    def _shadow_free(self, step: ShadowFree, frame: Frame) -> None:
        dtor: Callable[[object, object], None] | None = None
        if step.dtor_log is not None:
            fmt = step.dtor_log

            def log_free(obj: object, data: object) -> None:
                line = self.format(fmt, Frame(frame.func, obj=obj, data=data))
                self.kernel.printk(KERN_INFO, f"{self.module.name}: {line}")
            dtor = log_free
        if step.all:
            self.shadow.klp_shadow_free_all(step.id, dtor)
        else:
            self.shadow.klp_shadow_free(frame.obj or 0, step.id, dtor)
