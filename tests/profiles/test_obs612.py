"""The rows of /work/shared/spec/linux-6.12-observed.md (6.12 obs #N) that
change the engine's behaviour, on 6.12 and on every profile from the release
that brought the difference (6.11 and 6.14 included), against the 6.1
behaviour on the profiles before it.

#2-#5: klp_start_transition() enables klp_cond_resched (6.4); rewriting the
cond_resched static call IPIs every CPU, and an idle CPU passes its idle
loop's switch point before the first klp_try_complete_transition() looks at
it: a transition that nothing blocks completes inside the write, one that a
task blocks runs as before.  #12: the kernel's threads after boot.
(#1 replace: test_replace_stack_order.py; #6: test_dynamic_debug.py; #7
kallsyms, #8 sizes, #10 stacks: test_proc_kallsyms.py, test_module_size.py,
test_proc_stack.py; #9: test_enabled_functions.py; #11: test_free.py.)
"""

from __future__ import annotations

import pytest
import trio

from klpfs.kernel.sched import TIF_PATCH_PENDING, TaskKind

from modules.test_kapi import source
from .conftest import (
    EACCES, EAGAIN, ENOENT, FORCE_LINE, IN_WRITE, SIGNAL_LINE, Machine, logging_callbacks, make_machine, settle,
    spec, tick)

P = spec("lp_p", {None: ["cmdline_proc_show"]})
BEFORE = ("5.1", "6.1")
"""Profiles before 6.4: the first, synchronous attempt finds the idle tasks running."""
in_write = pytest.mark.parametrize("version", IN_WRITE)
STACK_ORDER = {"6.11": [], "6.12": [], "6.14": ["stack_order"]}
"""The patch directory's stack_order (6.14 on)."""
before = pytest.mark.parametrize("version", BEFORE)


def idle_states(m: Machine) -> list[int]:
    return [idle.patch_state for idle in m.sched.idle_tasks]


# -- #2: the transition with nothing blocking -----------------------------------------------------

@in_write
async def test_row2_completes_inside_the_load(md, autojump_clock):
    """6.12 obs #2: transition reads 0 as soon as the load returns, `patching
    complete` is logged, and no `swapper/N:0 is running` line appears."""
    m = md
    assert m.load(P) == 0
    assert m.transition("lp_p") == b"0\n"
    assert m.take() == [
        "lp_p: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'lp_p'",
        "livepatch: 'lp_p': initializing patching transition",
        "livepatch: 'lp_p': starting patching transition",
        "livepatch: 'lp_p': completing patching transition",
        "livepatch: 'lp_p': patching complete",
    ]
    assert m.sched.static_calls == {"cond_resched": "__cond_resched"}


@before
async def test_row2_before_the_idle_tasks_are_running(md, autojump_clock):
    """obs #5 (6.1): the first attempt finds every idle task running; the retry
    completes the transition on the next whole second."""
    m = md
    assert m.load(P) == 0
    assert m.transition("lp_p") == b"1\n"
    assert [line for line in m.lines() if "klp_try_switch_task" in line] == [
        "livepatch: klp_try_switch_task: swapper/0:0 is running",
        "livepatch: klp_try_switch_task: swapper/1:0 is running"]
    assert m.sched.static_calls == {}
    await settle(1.5)
    assert m.times_of("livepatch: 'lp_p': patching complete") == [1.0]


@in_write
async def test_row2_a_sleeper_holds_it_as_before(md, autojump_clock):
    """6.12 obs #2: a task sleeping in the function being patched holds the
    transition as on 6.1 -- the idle tasks have switched, the 1 s retry runs,
    the fake signal comes once at 15 s and leaves a D sleeper where it is, and
    force completes it at the next retry."""
    m = md
    holder = m.sleeper("cmdline_proc_show", comm="holder", state="D")
    assert m.load(P) == 0
    assert m.state("lp_p") == (1, 1)
    assert idle_states(m) == [1, 1]
    assert m.sched.static_calls == {"cond_resched": "klp_cond_resched"}
    sleeping = f"livepatch: klp_try_switch_task: holder:{holder.pid} is sleeping on function cmdline_proc_show"
    assert [line for line in m.lines() if "klp_try_switch_task" in line] == [sleeping]
    await settle(1.5)
    assert m.times_of(sleeping) == [0.0, 1.0]
    await trio.sleep(15.5 - trio.current_time())
    assert len(m.times_of(SIGNAL_LINE)) == 1
    assert holder.patch_state == 0 and m.state("lp_p") == (1, 1)
    assert m.write("lp_p/force", b"1") == 1
    assert FORCE_LINE in m.lines()
    await settle(1.0)
    assert m.state("lp_p") == (1, 0)
    assert m.sched.static_calls == {"cond_resched": "__cond_resched"}
    m.sched.wake(holder)


