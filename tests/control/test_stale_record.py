"""A daemon killed without cleaning up (SIGKILL) leaves its record and socket: the next
client recognises the daemon as gone, says so, and removes them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusemount import wait_until

from klpfs.control.client import request
from klpfs.control.runtime import (DaemonRecord, NoDaemon, find_daemon, forget, make_runtime_dir, record_path,
                                   running_daemons, socket_path)

MNT = "/srv/klp"


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KLPFS_RUNTIME_DIR", str(tmp_path / "run"))
    return make_runtime_dir()


def leave_record(pid: int, mountpoint: str = MNT) -> DaemonRecord:
    """What a daemon of pid wrote before it was killed: its record and its socket file."""
    record = DaemonRecord(mountpoint, pid, "4.15", str(socket_path(mountpoint)), os.readlink("/proc/self/ns/pid"))
    record_path(mountpoint).write_text(json.dumps(record.__dict__))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(record.socket)  # never listens again: connecting is refused
    return record


def left_behind(mountpoint: str = MNT) -> list[bool]:
    return [record_path(mountpoint).exists(), socket_path(mountpoint).exists()]


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def zombie_pid() -> Iterator[int]:
    """A child that exited and is not reaped yet, as a daemon whose init is slow to reap."""
    child = subprocess.Popen(["true"])
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
               "the child to be a zombie")
    yield child.pid
    child.wait()


GONE = f"no klpfs daemon is serving {MNT} (it exited)"


def test_a_dead_daemon_is_gone(dead_pid: int) -> None:
    leave_record(dead_pid)
    with pytest.raises(NoDaemon) as refusal:
        request(MNT, "ps")
    assert str(refusal.value) == GONE
    assert left_behind() == [False, False]


def test_a_zombie_daemon_is_gone(zombie_pid: int) -> None:
    leave_record(zombie_pid)
    assert running_daemons() == []
    with pytest.raises(NoDaemon) as refusal:
        request(MNT, "ps")
    assert str(refusal.value) == GONE
    assert left_behind() == [False, False]


def test_a_refused_connection_is_a_gone_daemon() -> None:
    leave_record(os.getpid())  # a live process: the pid was reused
    with pytest.raises(NoDaemon) as refusal:
        request(MNT, "ps")
    assert str(refusal.value) == GONE
    assert left_behind() == [False, False]


def test_a_missing_socket_is_a_gone_daemon() -> None:
    leave_record(os.getpid())
    socket_path(MNT).unlink()
    with pytest.raises(NoDaemon) as refusal:
        request(MNT, "ps")
    assert str(refusal.value) == GONE
    assert left_behind() == [False, False]


def test_the_only_record_gone_when_none_is_named(dead_pid: int) -> None:
    leave_record(dead_pid)
    with pytest.raises(NoDaemon) as refusal:
        find_daemon(None)
    assert str(refusal.value) == GONE
    assert left_behind() == [False, False]
    with pytest.raises(NoDaemon) as again:
        find_daemon(None)
    assert str(again.value) == "no klpfs daemon is running (start one with: klpfs mount MNT)"


def test_a_record_rewritten_by_a_new_daemon_is_kept(dead_pid: int) -> None:
    old = leave_record(dead_pid)
    socket_path(MNT).unlink()
    new = leave_record(os.getpid())
    forget(old)
    assert left_behind() == [True, True]
    assert find_daemon(MNT) == new


def test_a_record_of_another_user_is_left_alone(dead_pid: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    leave_record(dead_pid)
    os.chown(record_path(MNT), 65534, 65534)
    with pytest.raises(NoDaemon) as refusal:
        find_daemon(MNT)
    assert str(refusal.value) == GONE
    assert left_behind() == [True, True]
