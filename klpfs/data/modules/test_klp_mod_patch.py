# tools/testing/selftests/livepatch/test_modules/test_klp_mod_patch.c, transliterated: a livepatch
# of test_klp_mod_target_show, a function of the module test_klp_mod_target.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


def livepatch_mod_target_show(m, v):
    seq_printf(m, "%s: %s\n", THIS_MODULE.name, "this has been live patched")
    return 0


funcs = [
    klp_func(old_name="test_klp_mod_target_show", new_func=livepatch_mod_target_show),
]

objs = [
    klp_object(name="test_klp_mod_target", funcs=funcs),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def test_klp_mod_patch_init():
    return klp_enable_patch(patch)


def test_klp_mod_patch_exit():
    pass


module_init(test_klp_mod_patch_init)
module_exit(test_klp_mod_patch_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Pablo Hugen <phugen@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: patch for module-provided function")
