# lib/livepatch/test_klp_callbacks_busy.c (Linux 6.1; tools/testing/selftests/livepatch/test_modules/
# in 6.12), transliterated: a target module whose work function can block a transition.
from klpfs.kapi import *

pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt

# load/run-time control from sysfs writer
block_transition = False
module_param("block_transition", "bool", 0o644)
MODULE_PARM_DESC("block_transition", "block_transition (default=false)")


def busymod_work_func(work):
    pr_info("%s enter\n", __func__)
    complete(busymod_work_started)

    while READ_ONCE(block_transition):
        # Busy-wait until the sysfs writer has acknowledged a
        # blocked transition and clears the flag.
        msleep(20)

    pr_info("%s exit\n", __func__)


work = DECLARE_WORK(busymod_work_func)
busymod_work_started = DECLARE_COMPLETION()


def test_klp_callbacks_busy_init():
    pr_info("%s\n", __func__)
    schedule_work(work)

    # To synchronize kernel messages, hold the init function from
    # exiting until the work function's entry message has printed.
    wait_for_completion(busymod_work_started)

    if not block_transition:
        # Serialize output: print all messages from the work
        # function before returning from init().
        flush_work(work)

    return 0


def test_klp_callbacks_busy_exit():
    global block_transition
    block_transition = False  # WRITE_ONCE(block_transition, false)
    flush_work(work)
    pr_info("%s\n", __func__)


module_init(test_klp_callbacks_busy_init)
module_exit(test_klp_callbacks_busy_exit)
MODULE_LICENSE("GPL")
MODULE_AUTHOR("Joe Lawrence <joe.lawrence@redhat.com>")
MODULE_DESCRIPTION("Livepatch test: busy target module")
