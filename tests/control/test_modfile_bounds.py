"""Module files at the edges: times that no jiffies value holds, periods finer
than a tick, fields wider than a log line, and nesting deeper than the parser
or the interpreter goes.  Each is refused before anything touches the kernel,
with the loader's "Invalid module format" (ENOEXEC) and the key named; a time
a parameter gives is checked again with the value insmod sets."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from klpfs.control.modfile import MAX_STEP_DEPTH, ModuleFileError, parse_module_file
from klpfs.control.ops import Control
from klpfs.kernel.timers import HZ, MAX_SECONDS
from klpfs.system import System

PATH = "/tmp/bounds.toml"
NOT_A_TIME = f"is not a time: must be from 0 to {MAX_SECONDS} seconds (MAX_JIFFY_OFFSET jiffies)"
TICKER = "[[function]]\nname = 'f'\nrun = [{ log = 'tick' }]\n"


def work(spec: str) -> str:
    return TICKER + f"[init]\nwork = [{{ func = 'f', {spec} }}]\n"


def nested_for_each(depth: int) -> str:
    """A function whose body is `depth` for_each steps, each in the one before."""
    return "[[function]]\nname = 'f'\nrun = [" + "{ for_each = 'l', do = [" * depth + "]}" * depth + "]\n"


def refusal(text: str) -> str:
    with pytest.raises(ModuleFileError) as info:
        parse_module_file(PATH, text)
    return str(info.value)


@pytest.mark.parametrize("spec, key, problem", [
    ("every = nan", "init.work[0].every", f"nan {NOT_A_TIME}"),
    ("every = inf", "init.work[0].every", f"inf {NOT_A_TIME}"),
    ("every = -1", "init.work[0].every", f"-1 {NOT_A_TIME}"),
    ("every = 1e300", "init.work[0].every", f"1e+300 {NOT_A_TIME}"),
    ("every = 0", "init.work[0].every",
     "must be more than 0 (a work that re-arms itself at once would never let its kworker rest)"),
    ("delay = -inf", "init.work[0].delay", f"-inf {NOT_A_TIME}"),
    (f"delay = {MAX_SECONDS + 1}", "init.work[0].delay", f"{MAX_SECONDS + 1} {NOT_A_TIME}"),
])
def test_work_times_that_are_no_time(spec: str, key: str, problem: str) -> None:
    assert refusal(work(spec)) == f"{PATH}: {key}: {problem}"


@pytest.mark.parametrize("step, key, problem", [
    ("{ sleep = nan }", "function[0].run[0].sleep", f"nan {NOT_A_TIME}"),
    ("{ sleep = -0.5, state = 'S' }", "function[0].run[0].sleep", f"-0.5 {NOT_A_TIME}"),
    ("{ new = 'l', expires = inf }", "function[0].run[0].expires", f"inf {NOT_A_TIME}"),
])
def test_step_times_that_are_no_time(step: str, key: str, problem: str) -> None:
    assert refusal(f"[[function]]\nname = 'f'\nrun = [{step}]\n") == f"{PATH}: {key}: {problem}"


def test_a_parameter_time_is_checked_by_its_default() -> None:
    text = "[params.period]\ndefault = -2\n" + work("every = '{period}'")
    assert refusal(text) == (f"{PATH}: init.work[0].every: parameter 'period' defaults to -2, "
                             f"not a time: -2 {NOT_A_TIME}")


def test_int_parameters_are_c_ints() -> None:
    assert refusal("[params.big]\ndefault = 2147483648\n") == (
        f"{PATH}: params.big.default: must fit a C int (-2147483648 to 2147483647)")


def test_the_longest_time_is_taken() -> None:
    mf = parse_module_file(PATH, work(f"delay = {MAX_SECONDS}, every = 1e-300"))
    assert (mf.work[0].delay, mf.work[0].every) == (MAX_SECONDS, 1e-300)


@pytest.mark.parametrize("template, problem", [
    ("{__func__:>50000000}", "format spec '>50000000': wider than a log line (991 bytes)"),
    ("{__func__:.992}", "format spec '.992': wider than a log line (991 bytes)"),
    ("{__func__:{target}}", "format spec '{target}': a spec cannot hold {fields}"),
])
def test_template_fields_no_wider_than_a_log_line(template: str, problem: str) -> None:
    text = f"[[function]]\nname = 'f'\nrun = [{{ log = '{template}' }}]\n"
    assert refusal(text) == f"{PATH}: function[0].run[0].log: {problem}"


def test_a_template_field_as_wide_as_a_log_line_is_taken() -> None:
    parse_module_file(PATH, "[[function]]\nname = 'f'\nrun = [{ log = '{__func__:>991}' }]\n")


def test_steps_nest_up_to_the_limit() -> None:
    mf = parse_module_file(PATH, nested_for_each(MAX_STEP_DEPTH - 1))
    assert len(list(mf.all_steps())) == MAX_STEP_DEPTH - 1


def test_steps_nested_deeper_than_the_limit() -> None:
    where = "function[0].run" + "[0].do" * MAX_STEP_DEPTH
    assert refusal(nested_for_each(MAX_STEP_DEPTH)) == f"{PATH}: {where}: steps nested more than 32 deep"


@pytest.mark.parametrize("text", [
    "x = " + "[" * 1000 + "]" * 1000 + "\n",
    "x = " + "{ a = " * 1000 + "1" + " }" * 1000 + "\n",
    nested_for_each(3000),
], ids=["arrays-1000", "tables-1000", "for_each-3000"])
def test_nesting_too_deep_for_the_toml_parser(text: str) -> None:
    assert refusal(text) == f"{PATH}: nested too deeply to parse"


def test_an_integer_past_the_digit_limit() -> None:
    assert refusal("x = " + "9" * 5000 + "\n").startswith(
        f"{PATH}: not valid TOML: Exceeds the limit (4300 digits) for integer string conversion")


# -- through insmod ------------------------------------------------------------------------------

async def insmod(system: System, text: str, *params: str) -> dict:
    return await Control(system).handle({"cmd": "insmod", "path": PATH, "text": text, "params": list(params)})


@pytest.mark.parametrize("text, error", [
    (work("every = nan"), f"{PATH}: init.work[0].every: nan {NOT_A_TIME}"),
    ("x = " + "[" * 1000 + "]" * 1000 + "\n", f"{PATH}: nested too deeply to parse"),
    (nested_for_each(3000), f"{PATH}: nested too deeply to parse"),
], ids=["every-nan", "nested-1000", "for_each-3000"])
async def test_insmod_refuses_with_invalid_module_format(system: System, autojump_clock: trio.testing.MockClock,
                                                         text: str, error: str) -> None:
    before = system.kernel.log.lines()
    assert await insmod(system, text) == {"ok": False, "errno": errno.ENOEXEC, "error": error, "file_error": True}
    assert system.kernel.modules.modules == {} and system.kernel.log.lines() == before
    await trio.sleep(1)
    assert system.kernel.log.lines() == before


def tick_times(system: System) -> list[float]:
    return [r.timestamp for r in system.kernel.log.records if r.text == "bounds: tick"]


async def test_a_period_below_a_jiffy_is_one_jiffy(system: System, autojump_clock: trio.testing.MockClock) -> None:
    """every = 1e-300 re-arms the work one tick later each time: HZ runs an emulated
    second, on the ticks, as schedule_delayed_work(work, 1) would."""
    assert (await insmod(system, work("every = 1e-300")))["ok"]
    await trio.sleep(1.5)
    second = [t for t in tick_times(system) if t < 1.0]
    assert len(second) == HZ
    assert second[:3] == [0.0, 0.004, 0.008] and second[-1] == 0.996
    assert (await Control(system).handle({"cmd": "rmmod", "name": "bounds"}))["ok"]


async def test_periods_and_delays_round_up_to_jiffies(system: System,
                                                      autojump_clock: trio.testing.MockClock) -> None:
    """10 ms is 2.5 jiffies at HZ=250, so 3 (12 ms), as msecs_to_jiffies() rounds;
    a 1 ms delay is one jiffy."""
    assert (await insmod(system, work("delay = 0.001, every = 0.01")))["ok"]
    await trio.sleep(1.5)
    times = [t for t in tick_times(system) if t < 1.0]
    assert times == [round(0.004 + 0.012 * k, 6) for k in range(83)]


@pytest.mark.parametrize("value, problem", [
    ("0", "must be more than 0 (a work that re-arms itself at once would never let its kworker rest)"),
    ("-3", f"-3 {NOT_A_TIME}"),
])
async def test_insmod_parameter_that_is_no_time(system: System, autojump_clock: trio.testing.MockClock,
                                                value: str, problem: str) -> None:
    """The module's init refuses it with EINVAL, as a C module checks its parameters."""
    text = "[params.period]\ndefault = 1\n" + work("every = '{period}'")
    assert await insmod(system, text, f"period={value}") == {"ok": False, "errno": errno.EINVAL,
                                                              "error": "Invalid argument"}
    assert system.kernel.log.lines()[-1] == f"bounds: init.work[0].every: parameter period={value}: {problem}"
    assert system.kernel.modules.modules == {}
    assert (await insmod(system, text, "period=2"))["ok"]


