"""The CLI as a new user meets it: --version, --help of every command and of every
task action with examples and help for each argument, no hidden command listed."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

import pytest
from fusemount import DEADLINE, KLPFS

COMMANDS = ["mount", "umount", "insmod", "rmmod", "lsmod", "dmesg", "debug", "ps", "task", "call", "status",
            "wait", "watch", "ko", "run", "selftests"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run with a wide terminal: argparse wraps help at its width."""
    return subprocess.run([*KLPFS, *args], capture_output=True, text=True, timeout=DEADLINE,
                          env={**os.environ, "COLUMNS": "200"})


def help_lines(text: str) -> list[str]:
    """Each line of a help text with its runs of blanks made one (argparse aligns columns)."""
    return [" ".join(line.split()) for line in text.splitlines()]


def test_version() -> None:
    run = cli("--version")
    assert (run.returncode, run.stdout, run.stderr) == (0, f"klpfs {metadata.version('klpfs')}\n", "")


def test_help_lists_every_command_and_no_hidden_one() -> None:
    run = cli("--help")
    assert run.returncode == 0
    listed = [line.split()[0] for line in run.stdout.split("positional arguments:\n")[1].split("\n\n")[0]
              .splitlines()[1:] if line.startswith("    ") and not line.startswith("      ")]
    assert listed == COMMANDS
    assert "SUPPRESS" not in run.stdout and "shim" not in run.stdout
    assert "examples:\n  klpfs mount /mnt/klp && cd /mnt/klp" in run.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    run = cli(command, "--help")
    assert (run.returncode, run.stderr) == (0, "")
    assert "\nexample" in run.stdout


@pytest.mark.parametrize(("action", "arguments"), [
    ("add", ["comm its name (1-15 characters)",
             "--kthread a kernel thread (default: a user process)"]),
    ("sleep", ["pid the task (from klpfs task add, or klpfs ps)",
               "FUNC a function of the kernel or of a loaded module",
               "--seconds SECONDS wake after this long (default: until woken)"]),
    ("wake", ["pid the task"]),
    ("run", ["pid the task"]),
    ("exit", ["pid the task"]),
])
def test_every_task_action_has_help_with_examples(action: str, arguments: list[str]) -> None:
    run = cli("task", action, "--help")
    assert (run.returncode, run.stderr) == (0, "")
    assert f"\nexamples:\n  klpfs task {action} " in run.stdout
    lines = help_lines(run.stdout)
    for argument in [*arguments, "--json print JSON (keys in docs/cli.md) instead of text"]:
        assert argument in lines


def test_mount_help_tells_the_options() -> None:
    run = cli("mount", "--help")
    lines = help_lines(run.stdout)
    assert ("-d, --debug log at debug level; implies -f, as for any FUSE file system (-o debug: debug level only)"
            in lines)
    assert "debug log at debug level (klpfs's and pyfuse3's messages; default: info)" in lines
    assert "see contrib/systemd/klpfs@.service" in lines


def test_the_shims_entry_is_there_but_not_a_command() -> None:
    """`klpfs run` puts scripts on PATH that run `klpfs shim TOOL`: still dispatched, in the
    tool's own words (here a usage error, before any daemon is needed)."""
    run = cli("shim", "lsmod", "--bogus")
    assert (run.returncode, run.stderr) == (1, "usage: lsmod\nlsmod: unrecognized arguments: --bogus\n")
    unknown = cli("shim", "bash")
    assert unknown.returncode == 2
    assert unknown.stderr.endswith("klpfs: error: argument COMMAND: invalid choice: 'shim' (choose from "
                                   + ", ".join(f"'{c}'" for c in COMMANDS) + ")\n")


@pytest.mark.parametrize(("args", "message"), [
    (("wait", "--timeout", "-1"), "argument --timeout: not a number of seconds: '-1'"),
    (("wait", "--timeout", "soon"), "argument --timeout: not a number of seconds: 'soon'"),
    (("watch", "-n", "0"), "argument -n/--interval: not a positive number of seconds: '0'"),
])
def test_times_are_checked(args: tuple[str, ...], message: str) -> None:
    run = cli(*args)
    assert run.returncode == 2
    assert run.stderr.endswith(f"klpfs {args[0]}: error: {message}\n")
