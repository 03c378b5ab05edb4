"""The livepatch tree of a real klpfs mount, driven the way people drive it.

Real mounts of the 4.15 and 4.16 profiles (every test runs on both), real
syscalls and real programs in subprocesses: `ls`, `cat`, `stat`, dash (`sh`)
and bash, as root and as nobody, and the `klpfs` CLI for insmod, rmmod, tasks
and the kernel log.  The generic kernfs rules against a fake tree are
test_mounted.py's; here they are checked on the livepatch files themselves,
with the values the spec (livepatch-behaviour.md §2) gives.

The emulated clock runs 10x faster (``-o speed=10``: the transition work
retries every 0.1 s of real time).  Nothing is synchronised by sleeping:
a transition is held by a kthread sleeping inside the function being patched
and released by waking it, and every wait has a deadline.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, wait_until

KERNELS = ["4.15", "4.16"]
LP = "sys/kernel/livepatch"
SAMPLE = f"{LP}/livepatch_sample"
STACK_A = f"{LP}/klp_stack_a"
STACK_B = f"{LP}/klp_stack_b"
PATCHED = "this has been live patched\n"
STACK_A_TEXT = "klp_stack_a: this has been live patched\n"
STACK_B_TEXT = "klp_stack_b: this has been live patched\n"
EINVAL_MSG = "bash: line 1: echo: write error: Invalid argument\n"
EBUSY_MSG = "bash: line 1: echo: write error: Device or resource busy\n"


# -- the mount and the CLI ------------------------------------------------------


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def m(mount_klpfs: Callable[..., Mount], kernel: str) -> Mount:
    return mount_klpfs(kernel=kernel, options=["speed=10"])


@pytest.fixture
def m416(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs(kernel="4.16", options=["speed=10"])


def klpfs(m: Mount, command: str, *args: str,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    """`klpfs COMMAND -m MNT ARGS...` (for `task`, -m goes before the action)."""
    result = subprocess.run([*KLPFS, command, "-m", str(m.path), *args], capture_output=True,
                            text=True, timeout=DEADLINE)
    if check:
        assert result.returncode == 0, f"klpfs {command} {' '.join(args)}: {result.stderr}"
    return result


def insmod(m: Mount, module: str) -> None:
    klpfs(m, "insmod", module)


def rmmod(m: Mount, module: str) -> None:
    klpfs(m, "rmmod", module)


def new_task(m: Mount, comm: str = "holder") -> str:
    pid = klpfs(m, "task", "add", comm, "--kthread").stdout.strip()
    assert pid.isdigit(), pid
    return pid


def sleep_in(m: Mount, pid: str, func: str) -> str:
    """Make the task sleep inside func (through ftrace); returns where it sleeps."""
    out = klpfs(m, "task", "sleep", pid, func).stdout
    match = re.fullmatch(rf"{pid} sleeps in (\S+)( \[\S+\])?\n", out)
    assert match, out
    return match.group(1)


def hold(m: Mount) -> str:
    """A kthread sleeping in cmdline_proc_show: it holds a transition of it."""
    pid = new_task(m)
    sleep_in(m, pid, "cmdline_proc_show")
    return pid


def wake(m: Mount, pid: str) -> None:
    klpfs(m, "task", "wake", pid)


def dmesg(m: Mount) -> list[str]:
    """The kernel log without its timestamps."""
    return [re.sub(r"^\[ *\d+\.\d{6}\] ", "", line)
            for line in klpfs(m, "dmesg").stdout.splitlines()]


def lp_log(m: Mount) -> list[str]:
    """The kernel log's lines from the livepatch core (a stray one fails an exact comparison)."""
    return [line for line in dmesg(m) if line.startswith("livepatch: ")]


def story(patch: str, *events: str) -> list[str]:
    """The livepatch lines of events: enable, patching, patched, unpatching, unpatched."""
    text = {"enable": f"livepatch: enabling patch '{patch}'",
            "patching": f"livepatch: '{patch}': starting patching transition",
            "patched": f"livepatch: '{patch}': patching complete",
            "unpatching": f"livepatch: '{patch}': starting unpatching transition",
            "unpatched": f"livepatch: '{patch}': unpatching complete"}
    return [text[event] for event in events]