@in_write
async def test_row2_a_reversal_rewrites_nothing(m, autojump_clock):
    """klp_reverse_transition() enables klp_cond_resched again, but the static call
    already points there (__static_call_update() returns early): no IPI, so the
    idle tasks, pending again, switch at their next tick through the idle loop."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    assert idle_states(m) == [1, 1]
    assert m.write("lp_p/enabled", b"0") == 1
    assert idle_states(m) == [1, 1]
    assert all(TIF_PATCH_PENDING in idle.flags for idle in m.sched.idle_tasks)
    await tick()
    assert idle_states(m) == [0, 0]
    m.sched.wake(holder)
    await settle()
    assert not m.exists("lp_p")


# -- #3: the order of the lines of a load -----------------------------------------------------------

LOGGING_PATCH = source('''
    def post_patch_callback(obj):
        pr_info("%s: post_patch\\n", __func__)


    def new_cmdline_proc_show(m, v):
        seq_puts(m, "patched\\n")
        return 0


    funcs = [klp_func(old_name="cmdline_proc_show", new_func=new_cmdline_proc_show)]
    objs = [klp_object(funcs=funcs, callbacks=klp_callbacks(post_patch=post_patch_callback))]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def init():
        ret = klp_enable_patch(patch)
        pr_info("module init: klp_enable_patch() returned %d\\n", ret)
        return ret


    module_init(init)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')
STARTED = ["klp_basic: tainting kernel with TAINT_LIVEPATCH", "livepatch: enabling patch 'klp_basic'",
           "livepatch: 'klp_basic': starting patching transition"]
COMPLETED = ["klp_basic: post_patch_callback: post_patch", "livepatch: 'klp_basic': patching complete"]
RETURNED = ["klp_basic: module init: klp_enable_patch() returned 0"]


@in_write
async def test_row3_complete_before_init_returns(m, autojump_clock):
    """6.12 obs #3: post_patch and `patching complete` come before the module's
    own line after klp_enable_patch()."""
    assert (await m.insmod_text("klp_basic.py", LOGGING_PATCH))["ok"]
    assert m.take() == STARTED + COMPLETED + RETURNED


@before
async def test_row3_before_init_returns_first(m, autojump_clock):
    """obs #15 (6.1): the module's line comes first, the completion at the retry."""
    assert (await m.insmod_text("klp_basic.py", LOGGING_PATCH))["ok"]
    assert m.take() == STARTED + RETURNED
    await settle(1.5)
    assert m.take() == COMPLETED


# -- #4 and #5: a disable with nothing blocking, and what follows from #2 and #4 ---------------------

@in_write
async def test_row4_disable_is_over_inside_the_write(m, autojump_clock):
    """6.12 obs #4: `echo 0` completes the unpatching and starts the free: the
    objects are gone when it returns, the directory by the time anything else
    runs (the free work), and the module is released."""
    assert m.load(P) == 0
    m.take()
    assert m.write("lp_p/enabled", b"0") == 1
    assert m.take() == ["livepatch: 'lp_p': starting unpatching transition", "livepatch: 'lp_p': unpatching complete"]
    assert m.ls("lp_p") == sorted(["enabled", "force", "replace", "transition"] + STACK_ORDER[m.version])
    await tick()
    assert not m.exists("lp_p")
    assert m.refcnt("lp_p") == 0


