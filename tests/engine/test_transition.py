"""§8 the transition engine: switch points, forbidden ranges, unreliable and
deep stacks, debug texts, the retry work, patch_state, fork, reversal, cancel."""

from __future__ import annotations

import errno

import pytest
import trio

from klpfs.kernel.sched import TIF_PATCH_PENDING, TaskKind
from klpfs.sysfs.kernfs import Kernfs

from .conftest import ORIGINAL, settle, spec

P = spec("lp_p", {None: ["cmdline_proc_show", "version_proc_show"]})
P2 = spec("lp_q", {None: ["cmdline_proc_show"]})


def running_line(t) -> str:
    return f"livepatch: klp_try_switch_task: {t.comm}:{t.pid} is running"


def sleeping_line(t, func: str) -> str:
    return f"livepatch: klp_check_stack: {t.comm}:{t.pid} is sleeping on function {func}"


def unreliable_line(t) -> str:
    return f"livepatch: klp_check_stack: {t.comm}:{t.pid} has an unreliable stack"


def times_of(m, text: str) -> list[float]:
    return [r.timestamp for r in m.records() if r.text == text]


# ---------------------------------------------------------------------------
# §8.1 switch points
# ---------------------------------------------------------------------------

async def test_stack_check_switches_sleeping_tasks_at_once(m, autojump_clock):
    """§8.1 item 1: the synchronous attempt switches every task whose stack is
    clean (sleeping kthreads and user tasks elsewhere)."""
    kt, ut = m.kthread("kt"), m.user("ut")
    assert m.load(P) == 0
    assert kt.patch_state == 1 and ut.patch_state == 1
    assert TIF_PATCH_PENDING not in kt.flags and TIF_PATCH_PENDING not in ut.flags
    boot_tasks = [t for t in m.sched.tasks.values()]
    assert all(t.patch_state == 1 for t in boot_tasks)


async def test_return_to_user_switches_without_stack_check(m, autojump_clock):
    """§8.1 item 2: a user task blocked in the old function switches as soon as
    it returns to user space (before the next retry)."""
    u = m.sleeper("cmdline_proc_show", comm="ublk", kind=TaskKind.USER)
    assert m.load(P) == 0
    assert u.patch_state == 0
    assert sleeping_line(u, "cmdline_proc_show") in m.take()
    await settle(0.3)
    m.sched.wake(u)                          # the syscall returns to user space
    assert u.patch_state == 1
    assert TIF_PATCH_PENDING not in u.flags
    await settle(1)
    assert m.state("lp_p") == (1, 0)


async def test_user_task_busy_in_user_mode_switches_on_next_kernel_exit(m, autojump_clock):
    """§8.1 item 2: a user task running in user mode is "running" for the stack
    check, but switches at its next exit to user mode (an interrupt, within a
    tick), so it does not hold the transition."""
    u = m.user("uspin")
    m.sched.run(u)
    assert m.load(P) == 0
    assert running_line(u) in m.take()
    assert u.patch_state == 0
    await settle(0.1)
    assert u.patch_state == 1
    await settle(1)
    assert m.state("lp_p") == (1, 0)


async def test_idle_tasks_switch_in_idle_loop(m, autojump_clock):
    """§8.1 item 3: online idle CPUs' idle tasks are "running" for the stack
    check and switch in the idle loop."""
    blocker = m.blocker()                   # keeps the transition open
    assert m.load(P) == 0
    idle = m.sched.idle_tasks
    lines = m.take()
    busy_cpu = blocker.cpu
    free_cpu = 1 - busy_cpu
    assert running_line(idle[free_cpu]) in lines
    assert running_line(idle[busy_cpu]) not in lines     # CPU busy: idle task stack-checked
    assert idle[busy_cpu].patch_state == 1
    assert idle[free_cpu].patch_state == 0
    await settle(0.1)
    assert idle[free_cpu].patch_state == 1


