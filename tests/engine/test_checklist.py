"""§13 "Emulator checklist / quirks to decide consciously": one test per item."""

from __future__ import annotations

import errno

from klpfs.kernel.sched import TaskKind
from klpfs.sysfs.kernfs import Kernfs

from .conftest import cb_line, demo_callbacks, settle, spec, target_module

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})


async def test_13_1_same_value_is_einval(m, autojump_clock):
    """§13.1: writing the current value to `enabled` is EINVAL in every state."""
    assert m.register_only(A) == 0
    assert m.write("lp_a/enabled", b"0") == -errno.EINVAL          # disabled
    spin = m.blocker()
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.write("lp_a/enabled", b"1") == -errno.EINVAL          # patching
    m.sched.rest(spin)
    await settle()
    assert m.write("lp_a/enabled", b"1") == -errno.EINVAL          # enabled
    m.sched.run(spin)
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.write("lp_a/enabled", b"0") == -errno.EINVAL          # unpatching


async def test_13_2_reversal_never_completes_in_the_write(m, autojump_clock):
    """§13.2: reversal needs no stacking check, never fails, and does not try to
    complete: even when every task could switch at once, `transition` stays 1
    until the retry work."""
    m.sched.set_cpu_online(0, False)
    m.sched.set_cpu_online(1, False)                 # no idle task is ever "running"
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(A) == 0
    assert m.state("lp_a") == (1, 1)
    m.take()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)
    assert m.take() == [
        "livepatch: 'lp_a': reversing transition from patching to unpatching",
        "livepatch: 'lp_a': starting unpatching transition",
    ]
    assert holder.patch_state == 0
    await settle(1.5)
    assert m.state("lp_a") == (0, 0)


async def test_13_3_stacking_by_registration_order(m, autojump_clock):
    """§13.3: enable only if first or predecessor (list order) enabled."""
    assert m.register_only(A) == 0
    assert m.register_only(B) == 0
    assert m.write("lp_b/enabled", b"1") == -errno.EBUSY
    assert m.write("lp_a/enabled", b"1") == 1
    await settle()
    assert m.write("lp_b/enabled", b"1") == 1


async def test_13_4_enabled_flips_at_request_time(m, autojump_clock):
    """§13.4: `enabled` changes when the request is accepted."""
    m.blocker()
    assert m.load(A) == 0
    assert m.state("lp_a") == (1, 1)
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)


async def test_13_5_force_signal_values(m16, autojump_clock):
    """§13.5: force/signal 0 succeed with no transition; 1 without this patch in
    transition is EINVAL."""
    m = m16
    assert m.register_only(A) == 0
    for attr in ("force", "signal"):
        assert m.write(f"lp_a/{attr}", b"0") == 1
        assert m.write(f"lp_a/{attr}", b"1") == -errno.EINVAL


async def test_13_6_open_mode_errors_from_kernfs(m16, autojump_clock):
    """§13.6: EACCES for opening transition for writing and signal/force for
    reading comes from kernfs (the open), before any handler runs."""
    m = m16
    assert m.register_only(A) == 0
    assert Kernfs.open_check(m.lp_node("lp_a/transition"), False, True) == -errno.EACCES
    assert Kernfs.open_check(m.lp_node("lp_a/signal"), True, False) == -errno.EACCES
    assert Kernfs.open_check(m.lp_node("lp_a/force"), True, False) == -errno.EACCES
    assert Kernfs.open_check(m.lp_node("lp_a/enabled"), True, True) == 0


async def test_13_7_vmlinux_ambiguity_null(m, autojump_clock):
    """§13.7: the vmlinux ambiguity message prints `(null)`."""
    assert m.register_only(spec("lp_x", {None: ["enabled_show"]})) == -errno.EINVAL
    assert "livepatch: unresolvable ambiguity for symbol 'enabled_show' in object '(null)'" in m.lines()


async def test_13_8_disabled_patch_blocks_module_load(m, autojump_clock):
    """§13.8: a disabled registered patch still resolves symbols for newly loaded
    modules and can block their loading."""
    assert m.register_only(spec("lp_x", {"tmod": ["missing"]})) == 0
    assert m.load(target_module("tmod", ["tfunc"])) == -errno.EINVAL
    assert m.lines()[-1] == "livepatch: patch 'lp_x' failed for module 'tmod', refusing to load module 'tmod'"


