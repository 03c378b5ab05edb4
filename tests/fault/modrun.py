"""Loading one module file through the control operations on a fresh emulated
machine, driving it as an administrator would until it can be unloaded, and
unloading it; then comparing the machine with how it started.

Everything runs under trio's MockClock, so minutes of kernel time (transitions,
fake signals, a module's sleeping work) take milliseconds.  A load that never
ends counts as a hang: the emulated deadline expires.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from klpfs.control.modfile import ModuleFile, ModuleFileError, parse_module_file
from klpfs.control.modload import check_profile
from klpfs.control.ops import Control
from klpfs.kernel.module import TAINT_DIE, TAINT_LIVEPATCH, TAINT_OOT_MODULE, TAINT_UNSIGNED_MODULE, taint_letters
from klpfs.livepatch.structs import KlpPatch
from klpfs.modules.program import ShadowAlloc, Value
from klpfs.profiles import get_profile
from klpfs.sysfs.kernfs import Kernfs, KernfsNode
from klpfs.system import System

PATH = "/tmp/gen.toml"
DEADLINE = 3600.0
"""Emulated seconds a load and its unload may take before they count as a hang."""
SETTLE = 60.0
"""Emulated seconds a transition gets before the administrator intervenes: fake
signals come after 15 (5.1 and later), the retry work every second."""

INSMOD_ERRNOS = frozenset({errno.ENOEXEC, errno.EINVAL, errno.EEXIST, errno.EFAULT})
"""What finit_module() may refuse a generated module with, besides the values its
own init, pre_patch callbacks and shadow constructors return: a file the kernel
would not take (ENOEXEC: the module file, as a .ko that fails to build or load);
EINVAL from klp_init_patch() and klp_init_object() (a symbol not found, ambiguous
or at no such position, no ftrace location, a module not marked livepatch, an
incompatible klp_state); EEXIST from kobject_init_and_add() of a second object or
function directory of the same name; EFAULT from an oops in init."""


@dataclass
class Outcome:
    """How one module file fared: the replies of insmod and rmmod, whether a
    transition had to be forced, whether the run hung, and everything about the
    machine that differs from its start beyond what the kernel's rules leave."""

    reply: dict[str, Any]
    rmmod: dict[str, Any] | None = None
    forced: bool = False
    hung: bool = False
    differences: list[str] = field(default_factory=list)


def parsed(text: str, profile_version: str) -> ModuleFile | None:
    """The module file as klpfs reads it, or None if it refuses it (its ENOEXEC)."""
    try:
        mf = parse_module_file(PATH, text)
        check_profile(mf, get_profile(profile_version))
    except ModuleFileError:
        return None
    return mf


