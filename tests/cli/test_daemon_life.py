"""How a mounted daemon ends: by signal or by `klpfs umount`, promptly and cleanly whatever
clients it has; and what its clients say once it is gone."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, wait_until

from klpfs.control.runtime import find_daemon, record_path, socket_path


def klpfs(m: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], capture_output=True, text=True,
                          timeout=DEADLINE)


def left_behind(m: Mount) -> list[bool]:
    return [record_path(m.path).exists(), socket_path(m.path).exists()]


def exited(m: Mount) -> int:
    """The daemon's exit status, waiting for it with a deadline."""
    assert m.proc is not None
    return m.proc.wait(timeout=DEADLINE)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT])
def test_stop_signals_unmount_and_clean_up(mount_klpfs, signum: signal.Signals) -> None:
    m = mount_klpfs()
    assert left_behind(m) == [True, True]
    assert m.proc is not None
    m.proc.send_signal(signum)
    assert exited(m) == 0
    assert not m.mounted()
    assert left_behind(m) == [False, False]
    assert f"INFO klpfs.fs.mount: {signum.name}: unmounting\n" in m.log()


def test_sigusr1_logs_the_task_tree(mount_klpfs) -> None:
    m = mount_klpfs()
    assert m.proc is not None
    m.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "klpfs.control.server.serve_control at " in m.log(), "the task tree in the log")
    log = m.log()
    assert "WARNING klpfs.fs.mount: SIGUSR1: trio tasks:\n<init>" in log
    assert "\n      klpfs.control.server.serve_control at " in log
    assert klpfs(m, "lsmod").returncode == 0


@pytest.mark.parametrize("reaped", [False, True])
def test_after_sigkill_the_next_command_says_the_daemon_is_gone(mount_klpfs, reaped: bool) -> None:
    m = mount_klpfs()
    assert m.proc is not None
    m.proc.kill()
    if reaped:
        m.proc.wait(timeout=DEADLINE)
    else:  # a zombie, as the daemon of `klpfs mount` stays until init reaps it
        wait_until(lambda: Path(f"/proc/{m.proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
                   "the daemon to be a zombie")
    assert left_behind(m) == [True, True]
    run = klpfs(m, "lsmod")
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", f"klpfs lsmod: no klpfs daemon is serving {m.path} (it exited)\n")
    assert left_behind(m) == [False, False]
    again = klpfs(m, "lsmod")
    assert again.stderr == f"klpfs lsmod: no klpfs daemon is serving {m.path} (start one with: klpfs mount {m.path})\n"


def test_umount_ends_the_daemon_whatever_its_clients(mount_klpfs) -> None:
    m = mount_klpfs()
    follower = subprocess.Popen([*KLPFS, "dmesg", "-m", str(m.path), "-w"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    idle = socket.socket(socket.AF_UNIX)
    try:
        (m.path / "dev/kmsg").write_text("marker\n")
        assert follower.stdout is not None and follower.stdout.readline().endswith("] marker\n")
        idle.connect(find_daemon(str(m.path)).socket)
        idle.sendall(b'{"cmd": "ps"')  # and no newline
        umount = subprocess.run([*KLPFS, "umount", str(m.path)], capture_output=True, text=True, timeout=DEADLINE)
        assert (umount.returncode, umount.stderr) == (0, "")
        assert exited(m) == 0
        assert left_behind(m) == [False, False]
        assert idle.recv(4096) == b""  # closed as the daemon stopped, not answered
        assert follower.wait(timeout=DEADLINE) == 1
        assert follower.stderr is not None
        assert follower.stderr.read() == f"klpfs dmesg: the klpfs daemon serving {m.path} went away\n"
    finally:
        idle.close()
        follower.kill()
        follower.wait()
