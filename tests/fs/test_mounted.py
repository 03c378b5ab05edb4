"""The generic sysfs rules through a real FUSE mount, with real syscalls and shells.

The tree is fakefs.py's.  Shell messages are Debian's: dash (sh) reports
every failed write as "I/O error" but names the errno of a failed open;
bash names the errno of both.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fusemount import Mount, wait_until


def os_errno(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def write(mount: Mount, name: str, data: bytes) -> int:
    fd = os.open(mount / name, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def ls_l(mount: Mount, directory: str = ".") -> dict[str, list[str]]:
    """Name -> the other columns of `ls -l` (mode, links, owner, group, size)."""
    lines = mount.run(["ls", "-l", directory], check=True).stdout.splitlines()[1:]
    return {line.split()[-1]: line.split()[:5] for line in lines}


def test_ls_shows_sysfs_modes_owners_and_sizes(fakefs: Mount) -> None:
    listing = ls_l(fakefs)
    assert listing["rw"] == ["-rw-r--r--", "1", "root", "root", "4096"]
    assert listing["ro"] == ["-r--r--r--", "1", "root", "root", "4096"]
    assert listing["wo"] == ["--w-------", "1", "root", "root", "4096"]
    assert listing["dir"] == ["drwxr-xr-x", "4", "root", "root", "0"]
    assert ls_l(fakefs, "dir") == {"a": ["drwxr-xr-x", "2", "root", "root", "0"],
                                   "b": ["drwxr-xr-x", "2", "root", "root", "0"],
                                   "f": ["-r--r--r--", "1", "root", "root", "4096"]}
    assert fakefs.run(["stat", "-c", "%a %s %h %u:%g %F", "rw", "dir"]).stdout.splitlines() == [
        "644 4096 1 0:0 regular file", "755 0 4 0:0 directory"]
    assert fakefs.run(["ls", "-a", "dir"]).stdout.split() == [".", "..", "a", "b", "f"]


def test_reads_are_exact(fakefs: Mount) -> None:
    assert read(fakefs / "rw") == b"1\n"
    assert read(fakefs / "ro") == b"ro\n"
    assert read(fakefs / "long") == b"x" * 4095
    assert fakefs.run(["cat", "rw", "dir/f"]).stdout == "1\nf\n"
    fd = os.open(fakefs / "ro", os.O_RDONLY)
    try:
        assert os.read(fd, 1) == b"r"
        assert os.read(fd, 100) == b"o\n"
        assert os.read(fd, 100) == b""
        assert os.pread(fd, 100, 1) == b"o\n"
    finally:
        os.close(fd)


def test_a_write_is_read_back_at_once(fakefs: Mount) -> None:
    assert fakefs.sh("echo 0 > rw").returncode == 0
    assert read(fakefs / "rw") == b"0\n"
    assert write(fakefs, "rw", b"1\n") == 2
    assert read(fakefs / "rw") == b"1\n"


@pytest.mark.parametrize(("name", "code", "message"), [
    ("rw", errno.EINVAL, "Invalid argument"),
    ("einval", errno.EINVAL, "Invalid argument"),
    ("ebusy", errno.EBUSY, "Device or resource busy"),
])
def test_store_errors_reach_the_writer(fakefs: Mount, name: str, code: int,
                                       message: str) -> None:
    assert os_errno(write, fakefs, name, b"2\n") == code
    result = fakefs.bash(f"echo 2 > {name}")
    assert (result.returncode, result.stderr) == (
        1, f"bash: line 1: echo: write error: {message}\n")
    result = fakefs.sh(f"echo 2 > {name}")
    assert (result.returncode, result.stderr) == (1, "sh: 1: echo: echo: I/O error\n")


@pytest.mark.parametrize(("name", "flags"), [
    ("ro", os.O_WRONLY), ("ro", os.O_RDWR), ("wo", os.O_RDONLY), ("wo", os.O_RDWR),
])
def test_root_cannot_open_against_the_mode(fakefs: Mount, name: str, flags: int) -> None:
    assert os.geteuid() == 0
    assert os_errno(os.open, fakefs / name, flags) == errno.EACCES


def test_shells_report_eacces_on_open(fakefs: Mount) -> None:
    result = fakefs.sh("echo 1 > ro")
    assert (result.returncode, result.stderr) == (2, "sh: 1: cannot create ro: Permission denied\n")
    result = fakefs.run(["cat", "wo"])
    assert (result.returncode, result.stderr) == (1, "cat: wo: Permission denied\n")


def test_non_root_gets_the_kernels_permission_checks(fakefs: Mount) -> None:
    assert fakefs.run(["cat", "rw", "ro"], user="nobody").stdout == "1\nro\n"
    result = fakefs.sh("echo 0 > rw", user="nobody")
    assert (result.returncode, result.stderr) == (2, "sh: 1: cannot create rw: Permission denied\n")
    result = fakefs.run(["cat", "wo"], user="nobody")
    assert (result.returncode, result.stderr) == (1, "cat: wo: Permission denied\n")
    assert fakefs.run(["ls", "dir"], user="nobody").stdout.split() == ["a", "b", "f"]
    assert read(fakefs / "rw") == b"1\n"


def test_stale_handles_answer_enodev(fakefs: Mount) -> None:
    reader = os.open(fakefs / "ro", os.O_RDONLY)
    writer = os.open(fakefs / "rw", os.O_RDWR)
    try:
        assert os.read(reader, 100) == b"ro\n"
        assert write(fakefs, "ctl/remove", b"ro rw") == 5
        assert os_errno(os.read, reader, 100) == errno.ENODEV
        assert os_errno(os.pread, reader, 100, 0) == errno.ENODEV
        assert os_errno(os.write, writer, b"0\n") == errno.ENODEV
        assert os_errno(os.read, writer, 100) == errno.ENODEV
        assert os.fstat(reader).st_mode == 0o100444
    finally:
        os.close(reader)
        os.close(writer)


def test_removed_nodes_are_gone_at_once(fakefs: Mount) -> None:
    before = os.stat(fakefs / "dir/a")
    assert read(fakefs / "dir/f") == b"f\n"
    assert write(fakefs, "ctl/remove", b"dir/a dir/f") == 11
    assert os_errno(os.stat, fakefs / "dir/a") == errno.ENOENT
    assert os_errno(os.open, fakefs / "dir/f", os.O_RDONLY) == errno.ENOENT
    assert os.stat(fakefs / "dir").st_nlink == 3
    assert sorted(os.listdir(fakefs / "dir")) == ["b"]
    result = fakefs.sh("echo 1 > dir/a/x")
    assert (result.returncode, result.stderr) == (
        2, "sh: 1: cannot create dir/a/x: Directory nonexistent\n")
    assert write(fakefs, "ctl/mkdir", b"dir/a") == 5
    after = os.stat(fakefs / "dir/a")
    assert after.st_ino != before.st_ino
    assert os.stat(fakefs / "dir").st_nlink == 4


def test_a_background_removal_is_gone_once_a_read_shows_it(fakefs: Mount) -> None:
    """Whatever a read reveals already holds for the dentry cache: no stale stat."""
    os.stat(fakefs / "dir/a")
    os.stat(fakefs / "dir/b")
    assert write(fakefs, "ctl/remove_later", b"dir/a dir/b") == 11
    wait_until(lambda: read(fakefs / "ctl/removals") == b"2\n", "the background removal")
    assert os_errno(os.stat, fakefs / "dir/a") == errno.ENOENT
    assert os_errno(os.stat, fakefs / "dir/b") == errno.ENOENT


def test_a_background_change_is_read_at_once_even_on_an_open_file(fakefs: Mount) -> None:
    fd = os.open(fakefs / "ctl/removals", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"0\n"
        assert write(fakefs, "ctl/remove_later", b"dir/a") == 5
        # Not by reading the file again: a new open would drop its page cache.
        wait_until(lambda: not os.path.exists(fakefs / "dir/a"), "the background removal")
        assert os.pread(fd, 100, 0) == b"1\n"
    finally:
        os.close(fd)
    assert os.stat(fakefs / "ctl/removals").st_size == 4096


def test_write_sizes(fakefs: Mount) -> None:
    fd = os.open(fakefs / "wo", os.O_WRONLY)
    try:
        assert os.write(fd, b"") == 0
        assert read(fakefs / "wo_seen") == b"0 0\n"
        assert os.write(fd, b"y" * 5000) == 4096
        assert read(fakefs / "wo_seen") == b"1 4096\n"
    finally:
        os.close(fd)
    assert fakefs.sh("echo hello > wo").returncode == 0
    assert read(fakefs / "wo_seen") == b"2 6\n"


def test_a_bug_in_a_callback_is_eio_and_the_mount_stays_up(fakefs: Mount) -> None:
    fakefs.errors_expected = True
    assert os_errno(read, fakefs / "raises") == errno.EIO
    assert os_errno(write, fakefs, "raises", b"1\n") == errno.EIO
    result = fakefs.bash("echo 1 > raises")
    assert result.stderr == "bash: line 1: echo: write error: Input/output error\n"
    assert read(fakefs / "ro") == b"ro\n"
    assert "RuntimeError: a bug in a callback" in fakefs.log()


def test_listing_survives_removals_between_reads(fakefs: Mount) -> None:
    assert write(fakefs, "ctl/mkdir", b"dir/many") == 8
    assert write(fakefs, "ctl/mkfiles", b"dir/many 3000") == 13
    names = [f"f{i:04d}" for i in range(3000)]
    with os.scandir(fakefs / "dir/many") as entries:
        seen = [next(entries).name]
        # These are listed already; offsets must not shift under the rest.
        assert write(fakefs, "ctl/remove", " ".join(
            f"dir/many/{name}" for name in names[:250]).encode()) > 0
        seen += [entry.name for entry in entries]
    assert len(seen) == len(set(seen))
    assert set(names[250:]) <= set(seen)
    assert sorted(os.listdir(fakefs / "dir/many")) == names[250:]


def test_metadata_changes_behave_like_sysfs(fakefs: Mount) -> None:
    assert fakefs.run(["truncate", "-s", "0", "rw"]).returncode == 0
    assert os.stat(fakefs / "rw").st_size == 4096
    assert fakefs.run(["touch", "-d", "2001-01-01", "ro"]).returncode == 0
    assert os.stat(fakefs / "ro").st_mtime == 978307200
    assert fakefs.run(["chmod", "600", "rw"]).returncode == 0
    assert ls_l(fakefs)["rw"][0] == "-rw-------"
    assert fakefs.run(["cat", "rw"], user="nobody").returncode == 1
    assert fakefs.run(["chmod", "444", "wo"]).returncode == 0
    assert os_errno(os.open, fakefs / "wo", os.O_WRONLY) == errno.EACCES


@pytest.mark.parametrize(("argv", "stderr"), [
    (["mkdir", "new"], "mkdir: cannot create directory ‘new’: Operation not permitted\n"),
    (["rm", "-f", "rw"], "rm: cannot remove 'rw': Operation not permitted\n"),
    (["rmdir", "dir/a"], "rmdir: failed to remove 'dir/a': Operation not permitted\n"),
    (["mv", "rw", "rw2"], "mv: cannot move 'rw' to 'rw2': Operation not permitted\n"),
    (["ln", "-s", "rw", "link"],
     "ln: failed to create symbolic link 'link': Operation not permitted\n"),
    (["sh", "-c", "echo 1 > new"], "sh: 1: cannot create new: Permission denied\n"),
])
def test_nothing_can_be_created_or_removed(fakefs: Mount, argv: list[str], stderr: str) -> None:
    result = fakefs.run(argv)
    assert (result.returncode != 0, result.stderr) == (True, stderr)


def test_statfs(fakefs: Mount) -> None:
    st = os.statvfs(fakefs.path)
    assert (st.f_bsize, st.f_frsize, st.f_blocks, st.f_files, st.f_namemax) == (
        4096, 4096, 0, 0, 255)
