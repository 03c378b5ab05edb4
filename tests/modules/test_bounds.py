"""Bounds the kernel has and Python modules meet: vsnprintf's field widths and
precisions, printk's record size, times that become jiffies, and source nested
deeper than the build walks.  Engine level under MockClock."""

from __future__ import annotations

import errno

import pytest

from klpfs import kapi
from klpfs.kernel.printf import vsnprintf
from klpfs.kernel.timers import MAX_JIFFY_OFFSET, Timers, seconds_to_jiffies, time_problem
from klpfs.kernel.workqueue import DelayedWork, queue_delayed_work
from modules.test_kapi import m61, refused, source  # noqa: F401
from profiles.conftest import Machine, autojump_clock  # noqa: F401

# -- vsnprintf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, args, size, out", [
    # A `*` width is clamped to FIELD_WIDTH_MAX (8388607); the buffer keeps size - 1.
    ("%*d", (50_000_000, 1), 992, " " * 991),
    ("%-*d|", (50_000_000, 1), 8, "1" + " " * 6),
    ("%*d", (-4, 1), 992, "1   "),
    ("%*d", ((1 << 32) + 3, 1), 992, "  1"),  # the width is a C int
    # A literal width is kept in 24 bits: 50000000 is negative there, so no padding.
    ("%50000000d", (1,), 992, "1"),
    ("%020000000d", (-5,), 8, "-000000"),
    ("%#0*x", (8388607, 255), 8, "0x00000"),
    # A precision: 16 bits when literal (50000000 is negative: 0; 70000 is 4464), clamped when `*`.
    ("%.50000000d", (1,), 992, "1"),
    ("%.70000d", (5,), 16, "0" * 15),
    ("%.*d", (50_000_000, 7), 992, "0" * 991),
    ("%*.*d", (50_000_000, 40_000, 7), 4, "   "),
    ("%.*s", (-1, "abc"), 992, ""),
    ("%.*s", (3, "abcdef"), 992, "abc"),
    ("%8388607s|", ("ab",), 6, "     "),
    ("%s", ("x" * 50_000,), 11, "x" * 10),
    ("ab%dcd", (123,), 4, "ab1"),
    ("%d", (1,), 0, ""),
])
def test_vsnprintf_into_a_bounded_buffer(fmt: str, args: tuple, size: int, out: str) -> None:
    assert vsnprintf(fmt, args, size=size) == out


# -- printk records --------------------------------------------------------------------------------

PRINTS = source('''
    def bnd_init():
        pr_info("%*d", 50000000, 1)
        printk("%*d", 50000000, 2)
        pr_info("%50000000d", 3)
        pr_info("%s", "x" + "\\u00e9" * 600)
        return 0


    module_init(bnd_init)
    MODULE_LICENSE("GPL")
''')


async def test_a_record_keeps_what_the_kernel_reserves(m61: Machine, autojump_clock) -> None:
    """vprintk_store() reserves LOG_LINE_MAX (992) bytes with the NUL: 991 of text,
    989 once the KERN_<level> prefix formatted into them is stripped; a character
    cut in two keeps its first byte."""
    m = m61
    assert (await m.insmod_text("bnd.py", PRINTS))["ok"]
    records = list(m.kernel.log.records)[-4:]
    padded, unlevelled, literal, accented = (r.text for r in records)
    assert padded == "bnd: " + " " * 984 and len(padded) == 989
    assert unlevelled == " " * 991 and records[1].level == 4
    assert literal == "bnd: 3"
    assert accented == "bnd: x" + "\u00e9" * 491 + "\udcc3"
    assert len(accented.encode("utf-8", "surrogateescape")) == 989


# -- source nested too deeply ----------------------------------------------------------------------

