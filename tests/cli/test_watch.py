"""`klpfs watch` as people see it: redrawn in place in a real terminal (tmux: capture-pane
reads the screen), and as plain lines into a pipe; Ctrl-C ends it with status 0."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, wait_until
from test_commands import klpfs, m, ok  # noqa: F401

from klpfs.control.watch import CLEAR_SCREEN, HIDE_CURSOR, HOME, SHOW_CURSOR, bar

LOG_LINE = r"\[ *\d+\.\d{6}\] "
LOADED = [LOG_LINE + re.escape(text) for text in (
    "livepatch_sample: tainting kernel with TAINT_LIVEPATCH", "livepatch: enabling patch 'livepatch_sample'",
    "livepatch: 'livepatch_sample': starting patching transition")]
COMPLETE = LOG_LINE + re.escape("livepatch: 'livepatch_sample': patching complete")


def hold(m: Mount) -> tuple[int, int]:
    """A holder sleeping in cmdline_proc_show, then the sample loaded: its pid and the task count."""
    pid = int(ok(m, "task", "add", "holder", "--kthread"))
    ok(m, "task", "sleep", str(pid), "cmdline_proc_show")
    ok(m, "insmod", "livepatch-sample")
    return pid, len(json.loads(ok(m, "ps", "--json"))["tasks"])


def holder_line(pid: int) -> str:
    return f"{pid} holder (kthread, D): sleeping on function cmdline_proc_show"


class Tmux:
    """A tmux server of our own (its socket in `directory`), one 100x30 window running a
    command under bash, which writes its exit status to `directory`/status; every byte the
    command writes to the terminal is kept in `directory`/raw (pipe-pane, attached before
    the command starts)."""

    def __init__(self, directory: Path, command: list[str]) -> None:
        self.base = ["tmux", "-S", str(directory / "tmux.sock"), "-f", "/dev/null"]
        self.status = directory / "status"
        self.raw = directory / "raw"
        self.run("new-session", "-d", "-s", "w", "-x", "100", "-y", "30", "exec cat")
        self.run("set-option", "-t", "w", "remain-on-exit", "on")
        self.run("pipe-pane", "-t", "w", f"exec cat > {shlex.quote(str(self.raw))}")
        # bash waits for the command and goes on after it, if it handled Ctrl-C and exited.
        script = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status))}"
        self.run("respawn-pane", "-k", "-t", "w", shlex.join(["bash", "-c", script]))

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True,
                              timeout=DEADLINE).stdout

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "w").split("\n")[:30]

    def wait_for(self, predicate: Callable[[list[str]], bool], what: str) -> list[str]:
        wait_until(lambda: predicate(self.screen()), what)
        return self.screen()

    def exit_status(self) -> str:
        wait_until(lambda: self.status.exists() and self.status.read_text().endswith("\n"), "the command to exit")
        return self.status.read_text()

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=DEADLINE)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Callable[[list[str]], Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux (scripts/setup installs it)")
    started: list[Tmux] = []

    def start(command: list[str]) -> Tmux:
        started.append(Tmux(tmp_path, command))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def test_watch_in_a_terminal(m: Mount, tmux: Callable[[list[str]], Tmux]) -> None:
    term = tmux([*KLPFS, "watch", "-m", str(m.path), "-n", "0.05"])
    screen = term.wait_for(lambda s: s[2] == "no transition under way", "the first view")
    assert re.fullmatch(r"klpfs watch: kernel 4\.15, \d+\.\ds since boot", screen[0])
    assert screen[1:] == ["", "no transition under way", "", "no patches", "", "kernel log:", *[""] * 23]

    pid, tasks = hold(m)
    screen = term.wait_for(lambda s: s[7] == f"  {holder_line(pid)}" and s[12] != "", "the held transition")
    assert re.fullmatch(r"attempts \d+, next retry in \d\.\ds", screen[4])
    assert all(re.fullmatch(pattern, line) for pattern, line in zip(LOADED, screen[10:13]))
    assert screen[1:4] + screen[5:10] + screen[13:] == [
        "", f"livepatch_sample patching: {tasks - 1} of {tasks} tasks switched",
        f"{bar(tasks - 1, tasks)} {tasks - 1}/{tasks}",
        "", "waiting for:", f"  {holder_line(pid)}", "", "kernel log:", *[""] * 17]

    ok(m, "task", "wake", str(pid))
    screen = term.wait_for(lambda s: s[2] == "no transition under way" and s[11] != "", "the transition's end")
    assert re.fullmatch(COMPLETE, screen[11])
    assert screen[3:8] == ["", "PATCH                 ENABLED  TRANSITION", "livepatch_sample            1           0",
                           "", "kernel log:"]

    term.run("send-keys", "-t", "w", "C-c")
    assert term.exit_status() == "0\n"
    # The cursor hidden and the screen cleared first; the cursor shown again at the end.
    raw = term.raw.read_bytes()
    assert raw.startswith(HIDE_CURSOR.encode() + CLEAR_SCREEN.encode() + HOME.encode())
    assert raw.endswith(SHOW_CURSOR.encode() + b"\r\n")  # the terminal's \n (onlcr)


def looks(lines: list[str]) -> list[list[str]]:
    """What a plain watch printed of the transition, a block each time it changed (the
    log's lines left out)."""
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("transition: "):
            blocks.append([line])
        elif not line.startswith("["):
            blocks[-1].append(line)
    return blocks


class Lines:
    """A pipe's lines as they come, each wait with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self._pending = b""

    def until(self, predicate: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise AssertionError(f"timed out waiting for {what}; lines so far: {self.lines}")
            data = os.read(self.fd, 65536)
            if not data:
                raise AssertionError(f"the pipe ended before {what}; lines: {self.lines}")
            *complete, self._pending = (self._pending + data).split(b"\n")
            self.lines += [line.decode() for line in complete]


def test_watch_into_a_pipe(m: Mount) -> None:
    watch = subprocess.Popen([*KLPFS, "watch", "-m", str(m.path), "-n", "0.05"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert watch.stdout is not None
        out = Lines(watch.stdout.fileno())
        out.until(lambda lines: lines == ["transition: none"], "the first look")
        pid, tasks = hold(m)
        out.until(lambda lines: f"  waiting for {holder_line(pid)}" in lines, "the held transition")
        ok(m, "task", "wake", str(pid))
        out.until(lambda lines: looks(lines)[-1] == ["transition: none"] and len(looks(lines)) > 1
                  and any(re.fullmatch(COMPLETE, line) for line in lines), "the transition's end")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=DEADLINE) == 0
        assert watch.stderr is not None and watch.stderr.read() == b""
    finally:
        watch.kill()
        watch.wait()
    log = [line for line in out.lines if line.startswith("[")]
    assert len(log) == 4
    assert all(re.fullmatch(pattern, line) for pattern, line in zip([*LOADED, COMPLETE], log))
    blocks = looks(out.lines)
    header = rf"transition: livepatch_sample patching: {tasks - 1} of {tasks} tasks switched, attempts \d+"
    assert blocks[0] == ["transition: none"]
    assert re.fullmatch(header, blocks[1][0])
    assert blocks[1][1:] == [f"  waiting for {holder_line(pid)}"]
    assert blocks[-1] == ["transition: none"]
    # A look between the wake and the next attempt finds the holder pending: the only progress
    # there is to see in between (a look need not fall there).
    for block in blocks[2:-1]:
        assert re.fullmatch(header, block[0])
        assert block[1:] == [f"  waiting for {pid} holder (kthread, S): switches at the next attempt"]


def test_watch_ends_when_the_daemon_goes(m: Mount) -> None:
    """A look every 1000 s: after the first, watch waits on the log alone, whose end says
    the daemon stopped."""
    watch = subprocess.Popen([*KLPFS, "watch", "-m", str(m.path), "-n", "1000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert watch.stdout is not None and watch.stderr is not None
        Lines(watch.stdout.fileno()).until(lambda lines: lines == ["transition: none"], "the first look")
        umount = subprocess.run([*KLPFS, "umount", str(m.path)], capture_output=True, text=True, timeout=DEADLINE)
        assert umount.returncode == 0, umount.stderr
        assert watch.wait(timeout=DEADLINE) == 1
        assert watch.stderr.read().decode() == f"klpfs watch: the klpfs daemon serving {m.path} went away\n"
    finally:
        watch.kill()
        watch.wait()
