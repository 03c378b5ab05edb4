# tools/testing/selftests/livepatch/test_modules/test_klp_syscall.c (Linux 6.12; not in 6.1),
# transliterated: a livepatch of the getpid syscall that counts the listed
# pids down as they call it in the patched state.
from klpfs.kapi import *

# #if defined(__x86_64__): the emulated kernel is x86_64, so the syscall's
# wrapper is __x64_sys_getpid (__s390x_ on s390x, __arm64_ on arm64;
# powerpc does not select ARCH_HAS_SYSCALL_WRAPPER).
FN_PREFIX = "__x64_"

# Protects klp_pids
kpid_mutex = DEFINE_MUTEX()

npids = 0
npids_pending = 0
klp_pids = [0] * NR_CPUS
module_param_array("klp_pids", "int", "npids_pending", 0)
MODULE_PARM_DESC("klp_pids", "Array of pids to be transitioned to livepatched state.")


def npids_show(kobj, attr, buf):
    return sprintf(buf, "%u\n", npids_pending)


klp_attr = __ATTR_RO("npids")
klp_kobj = None


def lp_sys_getpid():
    global npids_pending

    mutex_lock(kpid_mutex)
    if npids_pending > 0:
        for i in range(npids):
            if current.pid == klp_pids[i]:
                klp_pids[i] = 0
                npids_pending -= 1
                break
    mutex_unlock(kpid_mutex)

    return task_tgid_vnr(current)


vmlinux_funcs = [
    klp_func(
        old_name=FN_PREFIX + "sys_getpid",  # __stringify(FN_PREFIX) "sys_getpid"
        new_func=lp_sys_getpid,
    ),
]

objs = [
    klp_object(
        # name being NULL means vmlinux
        funcs=vmlinux_funcs,
    ),
]

patch = klp_patch(
    mod=THIS_MODULE,
    objs=objs,
)


def livepatch_init():
    global klp_kobj, npids

    klp_kobj = kobject_create_and_add("test_klp_syscall", kernel_kobj)
    if not klp_kobj:
        return -ENOMEM

    ret = sysfs_create_file(klp_kobj, klp_attr.attr)
    if ret:
        kobject_put(klp_kobj)
        return ret

    # Save the number pids to transition to livepatched state before the
    # number of pending pids is decremented.
    npids = npids_pending

    return klp_enable_patch(patch)


def livepatch_exit():
    kobject_put(klp_kobj)


module_init(livepatch_init)
module_exit(livepatch_exit)
MODULE_LICENSE("GPL")
MODULE_INFO("livepatch", "Y")
MODULE_AUTHOR("Libor Pechacek <lpechacek@suse.cz>")
MODULE_AUTHOR("Nicolai Stange <nstange@suse.de>")
MODULE_AUTHOR("Marcos Paulo de Souza <mpdesouza@suse.com>")
MODULE_DESCRIPTION("Livepatch test: syscall transition")
