"""Engine tests: the emulated kernel + livepatch core checked against
/work/shared/spec/livepatch-behaviour.md, row by row.

Expectations in these tests come from the spec (section numbers are given in
each test's docstring), not from the engine's code.  A test that fails with
"ENGINE BUG (§x.y)" shows a discrepancy between the engine and the spec.

Every test requests pytest-trio's `autojump_clock` itself (pytest-trio only
takes the clock from the test function's own arguments), so multi-second
kernel stories run instantly and deterministically.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
import trio
import trio.testing

from klpfs.kernel.kallsyms import FuncDef, KSym, const_body
from klpfs.kernel.module import Module
from klpfs.kernel.printk import KERN_INFO
from klpfs.kernel.sched import Task, TaskKind
from klpfs.livepatch.debug import livepatch_debug, set_livepatch_debug
from klpfs.livepatch.structs import KlpPatch
from klpfs.modules.livepatch_module import FuncSpec, ObjectSpec, PatchModuleSpec, build_klp_patch
from klpfs.sysfs.kernfs import Kernfs, KernfsNode
from klpfs.system import System

LP = "sys/kernel/livepatch"
EAGAIN = errno.EAGAIN
assert errno.EWOULDBLOCK == errno.EAGAIN

# §11: the module state texts the callbacks demo prints.
STATE_TEXT = {
    "LIVE": "[MODULE_STATE_LIVE] Normal state",
    "COMING": "[MODULE_STATE_COMING] Full formed, running module_init",
    "GOING": "[MODULE_STATE_GOING] Going away",
    "UNFORMED": "[MODULE_STATE_UNFORMED] Still setting it up",
}

ORIGINAL = "<original>"


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# ---------------------------------------------------------------------------
# Patch and module builders
# ---------------------------------------------------------------------------

def new_name(patch: str, old: str) -> str:
    return f"{patch}__{old}"


def body_text(patch: str, old: str) -> str:
    """What the replacement of `old` in `patch` prints when called."""
    return f"{patch}:{old}\n"


def spec(name: str, objs: dict[str | None, list] | None = None, *, immediate: bool = False,
         callbacks: dict[str | None, dict[str, Callable]] | None = None, livepatch: bool = True,
         new_size: int = 0x40, replace: bool = False, states: list[tuple[int, int]] | None = None
         ) -> PatchModuleSpec:
    """A patch module `name`.

    objs maps an object (None = vmlinux, else a module name) to its funcs; a
    func is an old_name or a tuple (old_name, old_sympos[, immediate]).  The
    replacement of old_name is the module's function `<name>__<old_name>`
    (`<name>__<old_name>__<sympos>` when a sympos is given), printing
    "<name>:<old_name>".
    """
    if objs is None:
        objs = {None: ["cmdline_proc_show"]}
    callbacks = callbacks or {}
    functions: list[FuncDef] = []
    objspecs: list[ObjectSpec] = []
    for obj, funcs in objs.items():
        fspecs = []
        for f in funcs:
            if isinstance(f, str):
                old, pos, imm = f, 0, False
            else:
                old, pos, imm = (tuple(f) + (False,))[:3]
            nn = new_name(name, old) + (f"__{pos}" if pos else "")
            if all(fd.name != nn for fd in functions):
                functions.append(FuncDef(nn, new_size, const_body(body_text(name, old))))
            fspecs.append(FuncSpec(old, nn, old_sympos=pos, immediate=imm))
        objspecs.append(ObjectSpec(obj, fspecs, callbacks=dict(callbacks.get(obj, {}))))
    return PatchModuleSpec(name, functions, objspecs, immediate=immediate, livepatch=livepatch,
                           replace=replace, states=list(states or []))


def target_module(name: str, funcs: list[str] | None = None, *, notrace: tuple[str, ...] = (),
                  printk: Callable[[int, str], None] | None = None, init_ret: int = 0) -> Module:
    """An ordinary module whose functions print "<name>:<func>"; init/exit log like
    the callbacks-mod sample when printk is given."""
    funcs = funcs or [f"{name}_func"]
    defs = [FuncDef(f, 0x80, const_body(f"{name}:{f}\n"), traceable=f not in notrace) for f in funcs]

    def init(mod: Module) -> int:
        if printk is not None:
            printk(KERN_INFO, f"{name}: {name}_init")
        return init_ret

    def exit_(mod: Module) -> None:
        if printk is not None:
            printk(KERN_INFO, f"{name}: {name}_exit")

    return Module(name, defs, init=init, exit=exit_)


def demo_callbacks(printk: Callable[[int, str], None], prefix: str = "demo",
                   pre_patch_ret: dict | None = None, only: tuple[str, ...] | None = None
                   ) -> dict[str, Callable]:
    """The four callbacks, printing like livepatch-callbacks-demo (§11).

    pre_patch returns pre_patch_ret[obj display name] (default 0).
    """
    rets = pre_patch_ret if pre_patch_ret is not None else {}

    def make(cbname: str) -> Callable:
        def cb(mod: Module, obj) -> int | None:
            if obj.mod is not None:
                printk(KERN_INFO, f"{prefix}: {cbname}_callback: {obj.mod.name} -> "
                                  f"{STATE_TEXT[obj.mod.state.name]}")
            else:
                printk(KERN_INFO, f"{prefix}: {cbname}_callback: vmlinux")
            if cbname == "pre_patch":
                return rets.get(obj.name or "vmlinux", 0)
            return None
        return cb

    names = only or ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
    return {n: make(n) for n in names}


def cb_line(cbname: str, obj: str | None = None, state: str | None = None, prefix: str = "demo") -> str:
    if obj is None:
        return f"{prefix}: {cbname}_callback: vmlinux"
    return f"{prefix}: {cbname}_callback: {obj} -> {STATE_TEXT[state]}"


# ---------------------------------------------------------------------------
# The machine under test
# ---------------------------------------------------------------------------

class Machine:
    """A booted System plus the small verbs the tests use."""

    def __init__(self, system: System):
        self.system = system
        self.kernel = system.kernel
        self.lp = system.livepatch
        self.kernfs = system.kernfs
        self.sched = system.kernel.sched
        self.mark = 0

    # -- log -------------------------------------------------------------------
    def lines(self) -> list[str]:
        return self.kernel.log.lines()

    def take(self) -> list[str]:
        """Log lines printed since the previous take()."""
        lines = self.lines()
        new = lines[self.mark:]
        self.mark = len(lines)
        return new

    def take_lp(self) -> list[str]:
        """Like take(), without the per-task debug lines about idle (swapper) tasks."""
        return [ln for ln in self.take() if "swapper/" not in ln]

    def records(self):
        return list(self.kernel.log.records)

    @property
    def debug(self) -> bool:
        return livepatch_debug(self.kernel.dyndbg)

    @debug.setter
    def debug(self, on: bool) -> None:
        set_livepatch_debug(self.kernel.dyndbg, on)

    def printk(self, level: int, text: str) -> None:
        self.kernel.printk(level, text)

    # -- sysfs -------------------------------------------------------------------
    def node(self, path: str) -> KernfsNode | None:
        return self.kernfs.walk(path)

    def lp_node(self, rel: str) -> KernfsNode | None:
        return self.kernfs.walk(f"{LP}/{rel}") if rel else self.kernfs.walk(LP)

    def read(self, rel: str) -> bytes | int:
        node = self.lp_node(rel)
        assert node is not None, f"{LP}/{rel} does not exist"
        return Kernfs.read(node, 0, 4096)

    def write(self, rel: str, data: bytes) -> int:
        node = self.lp_node(rel)
        assert node is not None, f"{LP}/{rel} does not exist"
        return Kernfs.write(node, data)

    def enabled(self, patch: str) -> bytes | int:
        return self.read(f"{patch}/enabled")

    def transition(self, patch: str) -> bytes | int:
        return self.read(f"{patch}/transition")

    def state(self, patch: str) -> tuple[int, int]:
        """(enabled, transition) as read from sysfs."""
        e, t = self.enabled(patch), self.transition(patch)
        assert isinstance(e, bytes) and isinstance(t, bytes), (e, t)
        return int(e), int(t)

    def proc_patch_state(self, task: Task) -> bytes | int:
        node = self.kernfs.walk(f"proc/{task.pid}/patch_state")
        assert node is not None
        return Kernfs.read(node, 0, 100)

    # -- modules -----------------------------------------------------------------
    def load(self, what: PatchModuleSpec | Module) -> int:
        mod = what.build(self.lp) if isinstance(what, PatchModuleSpec) else what
        return self.kernel.modules.load_module(mod)

    def register_only(self, s: PatchModuleSpec) -> int:
        """Load a livepatch module whose init only registers its patch (no enable);
        its exit unregisters.  Returns the load result."""
        mod = Module(s.name, list(s.functions), livepatch=s.livepatch)
        lp = self.lp

        def init(m: Module) -> int:
            patch = build_klp_patch(m, s.objs, s.immediate)
            m.data["patch"] = patch
            return lp.klp_register_patch(patch)

        def exit_(m: Module) -> None:
            lp.klp_unregister_patch(m.data["patch"])

        mod.init = init
        mod.exit = exit_
        return self.kernel.modules.load_module(mod)

    def rmmod(self, name: str, flags: int = 0) -> int:
        return self.kernel.modules.delete_module(name, flags)

    def module(self, name: str) -> Module | None:
        return self.kernel.modules.find_module(name)

    def refcnt(self, name: str) -> int:
        mod = self.module(name)
        assert mod is not None, f"module {name} not loaded"
        return mod.refcnt

    def patch(self, name: str) -> KlpPatch:
        mod = self.module(name)
        assert mod is not None, f"module {name} not loaded"
        return mod.data["patch"]

    # -- symbols and calls -------------------------------------------------------
    def sym(self, name: str, module: str | None = None, pos: int = 1) -> KSym:
        syms = [s for s in self.kernel.kallsyms.symbols(module) if s.name == name]
        assert len(syms) >= pos, f"no {name} #{pos} in {module or 'vmlinux'}"
        return syms[pos - 1]

    def call(self, name: str, task: Task, module: str | None = None, pos: int = 1) -> str:
        """What calling function `name` prints when `task` calls it:
        ORIGINAL for the unpatched function, else the replacement's text."""
        func = self.sym(name, module, pos)
        res = self.kernel.call(func, task)
        if res.impl is func:
            return ORIGINAL
        return res.output.rstrip("\n")

    # -- tasks -------------------------------------------------------------------
    def kthread(self, comm: str = "kt") -> Task:
        base = [self.kernel.kallsyms.find(n) for n in ("ret_from_fork", "kthread", "worker_thread")]
        return self.sched.add(comm, TaskKind.KTHREAD, base, ppid=2)

    def user(self, comm: str = "ut", ppid: int = 1) -> Task:
        base = [self.kernel.kallsyms.find(n) for n in ("entry_SYSCALL_64_after_hwframe", "do_syscall_64")]
        return self.sched.add(comm, TaskKind.USER, base, ppid=ppid)

    def blocker(self, comm: str = "busy") -> Task:
        """A kthread spinning on a CPU: never passes the stack check, never switches."""
        t = self.kthread(comm)
        self.sched.run(t)
        return t

    def sleeper(self, func: str, comm: str = "sleeper", kind: TaskKind = TaskKind.KTHREAD,
                state: str = "D", module: str | None = None, pos: int = 1,
                seconds: float | None = None) -> Task:
        """A task asleep inside `func` (whatever implementation the call reaches)."""
        t = self.kthread(comm) if kind is TaskKind.KTHREAD else self.user(comm)
        self.sched.enter(t, self.sym(func, module, pos), state, seconds)
        return t

    def all_tasks(self) -> list[Task]:
        return list(self.sched.tasks.values()) + list(self.sched.idle_tasks)


