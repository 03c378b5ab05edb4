"""The Python module API: code that sleeps as tasks do, parameters, kthreads,
work, and how the kernel treats modules it must refuse or that misbehave.

Engine level under MockClock; each module is written here as its source text.
"""

from __future__ import annotations

import errno
import os
import textwrap

import pytest
import trio

from profiles.conftest import Machine, autojump_clock, make_machine, settle  # noqa: F401

HEADER = "from klpfs.kapi import *\n\npr_fmt = lambda fmt: KBUILD_MODNAME + \": \" + fmt\n"


def source(body: str) -> str:
    return HEADER + textwrap.dedent(body)


@pytest.fixture
async def m61(nursery) -> Machine:
    return make_machine(nursery, "6.1", debug=True)


def snapshot(m: Machine) -> tuple:
    """What a load that fails must leave as it was."""
    return (sorted(m.kernel.modules.modules), sorted(m.kernfs.walk("sys/module").children or {}),
            sorted(m.kernfs.names(m.kernfs.walk("proc"))), sorted(m.sched.tasks),
            [s.name for syms in (m.kernel.kallsyms.symbols(n) for n in m.kernel.modules.modules) for s in syms])


# -- code that sleeps ------------------------------------------------------------------------

KTHREAD_MOD = source('''
    sleeper = None


    def wait_a_bit():
        msleep(100)


    def sleeper_thread(data):
        pr_info("%s: started as %s\\n", __func__, current.comm)
        while not kthread_should_stop():
            wait_a_bit()
        pr_info("%s: stopping\\n", __func__)
        return 7


    def kt_mod_init():
        global sleeper
        sleeper = kthread_run(sleeper_thread, None, "kt_%s", "sleeper")
        return 0


    def kt_mod_exit():
        ret = kthread_stop(sleeper)
        pr_info("%s: kthread_stop() returned %d\\n", __func__, ret)


    module_init(kt_mod_init)
    module_exit(kt_mod_exit)
    MODULE_LICENSE("GPL")
''')


async def test_kthread_stack_holds_both_functions(m61: Machine, autojump_clock) -> None:
    """A kthread whose thread function calls the function it sleeps in has
    both on its stack, between kthread() and msleep()."""
    m = m61
    assert (await m.insmod_text("kt_mod.py", KTHREAD_MOD))["ok"]
    task = next(t for t in m.sched.tasks.values() if t.comm == "kt_sleeper")
    names = [s.name for s in m.sched.stack(task)]
    assert names == ["ret_from_fork", "kthread", "sleeper_thread", "wait_a_bit", "msleep", "schedule_timeout",
                     "schedule", "__schedule"]
    assert task.state == "D"
    assert m.take() == ["kt_mod: sleeper_thread: started as kt_sleeper"]