async def test_offline_cpu_idle_task_switched_directly(m, autojump_clock):
    """§8.1 item 4 / §8.5 step 4: an offline CPU's idle task is switched by the
    completion attempt itself, without any check or message."""
    m.sched.set_cpu_online(1, False)
    m.blocker()
    assert m.load(P) == 0
    idle1 = m.sched.idle_tasks[1]
    assert idle1.patch_state == 1
    assert TIF_PATCH_PENDING not in idle1.flags
    assert not [ln for ln in m.take() if "swapper/1:" in ln]


async def test_kthreads_switch_only_via_stack_check(m, autojump_clock):
    """§8.1 / §13.11: a kthread never returns to user space: a running kthread
    never switches (the transition never completes, the "is running" line
    repeats every second); a kthread woken out of the old function switches
    only at the next stack check."""
    spin = m.blocker("kspin")
    sl = m.sleeper("cmdline_proc_show", comm="ksleep", state="S")
    assert m.load(P) == 0
    await settle(0.2)
    m.sched.wake(sl)
    assert sl.patch_state == 0                      # no switch on wake for a kthread
    await settle(5)
    assert sl.patch_state == 1
    assert spin.patch_state == 0
    assert m.state("lp_p") == (1, 1)
    assert times_of(m, running_line(spin)) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


async def test_all_tasks_attempted_no_early_exit(m, autojump_clock):
    """§8.5 step 3: every task is attempted on each pass, even after a failure."""
    a, b = m.blocker("spin_a"), m.blocker("spin_b")
    assert m.load(P) == 0
    await settle(2.5)
    assert times_of(m, running_line(a)) == [0.0, 1.0, 2.0]
    assert times_of(m, running_line(b)) == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------
# §8.6 forbidden ranges
# ---------------------------------------------------------------------------

async def test_patching_original_is_forbidden(m, autojump_clock):
    """§8.6 step 5, patching, only entry: a task sleeping in the original
    function cannot switch; one sleeping in an unpatched function can."""
    bad = m.sleeper("cmdline_proc_show", comm="in_orig")
    ok = m.sleeper("meminfo_proc_show", comm="elsewhere")
    assert m.load(P) == 0
    assert sleeping_line(bad, "cmdline_proc_show") in m.take()
    assert (bad.patch_state, ok.patch_state) == (0, 1)


async def test_first_offending_func_in_array_order(m, autojump_clock):
    """§8.6 step 5: the first offending func (object/func array order) is reported."""
    u = m.sleeper("version_proc_show", comm="usr", kind=TaskKind.USER)
    assert m.load(spec("lp_o", {None: ["version_proc_show", "do_syscall_64"]})) == 0
    assert sleeping_line(u, "version_proc_show") in m.lines()
    assert sleeping_line(u, "do_syscall_64") not in m.lines()


async def test_first_offending_func_reverse_order(m, autojump_clock):
    u = m.sleeper("version_proc_show", comm="usr", kind=TaskKind.USER)
    assert m.load(spec("lp_o", {None: ["do_syscall_64", "version_proc_show"]})) == 0
    assert sleeping_line(u, "do_syscall_64") in m.lines()
    assert sleeping_line(u, "version_proc_show") not in m.lines()


async def test_stacked_patching_previous_patch_is_forbidden(m, autojump_clock):
    """§8.6 step 5, patching over another patch: the forbidden range is the
    previous patch's replacement, not the original."""
    assert m.load(P2) == 0
    await settle()
    in_prev = m.sleeper("cmdline_proc_show", comm="in_prev")     # enters lp_q's version
    assert m.call("cmdline_proc_show", in_prev) == "lp_q:cmdline_proc_show"
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]})) == 0
    assert sleeping_line(in_prev, "cmdline_proc_show") in m.take()
    assert in_prev.patch_state == 0


async def test_stacked_patching_original_not_forbidden_416(m16, autojump_clock):
    """§8.6 step 5: with a previous patch below, a task still sleeping in the
    *original* does not block the new patch.  (Set-up: a forced first patch
    leaves a task asleep in the original.)"""
    m = m16
    in_orig = m.sleeper("cmdline_proc_show", comm="in_orig")
    assert m.load(P2) == 0
    assert m.write("lp_q/force", b"1") == 1
    await settle()
    assert m.state("lp_q") == (1, 0)
    m.take()
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]})) == 0
    assert in_orig.patch_state == 1
    assert not [ln for ln in m.take() if "in_orig" in ln]


