"""sd_notify(3) to $NOTIFY_SOCKET: a path or an abstract socket; nothing without it, and a
manager that cannot be reached costs a warning, not the mount."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from klpfs.fs.sdnotify import notify_address, sd_notify


def test_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path}) is True
        assert manager.recv(64) == b"READY=1"


def test_an_abstract_socket() -> None:
    name = f"klpfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert manager.recv(64) == b"STOPPING=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:999"}])
def test_nothing_to_notify(environ: dict[str, str]) -> None:
    assert notify_address(environ) is None
    assert sd_notify("READY=1", environ) is False


def test_an_unreachable_manager_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "gone")
    with caplog.at_level(logging.WARNING, logger="klpfs.fs.sdnotify"):
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path}) is False
    assert caplog.messages == [f"cannot notify the service manager at {path}: No such file or directory"]
