"""What readers that do not use read(2) see, through a real mount, as on Linux 6.1.

sendfile(2) and splice(2) (busybox cat, shutil.copyfile) read a FUSE file
through the page cache since Linux 6.5, up to the kernel's idea of its size,
even for direct-I/O files; proc files stat as 0 and attributes as 4096, and a
short read trims that size.  Here every kind of file answers them as read(2)
does, sizes stat as on sysfs and procfs whatever was read or written before,
a handle on a freed patch's file answers ENODEV however it reads, and under
`klpfs run` /sys/kernel is a sysfs directory, not a tmpfs.

Real mounts (6.1 profile, the clock 10x faster), real syscalls and real
programs (busybox, Debian's, is installed by scripts/setup).  Every wait is a
poll with a deadline, never a sleep.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from fusemount import DEADLINE, KLPFS, Mount, require_fuse, wait_until

from klpfs.fs.invalidate import Invalidator, SpliceSizes

LP = "sys/kernel/livepatch"
SAMPLE = f"{LP}/livepatch_sample"
STACK_A = f"{LP}/klp_stack_a"
STACK_B = f"{LP}/klp_stack_b"
BUSYBOX = shutil.which("busybox")
PROC_FILES = ["proc/cmdline", "proc/version", "proc/kallsyms", "proc/modules", "proc/sys/kernel/tainted",
              "proc/1/comm", "sys/kernel/debug/dynamic_debug/control"]
"""Stat as 0 (procfs, and debugfs's seq_file); kallsyms and control are seq_files, read whole."""
ATTRIBUTES = [f"{SAMPLE}/enabled", f"{SAMPLE}/transition", f"{SAMPLE}/vmlinux/patched",
              "sys/module/livepatch_sample/refcnt"]
"""Stat as 4096 (sysfs)."""
STABLE_HOST_FILES = ("address_bits", "cpu_byteorder", "fscaps", "profiling", "rcu_expedited", "rcu_normal",
                     "kexec_loaded", "kexec_crash_loaded")
"""Files of a host's /sys/kernel whose text does not change while a test runs."""


# -- the mount --------------------------------------------------------------------


@pytest.fixture
def m(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs(kernel="6.1", options=["speed=10"])


def klpfs(m: Mount, command: str, *args: str) -> str:
    result = subprocess.run([*KLPFS, command, "-m", str(m.path), *args], capture_output=True,
                            text=True, timeout=DEADLINE)
    assert result.returncode == 0, f"klpfs {command} {' '.join(args)}: {result.stderr}"
    return result.stdout


def wait_idle(m: Mount, patch: str) -> None:
    wait_until(lambda: (m / patch / "transition").read_bytes() == b"0\n", f"{patch} to finish its transition")


def sample(m: Mount) -> Mount:
    """livepatch-sample loaded, its transition over."""
    klpfs(m, "insmod", "livepatch-sample")
    wait_idle(m, SAMPLE)
    return m


def busybox() -> str:
    if BUSYBOX is None:
        pytest.fail("busybox is not installed (scripts/setup installs Debian's busybox)")
    return BUSYBOX


# -- the ways to read ---------------------------------------------------------------


def by_read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _through_pipe(path: Path, move: Callable[[int, int], int]) -> bytes:
    """What `move(fd, pipe)` calls bring until one moves nothing (end of file)."""
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        out = b""
        while n := move(fd, w):
            while n:
                chunk = os.read(r, n)
                out += chunk
                n -= len(chunk)
        return out
    finally:
        for f in (fd, r, w):
            os.close(f)


def by_sendfile(path: Path) -> bytes:
    return _through_pipe(path, lambda fd, w: os.sendfile(w, fd, None, 1 << 16))


def by_splice(path: Path) -> bytes:
    return _through_pipe(path, lambda fd, w: os.splice(fd, w, 1 << 16))


def by_copyfile(path: Path, tmp: Path) -> bytes:
    """shutil.copyfile: fstat, then sendfile."""
    shutil.copyfile(path, tmp / "copy")
    return (tmp / "copy").read_bytes()


def by_busybox(path: Path) -> bytes:
    result = subprocess.run([busybox(), "cat", str(path)], capture_output=True, timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    return result.stdout


def size(path: Path) -> int:
    """coreutils stat asks statx for the size alone: the kernel answers from its cache if
    it holds the size (os.stat asks for the atime too, which a read made stale)."""
    return int(subprocess.run(["stat", "-c", "%s", str(path)], capture_output=True, text=True,
                              check=True, timeout=DEADLINE).stdout)


# -- every kind of file, every way of reading ---------------------------------------------------


@pytest.mark.parametrize("name", PROC_FILES + ATTRIBUTES)
def test_sendfile_splice_and_busybox_cat_read_what_read_does(m: Mount, name: str, tmp_path: Path) -> None:
    path = sample(m) / name
    expected = by_read(path)
    stat_size = 4096 if name in ATTRIBUTES else 0
    assert expected and size(path) == stat_size
    for way in (by_sendfile, by_splice, by_busybox, lambda p: by_copyfile(p, tmp_path), by_sendfile):
        assert way(path) == expected
        assert size(path) == stat_size, "a stat after the read"


def test_a_value_that_changes_length_is_read_whole_each_time(m: Mount) -> None:
    """The kernel keeps the length of the last splice's value as the file's size; the
    next open must not be held to it (cmdline shrinks when patched, grows when not)."""
    cmdline = m / "proc/cmdline"
    original = by_sendfile(cmdline)
    sample(m)
    assert by_sendfile(cmdline) == by_busybox(cmdline) == b"this has been live patched\n"
    assert (m / SAMPLE / "enabled").write_bytes(b"0\n") == 2
    wait_until(lambda: not (m / SAMPLE).exists(), "the disabled patch to be freed")
    assert by_busybox(cmdline) == by_sendfile(cmdline) == original


def test_an_open_handle_keeps_reading_by_sendfile_after_a_stat(m: Mount) -> None:
    """fstat answers 0 for a proc file while a splice goes on reading it whole."""
    path = m / "proc/version"
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    try:
        assert os.fstat(fd).st_size == 0 and size(path) == 0
        n = os.sendfile(w, fd, 0, 1 << 16)
        assert os.read(r, n) == by_read(path)
        assert os.fstat(fd).st_size == 0
        assert os.sendfile(w, fd, n, 1 << 16) == 0
    finally:
        for f in (fd, r, w):
            os.close(f)


# -- sizes through failed writes --------------------------------------------------------


def bash_echo(m: Mount, value: str, name: str) -> tuple[int, str]:
    """`echo value > name` (an O_TRUNC open, then a write) in bash, which names the errno."""
    result = subprocess.run(["bash", "-c", f"echo {value} > {name}"], cwd=m.path, capture_output=True,
                            text=True, timeout=DEADLINE)
    return result.returncode, result.stderr


def test_a_failed_write_changes_neither_size_nor_what_busybox_cat_reads(m: Mount) -> None:
    enabled = sample(m) / SAMPLE / "enabled"
    assert (size(enabled), by_busybox(enabled), size(enabled)) == (4096, b"1\n", 4096)
    assert bash_echo(m, "2", f"{SAMPLE}/enabled") == (1, "bash: line 1: echo: write error: Invalid argument\n")
    assert size(enabled) == 4096
    assert by_busybox(enabled) == b"1\n"
    assert bash_echo(m, "1", f"{SAMPLE}/enabled") == (1, "bash: line 1: echo: write error: Invalid argument\n")
    assert by_busybox(enabled) == b"1\n" and by_sendfile(enabled) == b"1\n"
    assert size(enabled) == 4096


def test_ebusy_from_another_transition_leaves_the_attribute_whole(m: Mount) -> None:
    """One transition at a time: disabling A while B's unpatching is held is EBUSY."""
    klpfs(m, "insmod", "klp-stack-a")
    wait_idle(m, STACK_A)
    klpfs(m, "insmod", "klp-stack-b")
    wait_idle(m, STACK_B)
    pid = klpfs(m, "task", "add", "holder", "--kthread").strip()
    klpfs(m, "task", "sleep", pid, "cmdline_proc_show")  # inside B's replacement
    assert bash_echo(m, "0", f"{STACK_B}/enabled") == (0, "")
    enabled = m / STACK_A / "enabled"
    busy = (1, "bash: line 1: echo: write error: Device or resource busy\n")
    assert bash_echo(m, "0", f"{STACK_A}/enabled") == busy
    assert (by_busybox(enabled), size(enabled), by_sendfile(enabled)) == (b"1\n", 4096, b"1\n")
    assert by_busybox(m / STACK_B / "transition") == b"1\n"
    klpfs(m, "task", "wake", pid)
    wait_idle(m, STACK_A)


def test_stat_sizes_after_reads_and_writes_with_a_handle_kept_open(m: Mount) -> None:
    """A long-lived reader (a poller) shares the kernel's size of the file with every other open."""
    enabled = sample(m) / SAMPLE / "enabled"
    keep = os.open(enabled, os.O_RDONLY)
    try:
        for _ in range(3):
            assert by_busybox(enabled) == b"1\n" and size(enabled) == 4096
            assert bash_echo(m, "2", f"{SAMPLE}/enabled")[0] == 1
            assert by_sendfile(enabled) == b"1\n" and size(enabled) == 4096
        assert os.pread(keep, 4096, 0) == b"1\n"
    finally:
        os.close(keep)


# -- handles on a freed patch's files ---------------------------------------------------


def test_a_stale_handle_reads_and_writes_enodev_however_it_reads(m: Mount) -> None:
    """5.1+: disabling frees the patch; handles opened before answer ENODEV
    (kernfs_fop_read_iter finds no active reference), even where a splice cached
    the value or reached the end of it."""
    sample(m)
    transition, enabled = m / SAMPLE / "transition", m / SAMPLE / "enabled"
    fresh = os.open(transition, os.O_RDONLY)         # never read
    at_end = os.open(transition, os.O_RDONLY)        # read to its end by sendfile
    writer = os.open(enabled, os.O_WRONLY)
    r, w = os.pipe()
    try:
        assert os.sendfile(w, at_end, None, 4096) == 2 and os.read(r, 2) == b"0\n"
        assert by_busybox(transition) == b"0\n"      # the page is cached, for every handle
        assert os.write(writer, b"0\n") == 2
        wait_until(lambda: not (m / SAMPLE).exists(), "the disabled patch to be freed")
        for fd in (fresh, at_end):
            for read in (lambda fd: os.read(fd, 4096), lambda fd: os.pread(fd, 4096, 0),
                         lambda fd: os.sendfile(w, fd, None, 4096), lambda fd: os.sendfile(w, fd, 0, 4096),
                         lambda fd: os.splice(fd, w, 4096)):
                with pytest.raises(OSError) as info:
                    read(fd)
                assert info.value.errno == errno.ENODEV
        with pytest.raises(OSError) as info:
            os.write(writer, b"1\n")
        assert info.value.errno == errno.ENODEV
        result = subprocess.run([busybox(), "cat"], stdin=fresh, capture_output=True, text=True,
                                timeout=DEADLINE)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "cat: read error: No such device\n")
    finally:
        for fd in (fresh, at_end, writer, r, w):
            os.close(fd)


# -- klpfs run ----------------------------------------------------------------------


def klpfs_run(script: str) -> subprocess.CompletedProcess[str]:
    require_fuse()
    return subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=6 * DEADLINE)


def ls_sizes(listing: str) -> dict[str, int]:
    """name -> size from `ls -la` lines."""
    sizes = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 9 and re.fullmatch(r"[-dl][-rwxst]{9}\.?", fields[0]):
            sizes[fields[8]] = int(fields[4])
    return sizes


def test_ls_la_under_klpfs_run_shows_sysfs_sizes() -> None:
    res = klpfs_run("insmod livepatch-sample.ko >/dev/null; "
                    "ls -la /sys/kernel/livepatch; echo ==; ls -la /sys/kernel/livepatch/livepatch_sample; "
                    "echo ==; ls -la /sys/kernel/livepatch/livepatch_sample/vmlinux; echo ==; ls -la /sys/kernel")
    assert res.returncode == 0, res.stderr
    livepatch, patch, obj, sys_kernel = (ls_sizes(part) for part in res.stdout.split("==\n"))
    assert livepatch == {".": 0, "..": 0, "livepatch_sample": 0}
    assert patch == {".": 0, "..": 0, "enabled": 4096, "force": 4096, "transition": 4096, "vmlinux": 0}
    assert obj == {".": 0, "..": 0, "cmdline_proc_show,1": 0, "patched": 4096}
    assert sys_kernel["."] == 0 and sys_kernel["livepatch"] == 0 and sys_kernel["debug"] == 0


def test_the_hosts_sys_kernel_entries_still_work_under_klpfs_run() -> None:
    """Every entry of the host's /sys/kernel but livepatch, debug and tracing (the
    emulator's) is the host's, with what is mounted below it (here a tmpfs over mm, in
    a private mount namespace the run starts from)."""
    require_fuse()
    host = {name: Path("/sys/kernel", name) for name in os.listdir("/sys/kernel")
            if name not in ("livepatch", "debug", "tracing")}
    files = [name for name in STABLE_HOST_FILES if name in host]
    dirs = sorted(name for name, path in host.items() if path.is_dir() and not path.is_symlink())
    script = (f"ls -a /sys/kernel; echo ==; cd /sys/kernel && cat {' '.join(files)}; echo ==; "
              f"for d in {' '.join(dirs)}; do echo \"$d $(ls -A $d | wc -l)\"; done; echo ==; "
              "ls /sys/kernel/debug; cat /sys/kernel/mm/marker")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          "mount -t tmpfs none /sys/kernel/mm && echo here > /sys/kernel/mm/marker && "
                          f"exec {' '.join(KLPFS)} run --kernel 6.1 -- sh -c '{script}'"],
                         capture_output=True, text=True, timeout=6 * DEADLINE)
    assert res.returncode == 0, res.stderr
    names, contents, counts, rest = res.stdout.split("==\n")
    assert set(names.split()) == {".", "..", "livepatch", "debug", "tracing", *host}
    assert files and contents == "".join(Path("/sys/kernel", name).read_text() for name in files)
    expected = {d: len(os.listdir(Path("/sys/kernel", d))) for d in dirs}
    expected["mm"] = 1  # the tmpfs, with its marker
    assert dict((line.split()[0], int(line.split()[1])) for line in counts.splitlines()) == expected
    assert rest == "dynamic_debug\ntracing\nhere\n"


