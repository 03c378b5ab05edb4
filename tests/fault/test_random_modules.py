"""Generated module files through the control operations, on every profile: each
load succeeds or is refused with an errno the kernel gives, nothing escapes as
a klpfs failure, nothing hangs, and once whatever loaded is unloaded the machine
is as it started, but for the taint the kernel's rules add (see modgen.py and
modrun.py)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings

from .modgen import module_cases
from .modrun import PATH, allowed_errnos, run_module

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(module_cases())
def test_generated_module_files_load_and_unload_cleanly(case: tuple[str, str]) -> None:
    version, text = case
    outcome = run_module(text, version)
    assert outcome.hung is False
    if not outcome.reply["ok"]:
        assert outcome.reply["errno"] in allowed_errnos(text, version), outcome.reply
    assert outcome.differences == []


@pytest.mark.parametrize("run, problem", [
    ('run = [{ sleep = nan }]', "function[0].run[0].sleep: "),
    ('run = [{ sleep = -1 }]', "function[0].run[0].sleep: "),
    ('run = [{ sleep = 1e300 }]', "function[0].run[0].sleep: "),
    ('run = [{ new = "l", expires = inf }]', "function[0].run[0].expires: "),
    ('run = [' + '{ for_each = "l", do = [' * 40 + '{ log = "x" }' + ']}' * 40 + ']', "function[0].run[0]"),
    ('run = [' + '{ if_shadow = 1, then = [' * 2000 + ']}' * 2000 + ']', ""),
    ('run = [{ log = "{__func__:>999999999}" }]', "function[0].run[0].log: "),
])
def test_what_no_module_can_be_is_refused_as_a_bad_file(run: str, problem: str) -> None:
    """Times that are no time, nesting past what the interpreter walks, a field wider
    than any log line: an invalid module file (ENOEXEC), nothing loaded."""
    outcome = run_module(f'[[function]]\nname = "f"\n{run}\n', "6.1")
    assert (outcome.reply["ok"], outcome.reply["errno"], outcome.reply["file_error"]) == (False, errno.ENOEXEC, True)
    assert outcome.reply["error"].startswith(f"{PATH}: {problem}")
    assert outcome.differences == []


def test_a_log_line_past_printks_bound_loads_and_unloads_cleanly() -> None:
    outcome = run_module('[init]\nrun = [{ log = "' + "x" * 100_000 + '" }]\n', "6.1")
    assert (outcome.reply, outcome.rmmod, outcome.differences) == (
        {"ok": True, "name": "gen"}, {"ok": True, "name": "gen"}, [])


def test_a_call_cycle_in_init_oopses_and_fails_the_load() -> None:
    """a calls b calls a: the kernel stack overflows in init, an oops (taint D), EFAULT."""
    outcome = run_module('[[function]]\nname = "a"\nrun = [{ call = "b" }]\n'
                         '[[function]]\nname = "b"\nrun = [{ call = "a" }]\n'
                         '[init]\nrun = [{ call = "a" }]\n', "6.1")
    assert (outcome.reply["ok"], outcome.reply["errno"]) == (False, errno.EFAULT)
    assert outcome.differences == []


def test_a_callback_recursing_through_its_patch_oopses_without_failing_the_daemon() -> None:
    """post_patch calls cmdline_proc_show, which the patch redirects to new_show, which
    calls cmdline_proc_show again: the kernel stack overflows, an oops, not a klpfs failure."""
    text = ('[[function]]\nname = "new_show"\nrun = [{ call = "cmdline_proc_show" }]\n'
            '[[patch.object]]\nname = "vmlinux"\n'
            '[[patch.object.func]]\nold_name = "cmdline_proc_show"\nnew_func = "new_show"\n'
            '[patch.object.callbacks.post_patch]\nrun = [{ call = "cmdline_proc_show" }]\n')
    outcome = run_module(text, "6.1")
    assert (outcome.reply, outcome.hung, outcome.differences) == ({"ok": True, "name": "gen"}, False, [])
