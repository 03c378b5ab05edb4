# samples/livepatch/livepatch-shadow-fix2.c (Linux 6.1, unchanged in 6.12), transliterated,
# with the forms the sample had before 4.17 (no shadow variable constructor or
# destructor: the counter starts from a copied 0, the fixed dummy_free frees
# the leak pointer itself) and before 5.1 (register, enable, unregister; on
# 4.15 the immediate fallback).
#
# Adds functionality to livepatch-shadow-mod's in-flight data structures
# through a shadow variable.  The livepatch patches a routine that
# periodically inspects data structures, incrementing a per-data-structure
# counter, creating the counter if needed.
#
# This module is not intended to be standalone.  See the "Usage" section of
# livepatch-shadow-mod.py.
#
# Pointers: a shadow variable's data is a block (`Mem`); `*shadow_count` is
# its `.value` (0 in a new, zeroed block).  Before 4.17, `&count` handed to
# klp_shadow_get_or_alloc() to copy from is passed as the value count holds.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

# Shadow variable enums
SV_LEAK = 1
SV_COUNTER = 2

# struct dummy {
#	struct list_head list;
#	unsigned long jiffies_expire;
# };
SIZEOF_INT = 4


def livepatch_fix2_dummy_check(d, jiffies):
    # Patch: handle in-flight dummy structures, if they do not
    # already have a SV_COUNTER shadow variable, then attach a
    # new one.
    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        count = 0
        shadow_count = klp_shadow_get_or_alloc(d, SV_COUNTER,
                                               count, SIZEOF_INT,  # &count, sizeof(count)
                                               GFP_NOWAIT)
    else:
        shadow_count = klp_shadow_get_or_alloc(d, SV_COUNTER,
                                               SIZEOF_INT, GFP_NOWAIT,  # sizeof(*shadow_count)
                                               NULL, NULL)
    if shadow_count:
        shadow_count.value += 1  # *shadow_count += 1

    return time_after(jiffies, d.jiffies_expire)


if LINUX_VERSION_CODE >= KERNEL_VERSION(4, 17, 0):
    def livepatch_fix2_dummy_leak_dtor(obj, shadow_data):
        d = obj
        shadow_leak = shadow_data

        pr_info("%s: dummy @ %p, prevented leak @ %p\n",
                __func__, d, shadow_leak.value)
        kfree(shadow_leak.value)


def livepatch_fix2_dummy_free(d):
    # Patch: copy the memory leak patch from the fix1 module.
    shadow_leak = klp_shadow_get(d, SV_LEAK)
    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        # Before 4.17 klp_shadow_free() takes no destructor.
        if shadow_leak:
            leak = shadow_leak.value
            klp_shadow_free(d, SV_LEAK)
            kfree(leak)
            pr_info("%s: dummy @ %p, prevented leak @ %p\n",
                    __func__, d, leak)
        else:
            pr_info("%s: dummy @ %p leaked!\n", __func__, d)
    else:
        if shadow_leak:
            klp_shadow_free(d, SV_LEAK, livepatch_fix2_dummy_leak_dtor)
        else:
            pr_info("%s: dummy @ %p leaked!\n", __func__, d)

    # Patch: fetch the SV_COUNTER shadow variable and display
    # the final count.  Detach the shadow variable.
    shadow_count = klp_shadow_get(d, SV_COUNTER)
    if shadow_count:
        pr_info("%s: dummy @ %p, check counter = %d\n",
                __func__, d, shadow_count.value)
        if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
            klp_shadow_free(d, SV_COUNTER)
        else:
            klp_shadow_free(d, SV_COUNTER, NULL)

    kfree(d)


funcs = [
    klp_func(old_name="dummy_check", new_func=livepatch_fix2_dummy_check),
    klp_func(old_name="dummy_free", new_func=livepatch_fix2_dummy_free),
]

objs = [
    klp_object(name="livepatch_shadow_mod", funcs=funcs),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def livepatch_shadow_fix2_init():
    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        # Before 5.1 a patch is registered, then enabled; a patch that fails
        # to enable is unregistered again.
        if LINUX_VERSION_CODE < KERNEL_VERSION(4, 16, 0):
            if not klp_have_reliable_stack() and not patch.immediate:
                # 4.15: without reliable stack traces the sample patches every
                # task at once (patch.immediate, gone in 4.16), and the patch
                # can then never be removed.
                patch.immediate = True
                pr_notice("The consistency model isn't supported for your architecture.  "
                          "Bypassing safety mechanisms and applying the patch immediately.\n")

        ret = klp_register_patch(patch)
        if ret:
            return ret
        ret = klp_enable_patch(patch)
        if ret:
            WARN_ON(klp_unregister_patch(patch))
            return ret
        return 0
    else:
        return klp_enable_patch(patch)


def livepatch_shadow_fix2_exit():
    # Cleanup any existing SV_COUNTER shadow variables
    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        klp_shadow_free_all(SV_COUNTER)
    else:
        klp_shadow_free_all(SV_COUNTER, NULL)

    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        WARN_ON(klp_unregister_patch(patch))


module_init(livepatch_shadow_fix2_init)
module_exit(livepatch_shadow_fix2_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
