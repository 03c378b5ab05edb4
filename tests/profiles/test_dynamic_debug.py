"""Dynamic debug: <debugfs>/dynamic_debug/control (lib/dynamic_debug.c).

The control file lists the livepatch core's pr_debug() callsites with the
line numbers and functions of the real kernel/livepatch/transition.c (6.1:
Debian's linux-source-6.1 6.1.192; 6.14: 6.12's, Debian's 6.12.118; 4.15:
v4.15), and a loaded Python module's own.  Writes are queries; the
selftests' save/set/restore sequence (functions.sh push_config,
set_dynamic_debug, pop_config) is replayed through it.

Engine level under MockClock, every callsite off at boot.
"""

from __future__ import annotations

import errno
import re
import stat
import textwrap

import pytest

from klpfs.kernel.printk import KERN_DEBUG
from klpfs.sysfs.kernfs import Kernfs

from .conftest import Machine, make_machine, settle

CONTROL = "sys/kernel/debug/dynamic_debug/control"
HEADER = "# filename:lineno [module]function flags format"
TRANSITION = "kernel/livepatch/transition.c"
SAMPLE = "livepatch_sample"

CONTROL_6_1 = [
    HEADER,
    f"{TRANSITION}:75 [livepatch]klp_complete_transition =_ \"'%s': completing %s transition\\n\"",
    f"{TRANSITION}:148 [livepatch]klp_cancel_transition =_ "
    "\"'%s': canceling patching transition, going to unpatch\\n\"",
    f"{TRANSITION}:316 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is running\\n\"",
    f"{TRANSITION}:320 [livepatch]klp_try_switch_task =_ \"%s: %s:%d has an unreliable stack\\n\"",
    f"{TRANSITION}:324 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is sleeping on function %s\\n\"",
    f"{TRANSITION}:329 [livepatch]klp_try_switch_task =_ "
    "\"%s: Unknown error code (%d) when trying to switch %s:%d\\n\"",
    f"{TRANSITION}:521 [livepatch]klp_init_transition =_ \"'%s': initializing %s transition\\n\"",
    f"{TRANSITION}:582 [livepatch]klp_reverse_transition =_ \"'%s': reversing transition from %s\\n\"",
]
CONTROL_6_14 = [
    HEADER,
    f"{TRANSITION}:97 [livepatch]klp_complete_transition =_ \"'%s': completing %s transition\\n\"",
    f"{TRANSITION}:170 [livepatch]klp_cancel_transition =_ "
    "\"'%s': canceling patching transition, going to unpatch\\n\"",
    f"{TRANSITION}:345 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is running\\n\"",
    f"{TRANSITION}:349 [livepatch]klp_try_switch_task =_ \"%s: %s:%d has an unreliable stack\\n\"",
    f"{TRANSITION}:353 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is sleeping on function %s\\n\"",
    f"{TRANSITION}:358 [livepatch]klp_try_switch_task =_ "
    "\"%s: Unknown error code (%d) when trying to switch %s:%d\\n\"",
    f"{TRANSITION}:591 [livepatch]klp_init_transition =_ \"'%s': initializing %s transition\\n\"",
    f"{TRANSITION}:653 [livepatch]klp_reverse_transition =_ \"'%s': reversing transition from %s\\n\"",
]
CONTROL_4_15 = [
    HEADER,
    f"{TRANSITION}:85 [livepatch]klp_complete_transition =_ \"'%s': completing %s transition\\012\"",
    f"{TRANSITION}:170 [livepatch]klp_cancel_transition =_ "
    "\"'%s': canceling patching transition, going to unpatch\\012\"",
    f"{TRANSITION}:363 [livepatch]klp_try_switch_task =_ \"%s\"",
    f"{TRANSITION}:508 [livepatch]klp_init_transition =_ \"'%s': initializing %s transition\\012\"",
    f"{TRANSITION}:576 [livepatch]klp_reverse_transition =_ \"'%s': reversing transition from %s\\012\"",
]

SET_DYNAMIC_DEBUG = b"file kernel/livepatch/* +p\nfunc klp_try_switch_task -p\n"
"""functions.sh set_dynamic_debug's here-document."""


def control(m: Machine, path: str = CONTROL) -> list[str]:
    """`cat control`, as lines."""
    node = m.node(path)
    assert node is not None
    data = Kernfs.read(node)
    assert isinstance(data, bytes), data
    return data.decode().splitlines()


