"""A livepatch module's code: build its klp_patch and register/enable it from
init, as the kernel's samples do for the running profile (livepatch_init() in
samples/livepatch/livepatch-sample.c).

Tests describe a patch module with PatchModuleSpec and Python callables;
module files build the same structures through these functions.  Each load
builds fresh structures, as a freshly loaded .ko has fresh static data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from klpfs.kernel.kallsyms import FuncDef
from klpfs.kernel.module import Module
from klpfs.kernel.printk import KERN_NOTICE, KERN_WARNING
from klpfs.livepatch.structs import KlpCallbacks, KlpFunc, KlpObject, KlpPatch, KlpState

if TYPE_CHECKING:
    from klpfs.livepatch.core import Livepatch

Callback = Callable[[Module, KlpObject], int | None]
"""A callback as module code: gets the patch module and the object; pre_patch returns an int."""

CALLBACK_NAMES = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")


@dataclass
class FuncSpec:
    old_name: str
    new_func: str
    """Name of the replacement function among the module's own functions."""
    old_sympos: int = 0
    immediate: bool = False


@dataclass
class ObjectSpec:
    name: str | None
    """The target module's name, None for vmlinux."""
    funcs: list[FuncSpec] = field(default_factory=list)
    callbacks: dict[str, Callback] = field(default_factory=dict)


def build_klp_patch(mod: Module, objs: list[ObjectSpec], immediate: bool = False, replace: bool = False,
                    states: list[KlpState] | None = None) -> KlpPatch:
    """The module's static klp_patch, with new_func pointing at its own functions."""
    syms = {sym.name: sym for sym in mod.symbols}
    klp_objs = []
    for o in objs:
        funcs = [KlpFunc(f.old_name, syms.get(f.new_func), f.old_sympos, f.immediate) for f in o.funcs]
        callbacks = KlpCallbacks(**cast("dict[str, Any]", {name: _bind(cb, mod) for name, cb in o.callbacks.items()}))
        klp_objs.append(KlpObject(o.name, funcs, callbacks))
    return KlpPatch(mod, klp_objs, immediate=immediate, replace=replace, states=list(states or []))


def klp_sample_init(lp: Livepatch, mod: Module, patch: KlpPatch) -> int:
    """The samples' module_init: from 5.1 just klp_enable_patch(); before,
    register then enable, and a failed enable unregisters."""
    mod.data["patch"] = patch
    if not lp.profile.register_api:
        return lp.klp_enable_patch(patch)
    if lp.profile.immediate and not lp.reliable_stacks and not lp.immediate(patch):
        lp.kernel.printk(KERN_NOTICE, f"{mod.name}: The consistency model isn't supported for your "
                                      "architecture.  Bypassing safety mechanisms and applying the "
                                      "patch immediately.")
        patch.immediate = True
    ret = lp.klp_register_patch(patch)
    if ret:
        return ret
    ret = lp.klp_enable_patch(patch)
    if ret:
        lp.klp_unregister_patch(patch)
    return ret


def klp_sample_exit(lp: Livepatch, mod: Module) -> None:
    """The samples' module_exit: `WARN_ON(klp_unregister_patch(&patch))` (4.x; from 5.1
    there is nothing to do).  A patch its init never registered (init returned
    before) is refused with -EINVAL, and the WARN_ON fires."""
    if not lp.profile.register_api:
        return
    patch = mod.data.get("patch")
    if not isinstance(patch, KlpPatch) or lp.klp_unregister_patch(patch):
        kernel = lp.kernel
        task = kernel.current
        kernel.printk(KERN_WARNING, "------------[ cut here ]------------")
        kernel.printk(KERN_WARNING, f"WARNING: CPU: {task.cpu} PID: {task.pid} at {mod.name}_exit [{mod.name}]")
        kernel.printk(KERN_WARNING, "---[ end trace 0000000000000000 ]---")


@dataclass
class PatchModuleSpec:
    name: str
    functions: list[FuncDef]
    objs: list[ObjectSpec]
    immediate: bool = False
    livepatch: bool = True
    replace: bool = False
    states: list[tuple[int, int]] = field(default_factory=list)
    """(id, version) of each klp_state."""

    def build(self, lp: Livepatch) -> Module:
        """A Module ready for the loader."""
        mod = Module(self.name, list(self.functions), livepatch=self.livepatch)
        mod.init = lambda m: klp_sample_init(lp, m, build_klp_patch(
            m, self.objs, self.immediate, self.replace, [KlpState(i, v) for i, v in self.states]))
        mod.exit = lambda m: klp_sample_exit(lp, m)
        return mod


def _bind(cb: Callback, mod: Module) -> Callable[[KlpObject], int]:
    def call(obj: KlpObject) -> int:
        ret = cb(mod, obj)
        return 0 if ret is None else ret
    return call
