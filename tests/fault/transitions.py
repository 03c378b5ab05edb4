"""The one-transition-at-a-time rule, checked on the kernel log as it is written.

klp_transition_patch is a single pointer: between a patch's "starting
patching/unpatching transition" (klp_start_transition()) and its "patching/
unpatching complete" (klp_complete_transition()) no other patch may start one.
The same patch may start again in between: klp_reverse_transition() restarts
the transition the other way.  A "complete" with none started is a failed
enable cancelling (klp_cancel_transition()).  The log is followed over the
control socket (`klpfs dmesg -w`), so every record is seen in the order the
kernel wrote it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

STARTING = re.compile(r"livepatch: '(?P<patch>[^']+)': starting (?:un)?patching transition")
COMPLETE = re.compile(r"livepatch: '(?P<patch>[^']+)': (?:un)?patching complete")


class OneTransition:
    """The rule, applied to log lines in order; `open` is the patch in transition."""

    def __init__(self, in_transition: str | None = None):
        self.open = in_transition
        self.transitions = 0
        self.violations: list[str] = []

    def check(self, text: str) -> None:
        if m := STARTING.fullmatch(text):
            patch = m["patch"]
            if self.open is not None and self.open != patch:
                self.violations.append(f"'{patch}' started a transition while '{self.open}' was in one")
            if self.open is None:
                self.transitions += 1
            self.open = patch
        elif m := COMPLETE.fullmatch(text):
            patch = m["patch"]
            if self.open is not None and self.open != patch:
                self.violations.append(f"'{patch}' completed a transition while '{self.open}' was in one")
            self.open = None


class TransitionMonitor(threading.Thread):
    """Follows the log of the daemon listening on `socket_path` from its last clear
    (`dmesg -C`) until `stop`, applying OneTransition; `in_transition` is the patch in
    transition at that point."""

    def __init__(self, socket_path: str | Path, in_transition: str | None):
        super().__init__(name="transition-monitor", daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.sock.sendall(json.dumps({"cmd": "dmesg", "follow": True, "since_clear": True}).encode() + b"\n")
        self.rule = OneTransition(in_transition)
        self.last_seq = -1
        self._seen = threading.Condition()

    def run(self) -> None:
        with self.sock.makefile("rb") as lines:
            for line in lines:
                record = json.loads(line)
                self.rule.check(record["text"])
                with self._seen:
                    self.last_seq = record["seq"]
                    self._seen.notify_all()

    def wait_for(self, seq: int, timeout: float) -> bool:
        """Whether the record numbered seq has been checked within timeout seconds."""
        with self._seen:
            return self._seen.wait_for(lambda: self.last_seq >= seq, timeout)

    def stop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join()
        self.sock.close()
