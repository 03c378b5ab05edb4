"""The control commands end to end: the `klpfs` CLI against a real mount,
checked the way a user reads them (stdout, stderr, exit status)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, NOBODY, Mount, wait_until

from klpfs.control.runtime import running_daemons

SPEED = ["speed=10"]
LP = "sys/kernel/livepatch"


def klpfs(m: Mount | None, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*KLPFS, args[0], *(["-m", str(m.path)] if m is not None else []), *args[1:]]
    return subprocess.run([*(NOBODY if user == "nobody" else []), *argv], capture_output=True, text=True,
                          timeout=DEADLINE)


def ok(m: Mount | None, *args: str) -> str:
    run = klpfs(m, *args)
    assert run.returncode == 0, run.stderr
    return run.stdout


def read(m: Mount, path: str) -> str:
    return (m.path / path).read_text()


@pytest.fixture
def m(mount_klpfs) -> Mount:
    return mount_klpfs(options=SPEED)


@pytest.mark.parametrize("command", ["mount", "umount", "insmod", "rmmod", "lsmod", "dmesg", "debug", "ps",
                                     "task", "call", "ko"])
def test_every_command_has_help_with_examples(command: str) -> None:
    run = subprocess.run([*KLPFS, command, "--help"], capture_output=True, text=True, timeout=DEADLINE)
    assert run.returncode == 0
    assert "example" in run.stdout


def test_insmod_lsmod_rmmod(m: Mount) -> None:
    assert klpfs(m, "insmod", "livepatch-sample").stdout == ""
    assert ok(m, "lsmod").splitlines() == ["Module                  Size  Used by",
                                           "livepatch_sample       16384  1"]
    again = klpfs(m, "insmod", "livepatch-sample")
    assert (again.returncode, again.stderr) == (
        1, "insmod: ERROR: could not insert module livepatch-sample: File exists\n")
    busy = klpfs(m, "rmmod", "livepatch_sample")
    assert (busy.returncode, busy.stderr) == (1, "rmmod: ERROR: Module livepatch_sample is in use\n")
    wait_until(lambda: read(m, f"{LP}/livepatch_sample/transition") == "0\n", "the transition")
    (m.path / LP / "livepatch_sample/enabled").write_text("0\n")
    wait_until(lambda: read(m, f"{LP}/livepatch_sample/transition") == "0\n", "the unpatching")
    assert ok(m, "rmmod", "livepatch-sample.ko") == ""
    gone = klpfs(m, "rmmod", "livepatch_sample")
    assert (gone.returncode, gone.stderr) == (1, "rmmod: ERROR: Module livepatch_sample is not currently loaded\n")
    assert not (m.path / LP / "livepatch_sample").exists()


def test_insmod_errors(m: Mount, tmp_path: Path) -> None:
    missing = klpfs(m, "insmod", "no-such-module")
    assert missing.returncode == 1
    assert missing.stderr.startswith("insmod: ERROR: could not load module no-such-module: "
                                     "No such file or directory (shipped samples: klp-busy-patch, ")
    bad = tmp_path / "broken.toml"
    bad.write_text('[[function]]\nname = "f"\n[[patch.object]]\nname = "vmlinux"\n'
                   '[[patch.object.func]]\nold_name = "cmdline_proc_show"\nnew_func = "fixed_show"\n')
    run = klpfs(m, "insmod", str(bad))
    assert (run.returncode, run.stderr) == (1, f"insmod: ERROR: could not insert module {bad}: Invalid module format\n"
                                               f"{bad}: patch.object[0].func[0].new_func: 'fixed_show' is not "
                                               "one of this module's functions\n")
    refused = klpfs(m, "insmod", "livepatch-callbacks-demo", "pre_patch_ret=-19")
    assert (refused.returncode, refused.stderr) == (
        1, "insmod: ERROR: could not insert module livepatch-callbacks-demo: No such device\n")
    assert ok(m, "lsmod").splitlines() == ["Module                  Size  Used by"]
    assert not list((m.path / LP).iterdir())


def test_dmesg_and_levels(m: Mount) -> None:
    ok(m, "insmod", "livepatch-sample")
    lines = ok(m, "dmesg").splitlines()
    assert re.fullmatch(r"\[ *\d+\.\d{6}\] livepatch_sample: tainting kernel with TAINT_LIVEPATCH", lines[0])
    assert [line.split("] ", 1)[1] for line in lines[:3]] == [
        "livepatch_sample: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'livepatch_sample'",
        "livepatch: 'livepatch_sample': starting patching transition"]
    assert ok(m, "dmesg", "--level", "err,warn") == ""
    bad = klpfs(m, "dmesg", "--level", "loud")
    assert (bad.returncode, bad.stderr) == (1, "dmesg: unknown level 'loud'\n")


def test_dmesg_follow(m: Mount) -> None:
    follower = subprocess.Popen([*KLPFS, "dmesg", "-m", str(m.path), "-w"], stdout=subprocess.PIPE, text=True)
    try:
        ok(m, "insmod", "livepatch-callbacks-mod")
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert line.endswith("] livepatch_callbacks_mod: livepatch_callbacks_mod_init\n")
    finally:
        follower.terminate()
        follower.wait(timeout=DEADLINE)


def test_debug_switch(m: Mount) -> None:
    assert ok(m, "debug") == "off\n"
    assert ok(m, "debug", "on") == "on\n"
    ok(m, "insmod", "livepatch-sample")
    assert "livepatch: 'livepatch_sample': initializing patching transition" in ok(m, "dmesg")
    assert ok(m, "debug", "off") == "off\n"


def test_ps_task_and_call(m: Mount) -> None:
    ps = ok(m, "ps").splitlines()
    assert ps[0] == "   PID COMM             KIND     STATE PATCH  WHERE"
    assert ps[1] == "     0 swapper/0        idle     R        -1  do_idle"
    assert "     1 systemd          user     S        -1  ep_poll" in ps  # /proc/1/stack's first function
    pid = ok(m, "task", "add", "holder", "--kthread").strip()
    assert pid.isdigit()
    assert ok(m, "task", "sleep", pid, "cmdline_proc_show") == f"{pid} sleeps in cmdline_proc_show\n"
    assert read(m, f"proc/{pid}/comm") == "holder\n"
    original = read(m, "proc/cmdline")
    ok(m, "insmod", "livepatch-sample")
    wait_until(lambda: "livepatch_sample': patching complete" in ok(m, "dmesg") or
               ok(m, "dmesg").count("klp_check_stack") > 0 or len(ok(m, "dmesg").splitlines()) >= 3,
               "the enable to be logged")
    assert read(m, f"{LP}/livepatch_sample/transition") == "1\n"
    assert ok(m, "call", "cmdline_proc_show", "--pid", pid) == (
        f"cmdline_proc_show -> cmdline_proc_show (as holder:{pid}, patch_state 0)\n{original}")
    assert ok(m, "call", "cmdline_proc_show") == (
        "cmdline_proc_show -> livepatch_cmdline_proc_show [livepatch_sample] (as bash:812, patch_state 1)\n"
        "this has been live patched\n")
    assert f"{pid:>6} holder           kthread  D         0  cmdline_proc_show" in ok(m, "ps").splitlines()
    assert ok(m, "task", "wake", pid) == ""
    wait_until(lambda: read(m, f"{LP}/livepatch_sample/transition") == "0\n", "the transition to complete")
    again = klpfs(m, "task", "wake", pid)
    assert (again.returncode, again.stderr) == (
        1, f"klpfs task: task {pid} is not inside a function (nothing to wake from)\n")
    assert ok(m, "task", "run", pid) == ""
    assert ok(m, "task", "exit", pid) == ""
    assert not (m.path / "proc" / pid).exists()
    for args, message in [(("task", "exit", pid), f"no such task: {pid}"),
                          (("task", "exit", "1"), "task 1 (systemd) cannot exit"),
                          (("task", "sleep", "1", "no_such_fn"),
                           "no function 'no_such_fn' in the kernel or its modules"),
                          (("call", "no_such_fn"), "no function 'no_such_fn' in the kernel or its modules"),
                          (("task", "add", "x" * 16), "a task name (comm) has 1 to 15 characters")]:
        run = klpfs(m, *args)
        assert (run.returncode, run.stderr) == (1, f"klpfs {args[0]}: {message}\n")


def test_finding_the_daemon(mount_klpfs) -> None:
    others = running_daemons()
    first = mount_klpfs(options=SPEED)
    if not others:
        assert ok(None, "lsmod").startswith("Module")
    second = mount_klpfs(kernel="4.16", options=SPEED)
    several = klpfs(None, "lsmod")
    assert several.returncode == 1
    assert several.stderr.startswith("klpfs lsmod: several klpfs daemons are running (")
    assert several.stderr.endswith("); name one with --mount MNT\n")
    assert str(first.path) in several.stderr and str(second.path) in several.stderr
    ok(second, "insmod", "livepatch-sample")
    assert (second.path / LP / "livepatch_sample/signal").exists()
    assert not (first.path / LP / "livepatch_sample").exists()
    env_run = subprocess.run([*KLPFS, "lsmod"], capture_output=True, text=True, timeout=DEADLINE,
                             env={"KLPFS_MOUNT": str(second.path), "PATH": "/usr/bin:/bin"})
    assert "livepatch_sample" in env_run.stdout
    nowhere = klpfs(None, "lsmod", "-m", "/nonexistent")
    assert nowhere.stderr == ("klpfs lsmod: no klpfs daemon is serving /nonexistent "
                              "(start one with: klpfs mount /nonexistent)\n")


@pytest.mark.parametrize("named", [True, False])
def test_only_the_owner_may_drive_the_daemon(m: Mount, named: bool) -> None:
    run = klpfs(m if named else None, "lsmod", user="nobody")
    assert (run.returncode, run.stderr) == (
        1, "klpfs lsmod: the klpfs daemons here are root's (/run/klpfs): only a daemon's owner may use "
           "its control socket; run this as root\n")
