"""`klpfs selftests`: the kernel's own livepatch selftests, unmodified, pass
against the emulator (Linux 6.1's scripts on the 6.1 and latest profiles,
6.12's on 6.12 and latest; about a minute each), and a run leaves the host untouched."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from fusemount import KLPFS, require_fuse
from upstream import selftests

from klpfs.control.selftests import NOT_EMULATED, result_lines

RUN_MINUTES = 10


def titles(tree: Path, script: str) -> list[str]:
    """The start_test titles of one script, in order."""
    return re.findall(r'^start_test "(.*)"$', (tree / script).read_text(), re.M)


@pytest.mark.parametrize("tree, kernel", [("6.1", "6.1"), ("6.1", "latest"), ("6.12", "6.12"), ("6.12", "latest")])
def test_the_kernels_selftests_pass(tree: str, kernel: str) -> None:
    require_fuse()
    directory = selftests(tree)
    res = subprocess.run([*KLPFS, "selftests", "--tree", str(directory), "--kernel", kernel], capture_output=True,
                         text=True, timeout=RUN_MINUTES * 60)
    scripts = sorted(p.name for p in directory.glob("test-*.sh"))
    expected = [(title, "ok") for script in scripts if script not in NOT_EMULATED
                for title in titles(directory, script)]
    assert result_lines(res.stdout) == expected, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout[res.stdout.index("# summary"):].splitlines()[1:]
    assert [line.split()[1] for line in summary] == scripts
    assert all(line.endswith(" ok") or (line.split()[1] in NOT_EMULATED and line.endswith("not emulated"))
               for line in summary), summary
    for script in NOT_EMULATED:
        if script in scripts:
            assert f"# {script}: not emulated: {NOT_EMULATED[script]}" in res.stdout
    assert res.returncode == 0


def test_a_run_leaves_the_hosts_log_and_sysctls_alone() -> None:
    require_fuse()
    marker = f"klpfs-test-{uuid.uuid4()}"
    ftrace = Path("/proc/sys/kernel/ftrace_enabled").read_text()
    res = subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c",
                          f"echo {marker} > /dev/kmsg; sysctl -q kernel.ftrace_enabled=0; dmesg | grep -c {marker}"],
                         capture_output=True, text=True, timeout=120)
    assert res.stdout == "1\n", res.stderr
    assert Path("/proc/sys/kernel/ftrace_enabled").read_text() == ftrace
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    host_log = []
    try:
        while True:
            try:
                host_log.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    assert not any(marker in record for record in host_log)


def test_unknown_script_and_bad_tree(tmp_path: Path) -> None:
    directory = selftests("6.1")
    res = subprocess.run([*KLPFS, "selftests", "--tree", str(directory), "test-nosuch"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith(f"klpfs selftests: no such selftest in {directory}: test-nosuch.sh (there are: ")
    res = subprocess.run([*KLPFS, "selftests", "--tree", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        1, f"klpfs selftests: {tmp_path}: not a livepatch selftest directory (no functions.sh)\n")


def test_test_modules(tmp_path: Path) -> None:
    """The genuine .ko files a 6.8+ tree's scripts look for, written for the profile:
    ELF files modinfo reads and insmod loads under klpfs run."""
    res = subprocess.run([*KLPFS, "selftests", "--kernel", "6.1", "--test-modules", str(tmp_path / "test_modules")],
                         capture_output=True, text=True, timeout=120)
    written = sorted(res.stdout.split())
    assert len(written) == 13 and str(tmp_path / "test_modules/test_klp_livepatch.ko") in written
    assert all(Path(p).read_bytes()[:4] == b"\x7fELF" for p in written)
    require_fuse()
    res = subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c",
                          "modinfo -F vermagic test_modules/test_klp_livepatch.ko; "
                          "modinfo -F livepatch test_modules/test_klp_callbacks_mod.ko; "
                          "insmod test_modules/test_klp_livepatch.ko && cat /proc/cmdline"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # A field the module lacks prints nothing, as kmod's modinfo.
    assert res.stdout == ("6.1.0-50-amd64 SMP preempt mod_unload modversions \n"
                          "test_klp_livepatch: this has been live patched\n"), res.stderr
