"""The daemon's control socket: JSON lines over a Unix socket only its owner can use.

One request per connection.  `dmesg` with follow=true keeps the connection
and streams new records until the client goes away.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import trio

from klpfs.control.ops import Control, fail, record_dict
from klpfs.control.runtime import remove_record, socket_path, write_record
from klpfs.kernel.printk import LogRecord
from klpfs.system import System

log = logging.getLogger(__name__)
MAX_REQUEST = 64 << 20
"""A request carries a whole module file (a .ko in base64)."""


def peer_uid(sock: socket.socket) -> int:
    """SO_PEERCRED: the uid of the process at the other end."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_request(stream: trio.SocketStream) -> dict[str, Any] | None:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_REQUEST:
            return None
    try:
        request = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


async def _follow(control: Control, stream: trio.SocketStream, since_clear: bool = False) -> None:
    """dmesg -w: the records so far (since the last clear, if asked), then each new one,
    until the client hangs up."""
    send, receive = trio.open_memory_channel[LogRecord](1024)

    def listener(record: LogRecord) -> None:
        try:
            send.send_nowait(record)
        except trio.WouldBlock:
            pass
    printk = control.kernel.log
    start = printk.clear_seq if since_clear else 0
    for record in [r for r in printk.records if r.seq >= start]:
        await _send(stream, record_dict(record))
    printk.listeners.append(listener)
    try:
        async with trio.open_nursery() as nursery:
            async def hang_up() -> None:
                while await stream.receive_some(4096):
                    pass
                nursery.cancel_scope.cancel()
            nursery.start_soon(hang_up)
            async for record in receive:
                await _send(stream, record_dict(record))
    finally:
        printk.listeners.remove(listener)


async def _serve_one(control: Control, stream: trio.SocketStream) -> None:
    try:
        if peer_uid(stream.socket) != os.geteuid():
            await _send(stream, fail(1, "only the daemon's owner may drive it"))
            return
        request = await _read_request(stream)
        if request is None:
            await _send(stream, fail(22, "malformed request"))
        elif request.get("cmd") == "dmesg" and request.get("follow"):
            await _follow(control, stream, bool(request.get("since_clear")))
        else:
            request.pop("follow", None)
            await _send(stream, await control.handle(request))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("control request failed")
        try:
            await _send(stream, fail(5, "internal error in the klpfs daemon (see its log)"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    finally:
        await stream.aclose()


async def serve_control(system: System, mountpoint: str | Path,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on the mountpoint's control socket until cancelled; clean up after."""
    control = Control(system)
    path = socket_path(mountpoint)
    write_record(mountpoint, system.profile.version)
    try:
        path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(_serve_one, control, stream)
    finally:
        remove_record(mountpoint)
