"""The client side of the control socket: one JSON request, JSON replies.

Plain blocking sockets: the CLI needs no event loop.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

from klpfs.control.runtime import NoDaemon, find_daemon


class ControlError(Exception):
    """The daemon could not be reached or answered nonsense."""


def _connect(mountpoint: str | None) -> socket.socket:
    record = find_daemon(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(record.socket)
    except PermissionError:
        sock.close()
        raise NoDaemon(f"permission denied on {record.socket}: only the daemon's owner may drive it") from None
    except OSError as e:
        sock.close()
        raise NoDaemon(f"cannot reach the klpfs daemon of {record.mountpoint}: {e.strerror}") from None
    return sock


def stream(mountpoint: str | None, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
    """Send one request and yield every reply until the daemon closes."""
    with _connect(mountpoint) as sock:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        with sock.makefile("rb") as replies:
            for line in replies:
                try:
                    yield json.loads(line)
                except ValueError:
                    raise ControlError(f"bad reply from the daemon: {line[:80]!r}") from None


def request(mountpoint: str | None, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one request and return its single reply."""
    for reply in stream(mountpoint, cmd, **args):
        return reply
    raise ControlError("the daemon closed the connection without answering")
