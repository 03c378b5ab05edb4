"""Module code running as emulated tasks.

A kernel task has its own stack: code can sleep deep inside nested calls
(`msleep()` in a loop in a work function) and carry on where it stopped when
it wakes.  Here each task that runs module code gets a greenlet, which is
exactly that: a stack of its own, switched to and from on the one trio
thread.  Engine operations stay synchronous; a sleep switches back to
whoever resumed the task (the timer loop, a control request), and the timer
that ends the sleep switches into the task again.

Three rules keep the daemon safe from the code it runs:

- **A budget.**  Module code may run at most `LINE_BUDGET` of its own
  source lines between two sleeps.  Past that the code is stopped where it
  is and reported as a soft lockup, as the kernel's watchdog reports a CPU
  that never schedules.  Only lines of module sources count (`sys.settrace`
  is on only while module code runs), so engine work done on the code's
  behalf is free.
- **Contained faults.**  An exception escaping module code is an oops: it
  is logged with the function, the module and the source line, and never
  reaches the engine code that called the module; a task of its own (a
  kthread, a kworker, insmod) whose code faults exits, as make_task_dead()
  ends a task after its oops.  Code that was not
  started as a task of its own (callbacks, show functions, parameter
  setters run inside an engine operation) may not sleep: that is the
  kernel's "sleeping function called from invalid context".
- **A stack.**  Every call through the emulated call path takes a frame of
  the task's kernel stack (Kernel.call), and a task that runs out of it
  faults as the kernel does on its guard page (klpfs.kernel.oops.StackOverflow),
  long before Python's own recursion limit.  Such a kernel fault is an oops
  of the task whose stack ran out; code run inside a process's system call
  (a read(2) of a /proc file) leaves it to whoever made that call, who knows
  which process it was and kills it.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import greenlet
import trio

from klpfs.kernel.module import TAINT_DIE, TAINT_SOFTLOCKUP
from klpfs.kernel.oops import KernelFault
from klpfs.kernel.printk import KERN_ALERT, KERN_ERR, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.sched import Task

LINE_BUDGET = 2_000_000
"""Module source lines run between two sleeps before the code counts as stuck."""


class CodeFault(BaseException):
    """Module code was stopped by the kernel (budget, invalid sleep).

    A BaseException so that module code's own `except Exception` cannot
    swallow it, as C code cannot catch an oops.
    """

    def __init__(self, what: str, where: str):
        super().__init__(what)
        self.what = what
        self.where = where


class SoftLockup(CodeFault):
    pass


class InvalidSleep(CodeFault):
    pass


class TaskKilled(BaseException):
    """Thrown into a task's code when the task is made to exit (do_exit)."""


def code_location(tb_or_frame: Any, sources: set[str]) -> str:
    """`file:line in func` of the innermost module-source frame of a traceback or frame stack."""
    frames = (traceback.extract_tb(tb_or_frame) if not isinstance(tb_or_frame, FrameType)
              else traceback.extract_stack(tb_or_frame))
    for fs in reversed(frames):
        if fs.filename in sources:
            return f"{fs.filename}:{fs.lineno} in {fs.name}"
    return ""


class Run:
    """One piece of code started as a task: done when it returns or faults."""

    __slots__ = ("task", "glet", "done", "result", "fault", "_callbacks", "_event")

    def __init__(self, task: Task, glet: greenlet.greenlet):
        self.task = task
        self.glet = glet
        self.done = False
        self.result: Any = None
        self.fault: str | None = None
        """Set when the code oopsed or locked up: what happened and where."""
        self._callbacks: list[Callable[[Run], None]] = []
        self._event: trio.Event | None = None

    def add_done_callback(self, fn: Callable[[Run], None]) -> None:
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    async def wait(self) -> Any:
        """Until the code has finished (a control request awaiting insmod's init, say)."""
        if not self.done:
            self._event = self._event or trio.Event()
            await self._event.wait()
        return self.result

    def _finish(self) -> None:
        self.done = True
        if self._event is not None:
            self._event.set()
        for fn in self._callbacks:
            fn(self)
        self._callbacks.clear()