async def test_unpatching_new_is_forbidden_original_not_416(m16, autojump_clock):
    """§8.6 step 5, unpatching: the forbidden range is the new function; a task
    asleep in the original does not block.  (4.16 force for the set-up.)"""
    m = m16
    in_orig = m.sleeper("cmdline_proc_show", comm="in_orig")
    assert m.load(P2) == 0
    assert m.write("lp_q/force", b"1") == 1
    await settle()
    in_new = m.sleeper("cmdline_proc_show", comm="in_new")
    assert m.call("cmdline_proc_show", in_new) == "lp_q:cmdline_proc_show"
    m.take()
    assert m.write("lp_q/enabled", b"0") == 1
    lines = m.take()
    assert sleeping_line(in_new, "cmdline_proc_show") in lines
    assert not [ln for ln in lines if "in_orig" in ln]
    assert (in_orig.patch_state, in_new.patch_state) == (0, 1)


async def test_stacked_unpatching_previous_patch_not_forbidden_416(m16, autojump_clock):
    """§8.6 step 5, unpatching the top patch: only its own replacement is
    forbidden; a task asleep in the previous patch's replacement switches.
    (4.16 force for the set-up.)"""
    m = m16
    assert m.load(P2) == 0
    await settle()
    in_q = m.sleeper("cmdline_proc_show", comm="in_q")              # asleep in lp_q's
    assert m.call("cmdline_proc_show", in_q) == "lp_q:cmdline_proc_show"
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]})) == 0
    assert sleeping_line(in_q, "cmdline_proc_show") in m.take()     # patching: lp_q's is forbidden
    assert m.write("lp_r/force", b"1") == 1
    await settle()
    assert m.state("lp_r") == (1, 0)
    in_r = m.sleeper("cmdline_proc_show", comm="in_r")              # asleep in lp_r's
    assert m.call("cmdline_proc_show", in_r) == "lp_r:cmdline_proc_show"
    m.take()
    assert m.write("lp_r/enabled", b"0") == 1
    lines = m.take()
    assert sleeping_line(in_r, "cmdline_proc_show") in lines
    assert not [ln for ln in lines if "in_q" in ln]
    assert (in_q.patch_state, in_r.patch_state) == (0, 1)


async def test_unloaded_objects_skipped_by_stack_check(m, autojump_clock):
    """§8.6 step 5: objects that are not patched (module not loaded) are skipped."""
    s = spec("lp_u", {None: ["cmdline_proc_show"], "not_loaded": ["x"]})
    t = m.kthread()
    assert m.load(s) == 0
    assert t.patch_state == 1


# ---------------------------------------------------------------------------
# §8.6 unreliable and deep stacks, message texts
# ---------------------------------------------------------------------------

async def test_unreliable_stack_blocks(m, autojump_clock):
    """§8.6 step 4: an unreliable stack fails the check with its debug line; once
    reliable again the task switches on the next retry."""
    t = m.kthread("unrel")
    t.reliable_stack = False
    assert m.load(P) == 0
    assert unreliable_line(t) in m.take()
    await settle(2)
    assert t.patch_state == 0
    assert m.state("lp_p") == (1, 1)
    t.reliable_stack = True
    await settle(1)
    assert m.state("lp_p") == (1, 0)


@pytest.mark.parametrize("frames,blocks", [(99, False), (100, False), (101, True), (150, True)])
async def test_max_stack_entries(m, autojump_clock, frames, blocks):
    """§8.6 step 4 / §13.12: only 100 frames are examined; a deeper stack counts
    as unreliable."""
    base = [m.kernel.kallsyms.find("ret_from_fork")]
    t = m.sched.add("deep", TaskKind.KTHREAD, base, ppid=2)
    extra = frames - len(m.sched.stack(t))
    t.base = base + [m.kernel.kallsyms.find("do_syscall_64")] * extra
    assert len(m.sched.stack(t)) == frames
    assert m.load(P) == 0
    assert (unreliable_line(t) in m.lines()) is blocks
    assert t.patch_state == (0 if blocks else 1)


