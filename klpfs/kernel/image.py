"""Loading a kernel image description (functions, CPUs, boot tasks) from TOML data."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources

from klpfs.kernel.kallsyms import FuncDef, const_body


@dataclass
class TaskDef:
    pid: int
    comm: str
    kind: str
    ppid: int
    stack: list[str]


@dataclass
class Image:
    cmdline: str
    nr_cpus: int
    console: int
    idle_stack: list[str]
    boot_idle_stack: list[str]
    functions: list[FuncDef] = field(default_factory=list)
    tasks: list[TaskDef] = field(default_factory=list)


def load_image(release: str, text: str | None = None) -> Image:
    """The shipped default image (or the TOML given), with {release} filled in."""
    if text is None:
        text = resources.files("klpfs").joinpath("data/vmlinux.toml").read_text()
    raw = tomllib.loads(text)
    cmdline = raw["cmdline"]
    funcs = [
        FuncDef(f["name"], f["size"],
                const_body(f.get("output", "").format(cmdline=cmdline, release=release)),
                not f.get("notrace", False))
        for f in raw["functions"]
    ]
    tasks = [TaskDef(t["pid"], t["comm"], t["kind"], t["ppid"], t["stack"]) for t in raw["tasks"]]
    return Image(cmdline, raw["nr_cpus"], raw["console"], raw["idle_stack"], raw["boot_idle_stack"],
                 funcs, tasks)
