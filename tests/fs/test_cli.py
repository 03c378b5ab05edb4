"""``klpfs mount`` and ``klpfs umount`` as a user runs them: real processes, real mounts."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from klpfs.profiles import PROFILES

from fusemount import (DEADLINE, KLPFS, Mount, is_klpfs_mount, make_mountpoint, require_fuse,
                       wait_until)


def klpfs(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI; a background mount must return without holding our pipes."""
    return subprocess.run([*KLPFS, *args], capture_output=True, text=True, timeout=DEADLINE)


def daemons(mountpoint: Path) -> list[int]:
    """Live processes whose command line names the mountpoint (daemons, fusermount3)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and str(mountpoint).encode() in argv:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    """A fresh directory; at teardown nothing is mounted there and no daemon serves it."""
    require_fuse()
    path = make_mountpoint()
    try:
        yield path
    finally:
        for pid in daemons(path):
            os.kill(pid, signal.SIGKILL)
        if is_klpfs_mount(path):
            subprocess.run(["fusermount3", "-uz", str(path)], check=False)
        wait_until(lambda: not is_klpfs_mount(path), f"{path} to be unmounted")
        path.rmdir()


def test_background_mount_then_umount(mountpoint: Path) -> None:
    result = klpfs("mount", str(mountpoint))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert is_klpfs_mount(mountpoint)
    assert sorted(os.listdir(mountpoint)) == ["dev", "proc", "sys"]
    assert os.path.isdir(mountpoint / "sys/kernel/livepatch")
    assert daemons(mountpoint)
    result = klpfs("umount", str(mountpoint))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not is_klpfs_mount(mountpoint)
    wait_until(lambda: not daemons(mountpoint), "the daemon to exit")


def test_background_daemon_logs_where_asked(mountpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "klpfs.log"
    assert klpfs("mount", "-o", f"log={log}", str(mountpoint)).returncode == 0
    assert klpfs("umount", str(mountpoint)).returncode == 0
    wait_until(lambda: "unmounted" in log.read_text(), "the daemon to log its unmount")
    assert f"mounted on {mountpoint}" in log.read_text()


def test_the_kernel_profile_is_checked(mountpoint: Path) -> None:
    result = klpfs("mount", "--kernel", "5.0", str(mountpoint))
    assert result.returncode == 2
    choices = ", ".join([*PROFILES, "latest", "host"])
    assert result.stderr.splitlines()[-1] == ("klpfs mount: error: argument --kernel: unknown "
                                              f"kernel version '5.0' (choose from {choices})")
    assert not is_klpfs_mount(mountpoint)


@pytest.mark.parametrize("kernel", [*PROFILES, "latest"])
def test_each_kernel_profile_mounts(mountpoint: Path, kernel: str) -> None:
    assert klpfs("mount", "--kernel", kernel, str(mountpoint)).returncode == 0
    assert klpfs("umount", str(mountpoint)).returncode == 0


def test_mountpoint_errors(mountpoint: Path, fakefs: Mount, tmp_path: Path) -> None:
    missing = mountpoint.parent / (mountpoint.name + "-missing")
    a_file = tmp_path / "file"
    a_file.write_text("")
    for path, reason in ((missing, "No such file or directory"), (a_file, "Not a directory"),
                         (fakefs.path, "already a mountpoint (fuse.klpfs)")):
        for args in (["mount"], ["mount", "-f"]):
            result = klpfs(*args, str(path))
            assert (result.returncode, result.stderr) == (
                1, f"klpfs: cannot mount on {path}: {reason}\n")


def test_a_missing_fuse_device_is_named(mountpoint: Path) -> None:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode:
        pytest.skip("needs mount namespaces (unshare -m)")
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev && exec "$@"', "sh",
         *KLPFS, "mount", str(mountpoint)],
        capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert (result.returncode, result.stderr) == (
        1, "klpfs: /dev/fuse does not exist (load the fuse module, or give a container the "
           "device)\n")


def test_a_libfuse_refusal_reaches_the_terminal(mountpoint: Path) -> None:
    result = klpfs("mount", "-o", "no_such_option", str(mountpoint))
    assert result.returncode == 1
    assert "no_such_option" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"klpfs: cannot mount on {mountpoint}: fuse_session_new() failed")
    assert not is_klpfs_mount(mountpoint)


def test_umount_refuses_what_is_not_klpfs(mountpoint: Path) -> None:
    result = klpfs("umount", str(mountpoint))
    assert (result.returncode, result.stderr) == (1, f"klpfs: {mountpoint} is not mounted\n")
    result = klpfs("umount", "/proc")
    assert (result.returncode, result.stderr) == (
        1, "klpfs: /proc is not a klpfs mount (it is proc)\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_cleanly(fakefs: Mount, signum: int) -> None:
    assert fakefs.proc is not None
    fakefs.proc.send_signal(signum)
    assert fakefs.proc.wait(timeout=DEADLINE) == 0
    assert not fakefs.mounted()
    assert f"{signal.Signals(signum).name}: unmounting" in fakefs.log()
    assert "Traceback" not in fakefs.log()


def test_an_external_umount_ends_the_daemon(fakefs: Mount) -> None:
    assert fakefs.proc is not None
    assert klpfs("umount", str(fakefs.path)).returncode == 0
    assert fakefs.proc.wait(timeout=DEADLINE) == 0
    assert "Traceback" not in fakefs.log()


def test_a_killed_daemon_leaves_no_dead_mount(fakefs: Mount) -> None:
    assert fakefs.proc is not None
    fakefs.proc.kill()
    fakefs.proc.wait()
    wait_until(lambda: not fakefs.mounted(), "auto_unmount to remove the mount")
    assert os.listdir(fakefs.path) == []


def test_the_shared_fixture_mounts_the_real_machine(mount_klpfs: Callable[..., Mount]) -> None:
    for kernel in ("4.15", "4.16"):
        mount = mount_klpfs(kernel=kernel)
        assert mount.run(["ls", "-ld", "sys/kernel/livepatch"]).stdout.split()[:4] == [
            "drwxr-xr-x", "2", "root", "root"]
        assert os.listdir(mount / "sys/kernel/livepatch") == []