@pytest.mark.parametrize("body, error", [
    ("x = " + "[" * 150 + "]" * 150 + "\n", "/tmp/deep.py:4: nested more than 100 levels deep"),
    ("x = 1 + " + " + ".join(["1"] * 5000) + "\n", "/tmp/deep.py: nested too deeply to parse"),
    ("x = " + "-" * 100_000 + "1\n", "/tmp/deep.py: nested too deeply to parse"),
    ("return 1\n", "/tmp/deep.py:4: syntax error: 'return' outside function"),
], ids=["lists-150", "sum-5000", "unary-100000", "return-outside"])
async def test_source_the_build_cannot_take(m61: Machine, autojump_clock, body: str, error: str) -> None:
    reply = await refused(m61, "deep.py", source(body))
    assert reply == {"ok": False, "errno": errno.ENOEXEC, "error": error, "file_error": True}


# -- times that become jiffies ----------------------------------------------------------------------

@pytest.mark.parametrize("seconds, jiffies", [
    (0, 0), (1e-300, 1), (0.004, 1), (0.0041, 2), (0.01, 3), (0.1, 25), (1, 250), (1e300, MAX_JIFFY_OFFSET),
])
def test_seconds_to_jiffies_round_up(seconds: float, jiffies: int) -> None:
    assert seconds_to_jiffies(seconds) == jiffies


@pytest.mark.parametrize("value, problem", [
    (True, "must be a number of seconds, not True"),
    (None, "must be a number of seconds, not None"),
    (float("nan"), "nan is not a time: must be from 0 to 18446744073709551 seconds (MAX_JIFFY_OFFSET jiffies)"),
    (10 ** 17, "100000000000000000 is not a time: must be from 0 to 18446744073709551 seconds "
               "(MAX_JIFFY_OFFSET jiffies)"),
])
def test_time_problems(value: object, problem: str) -> None:
    assert time_problem(value) == problem


async def test_no_timer_expires_at_nan() -> None:
    with pytest.raises(ValueError, match="a timer cannot expire at NaN"):
        Timers().call_at(float("nan"), lambda: None)


async def test_a_delayed_work_delay_is_jiffies(m61: Machine, autojump_clock) -> None:
    with pytest.raises(ValueError, match="queue_delayed_work: delay -1 is not 0 to MAX_JIFFY_OFFSET jiffies"):
        queue_delayed_work(m61.kernel, DelayedWork(lambda work: None), -1)


@pytest.mark.parametrize("msecs, jiffies", [(1, 1), (4, 1), (5, 2), (1000, 250), (4294967288, 1073741822),
                                            (4294967289, MAX_JIFFY_OFFSET), (-1, MAX_JIFFY_OFFSET), (2.9, 1)])
def test_msecs_to_jiffies_of_an_unsigned_int(msecs: float, jiffies: int) -> None:
    assert kapi.msecs_to_jiffies(msecs) == jiffies


def test_usecs_to_jiffies_saturates() -> None:
    assert (kapi.usecs_to_jiffies(4294959296), kapi.usecs_to_jiffies(4294959297)) == (1073740, MAX_JIFFY_OFFSET)


@pytest.mark.parametrize("call", ["schedule_timeout_interruptible(x)", "msleep(x)", "schedule_delayed_work(w, x)",
                                  "usleep_range(x, x)"])
async def test_a_time_that_is_no_integer_faults_the_module(m61: Machine, autojump_clock, call: str) -> None:
    """NaN has no C integer value: the call fails, and the module's code reports it."""
    text = source(f'''
        def t_init():
            w = DECLARE_DELAYED_WORK(lambda work: None)
            x = float("nan")
            {call}
            return 0


        module_init(t_init)
        MODULE_LICENSE("GPL")
    ''')
    api = call.split("(")[0]
    reply = await refused(m61, "nan_time.py", text)
    assert reply["errno"] == errno.EFAULT
    assert reply["detail"] == (f"/tmp/nan_time.py: init faulted: ValueError: {api}: nan is not a number a C "
                               f"integer can hold at /tmp/nan_time.py:8 in t_init")
