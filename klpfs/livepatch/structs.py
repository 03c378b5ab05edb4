"""The livepatch structures (include/linux/livepatch.h), with the kernel's field names.

The fields above the blank line of each class are what a patch author fills
in; the rest are the core's internal state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klpfs.kernel.ftrace import FtraceOps
    from klpfs.kernel.kallsyms import KSym
    from klpfs.kernel.module import Module
    from klpfs.sysfs.kernfs import KernfsNode

KLP_UNDEFINED = -1
KLP_UNPATCHED = 0
KLP_PATCHED = 1

MAX_STACK_ENTRIES = 100
STACK_ERR_BUF_SIZE = 128


@dataclass(eq=False)
class KlpFunc:
    old_name: str | None
    new_func: KSym | None
    old_sympos: int = 0
    immediate: bool = False

    old_addr: int = 0
    old_size: int = 0
    new_size: int = 0
    kobj: KernfsNode | None = None
    patched: bool = False
    transition: bool = False
    nop: bool = False
    """An atomic-replace placeholder: runs the original function (klp_alloc_func_nop() in
    kernel/livepatch/core.c, 5.1)."""
    freed_at: int = 0
    """Nonzero once `rmmod -f` freed the module holding it while its patch was registered:
    the ftrace handler, still finding it on the func stack, faults reading it."""

    @property
    def kobj_name(self) -> str:
        """"%s,%lu" with sympos 0 shown as 1 (klp_init_func() in kernel/livepatch/core.c)."""
        return f"{self.old_name},{self.old_sympos or 1}"


@dataclass(eq=False)
class KlpCallbacks:
    pre_patch: Callable[[KlpObject], int] | None = None
    post_patch: Callable[[KlpObject], None] | None = None
    pre_unpatch: Callable[[KlpObject], None] | None = None
    post_unpatch: Callable[[KlpObject], None] | None = None

    post_unpatch_enabled: bool = False


@dataclass(eq=False)
class KlpObject:
    name: str | None
    """The patched module's name; None means vmlinux."""
    funcs: list[KlpFunc] | None
    callbacks: KlpCallbacks = field(default_factory=KlpCallbacks)

    kobj: KernfsNode | None = None
    mod: Module | None = None
    patched: bool = False
    dynamic: bool = False
    """Allocated by atomic replace to hold nops for an object the patch does not name."""
    relocs: Callable[[], int] | None = None
    """klp_apply_object_relocs(): the patch module's `.klp.rela.<module>.*` relocations,
    resolved when the patched module is (0 or -errno, logged)."""

    @property
    def display_name(self) -> str:
        """The name the kernel prints and uses for the directory: module or "vmlinux"."""
        return self.name if self.name is not None else "vmlinux"


@dataclass(eq=False)
class KlpState:
    """A system state a patch establishes or takes over (5.5)."""

    id: int
    version: int
    data: object = None


@dataclass(eq=False)
class KlpPatch:
    mod: Module | None
    objs: list[KlpObject] | None
    immediate: bool = False
    replace: bool = False
    states: list[KlpState] = field(default_factory=list)

    kobj: KernfsNode | None = None
    enabled: bool = False
    forced: bool = False
    """This patch's module is never released (5.1's per-patch klp_forced)."""
    freed_at: int = 0
    """Where its kobject was, once `rmmod -f` freed the module holding this klp_patch while
    it was registered: the sysfs tree stays and points into freed memory (0: alive)."""

    @property
    def name(self) -> str:
        assert self.mod is not None
        return self.mod.name


@dataclass(eq=False)
class KlpOps:
    """One per patched old_addr; func_stack[0] is the top, the one that runs (struct klp_ops in
    kernel/livepatch/patch.h)."""

    fops: FtraceOps
    func_stack: list[KlpFunc] = field(default_factory=list)


def klp_is_module(obj: KlpObject) -> bool:
    return obj.name is not None


def klp_is_object_loaded(obj: KlpObject) -> bool:
    """vmlinux is always loaded; a module object once its module came (and until it went)."""
    return obj.name is None or obj.mod is not None
