"""The module loader: load and delete with the kernel's order of events.

Load (kernel/module.c): refuse a duplicate name (-EEXIST), taint, lay out
symbols, COMING: the livepatch hook then the notifier chain, run init; a
failing init goes GOING: notifier chain, livepatch hook, free.  Delete:
-ENOENT if absent, -EWOULDBLOCK (EAGAIN) while referenced, then exit,
GOING notifier chain, livepatch hook, free (spec §7).  The livepatch hooks
are slots here because the real loader calls klp_module_coming/going
directly, outside the notifier chain and able to fail the load.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klpfs.kernel.printk import KERN_NOTICE, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.kallsyms import FuncDef, Kallsyms, KSym

MODULE_NAME_LEN = 56
O_TRUNC = 0o1000


class ModuleState(enum.Enum):
    LIVE = 0
    COMING = 1
    GOING = 2
    UNFORMED = 3


MODULE_STATE_TEXT = {
    ModuleState.LIVE: "[MODULE_STATE_LIVE] Normal state",
    ModuleState.COMING: "[MODULE_STATE_COMING] Full formed, running module_init",
    ModuleState.GOING: "[MODULE_STATE_GOING] Going away",
    ModuleState.UNFORMED: "[MODULE_STATE_UNFORMED] Still setting it up",
}

# Taint flags as /proc/sys/kernel/tainted counts them.
TAINT_FORCED_RMMOD = 3, "R"
TAINT_OOT_MODULE = 12, "O"
TAINT_UNSIGNED_MODULE = 13, "E"
TAINT_LIVEPATCH = 15, "K"
TAINT_FLAGS = sorted((TAINT_FORCED_RMMOD, TAINT_OOT_MODULE, TAINT_UNSIGNED_MODULE, TAINT_LIVEPATCH))


def taint_letters(mask: int) -> str:
    """The letters of the set flags, in flag order (module_flags_taint)."""
    return "".join(letter for bit, letter in TAINT_FLAGS if mask & 1 << bit)


@dataclass(eq=False)
class Module:
    """struct module: what the loader and livepatch use of it."""

    name: str
    funcs: list[FuncDef] = field(default_factory=list)
    livepatch: bool = False
    """modinfo carries `livepatch=Y`: this is what "a livepatch module" means."""
    out_of_tree: bool = False
    signed: bool = True
    init: Callable[[Module], int] | None = None
    exit: Callable[[Module], None] | None = None
    params: dict[str, object] = field(default_factory=dict)
    param_specs: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Parameter name -> (type, sysfs mode): int/bool/charp, 0 for no sysfs file."""
    state: ModuleState = ModuleState.UNFORMED
    refcnt: int = 0
    klp_alive: bool = False
    taint_mask: int = 0
    """The taint flags this module set, as bits (module->taints)."""
    symbols: list[KSym] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)
    """Whatever the module's own code keeps (its klp_patch, its tasks)."""


class ModuleLoader:
    def __init__(self, kallsyms: Kallsyms, printk: Callable[[int, str], None], sig_enforce_msgs: bool):
        self._kallsyms = kallsyms
        self._printk = printk
        self._sig_msgs = sig_enforce_msgs
        self.modules: dict[str, Module] = {}
        self.tainted = 0
        self.notifiers: list[Callable[[ModuleState, Module], None]] = []
        self.klp_coming: Callable[[Module], int] | None = None
        self.klp_going: Callable[[Module], None] | None = None
        self.sysfs_setup: list[Callable[[Module], None]] = []
        """Told when a module's /sys/module entry appears (mod_sysfs_setup)."""
        self.sysfs_teardown: list[Callable[[Module], None]] = []

    def find_module(self, name: str) -> Module | None:
        return self.modules.get(name)

    def taint_letters(self) -> str:
        return taint_letters(self.tainted)

    def _taint(self, mod: Module, flag: tuple[int, str], message: str | None, level: int) -> None:
        bit, letter = flag
        if message is not None and not self.tainted & 1 << bit:
            self._printk(level, f"{mod.name}: {message}")
        self.tainted |= 1 << bit
        mod.taint_mask |= 1 << bit

    def load_module(self, mod: Module) -> int:
        if mod.name in self.modules:
            return -errno.EEXIST
        if mod.out_of_tree:
            self._taint(mod, TAINT_OOT_MODULE, "loading out-of-tree module taints kernel.", KERN_WARNING)
        if mod.livepatch:
            self._taint(mod, TAINT_LIVEPATCH, "tainting kernel with TAINT_LIVEPATCH", KERN_NOTICE)
        if self._sig_msgs and not mod.signed:
            self._taint(mod, TAINT_UNSIGNED_MODULE,
                        "module verification failed: signature and/or required key missing - tainting kernel",
                        KERN_NOTICE)
        self.modules[mod.name] = mod
        mod.state = ModuleState.UNFORMED
        mod.refcnt = 0
        mod.symbols = self._kallsyms.add_object(mod.name, mod.funcs)
        for setup in self.sysfs_setup:
            setup(mod)
        mod.state = ModuleState.COMING
        if self.klp_coming is not None:
            ret = self.klp_coming(mod)
            if ret:
                self._free(mod)
                return ret
        self._notify(ModuleState.COMING, mod)
        ret = mod.init(mod) if mod.init is not None else 0
        if ret < 0:
            mod.state = ModuleState.GOING
            self._notify(ModuleState.GOING, mod)
            if self.klp_going is not None:
                self.klp_going(mod)
            self._free(mod)
            return ret
        mod.state = ModuleState.LIVE
        self._notify(ModuleState.LIVE, mod)
        return 0

    def delete_module(self, name: str, flags: int = 0) -> int:
        mod = self.modules.get(name)
        if mod is None:
            return -errno.ENOENT
        if mod.state is not ModuleState.LIVE:
            return -errno.EBUSY
        if mod.init is not None and mod.exit is None and not flags & O_TRUNC:
            return -errno.EBUSY
        if mod.refcnt and not flags & O_TRUNC:
            return -errno.EWOULDBLOCK
        if mod.refcnt:
            self._taint(mod, TAINT_FORCED_RMMOD, None, KERN_WARNING)
        mod.state = ModuleState.GOING
        if mod.exit is not None:
            mod.exit(mod)
        self._notify(ModuleState.GOING, mod)
        if self.klp_going is not None:
            self.klp_going(mod)
        self._free(mod)
        return 0

    def try_module_get(self, mod: Module) -> bool:
        """A reference, unless the module is going away."""
        if mod.state is ModuleState.GOING:
            return False
        mod.refcnt += 1
        return True

    def module_put(self, mod: Module) -> None:
        mod.refcnt -= 1

    def _notify(self, state: ModuleState, mod: Module) -> None:
        for notifier in self.notifiers:
            notifier(state, mod)

    def _free(self, mod: Module) -> None:
        for teardown in self.sysfs_teardown:
            teardown(mod)
        self._kallsyms.remove_object(mod.name)
        mod.symbols = []
        del self.modules[mod.name]