async def test_deep_stack_with_patched_function_beyond_100_frames(m, autojump_clock):
    """§8.6 step 4: >100 frames is unreliable even if the patched function would
    be outside the examined part."""
    base = [m.kernel.kallsyms.find("ret_from_fork")] + [m.kernel.kallsyms.find("do_syscall_64")] * 120
    t = m.sched.add("deep", TaskKind.KTHREAD, base, ppid=2)
    assert m.load(P) == 0
    assert unreliable_line(t) in m.lines()


async def test_debug_line_truncated_to_127_chars(m, autojump_clock):
    """§8.6: the per-task message is built in a 128-byte buffer: the line is cut
    at 127 characters."""
    from .conftest import target_module
    long = "f" * 120
    assert m.load(target_module("tmod", [long])) == 0
    t = m.sleeper(long, comm="trunc", module="tmod")
    assert m.load(spec("lp_t", {"tmod": [long]})) == 0
    full = f"klp_check_stack: trunc:{t.pid} is sleeping on function {long}"
    want = "livepatch: " + full[:127]
    assert want in m.lines()
    assert "livepatch: " + full not in m.lines()


async def test_comm_is_task_comm_len(m, autojump_clock):
    """§8.6: the message prints comm, at most 15 characters (TASK_COMM_LEN 16)."""
    t = m.kthread("a_very_long_thread_name")
    m.sched.run(t)
    assert m.load(P) == 0
    assert f"livepatch: klp_try_switch_task: a_very_long_thr:{t.pid} is running" in m.lines()


# ---------------------------------------------------------------------------
# §8.4 the retry work
# ---------------------------------------------------------------------------

async def test_retry_every_whole_second(m, autojump_clock):
    """§8.4: an unsuccessful attempt arms the retry ~1 s later, on a whole-second
    boundary; exactly one retry is pending at a time."""
    await trio.sleep(0.5)
    spin = m.blocker("spin")
    assert m.load(P) == 0
    await settle(4.2)
    times = times_of(m, running_line(spin))
    assert times[0] == pytest.approx(0.5)
    assert all(float(x).is_integer() for x in times[1:]), times
    assert 0.75 <= times[1] - times[0] <= 1.75, times
    assert [b - a for a, b in zip(times[1:], times[2:])] == [1.0] * (len(times) - 2)


async def test_one_retry_pending_after_reversals(m, autojump_clock):
    """§8.4 / §8.9: reversal does not add retries: still one attempt per second."""
    spin = m.blocker("spin")
    assert m.load(P) == 0
    await settle(0.3)
    for _ in range(3):
        assert m.write("lp_p/enabled", b"0") == 1
        assert m.write("lp_p/enabled", b"1") == 1
    await settle(3)
    assert times_of(m, running_line(spin)) == [0.0, 1.0, 2.0, 3.0]


async def test_retry_stops_after_completion(m, autojump_clock):
    """§8.4: the work is re-armed only by unsuccessful attempts."""
    spin = m.blocker("spin")
    assert m.load(P) == 0
    await settle(1.5)
    m.sched.rest(spin)
    await settle(1)
    assert m.state("lp_p") == (1, 0)
    m.take()
    await settle(5)
    assert m.take() == []


# ---------------------------------------------------------------------------
# §2.7 / §8.2 patch_state through a transition
# ---------------------------------------------------------------------------

