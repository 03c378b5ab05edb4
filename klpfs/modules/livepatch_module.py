"""A livepatch module's code: build its klp_patch and register/enable it from
init, as the kernel's samples do for the running profile (spec §4.6).

Module files (TOML) and tests describe a patch module with these specs; each
load builds fresh structures, as a freshly loaded .ko has fresh static data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klpfs.kernel.kallsyms import FuncDef
from klpfs.kernel.module import Module
from klpfs.kernel.printk import KERN_NOTICE
from klpfs.livepatch.structs import KlpCallbacks, KlpFunc, KlpObject, KlpPatch

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


@dataclass
class PatchModuleSpec:
    name: str
    functions: list[FuncDef]
    objs: list[ObjectSpec]
    immediate: bool = False
    params: dict[str, object] = field(default_factory=dict)
    out_of_tree: bool = False
    signed: bool = True

    def build(self, lp: Livepatch, params: dict[str, object] | None = None) -> Module:
        """A Module ready for the loader; `params` override the defaults (insmod k=v)."""
        mod = Module(self.name, list(self.functions), livepatch=True, out_of_tree=self.out_of_tree,
                     signed=self.signed, params={**self.params, **(params or {})})
        mod.init = lambda m: self._init(lp, m)
        mod.exit = lambda m: self._exit(lp, m)
        return mod

    def _make_patch(self, mod: Module) -> KlpPatch:
        syms = {sym.name: sym for sym in mod.symbols}
        objs = []
        for o in self.objs:
            funcs = [KlpFunc(f.old_name, syms.get(f.new_func), f.old_sympos, f.immediate) for f in o.funcs]
            obj = KlpObject(o.name, funcs)
            obj.callbacks = KlpCallbacks(**{
                name: _bind(cb, mod) for name, cb in o.callbacks.items()})
            objs.append(obj)
        return KlpPatch(mod, objs, immediate=self.immediate)

    def _init(self, lp: Livepatch, mod: Module) -> int:
        patch = self._make_patch(mod)
        mod.data["patch"] = patch
        if lp.profile.immediate and not lp.reliable_stacks and not patch.immediate:
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
        return 0

    def _exit(self, lp: Livepatch, mod: Module) -> None:
        lp.klp_unregister_patch(mod.data["patch"])


def _bind(cb: Callback, mod: Module) -> Callable[[KlpObject], int]:
    def call(obj: KlpObject) -> int:
        ret = cb(mod, obj)
        return 0 if ret is None else ret
    return call

