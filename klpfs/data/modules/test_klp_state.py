# lib/livepatch/test_klp_state.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/ in 6.12),
# transliterated: a livepatch that modifies a system state (console_loglevel) in its callbacks.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

CONSOLE_LOGLEVEL_STATE = 1
# Version 1 does not support migration.
CONSOLE_LOGLEVEL_STATE_VERSION = 1

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


# static struct klp_patch patch; -- defined below, looked up when the callbacks run


def allocate_loglevel_state():
    loglevel_state = klp_get_state(patch, CONSOLE_LOGLEVEL_STATE)
    if not loglevel_state:
        return -EINVAL

    # sizeof(console_loglevel): an int
    loglevel_state.data = kzalloc(4, GFP_KERNEL)
    if not loglevel_state.data:
        return -ENOMEM

    pr_info("%s: allocating space to store console_loglevel\n",
            __func__)
    return 0


def fix_console_loglevel():
    loglevel_state = klp_get_state(patch, CONSOLE_LOGLEVEL_STATE)
    if not loglevel_state:
        return

    pr_info("%s: fixing console_loglevel\n", __func__)
    # console_loglevel is the macro (console_printk[0])
    loglevel_state.data.value = console_printk[0]
    console_printk[0] = CONSOLE_LOGLEVEL_MOTORMOUTH


def restore_console_loglevel():
    loglevel_state = klp_get_state(patch, CONSOLE_LOGLEVEL_STATE)
    if not loglevel_state:
        return

    pr_info("%s: restoring console_loglevel\n", __func__)
    console_printk[0] = loglevel_state.data.value


def free_loglevel_state():
    loglevel_state = klp_get_state(patch, CONSOLE_LOGLEVEL_STATE)
    if not loglevel_state:
        return

    pr_info("%s: freeing space for the stored console_loglevel\n",
            __func__)
    kfree(loglevel_state.data)


# Executed on object patching (ie, patch enablement)
def pre_patch_callback(obj):
    callback_info(__func__, obj)
    return allocate_loglevel_state()


# Executed on object unpatching (ie, patch disablement)
def post_patch_callback(obj):
    callback_info(__func__, obj)
    fix_console_loglevel()


# Executed on object unpatching (ie, patch disablement)
def pre_unpatch_callback(obj):
    callback_info(__func__, obj)
    restore_console_loglevel()


# Executed on object unpatching (ie, patch disablement)
def post_unpatch_callback(obj):
    callback_info(__func__, obj)
    free_loglevel_state()


no_funcs = []

objs = [
    klp_object(
        name=None,  # vmlinux
        funcs=no_funcs,
        callbacks=klp_callbacks(
            pre_patch=pre_patch_callback,
            post_patch=post_patch_callback,
            pre_unpatch=pre_unpatch_callback,
            post_unpatch=post_unpatch_callback,
        ),
    ),
]

states = [
    klp_state(
        id=CONSOLE_LOGLEVEL_STATE,
        version=CONSOLE_LOGLEVEL_STATE_VERSION,
    ),
]

patch = klp_patch(
    mod=THIS_MODULE,
    objs=objs,
    states=states,
    replace=True,
)


def test_klp_callbacks_demo_init():
    return klp_enable_patch(patch)


def test_klp_callbacks_demo_exit():
    pass


module_init(test_klp_callbacks_demo_init)
module_exit(test_klp_callbacks_demo_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Petr Mladek <pmladek@suse.com>")
MODULE_DESCRIPTION("Livepatch test: system state modification")
