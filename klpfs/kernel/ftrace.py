"""ftrace-style function entry hooks: the emulated call path consults them.

A registered ops with IPMODIFY may send the call elsewhere by returning a new
address from its handler, which is how klp_ftrace_handler redirects a
patched function.  Only one IPMODIFY user may own an address; a second one
is refused with -EBUSY, as the real ftrace does.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klpfs.kernel.kallsyms import KSym

FTRACE_OPS_FL_IPMODIFY = 1 << 0
FTRACE_OPS_FL_PERMANENT = 1 << 1
"""The ops must keep working: ftrace_enabled may not be turned off under it (5.5 on)."""
FTRACE_OPS_FL_SAVE_REGS = 1 << 2
"""The handler gets the full pt_regs: the record shows `R` in enabled_functions."""

# What t_show() prints after a record's count in enabled_functions (kernel/trace/ftrace.c),
# by the kernel's generation: the R and I flags (4.x), D for direct calls (5.5), then
# O for call ops and M for a function ever modified by IPMODIFY or direct (6.4).
SHOW_RI = "RI"
SHOW_RID = "RID"
SHOW_RIDOM = "RIDOM"
TRAMPOLINE_SIZE = 0x1000
"""A page for each ops' trampoline (create_trampoline() on x86 takes less, module_alloc() a page)."""

Handler = Callable[[int, object], int | None]
"""handler(ip, task) -> address to run instead, or None to run ip itself."""


class FtraceOps:
    __slots__ = ("func", "flags", "filter", "registered", "func_addr", "trampoline")

    def __init__(self, func: Handler, flags: int = 0, func_addr: int = 0):
        self.func = func
        self.flags = flags
        self.filter: set[int] = set()
        self.registered = False
        self.func_addr = func_addr
        """The address of the kernel function the handler stands for (ops->func)."""
        self.trampoline = 0
        """Where its trampoline was allocated when first registered (arch_ftrace_update_trampoline)."""


class Ftrace:
    def __init__(self, location: Callable[[int], int], alloc_trampoline: Callable[[int], int] | None = None):
        self._location = location
        self._alloc_trampoline = alloc_trampoline
        self.hooks: dict[int, FtraceOps] = {}
        self.enabled = True
        """The kernel.ftrace_enabled sysctl: off, no hook runs."""

    def set_enabled(self, enabled: bool) -> int:
        """ftrace_enable_sysctl(): turning it off under a permanent ops is -EBUSY."""
        if not enabled and any(ops.flags & FTRACE_OPS_FL_PERMANENT for ops in self.hooks.values()):
            return -errno.EBUSY
        self.enabled = enabled
        return 0

    def ftrace_location(self, ip: int) -> int:
        """The patchable address of the function at ip, or 0 if it has none."""
        return self._location(ip)

    def set_filter_ip(self, ops: FtraceOps, ip: int, remove: bool = False) -> int:
        if not self._location(ip):
            return -errno.EINVAL
        if remove:
            ops.filter.discard(ip)
        else:
            ops.filter.add(ip)
        return 0

    def register_ftrace_function(self, ops: FtraceOps) -> int:
        if ops.flags & FTRACE_OPS_FL_PERMANENT and not self.enabled:
            return -errno.EBUSY
        if ops.flags & FTRACE_OPS_FL_IPMODIFY and any(ip in self.hooks for ip in ops.filter):
            return -errno.EBUSY
        for ip in ops.filter:
            self.hooks[ip] = ops
        if not ops.trampoline and self._alloc_trampoline is not None:
            ops.trampoline = self._alloc_trampoline(TRAMPOLINE_SIZE)
        ops.registered = True
        return 0

    def unregister_ftrace_function(self, ops: FtraceOps) -> int:
        for ip in ops.filter:
            if self.hooks.get(ip) is ops:
                del self.hooks[ip]
        ops.registered = False
        return 0

    def resolve(self, ip: int, task: object) -> int:
        """The address that actually runs when task calls the function at ip."""
        ops = self.hooks.get(ip) if self.enabled else None
        if ops is None:
            return ip
        new_ip = ops.func(ip, task)
        return ip if new_ip is None else new_ip

    def enabled_functions(self, lookup: Callable[[int], KSym | None], show: str) -> str:
        """/sys/kernel/tracing/enabled_functions: t_show() of each record an ops is
        attached to, in address order (`show` is SHOW_RI, SHOW_RID or SHOW_RIDOM).

        Each record has one ops here, which has a trampoline of its own: the line
        names it and its handler, `\\ttramp: %pS (%pS)`, then the function the
        trampoline calls, ` ->%pS` (add_trampoline_func()).
        """
        def sprint_symbol(addr: int) -> str:
            sym = lookup(addr)
            if sym is None:
                return f"{addr:#x}"
            module = f" [{sym.module}]" if sym.module else ""
            return f"{sym.name}+{addr - sym.addr:#x}/{sym.size:#x}{module}"

        lines: list[str] = []
        if not self.enabled:
            return ""  # ftrace_enabled=0 took every call site out: no record is enabled
        for ip in sorted(self.hooks):
            ops = self.hooks[ip]
            sym = lookup(ip)
            name = "?" if sym is None else sym.name + (f" [{sym.module}]" if sym.module else "")  # print_rec()
            flags = (" R" if ops.flags & FTRACE_OPS_FL_SAVE_REGS else "  ") + (
                " I" if ops.flags & FTRACE_OPS_FL_IPMODIFY else "  ")
            if "D" in show:
                flags += "  "
            if "O" in show:
                flags += "  "
            if "M" in show:
                flags += " M " if ops.flags & FTRACE_OPS_FL_IPMODIFY else "   "
            line = f"{name} (1){flags}"
            if ops.trampoline:
                func = sprint_symbol(ops.func_addr)
                line += f"\ttramp: {sprint_symbol(ops.trampoline)} ({func}) ->{func}"
            lines.append(line + "\n")
        return "".join(lines)
