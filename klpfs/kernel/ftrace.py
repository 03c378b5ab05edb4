"""ftrace-style function entry hooks: the emulated call path consults them.

A registered ops with IPMODIFY may send the call elsewhere by returning a new
address from its handler, which is how klp_ftrace_handler redirects a
patched function.  Only one IPMODIFY user may own an address; a second one
is refused with -EBUSY, as the real ftrace does.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

FTRACE_OPS_FL_IPMODIFY = 1 << 0
FTRACE_OPS_FL_PERMANENT = 1 << 1
"""The ops must keep working: ftrace_enabled may not be turned off under it (5.5 on)."""

Handler = Callable[[int, object], int | None]
"""handler(ip, task) -> address to run instead, or None to run ip itself."""


class FtraceOps:
    __slots__ = ("func", "flags", "filter", "registered")

    def __init__(self, func: Handler, flags: int = 0):
        self.func = func
        self.flags = flags
        self.filter: set[int] = set()
        self.registered = False


class Ftrace:
    def __init__(self, location: Callable[[int], int]):
        self._location = location
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
