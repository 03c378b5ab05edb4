"""A Python module that supplies a real .ko's behaviour (X.py beside X.ko, or named).

Machine code cannot run here, and what klpfs.elf.bodies recovers from it is
limited; a Python module written against klpfs.kapi can say exactly what the
C does.  It wins over the recovered bodies, but only if it describes the same
module, checked before anything is loaded:

* the same module name;
* every top-level function of the .py is a function of the .ko (kallsyms
  stays the .ko's: its functions, in its order, with its real sizes -- .ko
  functions the .py lacks keep their recovered bodies);
* the same parameters, with the same types;
* for a livepatch module, the same patch: the .py's module-level klp_patch
  has the .ko's objects, and in each the same functions (old_name,
  old_sympos, new_func by name) and the same callbacks (slot and function
  name), the same `replace` and the same states.

The .py's init and exit run in place of the .ko's, its globals hold the
parameters; the .ko's checks (vermagic, symbols, relocations), size, taints
and signature stay.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klpfs.elf.bodies import Runtime
from klpfs.elf.klp import KoPatch
from klpfs.elf.kmod import KoError, KoFile
from klpfs.kernel.kallsyms import FuncDef
from klpfs.livepatch.structs import KlpPatch

if TYPE_CHECKING:
    from klpfs.kernel.module import Module
    from klpfs.system import System

Description = tuple[bool, list[tuple[str | None, list[tuple[str | None, int, str | None]], list[tuple[str, str]]]],
                    list[tuple[int, int]]]


def _name(fn: Any) -> str | None:
    return None if fn is None else getattr(fn, "name", None) or getattr(fn, "__name__", None)


def describe_ko(kp: KoPatch) -> Description:
    objs = [(o.name, sorted((f.old_name, f.old_sympos, f.new_func) for f in o.funcs or ()),
             sorted(o.callbacks.items())) for o in kp.objs or ()]
    return kp.replace, objs, sorted(kp.states)


def describe_py(patch: KlpPatch) -> Description:
    objs = []
    for o in patch.objs or ():
        cbs = o.callbacks
        callbacks = sorted((slot, str(_name(getattr(cbs, slot)))) for slot in
                           ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")
                           if getattr(cbs, slot) is not None)
        objs.append((o.name, sorted((f.old_name, f.old_sympos, _name(f.new_func)) for f in o.funcs or ()),
                     callbacks))
    return patch.replace, objs, sorted((s.id, s.version) for s in patch.states)


def _mismatch(ko: KoFile, py: str, what: str) -> KoError:
    return KoError(errno.ENOEXEC, f"{py} does not describe {ko.path.name}: {what}")


def with_behaviour(ko: KoFile, ko_mod: Module, py_path: str, text: str, system: System) -> Module:
    """The .py's module, with the .ko's functions and facts; KoError if the two disagree."""
    from klpfs.modules.pymodule import PyModuleError, build_pymodule
    py = Path(py_path)
    try:
        mod = build_pymodule(py, text, system)
    except PyModuleError as e:
        raise KoError(e.errno, f"{ko.path}: its behaviour module: {e}") from None
    if mod.name != ko.name:
        raise _mismatch(ko, py.name, f"it is module {mod.name!r}, the .ko is {ko.name!r}")
    ko_funcs = {f.name: f for f in ko_mod.funcs}
    extra = [f.name for f in mod.funcs if f.name not in ko_funcs]
    if extra:
        raise _mismatch(ko, py.name, f"{', '.join(extra)}: not a function of the .ko")
    py_params = {name: spec.type for name, spec in mod.param_specs.items()}
    ko_params = {name: spec.type for name, spec in ko_mod.param_specs.items()}
    if py_params != ko_params:
        raise _mismatch(ko, py.name, f"parameters {py_params}, the .ko has {ko_params}")
    found = ko_mod.data.get("ko_patch")
    kp = found if isinstance(found, KoPatch) else None
    ns = mod.data["context"].ns  # type: ignore[attr-defined]
    patches = [v for v in ns.values() if isinstance(v, KlpPatch)]
    if kp is not None:
        if len(patches) != 1:
            raise _mismatch(ko, py.name, f"{len(patches)} module-level klp_patch, the .ko has one "
                                         f"({'; '.join(kp.describe())})")
        if describe_py(patches[0]) != describe_ko(kp):
            raise _mismatch(ko, py.name, f"its patch {describe_py(patches[0])}, the .ko's {describe_ko(kp)}")
    elif patches:
        raise _mismatch(ko, py.name, "it has a klp_patch, the .ko has none")
    py_funcs = {f.name: f for f in mod.funcs}
    mod.funcs = [FuncDef(f.name, f.size, py_funcs[f.name].body if f.name in py_funcs else f.body, f.traceable)
                 for f in ko_mod.funcs]
    mod.livepatch = ko_mod.livepatch
    runtime = ko_mod.data.get("runtime")
    if isinstance(runtime, Runtime):
        runtime.module = mod  # the .ko's recovered bodies read the .py's globals
    mod.check_symbols = ko_mod.check_symbols
    mod.data["ko_patch"] = kp
    return mod
