# lib/livepatch/test_klp_callbacks_mod.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/
# in 6.12), transliterated: the callbacks demo's ordinary target module.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


def test_klp_callbacks_mod_init():
    pr_info("%s\n", __func__)
    return 0


def test_klp_callbacks_mod_exit():
    pr_info("%s\n", __func__)


module_init(test_klp_callbacks_mod_init)
module_exit(test_klp_callbacks_mod_exit)
MODULE_LICENSE("GPL")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: target module")