async def test_13_9_module_loading_during_transition(m, autojump_clock):
    """§13.9: a module loading during a transition is patched (even during an
    unpatching transition) and gets post_patch only at completion."""
    cbs = {"tmod": demo_callbacks(m.printk)}
    s = spec("lp_x", {None: ["cmdline_proc_show"], "tmod": ["tfunc"]}, callbacks=cbs)
    spin = m.blocker()
    assert m.load(s) == 0
    m.take()
    assert m.load(target_module("tmod", ["tfunc"])) == 0
    assert m.take() == ["livepatch: applying patch 'lp_x' to loading module 'tmod'",
                        cb_line("pre_patch", "tmod", "COMING")]
    m.sched.rest(spin)
    await settle()
    assert cb_line("post_patch", "tmod", "LIVE") in m.take()
    # unpatching transition
    assert m.rmmod("tmod") == 0
    m.sched.run(spin)
    assert m.write("lp_x/enabled", b"0") == 1
    m.take()
    assert m.load(target_module("tmod", ["tfunc"])) == 0
    assert m.take() == ["livepatch: applying patch 'lp_x' to loading module 'tmod'",
                        cb_line("pre_patch", "tmod", "COMING")]
    assert m.patch("lp_x").objs[1].patched is True


async def test_13_10_immediate_and_forced_never_release(boot, autojump_clock):
    """§13.10: immediate patches never release their module (4.15); forced
    transitions block all future module releases (4.16)."""
    m = boot("4.15")
    assert m.load(spec("lp_i", immediate=True)) == 0
    assert m.write("lp_i/enabled", b"0") == 1
    assert m.rmmod("lp_i") == -errno.EAGAIN
    m16 = boot("4.16")
    spin = m16.blocker()
    assert m16.load(A) == 0
    assert m16.write("lp_a/force", b"1") == 1
    m16.sched.rest(spin)
    await settle()
    assert m16.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m16.rmmod("lp_a") == -errno.EAGAIN


async def test_13_11_switch_points_by_task_kind(m, autojump_clock):
    """§13.11: kthreads switch only via the stack check; idle tasks via the idle
    hook or the stack check; user tasks also on return to user space."""
    kspin = m.blocker("kspin")                      # running kthread: never
    uspin = m.user("uspin")
    uspin.cpu = kspin.cpu                           # leave the other CPU idle
    m.sched.run(uspin)                              # running user task: at kernel exit
    kin = m.sleeper("cmdline_proc_show", comm="kin")
    uin = m.sleeper("cmdline_proc_show", comm="uin", kind=TaskKind.USER)
    assert m.load(A) == 0
    idle_free = m.sched.idle_tasks[1 - kspin.cpu]
    idle_busy = m.sched.idle_tasks[kspin.cpu]
    assert idle_busy.patch_state == 1               # CPU busy: stack-checked
    assert idle_free.patch_state == 0
    await settle(0.1)
    assert idle_free.patch_state == 1               # idle loop
    assert uspin.patch_state == 1                   # exit to user mode
    m.sched.wake(uin)
    m.sched.wake(kin)
    assert uin.patch_state == 1                     # return to user
    assert kin.patch_state == 0                     # kthread: waits for the stack check
    await settle(1)
    assert kin.patch_state == 1
    assert kspin.patch_state == 0
    await settle(10)
    assert kspin.patch_state == 0 and m.state("lp_a") == (1, 1)


async def test_13_12_only_100_frames(m, autojump_clock):
    """§13.12: only the first 100 frames are examined; deeper counts as unreliable."""
    base = [m.kernel.kallsyms.find("ret_from_fork")] + [m.kernel.kallsyms.find("do_syscall_64")] * 100
    t = m.sched.add("deep", TaskKind.KTHREAD, base, ppid=2)
    assert len(m.sched.stack(t)) > 100
    assert m.load(A) == 0
    assert f"livepatch: klp_check_stack: deep:{t.pid} has an unreliable stack" in m.lines()
    assert t.patch_state == 0


async def test_13_13_unregister_during_unpatching(m, autojump_clock):
    """§13.13: klp_unregister_patch only checks `enabled`, already false during an
    unpatching transition, so it succeeds."""
    assert m.load(A) == 0
    await settle()
    m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.lp.klp_unregister_patch(m.patch("lp_a")) == 0


async def test_13_14_debug_off_by_default(boot, autojump_clock):
    """§13.14: pr_debug lines are off by default (and appear when switched on)."""
    m = boot(debug=False)
    m.blocker()
    assert m.load(A) == 0
    await settle()
    assert not [ln for ln in m.lines() if "initializing" in ln or "klp_" in ln]
    m.debug = True
    await settle()
    assert [ln for ln in m.lines() if "is running" in ln]
