# samples/livepatch/livepatch-shadow-mod.c (Linux 6.1, unchanged in 6.12), transliterated:
# shadow variables, buggy module demo.
#
# As a demonstration of the livepatch shadow variable API, this module
# introduces memory leak behavior that livepatch modules
# livepatch-shadow-fix1 and livepatch-shadow-fix2 correct and enhance.
#
# Step 1 - Load the buggy demonstration module:
#
#   klpfs insmod livepatch-shadow-mod
#
# Watch the kernel log for a few moments to see new dummies being allocated
# and a periodic cleanup check.  (Note: a small amount of memory is being
# leaked.)
#
# Step 2 - Load livepatch fix1:
#
#   klpfs insmod livepatch-shadow-fix1
#
# Continue watching the log and note that now livepatch_fix1_dummy_free()
# and livepatch_fix1_dummy_alloc() are logging messages about leaked memory
# and eventually leaks prevented.
#
# Step 3 - Load livepatch fix2 (on top of fix1):
#
#   klpfs insmod livepatch-shadow-fix2
#
# This module extends functionality through shadow variables, as a new
# "check" counter is added to the dummy structure.  Periodic log messages
# will log these as dummies are cleaned up.
#
# Step 4 - Cleanup: disable the livepatch fix modules, then remove them and
# the demo module:
#
#   echo 0 > /sys/kernel/livepatch/livepatch_shadow_fix2/enabled
#   echo 0 > /sys/kernel/livepatch/livepatch_shadow_fix1/enabled
#   klpfs rmmod livepatch-shadow-fix2
#   klpfs rmmod livepatch-shadow-fix1
#   klpfs rmmod livepatch-shadow-mod
#
# (No pr_fmt here: the C file defines none, so its lines carry no module name.)
from klpfs.kapi import *

MODULE_LICENSE("GPL")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Buggy module for shadow variable demo")

# Allocate new dummies every second
ALLOC_PERIOD = 1
# Check for expired dummies after a few new ones have been allocated
CLEANUP_PERIOD = 3 * ALLOC_PERIOD
# Dummies expire after a few cleanup instances
EXPIRE_PERIOD = 4 * CLEANUP_PERIOD

# Keep a list of all the dummies so we can clean up any residual ones
# on module exit
dummy_list = LIST_HEAD()
dummy_list_mutex = DEFINE_MUTEX()

# struct dummy {
#	struct list_head list;
#	unsigned long jiffies_expire;
# };
SIZEOF_DUMMY = 24
SIZEOF_INT = 4


def dummy_alloc():
    d = kzalloc(SIZEOF_DUMMY, GFP_KERNEL)  # sizeof(*d)
    if not d:
        return NULL

    d.jiffies_expire = jiffies + msecs_to_jiffies(1000 * EXPIRE_PERIOD)

    # Oops, forgot to save leak!
    leak = kzalloc(SIZEOF_INT, GFP_KERNEL)  # sizeof(*leak)
    if not leak:
        kfree(d)
        return NULL

    pr_info("%s: dummy @ %p, expires @ %lx\n",
            __func__, d, d.jiffies_expire)

    return d


def dummy_free(d):
    pr_info("%s: dummy @ %p, expired = %lx\n",
            __func__, d, d.jiffies_expire)

    kfree(d)


def dummy_check(d, jiffies):
    return time_after(jiffies, d.jiffies_expire)


# alloc_work_func: allocates new dummy structures, allocates additional
#                  memory, aptly named "leak", but doesn't keep
#                  permanent record of it.

alloc_dwork = DECLARE_DELAYED_WORK(alloc_work_func)


def alloc_work_func(work):
    d = dummy_alloc()
    if not d:
        return

    mutex_lock(dummy_list_mutex)
    dummy_list.insert(0, d)  # list_add(&d->list, &dummy_list): at the head
    mutex_unlock(dummy_list_mutex)

    schedule_delayed_work(alloc_dwork,
                          msecs_to_jiffies(1000 * ALLOC_PERIOD))


# cleanup_work_func: frees dummy structures.  Without knownledge of
#                    "leak", it leaks the additional memory that
#                    alloc_work_func created.

cleanup_dwork = DECLARE_DELAYED_WORK(cleanup_work_func)


def cleanup_work_func(work):
    j = int(jiffies)  # j = jiffies: the value now
    pr_info("%s: jiffies = %lx\n", __func__, j)

    mutex_lock(dummy_list_mutex)
    for d in list(dummy_list):  # list_for_each_entry_safe(d, tmp, &dummy_list, list)

        # Kick out and free any expired dummies
        if dummy_check(d, j):
            dummy_list.remove(d)  # list_del(&d->list)
            dummy_free(d)
    mutex_unlock(dummy_list_mutex)

    schedule_delayed_work(cleanup_dwork,
                          msecs_to_jiffies(1000 * CLEANUP_PERIOD))


def livepatch_shadow_mod_init():
    schedule_delayed_work(alloc_dwork,
                          msecs_to_jiffies(1000 * ALLOC_PERIOD))
    schedule_delayed_work(cleanup_dwork,
                          msecs_to_jiffies(1000 * CLEANUP_PERIOD))

    return 0


def livepatch_shadow_mod_exit():
    # Wait for any dummies at work
    cancel_delayed_work_sync(alloc_dwork)
    cancel_delayed_work_sync(cleanup_dwork)

    # Cleanup residual dummies
    for d in list(dummy_list):  # list_for_each_entry_safe(d, tmp, &dummy_list, list)
        dummy_list.remove(d)  # list_del(&d->list)
        dummy_free(d)


module_init(livepatch_shadow_mod_init)
module_exit(livepatch_shadow_mod_exit)