def test_busybox_cat_of_proc_files_under_klpfs_run() -> None:
    """The emulated /proc files and the real ones passed through the run's /proc union."""
    busybox()
    res = klpfs_run("d=$(mktemp -d); for f in /proc/cmdline /proc/version /proc/cpuinfo /proc/meminfo "
                    "/proc/kallsyms; do busybox cat $f > $d/bb; cat $f > $d/gnu; cmp -s $d/bb $d/gnu && "
                    "test -s $d/bb && echo \"$f $(stat -c %s $f)\"; done; rm -r $d; "
                    "busybox cat /proc/self/status | grep Name")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [*(f"{f} 0" for f in (
        "/proc/cmdline", "/proc/version", "/proc/cpuinfo", "/proc/meminfo", "/proc/kallsyms")), "Name:\tbusybox"]


# -- the policy, without a kernel -----------------------------------------------------


class Recorder:
    """A Notifier that records what the kernel would be told."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, ...]] = []

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        self.sent.append(("entry", parent_ino, name))

    def invalidate_attrs(self, ino: int) -> None:
        self.sent.append(("attrs", ino))

    def extend(self, ino: int, size: int) -> None:
        self.sent.append(("extend", ino, size))

    def invalidate_data(self, ino: int) -> None:
        self.sent.append(("data", ino))


async def test_splice_sizes_store_only_where_no_page_read_can_be_in_flight() -> None:
    recorder = Recorder()
    invalidator = Invalidator(recorder)
    sizes = SpliceSizes(invalidator, enabled=True)
    sizes.opened(7, 4096, reading=False)                  # a writer: no splice
    sizes.opened(7, 4096, reading=True)                   # the first reader: past any show
    sizes.opened(7, 4096, reading=True)                   # another: shares that size
    assert recorder.sent == [("extend", 7, 4097)]
    assert sizes.handing_out(7, 4096, 4096) is True       # applied, expiring at once
    assert sizes.handing_out(8, 0, 4096) is False         # no reader: applied, cached
    assert sizes.handing_out(7, 0, 4096) is False         # shown, not applied
    assert recorder.sent[1:] == [("attrs", 7)]
    sizes.written(7, 4096, 9000)                          # an O_APPEND write past it
    await sizes.truncated(7, 4096)                        # an O_TRUNC open zeroed i_size
    assert recorder.sent[2:] == [("extend", 7, 9001)]
    sizes.released(7, reading=True)
    sizes.released(7, reading=True)
    sizes.opened(7, 4096, reading=True)                   # a store always extends: one more
    assert recorder.sent[3:] == [("extend", 7, 9002)]
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        sizes.removed(7, 4096)                            # open: its pages go, its size grows
        sizes.removed(8, 4096)                            # not open: nothing
        await invalidator.settle()
        nursery.cancel_scope.cancel()
    assert recorder.sent[4:] == [("data", 7), ("extend", 7, 9003)]
    disabled = SpliceSizes(Invalidator(Recorder()), enabled=False)
    disabled.opened(7, 4096, reading=True)
    assert disabled.handing_out(7, 0, 4096) is False
