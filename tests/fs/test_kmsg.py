"""MNT/dev/kmsg through a real mount: the kernel's /dev/kmsg, driven with real
syscalls, shells, util-linux dmesg and `klpfs run`.

Expected records are built from the log the control socket reports (its
sequence numbers and times), so each comparison is exact.  A blocking read
runs in a thread; the test waits (with a deadline) until /proc shows that
thread inside read(2) before it makes the record that must wake it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, wait_until

from klpfs.control.client import request
from klpfs.kernel.printk import LEVEL_NAMES

SYSCALLS = {"x86_64": {"read": 0, "poll": 7}, "aarch64": {"read": 63, "poll": 73}}
"""Numbers /proc/PID/syscall shows for a task blocked in read(2) or poll(2) (ppoll on arm64)."""
KMSG_SIZE = 1 << 62


@pytest.fixture
def m(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs(kernel="6.1", options=["speed=10"])


def klpfs(m: Mount, *args: str) -> str:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], check=True,
                          capture_output=True, text=True, timeout=DEADLINE).stdout


def records(m: Mount) -> list[dict]:
    return request(str(m.path), "dmesg")["records"]


def ext(record: dict) -> bytes:
    """The record as /dev/kmsg must show it (printable text only)."""
    prio = record["facility"] << 3 | LEVEL_NAMES.index(record["level"])
    return f"{prio},{record['seq']},{round(record['time'] * 1e6)},-;{record['text']}\n".encode()


def by_text(m: Mount, text: str) -> dict:
    (record,) = [r for r in records(m) if r["text"] == text]
    return record


@contextlib.contextmanager
def kmsg_fd(m: Mount, flags: int = os.O_RDONLY | os.O_NONBLOCK) -> Iterator[int]:
    fd = os.open(m / "dev/kmsg", flags)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def fd(m: Mount) -> Iterator[int]:
    with kmsg_fd(m) as fd:
        yield fd


def read_all(fd: int) -> list[bytes]:
    """Records until EAGAIN."""
    out = []
    while True:
        try:
            out.append(os.read(fd, 8192))
        except BlockingIOError:
            return out


def write(m: Mount, data: bytes) -> int:
    wfd = os.open(m / "dev/kmsg", os.O_WRONLY)
    try:
        return os.write(wfd, data)
    finally:
        os.close(wfd)


def in_syscall(task: str, name: str) -> bool:
    """The task (a /proc path) waits in that syscall: /proc/.../syscall starts with its number."""
    numbers = SYSCALLS.get(os.uname().machine)
    if numbers is None:
        pytest.skip(f"syscall numbers for {os.uname().machine} unknown here")
    try:
        return Path(f"{task}/syscall").read_text().split()[:1] == [str(numbers[name])]
    except FileNotFoundError:
        return False


def next_seq(m: Mount) -> int:
    return max((r["seq"] for r in records(m)), default=-1) + 1


# -- the file ----------------------------------------------------------------------


def test_dev_kmsg_is_a_regular_file_with_a_huge_size(m: Mount) -> None:
    assert m.run(["stat", "-c", "%a %F %s %U", "dev/kmsg"]).stdout == f"644 regular file {KMSG_SIZE} root\n"
    assert sorted(os.listdir(m.path)) == ["dev", "proc", "sys"]


def test_nobody_may_read_but_not_write(m: Mount) -> None:
    """crw-r--r-- root, and no dmesg_restrict (the kernel's default)."""
    result = m.sh("echo x > dev/kmsg", user="nobody")
    assert (result.returncode, result.stderr) == (2, "sh: 1: cannot create dev/kmsg: Permission denied\n")
    m.sh("echo from root > dev/kmsg")
    script = ("import os\nfd = os.open('dev/kmsg', os.O_RDONLY | os.O_NONBLOCK)\n"
              "while True:\n    try: print(os.read(fd, 8192))\n    except BlockingIOError: break\n")
    result = m.run([sys.executable, "-c", script], user="nobody")
    assert (result.returncode, result.stdout) == (0, "".join(f"{ext(r)!r}\n" for r in records(m)))


# -- writes ---------------------------------------------------------------------------


def test_echo_is_one_user_record_at_the_default_level(m: Mount, fd: int) -> None:
    assert m.sh('echo "% modprobe x" > dev/kmsg').returncode == 0
    record = by_text(m, "% modprobe x")
    assert (record["facility"], record["level"]) == (1, "warn")
    assert read_all(fd) == [ext(r) for r in records(m)]
    assert ext(record).startswith(b"12,")


def test_a_prefix_gives_level_and_facility(m: Mount, fd: int) -> None:
    os.lseek(fd, 0, os.SEEK_END)
    assert write(m, b"<6>info line\n") == 13
    assert write(m, b"<30>daemon line") == 15
    info, daemon = by_text(m, "info line"), by_text(m, "daemon line")
    assert read_all(fd) == [f"14,{info['seq']},{round(info['time'] * 1e6)},-;info line\n".encode(),
                            f"30,{daemon['seq']},{round(daemon['time'] * 1e6)},-;daemon line\n".encode()]


def test_each_write_is_one_record_and_bytes_are_escaped(m: Mount, fd: int) -> None:
    os.lseek(fd, 0, os.SEEK_END)
    wfd = os.open(m / "dev/kmsg", os.O_WRONLY)
    try:
        assert os.write(wfd, b"a\\b\tc") == 5
        assert os.write(wfd, b"\xffd\n") == 3
        with pytest.raises(OSError) as info:
            os.write(wfd, b"x" * 993)
        assert info.value.errno == errno.EINVAL
        assert os.write(wfd, b"y" * 991 + b"\n") == 992
    finally:
        os.close(wfd)
    got = read_all(fd)
    assert [line.split(b";", 1)[1] for line in got] == [b"a\\x5cb\\x09c\n", b"\\xffd\n", b"y" * 991 + b"\n"]
    assert [r["text"] for r in records(m)][-3:] == ["a\\b\tc", "\\xffd", "y" * 991]


# -- reads ------------------------------------------------------------------------------


def test_one_record_per_read_einval_on_a_short_buffer_eagain_at_the_end(m: Mount, fd: int) -> None:
    os.lseek(fd, 0, os.SEEK_END)
    for text in ("first", "second", "third"):
        m.sh(f"echo {text} > dev/kmsg")
    first, second, third = (ext(by_text(m, t)) for t in ("first", "second", "third"))
    assert os.read(fd, 8192) == first
    with pytest.raises(OSError) as info:
        os.read(fd, len(second) - 1)
    assert info.value.errno == errno.EINVAL
    assert os.read(fd, len(third)) == third  # the too-long record is gone, as in the kernel
    with pytest.raises(BlockingIOError):
        os.read(fd, 8192)


def test_a_blocking_read_waits_for_the_next_kernel_line(m: Mount) -> None:
    with kmsg_fd(m, os.O_RDONLY) as fd:
        os.lseek(fd, 0, os.SEEK_END)
        seq = next_seq(m)
        result: list[bytes] = []
        tid: list[int] = []

        def reader() -> None:
            tid.append(threading.get_native_id())
            result.append(os.read(fd, 8192))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        wait_until(lambda: tid and in_syscall(f"/proc/self/task/{tid[0]}", "read"),
                   "the reader to block in read(2)")
        assert result == []
        klpfs(m, "insmod", "livepatch-sample")
        thread.join(DEADLINE)
        assert not thread.is_alive()
        (first_new,) = [r for r in records(m) if r["seq"] == seq]
        assert (first_new["facility"], first_new["text"]) == (
            0, "livepatch_sample: tainting kernel with TAINT_LIVEPATCH")
        assert result == [ext(first_new)]


def test_poll_says_readable_when_a_record_is_there(m: Mount, fd: int) -> None:
    """devkmsg_poll.  (Between a seek and the next read, a poll may answer
    ready too early: it has no offset to tell which seek it was.)"""
    m.sh("echo old > dev/kmsg")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(0) == [(fd, select.POLLIN)]
    os.lseek(fd, 0, os.SEEK_END)
    with pytest.raises(BlockingIOError):
        os.read(fd, 8192)
    assert poller.poll(0) == []
    ready: list[list[tuple[int, int]]] = []
    tid: list[int] = []

    def waiter() -> None:
        tid.append(threading.get_native_id())
        ready.append(poller.poll(DEADLINE * 1000))

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until(lambda: tid and in_syscall(f"/proc/self/task/{tid[0]}", "poll"), "the poller to block in poll(2)")
    m.sh("echo wake > dev/kmsg")
    thread.join(DEADLINE)
    assert ready == [[(fd, select.POLLIN)]]
    assert os.read(fd, 8192) == ext(by_text(m, "wake"))


def test_a_signal_ends_a_blocked_read(m: Mount) -> None:
    """wait_event_interruptible: Ctrl-C on `cat /dev/kmsg` (or dmesg -w) works."""
    m.sh("echo before > dev/kmsg")
    cat = subprocess.Popen(["cat", str(m / "dev/kmsg")], stdout=subprocess.PIPE)
    try:
        assert cat.stdout is not None
        assert cat.stdout.readline() == ext(by_text(m, "before"))
        wait_until(lambda: in_syscall(f"/proc/{cat.pid}", "read"), "cat to block in read(2)")
        cat.send_signal(signal.SIGINT)
        assert cat.wait(DEADLINE) == -signal.SIGINT
    finally:
        cat.kill()
        cat.wait()


def test_stopping_the_daemon_ends_a_blocked_read(m: Mount) -> None:
    """The FUSE loop waits for every request it took: a read waiting for a
    record must end (as a dead daemon's would) for the daemon to unmount."""
    cat = subprocess.Popen(["cat", str(m / "dev/kmsg")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: in_syscall(f"/proc/{cat.pid}", "read"), "cat to block in read(2)")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(DEADLINE) == 0
        out, err = cat.communicate(timeout=DEADLINE)
        assert (cat.returncode, out) == (1, b"")
        assert err.splitlines()[0] == f"cat: {m / 'dev/kmsg'}: Software caused connection abort".encode()
    finally:
        cat.kill()
        cat.wait()


# -- seeking ---------------------------------------------------------------------------


def test_seek_end_then_only_new_records(m: Mount, fd: int) -> None:
    m.sh("echo old > dev/kmsg")
    assert os.lseek(fd, 0, os.SEEK_END) == KMSG_SIZE
    with pytest.raises(BlockingIOError):
        os.read(fd, 8192)
    m.sh("echo new > dev/kmsg")
    assert read_all(fd) == [ext(by_text(m, "new"))]
    m.sh("echo newer > dev/kmsg")
    os.lseek(fd, 0, os.SEEK_END)  # again, after reading there
    m.sh("echo newest > dev/kmsg")
    assert read_all(fd) == [ext(by_text(m, "newest"))]


def test_seek_set_0_rewinds_to_the_first_record(m: Mount, fd: int) -> None:
    for text in ("a", "b"):
        m.sh(f"echo {text} > dev/kmsg")
    everything = read_all(fd)
    assert everything == [ext(r) for r in records(m)]
    assert os.lseek(fd, 0, os.SEEK_SET) == 0
    assert read_all(fd) == everything
    os.lseek(fd, 0, os.SEEK_SET)
    assert os.read(fd, 8192) == everything[0]
    assert os.pread(fd, 8192, 12345) == everything[1]  # devkmsg_read ignores the offset


def test_each_open_file_has_its_own_position(m: Mount, fd: int) -> None:
    m.sh("echo one > dev/kmsg; echo two > dev/kmsg")
    with kmsg_fd(m) as other:
        assert os.read(fd, 8192) == ext(by_text(m, "one"))
        assert read_all(other) == [ext(r) for r in records(m)]
        assert read_all(fd) == [ext(by_text(m, "two"))]


def test_clear_then_seek_data(m: Mount) -> None:
    m.sh("echo before > dev/kmsg")
    assert klpfs(m, "dmesg", "-C") == ""
    m.sh("echo after > dev/kmsg")
    with kmsg_fd(m) as fd:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert read_all(fd) == [ext(by_text(m, "after"))]
        os.lseek(fd, 0, os.SEEK_SET)  # a rewind goes to the first record, clear or not
        assert read_all(fd) == [ext(r) for r in records(m)]
        os.lseek(fd, 0, os.SEEK_DATA)
        assert read_all(fd) == [ext(by_text(m, "after"))]
    with kmsg_fd(m) as fd:  # devkmsg_open: a new file starts at the first record
        assert read_all(fd) == [ext(r) for r in records(m)]
    assert klpfs(m, "dmesg").splitlines()[-2:] == [
        f"[{by_text(m, t)['time']:12.6f}] {t}" for t in ("before", "after")]


# -- util-linux dmesg and klpfs run ---------------------------------------------------


def host_dmesg(m: Mount, *args: str) -> subprocess.CompletedProcess[str]:
    """The real util-linux dmesg, reading MNT/dev/kmsg bound over /dev/kmsg in a private mount namespace."""
    if not (os.path.exists("/dev/kmsg") and shutil.which("unshare")):
        pytest.skip("needs /dev/kmsg to bind onto and unshare(1)")
    script = f'mount --bind "$1" /dev/kmsg && exec /usr/bin/dmesg {" ".join(args)}'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(m / "dev/kmsg")],
                          capture_output=True, text=True, timeout=DEADLINE)


