"""`klpfs status` and `klpfs wait` through the CLI against a real mount: the text a user
reads, exact but for the clock's readings, and wait's exit status."""

from __future__ import annotations

import json
import re
import subprocess

from fusemount import DEADLINE, KLPFS, Mount, wait_until
from test_commands import LP, klpfs, m, ok, read  # noqa: F401

TIME = r"\d+\.\d{6}"
RETRY = r"  attempts \d+, next retry in \d+\.\ds"


def hold(m: Mount) -> tuple[int, int]:
    """A holder sleeping in cmdline_proc_show, then the sample loaded: its pid and the task count."""
    pid = int(ok(m, "task", "add", "holder", "--kthread"))
    ok(m, "task", "sleep", str(pid), "cmdline_proc_show")
    ok(m, "insmod", "livepatch-sample")
    return pid, len(json.loads(ok(m, "ps", "--json"))["tasks"])


def test_status_without_patches(m: Mount) -> None:
    lines = ok(m, "status").splitlines()
    assert re.fullmatch(f"kernel 4.15, {TIME} seconds since boot", lines[0])
    assert lines[1:] == ["no patches", "transition: none"]


def test_status_of_a_held_transition(m: Mount) -> None:
    pid, tasks = hold(m)
    lines = ok(m, "status").splitlines()
    assert re.fullmatch(f"kernel 4.15, {TIME} seconds since boot", lines[0])
    assert re.fullmatch(RETRY, lines[4])
    assert lines[1:4] + lines[5:] == [
        "PATCH                 ENABLED  TRANSITION",
        "livepatch_sample            1           1",
        f"transition: livepatch_sample patching: {tasks - 1} of {tasks} tasks switched",
        "  waiting for:",
        f"    {pid} holder (kthread, D): sleeping on function cmdline_proc_show",
        "      [<0>] msleep+0x18/0x30",
        "      [<0>] cmdline_proc_show+0x15/0x2a",
        "      [<0>] kthread+0x9c/0x138",
        "      [<0>] ret_from_fork+0x1a/0x35"]


def test_status_after_the_transition(m: Mount) -> None:
    ok(m, "insmod", "livepatch-sample")
    assert ok(m, "wait") == ""
    assert ok(m, "status").splitlines()[1:] == ["PATCH                 ENABLED  TRANSITION",
                                                "livepatch_sample            1           0", "transition: none"]


def test_wait_without_a_transition_returns_at_once(m: Mount) -> None:
    run = klpfs(m, "wait", "--timeout", "0")
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_wait_times_out_naming_the_holder(m: Mount) -> None:
    pid, tasks = hold(m)
    run = klpfs(m, "wait", "--timeout", "0.3")
    assert (run.returncode, run.stdout) == (1, "")
    lines = run.stderr.splitlines()
    assert re.fullmatch(RETRY, lines[2])
    assert lines[:2] + lines[3:] == [
        "klpfs wait: timed out after 0.3s",
        f"transition: livepatch_sample patching: {tasks - 1} of {tasks} tasks switched",
        "  waiting for:",
        f"    {pid} holder (kthread, D): sleeping on function cmdline_proc_show"]


def test_wait_returns_once_the_transition_is_over(m: Mount) -> None:
    pid, _ = hold(m)
    waiter = subprocess.Popen([*KLPFS, "wait", "-m", str(m.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        ok(m, "task", "wake", str(pid))
        assert waiter.wait(timeout=DEADLINE) == 0
        assert read(m, f"{LP}/livepatch_sample/transition") == "0\n"
        assert waiter.communicate() == ("", "")
    finally:
        waiter.kill()
        waiter.wait()


def test_wait_for_an_unpatching_transition(m: Mount) -> None:
    ok(m, "insmod", "livepatch-sample")
    ok(m, "wait")
    (m.path / LP / "livepatch_sample/enabled").write_text("0\n")
    assert ok(m, "wait") == ""
    assert read(m, f"{LP}/livepatch_sample/transition") == "0\n"
    assert ok(m, "rmmod", "livepatch_sample") == ""
    wait_until(lambda: not (m.path / LP / "livepatch_sample").exists(), "the patch's directory to go")
