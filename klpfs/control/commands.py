"""The control commands of the `klpfs` CLI: insmod, rmmod, lsmod, dmesg, debug, ps,
task, call, status, wait and watch.  They drive a running daemon through
klpfs.control.client.Client and print the way the real tools do, exiting
non-zero on any error; with --json, what they print is the JSON of docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from klpfs.control.client import Client, ControlError, Refused
from klpfs.control.logview import UnknownLevel, format_record, parse_levels, wanted
from klpfs.control.lpview import status_lines, transition_lines
from klpfs.control.replies import ModuleInfo
from klpfs.control.run import sync_after_module_change
from klpfs.control.runtime import NoDaemon
from klpfs.control.samples import find_module_file, list_samples, module_stem
from klpfs.control.toolwords import kmod_insert, kmod_missing, kmod_remove
from klpfs.control.watch import DEFAULT_INTERVAL, watch
from klpfs.elf.kmod import MODULE_INIT_IGNORE_MODVERSIONS, MODULE_INIT_IGNORE_VERMAGIC
from klpfs.kernel.printk import LEVEL_NAMES

EXAMPLES = {
    "insmod": """examples:
  klpfs insmod livepatch-sample                      # a shipped sample, by name
  klpfs insmod ./my-patch.py                         # a Python module (or ./my-patch.toml)
  klpfs insmod test_klp_callbacks_busy block_transition=Y
  klpfs insmod livepatch-callbacks-busymod sleep_secs=30""",
    "rmmod": """examples:
  klpfs rmmod livepatch_sample
  klpfs rmmod livepatch-sample.ko""",
    "lsmod": """examples:
  klpfs lsmod
  klpfs lsmod --json | jq -r '.modules[].name'""",
    "dmesg": """examples:
  klpfs dmesg
  klpfs dmesg --level err,warn
  klpfs dmesg -w            # follow new messages until interrupted
  klpfs dmesg -C            # set the clear point, as dmesg -C does on a real kernel
  klpfs dmesg --json | jq -r '.records[] | select(.level == "notice") | .text'
  klpfs dmesg -w --json     # one JSON record a line, as they come""",
    "debug": """examples:
  klpfs debug on            # show pr_debug lines (the per-task transition messages):
                            # `file kernel/livepatch/* +p` to sys/kernel/debug/dynamic_debug/control
  klpfs debug               # on if any livepatch pr_debug callsite prints""",
    "ps": """examples:
  klpfs ps
  klpfs ps --json | jq '.tasks[] | select(.patch_state == 0)'   # the tasks not switched yet""",
    "task": """examples:
  klpfs task add worker --kthread                    # prints the new pid
  klpfs task sleep 813 cmdline_proc_show             # hold a transition
  klpfs task sleep 813 cmdline_proc_show --seconds 5
  klpfs task wake 813
  klpfs task run 812                                 # busy in user mode
  klpfs task exit 813

Each action has its own --help: klpfs task sleep --help""",
    "task add": """examples:
  klpfs task add worker --kthread                    # a kernel thread; prints its pid
  klpfs task add client                              # a user process, child of the console shell
  pid=$(klpfs task add holder --kthread)
  klpfs task add holder --json | jq .task.pid""",
    "task sleep": """examples:
  klpfs task sleep 813 cmdline_proc_show             # until woken: holds a transition
  klpfs task sleep 813 cmdline_proc_show --seconds 5 # wakes by itself after 5 seconds
  klpfs task sleep 813 cmdline_proc_show --interruptible
                                                     # state S: a fake signal wakes it""",
    "task wake": """examples:
  klpfs task wake 813                                # it returns from the function it slept in""",
    "task run": """examples:
  klpfs task run 812                                 # busy in user mode: switches on its next tick""",
    "task exit": """examples:
  klpfs task exit 813""",
    "call": """examples:
  klpfs call cmdline_proc_show                       # as the console shell
  klpfs call cmdline_proc_show --pid 813
  klpfs call cmdline_proc_show --json | jq -r .impl.name""",
    "status": """examples:
  klpfs status                                       # patches, the transition, who holds it
  klpfs status --json | jq '.transition.blocking[].task.pid'""",
    "wait": """examples:
  echo 1 > $MNT/sys/kernel/livepatch/livepatch_sample/enabled
  klpfs wait                                         # until the transition is over
  klpfs wait --timeout 30 || klpfs status            # exit 1 after 30 seconds, naming who holds it""",
    "watch": """examples:
  klpfs watch                                        # redrawn in place until Ctrl-C
  klpfs watch -n 1                                   # a look every second
  klpfs watch | tee transition.log                   # plain lines into a pipe""",
}


