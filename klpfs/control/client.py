"""The client side of the control socket: one JSON request, JSON replies; and
`Client`, the typed calls the CLI, the shims and the pytest plugin drive a
daemon with.

Plain blocking sockets: the CLI needs no event loop.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from klpfs.control.modrequest import insmod_file_args
from klpfs.control.replies import (
    CallResult, Implementation, KernelInfo, LivepatchState, ModuleInfo, Record, Sleeping, TaskInfo)
from klpfs.control.runtime import DaemonRecord, NoDaemon, find_daemon, gone

__all__ = ["Client", "ControlError", "DaemonGone", "LogFollower", "NoDaemon", "Refused", "request", "stream"]

WAIT_POLL = 0.05
"""Seconds between two looks at the transition while `Client.wait` waits for its end."""


class ControlError(Exception):
    """The daemon could not be reached or answered nonsense."""


class DaemonGone(ControlError):
    """The daemon closed a stream it only ends by stopping."""


class Refused(ControlError):
    """The daemon refused the request as the kernel would: `errno` and its message,
    and what else the reply says of a module request (klpfs.control.ops): its
    file was no module (`file_error`), it is in use or not loaded, why its init
    failed (`detail`)."""

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__(reply["error"])
        self.errno: int = reply["errno"]
        self.file_error: bool = bool(reply.get("file_error"))
        self.in_use: bool = bool(reply.get("in_use"))
        self.not_loaded: bool = bool(reply.get("not_loaded"))
        self.detail: str | None = reply.get("detail")

    @property
    def plain(self) -> bool:
        """Whether the message is only strerror(errno), with nothing of its own to say."""
        return str(self) == os.strerror(self.errno)


def _connect(mountpoint: str | None) -> tuple[DaemonRecord, socket.socket]:
    record = find_daemon(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(record.socket)
    except PermissionError:
        sock.close()
        raise NoDaemon(f"permission denied on {record.socket}: only the daemon's owner may drive it") from None
    except (ConnectionRefusedError, FileNotFoundError):
        # The daemon writes its record once its socket listens, and removes both when it
        # stops: a record whose socket refuses is a killed daemon's.
        sock.close()
        raise gone(record) from None
    except OSError as e:
        sock.close()
        raise NoDaemon(f"cannot reach the klpfs daemon of {record.mountpoint}: {e.strerror}") from None
    return record, sock


def _send(record: DaemonRecord, sock: socket.socket, cmd: str, args: dict[str, Any]) -> None:
    """The request line; MSG_NOSIGNAL: a daemon gone since the connect is an error to
    report, not a SIGPIPE (the shims restore its default action)."""
    try:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n", socket.MSG_NOSIGNAL)
    except (BrokenPipeError, ConnectionResetError):
        raise DaemonGone(f"the klpfs daemon serving {record.mountpoint} went away") from None


def _replies(record: DaemonRecord, sock: socket.socket) -> Iterator[dict[str, Any]]:
    """The daemon's reply lines until it closes the connection."""
    with sock.makefile("rb") as replies:
        while True:
            try:
                line = replies.readline()
            except ConnectionResetError:
                return
            if not line:
                return
            try:
                yield json.loads(line)
            except ValueError:
                raise ControlError(f"bad reply from the daemon of {record.mountpoint}: {line[:80]!r}") from None


