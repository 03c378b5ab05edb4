"""Signals to a mounted daemon with a patch loaded, a `klpfs dmesg -w` following
its log, a directory held open and a process whose working directory is in the
mount: SIGTERM, SIGHUP, SIGINT and SIGQUIT unmount and clean the runtime
directory; after SIGKILL the next control command reports the daemon gone (and
forgets its record), a reader blocked in the mount is released, and the
mountpoint takes a new mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, is_klpfs_mount, wait_until

from klpfs.control.runtime import find_daemon, record_path, socket_path

BLOCKED_READ = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "os.lseek(fd, 0, os.SEEK_END); os.read(fd, 8192)")
"""Read /dev/kmsg past its last record: the read waits in the daemon for the next one."""
LIVEPATCH_SAMPLE = "sys/kernel/livepatch/livepatch_sample"


def klpfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, *args], capture_output=True, text=True, timeout=DEADLINE)


@contextmanager
def users(mount: Mount) -> Iterator[subprocess.Popen[str]]:
    """A log follower (returned), an open directory and a process living in the mount."""
    assert klpfs("insmod", "-m", str(mount.path), "livepatch-sample").returncode == 0
    follower = subprocess.Popen([*KLPFS, "dmesg", "-w", "-m", str(mount.path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert follower.stdout is not None
    assert follower.stdout.readline().endswith("] livepatch_sample: tainting kernel with TAINT_LIVEPATCH\n")
    directory = os.open(mount.path / "sys/kernel/livepatch", os.O_RDONLY)
    inside = subprocess.Popen(["sleep", "600"], cwd=mount.path)
    try:
        yield follower
    finally:
        inside.kill()
        inside.wait()
        os.close(directory)
        follower.kill()
        follower.wait()


def went_away(follower: subprocess.Popen[str], mount: Mount) -> None:
    """The follower ends on its own, saying why."""
    _, err = follower.communicate(timeout=DEADLINE)
    assert (follower.returncode, err) == (1, f"klpfs dmesg: the klpfs daemon serving {mount.path} went away\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT],
                         ids=lambda s: s.name)
def test_a_stop_signal_unmounts_and_cleans_up(mount_klpfs: Callable[..., Mount], signum: signal.Signals) -> None:
    mount = mount_klpfs()
    assert mount.proc is not None and find_daemon(str(mount.path)).pid == mount.proc.pid
    with users(mount) as follower:
        mount.proc.send_signal(signum)
        assert mount.proc.wait(DEADLINE) == 0
        assert not is_klpfs_mount(mount.path)
        assert not record_path(mount.path).exists() and not socket_path(mount.path).exists()
        went_away(follower, mount)
    assert f"{signum.name}: unmounting" in mount.log()


def test_after_sigkill_the_daemon_is_gone_and_the_mountpoint_takes_a_new_mount(
        mount_klpfs: Callable[..., Mount]) -> None:
    mount = mount_klpfs()
    assert mount.proc is not None
    path = str(mount.path)
    with users(mount) as follower:
        # Once the transition is over nothing logs: the reader waits until the daemon dies.
        wait_until(lambda: (mount.path / LIVEPATCH_SAMPLE / "transition").read_text() == "0\n", "the transition")
        reader = subprocess.Popen([sys.executable, "-c", BLOCKED_READ, str(mount.path / "dev/kmsg")],
                                  stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "fuse_file_read_iter" in Path(f"/proc/{reader.pid}/stack").read_text(),
                   "the reader to wait inside the mount")
        mount.proc.send_signal(signal.SIGKILL)
        assert mount.proc.wait(DEADLINE) == -signal.SIGKILL
        _, err = reader.communicate(timeout=DEADLINE)
        assert err.endswith("ConnectionAbortedError: [Errno 103] Software caused connection abort\n")
        went_away(follower, mount)
        # Nobody removed the record: the next command finds its daemon dead, says so and forgets it.
        assert record_path(path).exists() and socket_path(path).exists()
        gone = klpfs("lsmod", "-m", path)
        assert (gone.returncode, gone.stderr) == (1, f"klpfs lsmod: no klpfs daemon is serving {path} (it exited)\n")
        assert not record_path(path).exists() and not socket_path(path).exists()
    # auto_unmount: fusermount3 drops the mount once the daemon's /dev/fuse is closed.
    wait_until(lambda: not is_klpfs_mount(path), "the dead daemon's mount to go")
    assert klpfs("umount", path).stderr == f"klpfs: {path} is not mounted\n"
    assert klpfs("mount", path).returncode == 0
    try:
        assert klpfs("lsmod", "-m", path).stdout == "Module                  Size  Used by\n"
        assert os.listdir(mount.path / "sys/kernel/livepatch") == []
    finally:
        assert klpfs("umount", path).returncode == 0
        wait_until(lambda: not is_klpfs_mount(path) and not record_path(path).exists(), "the new daemon to stop")