def write(m: Machine, text: str | bytes, path: str = CONTROL) -> int:
    """One write(2) of text to the control file: the byte count or -errno."""
    node = m.node(path)
    assert node is not None
    return Kernfs.write(node, text.encode() if isinstance(text, str) else text)


def flags(m: Machine) -> dict[int, str]:
    """Line number -> flags of the core's callsites."""
    out = {}
    for line in control(m)[1:]:
        if line.startswith(TRANSITION):
            lineno, rest = line[len(TRANSITION) + 1:].split(" ", 1)
            out[int(lineno)] = rest.split(" ")[1].removeprefix("=")
    return out


def push_config(m: Machine) -> str:
    """functions.sh push_config: `grep '^kernel/livepatch' control | awk -F'[: ]'
    '{print "file " $1 " line " $2 " " $4}'`."""
    return "\n".join(f"file {f[0]} line {f[1]} {f[3]}"
                     for f in (re.split("[: ]", line) for line in control(m) if line.startswith("kernel/livepatch")))


def accepted(m: Machine, text: str, path: str = CONTROL) -> bool:
    """The write of text succeeds, whole."""
    return write(m, text, path) == len(text.encode())


def debug_lines(m: Machine) -> list[str]:
    return [r.text for r in m.records() if r.level == KERN_DEBUG]


def call(m: Machine, func: str, *args: object) -> object:
    """The console shell's task calls a module function (as a syscall would)."""
    sym = m.kernel.kallsyms.find_any(func)
    assert sym is not None
    return m.kernel.call(sym, m.kernel.console, *args).ret


# -- the control file ----------------------------------------------------------------------------


@pytest.mark.parametrize("version, expected", [("6.1", CONTROL_6_1), ("6.12", CONTROL_6_14), ("6.14", CONTROL_6_14),
                                               ("4.15", CONTROL_4_15)])
async def test_control_lists_the_core_callsites(nursery, autojump_clock, version: str, expected: list[str]) -> None:
    """The header and one line per callsite, every one off (`=_`), formats
    escaped as the kernel's ddebug_proc_show() escapes them (\\n from 6.1,
    octal before); 4.15 prints every per-task line through one "%s"."""
    m = make_machine(nursery, version)
    assert control(m) == expected


@pytest.mark.parametrize("version", ["4.15", "5.1", "6.1", "6.11", "6.12", "6.14"])
async def test_control_file_modes(nursery, autojump_clock, version: str) -> None:
    """debugfs's root is 0700, its directories 0755, the control file 0644 and size 0;
    from 6.1 /proc/dynamic_debug/control (0555 directory) is the same file."""
    m = make_machine(nursery, version)
    modes = {path: (stat.filemode(node.mode), node.size) for path in
             ("sys/kernel/debug", "sys/kernel/debug/dynamic_debug", CONTROL,
              "proc/dynamic_debug", "proc/dynamic_debug/control")
             if (node := m.node(path)) is not None}
    expected = {"sys/kernel/debug": ("drwx------", 0), "sys/kernel/debug/dynamic_debug": ("drwxr-xr-x", 0),
                CONTROL: ("-rw-r--r--", 0)}
    if version in ("6.1", "6.11", "6.12", "6.14"):
        expected.update({"proc/dynamic_debug": ("dr-xr-xr-x", 0), "proc/dynamic_debug/control": ("-rw-r--r--", 0)})
        assert accepted(m, "func klp_init_transition +p", "proc/dynamic_debug/control")
        assert flags(m)[521 if version == "6.1" else 591] == "p"
    assert modes == expected


