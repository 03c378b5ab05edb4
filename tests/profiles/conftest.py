"""Profile tests: the later kernel profiles (5.1, 6.1, 6.11, 6.12, 6.14) checked
against the real kernel's behaviour.

Sources of truth, in order:

* obs #N   -- /work/shared/spec/linux-6.1-observed.md (a real 6.1 kernel);
              every row is a requirement of the 6.1 profile and, where
              unchanged, of the later ones;
* 6.12 obs #N -- /work/shared/spec/linux-6.12-observed.md (a real 6.12
              kernel): what 6.12 does differently, required of 6.12 and of
              every profile from the release that brought the difference;
* notes §N -- /tmp/notes/livepatch-5x-6x.md (the real 5.x/6.x sources);
* spec §N  -- /work/shared/spec/livepatch-behaviour.md (4.15 baseline, §12).

Expectations come from those documents, never from the engine's code.  A
test that fails with "ENGINE BUG" shows a discrepancy between the engine
and the real kernel.

Every async test requests pytest-trio's `autojump_clock` itself (pytest-trio
takes the clock only from the test function's own arguments).  The retry
work fires on whole seconds; waits never end exactly on one.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from klpfs.control.ops import Control
from klpfs.control.samples import find_module_file
from klpfs.kernel.module import Module
from klpfs.kernel.printk import KERN_INFO
from klpfs.livepatch.debug import set_livepatch_debug
from klpfs.sysfs.kernfs import KernfsNode
from klpfs.system import System

from engine.conftest import ORIGINAL, STATE_TEXT, autojump_clock, new_name, spec, target_module  # noqa: F401
from engine.conftest import Machine as EngineMachine

LP = "sys/kernel/livepatch"
LATER = ("5.1", "6.1", "6.11", "6.12", "6.14")
"""The profiles under test."""
SIX = ("6.1", "6.11", "6.12", "6.14")
"""Profiles with <object>/patched (6.1+)."""
IN_WRITE = ("6.11", "6.12", "6.14")
"""6.12 obs #2-#5: klp_cond_resched (6.4) IPIs the idle CPUs as a transition starts, so one
that nothing blocks completes inside the write (or klp_enable_patch()) that started it."""

EINVAL, EBUSY, EAGAIN, ENOENT, ENODEV, EACCES = (
    errno.EINVAL, errno.EBUSY, errno.EAGAIN, errno.ENOENT, errno.ENODEV, errno.EACCES)
assert errno.EWOULDBLOCK == errno.EAGAIN


SIGNAL_LINE = "livepatch: signaling remaining tasks"
FORCE_LINE = "livepatch: forcing remaining tasks to the patched state"


def has_patched(version: str) -> bool:
    return version in SIX


def has_replace_attr(version: str) -> bool:
    return version in ("6.11", "6.12", "6.14")


def completes_in_write(version: str) -> bool:
    return version in IN_WRITE


def has_stack_order(version: str) -> bool:
    return version == "6.14"


def has_states(version: str) -> bool:
    """klp_state (5.5+): of our profiles, 6.1 and later."""
    return version in SIX


def check_fn(version: str) -> str:
    """The function named by the "sleeping on function"/"unreliable stack" debug
    lines: klp_check_stack up to 5.15, klp_try_switch_task from 5.16 (notes §4.4)."""
    return "klp_check_stack" if version == "5.1" else "klp_try_switch_task"


# ---------------------------------------------------------------------------
# Patch and module builders
# ---------------------------------------------------------------------------

def logging_callbacks(printk: Callable[[int, str], None], prefix: str,
                      pre_patch_ret: int = 0) -> dict[str, Callable]:
    """The four callbacks, printing like livepatch-callbacks-demo."""
    def make(cbname: str) -> Callable:
        def cb(mod: Module, obj) -> int | None:
            if obj.mod is not None:
                printk(KERN_INFO, f"{prefix}: {cbname}_callback: {obj.mod.name} -> "
                                  f"{STATE_TEXT.get(obj.mod.state.name, obj.mod.state.name)}")
            else:
                printk(KERN_INFO, f"{prefix}: {cbname}_callback: vmlinux")
            return pre_patch_ret if cbname == "pre_patch" else None
        return cb
    return {n: make(n) for n in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")}


def cb(prefix: str, cbname: str, obj: str | None = None, state: str | None = None) -> str:
    if obj is None:
        return f"{prefix}: {cbname}_callback: vmlinux"
    return f"{prefix}: {cbname}_callback: {obj} -> {STATE_TEXT[state]}"


# ---------------------------------------------------------------------------
# Event recording (order of removals, log lines and module references)
# ---------------------------------------------------------------------------

class Recorder:
    """Records, in order, kernfs additions/removals under /sys/kernel/livepatch,
    log lines, and each watched module's refcnt at every event."""

    def __init__(self, m: Machine, watch: tuple[str, ...] = ()):
        self.m = m
        self.watch = watch
        self.events: list[tuple[str, str, dict[str, int | None]]] = []
        m.kernfs.listeners.append(self)
        m.kernel.log.listeners.append(self._log)

    def _refs(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in self.watch:
            mod = self.m.module(name)
            out[name] = None if mod is None else mod.refcnt
        return out

    def _rel(self, node: KernfsNode) -> str | None:
        path = node.path.lstrip("/")
        if not path.startswith(LP + "/"):
            return None
        return path[len(LP) + 1:]

    def node_added(self, node: KernfsNode) -> None:
        rel = self._rel(node)
        if rel is not None:
            self.events.append(("add", rel, self._refs()))

    def node_removed(self, node: KernfsNode) -> None:
        rel = self._rel(node)
        if rel is not None:
            self.events.append(("rm", rel, self._refs()))

    def _log(self, record) -> None:
        self.events.append(("log", record.text, self._refs()))

    def index(self, kind: str, what: str) -> int:
        for i, (k, w, _) in enumerate(self.events):
            if k == kind and w == what:
                return i
        raise AssertionError(f"no {kind} event {what!r} in {[e[:2] for e in self.events]}")

    def refs_at(self, kind: str, what: str) -> dict[str, int | None]:
        return self.events[self.index(kind, what)][2]

    def removed(self) -> list[str]:
        return [w for k, w, _ in self.events if k == "rm"]

    def close(self) -> None:
        self.m.kernfs.listeners.remove(self)
        self.m.kernel.log.listeners.remove(self._log)


# ---------------------------------------------------------------------------
# The machine under test
# ---------------------------------------------------------------------------

class Machine(EngineMachine):
    """The engine tests' machine, plus the profile's version, the control
    operations (insmod of module files, rmmod) and tree helpers."""

    def __init__(self, system: System, version: str):
        super().__init__(system)
        self.version = version
        self.control = Control(system)

    def times_of(self, text: str) -> list[float]:
        return [r.timestamp for r in self.records() if r.text == text]

    def exists(self, rel: str) -> bool:
        return self.lp_node(rel) is not None

    def ls(self, rel: str = "") -> list[str]:
        node = self.lp_node(rel)
        assert node is not None and node.children is not None, f"{LP}/{rel} is not a directory"
        return sorted(node.children)

    def tree(self, rel: str = "") -> list[str]:
        """Every path below `rel` (relative to it), sorted."""
        node = self.lp_node(rel)
        assert node is not None, f"{LP}/{rel} does not exist"
        out: list[str] = []

        def walk(n: KernfsNode, prefix: str) -> None:
            for name, child in (n.children or {}).items():
                p = f"{prefix}{name}"
                out.append(p + ("/" if child.is_dir else ""))
                if child.is_dir:
                    walk(child, p + "/")
        walk(node, "")
        return sorted(out)

    def mode(self, rel: str) -> int:
        node = self.lp_node(rel)
        assert node is not None, f"{LP}/{rel} does not exist"
        return stat.S_IMODE(node.mode)

    def patched(self, patch: str, obj: str = "vmlinux") -> int:
        v = self.read(f"{patch}/{obj}/patched")
        assert isinstance(v, bytes), v
        return int(v)

    def listed(self) -> list[str]:
        return [p.name for p in self.lp.klp_patches]

    async def ctl(self, cmd: str, **args: Any) -> dict:
        return await self.control.handle({"cmd": cmd, **args})

    async def insmod(self, name: str, *params: str, text: str | None = None) -> dict:
        """Load a shipped sample by name, or `text` as a module file at path `name`."""
        if text is None:
            path = find_module_file(name)
            assert path is not None, f"no module file {name}"
            text = path.read_text()
            name = str(path)
        return await self.ctl("insmod", path=name, text=text, params=list(params))

    async def insmod_text(self, filename: str, text: str, *params: str) -> dict:
        return await self.ctl("insmod", path=f"/tmp/{filename}", text=text, params=list(params))

    async def rmmod_ctl(self, name: str) -> dict:
        return await self.ctl("rmmod", name=name)


def make_machine(nursery: trio.Nursery, version: str, reliable_stacks: bool = True,
                 debug: bool = False) -> Machine:
    system = System(kernel_version=version, reliable_stacks=reliable_stacks)
    set_livepatch_debug(system.kernel.dyndbg, debug)
    nursery.start_soon(system.run)
    return Machine(system, version)


@pytest.fixture
async def boot(nursery):
    """boot(version, reliable_stacks=True, debug=False) -> Machine."""
    def make(version: str, reliable_stacks: bool = True, debug: bool = False) -> Machine:
        return make_machine(nursery, version, reliable_stacks, debug)
    return make


@pytest.fixture(params=LATER)
def version(request) -> str:
    return request.param


@pytest.fixture
async def m(nursery, version) -> Machine:
    """A machine of each later profile, debug messages off (the default level)."""
    return make_machine(nursery, version)


@pytest.fixture
async def md(nursery, version) -> Machine:
    """A machine of each later profile with dynamic debug on."""
    return make_machine(nursery, version, debug=True)


async def settle(seconds: float = 1.5) -> None:
    """Let the emulated kernel run; never end on a whole second (the retry's instant)."""
    await trio.sleep(seconds)
    if abs(trio.current_time() - round(trio.current_time())) < 1e-6:
        await trio.sleep(0.05)


async def tick() -> None:
    """Let work queued for "right now" run (the free work, ticks), a few ms."""
    await trio.sleep(0.01)


def sample_text(name: str) -> str:
    path = find_module_file(name)
    assert path is not None
    return Path(path).read_text()
