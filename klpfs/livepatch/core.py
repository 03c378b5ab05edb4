"""Registration, enabling, disabling, sysfs and module notifiers
(kernel/livepatch/core.c).

Every public operation runs to completion without yielding to trio, which is
how klp_mutex is honoured: nothing else can observe or change livepatch
state half-way through.  Functions return 0 or a negative errno, as the
kernel's do.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from klpfs.kernel.kstrtox import kstrtobool
from klpfs.kernel.module import MODULE_NAME_LEN, PAGE_SIZE, ModuleState
from klpfs.kernel.oops import PageFault
from klpfs.kernel.printk import KERN_ERR, KERN_NOTICE, KERN_WARNING
from klpfs.kernel.sched import TIF_PATCH_PENDING
from klpfs.kernel.timers import DelayedWork
from klpfs.livepatch.callbacks import (
    klp_post_patch_callback, klp_post_unpatch_callback, klp_pre_patch_callback, klp_pre_unpatch_callback)
from klpfs.livepatch.debug import livepatch_callsites, register_livepatch_callsites
from klpfs.livepatch.patch import klp_patch_object, klp_unpatch_func, klp_unpatch_object, klp_unpatch_objects
from klpfs.livepatch.shadow import KlpShadow
from klpfs.livepatch.structs import (
    KLP_PATCHED, KLP_UNDEFINED, KLP_UNPATCHED, KlpFunc, KlpObject, KlpOps, KlpPatch, klp_is_module,
    klp_is_object_loaded)
from klpfs.livepatch.transition import (
    klp_cancel_transition, klp_cond_resched_switch, klp_force_transition, klp_init_transition, klp_reverse_transition,
    klp_send_signals, klp_start_transition, klp_transition_work_fn, klp_try_complete_transition,
    klp_update_patch_state)
from klpfs.livepatch.state import klp_is_patch_compatible
from klpfs.profiles import ENOSYS, ENOSYS_UNLESS_IMMEDIATE, EOPNOTSUPP
from klpfs.sysfs.kobject import MODE_RO, MODE_RW, MODE_WO, Attribute, kobject_add

SYSFS_FAULT_OFFSET = 0x1d
"""Where sysfs_kf_seq_show() faults reading a freed kobject's ktype (sysfs_file_ops()): the RIP
a 6.12 kernel printed; sysfs_kf_write() reads the same field first thing too."""
READ_TRACE = ("seq_read", "__vfs_read", "vfs_read", "SyS_read", "do_syscall_64", "entry_SYSCALL_64_after_hwframe")
WRITE_TRACE = ("kernfs_fop_write", "__vfs_write", "vfs_write", "SyS_write", "do_syscall_64",
               "entry_SYSCALL_64_after_hwframe")
"""The call traces of those faults, from read(2) and write(2), in the image's function names."""
KOBJ_KTYPE_OFFSET = 0x58
"""offsetof(struct klp_patch, kobj.ktype) on x86-64 (include/linux/livepatch.h, kobject.h)."""

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.module import Module
    from klpfs.profiles import Profile
    from klpfs.sysfs.kernfs import Kernfs, KernfsNode


