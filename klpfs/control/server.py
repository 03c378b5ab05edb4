"""The daemon's control socket: JSON lines over a Unix socket only its owner can use.

One request per connection, a JSON object on one line, read within
REQUEST_DEADLINE and checked against the command's signature before it runs
(Control.parse).  `dmesg` with follow=true keeps the connection and streams
new records until the client goes away or the daemon stops.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import trio

from klpfs.control.ops import Control, Failure, fail, record_dict
from klpfs.control.runtime import make_runtime_dir, remove_record, socket_path, write_record
from klpfs.kernel.printk import LogRecord
from klpfs.system import System

log = logging.getLogger(__name__)
MAX_REQUEST = 64 << 20
"""A request carries a whole module file (a .ko in base64)."""
REQUEST_DEADLINE = 5.0
"""Seconds a client has, from connecting, to send its whole request line.  The CLI
sends it at once; a client that sends part of one and waits would otherwise hold its
connection, and a task of the daemon, for ever.  Past it the client is answered
ETIMEDOUT, not EINVAL: what it sent so far may be a good start, it was only too slow."""


class BadRequest(Exception):
    """A request line that is not a JSON object (EINVAL)."""


def peer_uid(sock: trio.socket.SocketType) -> int:
    """SO_PEERCRED: the uid of the process at the other end."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> dict[str, Any]:
    """The JSON object of a request line; BadRequest for anything else (JSON's own
    grammar: no NaN or Infinity, which Python's json would take)."""
    try:
        request = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("malformed request: nested too deeply") from None
    except ValueError as e:
        raise BadRequest(f"malformed request: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest("malformed request: not a JSON object")
    return request


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    """The first line the client sends, parsed."""
    buf = bytearray()
    end = -1
    while end < 0:
        if len(buf) > MAX_REQUEST:
            raise BadRequest(f"malformed request: longer than {MAX_REQUEST} bytes")
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise BadRequest("malformed request: the connection ended before a whole line")
        searched = len(buf)
        buf += chunk
        end = buf.find(b"\n", searched)
    return parse_request(bytes(buf[:end]))


async def _follow(control: Control, stream: trio.SocketStream, since_clear: bool = False) -> None:
    """dmesg -w: the records so far (since the last clear, if asked), then each new one,
    until the client hangs up, or the daemon stops (the stream is cancelled and closed:
    the client sees the end of it)."""
    send, receive = trio.open_memory_channel[LogRecord](1024)

    def listener(record: LogRecord) -> None:
        try:
            send.send_nowait(record)
        except trio.WouldBlock:
            pass
    printk = control.kernel.log
    start = printk.clear_seq if since_clear else 0
    backlog = [r for r in printk.records if r.seq >= start]
    printk.listeners.append(listener)  # with no await since the backlog: no record is missed
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_hang_up, stream, nursery.cancel_scope)
            try:
                for record in backlog:
                    await _send(stream, record_dict(record))
                async for record in receive:
                    await _send(stream, record_dict(record))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()
    finally:
        printk.listeners.remove(listener)


async def _until_hang_up(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Drop what a follower sends until it hangs up; then end its stream."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _serve_one(control: Control, stream: trio.SocketStream) -> None:
    try:
        if peer_uid(stream.socket) != os.geteuid():
            await _send(stream, fail(errno.EPERM, "only the daemon's owner may drive it"))
            return
        with trio.move_on_after(REQUEST_DEADLINE) as reading:
            request = await _read_request(stream)
        if reading.cancelled_caught:
            await _send(stream, fail(errno.ETIMEDOUT,
                                     f"no whole request line within {REQUEST_DEADLINE:g} seconds"))
            return
        cmd, args = control.parse(request)
        if cmd == "dmesg" and args.get("follow"):
            await _follow(control, stream, args.get("since_clear", False))
        else:
            reply = await control.run(cmd, args)
            await control.system.kernfs.settle()  # what it changed shows in the mount when it is told
            await _send(stream, reply)
    except BadRequest as e:
        await _send_quietly(stream, fail(errno.EINVAL, str(e)))
    except Failure as f:
        await _send_quietly(stream, f.reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("control request failed")
        await _send_quietly(stream, fail(errno.EIO, "internal error in the klpfs daemon (see its log)"))
    finally:
        await stream.aclose()


async def _send_quietly(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    """A last reply to a client that may have gone already."""
    try:
        await _send(stream, reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_control(system: System, mountpoint: str | Path,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the mountpoint's control socket until cancelled; clean up after.

    The record that names this daemon is written once the socket listens: while
    the daemon lives, a client that finds the record can connect, so one that is
    refused knows the daemon is gone (klpfs.control.client)."""
    control = Control(system)
    path = socket_path(mountpoint)
    try:
        make_runtime_dir()
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        write_record(mountpoint, system.profile.version)
        task_status.started()
        async with listener:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_serve_one, control, stream)
    finally:
        remove_record(mountpoint)