async def test_patch_state_values_through_transitions(m, autojump_clock):
    """§2.7 / §8.2 / §8.7: -1 outside transitions; while patching 0 (not yet) and
    1 (switched); while unpatching 1 (not yet) and 0 (switched); -1 after."""
    spin = m.blocker("spin")
    other = m.kthread("other")

    def ps(t):
        return m.proc_patch_state(t)

    assert (ps(spin), ps(other)) == (b"-1\n", b"-1\n")
    assert m.load(P2) == 0
    assert (ps(spin), ps(other)) == (b"0\n", b"1\n")
    node = m.node(f"proc/{spin.pid}/task/{spin.pid}/patch_state")
    assert Kernfs.read(node, 0, 10) == b"0\n"
    assert m.node(f"proc/{spin.pid}/patch_state").mode & 0o7777 == 0o400
    m.sched.rest(spin)
    await settle()
    assert (ps(spin), ps(other)) == (b"-1\n", b"-1\n")
    m.sched.run(spin)
    assert m.write("lp_q/enabled", b"0") == 1
    assert (ps(spin), ps(other)) == (b"1\n", b"0\n")
    m.sched.rest(spin)
    await settle()
    assert all(t.patch_state == -1 for t in m.all_tasks())
    assert all(TIF_PATCH_PENDING not in t.flags for t in m.all_tasks())


async def test_fork_inherits_state_and_pending_flag(m, autojump_clock):
    """§8.12: a child copies its parent's patch_state and TIF_PATCH_PENDING."""
    spin = m.blocker("spin")
    done = m.kthread("done")
    assert m.load(P2) == 0
    c0 = m.sched.add("child0", TaskKind.KTHREAD, done.base, ppid=spin.pid)
    c1 = m.sched.add("child1", TaskKind.KTHREAD, done.base, ppid=done.pid)
    assert (c0.patch_state, TIF_PATCH_PENDING in c0.flags) == (0, True)
    assert (c1.patch_state, TIF_PATCH_PENDING in c1.flags) == (1, False)
    await settle(1)
    assert c0.patch_state == 1                        # its own stack is clean
    m.sched.rest(spin)
    await settle(1)
    c2 = m.sched.add("child2", TaskKind.KTHREAD, done.base, ppid=spin.pid)
    assert c2.patch_state == -1


# ---------------------------------------------------------------------------
# §8.9 reversal, §8.8 cancel
# ---------------------------------------------------------------------------

async def test_reversal_switched_tasks_switch_back(m, autojump_clock):
    """§8.9: after a reversal the tasks that had switched must switch back (they
    get the pending flag again); the ones that had not are already done."""
    spin = m.blocker("spin")
    back = m.sleeper("cmdline_proc_show", comm="back")
    assert m.load(P2) == 0
    m.sched.wake(back)
    await settle(1)
    assert back.patch_state == 1
    in_new = m.sleeper("cmdline_proc_show", comm="in_new")
    assert m.call("cmdline_proc_show", in_new) == "lp_q:cmdline_proc_show"
    assert m.write("lp_q/enabled", b"0") == 1
    assert TIF_PATCH_PENDING not in spin.flags                   # already in the new target
    assert TIF_PATCH_PENDING in back.flags and TIF_PATCH_PENDING in in_new.flags
    await settle(1)
    assert back.patch_state == 0                                  # clean stack: switched back
    assert in_new.patch_state == 1                                # asleep in the new code
    assert sleeping_line(in_new, "cmdline_proc_show") in m.lines()
    assert all(f.transition for f in m.patch("lp_q").objs[0].funcs)
    m.sched.wake(in_new)
    await settle(1)
    assert m.state("lp_q") == (0, 0)


async def test_cancel_path_restores_everything(m, autojump_clock):
    """§8.8: cancel (enable error path) goes straight to an unpatching completion:
    no "starting" notice, tasks back to -1, no flags, funcs no longer in
    transition, no ops left, enabled 0, transition 0."""
    from .conftest import demo_callbacks
    s = spec("lp_c", {None: ["cmdline_proc_show"], "tmod_absent": ["x"]},
             callbacks={None: demo_callbacks(m.printk, pre_patch_ret={"vmlinux": -errno.EPERM})})
    assert m.register_only(s) == 0
    m.take()
    assert m.write("lp_c/enabled", b"1") == -errno.EPERM
    lines = m.take()
    assert not [ln for ln in lines if "starting" in ln]
    assert all(t.patch_state == -1 for t in m.all_tasks())
    assert all(TIF_PATCH_PENDING not in t.flags for t in m.all_tasks())
    assert not any(f.transition for o in m.patch("lp_c").objs for f in o.funcs)
    assert m.lp.klp_ops == []
    assert m.lp.klp_transition_patch is None
    assert m.state("lp_c") == (0, 0)
    assert m.call("cmdline_proc_show", m.kthread()) == ORIGINAL


