"""Raw bytes on the control socket of a running daemon: whatever arrives is
answered with one error reply (EINVAL: not a request it can run) and the
connection closed, and the daemon answers `status` after it."""

from __future__ import annotations

import errno
import json
import socket
from typing import Any
import pytest
from fusemount import DEADLINE, Mount

from klpfs.control.runtime import find_daemon
from klpfs.control.server import MAX_REQUEST

DEEP = 100_000
WAIT_FOR_LINE = 5.0
"""How long the daemon waits for a request line to end (REQUEST_DEADLINE)."""


def exchange(path: str, data: bytes, timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """Send data, close the sending side, and return every reply line until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


@pytest.fixture(scope="module")
def control(shared_mount: Mount) -> str:
    """The control socket's path."""
    return find_daemon(str(shared_mount.path)).socket


def status_ok(path: str) -> bool:
    [reply] = exchange(path, b'{"cmd": "status"}\n')
    return reply["ok"] is True and reply["kernel"] == "4.15"


@pytest.mark.parametrize("data", [
    pytest.param(b"\x00\xff garbage \x7f\n", id="garbage"),
    pytest.param(b"\n", id="empty line"),
    pytest.param(b'{"cmd": "sta', id="truncated, then closed"),
    pytest.param(b'{"cmd": "status"\n', id="truncated line"),
    pytest.param(b'{"cmd": "\xff\xfe"}\n', id="not utf-8"),
    pytest.param(b'[1, 2]\n', id="an array"),
    pytest.param(b'"status"\n', id="a string"),
    pytest.param(b'{"cmd": 5}\n', id="cmd not a string"),
    pytest.param(b'{"cmd": null}\n', id="cmd null"),
    pytest.param(b'{}\n', id="no cmd"),
    pytest.param(b'{"cmd": "reboot"}\n', id="unknown command"),
    pytest.param(b'{"cmd": "__init__"}\n', id="a method that is no command"),
    pytest.param(b'{"cmd": "task_wake", "pid": "1"}\n', id="pid a string"),
    pytest.param(b'{"cmd": "task_wake", "pid": true}\n', id="pid a bool"),
    pytest.param(b'{"cmd": "task_wake"}\n', id="missing argument"),
    pytest.param(b'{"cmd": "status", "extra": 1}\n', id="unknown argument"),
    pytest.param(b'{"cmd": "task_add", "comm": ["x"], "kind": "user", "ppid": null}\n', id="comm a list"),
    pytest.param(b'{"cmd": "task_sleep", "pid": 1, "func": "schedule", "seconds": NaN, '
                 b'"interruptible": false}\n', id="NaN"),
    pytest.param(b'{"cmd": "insmod", "path": 1, "text": {}, "params": "x"}\n', id="insmod all wrong"),
    pytest.param(b'{"cmd": "rmmod", "name": 1e999}\n', id="a number past a double"),
    pytest.param(b"[" * DEEP + b"]" * DEEP + b"\n", id="deep array"),
    pytest.param(b'{"cmd": "status", "x": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}\n", id="deep argument"),
    pytest.param(b"x" * (MAX_REQUEST + 1), id="a line past the limit"),
])
def test_a_malformed_request_gets_einval_and_the_daemon_serves_on(control: str, data: bytes) -> None:
    [reply] = exchange(control, data)
    assert (reply["ok"], reply["errno"]) == (False, errno.EINVAL)
    assert status_ok(control)


def test_a_request_line_that_never_ends_times_out(control: str) -> None:
    """Part of a line and then nothing: the daemon stops waiting and says so (ETIMEDOUT),
    and serves others meanwhile."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(WAIT_FOR_LINE + DEADLINE)
        slow.connect(control)
        slow.sendall(b'{"cmd": "status"')
        assert status_ok(control)
        reply = json.loads(slow.makefile("rb").readline())
    assert (reply["ok"], reply["errno"]) == (False, errno.ETIMEDOUT)
    assert status_ok(control)


def test_a_client_sending_on_past_the_limit_is_cut_off(control: str) -> None:
    """The daemon stops reading past MAX_REQUEST and closes: the sender's next write fails."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(control)
        with pytest.raises(ConnectionError):
            sock.sendall(b"x" * (4 * MAX_REQUEST))
    assert status_ok(control)


def test_only_the_first_line_is_a_request(control: str) -> None:
    replies = exchange(control, b'{"cmd": "status"}\n{"cmd": "reboot"}\ngarbage\n')
    assert [r["ok"] for r in replies] == [True]
