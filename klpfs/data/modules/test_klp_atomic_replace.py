# lib/livepatch/test_klp_atomic_replace.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/
# in 6.12), transliterated: a livepatch of meminfo_proc_show whose .replace is a module parameter.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

replace = 0
module_param("replace", "int", 0o644)
MODULE_PARM_DESC("replace", "replace (default=0)")


def livepatch_meminfo_proc_show(m, v):
    seq_printf(m, "%s: %s\n", THIS_MODULE.name, "this has been live patched")
    return 0


funcs = [
    klp_func(old_name="meminfo_proc_show", new_func=livepatch_meminfo_proc_show),
]

objs = [
    # name being NULL means vmlinux
    klp_object(funcs=funcs),
]

patch = klp_patch(
    mod=THIS_MODULE,
    objs=objs,
    # set .replace in the init function below for demo purposes
)


def test_klp_atomic_replace_init():
    patch.replace = replace
    return klp_enable_patch(patch)


def test_klp_atomic_replace_exit():
    pass


module_init(test_klp_atomic_replace_init)
module_exit(test_klp_atomic_replace_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: atomic replace")
