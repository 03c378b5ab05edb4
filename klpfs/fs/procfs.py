"""The emulated /proc: a directory per task (comm, stat, status, stack,
patch_state, task/<tid>/) and files served by calling the emulated kernel's
own show functions.

`cat MNT/proc/cmdline` runs the emulated cmdline_proc_show as the console
task through the ftrace call path, so a patch that replaces it is visible
to cat exactly when that task would see it.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator

from klpfs.fs.procpid import USER_HZ, task_stat, task_status
from klpfs.kernel.kallsyms import PADDING_PREFIX
from klpfs.kernel.kernel import Kernel
from klpfs.kernel.module import ModuleState, module_size, taint_letters
from klpfs.kernel.oops import KernelFault
from klpfs.kernel.sched import Task, stack_lines
from klpfs.sysfs.kernfs import Kernfs, KernfsNode

MODULE_STATE_WORDS = {ModuleState.GOING: "Unloading", ModuleState.COMING: "Loading"}
"""What m_show() says of a module that is not live."""
PROC_READ_TRACE = ("seq_read", "proc_reg_read", "__vfs_read", "vfs_read", "SyS_read", "do_syscall_64",
                   "entry_SYSCALL_64_after_hwframe")
"""Where a read(2) of a /proc file calls its show function from, in the image's names."""

# /proc files served by an emulated function of the same meaning.
SHOW_FUNCTIONS = {
    "cmdline": "cmdline_proc_show",
    "version": "version_proc_show",
    "meminfo": "meminfo_proc_show",
    "loadavg": "loadavg_proc_show",
    "uptime": "uptime_proc_show",
}


class ProcFs:
    def __init__(self, kernfs: Kernfs, proc: KernfsNode, kernel: Kernel):
        self._kernfs = kernfs
        self._proc = proc
        self._kernel = kernel
        self._dirs: dict[int, KernfsNode] = {}
        self._ftrace_enabled = 1
        for name, func in SHOW_FUNCTIONS.items():
            kernfs.create_file(proc, name, 0o444, functools.partial(self._call, func), size=0)
        kernfs.create_file(proc, "modules", 0o444, self._modules, size=0)
        kernfs.create_file(proc, "kallsyms", 0o444, self._kallsyms, size=0, seq=True)
        # Whoever reads the mount stands for the console shell's children, as `cat` would be.
        kernfs.create_link(proc, "self", lambda: str(kernel.console.pid))
        sys_kernel = kernfs.create_dir(kernfs.create_dir(proc, "sys", 0o555), "kernel", 0o555)
        kernfs.create_file(sys_kernel, "tainted", 0o644, lambda: f"{kernel.modules.tainted}\n", size=0)
        kernfs.create_file(sys_kernel, "ftrace_enabled", 0o644, lambda: f"{self._ftrace_enabled}\n",
                           self._set_ftrace_enabled, size=0)
        kernfs.set_lazy(proc, self)
        kernel.sched.task_notifiers.append(self._task_event)

    def create_file(self, name: str, mode: int, show: Callable[[], str]) -> KernfsNode:
        """A /proc/<name> file a module creates (proc_create_single)."""
        return self._kernfs.create_file(self._proc, name, mode, show, size=0)

    def _set_ftrace_enabled(self, buf: bytes) -> int:
        """proc_dointvec() then ftrace_enable_sysctl(): any int; 0 refused under a permanent ops."""
        try:
            value = int(buf.decode("ascii").strip() or "x", 10)
        except (UnicodeDecodeError, ValueError):
            return -errno.EINVAL
        if not -(1 << 31) <= value < 1 << 31:
            return -errno.EINVAL
        ret = self._kernel.ftrace.set_enabled(value != 0)
        if ret:
            return ret
        self._ftrace_enabled = value
        return len(buf)

    def _call(self, func_name: str) -> str:
        kernel = self._kernel
        func = kernel.kallsyms.find(func_name)
        if func is None:
            return ""
        try:
            return kernel.call(func, kernel.console).output
        except KernelFault as fault:  # the reader's read(2) went through seq_read() to the function
            fault.reached_from(PROC_READ_TRACE)
            raise

    def _kallsyms(self) -> str:
        """/proc/kallsyms (s_show): vmlinux's symbols (Kallsyms.vmlinux_listing), then
        each module's functions, 't', with its name.  Module symbols are listed newest
        module first, as the module list is walked.  With CONFIG_CALL_PADDING each
        function's padding comes first, as the __pfx_ symbol objtool gives it."""
        kallsyms = self._kernel.kallsyms
        lines = [kallsyms.vmlinux_listing()]
        for module in reversed([m for m in kallsyms.objects() if m is not None]):
            for sym in kallsyms.symbols(module):
                if kallsyms.padding:
                    lines.append(f"{sym.addr - kallsyms.padding:016x} t {PADDING_PREFIX}{sym.name}\t[{module}]\n")
                lines.append(f"{sym.addr:016x} t {sym.name}\t[{module}]\n")
        return "".join(lines)

    def _modules(self) -> str:
        """/proc/modules: name, size, refcount, users, state, address, taints."""
        lines = []
        for mod in reversed(self._kernel.modules.modules.values()):
            size = module_size(mod)
            letters = taint_letters(mod.taint_mask)
            taints = f" ({letters})" if letters else ""
            state = MODULE_STATE_WORDS.get(mod.state, "Live")
            lines.append(f"{mod.name} {size} {mod.refcnt} - {state} 0x0000000000000000{taints}\n")
        return "".join(lines)

    def names(self) -> Iterator[str]:
        """proc_pid_readdir(): a directory per live task, made or not."""
        return (str(pid) for pid in self._kernel.sched.tasks)

    def materialize(self, name: str) -> None:
        """proc_pid_lookup(): a live task's directory, made when first looked up or
        listed and kept while the task lives, so its inode numbers stay the same."""
        if not name.isdigit() or name != str(int(name)):
            return
        task = self._kernel.sched.find(int(name))
        if task is None:
            return
        kernfs = self._kernfs
        node = kernfs.create_dir(self._proc, name, 0o555)
        self._task_files(node, task)
        self._task_files(kernfs.create_dir(kernfs.create_dir(node, "task", 0o555), name, 0o555), task)
        self._dirs[task.pid] = node

    def _task_event(self, event: str, task: Task) -> None:
        """A new task's directory is there to be looked up.  An exiting task's goes:
        lookups find it no more, handles opened on it go stale."""
        if event == "fork":
            self._kernfs.lazy_dirs_changed(self._proc, 1)
            return
        gone = self._dirs.pop(task.pid, None)
        if gone is not None:
            self._kernfs.remove(gone)
        else:
            self._kernfs.lazy_dirs_changed(self._proc, -1)

    def _task_files(self, node: KernfsNode, task: Task) -> None:
        kernfs = self._kernfs
        sched = self._kernel.sched
        start_ticks = round(task.start_time * USER_HZ)
        kernfs.create_file(node, "comm", 0o644, lambda: f"{task.proc_name}\n", size=0)
        kernfs.create_file(node, "stat", 0o444, lambda: task_stat(sched, task, start_ticks), size=0)
        kernfs.create_file(node, "status", 0o444, lambda: task_status(sched, task), size=0)
        kernfs.create_file(node, "patch_state", 0o400, lambda: f"{task.patch_state}\n", size=0)
        kernfs.create_file(node, "stack", 0o400,
                           lambda: "".join(f"{line}\n" for line in stack_lines(self._kernel.sched.stack(task))), size=0)