# -- the selftests' sequence ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["6.1", "6.14"])
async def test_selftest_push_set_pop(nursery, autojump_clock, version: str) -> None:
    """setup_config's push_config and set_dynamic_debug, a patch loaded and
    disabled, then pop_config: the core's debug lines are printed, the
    per-task ones of klp_try_switch_task are not, and the saved settings
    come back."""
    m = make_machine(nursery, version)
    lines = {"6.1": (75, 148, 316, 320, 324, 329, 521, 582), "6.14": (97, 170, 345, 349, 353, 358, 591, 653)}[version]
    saved = push_config(m)
    assert saved == "\n".join(f"file {TRANSITION} line {n} =_" for n in lines)

    assert write(m, SET_DYNAMIC_DEBUG) == len(SET_DYNAMIC_DEBUG)
    complete, cancel, running, unreliable, sleeping, unknown, init, reverse = lines
    assert flags(m) == {complete: "p", cancel: "p", running: "_", unreliable: "_", sleeping: "_", unknown: "_",
                        init: "p", reverse: "p"}

    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert m.write(f"{SAMPLE}/enabled", b"0") == 1
    await settle()
    assert m.take() == [
        f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH",
        f"livepatch: enabling patch '{SAMPLE}'",
        f"livepatch: '{SAMPLE}': initializing patching transition",
        f"livepatch: '{SAMPLE}': starting patching transition",
        f"livepatch: '{SAMPLE}': completing patching transition",
        f"livepatch: '{SAMPLE}': patching complete",
        f"livepatch: '{SAMPLE}': initializing unpatching transition",
        f"livepatch: '{SAMPLE}': starting unpatching transition",
        f"livepatch: '{SAMPLE}': completing unpatching transition",
        f"livepatch: '{SAMPLE}': unpatching complete",
    ]

    # pop_config: `echo -n "$DYNAMIC_DEBUG" > control`.
    assert accepted(m, saved)
    assert set(flags(m).values()) == {"_"}
    assert control(m) == (CONTROL_6_1 if version == "6.1" else CONTROL_6_14)


async def test_without_the_func_query_the_per_task_lines_print(nursery, autojump_clock) -> None:
    """`file kernel/livepatch/* +p` alone: klp_try_switch_task's lines too (the idle tasks run)."""
    m = make_machine(nursery, "6.1")
    assert accepted(m, "file kernel/livepatch/* +p")
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert debug_lines(m) == [
        f"livepatch: '{SAMPLE}': initializing patching transition",
        "livepatch: klp_try_switch_task: swapper/0:0 is running",
        "livepatch: klp_try_switch_task: swapper/1:0 is running",
        f"livepatch: '{SAMPLE}': completing patching transition",
    ]


async def test_off_by_default(nursery, autojump_clock) -> None:
    m = make_machine(nursery, "6.1")
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert debug_lines(m) == []


# -- queries -------------------------------------------------------------------------------------


async def test_query_keywords(nursery, autojump_clock) -> None:
    """Each match-spec, alone: the number of callsites a write switches shows in the file."""
    m = make_machine(nursery, "6.1")
    cases = [
        ("func klp_try_switch_task", {316, 320, 324, 329}),
        ("func klp_*_transition", {75, 148, 521, 582}),
        ("func klp_?nit_transition", {521}),
        ("file kernel/livepatch/transition.c", set(CONTROL_LINES_6_1)),
        ("file transition.c", set(CONTROL_LINES_6_1)),
        ("file kernel/*/trans*", set(CONTROL_LINES_6_1)),
        ("file core.c", set()),
        ("module livepatch", set(CONTROL_LINES_6_1)),
        ("module live*", set(CONTROL_LINES_6_1)),
        ("module vmlinux", set()),
        ("line 324", {324}),
        ("line 300-330", {316, 320, 324, 329}),
        ("line 521-", {521, 582}),
        ("line -148", {75, 148}),
        ("format transition", {75, 148, 521, 582}),
        ("format ^'%s':", {75, 148, 521, 582}),
        ("format ^%s:", {316, 320, 324, 329}),
        ("format 'is running'", {316}),
        ('format "is sleeping on"', {324}),
        ("format is\\040running", {316}),
        ("format running\\n", {316}),
        ("file transition.c:klp_init_transition", {521}),
        ("file transition.c:320-324", {320, 324}),
        ("func klp_try_switch_task line 320-329 format stack", {320}),
        ("class foo", set()),
    ]
    for spec, lines in cases:
        assert accepted(m, f"{spec} +p"), spec
        assert {n for n, f in flags(m).items() if f == "p"} == lines, spec
        assert accepted(m, "module * =_")


CONTROL_LINES_6_1 = (75, 148, 316, 320, 324, 329, 521, 582)


async def test_flag_specs(nursery, autojump_clock) -> None:
    """+ adds, - removes, = sets; the flags show in opt_array order; 6.14 knows `s`."""
    m = make_machine(nursery, "6.1")
    assert accepted(m, "line 521 +tlfm")
    assert flags(m)[521] == "mflt"
    assert accepted(m, "line 521 +p; line 521 -fl")
    assert flags(m)[521] == "pmt"
    assert accepted(m, "line 521 =l")
    assert flags(m)[521] == "l"
    assert accepted(m, "line 521 =_")
    assert flags(m)[521] == "_"
    assert write(m, "line 521 +s") == -errno.EINVAL
    m14 = make_machine(nursery, "6.14")
    assert accepted(m14, "line 591 +psfmlt")
    assert flags(m14)[591] == "pmfslt"