def make_machine(nursery: trio.Nursery, version: str = "4.15", reliable_stacks: bool = True,
                 debug: bool = True) -> Machine:
    system = System(kernel_version=version, reliable_stacks=reliable_stacks)
    set_livepatch_debug(system.kernel.dyndbg, debug)
    nursery.start_soon(system.run)
    return Machine(system)


@pytest.fixture
async def boot(nursery):
    """boot(version="4.15", reliable_stacks=True, debug=True) -> Machine."""
    def make(version: str = "4.15", reliable_stacks: bool = True, debug: bool = True) -> Machine:
        return make_machine(nursery, version, reliable_stacks, debug)
    return make


@pytest.fixture
async def m(nursery) -> Machine:
    """A 4.15 machine with reliable stacks and debug messages on."""
    return make_machine(nursery)


@pytest.fixture
async def m16(nursery) -> Machine:
    """A 4.16 machine with reliable stacks and debug messages on."""
    return make_machine(nursery, "4.16")


async def settle(seconds: float = 2.0) -> None:
    """Let the emulated kernel run: idle ticks and the retry work.

    The retry work fires on whole seconds (machines boot at time 0); trio
    wakes tasks due at the same instant in no fixed order, so a settle that
    would end exactly on a whole second runs a little longer, after the retry.
    """
    await trio.sleep(seconds)
    if abs(trio.current_time() - round(trio.current_time())) < 1e-6:
        await trio.sleep(0.05)
