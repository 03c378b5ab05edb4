# samples/livepatch/livepatch-callbacks-mod.c (Linux 6.1, unchanged in 6.12), transliterated:
# a simple module to demonstrate livepatch (un)patching callbacks.
#
# This module is not intended to be standalone.  See the "Usage" section of
# livepatch-callbacks-demo.py.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


def livepatch_callbacks_mod_init():
    pr_info("%s\n", __func__)
    return 0


def livepatch_callbacks_mod_exit():
    pr_info("%s\n", __func__)


module_init(livepatch_callbacks_mod_init)
module_exit(livepatch_callbacks_mod_exit)
MODULE_LICENSE("GPL")