class CodeRunner:
    """Starts, suspends and resumes module code as tasks; keeps `current` right."""

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self.sources: set[str] = set()
        """Filenames of module sources: only their lines count against the budget."""
        self.current: Task | None = None
        """The task whose code is executing (None: the engine's own context)."""
        self._runs: dict[int, Run] = {}
        """Task pid -> the code it is running in a greenlet of its own."""
        self._main = greenlet.getcurrent()
        self._lines = 0
        self._tracing = 0
        self._tracer = False
        """sys.settrace() has the budget's tracer on."""
        self._atomic = 0
        """Engine operations under way that called into module code: nobody may sleep."""
        self.next_state: dict[int, str] = {}
        """set_current_state() of a task, for its next schedule()."""
        self._ready: deque[Callable[[], None]] = deque()
        """Switches into code that was started or woken by other code, to run soon."""
        self._draining = False

    # -- starting and switching ------------------------------------------------

    def start(self, task: Task, fn: Callable[..., Any], *args: Any) -> Run:
        """Run fn(*args) as task, on a stack of its own, until it returns or sleeps.
        Code that faults ends the task (a kthread, a kworker), as make_task_dead()
        ends a task after its oops."""
        def body(*_: Any) -> None:
            try:
                run.result = fn(*args)
            except TaskKilled:
                pass
            except KernelFault as fault:
                run.fault = self.die(fault, task)
            except BaseException as e:  # noqa: BLE001 - every fault of module code is contained here
                run.fault = self.oops(task, e)
            finally:
                self._runs.pop(task.pid, None)
                task.frames.clear()
            if run.fault is not None and not task.exited:
                self._kernel.sched.exit(task)
        run = Run(task, greenlet.greenlet(body, parent=self._main))
        self._runs[task.pid] = run
        self._run_soon(lambda: self._switch(run))
        return run

    def running(self, task: Task) -> Run | None:
        """The code task is running on its own stack, if any."""
        return self._runs.get(task.pid)

    def resume(self, task: Task, value: Any = None) -> None:
        """Switch into task's code where it slept; back here when it sleeps again or ends."""
        run = self._runs.get(task.pid)
        if run is None:
            return
        self._run_soon(lambda: self._switch(run, value))

    def _run_soon(self, switch: Callable[[], None]) -> None:
        """Switch now from the engine's context; from other code (kthread_run,
        complete()), as soon as that code sleeps or ends, as a woken task runs
        when its CPU gets to it.  Either way before the engine operation that
        started it all returns, so the order of events is deterministic."""
        self._ready.append(switch)
        self._drain()

    def _drain(self) -> None:
        """Run the ready code, unless an engine operation that called module code is
        still under way (it is atomic: it drains when it ends) or we are draining."""
        if greenlet.getcurrent() is not self._main or self._draining or self._atomic:
            return
        self._draining = True
        try:
            while self._ready:
                self._ready.popleft()()
        finally:
            self._draining = False

    def kill(self, task: Task) -> None:
        """do_exit for a task whose code is suspended: unwind it (finally blocks run)."""
        run = self._runs.get(task.pid)
        if run is not None and greenlet.getcurrent() is self._main:
            self._switch(run, throw=TaskKilled())

    def _switch(self, run: Run, value: Any = None, throw: BaseException | None = None) -> None:
        if run.glet.dead:
            return
        saved = self.current
        self.current = run.task
        self._lines = 0
        self._trace_on()
        try:
            if throw is not None:
                run.glet.throw(throw)
            else:
                run.glet.switch(value)
        finally:
            self._trace_off()
            self.current = saved
        if run.glet.dead and not run.done:
            run._finish()

    def check_sleep(self) -> None:
        """Raise InvalidSleep unless the current code runs on a task's own stack outside any engine operation."""
        task = self.current
        run = self._runs.get(task.pid) if task is not None else None
        if self._atomic or run is None or run.glet is not greenlet.getcurrent():
            raise InvalidSleep("BUG: sleeping function called from invalid context",
                               code_location(sys._getframe(2), self.sources))

    def block(self) -> Any:
        """Called by a sleeping primitive inside task code: give the CPU back.

        Returns what the waker passed to resume().  Outside a task's own
        stack there is nobody to come back to: that is an invalid sleep.
        """
        self.check_sleep()
        value = self._main.switch()
        self._lines = 0
        return value

    # -- calls from the engine into module code ---------------------------------------

    def guarded(self, fn: Callable[..., Any], *args: Any, fallback: Any = None) -> Any:
        """Call module code from engine code: a fault is an oops and returns `fallback`.

        A kernel fault too: the engine operation that called the code (a callback
        in the middle of enabling a patch, a show) must complete, so the task that
        ran into it is named by the oops but lives on."""
        try:
            return self.guarded_syscall(fn, *args, fallback=fallback)
        except KernelFault as fault:
            self.die(fault, self._kernel.current)
            return fallback

    def guarded_syscall(self, fn: Callable[..., Any], *args: Any, fallback: Any = None) -> Any:
        """Call module code inside a process's system call (a read(2) of a /proc file,
        a control request): a fault of the code is an oops and returns `fallback`, but
        a kernel fault propagates, for the caller to end the process it stands for."""
        try:
            return self.traced(fn, *args)
        except (TaskKilled, greenlet.GreenletExit, KernelFault):
            raise
        except BaseException as e:  # noqa: BLE001 - module faults never reach the engine
            self.oops(self.current, e)
            return fallback

    def traced(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call module code inside an engine operation: counted against the
        budget, not allowed to sleep; its exceptions propagate."""
        if self._tracing == 0:
            self._lines = 0
        self._trace_on()
        self._atomic += 1
        try:
            return fn(*args)
        finally:
            self._atomic -= 1
            self._trace_off()
            self._drain()

    # -- faults -----------------------------------------------------------------------

    def die(self, fault: KernelFault, task: Task) -> str:
        """The oops of a kernel fault in code that `task` ran, named after the task the
        fault happened on when it is known (the one that overflowed its stack); its text."""
        victim = fault.task or task
        fault.die(victim.pid, victim.comm, victim.cpu)
        where = code_location(fault.__traceback__, self.sources)
        return f"{fault} at {where}" if where else str(fault)

    def oops(self, task: Task | None, e: BaseException) -> str:
        """Log a fault of module code the way the kernel logs an oops or a lockup; return its text."""
        kernel = self._kernel
        comm = f"{task.comm}:{task.pid}" if task is not None else "klpfs:0"
        if isinstance(e, CodeFault):
            where = e.where
            if isinstance(e, SoftLockup):
                kernel.printk(KERN_ALERT, f"watchdog: BUG: soft lockup - CPU#{task.cpu if task else 0} "
                                          f"stuck in module code [{comm}]")
                kernel.modules.add_taint(TAINT_SOFTLOCKUP)
            else:
                kernel.printk(KERN_ERR, f"{e.what} [{comm}]")
                kernel.modules.add_taint(TAINT_DIE)
            what = e.what
        else:
            where = code_location(e.__traceback__, self.sources)
            what = f"{type(e).__name__}: {e}"
            kernel.printk(KERN_ALERT, f"BUG: module code raised {what} [{comm}]")
            kernel.modules.add_taint(TAINT_DIE)
        if where:
            kernel.printk(KERN_WARNING, f"  at {where}")
        return f"{what} at {where}" if where else what

    # -- the budget -------------------------------------------------------------------

    @contextlib.contextmanager
    def untraced(self) -> Iterator[None]:
        """Engine code that runs no module code, however many tasks it walks (a
        transition pass): the budget counts only module lines, so its tracer, on
        when module code started the engine operation (a patch module's init
        enabling its patch), is off until the walk ends instead of being called
        at every function the walk calls."""
        if not self._tracer:
            yield
            return
        sys.settrace(None)
        try:
            yield
        finally:
            sys.settrace(self._trace_call)

    def _trace_on(self) -> None:
        """Count module lines from here.  Only module sources have lines to count: until
        one is loaded the tracer, which slows every call made under it, stays off."""
        if not self._tracer and self.sources:
            sys.settrace(self._trace_call)
            self._tracer = True
        self._tracing += 1

    def _trace_off(self) -> None:
        self._tracing -= 1
        if self._tracing == 0 and self._tracer:
            sys.settrace(None)
            self._tracer = False

    def _trace_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename in self.sources:
            return self._trace_line
        return None

    def _trace_line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self._lines += 1
            if self._lines > LINE_BUDGET:
                self._lines = 0
                raise SoftLockup(f"ran {LINE_BUDGET:,} lines without sleeping",
                                 f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        return self._trace_line
