# samples/livepatch/livepatch-callbacks-demo.c (Linux 6.1, unchanged in 6.12), transliterated,
# with the 4.x init and exit (register, enable, unregister; on 4.15 the immediate fallback)
# where the sample of that time differed.
#
# (Un)patching callbacks livepatch demo.  Load livepatch-callbacks-mod and
# this module (in either order), then disable and remove them, and watch the
# kernel log for the callbacks of each object:
#
#   klpfs insmod livepatch-callbacks-mod
#   klpfs insmod livepatch-callbacks-demo
#   echo 0 > /sys/kernel/livepatch/livepatch_callbacks_demo/enabled
#   klpfs rmmod livepatch_callbacks_demo
#   klpfs rmmod livepatch_callbacks_mod
#
# 'pre_patch_ret' is the pre-patch callbacks' return status.  Set to -19
# (-ENODEV) after the demo is loaded, the module loader refuses to load the
# target module:
#
#   echo -19 > /sys/module/livepatch_callbacks_demo/parameters/pre_patch_ret
#   klpfs insmod livepatch-callbacks-mod      # No such device
#
# livepatch-callbacks-busymod's 'sleep_secs' parks a kworker in
# busymod_work_func, a function this patch replaces, which holds the
# patching transition for that long:
#
#   klpfs insmod livepatch-callbacks-busymod sleep_secs=30
#   klpfs insmod livepatch-callbacks-demo
#   klpfs insmod livepatch-callbacks-mod      # while the transition is in progress
#   klpfs rmmod livepatch_callbacks_mod
#   echo 0 > /sys/kernel/livepatch/livepatch_callbacks_demo/enabled
#   klpfs rmmod livepatch_callbacks_demo
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

pre_patch_ret = 0
module_param("pre_patch_ret", "int", 0o644)
MODULE_PARM_DESC("pre_patch_ret", "pre_patch_ret (default=0)")

module_state = {
    MODULE_STATE_LIVE: "[MODULE_STATE_LIVE] Normal state",
    MODULE_STATE_COMING: "[MODULE_STATE_COMING] Full formed, running module_init",
    MODULE_STATE_GOING: "[MODULE_STATE_GOING] Going away",
    MODULE_STATE_UNFORMED: "[MODULE_STATE_UNFORMED] Still setting it up",
}


def callback_info(callback, obj):
    if obj.mod:
        pr_info("%s: %s -> %s\n", callback, obj.mod.name,
                module_state[obj.mod.state])
    else:
        pr_info("%s: vmlinux\n", callback)


# Executed on object patching (ie, patch enablement)
def pre_patch_callback(obj):
    callback_info(__func__, obj)
    return pre_patch_ret


# Executed on object unpatching (ie, patch disablement)
def post_patch_callback(obj):
    callback_info(__func__, obj)


# Executed on object unpatching (ie, patch disablement)
def pre_unpatch_callback(obj):
    callback_info(__func__, obj)


# Executed on object unpatching (ie, patch disablement)
def post_unpatch_callback(obj):
    callback_info(__func__, obj)


def patched_work_func(work):
    pr_info("%s\n", __func__)


no_funcs = []

busymod_funcs = [
    klp_func(old_name="busymod_work_func", new_func=patched_work_func),
]

objs = [
    klp_object(
        name=NULL,  # vmlinux
        funcs=no_funcs,
        callbacks=klp_callbacks(
            pre_patch=pre_patch_callback,
            post_patch=post_patch_callback,
            pre_unpatch=pre_unpatch_callback,
            post_unpatch=post_unpatch_callback,
        ),
    ),
    klp_object(
        name="livepatch_callbacks_mod",
        funcs=no_funcs,
        callbacks=klp_callbacks(
            pre_patch=pre_patch_callback,
            post_patch=post_patch_callback,
            pre_unpatch=pre_unpatch_callback,
            post_unpatch=post_unpatch_callback,
        ),
    ),
    klp_object(
        name="livepatch_callbacks_busymod",
        funcs=busymod_funcs,
        callbacks=klp_callbacks(
            pre_patch=pre_patch_callback,
            post_patch=post_patch_callback,
            pre_unpatch=pre_unpatch_callback,
            post_unpatch=post_unpatch_callback,
        ),
    ),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def livepatch_callbacks_demo_init():
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


def livepatch_callbacks_demo_exit():
    if LINUX_VERSION_CODE < KERNEL_VERSION(5, 1, 0):
        WARN_ON(klp_unregister_patch(patch))


module_init(livepatch_callbacks_demo_init)
module_exit(livepatch_callbacks_demo_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
