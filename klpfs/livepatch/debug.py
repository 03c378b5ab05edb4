"""The livepatch core's pr_debug() callsites (kernel/livepatch/transition.c).

The control file lists them as the kernel does, with the line numbers and
function names of the real sources, so the selftests' `grep
'^kernel/livepatch'`, `func klp_try_switch_task -p` and `file
kernel/livepatch/transition.c line N =_` work on them.  Which sources a
profile's callsites come from is Profile.livepatch_sources:

* "4.15": v4.15's transition.c (the 4.15 and 4.16 profiles).  There the
  per-task messages are built in a buffer and printed by one
  `pr_debug("%s", err_buf)` at the end of klp_try_switch_task().
* "6.1": Debian's 6.1.192 (the 5.1 and 6.1 profiles): one callsite per
  per-task message, all in klp_try_switch_task().
* "6.12": Debian's 6.12.118 (the 6.11 and 6.14 profiles), the same
  callsites further down the file.

Built in, the core's callsites carry its KBUILD_MODNAME, "livepatch" (the
objects of livepatch-objs in kernel/livepatch/Makefile).
"""

from __future__ import annotations

from klpfs.kernel.dyndbg import Ddebug, DynamicDebug

KBUILD_MODNAME = "livepatch"
TRANSITION_C = "kernel/livepatch/transition.c"
LIVEPATCH_FILES = "kernel/livepatch/*"
"""The selftests' and `klpfs debug`'s query for the whole core."""

# What the core prints through a callsite (the keys of Livepatch.debug_sites).
COMPLETE = "complete"
CANCEL = "cancel"
RUNNING = "running"
UNRELIABLE = "unreliable"
SLEEPING = "sleeping"
UNKNOWN = "unknown"
INIT = "init"
REVERSE = "reverse"

_COMMON_FORMATS = {
    COMPLETE: ("klp_complete_transition", "'%s': completing %s transition\n"),
    CANCEL: ("klp_cancel_transition", "'%s': canceling patching transition, going to unpatch\n"),
    INIT: ("klp_init_transition", "'%s': initializing %s transition\n"),
    REVERSE: ("klp_reverse_transition", "'%s': reversing transition from %s\n"),
}
_PER_TASK_FORMATS = {
    RUNNING: "%s: %s:%d is running\n",
    UNRELIABLE: "%s: %s:%d has an unreliable stack\n",
    SLEEPING: "%s: %s:%d is sleeping on function %s\n",
    UNKNOWN: "%s: Unknown error code (%d) when trying to switch %s:%d\n",
}
ERR_BUF = "err_buf"
"""4.15's single per-task callsite: `pr_debug("%s", err_buf)`."""

LINES: dict[str, dict[str, int]] = {
    "4.15": {COMPLETE: 85, CANCEL: 170, ERR_BUF: 363, INIT: 508, REVERSE: 576},
    "6.1": {COMPLETE: 75, CANCEL: 148, RUNNING: 316, UNRELIABLE: 320, SLEEPING: 324, UNKNOWN: 329,
            INIT: 521, REVERSE: 582},
    "6.12": {COMPLETE: 97, CANCEL: 170, RUNNING: 345, UNRELIABLE: 349, SLEEPING: 353, UNKNOWN: 358,
             INIT: 591, REVERSE: 653},
}
"""The line of each pr_debug( in those transition.c files."""


def livepatch_callsites(sources: str) -> dict[str, Ddebug]:
    """The core's callsites by what they print; in 4.15 the per-task keys share one."""
    lines = LINES[sources]
    sites: dict[str, Ddebug] = {}
    for key, (function, fmt) in _COMMON_FORMATS.items():
        sites[key] = Ddebug(KBUILD_MODNAME, function, TRANSITION_C, fmt, lines[key])
    if ERR_BUF in lines:
        shared = Ddebug(KBUILD_MODNAME, "klp_try_switch_task", TRANSITION_C, "%s", lines[ERR_BUF])
        for key in _PER_TASK_FORMATS:
            sites[key] = shared
    else:
        for key, fmt in _PER_TASK_FORMATS.items():
            sites[key] = Ddebug(KBUILD_MODNAME, "klp_try_switch_task", TRANSITION_C, fmt, lines[key])
    return sites


def register_livepatch_callsites(dyndbg: DynamicDebug, sites: dict[str, Ddebug]) -> None:
    """The built-in table, at boot (dynamic_debug_init()), in the file's line order."""
    unique = {id(dp): dp for dp in sites.values()}
    dyndbg.add_module(KBUILD_MODNAME, sorted(unique.values(), key=lambda dp: dp.lineno))


def set_livepatch_debug(dyndbg: DynamicDebug, enable: bool) -> None:
    """`klpfs debug on|off`: `file kernel/livepatch/* +p` (or `-p`) to the control file."""
    dyndbg.exec_queries(f"file {LIVEPATCH_FILES} {'+p' if enable else '-p'}")


def livepatch_debug(dyndbg: DynamicDebug) -> bool:
    """`klpfs debug`: whether any callsite of the core prints."""
    return any(table.mod_name == KBUILD_MODNAME and dp.enabled for table, dp in dyndbg.sites())
