"""What `klpfs status`, `klpfs wait` and `klpfs watch` print of a LivepatchState, exactly."""

from __future__ import annotations

import dataclasses

from klpfs.control.lpview import blocker_line, patch_table, status_lines, transition_lines
from klpfs.control.replies import Blocker, LivepatchState, Patch, Record, TaskInfo, Transition
from klpfs.control.watch import bar, plain_lines, progress_key, screen

HOLDER = Blocker(TaskInfo(813, "holder", "kthread", "D", 0, "cmdline_proc_show"), "sleeping", "cmdline_proc_show",
                 ("[<0>] msleep+0x18/0x30", "[<0>] cmdline_proc_show+0x15/0x2a"))
SPINNER = Blocker(TaskInfo(814, "spinner", "kthread", "R", 0, "kthread"), "running", None,
                  ("[<0>] kthread+0x9c/0x138",))
HELD = Transition("livepatch_sample", "patching", 33, 31, 4, 5.0, 16.0, (HOLDER, SPINNER))
STATE = LivepatchState("5.1", 4.25, 1.0, (Patch("livepatch_sample", True, True),), HELD)
IDLE = LivepatchState("4.15", 12.5, 1.0, (), None)
LOG = [Record(1, "notice", 0, 0.5, "livepatch: enabling patch 'livepatch_sample'"),
       Record(2, "notice", 0, 0.75, "livepatch: 'livepatch_sample': starting patching transition")]


def test_status_of_a_held_transition() -> None:
    assert status_lines(STATE) == [
        "kernel 5.1, 4.250000 seconds since boot",
        "PATCH                 ENABLED  TRANSITION",
        "livepatch_sample            1           1",
        "transition: livepatch_sample patching: 31 of 33 tasks switched",
        "  attempts 4, next retry in 0.8s, next fake signal in 11.8s",
        "  waiting for:",
        "    813 holder (kthread, D): sleeping on function cmdline_proc_show",
        "      [<0>] msleep+0x18/0x30",
        "      [<0>] cmdline_proc_show+0x15/0x2a",
        "    814 spinner (kthread, R): running",
        "      [<0>] kthread+0x9c/0x138"]


def test_status_without_patches() -> None:
    assert status_lines(IDLE) == ["kernel 4.15, 12.500000 seconds since boot", "no patches", "transition: none"]


def test_the_patch_column_fits_a_long_name() -> None:
    assert patch_table((Patch("a_patch_with_a_long_name_x", False, False), Patch("p", True, False))) == [
        "PATCH                       ENABLED  TRANSITION",
        "a_patch_with_a_long_name_x        0           0",
        "p                                 1           0"]


def test_wait_names_the_tasks_without_stacks() -> None:
    no_retry = dataclasses.replace(HELD, next_retry=None, next_signal=None, blocking=(HOLDER,))
    assert transition_lines(no_retry, 4.25, stacks=False) == [
        "transition: livepatch_sample patching: 31 of 33 tasks switched",
        "  attempts 4",
        "  waiting for:",
        "    813 holder (kthread, D): sleeping on function cmdline_proc_show"]


def test_each_reason_reads() -> None:
    task = TaskInfo(9, "t", "user", "S", 1, "")
    assert [blocker_line(Blocker(task, reason, None, ())) for reason in
            ("running", "unreliable_stack", "no_reliable_stacks", "pending")] == [
        "9 t (user, S): running", "9 t (user, S): unreliable stack",
        "9 t (user, S): no reliable stacks (the architecture cannot check them)",
        "9 t (user, S): switches at the next attempt"]


def test_a_task_in_the_new_function_while_unpatching() -> None:
    task = TaskInfo(815, "holder2", "kthread", "D", 1, "livepatch_cmdline_proc_show [livepatch_sample]")
    assert blocker_line(Blocker(task, "sleeping", "cmdline_proc_show", ())) == (
        "815 holder2 (kthread, D): sleeping on function cmdline_proc_show, "
        "in livepatch_cmdline_proc_show [livepatch_sample]")


def test_a_time_past_is_now() -> None:
    late = dataclasses.replace(HELD, next_retry=4.0, next_signal=None, blocking=())
    assert transition_lines(late, 4.25, stacks=True) == [
        "transition: livepatch_sample patching: 31 of 33 tasks switched", "  attempts 4, next retry in 0.0s"]


def test_bar() -> None:
    assert bar(31, 33) == "[" + "#" * 37 + "-" * 3 + "]"
    assert bar(0, 10, width=4) == "[----]"
    assert bar(0, 0, width=4) == "[####]"


def test_watch_screen_of_a_held_transition() -> None:
    assert screen(STATE, LOG, 80, 24) == [
        "klpfs watch: kernel 5.1, 4.2s since boot",
        "",
        "livepatch_sample patching: 31 of 33 tasks switched",
        f"[{'#' * 37}---] 31/33",
        "attempts 4, next retry in 0.8s, next fake signal in 11.8s",
        "",
        "waiting for:",
        "  813 holder (kthread, D): sleeping on function cmdline_proc_show",
        "  814 spinner (kthread, R): running",
        "",
        "kernel log:",
        "[    0.500000] livepatch: enabling patch 'livepatch_sample'",
        "[    0.750000] livepatch: 'livepatch_sample': starting patching transition"]


def test_watch_screen_is_cut_to_the_terminal() -> None:
    """Each line to the width; the log gets the rows left: here one, for the latest record."""
    full = screen(STATE, LOG, 80, 24)
    assert screen(STATE, LOG, 30, 12) == [line[:30] for line in full[:11] + full[12:]]
    assert screen(STATE, LOG, 30, 12)[-1] == "[    0.750000] livepatch: 'liv"
    assert screen(STATE, LOG, 80, 5) == full[:5]


def test_watch_screen_without_a_transition() -> None:
    state = dataclasses.replace(IDLE, patches=(Patch("livepatch_sample", True, False),))
    assert screen(state, [], 80, 24) == [
        "klpfs watch: kernel 4.15, 12.5s since boot", "", "no transition under way", "",
        "PATCH                 ENABLED  TRANSITION", "livepatch_sample            1           0", "",
        "kernel log:"]


def test_plain_lines() -> None:
    many = dataclasses.replace(HELD, blocking=(HOLDER,) * 7)
    assert plain_lines(dataclasses.replace(STATE, transition=many)) == [
        "transition: livepatch_sample patching: 31 of 33 tasks switched, attempts 4",
        *["  waiting for 813 holder (kthread, D): sleeping on function cmdline_proc_show"] * 5,
        "  and 2 more tasks"]
    assert plain_lines(IDLE) == ["transition: none"]


def test_plain_lines_come_again_for_progress_not_for_attempts() -> None:
    later = dataclasses.replace(STATE, now=9.5, transition=dataclasses.replace(HELD, attempts=9, next_retry=10.0))
    assert progress_key(later) == progress_key(STATE)
    switched = dataclasses.replace(STATE, transition=dataclasses.replace(HELD, switched=32, blocking=(HOLDER,)))
    assert progress_key(switched) != progress_key(STATE)
    assert progress_key(IDLE) == ()