async def test_prefix_flags_decorate_the_message(nursery, autojump_clock) -> None:
    """m, f, l (and 6.14's s) put "module:function:file:line: " before the message."""
    m = make_machine(nursery, "6.14")
    assert accepted(m, "func klp_init_transition +pmfsl; func klp_complete_transition +pl")
    assert (await m.insmod("livepatch-sample"))["ok"]
    await settle()
    assert debug_lines(m) == [
        f"livepatch:klp_init_transition:{TRANSITION}:591: livepatch: '{SAMPLE}': initializing patching transition",
        f"97: livepatch: '{SAMPLE}': completing patching transition",
    ]


async def test_queries_and_comments_in_one_write(nursery, autojump_clock) -> None:
    """`;` and newlines separate queries; blank ones and `#` comments are skipped;
    a `#` word ends its query."""
    m = make_machine(nursery, "6.1")
    text = "  # a comment\n\n line 75 +p ; line 148 +p # and a comment\n;line 521 +p #x"
    assert accepted(m, text)
    assert {n for n, f in flags(m).items() if f == "p"} == {75, 148, 521}


async def test_a_query_matching_nothing_succeeds(nursery, autojump_clock) -> None:
    """ddebug_exec_queries() returns the callsites matched, 0 being no error."""
    m = make_machine(nursery, "6.1")
    assert accepted(m, "func no_such_function +p")
    assert set(flags(m).values()) == {"_"}


@pytest.mark.parametrize("query", [
    "+p",                                   # nothing to match, but the flags: all callsites
])
async def test_flags_alone_match_everything(nursery, autojump_clock, query: str) -> None:
    m = make_machine(nursery, "6.1")
    assert accepted(m, query)
    assert set(flags(m).values()) == {"p"}


@pytest.mark.parametrize("query", [
    "func klp_init_transition",             # no flags
    "func klp_init_transition p",           # flags without an operator
    "func klp_init_transition +x",          # an unknown flag letter
    "func +p",                              # a keyword without its value
    "function klp_init_transition +p",      # an unknown keyword
    "func a func b +p",                     # a match-spec twice
    "line 1 line 2 +p",
    "line 10-5 +p",                         # a range backwards
    "line ten +p",
    "line -1-2 +p",
    "format 'unclosed +p",
    "file a func b line 1 module m format f +p",   # more than nine words
    "'' +p",
    "+p '' ",
])
async def test_bad_queries_are_einval(nursery, autojump_clock, query: str) -> None:
    m = make_machine(nursery, "6.1")
    assert write(m, query) == -errno.EINVAL
    assert set(flags(m).values()) == {"_"}


async def test_the_last_error_is_returned_and_the_good_queries_applied(nursery, autojump_clock) -> None:
    """ddebug_exec_queries() runs every query and returns the last failure."""
    m = make_machine(nursery, "6.1")
    assert write(m, "line 75 +p; bogus +p; line 148 +p; func +p") == -errno.EINVAL
    assert {n for n, f in flags(m).items() if f == "p"} == {75, 148}


async def test_write_size_limit(nursery, autojump_clock) -> None:
    """ddebug_proc_write(): USER_BUF_PAGE - 1 bytes at most, else -E2BIG."""
    m = make_machine(nursery, "6.1")
    longest = "line 75 +p" + " " * (4095 - 10)
    assert write(m, longest) == 4095
    assert write(m, longest + " ") == -errno.E2BIG
    assert write(m, b"") == 0


async def test_4_15_queries(nursery, autojump_clock) -> None:
    """Before the newer syntax: `file x:func` is a file name (matching nothing),
    `^` is a character of the format, `class` an unknown keyword."""
    m = make_machine(nursery, "4.15")
    assert accepted(m, "file transition.c:klp_init_transition +p")
    assert accepted(m, "format ^'%s' +p")
    assert set(flags(m).values()) == {"_"}
    assert write(m, "class foo +p") == -errno.EINVAL
    assert accepted(m, "func klp_try_switch_task +p")
    assert flags(m)[363] == "p"


# -- `klpfs debug` ------------------------------------------------------------------------------