def test_util_linux_dmesg_shows_the_emulated_log(m: Mount) -> None:
    klpfs(m, "insmod", "livepatch-sample")
    wait_until(lambda: any(r["text"] == "livepatch: 'livepatch_sample': patching complete" for r in records(m)),
               "the patching transition to complete")
    m.sh('echo "% modprobe livepatch-sample" > dev/kmsg')
    result = host_dmesg(m)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == klpfs(m, "dmesg")
    assert "[" in result.stdout and "% modprobe livepatch-sample\n" in result.stdout
    decoded = host_dmesg(m, "-x").stdout.splitlines()
    assert decoded[-1] == f"user  :warn  : [{by_text(m, '% modprobe livepatch-sample')['time']:12.6f}] " \
                          "% modprobe livepatch-sample"
    assert decoded[0].startswith("kern  :")


def test_util_linux_dmesg_starts_after_the_clear_point(m: Mount) -> None:
    m.sh("echo before > dev/kmsg")
    klpfs(m, "dmesg", "-C")
    m.sh("echo after > dev/kmsg")
    record = by_text(m, "after")
    assert host_dmesg(m).stdout == f"[{record['time']:12.6f}] after\n"
    assert klpfs(m, "dmesg").splitlines()[-2:] == [  # klpfs dmesg shows the whole ring
        f"[{by_text(m, t)['time']:12.6f}] {t}" for t in ("before", "after")]


def test_klpfs_run_binds_dev_kmsg() -> None:
    if not os.path.exists("/dev/kmsg"):
        pytest.skip("no /dev/kmsg to bind onto")
    script = ("echo first > /dev/kmsg && dmesg -C && echo marker > /dev/kmsg && "
              "/usr/bin/dmesg -t && echo --- && dmesg -t && echo --- && /usr/bin/dmesg -x -t")
    result = subprocess.run([*KLPFS, "run", "--", "sh", "-c", script], capture_output=True, text=True,
                            timeout=6 * DEADLINE)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "marker\n---\nmarker\n---\nuser  :warn  : marker\n"
