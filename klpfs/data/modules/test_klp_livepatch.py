# lib/livepatch/test_klp_livepatch.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/ in 6.12),
# transliterated: a livepatch of cmdline_proc_show.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


def livepatch_cmdline_proc_show(m, v):
    seq_printf(m, "%s: %s\n", THIS_MODULE.name, "this has been live patched")
    return 0


funcs = [
    klp_func(old_name="cmdline_proc_show", new_func=livepatch_cmdline_proc_show),
]

objs = [
    # name being NULL means vmlinux
    klp_object(funcs=funcs),
]

patch = klp_patch(mod=THIS_MODULE, objs=objs)


def test_klp_livepatch_init():
    return klp_enable_patch(patch)


def test_klp_livepatch_exit():
    pass


module_init(test_klp_livepatch_init)
module_exit(test_klp_livepatch_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Seth Jennings <sjenning@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: livepatch module")