async def test_klpfs_debug_is_the_livepatch_query(nursery, autojump_clock) -> None:
    """`klpfs debug on|off` is `file kernel/livepatch/* +p|-p`; `klpfs debug` is on
    while any of the core's callsites prints."""
    m = make_machine(nursery, "6.1")
    assert (await m.ctl("debug", enable=None))["enabled"] is False
    assert (await m.ctl("debug", enable=True))["enabled"] is True
    assert set(flags(m).values()) == {"p"}
    assert write(m, SET_DYNAMIC_DEBUG) == len(SET_DYNAMIC_DEBUG)
    assert flags(m)[316] == "_"
    assert (await m.ctl("debug", enable=None))["enabled"] is True
    assert (await m.ctl("debug", enable=False))["enabled"] is False
    assert set(flags(m).values()) == {"_"}
    assert accepted(m, "func klp_reverse_transition +p")
    assert (await m.ctl("debug", enable=None))["enabled"] is True


# -- a module's own callsites --------------------------------------------------------------------

DEBUG_MOD = textwrap.dedent('''\
    from klpfs.kapi import *

    pr_fmt = lambda fmt: KBUILD_MODNAME + ": " + fmt


    def say(n):
        pr_debug("say %d\\n", n)
        fmt = "computed %s\\n"
        pr_debug(fmt, "format")


    def debug_mod_init():
        pr_info("pid %d\\n", current.pid)
        pr_debug("init \\"quoted\\"\\ttab\\n")
        say(1)
        return 0


    def debug_mod_exit():
        pr_debug("exit\\n")


    module_init(debug_mod_init)
    module_exit(debug_mod_exit)
    MODULE_LICENSE("GPL")
''')


@pytest.mark.parametrize("version", ["6.1", "4.15"])
async def test_module_callsites_come_and_go_with_it(nursery, autojump_clock, version: str) -> None:
    """A Python module's pr_debug() calls are callsites of [module] in its
    file, at the call's line in its function, listed from load (a computed
    format from its first run), printed only with `p`, gone at unload."""
    m = make_machine(nursery, version)
    core = control(m)
    assert (await m.insmod_text("debug_mod.py", DEBUG_MOD))["ok"]
    escaped = ("\"init \"quoted\"\\ttab\\n\"" if version == "6.1" else "\"init \\042quoted\\042\\011tab\\012\"")
    nl = "\\n" if version == "6.1" else "\\012"
    assert control(m)[len(core):] == [
        f"/tmp/debug_mod.py:7 [debug_mod]say =_ \"say %d{nl}\"",
        f"/tmp/debug_mod.py:14 [debug_mod]debug_mod_init =_ {escaped}",
        f"/tmp/debug_mod.py:20 [debug_mod]debug_mod_exit =_ \"exit{nl}\"",
        f"/tmp/debug_mod.py:9 [debug_mod]say =_ \"computed %s{nl}\"",
    ]
    assert debug_lines(m) == []

    assert accepted(m, "module debug_mod +p")
    call(m, "say", 2)
    assert accepted(m, "file debug_mod.py line 9 +pflt")
    call(m, "say", 3)
    assert debug_lines(m) == ["debug_mod: say 2", "debug_mod: computed format", "debug_mod: say 3",
                              f"[{m.kernel.console.pid}] say:9: debug_mod: computed format"]
    assert (await m.rmmod_ctl("debug_mod"))["ok"]
    assert debug_lines(m)[-1] == "debug_mod: exit"
    assert control(m) == core


LONG_MOD = "from klpfs.kapi import *\n\n\ndef long_mod_init():\n" + "".join(
    f"    pr_debug(\"message number {i} of a module with many debug callsites\\n\")\n" for i in range(100)) + (
    "    return 0\n\n\nmodule_init(long_mod_init)\nMODULE_LICENSE(\"GPL\")\n")


async def test_a_long_control_file_is_read_whole(nursery, autojump_clock) -> None:
    """The control file is a seq_file: longer than a page, every line is read."""
    m = make_machine(nursery, "6.1")
    assert (await m.insmod_text("long_mod.py", LONG_MOD))["ok"]
    lines = control(m)
    assert len("\n".join(lines)) > 8192
    assert lines[len(CONTROL_6_1):] == [
        f"/tmp/long_mod.py:{5 + i} [long_mod]long_mod_init =_ "
        f"\"message number {i} of a module with many debug callsites\\n\"" for i in range(100)]
