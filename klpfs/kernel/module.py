"""The module loader: load and delete with the kernel's order of events.

Load (kernel/module.c): refuse a duplicate name (-EEXIST), taint, lay out
symbols, COMING: the livepatch hook then the notifier chain, run init; a
failing init goes GOING: notifier chain, livepatch hook, free.  Delete:
-ENOENT if absent, -EWOULDBLOCK (EAGAIN) while referenced, then exit,
GOING notifier chain, livepatch hook, free (load_module() and delete_module()
in kernel/module/main.c).  The livepatch hooks are slots here because the
real loader calls klp_module_coming/going directly, outside the notifier
chain and able to fail the load.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klpfs.kernel.params import ParamError, ParamSpec, set_param
from klpfs.kernel.printk import KERN_ERR, KERN_NOTICE, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.code import Run
    from klpfs.kernel.dyndbg import Ddebug
    from klpfs.kernel.kallsyms import FuncDef, Kallsyms, KSym
    from klpfs.kernel.sched import Task

MODULE_NAME_LEN = 56
INIT_MODULE_STACK = ("entry_SYSCALL_64_after_hwframe", "do_syscall_64", "SyS_finit_module", "load_module",
                     "do_init_module", "do_one_initcall")
"""Where module init runs: inside insmod's finit_module()."""
DELETE_MODULE_STACK = ("entry_SYSCALL_64_after_hwframe", "do_syscall_64", "SyS_delete_module")
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
TAINT_FORCED_MODULE = 1, "F"
TAINT_FORCED_RMMOD = 3, "R"
TAINT_DIE = 7, "D"
TAINT_OOT_MODULE = 12, "O"
TAINT_UNSIGNED_MODULE = 13, "E"
TAINT_SOFTLOCKUP = 14, "L"
TAINT_LIVEPATCH = 15, "K"
TAINT_FLAGS = sorted((TAINT_FORCED_MODULE, TAINT_FORCED_RMMOD, TAINT_DIE, TAINT_OOT_MODULE, TAINT_UNSIGNED_MODULE,
                      TAINT_SOFTLOCKUP, TAINT_LIVEPATCH))


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
    init: Callable[[Module], object] | None = None
    exit: Callable[[Module], object] | None = None
    params: MutableMapping[str, object] = field(default_factory=dict)
    """The variables parameters live in (a Python module's globals)."""
    param_specs: dict[str, ParamSpec] = field(default_factory=dict)
    state: ModuleState = ModuleState.UNFORMED
    refcnt: int = 0
    klp_alive: bool = False
    taint_mask: int = 0
    """The taint flags this module set, as bits (module->taints)."""
    symbols: list[KSym] = field(default_factory=list)
    check_symbols: Callable[[], int] | None = None
    """simplify_symbols(): 0, or -errno (logged) for a kernel symbol the module needs and this kernel lacks."""
    release: Callable[[], None] | None = None
    """Undo what the module's code created through the kernel API, when it is freed."""
    data: dict[str, object] = field(default_factory=dict)
    """Whatever the module's own code keeps (its klp_patch, its tasks)."""
    dyndbg: list[Ddebug] = field(default_factory=list)
    """Its pr_debug() callsites (the __dyndbg section), registered while it is loaded."""
    core_size: int | None = None
    """core_layout.size of a module loaded from a .ko (klpfs.elf.coresize) or, once loaded,
    of one from a Python or TOML file (`source_layout`)."""
    init_size: int = 0
    """init_layout.size of a .ko: counted until init has run and freed it."""


PAGE_SIZE = 4096
ELF64_SYM_SIZE = 24
MOD_KALLSYMS_SIZE = 32
"""sizeof(struct mod_kallsyms), which layout_symtab() puts in the init area."""
THIS_MODULE_SIZE = 0x500
"""sizeof(struct module) of the 6.x kernels: the .gnu.linkonce.this_module in its data."""
KLP_DATA_SIZE = 200 + 2 * 168 + 2 * 152
"""A small livepatch module's klp_patch and its klp_object[] and klp_func[], each array
with its terminating entry (klpfs.elf.layouts, 5.5 on)."""
KBUILD_SYMBOLS = 48
"""The symbols a kbuild-made .ko has besides its functions and __this_module: section and
file symbols, modinfo and __addressable ids, imports (a small livepatch .ko has about 50)."""
KBUILD_SYMBOL_NAME = 16
"""Their names' length, on average."""