# ---------------------------------------------------------------------------
# more §8 rows
# ---------------------------------------------------------------------------

async def test_task_already_in_target_is_not_checked(m, autojump_clock):
    """§8.6 step 1: a task whose state already equals the target succeeds with no
    check: after a reversal the spinning (never switched) task prints no more
    "is running" lines."""
    spin = m.blocker("spin")
    assert m.load(P) == 0
    await settle(0.5)
    assert m.write("lp_p/enabled", b"0") == 1
    await settle(1)
    assert times_of(m, running_line(spin)) == [0.0]
    assert m.state("lp_p") == (0, 0)


async def test_module_object_loaded_mid_transition_is_stack_checked(m, autojump_clock):
    """§8.6 step 5 with §7.1: a module object patched during the transition is
    part of the stack check: a not-yet-switched task asleep in the module's
    original function holds the transition."""
    from .conftest import target_module
    spin = m.blocker("spin")
    assert m.load(spec("lp_m", {None: ["cmdline_proc_show"], "tmod": ["tfunc"]})) == 0
    assert m.load(target_module("tmod", ["tfunc"])) == 0
    # a task still in the initial state (forked from the spinner) enters tfunc: original
    holder = m.sched.add("holder", TaskKind.KTHREAD, spin.base, ppid=spin.pid)
    assert holder.patch_state == 0
    assert m.sched.enter(holder, m.sym("tfunc", "tmod"), "D") is m.sym("tfunc", "tmod")
    m.sched.rest(spin)
    await settle()
    assert sleeping_line(holder, "tfunc") in m.lines()
    assert m.state("lp_m") == (1, 1)
    m.sched.wake(holder)
    await settle()
    assert m.state("lp_m") == (1, 0)


async def test_idle_task_stack_checked_when_cpu_busy(m, autojump_clock):
    """§8.6 step 3 note: an idle task whose CPU runs another task is not running
    and is stack-checked like a sleeper: patching do_idle (on every idle stack)
    blocks it, with the sleeping line; once the CPU goes idle, the idle loop
    switches it."""
    busy0, busy1 = m.blocker("b0"), m.blocker("b1")
    busy0.cpu, busy1.cpu = 0, 1
    m.sched.run(busy0)
    m.sched.run(busy1)
    assert m.load(spec("lp_idle", {None: ["do_idle"]})) == 0
    idle0, idle1 = m.sched.idle_tasks
    lines = m.lines()
    assert "livepatch: klp_check_stack: swapper/0:0 is sleeping on function do_idle" in lines
    assert "livepatch: klp_check_stack: swapper/1:0 is sleeping on function do_idle" in lines
    assert (idle0.patch_state, idle1.patch_state) == (0, 0)
    m.sched.rest(busy0)
    m.sched.rest(busy1)
    await settle(0.1)
    assert (idle0.patch_state, idle1.patch_state) == (1, 1)
    await settle()
    assert m.state("lp_idle") == (1, 0)


async def test_reversal_idle_tasks_switch_back_in_idle_loop(m, autojump_clock):
    """§8.9 step 3/5: switched idle tasks get the pending flag again and switch
    back in the idle loop."""
    spin = m.blocker("spin")
    assert m.load(P) == 0
    await settle(0.5)
    idle = m.sched.idle_tasks
    assert [t.patch_state for t in idle] == [1, 1]
    assert m.write("lp_p/enabled", b"0") == 1
    free = idle[1 - spin.cpu]
    assert TIF_PATCH_PENDING in free.flags
    await settle(0.1)
    assert free.patch_state == 0


async def test_patch_state_in_thread_dir(m, autojump_clock):
    """§2.7: /proc/<pid>/task/<tid>/patch_state mirrors the task's state, 0400."""
    t = m.kthread("kt")
    node = m.node(f"proc/{t.pid}/task/{t.pid}/patch_state")
    assert node.mode & 0o7777 == 0o400
    assert Kernfs.read(node, 0, 10) == b"-1\n"
