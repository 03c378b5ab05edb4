"""/sys/module/<name>: what module tooling reads of a loaded module.

Created when the loader sets the module's sysfs up and removed when it is
freed, with the attributes kernel/module.c gives every module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from klpfs.kernel.module import Module, ModuleLoader, ModuleState, taint_letters
from klpfs.kernel.params import ParamError, ParamSpec, get_param, set_param
from klpfs.kernel.printk import KERN_ERR
from klpfs.sysfs.kernfs import Kernfs, KernfsNode
from klpfs.sysfs.kobject import MODE_RO

_INITSTATE = {ModuleState.LIVE: "live", ModuleState.COMING: "coming", ModuleState.GOING: "going"}


def _store(mod: Module, name: str, spec: ParamSpec, buf: bytes, printk_err: Callable[[str], None]) -> int:
    """param_attr_store(): the type's set function on the written text."""
    try:
        set_param(spec, mod.params, buf.decode("utf-8", "surrogateescape"), name, printk_err)
    except ParamError as e:
        return -e.errno
    return len(buf)


class ModuleSysfs:
    def __init__(self, kernfs: Kernfs, module_kset: KernfsNode, loader: ModuleLoader):
        self._kernfs = kernfs
        self._printk_err: Callable[[str], None] = lambda line: loader.printk(KERN_ERR, line)
        self._kset = module_kset
        self._dirs: dict[str, KernfsNode] = {}
        loader.sysfs_setup.append(self.setup)
        loader.sysfs_teardown.append(self.teardown)

    def setup(self, mod: Module) -> None:
        kernfs = self._kernfs
        node = kernfs.create_dir(self._kset, mod.name)
        kernfs.create_file(node, "refcnt", MODE_RO, lambda: f"{mod.refcnt}\n")
        kernfs.create_file(node, "initstate", MODE_RO, lambda: f"{_INITSTATE.get(mod.state, 'unformed')}\n")
        kernfs.create_file(node, "taint", MODE_RO, lambda: f"{taint_letters(mod.taint_mask)}\n")
        kernfs.create_dir(node, "holders")
        visible = {name: spec for name, spec in mod.param_specs.items() if spec.perm}
        if visible:
            params = kernfs.create_dir(node, "parameters")
            for name, spec in visible.items():
                kernfs.create_file(params, name, spec.perm, functools.partial(get_param, spec, mod.params),
                                   functools.partial(_store, mod, name, spec, printk_err=self._printk_err))
        self._dirs[mod.name] = node

    def teardown(self, mod: Module) -> None:
        node = self._dirs.pop(mod.name, None)
        if node is not None:
            self._kernfs.remove(node)