def run_module(text: str, profile_version: str) -> Outcome:
    """insmod, drive, rmmod, compare: one fresh machine, its own trio run."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_run_module, text, profile_version, clock=clock)


async def _run_module(text: str, profile_version: str) -> Outcome:
    async with trio.open_nursery() as nursery:
        system = System(profile_version)
        nursery.start_soon(system.run)
        before = snapshot(system)
        outcome = Outcome({})
        with trio.move_on_after(DEADLINE) as scope:
            control = Control(system)
            outcome.reply = await control.handle({"cmd": "insmod", "path": PATH, "text": text, "params": []})
            if outcome.reply["ok"]:
                outcome.forced = await _disable(system, outcome.reply["name"])
                outcome.rmmod = await control.handle({"cmd": "rmmod", "name": outcome.reply["name"]})
            await trio.sleep(SETTLE)
        outcome.hung = scope.cancelled_caught
        mf = parsed(text, profile_version)
        if not (outcome.rmmod and outcome.rmmod.get("in_use") and pinned(system, mf, outcome.forced)):
            outcome.differences = differences(before, snapshot(system), expected_taint(system, mf, outcome))
        nursery.cancel_scope.cancel()
    return outcome


def allowed_errnos(text: str, profile_version: str) -> set[int]:
    """What a load of this file may fail with: INSMOD_ERRNOS, and what the module itself
    returns from its init, its pre_patch callbacks and its shadow constructors (a
    parameter's default where the value names one)."""
    mf = parsed(text, profile_version)
    if mf is None:
        return set(INSMOD_ERRNOS)

    def value(v: Value | None) -> int:
        if isinstance(v, str):
            return int(mf.params[v.strip("{}")].default)
        return int(v or 0)
    values = [value(mf.init_ret)]
    values += [value(cb.ret) for obj in mf.objs or () for cb in obj.callbacks.values()]
    values += [value(step.ctor_ret) for step in mf.all_steps() if isinstance(step, ShadowAlloc)]
    return {*INSMOD_ERRNOS, *(-v for v in values if v < 0)}


def pinned(system: System, mf: ModuleFile | None, forced: bool) -> bool:
    """Whether the kernel keeps the patch module's reference for good once its patch is
    disabled: after a forced transition (klp_force_transition() marks it), and on 4.15
    for immediate patches and patches with immediate functions (klp_complete_transition()
    skips module_put())."""
    immediate = mf is not None and (mf.immediate or any(f.immediate for o in mf.objs or () for f in o.funcs))
    return forced or system.profile.immediate and immediate


async def _disable(system: System, name: str) -> bool:
    """Disable the module's patch if it has one, as an administrator would: wait for its
    transition, reverse one that does not end, force one that still does not; whether
    a force was needed.  Then give the module's own work and threads time to run."""
    lp = system.livepatch
    forced = False
    await trio.sleep(SETTLE)
    patch = _patch_of(system, name)
    if patch is not None and lp.klp_transition_patch is patch:
        _write(system, patch, "enabled", b"0\n")
        await trio.sleep(SETTLE)
    if patch is not None and lp.klp_transition_patch is patch:
        forced = _force(system, patch)
    if patch is not None and _patch_of(system, name) is patch and patch.enabled:
        _write(system, patch, "enabled", b"0\n")
        await trio.sleep(SETTLE)
        if lp.klp_transition_patch is patch:
            forced = _force(system, patch)
    await trio.sleep(SETTLE)
    return forced


def _patch_of(system: System, name: str) -> KlpPatch | None:
    return next((p for p in system.livepatch.klp_patches if p.mod is not None and p.mod.name == name), None)


def _attr(system: System, patch: KlpPatch, attr: str) -> KernfsNode | None:
    return system.kernfs.walk(f"sys/kernel/livepatch/{patch.name}/{attr}")


def _write(system: System, patch: KlpPatch, attr: str, data: bytes) -> int:
    node = _attr(system, patch, attr)
    assert node is not None, f"{patch.name}/{attr}"
    return Kernfs.write(node, data)


def _force(system: System, patch: KlpPatch) -> bool:
    """force where the profile has it (4.16 and later); 4.15 can only wait."""
    if _attr(system, patch, "force") is None:
        return False
    _write(system, patch, "force", b"1\n")
    return True


def expected_taint(system: System, mf: ModuleFile | None, outcome: Outcome) -> int:
    """What the kernel's rules add: load_module() taints O, K and E (E where signatures
    are checked) once it has the module, whether init then succeeds or not; an oops
    taints D."""
    mask = 0
    if mf is not None and outcome.reply.get("errno") != errno.ENOEXEC:
        if mf.out_of_tree:
            mask |= 1 << TAINT_OOT_MODULE[0]
        if mf.livepatch:
            mask |= 1 << TAINT_LIVEPATCH[0]
        if system.profile.module_sig_messages and not mf.signed:
            mask |= 1 << TAINT_UNSIGNED_MODULE[0]
    if outcome.reply.get("errno") == errno.EFAULT:
        mask |= 1 << TAINT_DIE[0]
    return mask


def snapshot(system: System) -> dict[str, Any]:
    """What a loaded and unloaded module must leave as it was."""
    kernel = system.kernel
    lp = system.livepatch
    return {
        "modules": list(kernel.modules.modules),
        "patches": [p.name for p in lp.klp_patches],
        "transition": lp.klp_transition_patch is not None,
        "tasks": sorted((t.pid, t.comm, t.patch_state) for t in kernel.sched.all_tasks()),
        "tree": sorted(_tree(system.kernfs.root)),
        "kallsyms": kernel.kallsyms.objects(),
        "ftrace": kernel.ftrace.enabled_functions(kernel.kallsyms.lookup, system.profile.ftrace_show),
        "taint": kernel.modules.tainted,
    }


def _tree(node: KernfsNode) -> list[str]:
    out = [node.path]
    for child in (node.children or {}).values():
        out.extend(_tree(child))
    return out


def differences(before: dict[str, Any], after: dict[str, Any], taint: int) -> list[str]:
    """What changed, lists shown as what went and what came."""
    out = []
    for key in before:
        if key == "taint" or before[key] == after[key]:
            continue
        if isinstance(before[key], list):
            gone = [v for v in before[key] if v not in after[key]]
            came = [v for v in after[key] if v not in before[key]]
            out.append(f"{key}: gone {gone[:5]!r}, came {came[:5]!r}")
        else:
            out.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    if after["taint"] != before["taint"] | taint:
        out.append(f"taint: {taint_letters(before['taint'])!r} -> {taint_letters(after['taint'])!r}, "
                   f"the kernel's rules give {taint_letters(before['taint'] | taint)!r}")
    return out
