"""/sys/module/<name>: what module tooling reads of a loaded module.

Created when the loader sets the module's sysfs up and removed when it is
freed, with the attributes kernel/module.c gives every module.
"""

from __future__ import annotations

from klpfs.kernel.module import Module, ModuleLoader, ModuleState
from klpfs.sysfs.kernfs import Kernfs, KernfsNode
from klpfs.sysfs.kobject import MODE_RO

_INITSTATE = {ModuleState.LIVE: "live", ModuleState.COMING: "coming", ModuleState.GOING: "going"}


class ModuleSysfs:
    def __init__(self, kernfs: Kernfs, module_kset: KernfsNode, loader: ModuleLoader):
        self._kernfs = kernfs
        self._kset = module_kset
        self._dirs: dict[str, KernfsNode] = {}
        loader.sysfs_setup.append(self.setup)
        loader.sysfs_teardown.append(self.teardown)

    def setup(self, mod: Module) -> None:
        kernfs = self._kernfs
        node = kernfs.create_dir(self._kset, mod.name)
        kernfs.create_file(node, "refcnt", MODE_RO, lambda: f"{mod.refcnt}\n")
        kernfs.create_file(node, "initstate", MODE_RO, lambda: f"{_INITSTATE.get(mod.state, 'unformed')}\n")
        kernfs.create_file(node, "taint", MODE_RO, lambda: f"{mod.taints}\n")
        kernfs.create_dir(node, "holders")
        if mod.params:
            params = kernfs.create_dir(node, "parameters")
            for name in mod.params:
                kernfs.create_file(params, name, MODE_RO, lambda name=name: f"{mod.params[name]}\n")
        self._dirs[mod.name] = node

    def teardown(self, mod: Module) -> None:
        node = self._dirs.pop(mod.name, None)
        if node is not None:
            self._kernfs.remove(node)