PATCH_WAIT = source('''
    def new_wait_a_bit():
        msleep(100)


    funcs = [klp_func(old_name="{old}", new_func=new_wait_a_bit)]
    objs = [klp_object(name="kt_mod", funcs=funcs)]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def init():
        return klp_enable_patch(patch)


    def exit():
        pass


    module_init(init)
    module_exit(exit)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')


@pytest.mark.parametrize("old", ["sleeper_thread", "wait_a_bit"])
async def test_either_function_on_the_stack_holds_the_transition(m61: Machine, autojump_clock, old: str) -> None:
    """Patching the thread function or the one it sleeps in: the kthread is
    inside both, so the stack check fails every retry and the transition stays."""
    m = m61
    assert (await m.insmod_text("kt_mod.py", KTHREAD_MOD))["ok"]
    assert (await m.insmod_text("kt_patch.py", PATCH_WAIT.replace("{old}", old)))["ok"]
    await settle(5.5)
    assert m.transition("kt_patch") == b"1\n"
    pid = next(t.pid for t in m.sched.tasks.values() if t.comm == "kt_sleeper")
    assert f"livepatch: klp_try_switch_task: kt_sleeper:{pid} is sleeping on function {old}" in m.lines()


async def test_rmmod_stops_a_kthread_looping_on_kthread_should_stop(m61: Machine, autojump_clock) -> None:
    """rmmod runs exit, whose kthread_stop() wakes the thread out of msleep's
    loop at its end, waits for it to return, and hands back its value."""
    m = m61
    assert (await m.insmod_text("kt_mod.py", KTHREAD_MOD))["ok"]
    await settle(1.0)
    m.take()
    assert (await m.rmmod_ctl("kt_mod"))["ok"]
    assert m.take() == ["kt_mod: sleeper_thread: stopping", "kt_mod: kt_mod_exit: kthread_stop() returned 7"]
    assert not any(t.comm == "kt_sleeper" for t in m.sched.tasks.values())
    assert not any(t.comm == "rmmod" for t in m.sched.tasks.values())


BUSY_PATCH = source('''
    def patched_work_func(work):
        pr_info("%s\\n", __func__)


    funcs = [klp_func(old_name="busymod_work_func", new_func=patched_work_func)]
    objs = [klp_object(name="test_klp_callbacks_busy", funcs=funcs)]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def init():
        return klp_enable_patch(patch)


    module_init(init)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')


async def test_parameter_write_releases_a_blocked_transition(m61: Machine, autojump_clock) -> None:
    """test_klp_callbacks_busy block_transition=Y parks a kworker in
    busymod_work_func; writing N to its parameter lets the loop end, and the
    next retry completes the transition."""
    m = m61
    assert (await m.insmod("test_klp_callbacks_busy", "block_transition=Y"))["ok"]
    assert m.take() == ["test_klp_callbacks_busy: test_klp_callbacks_busy_init",
                        "test_klp_callbacks_busy: busymod_work_func enter"]
    assert (await m.insmod_text("busy_patch.py", BUSY_PATCH))["ok"]
    await settle(3.5)
    assert m.transition("busy_patch") == b"1\n"
    param = m.node("sys/module/test_klp_callbacks_busy/parameters/block_transition")
    assert param is not None
    assert m.kernfs.read(param, 0, 4096) == b"Y\n"
    assert m.kernfs.write(param, b"N\n") == 2
    await settle(1.0)
    assert m.transition("busy_patch") == b"0\n"
    assert "test_klp_callbacks_busy: busymod_work_func exit" in m.lines()
    assert "livepatch: 'busy_patch': patching complete" in m.lines()


PRE_PATCH_FAILS = source('''
    fail_pre_patch = False
    module_param("fail_pre_patch", "bool", 0o644)


    def pre_patch_callback(obj):
        pr_info("%s: %s\\n", __func__, "vmlinux" if obj.mod is None else obj.mod.name)
        if fail_pre_patch:
            return -ENODEV
        return 0


    def new_cmdline_proc_show(m, v):
        seq_puts(m, "patched\\n")
        return 0


    funcs = [klp_func(old_name="cmdline_proc_show", new_func=new_cmdline_proc_show)]
    objs = [klp_object(funcs=funcs, callbacks=klp_callbacks(pre_patch=pre_patch_callback))]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def init():
        ret = klp_enable_patch(patch)
        pr_info("klp_enable_patch() returned %d\\n", ret)
        return ret


    module_init(init)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')


async def test_pre_patch_fails_by_parameter(m61: Machine, autojump_clock) -> None:
    """A bool parameter makes pre_patch return -ENODEV: the load fails with
    ENODEV after the kernel's lines, and code after klp_enable_patch() runs."""
    m = m61
    before = snapshot(m)
    reply = await m.insmod_text("pre_fail.py", PRE_PATCH_FAILS, "fail_pre_patch=1")
    assert reply == {"ok": False, "errno": errno.ENODEV, "error": "No such device"}
    assert m.take() == [
        "pre_fail: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'pre_fail'",
        "livepatch: 'pre_fail': initializing patching transition",
        "pre_fail: pre_patch_callback: vmlinux",
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        "livepatch: failed to enable patch 'pre_fail'",
        "livepatch: 'pre_fail': canceling patching transition, going to unpatch",
        "livepatch: 'pre_fail': completing unpatching transition",
        "livepatch: 'pre_fail': unpatching complete",
        "pre_fail: klp_enable_patch() returned -19",
    ]
    assert snapshot(m) == before
    assert (await m.insmod_text("pre_fail.py", PRE_PATCH_FAILS))["ok"]
    assert m.take()[-1] == "pre_fail: klp_enable_patch() returned 0"
    assert (await m.ctl("call", func="cmdline_proc_show", pid=None))["output"] == "patched\n"


# -- parameters ----------------------------------------------------------------------------------

PARAMS = source('''
    pids = [0] * 4
    npids = 0
    module_param_array("pids", "int", "npids", 0o644)
    level = 3
    module_param("level", "uint", 0o600)
    name = "none"
    module_param("name", "charp", 0o444)
    hidden = 1
    module_param("hidden", "int", 0)


    def params_init():
        pr_info("npids=%d pids=%d,%d level=%u name=%s\\n", npids, pids[0], pids[1], level, name)
        return 0


    module_init(params_init)
    MODULE_LICENSE("GPL")
''')


async def test_parameters_of_each_type(m61: Machine, autojump_clock) -> None:
    m = m61
    assert (await m.insmod_text("params.py", PARAMS, "pids=5,0x10", "level=017", "name=abc"))["ok"]
    assert m.take() == ["params: npids=2 pids=5,16 level=15 name=abc"]
    base = "sys/module/params/parameters"
    assert sorted(m.node(base).children) == ["level", "name", "pids"]
    read = lambda p: m.kernfs.read(m.node(f"{base}/{p}"), 0, 4096)  # noqa: E731
    assert (read("pids"), read("level"), read("name")) == (b"5,16\n", b"15\n", b"abc\n")
    assert m.kernfs.write(m.node(f"{base}/pids"), b"1,2,3\n") == 6
    assert read("pids") == b"1,2,3\n"
    assert m.kernfs.write(m.node(f"{base}/pids"), b"1,2,3,4,5") == -errno.EINVAL
    assert m.kernfs.write(m.node(f"{base}/level"), b"-1") == -errno.EINVAL
    assert m.kernfs.write(m.node(f"{base}/level"), b"4294967296") == -errno.ERANGE
    assert m.take() == ["pids: can only take 4 arguments"]


@pytest.mark.parametrize("arg, err, line", [
    ("level=x", errno.EINVAL, "params: `x' invalid for parameter `level'"),
    ("level=99999999999", errno.ERANGE, "params: `99999999999' invalid for parameter `level'"),
    # The record keeps 989 bytes: LOG_LINE_MAX (992) less the NUL and the KERN_ERR prefix.
    ("name=" + "n" * 1025, errno.ENOSPC, ("params: `" + "n" * 1025 + "' too large for parameter `name'")[:989]),
])
async def test_bad_parameter_refuses_the_load(m61: Machine, autojump_clock, arg: str, err: int, line: str) -> None:
    m = m61
    before = snapshot(m)
    assert (await m.insmod_text("params.py", PARAMS, arg))["errno"] == err
    assert m.take() == [line]
    assert snapshot(m) == before


# -- modules the kernel refuses, and modules that misbehave ---------------------------------------

async def refused(m: Machine, filename: str, text: str) -> dict:
    """Load a bad module; nothing may change, and the kernel must take a good one after."""
    before = snapshot(m)
    reply = await m.insmod_text(filename, text)
    assert not reply["ok"]
    assert snapshot(m) == before
    assert (await m.insmod("test_klp_livepatch"))["ok"]
    return reply


async def test_syntax_error(m61: Machine, autojump_clock) -> None:
    reply = await refused(m61, "bad_syntax.py", source("def broken(:\n    pass\n"))
    assert reply == {"ok": False, "errno": errno.ENOEXEC, "file_error": True,
                     "error": "/tmp/bad_syntax.py:4: syntax error: invalid syntax"}


async def test_exception_at_top_level(m61: Machine, autojump_clock) -> None:
    reply = await refused(m61, "bad_top.py", source("x = 1 // 0\n"))
    assert reply["errno"] == errno.ENOEXEC
    assert reply["error"] == ("/tmp/bad_top.py: /tmp/bad_top.py:4 in <module>: "
                              "ZeroDivisionError: integer division or modulo by zero")


async def test_exception_in_init(m61: Machine, autojump_clock) -> None:
    """An exception in init is an oops: logged with the line, the kernel tainted D,
    and the load fails (unlike the kernel, which would leave the module half-loaded)."""
    m = m61
    text = source('''
        def bad_init():
            pr_info("about to fail\\n")
            return [][1]


        module_init(bad_init)
    ''')
    reply = await refused(m, "bad_init.py", text)
    assert reply == {"ok": False, "errno": errno.EFAULT, "error": "Bad address",
                     "detail": "/tmp/bad_init.py: init faulted: IndexError: list index out of range "
                               "at /tmp/bad_init.py:7 in bad_init"}
    pid = int(next(line for line in m.lines() if line.startswith("BUG:")).rsplit(":", 1)[1].rstrip("]"))
    assert m.lines()[:3] == ["bad_init: about to fail",
                             f"BUG: module code raised IndexError: list index out of range [insmod:{pid}]",
                             "  at /tmp/bad_init.py:7 in bad_init"]
    assert "D" in m.kernel.modules.taint_letters()


async def test_init_that_never_sleeps(m61: Machine, autojump_clock) -> None:
    """A loop that never sleeps is stopped after the line budget: a soft
    lockup naming the line; the load fails and the daemon carries on."""
    m = m61
    text = source('''
        def spin_init():
            i = 0
            while True:
                i += 1


        module_init(spin_init)
    ''')
    reply = await refused(m, "spin.py", text)
    assert reply["errno"] == errno.EFAULT
    assert reply["detail"].endswith("at /tmp/spin.py:8 in spin_init")
    assert m.lines()[0].startswith("watchdog: BUG: soft lockup - CPU#")
    assert "L" in m.kernel.modules.taint_letters()


async def test_work_that_never_sleeps_does_not_stop_the_kernel(m61: Machine, autojump_clock) -> None:
    """The same in a work function: its kworker's code is stopped and logged;
    the module stays loaded, the timers keep running."""
    m = m61
    text = source('''
        def spin(work):
            while True:
                pass


        work = DECLARE_WORK(spin)


        def spin_init():
            schedule_work(work)
            return 0


        def spin_exit():
            pass


        module_init(spin_init)
        module_exit(spin_exit)
    ''')
    assert (await m.insmod_text("spinwork.py", text))["ok"]
    await settle(1.0)
    assert any(line.startswith("watchdog: BUG: soft lockup") for line in m.lines())
    assert (await m.insmod("test_klp_livepatch"))["ok"]
    await settle(2.0)
    assert m.transition("test_klp_livepatch") == b"0\n"
    assert (await m.rmmod_ctl("spinwork"))["ok"]


async def test_work_that_requeues_itself_lets_the_kernel_run(m61: Machine, autojump_clock) -> None:
    """A work that queues itself again at once runs over and over, as on a kworker,
    and everything else still runs between two of its runs: the daemon's other
    tasks get their turn, and the module unloads (cancel_work_sync() at exit)."""
    m = m61
    text = source('''
        runs = 0


        def again(work):
            global runs
            runs += 1
            schedule_work(work)


        work = DECLARE_WORK(again)


        def again_init():
            schedule_work(work)
            return 0


        def again_exit():
            cancel_work_sync(work)
            pr_info("ran %d times\\n", runs)


        module_init(again_init)
        module_exit(again_exit)
    ''')
    assert (await m.insmod_text("again.py", text))["ok"]
    for _ in range(20):
        await trio.lowlevel.checkpoint()
    assert (await m.rmmod_ctl("again"))["ok"]
    runs = [line for line in m.lines() if line.startswith("again: ran ")]
    assert len(runs) == 1 and int(runs[0].split()[2]) >= 10


async def test_sleeping_in_a_callback_is_invalid(m61: Machine, autojump_clock) -> None:
    """Callbacks run inside klp_enable_patch: a sleep there is the kernel's
    "sleeping function called from invalid context"; pre_patch then fails with -EFAULT."""
    m = m61
    text = PRE_PATCH_FAILS.replace("if fail_pre_patch:", "msleep(10)\n    if fail_pre_patch:")
    line_no = text.splitlines().index("    msleep(10)") + 1
    reply = await refused(m, "sleepy.py", text)
    assert reply == {"ok": False, "errno": errno.EFAULT, "error": "Bad address"}
    lines = m.lines()
    assert any(line.startswith("BUG: sleeping function called from invalid context [insmod:") for line in lines)
    assert f"  at /tmp/sleepy.py:{line_no} in pre_patch_callback" in lines
    assert "livepatch: pre-patch callback failed for object 'vmlinux'" in lines


@pytest.mark.parametrize("version, symbol, err, line", [
    ("5.1", "klp_get_prev_state", errno.ENOENT, "state_user: Unknown symbol klp_get_prev_state (err -2)"),
    ("4.15", "klp_shadow_get_or_alloc", errno.EINVAL,
     "state_user: disagrees about version of symbol klp_shadow_get_or_alloc"),
])
async def test_api_the_profile_lacks(nursery, autojump_clock, version: str, symbol: str, err: int, line: str) -> None:
    m = make_machine(nursery, version)
    text = source(f'''
        def user_init():
            {symbol}
            return 0


        module_init(user_init)
    ''')
    before = snapshot(m)
    reply = await m.insmod_text("state_user.py", text)
    assert reply == {"ok": False, "errno": err, "error": os.strerror(err)}
    assert m.take() == [line]
    assert snapshot(m) == before


async def test_version_code_decides_like_if(nursery, autojump_clock) -> None:
    """The branch for another kernel is dropped at build time: its symbols are not needed."""
    text = source('''
        def v_init():
            if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 5, 0):
                pr_info("new %s\\n", klp_get_prev_state(1))
            else:
                pr_info("old\\n")
            return 0


        module_init(v_init)
    ''')
    for version, line in (("5.1", "v: old"), ("6.1", "v: new (null)")):
        m = make_machine(nursery, version)
        assert (await m.insmod_text("v.py", text))["ok"]
        assert m.take() == [line]


async def test_name_clash_with_a_loaded_module(m61: Machine, autojump_clock) -> None:
    m = m61
    assert (await m.insmod("test_klp_livepatch"))["ok"]
    before = snapshot(m)
    reply = await m.insmod_text("test_klp_livepatch.py", source("x = 1\n"))
    assert reply == {"ok": False, "errno": errno.EEXIST, "error": "File exists"}
    assert snapshot(m) == before


async def test_proc_entry_of_a_module(m61: Machine, autojump_clock) -> None:
    """proc_create_single: /proc/<name> runs the show function as the reader, and goes with the module."""
    m = m61
    text = source('''
        pde = None


        def target_show(m, v):
            seq_printf(m, "%s: %s\\n", THIS_MODULE.name, "original output")
            return 0


        def t_init():
            global pde
            pde = proc_create_single("t_target", 0, NULL, target_show)
            return 0


        def t_exit():
            proc_remove(pde)


        module_init(t_init)
        module_exit(t_exit)
    ''')
    assert (await m.insmod_text("t_target.py", text))["ok"]
    node = m.node("proc/t_target")
    assert node is not None and oct(node.mode & 0o777) == "0o444"
    assert m.kernfs.read(node, 0, 4096) == b"t_target: original output\n"
    assert (await m.rmmod_ctl("t_target"))["ok"]
    assert m.node("proc/t_target") is None


async def test_a_class_is_a_struct_not_functions(m61: Machine, autojump_clock) -> None:
    """A class's methods are not kernel symbols; only top-level defs are."""
    m = m61
    text = source('''
        class counter:
            def __init__(self):
                self.n = 0

            def bump(self):
                self.n += 1
                return self.n


        c = counter()


        def cls_init():
            pr_info("%s: %d %d\\n", __func__, c.bump(), c.bump())
            return 0


        module_init(cls_init)
    ''')
    assert (await m.insmod_text("cls.py", text))["ok"]
    assert m.take() == ["cls: cls_init: 1 2"]
    assert [s.name for s in m.kernel.kallsyms.symbols("cls")] == ["cls_init"]