def _page_align(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def source_layout(mod: Module, module_memory: bool = False) -> tuple[int, int]:
    """(core_layout.size, init_layout.size) for a module from a Python or TOML file.

    Such a module has no sections, so it is laid out as layout_sections() and
    layout_symtab() (kernel/module/main.c, kernel/module/kallsyms.c) lay out the small C
    module it stands for, as klpfs.elf.coresize does for a real .ko: its functions' text
    (each at FUNC_ALIGN), read-only data (strings, __mcount_loc, notes) and writable data
    (struct module, the klp structures), each group rounded up to a page, then the
    symbols kallsyms keeps with their names and types, rounded up too.  A small module
    thus shows 16384 in /proc/modules, as the kernel's samples do on a 6.1 kernel; the
    init area (.init.text, the whole symbol table and struct mod_kallsyms) adds two
    pages until init has run.

    With `module_memory` (6.4 on) the kept symbols go into the data area, which holds
    struct module too: a plain module's few named symbols fit in its page (12288 on the
    6.12 kernel observed), while a livepatch module keeps every symbol of its object
    (layout_symtab(): is_livepatch_module()) beside its klp structures, which takes even
    a small one past the page (16384).
    """
    from klpfs.kernel.kallsyms import FUNC_ALIGN
    text = sum(-(-sym.size // FUNC_ALIGN) * FUNC_ALIGN for sym in mod.symbols) or FUNC_ALIGN
    names = [sym.name for sym in mod.symbols] + ["__this_module"]
    # Elf64_Sym, the name and its NUL, the type byte; then the null symbol.
    symtab = sum(ELF64_SYM_SIZE + len(name.encode()) + 2 for name in names) + ELF64_SYM_SIZE + 1
    init = PAGE_SIZE + _page_align(symtab + MOD_KALLSYMS_SIZE)
    if not module_memory:
        return _page_align(text) + PAGE_SIZE + PAGE_SIZE + _page_align(symtab), init
    data = THIS_MODULE_SIZE + symtab
    if mod.livepatch:
        data += KLP_DATA_SIZE + KBUILD_SYMBOLS * (ELF64_SYM_SIZE + KBUILD_SYMBOL_NAME + 2)
    return _page_align(text) + PAGE_SIZE + _page_align(data), init


def module_size(mod: Module) -> int:
    """The size /proc/modules and lsmod show (m_show): init + core layout, the init part
    only while init runs (do_init_module() frees it and zeroes its size, so a module being
    removed shows its core alone)."""
    core, init = (mod.core_size, mod.init_size) if mod.core_size is not None else source_layout(mod)
    return core + (init if mod.state is ModuleState.COMING else 0)


class ModuleLoader:
    def __init__(self, kallsyms: Kallsyms, printk: Callable[[int, str], None], sig_enforce_msgs: bool,
                 run_atomic: Callable[..., object], start_code: Callable[..., Run]):
        self.run_atomic = run_atomic
        """Run module code inside an engine operation (it may not sleep)."""
        self.start_code = start_code
        """Start module code as a task of its own."""
        self._kallsyms = kallsyms
        self.printk = printk
        self._sig_msgs = sig_enforce_msgs
        self.modules: dict[str, Module] = {}
        self.tainted = 0
        self.notifiers: list[Callable[[ModuleState, Module], None]] = []
        self.klp_coming: Callable[[Module], int] | None = None
        self.klp_going: Callable[[Module], None] | None = None
        self.sysfs_setup: list[Callable[[Module], None]] = []
        """Told when a module's /sys/module entry appears (mod_sysfs_setup)."""
        self.sysfs_teardown: list[Callable[[Module], None]] = []
        self.free_notifiers: list[Callable[[Module], None]] = []
        """Told when a module's memory is about to be freed (free_module): whatever still
        points into it (a force-removed livepatch module's klp_patch) is left dangling."""
        self.force_unload = False
        """CONFIG_MODULE_FORCE_UNLOAD: delete_module(O_TRUNC) removes a module in use."""
        self.module_memory = False
        """The module_memory layout (6.4 on): kept symbols in the data area (`source_layout`)."""

    def parse_args(self, mod: Module, args: list[str]) -> int:
        """parse_args() of `insmod M name=value ...`: 0, or the first refusal's -errno, logged."""
        for arg in args:
            name, eq, text = arg.partition("=")
            key = name.replace("-", "_")
            spec = mod.param_specs.get(key)
            if spec is None:
                self.printk(KERN_WARNING, f"{mod.name}: unknown parameter '{name}' ignored")
                continue
            value = text if eq else None
            try:
                set_param(spec, mod.params, value, key, lambda line: self.printk(KERN_ERR, line))
            except ParamError as e:
                if e.errno == errno.ENOSPC:
                    self.printk(KERN_ERR, f"{mod.name}: `{value or ''}' too large for parameter `{name}'")
                else:
                    self.printk(KERN_ERR, f"{mod.name}: `{value or ''}' invalid for parameter `{name}'")
                return -e.errno
        return 0

    def find_module(self, name: str) -> Module | None:
        return self.modules.get(name)

    def taint_letters(self) -> str:
        return taint_letters(self.tainted)

    def add_taint(self, flag: tuple[int, str]) -> None:
        """add_taint() for the whole kernel (an oops, a lockup)."""
        self.tainted |= 1 << flag[0]

    def _taint(self, mod: Module, flag: tuple[int, str], message: str | None, level: int) -> None:
        bit, letter = flag
        if message is not None and not self.tainted & 1 << bit:
            self.printk(level, f"{mod.name}: {message}")
        self.tainted |= 1 << bit
        mod.taint_mask |= 1 << bit

    def try_to_force_load(self, name: str, reason: str) -> None:
        """try_to_force_load() under CONFIG_MODULE_FORCE_LOAD: a check the loader was told to
        skip (or could not make) taints the kernel F, before the module exists as one, so
        the taint stays if the load then fails; the warning comes only while F is not yet
        set.  The module's own F (module->taints) is the caller's to mark."""
        bit = TAINT_FORCED_MODULE[0]
        if not self.tainted & 1 << bit:
            self.printk(KERN_WARNING, f"{name}: {reason}: kernel tainted.")
        self.tainted |= 1 << bit

    def load_module(self, mod: Module) -> int:
        """Load with init run inside this call: init may not sleep (engine tests)."""
        ret = self._load(mod, [])
        if ret:
            return ret
        return self._do_init_module(mod, self.run_atomic(mod.init, mod) if mod.init is not None else 0)

    async def init_module(self, mod: Module, task: Task, args: list[str] | None = None) -> int:
        """finit_module() as task, with insmod's parameter arguments: init runs
        as that task's code and may sleep."""
        ret = self._load(mod, args or [])
        if ret:
            return ret
        if mod.init is None:
            return self._do_init_module(mod, 0)
        run = self.start_code(task, mod.init, mod)
        result = await run.wait()
        if run.fault is not None:
            mod.data["fault"] = run.fault
            result = -errno.EFAULT
        return self._do_init_module(mod, result)

    def _load(self, mod: Module, args: list[str]) -> int:
        """load_module() up to running init: taints, parameters, symbols, sysfs, the COMING hooks."""
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
        ret = mod.check_symbols() if mod.check_symbols is not None else 0
        if not ret:
            ret = self.parse_args(mod, args)
        if ret:
            return ret
        self.modules[mod.name] = mod
        mod.state = ModuleState.UNFORMED
        mod.refcnt = 0
        mod.symbols = self._kallsyms.add_object(mod.name, mod.funcs)
        if mod.core_size is None:
            mod.core_size, mod.init_size = source_layout(mod, self.module_memory)
        for setup in self.sysfs_setup:
            setup(mod)
        mod.state = ModuleState.COMING
        if self.klp_coming is not None:
            ret = self.klp_coming(mod)
            if ret:
                self._free(mod)
                return ret
        self._notify(ModuleState.COMING, mod)
        return 0

    def _do_init_module(self, mod: Module, ret: object) -> int:
        """What follows init: LIVE, or a failed init goes GOING and is freed."""
        ret = ret if isinstance(ret, int) else 0
        if ret < 0:
            mod.state = ModuleState.GOING
            self._notify(ModuleState.GOING, mod)
            if self.klp_going is not None:
                self.klp_going(mod)
            self._free(mod)
            return ret
        if ret > 0:
            # do_init_module(): a positive return is not an error, but not the convention.
            self.printk(KERN_WARNING, f"do_init_module: '{mod.name}'->init suspiciously returned {ret}, "
                                      "it should follow 0/-E convention")
            self.printk(KERN_WARNING, "do_init_module: loading module anyway...")
        mod.state = ModuleState.LIVE
        self._notify(ModuleState.LIVE, mod)
        return 0

    def delete_module(self, name: str, flags: int = 0) -> int:
        """delete_module() with exit run inside this call: exit may not sleep (engine tests)."""
        mod, ret = self._try_stop(name, flags)
        if mod is None:
            return ret
        if mod.exit is not None:
            self.run_atomic(mod.exit, mod)
        return self._free_going(mod)

    async def delete_module_as(self, task: Task, name: str, flags: int = 0) -> int:
        """delete_module() as task: exit runs as that task's code and may sleep
        (kthread_stop, flush_work)."""
        mod, ret = self._try_stop(name, flags)
        if mod is None:
            return ret
        if mod.exit is not None:
            await self.start_code(task, mod.exit, mod).wait()
        return self._free_going(mod)

    def _try_stop(self, name: str, flags: int) -> tuple[Module | None, int]:
        """delete_module() up to marking the module GOING (kernel/module/main.c)."""
        mod = self.modules.get(name)
        if mod is None:
            return None, -errno.ENOENT
        if mod.state is not ModuleState.LIVE:
            return None, -errno.EBUSY
        if mod.init is not None and mod.exit is None and not self._try_force_unload(flags):
            return None, -errno.EBUSY
        if mod.refcnt and not self._try_force_unload(flags):  # try_stop_module()
            return None, -errno.EWOULDBLOCK
        mod.state = ModuleState.GOING
        return mod, 0

    def _try_force_unload(self, flags: int) -> bool:
        """try_force_unload(): O_TRUNC forces, tainting R, where the kernel has
        CONFIG_MODULE_FORCE_UNLOAD; without it nothing is forced."""
        if not self.force_unload or not flags & O_TRUNC:
            return False
        self.add_taint(TAINT_FORCED_RMMOD)
        return True

    def _free_going(self, mod: Module) -> int:
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
        for notify in self.free_notifiers:
            notify(mod)
        if mod.release is not None:
            mod.release()
        for teardown in self.sysfs_teardown:
            teardown(mod)
        self._kallsyms.remove_object(mod.name)
        mod.symbols = []
        del self.modules[mod.name]
