"""sd_notify(3) without libsystemd: tell the service manager the mount is ready.

A unit of Type=notify (contrib/systemd/klpfs@.service) runs `klpfs mount -f`
with $NOTIFY_SOCKET set; the daemon sends READY=1 there once the file system
is mounted and served, so units ordered after it find the tree, and
STOPPING=1 when it begins to unmount.  Without $NOTIFY_SOCKET nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The datagram socket $NOTIFY_SOCKET names: a path, or "@name" for an abstract
    socket (sent as a leading NUL byte); None if unset or of another family (vsock)."""
    address = environ.get(NOTIFY_SOCKET, "")
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None


def sd_notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `state` ("READY=1", ...) to the service manager; whether it was sent.  A
    manager that cannot be reached is logged, never fatal: the mount serves on."""
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", environ[NOTIFY_SOCKET], e.strerror)
        return False
    log.debug("notified the service manager: %s", state)
    return True
