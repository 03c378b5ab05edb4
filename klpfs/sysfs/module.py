"""/sys/module/<name>: what module tooling reads of a loaded module.

Created when the loader sets the module's sysfs up and removed when it is
freed, with the attributes kernel/module.c gives every module.
"""

from __future__ import annotations

import errno

from klpfs.kernel.module import Module, ModuleLoader, ModuleState, taint_letters
from klpfs.kernel.params import param_get, param_set
from klpfs.sysfs.kernfs import Kernfs, KernfsNode
from klpfs.sysfs.kobject import MODE_RO

_INITSTATE = {ModuleState.LIVE: "live", ModuleState.COMING: "coming", ModuleState.GOING: "going"}


def _store(mod: Module, name: str, ptype: str, buf: bytes) -> int:
    value = param_set(ptype, buf.decode(errors="replace"))
    if value is None:
        return -errno.EINVAL
    mod.params[name] = value
    return len(buf)


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
        kernfs.create_file(node, "taint", MODE_RO, lambda: f"{taint_letters(mod.taint_mask)}\n")
        kernfs.create_dir(node, "holders")
        visible = {name: spec for name, spec in mod.param_specs.items() if spec[1]}
        if visible:
            params = kernfs.create_dir(node, "parameters")
            for name, (ptype, perm) in visible.items():
                kernfs.create_file(params, name, perm, lambda name=name: param_get(mod.params[name]),
                                   lambda buf, name=name, ptype=ptype: _store(mod, name, ptype, buf))
        self._dirs[mod.name] = node

    def teardown(self, mod: Module) -> None:
        node = self._dirs.pop(mod.name, None)
        if node is not None:
            self._kernfs.remove(node)