@in_write
async def test_row5_disable_right_after_enable_is_a_normal_disable(m, autojump_clock):
    """6.12 obs #5: `echo 0` right after the load finds the patch enabled: a
    disable with its pre_unpatch callback, not the reversal of a transition."""
    cbs = {None: logging_callbacks(m.printk, "lp_cb")}
    assert m.load(spec("lp_cb", {None: ["cmdline_proc_show"]}, callbacks=cbs)) == 0
    m.take()
    assert m.write("lp_cb/enabled", b"0") == 1
    assert m.take() == ["lp_cb: pre_unpatch_callback: vmlinux", "livepatch: 'lp_cb': starting unpatching transition",
                        "lp_cb: post_unpatch_callback: vmlinux", "livepatch: 'lp_cb': unpatching complete"]


@pytest.mark.parametrize("version", IN_WRITE + BEFORE)
async def test_row5_rmmod_right_after_disable(m, version, autojump_clock):
    """6.12 obs #5: delete_module right after the disable returns 0 and a second
    gets ENOENT; obs #20 (6.1): EAGAIN while the unpatching runs."""
    assert m.load(P) == 0
    await settle()
    assert m.write("lp_p/enabled", b"0") == 1
    await tick()
    if version in IN_WRITE:
        assert m.rmmod("lp_p") == 0
        assert m.rmmod("lp_p") == -ENOENT
    else:
        assert m.rmmod("lp_p") == -EAGAIN


@in_write
async def test_row5_write_1_finds_the_directory_gone(m, autojump_clock):
    """6.12 obs #5: no unpatching transition left to reverse: the patch is freed
    (the engine's lookup finds no `enabled` to open)."""
    assert m.load(P) == 0
    assert m.write("lp_p/enabled", b"0") == 1
    await tick()
    assert m.lp_node("lp_p/enabled") is None


@in_write
async def test_row5_atomic_replace_nothing_blocks(m, autojump_clock):
    """6.12 obs #5: right after the load of an atomic-replace patch only it is
    left, without its nop function directories."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show", "version_proc_show"]})) == 0
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    await tick()
    assert m.ls() == ["lp_r"]
    assert m.tree("lp_r") == sorted(["enabled", "force", "replace", "transition", "vmlinux/",
                                     "vmlinux/cmdline_proc_show,1/", "vmlinux/patched"] + STACK_ORDER[m.version])
    assert m.refcnt("lp_a") == 0


# -- #1: the patch directory ---------------------------------------------------------------------------

async def test_row1_patch_directory(nursery, autojump_clock):
    """6.12 obs #1: `replace` (0444) beside enabled, force and transition; no
    stack_order, no signal; it cannot be opened for writing."""
    from klpfs.sysfs.kernfs import Kernfs
    m = make_machine(nursery, "6.12")
    assert m.load(P) == 0
    assert m.ls("lp_p") == ["enabled", "force", "replace", "transition", "vmlinux"]
    assert m.mode("lp_p/replace") == 0o444
    assert m.read("lp_p/replace") == b"0\n"
    assert Kernfs.open_check(m.lp_node("lp_p/replace"), False, True) == -EACCES


# -- #12: the kernel's threads after boot --------------------------------------------------------------

KTHREADS_6_1 = (
    "acpi_thermal_pm blkcg_punt_bio cpuhp/0 cpuhp/1 devfreq_wq edac-poller inet_frag_wq ipv6_addrconf kauditd "
    "kblockd kcompactd0 kdevtmpfs khugepaged khungtaskd kintegrityd ksmd ksoftirqd/0 ksoftirqd/1 kstrp kswapd0 "
    "kthreadd kthrotld kworker/0:0-events kworker/0:0H-events_highpri kworker/0:1-events kworker/0:1H "
    "kworker/0:2 kworker/1:0-events kworker/1:0H-events_highpri kworker/1:1-events kworker/1:1H kworker/1:2 "
    "kworker/u4:0-events_unbound kworker/u4:1-events_unbound kworker/u4:2 kworker/u5:0 migration/0 "
    "migration/1 mld mm_percpu_wq netns oom_reaper rcu_gp rcu_par_gp rcu_preempt rcu_tasks_kthread "
    "rcu_tasks_rude_kthread rcu_tasks_trace_kthread slub_flushwq tpm_dev_wq writeback zswap-shrink").split()
"""6.12 obs "Tasks after boot": the 52 of the 6.1 kernel, sorted by name."""
KTHREADS_6_12 = (
    "cpuhp/0 cpuhp/1 idle_inject/0 idle_inject/1 irq/9-acpi kauditd kcompactd0 kdevtmpfs khugepaged khungtaskd "
    "ksmd ksoftirqd/0 ksoftirqd/1 kswapd0 kthreadd kworker/0:0-events kworker/0:0H-events_highpri kworker/0:1 "
    "kworker/0:1H kworker/0:2-events kworker/1:0-events_power_efficient kworker/1:0H-events_highpri "
    "kworker/1:1-pm kworker/1:1H kworker/R-acpi_thermal_pm kworker/R-blkcg_punt_bio kworker/R-devfreq_wq "
    "kworker/R-edac-poller kworker/R-inet_frag_wq kworker/R-ipv6_addrconf kworker/R-kblockd "
    "kworker/R-kintegrityd kworker/R-kstrp kworker/R-kthrotld kworker/R-kvfree_rcu_reclaim kworker/R-mld "
    "kworker/R-mm_percpu_wq kworker/R-netns kworker/R-quota_events_unbound kworker/R-rcu_gp "
    "kworker/R-slub_flushwq kworker/R-sync_wq kworker/R-tpm_dev_wq kworker/R-writeback "
    "kworker/u8:0-events_unbound kworker/u8:1-events_unbound kworker/u8:2-events_unbound "
    "kworker/u8:3-events_unbound kworker/u8:4-events_unbound kworker/u9:0 migration/0 migration/1 oom_reaper "
    "pool_workqueue_release rcu_exp_gp_kthread_worker rcu_exp_par_gp_kthread_worker/0 rcu_preempt "
    "rcu_tasks_kthread rcu_tasks_rude_kthread rcu_tasks_trace_kthread").split()
"""6.12 obs #12: the 60 of the 6.12 kernel, sorted by name."""


