"""The control boundary: every request field checked against the operation's annotations,
malformed JSON and slow clients answered with the right errno, over a real Unix socket
served in-process under the mock clock."""

from __future__ import annotations

import errno
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from klpfs.control import server
from klpfs.control.arguments import UncheckableParameter, describe, parameter_types
from klpfs.control.ops import COMMANDS, Control
from klpfs.control.runtime import record_path, socket_path
from klpfs.system import System


def einval(message: str) -> dict:
    return {"ok": False, "errno": errno.EINVAL, "error": message}


async def handle(system: System, cmd: object, **args: object) -> dict:
    return await Control(system).handle({"cmd": cmd, **args})


def test_every_command_has_checkable_annotations() -> None:
    for cmd in COMMANDS:
        parameter_types(getattr(Control, cmd))


def test_an_annotation_the_boundary_cannot_check_is_refused() -> None:
    class Loose:
        def op(self, value: object) -> None: ...

        def bare(self, value) -> None: ...  # type: ignore[no-untyped-def]

    with pytest.raises(UncheckableParameter, match="cannot check a request field against <class 'object'>"):
        parameter_types(Loose.op)
    with pytest.raises(UncheckableParameter, match="Loose.bare: parameter value has no annotation"):
        parameter_types(Loose.bare)
    assert describe(dict[str, list[int]] | None) == "dict[str, list[int]] or null"


@pytest.mark.parametrize(("cmd", "args", "message"), [
    ("task_add", {"comm": ["a"], "kind": "user", "ppid": None}, "comm must be str"),
    ("task_add", {"comm": "a", "kind": "user", "ppid": True}, "ppid must be int or null"),
    ("task_add", {"comm": "a", "kind": {"k": 1}, "ppid": None}, "kind must be str"),
    ("task_wake", {"pid": True}, "pid must be int"),
    ("task_exit", {"pid": "1"}, "pid must be int"),
    ("task_run", {"pid": 1.0}, "pid must be int"),
    ("task_sleep", {"pid": 1, "func": "f", "seconds": True, "interruptible": False},
     "seconds must be float or null"),
    ("task_sleep", {"pid": 1, "func": "f", "seconds": None, "interruptible": 0}, "interruptible must be bool"),
    ("call", {"func": {"name": "f"}, "pid": None}, "func must be str"),
    ("rmmod", {"name": "m", "flags": False}, "flags must be int"),
    ("debug", {"enable": 1}, "enable must be bool or null"),
    ("dmesg", {"follow": "yes"}, "follow must be bool"),
    ("insmod", {"path": "m.toml", "params": {"a": "1"}}, "params must be list[str] or null"),
    ("insmod", {"path": "m.toml", "params": ["a=1", 2]}, "params must be list[str] or null"),
    ("insmod", {"path": "m.ko", "data": 7}, "data must be bytes, str or null"),
    ("insmod", {"path": "m.ko", "data": "", "behaviour": {"path": ["x"]}},
     "behaviour must be dict[str, str] or null"),
])
async def test_a_field_of_the_wrong_type_is_einval(system: System, autojump_clock: trio.testing.MockClock,
                                                   cmd: str, args: dict, message: str) -> None:
    before = [t.comm for t in system.kernel.sched.tasks.values()]
    assert await handle(system, cmd, **args) == einval(f"bad arguments for {cmd}: {message}")
    assert [t.comm for t in system.kernel.sched.tasks.values()] == before


async def test_a_list_comm_leaves_ps_working(system: System, autojump_clock: trio.testing.MockClock) -> None:
    await handle(system, "task_add", comm=["a"], kind="user", ppid=None)
    tasks = (await handle(system, "ps"))["tasks"]
    assert all(isinstance(t["comm"], str) for t in tasks)
    assert "a" not in [t["comm"] for t in tasks]


async def test_an_int_is_a_float_and_null_is_taken_where_optional(
        system: System, autojump_clock: trio.testing.MockClock) -> None:
    pid = (await handle(system, "task_add", comm="w", kind="kthread", ppid=None))["task"]["pid"]
    slept = await handle(system, "task_sleep", pid=pid, func="cmdline_proc_show", seconds=3,
                         interruptible=False)
    assert slept["task"]["where"] == "cmdline_proc_show"
    assert (await handle(system, "debug", enable=None))["ok"] is True


