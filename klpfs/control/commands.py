"""The control commands of the `klpfs` CLI: insmod, rmmod, lsmod, dmesg, debug,
ps, task and call.  They talk to a running daemon and print the way the real
tools do, exiting non-zero on any error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from klpfs.control.client import ControlError, request, stream
from klpfs.control.modrequest import insmod_file_args
from klpfs.control.run import sync_after_module_change
from klpfs.control.runtime import NoDaemon
from klpfs.control.samples import find_module_file, list_samples
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
    "lsmod": "example:\n  klpfs lsmod",
    "dmesg": """examples:
  klpfs dmesg
  klpfs dmesg --level err,warn
  klpfs dmesg -w            # follow new messages until interrupted
  klpfs dmesg -C            # set the clear point, as dmesg -C does on a real kernel""",
    "debug": """examples:
  klpfs debug on            # show pr_debug lines (the per-task transition messages):
                            # `file kernel/livepatch/* +p` to sys/kernel/debug/dynamic_debug/control
  klpfs debug               # on if any livepatch pr_debug callsite prints""",
    "ps": "example:\n  klpfs ps",
    "task": """examples:
  klpfs task add worker --kthread                    # prints the new pid
  klpfs task sleep 813 cmdline_proc_show             # hold a transition
  klpfs task sleep 813 cmdline_proc_show --seconds 5
  klpfs task wake 813
  klpfs task run 812                                 # busy in user mode
  klpfs task exit 813""",
    "call": """examples:
  klpfs call cmdline_proc_show                       # as the console shell
  klpfs call cmdline_proc_show --pid 813""",
}


