# tools/testing/selftests/livepatch/test_modules/test_klp_mod_target.c, transliterated: a target
# module whose /proc/test_klp_mod_target entry is shown by a function of the module.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

pde = NULL


# noinline in C: the show function stays a function of its own, so it can be patched.
def test_klp_mod_target_show(m, v):
    seq_printf(m, "%s: %s\n", THIS_MODULE.name, "original output")
    return 0


def test_klp_mod_target_init():
    global pde
    pr_info("%s\n", __func__)
    pde = proc_create_single("test_klp_mod_target", 0, NULL, test_klp_mod_target_show)
    if not pde:
        return -ENOMEM
    return 0


def test_klp_mod_target_exit():
    pr_info("%s\n", __func__)
    proc_remove(pde)


module_init(test_klp_mod_target_init)
module_exit(test_klp_mod_target_exit)
MODULE_LICENSE("GPL")
MODULE_AUTHOR("Pablo Hugen <phugen@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: target module with proc entry")