def stream(mountpoint: str | None, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
    """Send one request and yield every reply (dmesg with follow=True: a record each).
    The daemon ends such a stream only by stopping: DaemonGone then; a refusal of
    the request is Refused."""
    record, sock = _connect(mountpoint)
    with sock:
        _send(record, sock, cmd, args)
        for reply in _replies(record, sock):
            if reply.get("ok") is False:
                raise Refused(reply)
            yield reply
    raise DaemonGone(f"the klpfs daemon serving {record.mountpoint} went away")


def request(mountpoint: str | None, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one request and return its single reply."""
    record, sock = _connect(mountpoint)
    with sock:
        _send(record, sock, cmd, args)
        for reply in _replies(record, sock):
            return reply
    raise DaemonGone(f"the klpfs daemon serving {record.mountpoint} closed the connection without answering")


class LogFollower:
    """`dmesg -w` on a socket that a loop select()s on beside other work (klpfs watch):
    `read` takes the records that have arrived, without waiting for more."""

    def __init__(self, mountpoint: str | None, since_clear: bool = False) -> None:
        self._record, self._sock = _connect(mountpoint)
        self._pending = b""
        try:
            _send(self._record, self._sock, "dmesg", {"follow": True, "since_clear": since_clear})
        except DaemonGone:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[Record]:
        """What arrived (call it once select() finds the socket readable); DaemonGone
        once the daemon has stopped, Refused if it refused the request."""
        try:
            data = self._sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            raise DaemonGone(f"the klpfs daemon serving {self._record.mountpoint} went away")
        *lines, self._pending = (self._pending + data).split(b"\n")
        records = []
        for line in lines:
            try:
                reply = json.loads(line)
            except ValueError:
                raise ControlError(f"bad reply from the daemon of {self._record.mountpoint}: {line[:80]!r}") from None
            if reply.get("ok") is False:
                raise Refused(reply)
            records.append(Record.from_json(reply))
        return records

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A running daemon's control commands as typed calls.

    `mountpoint` names the daemon (None: the only one running, see
    klpfs.control.runtime.find_daemon).  A refusal raises Refused; a daemon
    that cannot be found or reached, NoDaemon or ControlError.
    """

    def __init__(self, mountpoint: str | None = None) -> None:
        self.mountpoint = mountpoint

    def _call(self, cmd: str, **args: Any) -> dict[str, Any]:
        reply = request(self.mountpoint, cmd, **args)
        if not reply["ok"]:
            raise Refused(reply)
        return reply

    # -- modules ------------------------------------------------------------------

    def insmod(self, path: Path, params: Sequence[str] = (), behaviour: Path | None = None,
               flags: int = 0) -> str:
        """Load a module file (a .ko with `behaviour`, the Python module standing in for its
        code); the loaded module's name.  `flags`: finit_module()'s MODULE_INIT_IGNORE_*, as
        `insmod -f` passes them.  OSError or UnicodeDecodeError if it is unreadable."""
        return str(self._call("insmod", params=list(params), flags=flags,
                              **insmod_file_args(path, behaviour))["name"])

    def rmmod(self, name: str, flags: int = 0) -> None:
        """delete_module(name, flags): O_NONBLOCK, O_EXCL, O_TRUNC as kmod and busybox pass them."""
        self._call("rmmod", name=name, flags=flags)

    def lsmod(self) -> list[ModuleInfo]:
        return [ModuleInfo.from_json(m) for m in self._call("lsmod")["modules"]]

    # -- the log --------------------------------------------------------------------

    def dmesg(self, since_clear: bool = False) -> list[Record]:
        """The ring; since_clear: only what came after the last clear, as util-linux dmesg reads it."""
        return [Record.from_json(r) for r in self._call("dmesg", since_clear=since_clear)["records"]]

    def follow(self, since_clear: bool = False) -> Iterator[Record]:
        """The ring, then every new record as it comes; DaemonGone when the daemon stops."""
        for reply in stream(self.mountpoint, "dmesg", follow=True, since_clear=since_clear):
            yield Record.from_json(reply)

    def clear(self) -> None:
        """syslog(SYSLOG_ACTION_CLEAR), as `dmesg -C` does."""
        self._call("clear")

    def debug(self, enable: bool | None = None) -> bool:
        """Switch the livepatch core's pr_debug lines on or off (None: leave them); whether on."""
        return bool(self._call("debug", enable=enable)["enabled"])

    # -- tasks ------------------------------------------------------------------------

    def ps(self) -> list[TaskInfo]:
        return [TaskInfo.from_json(t) for t in self._call("ps")["tasks"]]

    def task_add(self, comm: str, kthread: bool = False, ppid: int | None = None) -> TaskInfo:
        reply = self._call("task_add", comm=comm, kind="kthread" if kthread else "user", ppid=ppid)
        return TaskInfo.from_json(reply["task"])

    def task_sleep(self, pid: int, function: str, seconds: float | None = None,
                   interruptible: bool = False) -> Sleeping:
        """Make task `pid` call `function` and sleep inside it (until woken, or `seconds`)."""
        reply = self._call("task_sleep", pid=pid, func=function, seconds=seconds, interruptible=interruptible)
        return Sleeping(TaskInfo.from_json(reply["task"]), Implementation.from_reply(reply))

    def task_wake(self, pid: int) -> TaskInfo:
        return TaskInfo.from_json(self._call("task_wake", pid=pid)["task"])

    def task_run(self, pid: int) -> TaskInfo:
        return TaskInfo.from_json(self._call("task_run", pid=pid)["task"])

    def task_exit(self, pid: int) -> None:
        self._call("task_exit", pid=pid)

    def call(self, function: str, pid: int | None = None) -> CallResult:
        """Run `function` as task `pid` (None: the console shell)."""
        reply = self._call("call", func=function, pid=pid)
        return CallResult(TaskInfo.from_json(reply["task"]), Implementation.from_reply(reply), reply["output"])

    # -- the kernel and its livepatch core --------------------------------------------

    def kernel(self) -> KernelInfo:
        reply = self._call("status")
        return KernelInfo(kernel=reply["kernel"], release=reply["release"], vermagic=reply["vermagic"])

    def livepatch(self) -> LivepatchState:
        """The patches and the transition under way, with the tasks it waits for."""
        return LivepatchState.from_json(self._call("livepatch"))

    def wait(self, timeout: float | None = None) -> LivepatchState:
        """Look at the livepatch core until no transition is under way, or for `timeout`
        seconds (None: as long as it takes); the last look, whose `transition` says which."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.livepatch()
            if state.transition is None:
                return state
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return state
            time.sleep(WAIT_POLL if remaining is None else min(WAIT_POLL, remaining))
