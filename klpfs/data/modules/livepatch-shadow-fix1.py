# samples/livepatch/livepatch-shadow-fix1.c (Linux 6.1, unchanged in 6.12), transliterated,
# with the forms the sample had before 4.17 (no shadow variable constructor or
# destructor: the fixed functions copy and free the leak pointer themselves)
# and before 5.1 (register, enable, unregister; on 4.15 the immediate
# fallback).
#
# Fixes the memory leak introduced in livepatch-shadow-mod through the use
# of a shadow variable.  This fix demonstrates the "extending" of
# short-lived data structures by patching its allocation and release
# functions.
#
# This module is not intended to be standalone.  See the "Usage" section of
# livepatch-shadow-mod.py.
#
# Pointers: a shadow variable's data is a block (`Mem`); `*shadow_leak` is
# its `.value`.  `&leak`, a local's address handed to the constructor (or,
# before 4.17, copied from by klp_shadow_alloc), is passed as the pointer
# the local holds: `*leak` there is `leak`.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

# Shadow variable enums
SV_LEAK = 1

# Allocate new dummies every second
ALLOC_PERIOD = 1
# Check for expired dummies after a few new ones have been allocated
CLEANUP_PERIOD = 3 * ALLOC_PERIOD
# Dummies expire after a few cleanup instances
EXPIRE_PERIOD = 4 * CLEANUP_PERIOD

# struct dummy {
#	struct list_head list;
#	unsigned long jiffies_expire;
# };
SIZEOF_DUMMY = 24
SIZEOF_INT = 4
SIZEOF_POINTER = 8


if LINUX_VERSION_CODE >= KERNEL_VERSION(4, 17, 0):
    # The constructor makes more sense together with klp_shadow_get_or_alloc().
    # In this example, it would be safe to assign the pointer also to the shadow
    # variable returned by klp_shadow_alloc().  But we wanted to show the more
    # complicated use of the API.
    def shadow_leak_ctor(obj, shadow_data, ctor_data):
        shadow_leak = shadow_data
        leak = ctor_data

        if not ctor_data:
            return -EINVAL

        shadow_leak.value = leak  # *shadow_leak = *leak
        return 0


def livepatch_fix1_dummy_alloc():
    d = kzalloc(SIZEOF_DUMMY, GFP_KERNEL)  # sizeof(*d)
    if not d:
        return NULL

    d.jiffies_expire = jiffies + msecs_to_jiffies(1000 * EXPIRE_PERIOD)

    # Patch: save the extra memory location into a SV_LEAK shadow
    # variable.  A patched dummy_free routine can later fetch this
    # pointer to handle resource release.
    leak = kzalloc(SIZEOF_INT, GFP_KERNEL)  # sizeof(*leak)
    if not leak:
        kfree(d)  # goto err_leak
        return NULL

    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        # Before 4.17: the new variable starts as a copy of *data (&leak).
        klp_shadow_alloc(d, SV_LEAK, leak, SIZEOF_POINTER, GFP_KERNEL)
    else:
        shadow_leak = klp_shadow_alloc(d, SV_LEAK, SIZEOF_POINTER, GFP_KERNEL,  # sizeof(leak)
                                       shadow_leak_ctor, leak)
        if not shadow_leak:
            pr_err("%s: failed to allocate shadow variable for the leaking pointer: dummy @ %p, leak @ %p\n",
                   __func__, d, leak)
            kfree(leak)  # goto err_shadow
            kfree(d)
            return NULL

    pr_info("%s: dummy @ %p, expires @ %lx\n",
            __func__, d, d.jiffies_expire)

    return d


if LINUX_VERSION_CODE >= KERNEL_VERSION(4, 17, 0):
    def livepatch_fix1_dummy_leak_dtor(obj, shadow_data):
        d = obj
        shadow_leak = shadow_data

        pr_info("%s: dummy @ %p, prevented leak @ %p\n",
                __func__, d, shadow_leak.value)
        kfree(shadow_leak.value)


def livepatch_fix1_dummy_free(d):
    # Patch: fetch the saved SV_LEAK shadow variable, detach and
    # free it.  Note: handle cases where this shadow variable does
    # not exist (ie, dummy structures allocated before this livepatch
    # was loaded.)
    shadow_leak = klp_shadow_get(d, SV_LEAK)
    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        # Before 4.17 klp_shadow_free() takes no destructor: the function
        # frees the leak and says so itself.
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
            klp_shadow_free(d, SV_LEAK, livepatch_fix1_dummy_leak_dtor)
        else:
            pr_info("%s: dummy @ %p leaked!\n", __func__, d)

    kfree(d)


funcs = [
    klp_func(old_name="dummy_alloc", new_func=livepatch_fix1_dummy_alloc),
    klp_func(old_name="dummy_free", new_func=livepatch_fix1_dummy_free),
]

objs = [
    klp_object(name="livepatch_shadow_mod", funcs=funcs),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def livepatch_shadow_fix1_init():
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


def livepatch_shadow_fix1_exit():
    # Cleanup any existing SV_LEAK shadow variables
    if LINUX_VERSION_CODE < KERNEL_VERSION(4, 17, 0):
        klp_shadow_free_all(SV_LEAK)
    else:
        klp_shadow_free_all(SV_LEAK, livepatch_fix1_dummy_leak_dtor)

    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        WARN_ON(klp_unregister_patch(patch))


module_init(livepatch_shadow_fix1_init)
module_exit(livepatch_shadow_fix1_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