async def test_rmmod_while_a_rearming_work_runs(system: System, autojump_clock: trio.testing.MockClock) -> None:
    """The work sleeps in its function when rmmod comes: cancel_work_sync() waits for
    it, and the run that ends re-arms nothing (the work is being cancelled), so the
    unload completes when the sleep does."""
    text = ("[[function]]\nname = 'f'\nrun = [{ sleep = 2, state = 'S' }, { log = 'woke' }]\n"
            "[init]\nwork = [{ func = 'f', every = 1 }]\n")
    assert (await insmod(system, text))["ok"]
    await trio.sleep(0.5)
    with trio.fail_after(10):
        assert (await Control(system).handle({"cmd": "rmmod", "name": "bounds"}))["ok"]
    assert trio.current_time() - system.kernel.timers.boot_time == pytest.approx(2.0)
    assert [r.text for r in system.kernel.log.records if r.text.endswith("woke")] == ["bounds: woke"]


@pytest.mark.parametrize("text, key", [
    ("[init]\nret = -9223372036854775808\n", "init.ret"),
    ("[init]\nret = 2147483648\n", "init.ret"),
    ("[init]\nret = -1.5\n", "init.ret"),
])
def test_returns_are_c_ints(text: str, key: str) -> None:
    value = text.split("= ")[1].strip()
    assert refusal(text) == (f"{PATH}: {key}: must be an int from -2147483648 to 2147483647 "
                             f"(a C function's int), not {value}")


