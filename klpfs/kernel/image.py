"""Loading a kernel image description (functions, CPUs, boot tasks) from TOML data.

The image is one vmlinux as klpfs lays it out: the default functions, and for
each kernel observed (`kernels."<version>"`) what its own build changes -- the
sizes and return offsets seen in its stack traces, the functions it adds --
and the kernel threads it runs after boot.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from klpfs.kernel.kallsyms import FuncDef, const_body
from klpfs.kernel.kallsyms_file import SymbolFile

DEFAULT_KERNEL = "4.15"
"""The observed kernel whose threads the default image runs."""


@dataclass
class TaskDef:
    pid: int
    comm: str
    kind: str
    ppid: int
    stack: list[str]
    name: str | None = None
    """What /proc shows when it is more than comm (proc_task_name(): a kthread's full
    name, a kworker's with the workqueue it last ran)."""


@dataclass
class KthreadDef:
    """A kernel thread of an observed kernel, before a profile names and places it."""

    pid: int
    name: str
    """Its full name (kthread->full_name); task->comm is the first 15 characters."""
    stack: list[str]
    """From its first function (kthreadd, or kthread) down to where it waits; the fork
    frames before it are the profile's (klpfs.profile_image)."""
    desc: str | None = None
    """A kworker's: the workqueue it last ran, which /proc shows after its name."""
    rescuer: str | None = None
    """A workqueue rescuer: that workqueue, which its name is made from."""
    rule: str | None = None
    """A klpfs.profiles.Rule it runs under: only where the profile has it."""


@dataclass
class Image:
    cmdline: str
    nr_cpus: int
    console: int
    idle_stack: list[str]
    boot_idle_stack: list[str]
    functions: list[FuncDef] = field(default_factory=list)
    tasks: list[TaskDef] = field(default_factory=list)
    """The tasks started at boot; after `load_image`, the user tasks only."""
    kthreads: list[KthreadDef] = field(default_factory=list)
    """The observed kernel's threads, for klpfs.profile_image to add to `tasks`."""
    symbols: SymbolFile | None = None
    """A build's symbol table (--kallsyms) that vmlinux takes its symbols from; None:
    `functions` laid out one after another (Kallsyms.add_vmlinux)."""


def _function(f: dict[str, Any], cmdline: str, release: str) -> FuncDef:
    return FuncDef(f["name"], f["size"], const_body(f.get("output", "").format(cmdline=cmdline, release=release)),
                   not f.get("notrace", False), f.get("ret"))


def load_image(release: str, text: str | None = None, kernel: str = DEFAULT_KERNEL) -> Image:
    """The shipped default image (or the TOML given) as the observed `kernel` has it,
    with {release} filled in."""
    if text is None:
        text = resources.files("klpfs").joinpath("data/vmlinux.toml").read_text()
    raw = tomllib.loads(text)
    cmdline = raw["cmdline"]
    funcs = [_function(f, cmdline, release) for f in raw["functions"]]
    observed = raw.get("kernels", {}).get(kernel, {})
    index = {f.name: i for i, f in reversed(list(enumerate(funcs)))}
    for f in observed.get("functions", []):
        func = _function(f, cmdline, release)
        if func.name in index:
            funcs[index[func.name]] = func
        else:
            funcs.append(func)
    tasks = [TaskDef(t["pid"], t["comm"], t["kind"], t["ppid"], t["stack"]) for t in raw["tasks"]]
    kthreads = [KthreadDef(k["pid"], k.get("name") or k["rescuer"], k["stack"], k.get("desc"), k.get("rescuer"),
                           k.get("rule"))
                for k in observed.get("kthreads", [])]
    return Image(cmdline, raw["nr_cpus"], raw["console"], raw["idle_stack"], raw["boot_idle_stack"],
                 funcs, tasks, kthreads)