@pytest.mark.parametrize("cmd", [["ps"], {"ps": 1}, 7, None])
async def test_a_command_that_is_no_name_is_unknown(system: System, autojump_clock: trio.testing.MockClock,
                                                    cmd: object) -> None:
    assert await handle(system, cmd) == einval(f"unknown command {cmd!r}")


# -- over the socket -----------------------------------------------------------------------------


@pytest.fixture
async def control_socket(system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """serve_control for a made-up mountpoint, its runtime directory in tmp_path."""
    monkeypatch.setenv("KLPFS_RUNTIME_DIR", str(tmp_path / "run"))
    mountpoint = tmp_path / "mnt"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_control, system, mountpoint)
        assert record_path(mountpoint).exists()
        yield socket_path(mountpoint)
        nursery.cancel_scope.cancel()
    assert not record_path(mountpoint).exists() and not socket_path(mountpoint).exists()


async def exchange(path: Path, data: bytes) -> list[dict]:
    """Send data, then read every reply line until the daemon closes the connection."""
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def line(request: dict) -> bytes:
    return json.dumps(request).encode() + b"\n"


async def test_type_confusion_over_the_socket(control_socket: Path, autojump_clock: trio.testing.MockClock) -> None:
    assert await exchange(control_socket, line({"cmd": "task_add", "comm": ["a"], "kind": "user", "ppid": None})) == [
        einval("bad arguments for task_add: comm must be str")]
    assert await exchange(control_socket, line({"cmd": "dmesg", "follow": 1})) == [
        einval("bad arguments for dmesg: follow must be bool")]
    (reply,) = await exchange(control_socket, line({"cmd": "ps"}))
    assert reply["ok"] is True


@pytest.mark.parametrize(("data", "message"), [
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "malformed request: nested too deeply"),
    (b'{"cmd": "ps", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "malformed request: nested too deeply"),
    (b"[1]\n", "malformed request: not a JSON object"),
    (b'{"cmd": "task_sleep", "pid": 1, "func": "f", "seconds": NaN, "interruptible": false}\n',
     "malformed request: NaN is not JSON"),
    (b'{"cmd": "ps"\n', "malformed request: Expecting ',' delimiter: line 1 column 13 (char 12)"),
    (b"\xff\n", "malformed request: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
])
async def test_malformed_json_is_einval_and_the_daemon_goes_on(
        control_socket: Path, autojump_clock: trio.testing.MockClock, data: bytes, message: str) -> None:
    assert await exchange(control_socket, data) == [einval(message)]
    (reply,) = await exchange(control_socket, line({"cmd": "status"}))
    assert reply["ok"] is True


async def test_a_request_cut_short_by_the_client_is_einval(
        control_socket: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with await trio.open_unix_socket(str(control_socket)) as stream:
        await stream.send_all(b'{"cmd": "ps"}')
        await stream.send_eof()
        assert json.loads(await stream.receive_some()) == einval(
            "malformed request: the connection ended before a whole line")


async def test_a_request_without_newline_times_out(control_socket: Path, autojump_clock: trio.testing.MockClock,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "REQUEST_DEADLINE", 0.5)
    assert await exchange(control_socket, b'{"cmd": "ps"}') == [
        {"ok": False, "errno": errno.ETIMEDOUT, "error": "no whole request line within 0.5 seconds"}]
    (reply,) = await exchange(control_socket, line({"cmd": "status"}))
    assert reply["ok"] is True


async def test_a_follower_outlives_the_request_deadline(
        system: System, control_socket: Path, autojump_clock: trio.testing.MockClock) -> None:
    system.kernel.log.printk(6, "before")
    async with await trio.open_unix_socket(str(control_socket)) as stream:
        await stream.send_all(line({"cmd": "dmesg", "follow": True}))
        replies = stream_lines(stream)
        assert (await anext(replies))["text"] == "before"
        await trio.sleep(server.REQUEST_DEADLINE * 3)
        system.kernel.log.printk(6, "after")
        assert (await anext(replies))["text"] == "after"


async def stream_lines(stream: trio.SocketStream) -> AsyncIterator[dict]:
    buffered = b""
    while True:
        while b"\n" not in buffered:
            chunk = await stream.receive_some()
            assert chunk, "the follow stream ended"
            buffered += chunk
        first, buffered = buffered.split(b"\n", 1)
        yield json.loads(first)
