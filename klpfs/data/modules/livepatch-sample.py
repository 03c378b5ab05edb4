# samples/livepatch/livepatch-sample.c (Linux 6.1, unchanged in 6.12), transliterated, with the
# 4.x init and exit (register, enable, unregister; on 4.15 the immediate fallback) where the
# sample of that time differed.
#
# This (dumb) live patch overrides the function that prints the kernel boot
# cmdline when /proc/cmdline is read:
#
#   $ cat /proc/cmdline
#   <your cmdline>
#   $ klpfs insmod livepatch-sample
#   $ cat /proc/cmdline
#   this has been live patched
#   $ echo 0 > /sys/kernel/livepatch/livepatch_sample/enabled
#   $ cat /proc/cmdline
#   <your cmdline>
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


def livepatch_cmdline_proc_show(m, v):
    seq_printf(m, "%s\n", "this has been live patched")
    return 0


funcs = [
    klp_func(old_name="cmdline_proc_show", new_func=livepatch_cmdline_proc_show),
]

objs = [
    # name being NULL means vmlinux
    klp_object(funcs=funcs),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def livepatch_init():
    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        # Before 5.1 a patch is registered, then enabled; a patch that fails
        # to enable is unregistered again.
        if LINUX_VERSION_CODE < KERNEL_VERSION(4, 16, 0):
            if not klp_have_reliable_stack() and not patch.immediate:
                # 4.15: without reliable stack traces the consistency model
                # cannot work; the sample falls back to patching every task
                # at once (patch.immediate, gone in 4.16), which also makes
                # the patch impossible to remove.
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


def livepatch_exit():
    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        # The module can only go once the patch is disabled (an enabled
        # patch holds a reference on it), so this succeeds.
        WARN_ON(klp_unregister_patch(patch))


module_init(livepatch_init)
module_exit(livepatch_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
