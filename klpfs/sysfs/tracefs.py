"""tracefs at /sys/kernel/tracing, and at /sys/kernel/debug/tracing where debugfs
mounts it on first use (trace_automount(), kernel/trace/trace.c).

Only enabled_functions is here: the one tracefs file that shows livepatch at
work, listing each function an ftrace ops is attached to (a patched one
names klp_ftrace_handler).  The mount's root has tracefs's default mode 0700
(TRACEFS_DEFAULT_MODE); the file is read-only, 0440 from 5.16 on
(TRACE_MODE_READ), 0444 before; as a seq_file it reports size 0 and is
shown whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klpfs.sysfs.kernfs import Kernfs, KernfsNode, Show

TRACEFS_DEFAULT_MODE = 0o700


def tracefs_mounts(kernfs: Kernfs, kernel_kobj: KernfsNode, debugfs: KernfsNode, enabled_functions: Show,
                   read_mode: int) -> list[KernfsNode]:
    """/sys/kernel/tracing and <debugfs>/tracing, each with enabled_functions (one tracefs
    seen at two mount points: both read the same show)."""
    roots = []
    for parent in (kernel_kobj, debugfs):
        root = kernfs.create_dir(parent, "tracing", TRACEFS_DEFAULT_MODE)
        kernfs.create_file(root, "enabled_functions", read_mode, enabled_functions, size=0, seq=True)
        roots.append(root)
    return roots
