"""`klpfs watch`: the consistency model at work, for people learning or teaching it.

On a terminal the view is redrawn in place with ANSI escapes (no curses): a
progress bar of the tasks switched out of all the transition covers, the tasks
it waits for and the function each is in, its attempts and the time to the next
retry and to the next automatic fake signals, and the kernel log's latest
lines.  Into a pipe or a file it writes plain lines instead: the transition
each time a task switches or it starts or ends, and the log's lines as they come.

The log comes as `dmesg -w` sends it, on a socket select() waits on; between
two records the transition is looked at every `interval` seconds.
"""

from __future__ import annotations

import select
import shutil
import time
from collections import deque
from typing import Protocol, TextIO

from klpfs.control.client import Client, LogFollower
from klpfs.control.logview import format_record
from klpfs.control.lpview import blocker_line, patch_table, progress, timing
from klpfs.control.replies import LivepatchState, Record

DEFAULT_INTERVAL = 0.2
"""Seconds between two looks at the transition: the countdowns move smoothly enough."""
BAR_WIDTH = 40
LOG_KEPT = 200
"""Log records kept for the screen: more than any terminal shows."""
PLAIN_BLOCKERS = 5
"""Tasks named in a plain line; the rest are counted."""

HOME = "\x1b[H"
CLEAR_SCREEN = "\x1b[2J"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


def bar(switched: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#####-----]`: the share of the tasks switched."""
    filled = width * switched // total if total else width
    return f"[{'#' * filled}{'-' * (width - filled)}]"


def screen(state: LivepatchState, log: list[Record], columns: int, rows: int) -> list[str]:
    """The terminal view, cut to the terminal's size: the log gets the rows left over."""
    lines = [f"klpfs watch: kernel {state.kernel}, {state.now:.1f}s since boot", ""]
    transition = state.transition
    if transition is None:
        lines += ["no transition under way", "", *patch_table(state.patches)]
    else:
        lines += [progress(transition),
                  f"{bar(transition.switched, transition.tasks)} {transition.switched}/{transition.tasks}",
                  timing(transition, state.now)]
        if transition.blocking:
            lines += ["", "waiting for:", *(f"  {blocker_line(b)}" for b in transition.blocking)]
    lines += ["", "kernel log:"]
    room = rows - len(lines)
    if room > 0:
        lines += [format_record(record) for record in log[-room:]]
    return [line[:columns] for line in lines[:rows]]


def plain_lines(state: LivepatchState) -> list[str]:
    """The transition in a few lines: its progress and attempts, and the tasks it waits for."""
    transition = state.transition
    if transition is None:
        return ["transition: none"]
    lines = [f"transition: {progress(transition)}, attempts {transition.attempts}"]
    lines += [f"  waiting for {blocker_line(b)}" for b in transition.blocking[:PLAIN_BLOCKERS]]
    if len(transition.blocking) > PLAIN_BLOCKERS:
        lines.append(f"  and {len(transition.blocking) - PLAIN_BLOCKERS} more tasks")
    return lines


def progress_key(state: LivepatchState) -> tuple[object, ...]:
    """What plain lines are printed again for: a transition that starts, ends or turns,
    a task that switches or changes state; not each attempt that fails like the last
    (the log says when fake signals go out)."""
    transition = state.transition
    if transition is None:
        return ()
    return transition.patch, transition.direction, transition.tasks, transition.switched, transition.blocking


class View(Protocol):
    def show(self, state: LivepatchState) -> None: ...

    def log(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...


class PlainView:
    """Lines for a pipe or a file, flushed as they are written."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: tuple[object, ...] | None = None

    def show(self, state: LivepatchState) -> None:
        key = progress_key(state)
        if key != self._last:
            self._last = key
            self._write(plain_lines(state))

    def log(self, records: list[Record]) -> None:
        self._write([format_record(record) for record in records])

    def _write(self, lines: list[str]) -> None:
        for line in lines:
            self._out.write(line + "\n")
        self._out.flush()

    def close(self) -> None:
        pass


class TerminalView:
    """The whole view redrawn from the top left at each change; nothing is scrolled."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._state: LivepatchState | None = None
        self._log: deque[Record] = deque(maxlen=LOG_KEPT)
        out.write(HIDE_CURSOR + CLEAR_SCREEN)

    def show(self, state: LivepatchState) -> None:
        self._state = state
        self._draw()

    def log(self, records: list[Record]) -> None:
        self._log.extend(records)
        self._draw()

    def _draw(self) -> None:
        if self._state is None:
            return
        size = shutil.get_terminal_size()
        # One row short of the screen: a line written on the last row would scroll it.
        lines = screen(self._state, list(self._log), size.columns, size.lines - 1)
        self._out.write(HOME + "\n".join(line + CLEAR_LINE for line in lines) + CLEAR_BELOW)
        self._out.flush()

    def close(self) -> None:
        self._out.write(SHOW_CURSOR + "\n")
        self._out.flush()


def watch(client: Client, out: TextIO, interval: float = DEFAULT_INTERVAL) -> None:
    """Show the livepatch core on `out` until interrupted (KeyboardInterrupt) or the
    daemon goes (DaemonGone)."""
    view: View = TerminalView(out) if out.isatty() else PlainView(out)
    try:
        with LogFollower(client.mountpoint) as follower:
            next_look = time.monotonic()
            while True:
                if time.monotonic() >= next_look:
                    view.show(client.livepatch())
                    next_look = time.monotonic() + interval
                readable, _, _ = select.select([follower], [], [], max(0.0, next_look - time.monotonic()))
                if readable:
                    view.log(follower.read())
    finally:
        view.close()
