"""The emulated kernel: everything the livepatch code relies on, in one object.

It knows nothing of livepatch.  Livepatch plugs in where the real kernel
calls it directly: the module loader's coming/going slots and the
exit-to-user/idle work for TIF_PATCH_PENDING.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

from klpfs.kernel.code import CodeRunner
from klpfs.kernel.dyndbg import DynamicDebug
from klpfs.kernel.ftrace import Ftrace
from klpfs.kernel.image import Image, load_image
from klpfs.kernel.kallsyms import Kallsyms, KSym
from klpfs.kernel.kthread import Kthreads
from klpfs.kernel.memory import Heap
from klpfs.kernel.module import ModuleLoader
from klpfs.kernel.oops import FRAME_SIZE, THREAD_SIZE, KernelFault, StackOverflow
from klpfs.kernel.printk import Printk
from klpfs.kernel.seq_file import SeqFile
from klpfs.kernel.sched import Sched, Task, TaskKind
from klpfs.kernel.timers import Timers


log = logging.getLogger(__name__)
MAX_REDIRECTS = 16


@dataclass(frozen=True, slots=True)
class CallResult:
    """Which implementation answered a call to `called`, what it printed into
    the seq_file of a show call, and what it returned."""

    called: KSym
    impl: KSym
    output: str
    ret: object = None


class Kernel:
    """Construct inside trio: time is trio's clock, seconds since this boot.

    `padding`: the bytes of padding before every function (CONFIG_CALL_PADDING).
    """

    def __init__(self, release: str = "4.15.0", image: Image | None = None,
                 module_sig_messages: bool = False, speed: float = 1.0, padding: int = 0):
        self.release = release
        self.image = image or load_image(release)
        self.timers = Timers(speed)
        self.log = Printk(self.timers.now)
        self.dyndbg = DynamicDebug(self.printk, lambda: self.current.pid)
        """pr_debug() callsites; System sets the profile's DdebugFeatures."""
        self.kallsyms = Kallsyms(padding)
        self.kallsyms.add_vmlinux(self.image.functions, self.image.symbols)
        self.ftrace = Ftrace(self._ftrace_location, self.kallsyms.module_alloc)
        self.sched = Sched(self.timers, self.kallsyms, self.resolve, self.image.nr_cpus)
        self.code = CodeRunner(self)
        self.timers.guard = self._timer_callback
        self.modules = ModuleLoader(self.kallsyms, self.printk, module_sig_messages,
                                    lambda fn, *args: self.code.guarded(fn, *args, fallback=-errno.EFAULT),
                                    self.code.start)
        self.modules.notifiers.append(self.dyndbg.module_notify)
        self.sched.task_notifiers.append(self._task_event)
        self.kthreads = Kthreads(self)
        self.heap = Heap()
        self.oops_style = "6.1"
        """klpfs.kernel.oops.OOPS_*: System sets the profile's."""
        self.preemptible = False
        """CONFIG_PREEMPTION: an oops header says PREEMPT."""
        self.package_id = ""
        """LINUX_PACKAGE_ID, printed after the build number in an oops: System sets the profile's."""
        self.die_counter = 0
        """The [#N] of the last oops (__die_header())."""
        self._boot_tasks()
        self.log.caller_id = lambda: self.current.pid

    def printk(self, level: int, text: str) -> None:
        self.log.printk(level, text)

    def now(self) -> float:
        return self.timers.now()

    # -- the call path ---------------------------------------------------------

    def resolve(self, func: KSym, task: Task) -> KSym:
        """The implementation that runs when task calls func.

        A redirected call starts the new function from its entry, so that
        function's own ftrace hook applies too: a patch of a patch chains.
        """
        impl = func
        for _ in range(MAX_REDIRECTS):
            ip = self.ftrace.resolve(impl.addr, task)
            target = self.kallsyms.lookup(ip) if ip != impl.addr else None
            if target is None:
                break
            impl = target
        return impl

    def call(self, func: KSym, task: Task, *args: object) -> CallResult:
        """The engine runs func as task, through any redirection.

        With no arguments this is a show call: the function gets a fresh
        seq_file, and what it prints is the result's output.  A fault of
        module code is an oops, and the call returns -EFAULT.  A kernel fault
        (klpfs.kernel.oops.KernelFault: a stack overflow, a freed patch's
        function) propagates: whoever made the call for a process knows who
        that is, and the oops ends it.
        """
        m = None
        if not args:
            m = SeqFile()
            args = (m, None)
        self._check_stack(func, task)
        impl = self.resolve(func, task)
        ret = self.code.guarded_syscall(self.run_body, impl, task, args, fallback=-errno.EFAULT)
        return CallResult(func, impl, m.text if m is not None else "", ret)

    def invoke(self, func: KSym, task: Task, args: tuple[object, ...]) -> object:
        """A call made by module code: through ftrace, faults propagate to the caller."""
        self._check_stack(func, task)
        return self.run_body(self.resolve(func, task), task, args)

    def _check_stack(self, func: KSym, task: Task) -> None:
        """A call needs a frame on task's kernel stack, FRAME_SIZE bytes of its THREAD_SIZE
        under whatever the task already holds: with none left, the call's first push, at
        func's entry and so before ftrace redirects it, hits the guard page (StackOverflow)."""
        if (len(task.base) + len(task.frames) + 1) * FRAME_SIZE > THREAD_SIZE:
            raise StackOverflow(self, task, func, task.frames)

    def run_body(self, impl: KSym, task: Task, args: tuple[object, ...]) -> object:
        """Execute impl as task: it is on the task's stack while it runs (and sleeps).

        Python's own recursion limit is far above what the emulated stack holds, but
        code that recurses without calling through here (a plain Python helper of a
        module) can still reach it: the RecursionError is that task's stack overflow
        too, in the innermost function that can still build the fault (each level out
        has more room to raise it than the one before).
        """
        code = self.code
        saved = code.current
        depth = len(task.frames)
        code.current = task
        task.frames.append(impl)
        try:
            return impl.body(*args)
        except RecursionError:
            raise StackOverflow(self, task, impl, task.frames[:depth], impl.size // 2) from None
        finally:
            del task.frames[depth:]
            code.current = saved

    @property
    def current(self) -> Task:
        """The task whose code runs now; the console shell when the engine itself acts."""
        return self.code.current or self.console

    def kmalloc(self) -> int:
        """A fresh object address, for module code that allocates structures."""
        return self.heap.alloc_addr()

    @property
    def console(self) -> Task:
        """The task whose context runs reads of emulated /proc files (the shell)."""
        task = self.sched.find(self.image.console)
        if task is None:
            task = next(t for t in self.sched.tasks.values() if t.kind is TaskKind.USER)
        return task

    def spawn_user(self, comm: str, stack: tuple[str, ...]) -> Task:
        """A process the console shell starts (insmod, rmmod), already inside the kernel at `stack`."""
        return self.sched.add(comm, TaskKind.USER, self.kallsyms.find_each(stack), ppid=self.console.pid)

    def _timer_callback(self, fn: Callable[[], None]) -> None:
        """Run a timer's callback (a wake-up, a work, a fake signal's restart of a sleep)
        so that a kernel fault in it is an oops of the task it faulted on, as an oops in
        a timer or a woken task is, and a bug of klpfs's own is logged: either way the
        other timers, and so the emulated kernel, go on."""
        try:
            fn()
        except KernelFault as fault:
            self.code.die(fault, self.current)
        except Exception:
            log.exception("a timer callback failed")

    def _task_event(self, event: str, task: Task) -> None:
        if event == "exit":
            self.code.kill(task)

    # -- boot ----------------------------------------------------------------------

    def _ftrace_location(self, ip: int) -> int:
        sym = self.kallsyms.at(ip)
        return ip if sym is not None and sym.traceable else 0

    def _boot_tasks(self) -> None:
        image = self.image
        for cpu in range(image.nr_cpus):
            self.sched.add_idle(cpu, self.kallsyms.find_each(image.boot_idle_stack if cpu == 0 else image.idle_stack))
        for t in image.tasks:
            self.sched.add(t.comm, TaskKind(t.kind), self.kallsyms.find_each(t.stack), ppid=t.ppid, pid=t.pid,
                           name=t.name)
