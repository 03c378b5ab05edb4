"""`klpfs mount --kallsyms FILE --release R`: the mount shows that build, and a file that
cannot be one is refused before anything is mounted."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, make_mountpoint, require_fuse

from klpfs.fs.mountinfo import find_mount
from klpfs.pytest_plugin import Emulator


def host_vmlinux_lines() -> list[str]:
    """The running kernel's vmlinux symbols (CI runs as root: real addresses)."""
    return [line for line in Path("/proc/kallsyms").read_text().splitlines() if "\t[" not in line]


def test_host_kallsyms_listed_as_given(mount_klpfs: Callable[..., Mount]) -> None:
    host = host_vmlinux_lines()
    assert int(host[0].split()[0], 16) != 0
    m = mount_klpfs("6.1", ["kallsyms=/proc/kallsyms"])
    shown = (m / "proc/kallsyms").read_text().splitlines()
    assert shown[:len(host)] == host
    assert (m / "proc/cmdline").read_text().startswith("BOOT_IMAGE=")


def test_cli_flags_name_the_build(mount_klpfs: Callable[..., Mount], tmp_path: Path) -> None:
    require_fuse()
    table = tmp_path / "System.map"
    table.write_text("ffffffff81000000 T _stext\nffffffff81000040 t only_here\nffffffff81000100 D data\n")
    m = Mount([*KLPFS, "mount", "-f", "--kernel", "6.1", "--kallsyms", str(table), "--release", "6.1.0-28-amd64"])
    try:
        m.start()
        assert (m / "proc/kallsyms").read_text().splitlines()[:3] == table.read_text().splitlines()
        assert (m / "proc/version").read_text().startswith("Linux version 6.1.0-28-amd64 ")
    finally:
        m.stop()


def test_bad_file_mounts_nothing(tmp_path: Path) -> None:
    require_fuse()
    table = tmp_path / "kallsyms"
    table.write_text("ffffffff81000000 T _stext\nffffffff81000040 t\n")
    path = make_mountpoint()
    try:
        res = subprocess.run([*KLPFS, "mount", "--kallsyms", str(table), str(path)], capture_output=True, text=True,
                             timeout=DEADLINE)
        assert (res.returncode, res.stderr) == (
            1, f"klpfs: {table}:2: not an `ADDRESS TYPE NAME` line: 'ffffffff81000040 t'\n")
        assert find_mount(str(path)) is None
        empty = tmp_path / "empty"
        empty.write_text("")
        res = subprocess.run([*KLPFS, "mount", "--kallsyms", str(empty), str(path)], capture_output=True, text=True,
                             timeout=DEADLINE)
        assert (res.returncode, res.stderr) == (1, f"klpfs: {empty}: no symbols (an empty file?)\n")
        res = subprocess.run([*KLPFS, "mount", "--symvers", str(empty), str(path)], capture_output=True, text=True,
                             timeout=DEADLINE)
        assert (res.returncode, res.stderr) == (
            1, f"klpfs: {empty}: no CRC for module_layout (not a Module.symvers of a kernel with modversions)\n")
        assert find_mount(str(path)) is None
    finally:
        path.rmdir()


@pytest.mark.klpfs(kernel="6.1", kallsyms="/proc/kallsyms", release="6.1.0-28-amd64")
def test_fixture_options(klpfs_emulator: Emulator) -> None:
    assert klpfs_emulator.read("proc/version").startswith("Linux version 6.1.0-28-amd64 ")
    assert klpfs_emulator.read("proc/kallsyms").splitlines()[:3] == host_vmlinux_lines()[:3]
    pid = klpfs_emulator.add_task("holder", kthread=True)
    function = next(line.split()[2] for line in host_vmlinux_lines() if line.split()[1] == "T"
                    and line.split()[2] not in ("_stext", "_text") and not line.split()[2].startswith("__pfx_"))
    klpfs_emulator.sleep_in(pid, function)
    assert f"] {function}+0x" in klpfs_emulator.read(f"proc/{pid}/stack")