def proc_comms(m: Machine) -> list[str]:
    """/proc/<pid>/comm of every kernel thread, sorted."""
    from klpfs.sysfs.kernfs import Kernfs
    comms = []
    for task in m.sched.tasks.values():
        if task.kind is TaskKind.KTHREAD:
            data = Kernfs.read(m.node(f"proc/{task.pid}/comm"))
            assert isinstance(data, bytes)
            comms.append(data.decode().rstrip("\n"))
    return sorted(comms)


@pytest.mark.parametrize("version, expected", [("6.1", KTHREADS_6_1), ("6.11", KTHREADS_6_12),
                                               ("6.12", KTHREADS_6_12), ("6.14", KTHREADS_6_12)])
async def test_row12_kernel_threads_after_boot(nursery, version, expected, autojump_clock):
    """6.12 obs #12: the kernel threads /proc shows (full names, a kworker's with its
    workqueue; 6.6's kworker/R- rescuers), and `klpfs ps` lists the same tasks as /proc,
    the idle tasks (pid 0, not in /proc) aside."""
    m = make_machine(nursery, version)
    assert proc_comms(m) == sorted(expected)
    listed = sorted(t["pid"] for t in (await m.ctl("ps"))["tasks"] if t["pid"])
    assert listed == sorted(int(name) for name in m.kernfs.names(m.node("proc")) if name.isdigit())


@pytest.mark.parametrize("version, present, absent", [
    ("4.15", ["rcu_sched", "rcu_bh", "watchdog/0", "watchdog/1", "mm_percpu_wq"], []),
    ("4.16", ["rcu_sched", "rcu_bh", "watchdog/0", "watchdog/1"], []),
    ("5.1", ["rcu_sched", "mm_percpu_wq"], ["rcu_bh", "watchdog/0", "watchdog/1"]),
])
async def test_row12_older_kernels_keep_their_threads(nursery, version, present, absent, autojump_clock):
    """Before 4.19 the softlockup watchdog had a kthread per CPU and before 4.20
    RCU-bh its own grace-period kthread; rescuers are named after their workqueue."""
    m = make_machine(nursery, version)
    comms = proc_comms(m)
    assert all(name in comms for name in present), comms
    assert not any(name in comms for name in absent), comms
    assert not any(name.startswith("kworker/R-") for name in comms)
