"""The mounted /proc: per-task files, /proc/self, files served by emulated functions."""

from __future__ import annotations

import os
import subprocess

from fusemount import DEADLINE, KLPFS, Mount, wait_until


def klpfs(m: Mount, *args: str) -> str:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], check=True, capture_output=True,
                          text=True, timeout=DEADLINE).stdout


def test_proc_self_is_the_console_shell_and_follows_transitions(mount_klpfs) -> None:
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    assert os.readlink(m.path / "proc/self") == "812"
    listing = m.run(["ls", "-l", "proc/self"]).stdout.split()
    assert listing[:5] == ["lrwxrwxrwx", "1", "root", "root", "0"] and listing[-3:] == ["proc/self", "->", "812"]
    assert (m.path / "proc/self/patch_state").read_text() == "-1\n"
    holder = klpfs(m, "task", "add", "holder", "--kthread").strip()
    klpfs(m, "task", "sleep", holder, "cmdline_proc_show")
    klpfs(m, "insmod", "livepatch-sample")
    # obs #12: during the transition a new process reads 1 (it inherits the switched shell's state)
    assert m.run(["cat", "proc/self/patch_state"]).stdout == "1\n"
    assert (m.path / f"proc/{holder}/patch_state").read_text() == "0\n"
    assert "[<0>] cmdline_proc_show+0x15/0x2a\n" in (m.path / f"proc/{holder}/stack").read_text()
    klpfs(m, "task", "wake", holder)
    wait_until(lambda: (m.path / "sys/kernel/livepatch/livepatch_sample/transition").read_text() == "0\n",
               "the transition to complete")
    assert (m.path / "proc/self/patch_state").read_text() == "-1\n"


def test_proc_files_report_size_zero(klpfs_mount: Mount) -> None:
    for name in ("proc/cmdline", "proc/version", "proc/modules", "proc/1/comm", "proc/1/stack",
                 "proc/1/task/1/patch_state"):
        assert os.stat(klpfs_mount.path / name).st_size == 0, name
    assert (klpfs_mount.path / "proc/version").read_text().startswith("Linux version 4.15.0-213-generic ")
    assert (klpfs_mount.path / "proc/1/comm").read_text() == "systemd\n"


def test_stack_of_a_task_in_a_module_function(mount_klpfs) -> None:
    m = mount_klpfs(options=["speed=10"])
    klpfs(m, "insmod", "klp-busy")
    pid = next(line.split()[0] for line in klpfs(m, "ps").splitlines() if " klp_busy " in line)
    # proc_pid_stack(): stack_trace_save_tsk() skips the scheduler's functions (.sched.text).
    assert (m.path / f"proc/{pid}/stack").read_text() == (
        "[<0>] busy_fn+0x20/0x40 [klp_busy]\n"
        "[<0>] kthread+0x9c/0x138\n"
        "[<0>] ret_from_fork+0x1a/0x35\n")


def test_stack_of_a_kthread_in_msleep(mount_klpfs) -> None:
    """As 6.1 shows a kthread sleeping in msleep(): msleep first, then its caller."""
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    pid = klpfs(m, "task", "add", "holder", "--kthread").strip()
    klpfs(m, "task", "sleep", pid, "cmdline_proc_show")
    assert m.run(["cat", f"proc/{pid}/stack"]).stdout == (
        "[<0>] msleep+0x18/0x30\n"
        "[<0>] cmdline_proc_show+0x15/0x2a\n"
        "[<0>] kthread+0x9c/0x138\n"
        "[<0>] ret_from_fork+0x1a/0x35\n")
    assert [line.split()[-1] for line in klpfs(m, "ps").splitlines() if line.split()[0] == pid] == [
        "cmdline_proc_show"]
