"""A kernel page fault on freed memory, and the oops it ends in (arch/x86/mm/fault.c
page_fault_oops(), arch/x86/kernel/dumpstack.c, lib/dump_stack.c, kernel/panic.c).

Kernel code that follows a pointer into memory already freed (a module's data,
after `rmmod -f` took the module away from under something that still points
at it) raises PageFault.  Whoever ran that code on behalf of a process -- the
FUSE layer, for a read(2) or write(2) -- calls `die()` with who the process
is: the oops is logged as the kernel logs it, the kernel is tainted D, and the
caller kills the process (SIGKILL: a shell reports 137), as make_task_dead()
does.

The header lines follow the kernel of the profile: "BUG: unable to handle
kernel paging request at" before 4.20, "BUG: unable to handle page fault for
address:" with the #PF lines after; from the 6.12 kernel on, "Oops: Oops:",
the UID in the CPU line and the spelled-out taint list.  Registers, code bytes
and the page table dump are left out; the call trace names the emulated
image's functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from klpfs.kernel.module import TAINT_DIE
from klpfs.kernel.printk import KERN_ALERT, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel

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


def print_tainted(mask: int, count: int) -> str:
    """print_tainted(): "Tainted: " and a character per flag, or "Not tainted"."""
    if not mask:
        return "Not tainted"
    return "Tainted: " + "".join(TAINT_CHARS[i][0 if mask & 1 << i else 1] for i in range(count))


def print_tainted_verbose(mask: int, count: int) -> str:
    """print_tainted_verbose() (6.12): "Tainted: [R]=FORCED_RMMOD, [O]=OOT_MODULE, ..."."""
    return "Tainted: " + ", ".join(f"[{TAINT_CHARS[i][0]}]={TAINT_DESC[i]}" for i in range(count) if mask & 1 << i)


class PageFault(Exception):
    """Kernel code read `address`, which is no longer mapped, at `rip` (a function of
    the image, with the offset of the faulting instruction), called through `trace`
    (the image's functions, innermost first)."""

    def __init__(self, kernel: Kernel, address: int, rip: str, rip_offset: int, trace: Sequence[str]):
        super().__init__(f"unable to handle page fault for address: {address:016x}")
        self.kernel = kernel
        self.address = address
        self.rip = rip
        self.rip_offset = rip_offset
        self.trace = tuple(trace)

    def die(self, pid: int, comm: str, cpu: int = 0, uid: int = 0) -> None:
        """page_fault_oops() as process pid (`comm`) on cpu: the oops in the log, taint D.
        The caller then kills the process."""
        kernel = self.kernel
        style = kernel.oops_style
        printk = kernel.printk
        addr = f"{self.address:016x}"
        if style == OOPS_4_16:
            printk(KERN_ALERT, f"BUG: unable to handle kernel paging request at {addr}")
            printk(KERN_ALERT, f"IP: {self._symbol(self.rip, self.rip_offset)}")
        else:
            printk(KERN_ALERT, f"BUG: unable to handle page fault for address: {addr}")
            printk(KERN_ALERT, "#PF: supervisor read access in kernel mode")
            printk(KERN_ALERT, "#PF: error_code(0x0000) - not-present page")
        kernel.die_counter += 1
        preempt = " PREEMPT" if kernel.preemptible else ""
        oops = "Oops: Oops" if style == OOPS_6_12 else "Oops"
        printk(KERN_DEFAULT, f"{oops}: 0000 [#{kernel.die_counter}]{preempt} SMP NOPTI")
        mask = kernel.modules.tainted
        count = TAINT_FLAGS_COUNT[style]
        who = f"CPU: {cpu} UID: {uid} PID: {pid}" if style == OOPS_6_12 else f"CPU: {cpu} PID: {pid}"
        version = "#1"
        printk(KERN_DEFAULT, f"{who} Comm: {comm[:20]} {print_tainted(mask, count)} {kernel.release} {version} ")
        if style == OOPS_6_12 and mask:
            printk(KERN_DEFAULT, print_tainted_verbose(mask, count))
        printk(KERN_DEFAULT, f"RIP: 0010:{self._symbol(self.rip, self.rip_offset)}")
        markers = style != OOPS_4_16  # the <TASK> markers came in 5.14
        printk(KERN_DEFAULT, "Call Trace:")
        if markers:
            printk(KERN_DEFAULT, " <TASK>")
        for name in self.trace:
            sym = kernel.kallsyms.find(name)
            printk(KERN_DEFAULT, f" {self._symbol(name, sym.size // 2 if sym is not None else 0)}")
        if markers:
            printk(KERN_DEFAULT, " </TASK>")
        printk(KERN_DEFAULT, f"CR2: {addr}")
        kernel.modules.add_taint(TAINT_DIE)
        # print_oops_end_marker(): a random oops id until 5.19, 0 since.
        oops_id = 0 if markers else (self.address * 0x9E3779B97F4A7C15 + kernel.die_counter) & (1 << 64) - 1
        printk(KERN_WARNING, f"---[ end trace {oops_id:016x} ]---")

    def _symbol(self, name: str, offset: int) -> str:
        """%pS of an instruction in the image's function `name`."""
        sym = self.kernel.kallsyms.find(name)
        size = sym.size if sym is not None else 0
        return f"{name}+{offset:#x}/{size:#x}"