def _mount_arg(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("-m", "--mount", metavar="MNT", default=default,
                        help="the klpfs mountpoint to drive (default: $KLPFS_MOUNT, or the only daemon running)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the control commands on the CLI's subparsers."""
    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        _mount_arg(parser, os.environ.get("KLPFS_MOUNT"))
        return parser

    p = sub("insmod", "load a module file into the emulated kernel")
    p.add_argument("file", help="a module file (.py or .toml), or the name of a shipped module")
    p.add_argument("params", nargs="*", metavar="param=value", help="module parameters")
    p.add_argument("--behaviour", metavar="FILE.py", type=Path,
                   help="for a .ko: the Python module whose functions stand in for its machine code "
                        "(default: FILE.py beside FILE.ko, if there is one)")
    p.set_defaults(func=cmd_insmod)

    p = sub("rmmod", "unload a module from the emulated kernel")
    p.add_argument("name", help="module name (dashes or a .ko/.py/.toml suffix are accepted)")
    p.set_defaults(func=cmd_rmmod)

    sub("lsmod", "list loaded modules").set_defaults(func=cmd_lsmod)

    p = sub("dmesg", "print the emulated kernel's log")
    p.add_argument("-l", "--level", help="only these levels, comma-separated: " + ",".join(LEVEL_NAMES))
    p.add_argument("-w", "--follow", action="store_true", help="wait for new messages")
    p.add_argument("-C", "--clear", action="store_true",
                   help="set the clear point (dmesg -C): /dev/kmsg's SEEK_DATA and the dmesg of "
                        "`klpfs run` start after it; this command keeps showing the whole log")
    p.set_defaults(func=cmd_dmesg)

    p = sub("debug", "show or switch pr_debug messages (dynamic debug for livepatch)")
    p.add_argument("state", nargs="?", choices=["on", "off"])
    p.set_defaults(func=cmd_debug)

    sub("ps", "list tasks: pid, comm, kind, state, patch_state, where they are").set_defaults(func=cmd_ps)

    p = sub("task", "script tasks: add, sleep in a function, wake, run, exit")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        # -m may come after the action too; SUPPRESS keeps the task-level value otherwise.
        parser = actions.add_parser(name, help=help_text)
        _mount_arg(parser, argparse.SUPPRESS)
        return parser

    a = action("add", "fork a new task")
    a.add_argument("comm", help="its name (1-15 characters)")
    a.add_argument("--kthread", action="store_true", help="a kernel thread (default: a user process)")
    a.add_argument("--ppid", type=int, help="parent (default: kthreadd, or the console shell)")
    a = action("sleep", "make a task call FUNC and sleep inside it")
    a.add_argument("pid", type=int)
    a.add_argument("function")
    a.add_argument("--seconds", type=float, help="wake after this long (default: until woken)")
    a.add_argument("--interruptible", action="store_true",
                   help="sleep in state S, which a (fake) signal interrupts (default: D)")
    for name, text in (("wake", "end a task's sleep inside a function"),
                       ("run", "make a task busy on a CPU"), ("exit", "end a task")):
        action(name, text).add_argument("pid", type=int)
    p.set_defaults(func=cmd_task)

    p = sub("call", "run an emulated function as a task and say which implementation answered")
    p.add_argument("function")
    p.add_argument("--pid", type=int, help="the calling task (default: the console shell)")
    p.set_defaults(func=cmd_call)


def run(args: argparse.Namespace) -> int:
    """Run the chosen control command; errors reaching the daemon print and give 1."""
    try:
        return args.func(args)
    except (NoDaemon, ControlError) as e:
        print(f"klpfs {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _error(tool: str, message: str) -> int:
    print(f"{tool}: ERROR: {message}", file=sys.stderr)
    return 1


def cmd_insmod(args: argparse.Namespace) -> int:
    path = find_module_file(args.file)
    if path is None:
        names = ", ".join(p.stem for p in list_samples())
        return _error("insmod", f"could not load module {args.file}: No such file or directory "
                                f"(shipped samples: {names})")
    try:
        file_args = insmod_file_args(path, args.behaviour)
    except (OSError, UnicodeDecodeError) as e:
        return _error("insmod", f"could not load module {args.file}: {e}")
    reply = request(args.mount, "insmod", params=args.params, **file_args)
    if reply["ok"]:
        sync_after_module_change()
        return 0
    if reply.get("file_error"):
        _error("insmod", f"could not insert module {args.file}: Invalid module format")
        print(reply["error"], file=sys.stderr)
        return 1
    _error("insmod", f"could not insert module {args.file}: {reply['error']}")
    if reply.get("detail"):
        print(reply["detail"], file=sys.stderr)
    return 1


def cmd_rmmod(args: argparse.Namespace) -> int:
    reply = request(args.mount, "rmmod", name=args.name)
    if reply["ok"]:
        sync_after_module_change()
        return 0
    if reply.get("not_loaded"):
        return _error("rmmod", f"Module {reply['name']} is not currently loaded")
    if reply.get("in_use"):
        return _error("rmmod", f"Module {reply['name']} is in use")
    return _error("rmmod", f"could not remove module {args.name}: {reply['error']}")


def cmd_lsmod(args: argparse.Namespace) -> int:
    print_lsmod(_checked(request(args.mount, "lsmod"))["modules"])
    return 0


def print_lsmod(modules: list[dict[str, Any]]) -> None:
    """lsmod's table (kmod's format)."""
    print("Module                  Size  Used by")
    for m in modules:
        print(f"{m['name']:<19} {m['size']:8}  {m['refcnt']}")


def format_record(record: dict[str, Any]) -> str:
    """A log record as dmesg prints it."""
    return f"[{record['time']:12.6f}] {record['text']}"


def cmd_dmesg(args: argparse.Namespace) -> int:
    levels = None
    if args.level:
        levels = {lv.strip() for lv in args.level.split(",")}
        unknown = levels - set(LEVEL_NAMES)
        if unknown:
            print(f"dmesg: unknown level '{sorted(unknown)[0]}'", file=sys.stderr)
            return 1
    if args.clear:
        _checked(request(args.mount, "clear"))
        return 0
    if args.follow:
        replies = stream(args.mount, "dmesg", follow=True)
    else:
        replies = iter(_checked(request(args.mount, "dmesg"))["records"])
    for record in replies:
        if levels is None or record["level"] in levels:
            print(format_record(record), flush=args.follow)
    return 0


def cmd_debug(args: argparse.Namespace) -> int:
    enable = None if args.state is None else args.state == "on"
    reply = _checked(request(args.mount, "debug", enable=enable))
    print("on" if reply["enabled"] else "off")
    return 0


def _task_line(t: dict[str, Any]) -> str:
    return f"{t['pid']:>6} {t['comm']:<16} {t['kind']:<8} {t['state']:<5} {t['patch_state']:>5}  {t['where']}"


def cmd_ps(args: argparse.Namespace) -> int:
    reply = _checked(request(args.mount, "ps"))
    print(f"{'PID':>6} {'COMM':<16} {'KIND':<8} {'STATE':<5} {'PATCH':>5}  WHERE")
    for t in reply["tasks"]:
        print(_task_line(t))
    return 0


def cmd_task(args: argparse.Namespace) -> int:
    if args.action == "add":
        reply = request(args.mount, "task_add", comm=args.comm, kind="kthread" if args.kthread else "user",
                        ppid=args.ppid)
    elif args.action == "sleep":
        reply = request(args.mount, "task_sleep", pid=args.pid, func=args.function, seconds=args.seconds,
                        interruptible=args.interruptible)
    else:
        reply = request(args.mount, f"task_{args.action}", pid=args.pid)
    reply = _checked(reply)
    if args.action == "add":
        print(reply["task"]["pid"])
    elif args.action == "sleep":
        print(f"{args.pid} sleeps in {_impl(reply)}")
    return 0


def _impl(reply: dict[str, Any]) -> str:
    return reply["impl"] + (f" [{reply['impl_module']}]" if reply.get("impl_module") else "")


def cmd_call(args: argparse.Namespace) -> int:
    reply = _checked(request(args.mount, "call", func=args.function, pid=args.pid))
    task = reply["task"]
    print(f"{args.function} -> {_impl(reply)} (as {task['comm']}:{task['pid']}, "
          f"patch_state {task['patch_state']})")
    sys.stdout.write(reply["output"])
    return 0


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or ControlError with the daemon's refusal (printed by run())."""
    if not reply["ok"]:
        raise ControlError(reply["error"])
    return reply
