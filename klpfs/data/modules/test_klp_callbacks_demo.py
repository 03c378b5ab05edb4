# lib/livepatch/test_klp_callbacks_demo.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/
# in 6.12), transliterated: a livepatch whose every callback of every object logs.
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
        pr_info("%s: %s -> %s\n", callback, obj.mod.name, module_state[obj.mod.state])
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
        name="test_klp_callbacks_mod",
        funcs=no_funcs,
        callbacks=klp_callbacks(
            pre_patch=pre_patch_callback,
            post_patch=post_patch_callback,
            pre_unpatch=pre_unpatch_callback,
            post_unpatch=post_unpatch_callback,
        ),
    ),
    klp_object(
        name="test_klp_callbacks_busy",
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


def test_klp_callbacks_demo_init():
    return klp_enable_patch(patch)


def test_klp_callbacks_demo_exit():
    pass


module_init(test_klp_callbacks_demo_init)
module_exit(test_klp_callbacks_demo_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: livepatch demo")
