"""Code that recurses without end runs out of the task's kernel stack, as in the
kernel: a patch whose new function calls the function it replaces, a kthread,
a work function, a module's init.  The stack overflow oops (handle_stack_overflow(),
die("stack guard page")) is logged, the kernel is tainted D, and the task that
ran out of stack dies -- the reading process is killed, a kthread or kworker
exits -- while the emulated kernel goes on serving (where the real one panics:
see klpfs.kernel.oops.StackOverflow).

Engine level under MockClock, and through a real mount for what a shell sees.
The emulated stack is THREAD_SIZE (16 KiB) at FRAME_SIZE (256 bytes) a call:
64 frames, the task's way into the kernel included.
"""

from __future__ import annotations

import errno
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import trio

from fusemount import DEADLINE, KLPFS, Mount, wait_until
from klpfs.kernel.oops import KernelFault, StackOverflow
from klpfs.sysfs.kernfs import Kernfs

from profiles.conftest import Machine, autojump_clock, make_machine, settle  # noqa: F401

HEADER = "from klpfs.kapi import *\n\npr_fmt = lambda fmt: KBUILD_MODNAME + \": \" + fmt\n"
TAINT_DIE = 1 << 7


def source(body: str) -> str:
    return HEADER + textwrap.dedent(body)


# The patch's new function is named after the function it replaces and calls that
# name: in a module, the name is the module's own function, which calls itself.
REC_PATCH = source('''
    def cmdline_proc_show(m, v):
        return cmdline_proc_show(m, v)


    funcs = [klp_func(old_name="cmdline_proc_show", new_func=cmdline_proc_show)]
    objs = [klp_object(funcs=funcs)]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def rec_patch_init():
        return klp_enable_patch(patch)


    module_init(rec_patch_init)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')

# The new function calls the replaced one by its kernel name: each call enters
# cmdline_proc_show's ftrace call site and the ftrace handler sends it to the new
# function again.
REC_TOML = '''\
[[function]]
name = "rec_cmdline_proc_show"
size = 0x30
run = [{ call = "cmdline_proc_show" }]

[[patch.object]]
name = "vmlinux"

[[patch.object.func]]
old_name = "cmdline_proc_show"
new_func = "rec_cmdline_proc_show"
'''

REC_KTHREAD = source('''
    def descend(depth):
        return descend(depth + 1)


    def recurser_thread(data):
        descend(0)
        return 0


    def rec_kthread_init():
        kthread_run(recurser_thread, None, "klp_recurse")
        return 0


    def rec_kthread_exit():
        pr_info("%s\\n", __func__)


    module_init(rec_kthread_init)
    module_exit(rec_kthread_exit)
    MODULE_LICENSE("GPL")
''')

REC_DIVIDE = source('''
    def divider_thread(data):
        return 1 // 0


    def rec_divide_init():
        kthread_run(divider_thread, None, "klp_divide")
        return 0


    module_init(rec_divide_init)
    MODULE_LICENSE("GPL")
''')

REC_WORK = source('''
    def rec_work_fn(work):
        rec_work_fn(work)


    rec_work = DECLARE_DELAYED_WORK(rec_work_fn)


    def rec_work_init():
        schedule_delayed_work(rec_work, HZ)
        return 0


    def rec_work_exit():
        cancel_delayed_work_sync(rec_work)
        pr_info("%s\\n", __func__)


    module_init(rec_work_init)
    module_exit(rec_work_exit)
    MODULE_LICENSE("GPL")
''')

REC_INIT = source('''
    def rec_init_init():
        return rec_init_init()


    module_init(rec_init_init)
    MODULE_LICENSE("GPL")
''')

# A Python helper that is no function of the module (as a static function inlined in C)
# recurses: Python's RecursionError reaches the call path, and is the same overflow.
REC_HELPER = source('''
    class Walker:
        def down(self, depth):
            return self.down(depth + 1)


    def rec_helper_show(m, v):
        Walker().down(0)
        return 0


    def rec_helper_init():
        proc_create_single("rec_helper", 0, None, rec_helper_show)
        return 0


    def rec_helper_exit():
        remove_proc_entry("rec_helper", None)


    module_init(rec_helper_init)
    module_exit(rec_helper_exit)
    MODULE_LICENSE("GPL")
''')

REC_CALLBACK = source('''
    def spin(obj):
        return spin(obj)


    def new_cmdline_proc_show(m, v):
        seq_puts(m, "patched\\n")
        return 0


    funcs = [klp_func(old_name="cmdline_proc_show", new_func=new_cmdline_proc_show)]
    objs = [klp_object(funcs=funcs, callbacks=klp_callbacks(pre_patch=spin))]
    patch = klp_patch(mod=THIS_MODULE, objs=objs)


    def rec_callback_init():
        ret = klp_enable_patch(patch)
        pr_info("klp_enable_patch() returned %d\\n", ret)
        return ret


    module_init(rec_callback_init)
    MODULE_LICENSE("GPL")
    MODULE_INFO("livepatch", "Y")
''')

CONSOLE_BASE = [" do_wait+0xf7/0x1ef", " kernel_wait4+0x47/0x8e", " SyS_wait4+0x3e/0x7c",
                " do_syscall_64+0x9e/0x13c", " entry_SYSCALL_64_after_hwframe+0x1e/0x3d"]
"""The console shell's own stack (bash, pid 812, sleeping in wait4), innermost first."""
READ_PATH = [" seq_read+0x1e0/0x3c0", " proc_reg_read+0x1d/0x3a", " __vfs_read+0x1d/0x3a", " vfs_read+0x47/0x8e",
             " SyS_read+0x2a/0x55", " do_syscall_64+0x9e/0x13c", " entry_SYSCALL_64_after_hwframe+0x1e/0x3d"]
"""Where a read(2) of a /proc file calls its show function from."""
CONSOLE_GUARD = "0000000019cb8f54 (stack is 000000000b875d20..00000000e9f5bcf3)"
"""Where the console's push landed, and its stack's bounds, as %p prints them."""


@pytest.fixture
async def m61(nursery: trio.Nursery) -> Machine:
    return make_machine(nursery, "6.1")


def read_faults(m: Machine, path: str) -> KernelFault:
    """A read of `path` by the console shell, which must fault in the kernel."""
    with pytest.raises(KernelFault) as fault:
        Kernfs.read(m.node(path), 0, 4096)
    assert isinstance(fault.value, StackOverflow)
    return fault.value


def oops(header: str, who: str, rip: str, trace: list[str]) -> list[str]:
    """The lines of a 6.1 stack overflow oops."""
    return [f"BUG: TASK stack guard page was hit at {header}",
            "stack guard page: 0000 [#1] PREEMPT SMP NOPTI",
            f"{who} 6.1.0-50-amd64 #1 ",
            f"RIP: 0010:{rip}",
            "Call Trace:",
            " <TASK>",
            *trace,
            " </TASK>",
            "---[ end trace 0000000000000000 ]---"]


# -- a patch whose new function calls the function it replaces ----------------------------------

async def test_patch_calling_itself_oopses_the_reader(m61: Machine, autojump_clock) -> None:
    """The patch loads and completes its transition; the next read of /proc/cmdline
    recurses in the new function until the reader's stack runs out: the reader oopses
    (here `cat`, pid 900 on CPU 1) and the kernel is tainted D.  Every read does so;
    other files read as before."""
    m = m61
    assert await m.insmod_text("rec_patch.py", REC_PATCH) == {"ok": True, "name": "rec_patch"}
    await settle()
    assert m.transition("rec_patch") == b"0\n"
    m.take()
    fault = read_faults(m, "proc/cmdline")
    assert str(fault) == "kernel stack overflow calling cmdline_proc_show"
    assert m.take() == []
    fault.die(900, "cat", 1)
    assert m.take() == oops(CONSOLE_GUARD, "CPU: 1 PID: 900 Comm: cat Tainted: G              K   ",
                            "cmdline_proc_show+0x0/0x30 [rec_patch]",
                            [" cmdline_proc_show+0x18/0x30 [rec_patch]"] * 59 + READ_PATH)
    assert m.kernel.modules.tainted & TAINT_DIE
    assert Kernfs.read(m.node("proc/sys/kernel/tainted"), 0, 64) == b"32896\n"  # K and D
    read_faults(m, "proc/cmdline").die(901, "cat", 0)
    assert m.take()[1] == "stack guard page: 0000 [#2] PREEMPT SMP NOPTI"
    assert Kernfs.read(m.node("proc/version"), 0, 4096) == (
        b"Linux version 6.1.0-50-amd64 (buildd@klpfs) (gcc version 7.5.0 (Debian 7.5.0-3)) #1 SMP\n")
    assert m.sched.find(812) is not None  # the console shell, which stood in for the reader, lives on


async def test_new_function_calling_the_replaced_one_recurses_through_ftrace(m61: Machine,
                                                                             autojump_clock) -> None:
    """A TOML patch's new function calls cmdline_proc_show: the call enters the old
    function (RIP: its first instruction, before the ftrace handler redirects it) and
    comes back into the new one, whose frames fill the stack.  `klpfs call` fails with
    EFAULT; the oops is the console shell's, which stands for the client."""
    m = m61
    assert (await m.insmod("/tmp/rec_toml.toml", text=REC_TOML))["ok"]
    await settle()
    assert m.transition("rec_toml") == b"0\n"
    m.take()
    reply = await m.ctl("call", func="cmdline_proc_show", pid=None)
    assert reply == {"ok": False, "errno": errno.EFAULT, "error": "kernel stack overflow calling cmdline_proc_show"}
    assert m.take() == oops(CONSOLE_GUARD, "CPU: 0 PID: 812 Comm: bash Tainted: G              K   ",
                            "cmdline_proc_show+0x0/0x2a",
                            [" rec_cmdline_proc_show+0x18/0x30 [rec_toml]"] * 59 + CONSOLE_BASE)


@pytest.mark.parametrize("version, head, tail", [
    ("4.15", ["BUG: stack guard page was hit at 0000000019cb8f54 (stack is 000000000b875d20..000000004bbe4339)",
              "kernel stack overflow (double-fault): 0000 [#1] SMP NOPTI",
              "CPU: 1 PID: 900 Comm: cat Tainted: G              K   4.15.0-213-generic #1 ",
              "RIP: 0010:cmdline_proc_show+0x0/0x2a",
              "Call Trace:"],
     ["---[ end trace 19cb8f54cefa1f59 ]---"]),
    ("6.11", ["BUG: TASK stack guard page was hit at " + CONSOLE_GUARD,
              "Oops: stack guard page: 0000 [#1] PREEMPT SMP NOPTI",
              "CPU: 1 UID: 0 PID: 900 Comm: cat Tainted: G              K    6.11.10-amd64 #1 ",
              "Tainted: [K]=LIVEPATCH",
              "RIP: 0010:cmdline_proc_show+0x0/0x2a",
              "Call Trace:",
              " <TASK>"],
     [" </TASK>", "---[ end trace 0000000000000000 ]---"]),
])
async def test_oops_words_per_kernel(nursery: trio.Nursery, version: str, head: list[str], tail: list[str],
                                     autojump_clock) -> None:
    """Until 5.15 do_double_fault() says "BUG: stack guard page was hit" (the stack's end
    one byte lower) and dies as "kernel stack overflow (double-fault)", with no <TASK>
    markers and a random oops id; 6.12 prefixes the header with "Oops: " and spells out
    the taints."""
    m = make_machine(nursery, version)
    assert (await m.insmod("/tmp/rec_toml.toml", text=REC_TOML))["ok"]
    await settle()
    m.take()
    read_faults(m, "proc/cmdline").die(900, "cat", 1)
    assert m.take() == [*head, *[" rec_cmdline_proc_show+0x18/0x30 [rec_toml]"] * 59, *READ_PATH, *tail]


# -- tasks of their own --------------------------------------------------------------------------

async def test_kthread_dies_of_its_recursion(m61: Machine, autojump_clock) -> None:
    """A kthread whose function recurses oopses and exits (make_task_dead()); its
    module stays, can be removed, and the kernel runs on."""
    m = m61
    assert await m.insmod_text("rec_kthread.py", REC_KTHREAD) == {"ok": True, "name": "rec_kthread"}
    assert m.take() == oops("0000000093850e9f (stack is 000000008540dc6b..0000000063af3c3d)",
                            "CPU: 0 PID: 814 Comm: klp_recurse Not tainted",
                            "descend+0x0/0x30 [rec_kthread]",
                            [" descend+0x18/0x30 [rec_kthread]"] * 61
                            + [" recurser_thread+0x20/0x40 [rec_kthread]", " kthread+0x9c/0x138",
                               " ret_from_fork+0x1a/0x35"])
    assert m.sched.find(814) is None
    assert m.node("proc/814") is None
    assert m.kernel.modules.tainted == TAINT_DIE
    await settle()
    assert await m.rmmod_ctl("rec_kthread") == {"ok": True, "name": "rec_kthread"}
    assert m.take() == ["rec_kthread: rec_kthread_exit"]


async def test_kthread_dies_of_any_oops(m61: Machine, autojump_clock) -> None:
    """Whatever the oops, make_task_dead() ends the task: a kthread whose function
    raises exits after the module code oops."""
    m = m61
    assert await m.insmod_text("rec_divide.py", REC_DIVIDE) == {"ok": True, "name": "rec_divide"}
    assert m.take() == ["BUG: module code raised ZeroDivisionError: integer division or modulo by zero "
                        "[klp_divide:814]", "  at /tmp/rec_divide.py:6 in divider_thread"]
    assert m.sched.find(814) is None
    assert m.node("proc/814") is None


async def test_work_recursion_kills_its_kworker(m61: Machine, autojump_clock) -> None:
    """A delayed work whose function calls itself: when its timer fires, the kworker
    running it oopses and exits; the timers keep running (the module's exit cancels
    and flushes the work, and later works run on another kworker)."""
    m = m61
    assert await m.insmod_text("rec_work.py", REC_WORK) == {"ok": True, "name": "rec_work"}
    assert m.take() == []
    await settle()
    assert m.take() == oops("000000004431ee23 (stack is 0000000035edbbef..00000000145c1bc2)",
                            "CPU: 1 PID: 3 Comm: kworker/0:0 Not tainted",
                            "rec_work_fn+0x0/0x30 [rec_work]",
                            [" rec_work_fn+0x18/0x30 [rec_work]"] * 60
                            + [" process_one_work+0x200/0x400", " worker_thread+0x1f0/0x3e0",
                               " kthread+0x9c/0x138", " ret_from_fork+0x1a/0x35"])
    assert m.sched.find(3) is None
    assert await m.rmmod_ctl("rec_work") == {"ok": True, "name": "rec_work"}
    assert m.take() == ["rec_work: rec_work_exit"]
    assert await m.insmod_text("rec_work.py", REC_WORK) == {"ok": True, "name": "rec_work"}
    await settle()
    assert m.take()[2] == "CPU: 0 PID: 4 Comm: kworker/0:0H Tainted: G      D            6.1.0-50-amd64 #1 "


async def test_init_recursion_fails_the_load(m61: Machine, autojump_clock) -> None:
    """An init that calls itself: insmod's task oopses, the load fails with EFAULT
    naming where, and nothing of the module is left (lsmod, /sys/module, kallsyms)."""
    m = m61
    reply = await m.insmod_text("rec_init.py", REC_INIT)
    assert reply == {"ok": False, "errno": errno.EFAULT, "error": "Bad address",
                     "detail": "/tmp/rec_init.py: init faulted: kernel stack overflow calling rec_init_init "
                               "at /tmp/rec_init.py:6 in rec_init_init"}
    assert m.take() == oops("00000000d6a84efa (stack is 00000000c8641cc6..00000000a6d27c98)",
                            "CPU: 1 PID: 813 Comm: insmod Not tainted",
                            "rec_init_init+0x0/0x30 [rec_init]",
                            [" rec_init_init+0x18/0x30 [rec_init]"] * 58
                            + [" do_one_initcall+0x20/0x41", " do_init_module+0xf8/0x1f0",
                               " load_module+0x1228/0x2450", " SyS_finit_module+0x58/0xb0",
                               " do_syscall_64+0x9e/0x13c", " entry_SYSCALL_64_after_hwframe+0x1e/0x3d"])
    assert "rec_init" not in m.kernel.modules.modules
    assert m.node("sys/module/rec_init") is None
    assert m.kernel.kallsyms.find("rec_init_init") is None
    assert m.sched.find(813) is None
    assert (await m.ctl("lsmod"))["ok"]


async def test_python_helper_recursion_is_a_stack_overflow(m61: Machine, autojump_clock) -> None:
    """A show function whose plain Python helper recurses until Python's RecursionError:
    the stack overflow of the task, inside the show function (RIP in its body)."""
    m = m61
    assert (await m.insmod_text("rec_helper.py", REC_HELPER))["ok"]
    read_faults(m, "proc/rec_helper").die(901, "cat", 0)
    assert m.take() == oops(CONSOLE_GUARD, "CPU: 0 PID: 901 Comm: cat Not tainted",
                            "rec_helper_show+0x20/0x40 [rec_helper]", CONSOLE_BASE)
    assert await m.rmmod_ctl("rec_helper") == {"ok": True, "name": "rec_helper"}


async def test_callback_recursion_fails_the_operation(m61: Machine, autojump_clock) -> None:
    """A pre_patch callback that recurses, inside klp_enable_patch() run by insmod: the
    oops names insmod, and the enable operation completes as for a failing callback
    (-EFAULT), so the patch is not enabled and the module does not load."""
    m = m61
    reply = await m.insmod_text("rec_callback.py", REC_CALLBACK)
    assert reply == {"ok": False, "errno": errno.EFAULT, "error": "Bad address"}
    logged = m.take()
    assert logged[:2] == ["rec_callback: tainting kernel with TAINT_LIVEPATCH",
                          "livepatch: enabling patch 'rec_callback'"]
    assert logged[2:-4] == oops("00000000d6a84efa (stack is 00000000c8641cc6..00000000a6d27c98)",
                                "CPU: 1 PID: 813 Comm: insmod Tainted: G              K   ",
                                "spin+0x0/0x30 [rec_callback]",
                                [" spin+0x18/0x30 [rec_callback]"] * 57
                                + [" rec_callback_init+0x28/0x50 [rec_callback]", " do_one_initcall+0x20/0x41",
                                   " do_init_module+0xf8/0x1f0", " load_module+0x1228/0x2450",
                                   " SyS_finit_module+0x58/0xb0", " do_syscall_64+0x9e/0x13c",
                                   " entry_SYSCALL_64_after_hwframe+0x1e/0x3d"])
    assert logged[-4:] == ["livepatch: pre-patch callback failed for object 'vmlinux'",
                           "livepatch: failed to enable patch 'rec_callback'",
                           "livepatch: 'rec_callback': unpatching complete",
                           "rec_callback: klp_enable_patch() returned -14"]
    assert m.listed() == []


# -- through a real mount ------------------------------------------------------------------------

def klpfs(m: Mount, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], check=check, capture_output=True,
                          text=True, timeout=DEADLINE)


def dmesg(m: Mount) -> list[str]:
    return [re.sub(r"^\[[ 0-9.]*\] ", "", line) for line in klpfs(m, "dmesg").stdout.splitlines()]


def test_cat_is_killed_and_the_mount_serves_on(mount_klpfs, tmp_path: Path) -> None:
    """`cat proc/cmdline` under the recursive patch is killed (sh reports 137) with the
    oops in the log naming it; the next cat of another file reads it, and the kernel
    is tainted D."""
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    patch = tmp_path / "rec_patch.py"
    patch.write_text(REC_PATCH)
    klpfs(m, "insmod", str(patch))
    transition = m.path / "sys/kernel/livepatch/rec_patch/transition"
    wait_until(lambda: transition.read_text() == "0\n", "the transition to complete")
    res = m.sh('sh -c "echo \\$\\$; exec cat proc/cmdline"; echo "cat=$?"')
    pid, status = res.stdout.splitlines()
    assert status == "cat=137"
    assert m.run(["cat", "proc/version"]).stdout == (
        "Linux version 6.1.0-50-amd64 (buildd@klpfs) (gcc version 7.5.0 (Debian 7.5.0-3)) #1 SMP\n")
    log = dmesg(m)
    start = log.index(f"BUG: TASK stack guard page was hit at {CONSOLE_GUARD}")
    assert log[start:] == oops(CONSOLE_GUARD, f"CPU: 0 PID: {pid} Comm: cat Tainted: G              K   ",
                               "cmdline_proc_show+0x0/0x30 [rec_patch]",
                               [" cmdline_proc_show+0x18/0x30 [rec_patch]"] * 59 + READ_PATH)
    assert (m.path / "proc/sys/kernel/tainted").read_text() == "32896\n"
    assert m.run(["cat", "proc/cmdline"]).returncode == -9


def test_recursing_work_and_init_leave_the_daemon_up(mount_klpfs, tmp_path: Path) -> None:
    """A delayed work that calls itself oopses its kworker when its timer fires, and an
    init that calls itself fails insmod with EFAULT and leaves no module behind; the
    daemon serves on through both."""
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    work = tmp_path / "rec_work.py"
    work.write_text(REC_WORK)
    klpfs(m, "insmod", str(work))
    wait_until(lambda: "stack guard page: 0000 [#1] PREEMPT SMP NOPTI" in dmesg(m), "the work's oops")
    init = tmp_path / "rec_init.py"
    init.write_text(REC_INIT)
    res = klpfs(m, "insmod", str(init), check=False)
    assert (res.returncode, res.stderr) == (1, f"insmod: ERROR: could not insert module {init}: Bad address\n"
                                               f"{init}: init faulted: kernel stack overflow calling rec_init_init "
                                               f"at {init}:6 in rec_init_init\n")
    assert [line.split()[0] for line in klpfs(m, "lsmod").stdout.splitlines()] == ["Module", "rec_work"]
    assert not (m.path / "sys/module/rec_init").exists()
    klpfs(m, "rmmod", "rec_work")
    assert m.run(["cat", "proc/version"]).returncode == 0
