# samples/livepatch/livepatch-callbacks-busymod.c (Linux 6.1, unchanged in 6.12), transliterated:
# a module whose delayed work sleeps 'sleep_secs' inside busymod_work_func,
# a function livepatch-callbacks-demo patches, so a kworker holds its
# patching transition for that long.
#
# This module is not intended to be standalone.  See the "Usage" section of
# livepatch-callbacks-demo.py.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

sleep_secs = 0
module_param("sleep_secs", "int", 0o644)
MODULE_PARM_DESC("sleep_secs", "sleep_secs (default=0)")

# static void busymod_work_func(struct work_struct *work);  (every def is
# known before the top level runs, so the work can name it here)
work = DECLARE_DELAYED_WORK(busymod_work_func)


def busymod_work_func(work):
    pr_info("%s, sleeping %d seconds ...\n", __func__, sleep_secs)
    msleep(sleep_secs * 1000)
    pr_info("%s exit\n", __func__)


def livepatch_callbacks_mod_init():
    pr_info("%s\n", __func__)
    schedule_delayed_work(work,
                          msecs_to_jiffies(1000 * 0))
    return 0


def livepatch_callbacks_mod_exit():
    cancel_delayed_work_sync(work)
    pr_info("%s\n", __func__)


module_init(livepatch_callbacks_mod_init)
module_exit(livepatch_callbacks_mod_exit)
MODULE_LICENSE("GPL")
