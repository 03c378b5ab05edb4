"""debugfs at /sys/kernel/debug, and dynamic debug's control files in it and in /proc.

Only what dynamic debug needs of debugfs is here: the mount's root, which
debugfs gives mode 0700 (DEBUGFS_DEFAULT_MODE), and
dynamic_debug_init_control()'s entries: debugfs_create_dir() makes 0755
directories, proc_mkdir() 0555 ones; the control files are 0644 and, as
debugfs and proc files, report size 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klpfs.kernel.dyndbg import DynamicDebug
    from klpfs.sysfs.kernfs import Kernfs, KernfsNode

DEBUGFS_DEFAULT_MODE = 0o700


def debugfs_mount(kernfs: Kernfs, kernel_kobj: KernfsNode) -> KernfsNode:
    """/sys/kernel/debug with debugfs mounted on it, as distributions mount it at boot."""
    return kernfs.create_dir(kernel_kobj, "debug", DEBUGFS_DEFAULT_MODE)


def dynamic_debug_init_control(kernfs: Kernfs, debugfs: KernfsNode, proc: KernfsNode,
                               dyndbg: DynamicDebug) -> None:
    """dynamic_debug_init_control(): <debugfs>/dynamic_debug/control, and
    /proc/dynamic_debug/control where the kernel has it.  Each read is a
    fresh walk of the callsites, shown whole (a seq_file)."""
    directory = kernfs.create_dir(debugfs, "dynamic_debug", 0o755)
    kernfs.create_file(directory, "control", 0o644, dyndbg.proc_show, dyndbg.proc_write, size=0, seq=True)
    if dyndbg.features.procfs_control:
        directory = kernfs.create_dir(proc, "dynamic_debug", 0o555)
        kernfs.create_file(directory, "control", 0o644, dyndbg.proc_show, dyndbg.proc_write, size=0, seq=True)