async def test_init_returning_a_positive_value(system: System, autojump_clock: trio.testing.MockClock) -> None:
    """do_init_module() warns and loads the module anyway; on 4.x the patch its init
    never registered makes the sample's exit WARN_ON(klp_unregister_patch())."""
    text = ("[module]\nlivepatch = true\n[[function]]\nname = 'f'\noutput = 'x'\n"
            "[[patch.object]]\nname = 'vmlinux'\n[[patch.object.func]]\nold_name = 'cmdline_proc_show'\n"
            "new_func = 'f'\n[init]\nret = 7\n")
    before = len(system.kernel.log.records)
    assert (await insmod(system, text))["ok"]
    lines = [r.text for r in list(system.kernel.log.records)[before:]]
    assert lines[-2:] == ["do_init_module: 'bounds'->init suspiciously returned 7, it should follow 0/-E convention",
                          "do_init_module: loading module anyway..."]
    before = len(system.kernel.log.records)
    assert (await Control(system).handle({"cmd": "rmmod", "name": "bounds"}))["ok"]
    lines = [r.text for r in list(system.kernel.log.records)[before:]]
    if system.profile.register_api:
        assert lines[0] == "------------[ cut here ]------------"
        assert lines[1].startswith("WARNING: CPU: ") and lines[1].endswith(" at bounds_exit [bounds]")
        assert lines[2] == "---[ end trace 0000000000000000 ]---"
    assert system.kernel.modules.tainted & 1 << 7 == 0  # no oops