class KernelLog:
    """`klpfs dmesg -w` running in the background, so a line is seen as soon as it is logged."""

    def __init__(self, m: Mount) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*KLPFS, "dmesg", "-m", str(m.path), "-w"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(re.sub(r"^\[ *\d+\.\d{6}\] ", "", line.rstrip("\n")))

    def count(self, line: str) -> int:
        return self.lines.count(line)

    def wait_for(self, line: str, count: int = 1) -> None:
        wait_until(lambda: self.count(line) >= count, f"{count}x {line!r} in the kernel log")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)


@pytest.fixture
def klog(m: Mount) -> Iterator[KernelLog]:
    log = KernelLog(m)
    try:
        yield log
    finally:
        log.close()


# -- files ------------------------------------------------------------------------


def os_errno(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def write(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def state(m: Mount, patch: str) -> tuple[bytes, bytes]:
    """(enabled, transition) as read by root."""
    return read(m / patch / "enabled"), read(m / patch / "transition")


def wait_idle(m: Mount, patch: str) -> None:
    wait_until(lambda: read(m / patch / "transition") == b"0\n", f"{patch}'s transition to end")


def cat(m: Mount, *paths: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    return m.run(["cat", *paths], user=user)


def cmdline(m: Mount) -> str:
    result = cat(m, "proc/cmdline")
    assert result.returncode == 0, result.stderr
    return result.stdout


def bash_echo(m: Mount, value: str, path: str) -> tuple[int, str]:
    """`echo VALUE > PATH` in bash: (exit status, stderr)."""
    result = m.bash(f"echo '{value}' > {path}")
    return result.returncode, result.stderr


def ls_l(m: Mount, directory: str) -> dict[str, list[str]]:
    """Name -> the other columns of `ls -l` (mode, links, owner, group, size)."""
    lines = m.run(["ls", "-l", directory], check=True).stdout.splitlines()[1:]
    return {line.split()[-1]: line.split()[:5] for line in lines}


def wo_attrs(kernel: str) -> list[str]:
    return ["force", "signal"] if kernel == "4.16" else []


def load_sample(m: Mount) -> None:
    insmod(m, "livepatch-sample")
    wait_idle(m, SAMPLE)
    assert state(m, SAMPLE) == (b"1\n", b"0\n")


# -- the tree -----------------------------------------------------------------------


def test_tree_modes_and_owners(m: Mount, kernel: str) -> None:
    root = m / LP
    assert m.run(["ls", "-a", LP]).stdout.split() == [".", ".."]
    st = os.stat(root)
    assert (st.st_mode, st.st_size, st.st_uid, st.st_gid) == (0o40755, 0, 0, 0)
    assert ls_l(m, "sys/kernel")["livepatch"] == ["drwxr-xr-x", "2", "root", "root", "0"]

    insmod(m, "livepatch-callbacks-mod")  # an ordinary module: no livepatch directory
    assert os.listdir(root) == []
    insmod(m, "livepatch-sample")
    insmod(m, "livepatch-shadow-mod")
    assert os.listdir(root) == ["livepatch_sample"]
    assert m.run(["ls", "-a", LP]).stdout.split() == [".", "..", "livepatch_sample"]
    assert ls_l(m, LP) == {"livepatch_sample": ["drwxr-xr-x", "3", "root", "root", "0"]}

    attr = {"enabled": ["-rw-r--r--", "1", "root", "root", "4096"],
            "transition": ["-r--r--r--", "1", "root", "root", "4096"]}
    attr |= {name: ["--w-------", "1", "root", "root", "4096"] for name in wo_attrs(kernel)}
    assert ls_l(m, SAMPLE) == attr | {"vmlinux": ["drwxr-xr-x", "3", "root", "root", "0"]}
    assert ls_l(m, f"{SAMPLE}/vmlinux") == {
        "cmdline_proc_show,1": ["drwxr-xr-x", "2", "root", "root", "0"]}
    funcdir = f"{SAMPLE}/vmlinux/cmdline_proc_show,1"
    assert m.run(["ls", "-a", funcdir]).stdout.split() == [".", ".."]

    modes = {"": 0o40755, "enabled": 0o100644, "transition": 0o100444, "vmlinux": 0o40755,
             "vmlinux/cmdline_proc_show,1": 0o40755}
    modes |= {name: 0o100200 for name in wo_attrs(kernel)}
    for name, mode in modes.items():
        st = os.stat(m / SAMPLE / name)
        size = 0 if mode & 0o40000 else 4096
        assert (st.st_mode, st.st_size, st.st_uid, st.st_gid) == (mode, size, 0, 0), name
    if kernel == "4.15":
        for name in ("signal", "force"):
            assert os_errno(os.stat, m / SAMPLE / name) == errno.ENOENT
            result = cat(m, f"{SAMPLE}/{name}")
            assert result.stderr == f"cat: {SAMPLE}/{name}: No such file or directory\n"
    assert m.run(["stat", "-c", "%a %s %U:%G %F", f"{SAMPLE}/enabled", f"{SAMPLE}/transition",
                  f"{SAMPLE}/vmlinux/cmdline_proc_show,1"]).stdout.splitlines() == [
        "644 4096 root:root regular file", "444 4096 root:root regular file",
        "755 0 root:root directory"]

    assert ls_l(m, "proc/1")["patch_state"][:4] == ["-r--------", "1", "root", "root"]
    st = os.stat(m / "proc/1/patch_state")
    assert (st.st_mode, st.st_uid, st.st_gid) == (0o100400, 0, 0)


def test_patch_state_has_a_procfs_size(mount_klpfs: Callable[..., Mount]) -> None:
    """procfs files (proc_pid_make_inode never sets i_size) stat as size 0, unlike sysfs's 4096."""
    m = mount_klpfs(kernel="4.15")
    listing = ls_l(m, "proc/1")["patch_state"]
    assert listing == ["-r--------", "1", "root", "root", "0"], (
        f"KLPFS BUG: `ls -l proc/1/patch_state` shows {listing}; a real /proc/<pid>/patch_state "
        "(mode 0400, root:root) has size 0 like every /proc/<pid> file")


# -- reads ----------------------------------------------------------------------------


def test_reads_are_exact_and_proc_cmdline_follows(m: Mount) -> None:
    original = cmdline(m)
    assert original.startswith("BOOT_IMAGE=") and original.endswith("\n")
    load_sample(m)
    assert cmdline(m) == PATCHED
    enabled, transition = m / SAMPLE / "enabled", m / SAMPLE / "transition"
    out = subprocess.run(["cat", enabled, transition], capture_output=True, timeout=DEADLINE)
    assert (out.returncode, out.stdout, out.stderr) == (0, b"1\n0\n", b"")
    for path, value in ((enabled, b"1\n"), (transition, b"0\n")):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.read(fd, 4096) == value
            assert os.read(fd, 4096) == b""
            assert os.pread(fd, 4096, 1) == b"\n"
            assert os.pread(fd, 4096, 2) == b""
            assert os.pread(fd, 4096, 3) == b""
            assert os.pread(fd, 4096, 4096) == b""
            assert os.pread(fd, 1, 0) == value[:1]
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:  # a first read at an offset past the end of a fresh handle
            assert os.pread(fd, 100, 2) == b""
        finally:
            os.close(fd)
    assert read(m / "proc/1/patch_state") == b"-1\n"
    assert write(enabled, b"0\n") == 2
    assert read(enabled) == b"0\n"  # flips at request time
    wait_idle(m, SAMPLE)
    out = subprocess.run(["cat", enabled, transition], capture_output=True, timeout=DEADLINE)
    assert out.stdout == b"0\n0\n"
    assert cmdline(m) == original


# -- writes ---------------------------------------------------------------------------


def test_kstrtobool_errors_change_nothing(m: Mount, kernel: str) -> None:
    load_sample(m)
    for value in ["2", "x", "true", " 1", "o", "", "-1", "t", "oz"]:
        for attr in ["enabled", *wo_attrs(kernel)]:
            assert bash_echo(m, value, f"{SAMPLE}/{attr}") == (1, EINVAL_MSG), (value, attr)
        assert os_errno(write, m / SAMPLE / "enabled", value.encode() or b"\n") == errno.EINVAL
    assert state(m, SAMPLE) == (b"1\n", b"0\n")
    assert cmdline(m) == PATCHED

    assert bash_echo(m, "off", f"{SAMPLE}/enabled") == (0, "")
    assert read(m / SAMPLE / "enabled") == b"0\n"
    wait_idle(m, SAMPLE)
    for value in ["2", "x", "true", " 1", "o"]:
        assert bash_echo(m, value, f"{SAMPLE}/enabled") == (1, EINVAL_MSG), value
    assert state(m, SAMPLE) == (b"0\n", b"0\n")
    assert lp_log(m) == story("livepatch_sample", "enable", "patching", "patched",
                              "unpatching", "unpatched")


def test_writing_the_current_value_is_einval(m: Mount) -> None:
    pid = hold(m)
    insmod(m, "livepatch-sample")
    assert state(m, SAMPLE) == (b"1\n", b"1\n")
    for value in ["1", "Y", "yes", "on", "10"]:  # patching: 1 is the current value
        assert bash_echo(m, value, f"{SAMPLE}/enabled") == (1, EINVAL_MSG), value
    assert state(m, SAMPLE) == (b"1\n", b"1\n")
    wake(m, pid)
    wait_idle(m, SAMPLE)
    for value in ["1", "Y", "yes", "on", "10"]:
        assert bash_echo(m, value, f"{SAMPLE}/enabled") == (1, EINVAL_MSG), value
    assert state(m, SAMPLE) == (b"1\n", b"0\n")

    assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
    wait_idle(m, SAMPLE)
    for value in ["0", "n", "N", "off", "no way"]:  # disabled, still registered on 4.x
        assert bash_echo(m, value, f"{SAMPLE}/enabled") == (1, EINVAL_MSG), value
    assert state(m, SAMPLE) == (b"0\n", b"0\n")
    assert cmdline(m) != PATCHED
    assert lp_log(m) == story("livepatch_sample", "enable", "patching", "patched",
                              "unpatching", "unpatched")


def test_reversing_a_held_transition(m: Mount, klog: KernelLog) -> None:
    old = hold(m)  # on the old code: holds patching
    insmod(m, "livepatch-sample")
    new = new_task(m, "holder2")  # on the new code: holds unpatching
    assert sleep_in(m, new, "livepatch_cmdline_proc_show") == "livepatch_cmdline_proc_show"
    assert state(m, SAMPLE) == (b"1\n", b"1\n")
    assert read(m / f"proc/{old}/patch_state") == b"0\n"

    assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
    assert state(m, SAMPLE) == (b"0\n", b"1\n")
    klog.wait_for("livepatch: 'livepatch_sample': starting unpatching transition")
    assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (1, EINVAL_MSG)
    assert bash_echo(m, "1", f"{SAMPLE}/enabled") == (0, "")
    assert state(m, SAMPLE) == (b"1\n", b"1\n")
    klog.wait_for("livepatch: 'livepatch_sample': starting patching transition", 2)
    assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
    assert bash_echo(m, "1", f"{SAMPLE}/enabled") == (0, "")
    assert state(m, SAMPLE) == (b"1\n", b"1\n")

    wake(m, old)
    wake(m, new)
    klog.wait_for("livepatch: 'livepatch_sample': patching complete")
    assert state(m, SAMPLE) == (b"1\n", b"0\n")
    assert cmdline(m) == PATCHED
    assert [line for line in klog.lines if "livepatch_sample" in line] == [
        "livepatch_sample: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: enabling patch 'livepatch_sample'",
        "livepatch: 'livepatch_sample': starting patching transition",
        "livepatch: 'livepatch_sample': starting unpatching transition",
        "livepatch: 'livepatch_sample': starting patching transition",
        "livepatch: 'livepatch_sample': starting unpatching transition",
        "livepatch: 'livepatch_sample': starting patching transition",
        "livepatch: 'livepatch_sample': patching complete",
    ]


def load_stack(m: Mount) -> None:
    """klp-stack-a, then klp-stack-b, both enabled."""
    insmod(m, "klp-stack-a")
    wait_idle(m, STACK_A)
    insmod(m, "klp-stack-b")
    wait_idle(m, STACK_B)
    assert sorted(os.listdir(m / LP)) == ["klp_stack_a", "klp_stack_b"]


def test_stacking_by_registration_order(m: Mount) -> None:
    original = cmdline(m)
    load_stack(m)
    assert cmdline(m) == STACK_B_TEXT  # the upper one wins

    assert bash_echo(m, "0", f"{STACK_A}/enabled") == (1, EBUSY_MSG)  # the lower, upper enabled
    assert state(m, STACK_A) == state(m, STACK_B) == (b"1\n", b"0\n")

    assert bash_echo(m, "0", f"{STACK_B}/enabled") == (0, "")
    wait_idle(m, STACK_B)
    assert cmdline(m) == STACK_A_TEXT  # the lower one shows through
    assert bash_echo(m, "0", f"{STACK_A}/enabled") == (0, "")
    wait_idle(m, STACK_A)
    assert cmdline(m) == original

    assert bash_echo(m, "1", f"{STACK_B}/enabled") == (1, EBUSY_MSG)  # the upper, lower disabled
    assert state(m, STACK_B) == state(m, STACK_A) == (b"0\n", b"0\n")

    assert bash_echo(m, "1", f"{STACK_A}/enabled") == (0, "")
    wait_idle(m, STACK_A)
    assert cmdline(m) == STACK_A_TEXT
    assert bash_echo(m, "1", f"{STACK_B}/enabled") == (0, "")
    wait_idle(m, STACK_B)
    assert cmdline(m) == STACK_B_TEXT
    a, b = "klp_stack_a", "klp_stack_b"
    assert lp_log(m) == [*story(a, "enable", "patching", "patched"),
                         *story(b, "enable", "patching", "patched"),
                         *story(b, "unpatching", "unpatched"), *story(a, "unpatching", "unpatched"),
                         *story(a, "enable", "patching", "patched"),
                         *story(b, "enable", "patching", "patched")]


def test_one_transition_at_a_time(m: Mount, kernel: str) -> None:
    load_stack(m)
    pid = new_task(m)
    assert sleep_in(m, pid, "cmdline_proc_show") == "klp_stack_b_cmdline_proc_show"
    assert bash_echo(m, "0", f"{STACK_B}/enabled") == (0, "")  # held: the task is on B's code
    assert state(m, STACK_B) == (b"0\n", b"1\n")

    assert bash_echo(m, "0", f"{STACK_A}/enabled") == (1, EBUSY_MSG)
    assert bash_echo(m, "1", f"{STACK_A}/enabled") == (1, EINVAL_MSG)  # its current value
    for attr in wo_attrs(kernel):  # A is not the patch in transition
        assert bash_echo(m, "1", f"{STACK_A}/{attr}") == (1, EINVAL_MSG)
        assert bash_echo(m, "0", f"{STACK_A}/{attr}") == (0, "")
    result = klpfs(m, "insmod", "livepatch-sample", check=False)
    assert (result.returncode, result.stderr) == (1, "insmod: ERROR: could not insert module "
                                                  "livepatch-sample: Device or resource busy\n")
    assert sorted(os.listdir(m / LP)) == ["klp_stack_a", "klp_stack_b"]
    assert state(m, STACK_A) == (b"1\n", b"0\n")
    assert state(m, STACK_B) == (b"0\n", b"1\n")

    wake(m, pid)
    wait_idle(m, STACK_B)
    assert cmdline(m) == STACK_A_TEXT
    assert bash_echo(m, "0", f"{STACK_A}/enabled") == (0, "")
    wait_idle(m, STACK_A)
    a, b = "klp_stack_a", "klp_stack_b"
    assert lp_log(m) == [*story(a, "enable", "patching", "patched"),
                         *story(b, "enable", "patching", "patched"),
                         *story(b, "unpatching", "unpatched"), *story(a, "unpatching", "unpatched")]


def test_signal_and_force(m416: Mount) -> None:
    m = m416
    log = KernelLog(m)
    try:
        load_sample(m)
        for attr in ["signal", "force"]:  # no transition: 0 is a no-op, 1 is EINVAL
            assert bash_echo(m, "0", f"{SAMPLE}/{attr}") == (0, "")
            assert bash_echo(m, "N", f"{SAMPLE}/{attr}") == (0, "")
            assert bash_echo(m, "1", f"{SAMPLE}/{attr}") == (1, EINVAL_MSG)
            assert bash_echo(m, "yes", f"{SAMPLE}/{attr}") == (1, EINVAL_MSG)
        assert state(m, SAMPLE) == (b"1\n", b"0\n")
        assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
        wait_idle(m, SAMPLE)

        pid = hold(m)
        assert bash_echo(m, "1", f"{SAMPLE}/enabled") == (0, "")
        assert state(m, SAMPLE) == (b"1\n", b"1\n")
        for attr in ["signal", "force"]:
            assert bash_echo(m, "0", f"{SAMPLE}/{attr}") == (0, "")
        assert "livepatch: signaling remaining tasks" not in log.lines
        assert bash_echo(m, "1", f"{SAMPLE}/signal") == (0, "")
        log.wait_for("livepatch: signaling remaining tasks")
        assert read(m / SAMPLE / "transition") == b"1\n"  # a kthread in D is not moved
        assert "livepatch: forcing remaining tasks to the patched state" not in log.lines
        assert bash_echo(m, "1", f"{SAMPLE}/force") == (0, "")
        log.wait_for("livepatch: forcing remaining tasks to the patched state")
        wait_idle(m, SAMPLE)
        log.wait_for("livepatch: 'livepatch_sample': patching complete", 2)
        assert state(m, SAMPLE) == (b"1\n", b"0\n")
        assert cmdline(m) == PATCHED
        assert bash_echo(m, "1", f"{SAMPLE}/force") == (1, EINVAL_MSG)  # over
        wake(m, pid)
        # 4.16 forcing pins every patch module for good
        assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
        wait_idle(m, SAMPLE)
        result = klpfs(m, "rmmod", "livepatch_sample", check=False)
        assert (result.returncode, result.stderr) == (
            1, "rmmod: ERROR: Module livepatch_sample is in use\n")
    finally:
        log.close()


# -- kernfs open rules and permissions ----------------------------------------------


def test_kernfs_open_rules_and_permissions(m: Mount, kernel: str) -> None:
    assert os.geteuid() == 0
    load_sample(m)
    for flags in (os.O_WRONLY, os.O_RDWR):
        assert os_errno(os.open, m / SAMPLE / "transition", flags) == errno.EACCES
    for attr in wo_attrs(kernel):
        for flags in (os.O_RDONLY, os.O_RDWR):
            assert os_errno(os.open, m / SAMPLE / attr, flags) == errno.EACCES
        result = cat(m, f"{SAMPLE}/{attr}")
        assert (result.returncode, result.stdout, result.stderr) == (
            1, "", f"cat: {SAMPLE}/{attr}: Permission denied\n")
    result = m.sh(f"echo 1 > {SAMPLE}/transition")
    assert (result.returncode, result.stderr) == (
        2, f"sh: 1: cannot create {SAMPLE}/transition: Permission denied\n")
    result = m.bash(f"echo 0 > {SAMPLE}/transition")
    assert (result.returncode, result.stderr) == (
        1, f"bash: line 1: {SAMPLE}/transition: Permission denied\n")
    assert read(m / "proc/1/patch_state") == b"-1\n"

    # nobody: reads enabled and transition, nothing else
    result = cat(m, f"{SAMPLE}/enabled", f"{SAMPLE}/transition", user="nobody")
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n0\n", "")
    result = m.sh(f"echo 0 > {SAMPLE}/enabled", user="nobody")
    assert (result.returncode, result.stderr) == (
        2, f"sh: 1: cannot create {SAMPLE}/enabled: Permission denied\n")
    result = cat(m, "proc/1/patch_state", user="nobody")
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "cat: proc/1/patch_state: Permission denied\n")
    for attr in wo_attrs(kernel):
        result = cat(m, f"{SAMPLE}/{attr}", user="nobody")
        assert result.stderr == f"cat: {SAMPLE}/{attr}: Permission denied\n"
        result = m.sh(f"echo 1 > {SAMPLE}/{attr}", user="nobody")
        assert result.stderr == f"sh: 1: cannot create {SAMPLE}/{attr}: Permission denied\n"
    assert m.run(["ls", f"{SAMPLE}/vmlinux"], user="nobody").stdout == "cmdline_proc_show,1\n"
    assert state(m, SAMPLE) == (b"1\n", b"0\n")
    assert cmdline(m) == PATCHED


def test_write_sizes(m: Mount, kernel: str, klog: KernelLog) -> None:
    load_sample(m)
    fd = os.open(m / SAMPLE / "enabled", os.O_WRONLY)
    try:
        assert os.write(fd, b"") == 0  # "" would be EINVAL if the store ran
        assert state(m, SAMPLE) == (b"1\n", b"0\n")
        assert os_errno(os.write, fd, b"1" * 5000) == errno.EINVAL  # the current value
        assert os.write(fd, b"0" + b"x" * 4999) == 4096
        assert read(m / SAMPLE / "enabled") == b"0\n"
        klog.wait_for("livepatch: 'livepatch_sample': starting unpatching transition")
        wait_idle(m, SAMPLE)
        assert os.write(fd, b"y" * 5000) == 4096
        assert read(m / SAMPLE / "enabled") == b"1\n"
        klog.wait_for("livepatch: 'livepatch_sample': starting patching transition", 2)
    finally:
        os.close(fd)
    for attr in wo_attrs(kernel):
        fd = os.open(m / SAMPLE / attr, os.O_WRONLY)
        try:
            assert os.write(fd, b"") == 0
            assert os.write(fd, b"0" * 5000) == 4096
        finally:
            os.close(fd)
    wait_idle(m, SAMPLE)
    assert lp_log(m) == story("livepatch_sample", "enable", "patching", "patched",
                              "unpatching", "unpatched", "enable", "patching", "patched")


# -- removal ------------------------------------------------------------------------


def test_stale_handles_and_removal(m: Mount, kernel: str) -> None:
    attrs = ["enabled", "transition", *wo_attrs(kernel)]
    for round_ in range(2):
        load_sample(m)
        if round_ == 0:
            result = klpfs(m, "rmmod", "livepatch_sample", check=False)  # enabled: refused
            assert (result.returncode, result.stderr) == (
                1, "rmmod: ERROR: Module livepatch_sample is in use\n")
            pid = hold(m)  # on the patched code: holds the unpatching transition
        reader = os.open(m / SAMPLE / "enabled", os.O_RDONLY)
        treader = os.open(m / SAMPLE / "transition", os.O_RDONLY)
        writer = os.open(m / SAMPLE / "enabled", os.O_WRONLY)
        wo = [os.open(m / SAMPLE / attr, os.O_WRONLY) for attr in wo_attrs(kernel)]
        try:
            assert os.read(reader, 100) == b"1\n"
            assert os.write(writer, b"0\n") == 2
            if round_ == 0:  # the module reference is dropped only at completion
                result = klpfs(m, "rmmod", "livepatch_sample", check=False)
                assert (result.returncode, result.stderr) == (
                    1, "rmmod: ERROR: Module livepatch_sample is in use\n")
                assert state(m, SAMPLE) == (b"0\n", b"1\n")
                wake(m, pid)
            wait_idle(m, SAMPLE)
            assert os.listdir(m / LP) == ["livepatch_sample"]  # 4.x: registered until rmmod
            assert os.pread(reader, 100, 0) == b"0\n"  # disabled, the handles still work
            assert os.pread(treader, 100, 0) == b"0\n"
            for attr in attrs:
                os.stat(m / SAMPLE / attr)  # in the dentry cache
            rmmod(m, "livepatch_sample")
            for path in [SAMPLE, *(f"{SAMPLE}/{attr}" for attr in attrs), f"{SAMPLE}/vmlinux"]:
                assert os_errno(os.stat, m / path) == errno.ENOENT, (round_, path)
            assert os_errno(os.open, m / SAMPLE / "enabled", os.O_RDONLY) == errno.ENOENT
            assert os.listdir(m / LP) == []
            assert os_errno(os.read, reader, 100) == errno.ENODEV
            assert os_errno(os.pread, reader, 100, 0) == errno.ENODEV
            assert os_errno(os.read, treader, 100) == errno.ENODEV
            assert os_errno(os.write, writer, b"1\n") == errno.ENODEV
            for fd in wo:
                assert os_errno(os.write, fd, b"0\n") == errno.ENODEV
            result = m.bash(f"echo 1 > {SAMPLE}/enabled")
            assert result.stderr == f"bash: line 1: {SAMPLE}/enabled: No such file or directory\n"
            result = m.sh(f"echo 1 > {SAMPLE}/enabled")
            assert result.stderr == (
                f"sh: 1: cannot create {SAMPLE}/enabled: Directory nonexistent\n")

            insmod(m, "livepatch-sample")  # back at once, and the old handles stay dead
            assert os.stat(m / SAMPLE / "enabled").st_mode == 0o100644
            assert read(m / SAMPLE / "enabled") == b"1\n"
            assert os_errno(os.read, reader, 100) == errno.ENODEV
            assert os_errno(os.write, writer, b"0\n") == errno.ENODEV
        finally:
            for fd in [reader, treader, writer, *wo]:
                os.close(fd)
        wait_idle(m, SAMPLE)
        assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
        wait_idle(m, SAMPLE)
        rmmod(m, "livepatch_sample")


# -- /proc/cmdline and transitions in the background ----------------------------------


def test_a_background_completion_is_read_at_once(m: Mount, klog: KernelLog) -> None:
    pid = new_task(m)
    for round_ in range(1, 4):
        assert sleep_in(m, pid, "cmdline_proc_show") == "cmdline_proc_show"
        if round_ == 1:
            insmod(m, "livepatch-sample")
        else:
            assert bash_echo(m, "1", f"{SAMPLE}/enabled") == (0, "")
        assert cat(m, f"{SAMPLE}/transition").stdout == "1\n"
        assert read(m / f"proc/{pid}/patch_state") == b"0\n"
        wake(m, pid)
        klog.wait_for("livepatch: 'livepatch_sample': patching complete", round_)
        assert cat(m, f"{SAMPLE}/transition").stdout == "0\n", round_
        assert read(m / f"proc/{pid}/patch_state") == b"-1\n"
        assert cmdline(m) == PATCHED

        assert sleep_in(m, pid, "cmdline_proc_show") == "livepatch_cmdline_proc_show"
        assert bash_echo(m, "0", f"{SAMPLE}/enabled") == (0, "")
        assert cat(m, f"{SAMPLE}/enabled", f"{SAMPLE}/transition").stdout == "0\n1\n"
        wake(m, pid)
        klog.wait_for("livepatch: 'livepatch_sample': unpatching complete", round_)
        assert cat(m, f"{SAMPLE}/enabled", f"{SAMPLE}/transition").stdout == "0\n0\n", round_
        assert cmdline(m) != PATCHED


def test_a_burst_of_concurrent_readers_and_writers(m: Mount, klog: KernelLog) -> None:
    pid = hold(m)
    insmod(m, "livepatch-sample")
    assert state(m, SAMPLE) == (b"1\n", b"1\n")
    enabled, transition = m / SAMPLE / "enabled", m / SAMPLE / "transition"
    barrier = threading.Barrier(200)
    lock = threading.Lock()
    stored: list[bytes] = []
    problems: list[str] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=DEADLINE)
            for k in range(6):
                op = (n + k) % 4
                if op == 0:
                    assert read(enabled) in (b"0\n", b"1\n")
                elif op == 1:
                    assert read(transition) in (b"0\n", b"1\n")
                elif op == 2:
                    value = b"0\n" if (n // 4 + k) % 2 == 0 else b"1\n"
                    try:
                        assert write(enabled, value) == 2
                        with lock:
                            stored.append(value)
                    except OSError as exc:
                        assert exc.errno == errno.EINVAL, exc
                else:
                    assert os_errno(os.open, transition, os.O_WRONLY) == errno.EACCES
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                problems.append(f"worker {n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=6 * DEADLINE)
    assert not [t for t in threads if t.is_alive()], "workers hung"
    assert problems == []
    assert m.mounted()

    wake(m, pid)
    wait_idle(m, SAMPLE)
    final = read(enabled)
    assert final in (b"0\n", b"1\n")
    assert (cmdline(m) == PATCHED) == (final == b"1\n")
    # every successful store started exactly one transition
    starting = [line for line in dmesg(m)
                if re.fullmatch(r"livepatch: 'livepatch_sample': starting (un)?patching transition",
                                line)]
    assert len(starting) == 1 + len(stored)
    assert os.listdir(m / LP) == ["livepatch_sample"]
    log = m.log()
    assert "Traceback" not in log and " ERROR " not in log and "WARNING" not in log, log