def _mount_arg(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("-m", "--mount", metavar="MNT", default=default,
                        help="the klpfs mountpoint to drive (default: $KLPFS_MOUNT, or the only daemon running)")


def _json_arg(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument("--json", action="store_true", default=default,
                        help="print JSON (keys in docs/cli.md) instead of text")


def _seconds(value: str) -> float:
    """argparse type of a time: a number of seconds, zero or more."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}")
    return seconds


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {value!r}")
    return seconds


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the control commands on the CLI's subparsers."""
    def sub(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=description or help_text,
                                       epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        _mount_arg(parser, os.environ.get("KLPFS_MOUNT"))
        return parser

    p = sub("insmod", "load a module file into the emulated kernel")
    p.add_argument("file", help="a module file (.py, .toml or .ko), or the name of a shipped module")
    p.add_argument("params", nargs="*", metavar="param=value", help="module parameters")
    p.add_argument("--behaviour", metavar="FILE.py", type=Path,
                   help="for a .ko: the Python module whose functions stand in for its machine code "
                        "(default: FILE.py beside FILE.ko, if there is one)")
    p.add_argument("-f", "--force", action="store_true",
                   help="load despite a vermagic or module_layout CRC mismatch, as `insmod -f` does "
                        "(the kernel taints F; refused without CONFIG_MODULE_FORCE_LOAD)")
    p.set_defaults(func=cmd_insmod)

    p = sub("rmmod", "unload a module from the emulated kernel")
    p.add_argument("name", help="module name (dashes or a .ko/.py/.toml suffix are accepted)")
    p.set_defaults(func=cmd_rmmod)

    p = sub("lsmod", "list loaded modules")
    _json_arg(p)
    p.set_defaults(func=cmd_lsmod)

    p = sub("dmesg", "print the emulated kernel's log")
    p.add_argument("-l", "--level", help="only these levels, comma-separated: " + ",".join(LEVEL_NAMES))
    p.add_argument("-w", "--follow", action="store_true", help="wait for new messages")
    p.add_argument("-C", "--clear", action="store_true",
                   help="set the clear point (dmesg -C): /dev/kmsg's SEEK_DATA and the dmesg of "
                        "`klpfs run` start after it; this command keeps showing the whole log")
    _json_arg(p)
    p.set_defaults(func=cmd_dmesg)

    p = sub("debug", "show or switch pr_debug messages (dynamic debug for livepatch)")
    p.add_argument("state", nargs="?", choices=["on", "off"], help="switch them on or off (default: just show)")
    p.set_defaults(func=cmd_debug)

    p = sub("ps", "list tasks: pid, comm, kind, state, patch_state, where they are")
    _json_arg(p)
    p.set_defaults(func=cmd_ps)

    _add_task(sub("task", "script tasks: add, sleep in a function, wake, run, exit"))

    p = sub("call", "run an emulated function as a task and say which implementation answered")
    p.add_argument("function", help="a function of the kernel or of a loaded module, e.g. cmdline_proc_show")
    p.add_argument("--pid", type=int, help="the calling task (default: the console shell)")
    _json_arg(p)
    p.set_defaults(func=cmd_call)

    p = sub("status", "show the patches and the transition: its progress and the tasks that hold it",
            "Show the patches (as their enabled and transition attributes read), and the transition "
            "under way: its direction, how many tasks have switched, its attempts and the time to the "
            "next one and to the next automatic fake signals (5.1 on), and every task it waits for, "
            "with why, the function it sleeps in and its stack.")
    _json_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub("wait", "wait until no transition is under way",
            "Return when no transition is under way (exit 0).  With --timeout, give up after that many "
            "seconds: exit 1, naming on stderr the tasks the transition waits for.")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="give up after S seconds (default: never)")
    p.set_defaults(func=cmd_wait)

    p = sub("watch", "watch a transition live: tasks switched, who holds it, retries, the log",
            "Watch the livepatch core live until interrupted.  On a terminal the view is redrawn in place: "
            "a progress bar of the tasks switched, the tasks the transition waits for and the function "
            "each is in, the attempts and the time to the next retry and fake signal, and the kernel "
            "log's latest lines.  Into a pipe or a file it writes plain lines: the transition whenever "
            "it changes, and the log's lines as they come.")
    p.add_argument("-n", "--interval", type=_positive_seconds, default=DEFAULT_INTERVAL, metavar="S",
                   help=f"seconds between two looks at the transition (default {DEFAULT_INTERVAL:g})")
    p.set_defaults(func=cmd_watch)


def _add_task(parser: argparse.ArgumentParser) -> None:
    _json_arg(parser)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        # -m and --json may come after the action too; SUPPRESS keeps the task-level value otherwise.
        sub = actions.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[f"task {name}"],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        _mount_arg(sub, argparse.SUPPRESS)
        _json_arg(sub, argparse.SUPPRESS)
        return sub

    a = action("add", "fork a new task; prints its pid")
    a.add_argument("comm", help="its name (1-15 characters)")
    a.add_argument("--kthread", action="store_true", help="a kernel thread (default: a user process)")
    a.add_argument("--ppid", type=int, help="parent (default: kthreadd, or the console shell)")
    a = action("sleep", "make a task call FUNC and sleep inside it")
    a.add_argument("pid", type=int, help="the task (from klpfs task add, or klpfs ps)")
    a.add_argument("function", metavar="FUNC", help="a function of the kernel or of a loaded module")
    a.add_argument("--seconds", type=float, help="wake after this long (default: until woken)")
    a.add_argument("--interruptible", action="store_true",
                   help="sleep in state S, which a (fake) signal interrupts (default: D)")
    for name, text in (("wake", "end a task's sleep inside a function"),
                       ("run", "make a task busy on a CPU"), ("exit", "end a task")):
        action(name, text).add_argument("pid", type=int, help="the task")
    parser.set_defaults(func=cmd_task)


def run(args: argparse.Namespace) -> int:
    """Run the chosen control command; errors reaching the daemon print and give 1."""
    # A reader that stops early (`klpfs dmesg -w | head -3`) ends us as it ends a C tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        status: int = args.func(args)
    except (NoDaemon, ControlError) as e:
        print(f"klpfs {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def _fail(lines: Iterable[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return 1


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _as_json(value: Any) -> Any:
    return dataclasses.asdict(value)


def cmd_insmod(args: argparse.Namespace) -> int:
    path = find_module_file(args.file)
    if path is None:
        names = ", ".join(p.stem for p in list_samples())
        return _fail([f"{kmod_missing(args.file)} (shipped samples: {names})"])
    try:
        flags = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC if args.force else 0
        Client(args.mount).insmod(path, args.params, args.behaviour, flags)
    except Refused as refusal:
        return _fail(kmod_insert(args.file, refusal))
    except (OSError, UnicodeDecodeError) as e:
        return _fail([f"insmod: ERROR: could not load module {args.file}: {e}"])
    sync_after_module_change()
    return 0


def cmd_rmmod(args: argparse.Namespace) -> int:
    try:
        Client(args.mount).rmmod(args.name)
    except Refused as refusal:
        return _fail([kmod_remove(args.name, refusal, module_stem(args.name))])
    sync_after_module_change()
    return 0


def print_lsmod(modules: list[ModuleInfo]) -> None:
    """lsmod's table (kmod's format)."""
    print("Module                  Size  Used by")
    for m in modules:
        print(f"{m.name:<19} {m.size:8}  {m.refcnt}")


def cmd_lsmod(args: argparse.Namespace) -> int:
    modules = Client(args.mount).lsmod()
    if args.json:
        _print_json({"modules": [_as_json(m) for m in modules]})
    else:
        print_lsmod(modules)
    return 0


def cmd_dmesg(args: argparse.Namespace) -> int:
    try:
        levels = parse_levels(args.level)
    except UnknownLevel as e:
        return _fail([str(e)])
    client = Client(args.mount)
    if args.clear:
        client.clear()
        return 0
    if args.follow:
        for record in client.follow():
            if wanted(record, levels):
                print(json.dumps(_as_json(record)) if args.json else format_record(record), flush=True)
        return 0
    records = [record for record in client.dmesg() if wanted(record, levels)]
    if args.json:
        _print_json({"records": [_as_json(r) for r in records]})
    else:
        for record in records:
            print(format_record(record))
    return 0


def cmd_debug(args: argparse.Namespace) -> int:
    enable = None if args.state is None else args.state == "on"
    print("on" if Client(args.mount).debug(enable) else "off")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    tasks = Client(args.mount).ps()
    if args.json:
        _print_json({"tasks": [_as_json(t) for t in tasks]})
        return 0
    print(f"{'PID':>6} {'COMM':<16} {'KIND':<8} {'STATE':<5} {'PATCH':>5}  WHERE")
    for t in tasks:
        print(f"{t.pid:>6} {t.comm:<16} {t.kind:<8} {t.state:<5} {t.patch_state:>5}  {t.where}")
    return 0


def cmd_task(args: argparse.Namespace) -> int:
    client = Client(args.mount)
    text = None
    result: dict[str, Any]
    if args.action == "add":
        task = client.task_add(args.comm, args.kthread, args.ppid)
        result, text = {"task": _as_json(task)}, str(task.pid)
    elif args.action == "sleep":
        sleeping = client.task_sleep(args.pid, args.function, args.seconds, args.interruptible)
        result, text = _as_json(sleeping), f"{args.pid} sleeps in {sleeping.impl}"
    elif args.action == "exit":
        client.task_exit(args.pid)
        result = {"pid": args.pid}
    else:
        act = client.task_wake if args.action == "wake" else client.task_run
        result = {"task": _as_json(act(args.pid))}
    if args.json:
        _print_json(result)
    elif text is not None:
        print(text)
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    result = Client(args.mount).call(args.function, args.pid)
    if args.json:
        _print_json(_as_json(result))
        return 0
    print(f"{args.function} -> {result.impl} (as {result.task.comm}:{result.task.pid}, "
          f"patch_state {result.task.patch_state})")
    sys.stdout.write(result.output)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = Client(args.mount).livepatch()
    if args.json:
        _print_json(_as_json(state))
    else:
        print("\n".join(status_lines(state)))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    state = Client(args.mount).wait(args.timeout)
    if state.transition is None:
        return 0
    return _fail([f"klpfs wait: timed out after {args.timeout:g}s",
                  *transition_lines(state.transition, state.now, stacks=False)])


def cmd_watch(args: argparse.Namespace) -> int:
    try:
        watch(Client(args.mount), sys.stdout, args.interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    return 0