class Livepatch:
    """The subsystem's global state (klp_patches, klp_ops, the transition) and its API."""

    def __init__(self, kernel: Kernel, profile: Profile, kernfs: Kernfs, kernel_kobj: KernfsNode,
                 reliable_stacks: bool = True):
        self.kernel = kernel
        self.profile = profile
        self.kernfs = kernfs
        self.reliable_stacks = reliable_stacks
        """klp_have_reliable_stack() in include/linux/livepatch.h: the arch can check stacks."""
        self.klp_patches: list[KlpPatch] = []
        self.klp_ops: list[KlpOps] = []
        self.klp_transition_patch: KlpPatch | None = None
        self.klp_target_state = KLP_UNDEFINED
        self.klp_forced = False
        """4.16's global flag: after any forced transition no patch module is released."""
        self.klp_signals_cnt = 0
        self.shadow = KlpShadow(kernel)
        self.klp_transition_work = DelayedWork(kernel.timers, lambda: klp_transition_work_fn(self))
        self.debug_sites = livepatch_callsites(profile.livepatch_sources)
        """The core's pr_debug() callsites, by what they print (klpfs.livepatch.debug)."""
        register_livepatch_callsites(kernel.dyndbg, self.debug_sites)
        # klp_init: /sys/kernel/livepatch, then the places the kernel calls us.
        self.klp_root_kobj = kernfs.create_dir(kernel_kobj, "livepatch")
        kernel.modules.klp_coming = self.klp_module_coming
        kernel.modules.klp_going = self.klp_module_going
        kernel.modules.free_notifiers.append(self._module_freed)
        kernel.sched.exit_work[TIF_PATCH_PENDING] = lambda task: klp_update_patch_state(self, task)
        if profile.cond_resched_switch:
            kernel.sched.resched_work[TIF_PATCH_PENDING] = lambda task: klp_cond_resched_switch(self, task)

    def pr(self, level: int, text: str) -> None:
        """pr_*() with this subsystem's pr_fmt prefix."""
        self.kernel.printk(level, f"livepatch: {text}")

    def pr_debug(self, site: str, text: str) -> None:
        """pr_debug() through the core's callsite `site`: printed only while it has `p`."""
        self.kernel.dyndbg.pr_debug(self.debug_sites[site], f"livepatch: {text}")

    def immediate(self, patch: KlpPatch) -> bool:
        """patch->immediate, which exists only where the profile has it (4.15)."""
        return self.profile.immediate and patch.immediate

    def func_immediate(self, func: KlpFunc) -> bool:
        """func->immediate, likewise (4.15 only)."""
        return self.profile.immediate and func.immediate

    def klp_is_patch_registered(self, patch: KlpPatch) -> bool:
        return any(p is patch for p in self.klp_patches)

    # -- symbol lookup ---------------------------------------------------------

    def klp_find_object_symbol(self, objname: str | None, name: str, sympos: int) -> int:
        """The address of the sympos-th `name` in the object, or -EINVAL with a message."""
        # klp_find_callback() over kallsyms_on_each_symbol(): the matches in table order,
        # counted up to the one asked for (or, without sympos, to a second).
        count = 0
        addr = 0
        for sym in self.kernel.kallsyms.find_all(name, objname):
            addr = sym.addr
            count += 1
            if (sympos and count == sympos) or (not sympos and count > 1):
                break
        if addr == 0:
            self.pr(KERN_ERR, f"symbol '{name}' not found in symbol table")
        elif count > 1 and sympos == 0:
            self.pr(KERN_ERR, f"unresolvable ambiguity for symbol '{name}' in object '{objname or '(null)'}'")
        elif sympos != count and sympos > 0:
            self.pr(KERN_ERR, f"symbol position {sympos} for symbol '{name}' in object "
                              f"'{objname or 'vmlinux'}' not found")
        else:
            return addr
        return -errno.EINVAL

    # -- registration ----------------------------------------------------------------

    def _check_livepatch_module(self, patch: KlpPatch) -> int:
        """The module must be marked, and the arch able to check stacks (klp_register_patch(),
        from 5.1 klp_enable_patch(), in kernel/livepatch/core.c)."""
        assert patch.mod is not None
        if not patch.mod.livepatch:
            self.pr(KERN_ERR, f"module {patch.mod.name} is not marked as a livepatch module")
            return -errno.EINVAL
        if self.reliable_stacks:
            return 0
        policy = self.profile.no_reliable_stack
        if policy == ENOSYS_UNLESS_IMMEDIATE and self.immediate(patch):
            return 0
        self.pr(KERN_ERR if policy != "warn" else KERN_WARNING,
                "This architecture doesn't have support for the livepatch consistency model.")
        if policy in (ENOSYS, ENOSYS_UNLESS_IMMEDIATE):
            return -errno.ENOSYS
        if policy == EOPNOTSUPP:
            return -errno.EOPNOTSUPP
        self.pr(KERN_WARNING, "The livepatch transition may never complete.")
        return 0

    def klp_register_patch(self, patch: KlpPatch) -> int:
        """4.x: build the sysfs tree and put the patch on the list, disabled."""
        if patch is None or patch.mod is None:
            return -errno.EINVAL
        ret = self._check_livepatch_module(patch)
        if ret:
            return ret
        if patch.objs is None:
            return -errno.EINVAL
        ret = self._klp_init_patch(patch)
        if ret:
            self._klp_free_objects(patch.objs)
            self._remove_kobj(patch)
        return ret

    def _klp_init_patch(self, patch: KlpPatch) -> int:
        """The sysfs tree (with nops for a replace patch), then onto the list's tail.

        On failure the caller frees what was made.
        """
        assert patch.objs is not None
        patch.enabled = False
        kobj = kobject_add(self.kernfs, self.klp_root_kobj, patch.name, self.kernel.printk,
                           self._patch_attrs(patch))
        if isinstance(kobj, int):
            return kobj
        patch.kobj = kobj
        if patch.replace:
            self._klp_add_nops(patch)
        for obj in patch.objs:
            ret = self._klp_init_object(patch, obj)
            if ret:
                return ret
        self.klp_patches.append(patch)
        return 0

    def _klp_add_nops(self, patch: KlpPatch) -> None:
        """Atomic replace: a nop for every function an older patch changes and this
        one does not, in a dynamic object where this patch has none."""
        assert patch.objs is not None
        for old in self.klp_patches:
            for old_obj in old.objs or ():
                obj = next((o for o in patch.objs if o.name == old_obj.name), None)
                if obj is None:
                    obj = KlpObject(old_obj.name, [], dynamic=True)
                    patch.objs.append(obj)
                assert obj.funcs is not None
                for old_func in old_obj.funcs or ():
                    if any(f.old_name == old_func.old_name and f.old_sympos == old_func.old_sympos
                           for f in obj.funcs):
                        continue
                    obj.funcs.append(KlpFunc(old_func.old_name, None, old_func.old_sympos, nop=True))

    def _patch_attrs(self, patch: KlpPatch) -> Iterator[Attribute]:
        attrs = [Attribute("enabled", MODE_RW, lambda: f"{int(patch.enabled)}\n",
                           lambda buf: self._enabled_store(patch, buf)),
                 Attribute("transition", MODE_RO, lambda: f"{int(patch is self.klp_transition_patch)}\n")]
        if self.profile.sysfs_signal:
            attrs.append(Attribute("signal", MODE_WO, store=lambda buf: self._transition_action_store(
                patch, buf, klp_send_signals)))
        if self.profile.sysfs_force:
            attrs.append(Attribute("force", MODE_WO, store=lambda buf: self._transition_action_store(
                patch, buf, klp_force_transition)))
        if self.profile.sysfs_replace:
            attrs.append(Attribute("replace", MODE_RO, lambda: f"{int(patch.replace)}\n"))
        if self.profile.sysfs_stack_order:
            attrs.append(Attribute("stack_order", MODE_RO, lambda: f"{self._stack_order(patch)}\n"))
        return (self._faulting(patch, attr) for attr in attrs)

    def _faulting(self, patch: KlpPatch, attr: Attribute) -> Attribute:
        """The attribute of one of the patch's kobjects, which live in its module's memory:
        once that is freed under it (`rmmod -f`), sysfs_kf_seq_show() and sysfs_kf_write()
        fault reading the kobject's ktype (sysfs_file_ops()) before any show or store runs."""
        def show() -> str:
            if patch.freed_at:
                raise PageFault(self.kernel, patch.freed_at, "sysfs_kf_seq_show", SYSFS_FAULT_OFFSET, READ_TRACE)
            assert attr.show is not None
            return attr.show()

        def store(buf: bytes) -> int:
            if patch.freed_at:
                raise PageFault(self.kernel, patch.freed_at, "sysfs_kf_write", SYSFS_FAULT_OFFSET, WRITE_TRACE)
            assert attr.store is not None
            return attr.store(buf)

        return Attribute(attr.name, attr.mode, show if attr.show is not None else None,
                         store if attr.store is not None else None)

    def _module_freed(self, mod: Module) -> None:
        """free_module() of a patch module whose patch is still registered (only `rmmod -f`
        gets there): the klp_patch, its objects and their kobjects were in the module's
        data, and the sysfs tree still points at them."""
        for patch in self.klp_patches:
            if patch.mod is mod and not patch.freed_at:
                base = min((sym.addr for sym in mod.symbols), default=0)
                end = max((sym.addr + sym.size for sym in mod.symbols), default=base)
                text = -(-(end - base) // PAGE_SIZE) * PAGE_SIZE
                # The klp_patch first in .data, after the text and the read-only data pages.
                patch.freed_at = base + text + PAGE_SIZE + KOBJ_KTYPE_OFFSET
                for obj in patch.objs or ():
                    for func in obj.funcs or ():
                        func.freed_at = patch.freed_at

    def _stack_order(self, patch: KlpPatch) -> int:
        """1-based position on the list, oldest first; a patch already off the
        list (being freed) counts them all, as the kernel's loop does."""
        order = 0
        for p in self.klp_patches:
            order += 1
            if p is patch:
                break
        return order

    def _object_attrs(self, patch: KlpPatch, obj: KlpObject) -> Iterator[Attribute]:
        if self.profile.sysfs_patched:
            yield self._faulting(patch, Attribute("patched", MODE_RO, lambda: f"{int(obj.patched)}\n"))

    def _klp_init_object(self, patch: KlpPatch, obj: KlpObject) -> int:
        if obj.funcs is None:
            return -errno.EINVAL
        if self.profile.name_limits and obj.name is not None and len(obj.name) >= MODULE_NAME_LEN:
            return -errno.EINVAL
        obj.patched = False
        obj.mod = None
        if klp_is_module(obj) and obj.name is not None:
            mod = self.kernel.modules.find_module(obj.name)
            if mod is not None and mod.klp_alive:
                obj.mod = mod
        assert patch.kobj is not None
        kobj = kobject_add(self.kernfs, patch.kobj, obj.display_name, self.kernel.printk,
                           self._object_attrs(patch, obj))
        if isinstance(kobj, int):
            return kobj
        obj.kobj = kobj
        for func in obj.funcs:
            ret = self._klp_init_func(obj, func)
            if ret:
                return ret
        if klp_is_object_loaded(obj):
            return self._klp_init_object_loaded(patch, obj)
        return 0

    def _klp_init_func(self, obj: KlpObject, func: KlpFunc) -> int:
        if func.old_name is None or (func.new_func is None and not func.nop):
            return -errno.EINVAL
        if self.profile.name_limits and len(func.old_name) >= self.profile.ksym_name_len:
            return -errno.EINVAL
        func.patched = False
        func.transition = False
        assert obj.kobj is not None
        kobj = kobject_add(self.kernfs, obj.kobj, func.kobj_name, self.kernel.printk)
        if isinstance(kobj, int):
            return kobj
        func.kobj = kobj
        return 0

    def _klp_init_object_loaded(self, patch: KlpPatch, obj: KlpObject) -> int:
        """Resolve old_addr and the sizes of every func of a loaded object."""
        kallsyms = self.kernel.kallsyms
        if klp_is_module(obj) and obj.relocs is not None:
            # Module-specific klp relocations are written once the module is there (6.1).
            ret = obj.relocs()
            if ret:
                return ret
        for func in obj.funcs or ():
            assert func.old_name is not None
            addr = self.klp_find_object_symbol(obj.name, func.old_name, func.old_sympos)
            if addr < 0:
                return addr
            func.old_addr = addr
            old = kallsyms.lookup(func.old_addr)
            if old is None:
                self.pr(KERN_ERR, f"kallsyms size lookup failed for '{func.old_name}'")
                return -errno.ENOENT
            func.old_size = old.size
            if func.nop:
                func.new_func = old
            assert func.new_func is not None
            new = kallsyms.lookup(func.new_func.addr)
            if new is None:
                self.pr(KERN_ERR, f"kallsyms size lookup failed for '{func.old_name}' replacement")
                return -errno.ENOENT
            func.new_size = new.size
        return 0

    def _klp_free_object(self, obj: KlpObject) -> None:
        """The object's function directories, then its own."""
        if obj.kobj is not None:
            self.kernfs.remove(obj.kobj)
        obj.kobj = None
        for func in obj.funcs or ():
            func.kobj = None

    def _klp_free_objects(self, objs: list[KlpObject]) -> None:
        for obj in objs:
            self._klp_free_object(obj)

    def _remove_kobj(self, patch: KlpPatch) -> None:
        if patch.kobj is not None:
            self.kernfs.remove(patch.kobj)
            patch.kobj = None

    def klp_free_patch_start(self, patch: KlpPatch) -> None:
        """5.1+: off the list, object and function directories gone."""
        if patch in self.klp_patches:
            self.klp_patches.remove(patch)
        self._klp_free_objects(patch.objs or [])

    def klp_free_patch_finish(self, patch: KlpPatch) -> None:
        """5.1+: the patch directory goes, then the module is released unless forced."""
        self._remove_kobj(patch)
        if not patch.forced:
            assert patch.mod is not None
            self.kernel.modules.module_put(patch.mod)

    def klp_free_patch_async(self, patch: KlpPatch) -> None:
        """Start now; the rest from a work item, right after the current operation."""
        self.klp_free_patch_start(patch)
        self.kernel.timers.call_later(0, lambda: self.klp_free_patch_finish(patch))

    def klp_free_replaced_patches_async(self, new_patch: KlpPatch) -> None:
        for old in [p for p in self.klp_patches if p is not new_patch]:
            self.klp_free_patch_async(old)

    def klp_unpatch_replaced_patches(self, new_patch: KlpPatch) -> None:
        for old in self.klp_patches:
            if old is new_patch:
                break
            old.enabled = False
            klp_unpatch_objects(self, old)

    def klp_discard_nops(self, patch: KlpPatch) -> None:
        """Once a replace patch is in place its nops and dynamic objects go."""
        assert patch.objs is not None
        for obj in list(patch.objs):
            assert obj.funcs is not None
            for func in [f for f in obj.funcs if f.nop]:
                klp_unpatch_func(self, func)
                if func.kobj is not None:
                    self.kernfs.remove(func.kobj)
                obj.funcs.remove(func)
            if obj.dynamic:
                klp_unpatch_object(self, obj)
                self._klp_free_object(obj)
                patch.objs.remove(obj)

    def klp_unregister_patch(self, patch: KlpPatch) -> int:
        """Only `enabled` is checked, so an unpatching transition does not stop it."""
        if not self.klp_is_patch_registered(patch):
            return -errno.EINVAL
        if patch.enabled:
            return -errno.EBUSY
        self._klp_free_objects(patch.objs or [])
        self.klp_patches.remove(patch)
        assert patch.kobj is not None
        self.kernfs.remove(patch.kobj)
        patch.kobj = None
        return 0

    # -- enable / disable -----------------------------------------------------------------

    def klp_enable_patch(self, patch: KlpPatch) -> int:
        """4.x: enable a registered patch.  5.1+: the whole job, from the module's
        init: check, take the module, build the tree, enable; on any error the
        patch is freed again."""
        if self.profile.register_api:
            if not self.klp_is_patch_registered(patch):
                return -errno.EINVAL
            return self._klp_enable_patch(patch)
        if patch is None or patch.mod is None:
            return -errno.EINVAL
        # 5.17 moved the NULL objs/funcs checks ahead of everything else.
        null_checks = (patch.objs is None or any(obj.funcs is None for obj in patch.objs))
        if null_checks and self.profile.null_checks_first:
            return -errno.EINVAL
        ret = self._check_livepatch_module(patch)
        if ret:
            return ret
        if self.profile.system_states and not klp_is_patch_compatible(self, patch):
            self.pr(KERN_ERR, f"Livepatch patch ({patch.name}) is not compatible with the "
                              "already installed livepatches.")
            return -errno.EINVAL
        if null_checks:
            return -errno.EINVAL
        if not self.kernel.modules.try_module_get(patch.mod):
            return -errno.ENODEV
        patch.forced = False
        ret = self._klp_init_patch(patch)
        if ret == 0:
            ret = self._klp_enable_patch(patch)
        if ret:
            self.klp_free_patch_start(patch)
            self.klp_free_patch_finish(patch)
        return ret

    def _klp_enable_patch(self, patch: KlpPatch) -> int:
        if self.klp_transition_patch is not None:
            return -errno.EBUSY
        if patch.enabled:
            return -errno.EINVAL
        if self.profile.stacking_rule:
            i = self.klp_patches.index(patch)
            if i > 0 and not self.klp_patches[i - 1].enabled:
                return -errno.EBUSY
        assert patch.mod is not None
        # 5.1+ took the module reference before building the patch.
        if self.profile.register_api and not self.kernel.modules.try_module_get(patch.mod):
            return -errno.ENODEV
        self.pr(KERN_NOTICE, f"enabling patch '{patch.name}'")
        klp_init_transition(self, patch, KLP_PATCHED)
        for obj in patch.objs or ():
            if not klp_is_object_loaded(obj):
                continue
            ret = klp_pre_patch_callback(obj)
            if ret:
                self.pr(KERN_WARNING, f"pre-patch callback failed for object '{obj.display_name}'")
                return self._enable_failed(patch, ret)
            ret = klp_patch_object(self, obj)
            if ret:
                self.pr(KERN_WARNING, f"failed to patch object '{obj.display_name}'")
                return self._enable_failed(patch, ret)
        klp_start_transition(self)
        patch.enabled = True
        klp_try_complete_transition(self)
        return 0

    def _enable_failed(self, patch: KlpPatch, ret: int) -> int:
        self.pr(KERN_WARNING, f"failed to enable patch '{patch.name}'")
        klp_cancel_transition(self)
        return ret

    def klp_disable_patch(self, patch: KlpPatch) -> int:
        """The 4.x API (5.1 removed it: patches are disabled through sysfs)."""
        if not self.klp_is_patch_registered(patch):
            return -errno.EINVAL
        if not patch.enabled:
            return -errno.EINVAL
        return self._klp_disable_patch(patch)

    def _klp_disable_patch(self, patch: KlpPatch) -> int:
        if not patch.enabled:
            return -errno.EINVAL
        if self.klp_transition_patch is not None:
            return -errno.EBUSY
        if self.profile.stacking_rule:
            i = self.klp_patches.index(patch)
            if i + 1 < len(self.klp_patches) and self.klp_patches[i + 1].enabled:
                return -errno.EBUSY
        klp_init_transition(self, patch, KLP_UNPATCHED)
        for obj in patch.objs or ():
            if obj.patched:
                klp_pre_unpatch_callback(obj)
        klp_start_transition(self)
        patch.enabled = False
        klp_try_complete_transition(self)
        return 0

    # -- sysfs stores (enabled_store(), signal_store(), force_store() in kernel/livepatch/core.c) ---

    def _enabled_store(self, patch: KlpPatch, buf: bytes) -> int:
        enabled = kstrtobool(buf)
        if enabled is None:
            return -errno.EINVAL
        if not self.klp_is_patch_registered(patch):
            return -errno.EINVAL
        if patch.enabled == enabled:
            return -errno.EINVAL
        if patch is self.klp_transition_patch:
            klp_reverse_transition(self)
            ret = 0
        elif enabled:
            # 5.1+: a disabled patch is on its way to being freed; reload the module instead.
            ret = self._klp_enable_patch(patch) if self.profile.reenable else -errno.EINVAL
        else:
            ret = self._klp_disable_patch(patch)
        return ret or len(buf)

    def _transition_action_store(self, patch: KlpPatch, buf: bytes,
                                 action: Callable[[Livepatch], None]) -> int:
        """signal and force: `0` is accepted and does nothing; `1` acts on this
        patch's transition, which must be the running one (signal_store() and force_store()
        in kernel/livepatch/core.c)."""
        value = kstrtobool(buf)
        if value is None:
            return -errno.EINVAL
        if not value:
            return len(buf)
        if patch is not self.klp_transition_patch:
            return -errno.EINVAL
        action(self)
        return len(buf)

    # -- module notifiers (klp_module_coming(), klp_module_going()) --------------------------------

    def _module_object(self, patch: KlpPatch, mod: Module) -> KlpObject | None:
        """The patch's first object for this module, if any."""
        for obj in patch.objs or ():
            if klp_is_module(obj) and obj.name == mod.name:
                return obj
        return None

    def klp_module_coming(self, mod: Module) -> int:
        if mod.state is not ModuleState.COMING:
            return -errno.EINVAL
        if self.profile.vmlinux_name_check and mod.name == "vmlinux":
            self.pr(KERN_ERR, "vmlinux.ko: invalid module name")
            return -errno.EINVAL
        mod.klp_alive = True
        for patch in self.klp_patches:
            obj = self._module_object(patch, mod)
            if obj is None:
                continue
            obj.mod = mod
            ret = self._klp_init_object_loaded(patch, obj)
            if ret:
                self.pr(KERN_WARNING, f"failed to initialize patch '{patch.name}' for module '{mod.name}' ({ret})")
                return self._module_coming_failed(mod, patch, obj, ret)
            if patch is not self.klp_transition_patch and not patch.enabled:
                continue
            self.pr(KERN_NOTICE, f"applying patch '{patch.name}' to loading module '{mod.name}'")
            ret = klp_pre_patch_callback(obj)
            if ret:
                self.pr(KERN_WARNING, f"pre-patch callback failed for object '{obj.name}'")
                return self._module_coming_failed(mod, patch, obj, ret)
            ret = klp_patch_object(self, obj)
            if ret:
                self.pr(KERN_WARNING, f"failed to apply patch '{patch.name}' to module '{mod.name}' ({ret})")
                klp_post_unpatch_callback(obj)
                return self._module_coming_failed(mod, patch, obj, ret)
            if patch is not self.klp_transition_patch:
                klp_post_patch_callback(obj)
        return 0

    def _module_coming_failed(self, mod: Module, patch: KlpPatch, obj: KlpObject, ret: int) -> int:
        self.pr(KERN_WARNING, f"patch '{patch.name}' failed for module '{mod.name}', "
                              f"refusing to load module '{mod.name}'")
        mod.klp_alive = False
        # The later fix (obj->mod = NULL in klp_module_coming()'s error path): the
        # failing object forgets the module too, so it does not count as loaded
        # once the module is gone.
        self._forget_module(obj)
        self._klp_cleanup_module_patches_limited(mod, patch)
        return ret

    def klp_module_going(self, mod: Module) -> None:
        if mod.state not in (ModuleState.GOING, ModuleState.COMING):
            return
        mod.klp_alive = False
        self._klp_cleanup_module_patches_limited(mod, None)

    def _klp_cleanup_module_patches_limited(self, mod: Module, limit: KlpPatch | None) -> None:
        for patch in self.klp_patches:
            if patch is limit:
                break
            obj = self._module_object(patch, mod)
            if obj is None:
                continue
            if patch.enabled or patch is self.klp_transition_patch:
                if patch is not self.klp_transition_patch:
                    klp_pre_unpatch_callback(obj)
                self.pr(KERN_NOTICE, f"reverting patch '{patch.name}' on unloading module '{mod.name}'")
                klp_unpatch_object(self, obj)
                klp_post_unpatch_callback(obj)
            self._forget_module(obj)

    @staticmethod
    def _forget_module(obj: KlpObject) -> None:
        """klp_free_object_loaded: the object and func directories stay."""
        obj.mod = None
        for func in obj.funcs or ():
            func.old_addr = 0
