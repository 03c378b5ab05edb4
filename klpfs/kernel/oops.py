"""Kernel faults that end in an oops: a page fault on freed memory and a kernel
stack overflow (arch/x86/mm/fault.c page_fault_oops(), arch/x86/kernel/traps.c
handle_stack_overflow(), arch/x86/kernel/dumpstack.c die(), lib/dump_stack.c,
kernel/panic.c).

Kernel code that follows a pointer into memory already freed (a module's data,
after `rmmod -f` took the module away from under something that still points
at it) raises PageFault; a call with no room left on the task's kernel stack
raises StackOverflow.  Whoever ran that code on behalf of a process -- the FUSE
layer, for a read(2) or write(2); the code runner, for a kthread or a work --
calls `die()` with who the process is: the oops is logged as the kernel logs
it, the kernel is tainted D, and the caller ends the process (SIGKILL: a shell
reports 137), as make_task_dead() does.

The header lines follow the kernel of the profile: "BUG: unable to handle
kernel paging request at" before 4.20, "BUG: unable to handle page fault for
address:" with the #PF lines after; a stack overflow's "BUG: stack guard page
was hit" and "kernel stack overflow (double-fault)" until 5.15, "BUG: TASK stack
guard page was hit" and "stack guard page" since; from the 6.12 kernel on, a
header that starts "Oops: ", the UID in the CPU line and the spelled-out taint
list.  Registers, code bytes,
the module list and the page table dump are left out; the call trace names the
emulated functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from klpfs.kernel.memory import hashed_pointer
from klpfs.kernel.module import TAINT_DIE
from klpfs.kernel.printk import KERN_ALERT, KERN_EMERG, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.kallsyms import KSym
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.sched import Task

# Oops styles, by the kernel that prints them.
OOPS_4_16 = "4.16"
OOPS_6_1 = "6.1"
OOPS_6_12 = "6.12"

KERN_DEFAULT = KERN_WARNING
"""printk(KERN_DEFAULT ...) lands at default_message_loglevel, 4."""

TAINT_CHARS = ("PG", "F ", "S ", "R ", "M ", "B ", "U ", "D ", "A ", "W ", "C ", "I ", "O ", "E ", "L ", "K ",
               "X ", "T ", "N ")
"""taint_flags[]: (c_true, c_false) of each bit, in bit order (kernel/panic.c)."""
TAINT_DESC = ("PROPRIETARY_MODULE", "FORCED_MODULE", "CPU_OUT_OF_SPEC", "FORCED_RMMOD", "MACHINE_CHECK",
              "BAD_PAGE", "USER", "DIE", "OVERRIDDEN_ACPI_TABLE", "WARN", "CRAP", "FIRMWARE_WORKAROUND",
              "OOT_MODULE", "UNSIGNED_MODULE", "SOFTLOCKUP", "LIVEPATCH", "AUX", "RANDSTRUCT", "TEST")
"""Their names, as print_tainted_verbose() (6.12) spells them out."""
TAINT_FLAGS_COUNT = {OOPS_4_16: 18, OOPS_6_1: 19, OOPS_6_12: 19}
"""TAINT_TEST (N) came in 5.19."""

THREAD_SIZE = 0x4000
"""x86-64's kernel stack: four pages (THREAD_SIZE_ORDER 2 without KASAN), with an unmapped
guard page below it (CONFIG_VMAP_STACK)."""
FRAME_SIZE = 0x100
"""What klpfs counts one emulated function call to take of that stack.  The real cost
varies by function; 256 bytes is a generous one (return address, saved frame pointer and
registers, locals, and what a traced call's `call __fentry__` pushes), which makes a
stack hold 64 frames: deeper than any real call chain into module code, and reached by
runaway recursion long before Python's own recursion limit, for every kind of module."""
TASK_STACKS = 0xFFFFC90000000000
"""VMALLOC_START: where vmalloc'ed task stacks live; each task's is found from its pid."""

Trace = Sequence["str | KSym"]
"""A call trace, innermost first: the image's functions by name, or any function's symbol."""


def print_tainted(mask: int, count: int) -> str:
    """print_tainted(): "Tainted: " and a character per flag, or "Not tainted"."""
    if not mask:
        return "Not tainted"
    return "Tainted: " + "".join(TAINT_CHARS[i][0 if mask & 1 << i else 1] for i in range(count))


def print_tainted_verbose(mask: int, count: int) -> str:
    """print_tainted_verbose() (6.12): "Tainted: [R]=FORCED_RMMOD, [O]=OOT_MODULE, ..."."""
    return "Tainted: " + ", ".join(f"[{TAINT_CHARS[i][0]}]={TAINT_DESC[i]}" for i in range(count) if mask & 1 << i)


def task_stack(task: Task) -> int:
    """task_stack_page(): the lowest address of task's kernel stack."""
    return TASK_STACKS + task.pid * 2 * THREAD_SIZE


class KernelFault(BaseException):
    """Kernel code faulted at `rip` (a function, with the offset of the faulting
    instruction), called through `trace`, and the process it ran for oopses.

    A BaseException, so that module code's own `except Exception` cannot swallow
    it: C code cannot catch an oops.  `task` is the task whose code faulted when
    it is known; `inner` is how many of the innermost trace entries are the code's
    own, the rest being the way the task came into the kernel.
    """

    task: Task | None = None

    def __init__(self, kernel: Kernel, message: str, address: int, rip: str | KSym, rip_offset: int,
                 trace: Trace, inner: int):
        super().__init__(message)
        self.kernel = kernel
        self.address = address
        self.rip = rip
        self.rip_offset = rip_offset
        self.trace = tuple(trace)
        self.inner = inner

    def reached_from(self, outer: Trace) -> None:
        """The code was called from `outer` (a system call's path, innermost first), not
        from where the task that stood in for the process sat in the kernel."""
        self.trace = (*self.trace[:self.inner], *outer)

    def die(self, pid: int, comm: str, cpu: int = 0, uid: int = 0) -> None:
        """die() as process pid (`comm`) on cpu: the oops in the log, taint D.
        The caller then ends the process."""
        kernel = self.kernel
        style = kernel.oops_style
        printk = kernel.printk
        self._report(printk)
        # __die_header(): the kind of fault, the error code, the oops count, the build.
        kernel.die_counter += 1
        preempt = " PREEMPT" if kernel.preemptible else ""
        oops = "Oops: " if style == OOPS_6_12 else ""
        printk(KERN_DEFAULT, f"{oops}{self._die_str()}: 0000 [#{kernel.die_counter}]{preempt} SMP NOPTI")
        mask = kernel.modules.tainted
        count = TAINT_FLAGS_COUNT[style]
        who = f"CPU: {cpu} UID: {uid} PID: {pid}" if style == OOPS_6_12 else f"CPU: {cpu} PID: {pid}"
        version = "#1"
        printk(KERN_DEFAULT, f"{who} Comm: {comm[:20]} {print_tainted(mask, count)} {kernel.release} {version} "
                             f"{kernel.package_id}")
        if style == OOPS_6_12 and mask:
            printk(KERN_DEFAULT, print_tainted_verbose(mask, count))
        printk(KERN_DEFAULT, f"RIP: 0010:{self._symbol(self.rip, self.rip_offset)}")
        markers = style != OOPS_4_16  # the <TASK> markers came in 5.14
        printk(KERN_DEFAULT, "Call Trace:")
        if markers:
            printk(KERN_DEFAULT, " <TASK>")
        for entry in self.trace:
            printk(KERN_DEFAULT, f" {self._symbol(entry)}")
        if markers:
            printk(KERN_DEFAULT, " </TASK>")
        self._summary(printk)
        kernel.modules.add_taint(TAINT_DIE)
        # print_oops_end_marker(): a random oops id until 5.19, 0 since.
        oops_id = 0 if markers else (self.address * 0x9E3779B97F4A7C15 + kernel.die_counter) & (1 << 64) - 1
        printk(KERN_WARNING, f"---[ end trace {oops_id:016x} ]---")

    def _report(self, printk: Callable[[int, str], None]) -> None:
        """The lines the fault's handler prints before calling die(): none of its own."""

    def _die_str(self) -> str:
        """The `str` the handler passes to die(), which the header starts with."""
        return "Oops"

    def _summary(self, printk: Callable[[int, str], None]) -> None:
        """What the handler prints between die()'s body and oops_end(): nothing more."""

    def _symbol(self, entry: str | KSym, offset: int | None = None) -> str:
        """%pS of an instruction in a function: `offset` into it, by default its return
        address (KSym.return_offset); a module's function is followed by the module's name."""
        if isinstance(entry, str):  # a function of the image, by name
            sym, name, module = self.kernel.kallsyms.find(entry), entry, ""
        else:
            sym, name, module = entry, entry.name, f" [{entry.module}]" if entry.module else ""
        size = sym.size if sym is not None else 0
        ret = sym.return_offset if sym is not None else 0
        return f"{name}+{ret if offset is None else offset:#x}/{size:#x}{module}"


class PageFault(KernelFault):
    """Kernel code read `address`, which is no longer mapped, at `rip` (a function of
    the image, with the offset of the faulting instruction), called through `trace`
    (the image's functions, innermost first, the first the code's own)."""

    def __init__(self, kernel: Kernel, address: int, rip: str, rip_offset: int, trace: Sequence[str]):
        super().__init__(kernel, f"unable to handle page fault for address: {address:016x}", address, rip,
                         rip_offset, trace, 1)

    def _report(self, printk: Callable[[int, str], None]) -> None:
        """page_fault_oops(): what was accessed, and how."""
        addr = f"{self.address:016x}"
        if self.kernel.oops_style == OOPS_4_16:
            printk(KERN_ALERT, f"BUG: unable to handle kernel paging request at {addr}")
            printk(KERN_ALERT, f"IP: {self._symbol(self.rip, self.rip_offset)}")
        else:
            printk(KERN_ALERT, f"BUG: unable to handle page fault for address: {addr}")
            printk(KERN_ALERT, "#PF: supervisor read access in kernel mode")
            printk(KERN_ALERT, "#PF: error_code(0x0000) - not-present page")

    def _summary(self, printk: Callable[[int, str], None]) -> None:
        """page_fault_oops(): the faulting address again, "in case the oops scrolled away"."""
        printk(KERN_DEFAULT, f"CR2: {self.address:016x}")


class StackOverflow(KernelFault):
    """`task` called `func` with no room left on its kernel stack: the call's first push
    (the `call __fentry__` or `push %rbp` at the function's entry) lands in the guard
    page below the stack, and the CPU, unable to deliver that page fault on the same
    stack, raises a double fault.  exc_double_fault() sees the guard page in CR2 and
    calls handle_stack_overflow(): "BUG: TASK stack guard page was hit at ...", then
    die("stack guard page") (until 5.15, do_double_fault()'s "BUG: stack guard page
    was hit at ..." and die("kernel stack overflow (double-fault)")).  The trace is the
    task's stack, innermost first: `frames` (the emulated calls, outermost first) over
    the task's way into the kernel.  `rip_offset` is 0 unless the push was not the
    function's first (code running inside it, a helper inlined into it, ran out).

    A new function that calls the function it replaces recurses this way: each call
    enters the old function's ftrace call site, and klp_ftrace_handler() sends it to
    the new function again (the handler's ftrace_test_recursion_trylock() is released
    before the new function runs, so it does not stop this).

    Where klpfs departs from the kernel: the kernel then panics.  The double fault
    handler runs as an NMI (irqentry_nmi_enter(); 4.x's ist_enter() alike), so
    oops_end() finds in_interrupt() true and calls panic("Fatal exception in
    interrupt"): the machine stops.  klpfs ends only the task, as oops_end() does
    outside interrupt context (make_task_dead(): the reading process is killed, a
    kthread or kworker exits; an engine operation that ran the code, a callback in
    the middle of enabling a patch, completes), logs the oops, taints D and goes on
    serving.  A panic would take the whole mount, and every process and test using
    it, down for one module's bug; an emulator that printed "Kernel panic - not
    syncing" and carried on would lie about it.  So the panic line, and what the
    kernel prints around it (the register summary, "Kernel Offset", the end-of-panic
    marker), are not printed.
    The 5.1 profile oopses in 6.1's words, as it does for page faults.
    """

    def __init__(self, kernel: Kernel, task: Task, func: KSym, frames: Sequence[KSym], rip_offset: int = 0):
        self.stack = task_stack(task)
        super().__init__(kernel, f"kernel stack overflow calling {func.name}", self.stack - 8, func, rip_offset,
                         (*reversed(frames), *reversed(task.base)), len(frames))
        self.task = task

    def _report(self, printk: Callable[[int, str], None]) -> None:
        """handle_stack_overflow(): where the push landed, and the stack's bounds (%p, hashed)."""
        begin = self.stack
        if self.kernel.oops_style == OOPS_4_16:
            printk(KERN_EMERG, f"BUG: stack guard page was hit at {hashed_pointer(self.address)} "
                               f"(stack is {hashed_pointer(begin)}..{hashed_pointer(begin + THREAD_SIZE - 1)})")
        else:
            printk(KERN_EMERG, f"BUG: TASK stack guard page was hit at {hashed_pointer(self.address)} "
                               f"(stack is {hashed_pointer(begin)}..{hashed_pointer(begin + THREAD_SIZE)})")

    def _die_str(self) -> str:
        return "kernel stack overflow (double-fault)" if self.kernel.oops_style == OOPS_4_16 else "stack guard page"
