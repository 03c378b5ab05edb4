"""How `klpfs mount` fits a host: its log level (-d, -o debug), a user's mount without
allow_other, and systemd's Type=notify with the shipped unit (a fake $NOTIFY_SOCKET)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, NOBODY, Mount, is_klpfs_mount, make_mountpoint, require_fuse, wait_until

from klpfs.fs.mountinfo import find_mount

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib/systemd/klpfs@.service"
FUSE_DEFAULTS = "auto_unmount,default_permissions,fsname=klpfs,subtype=klpfs"


def super_options(path: Path) -> list[str]:
    """The FUSE mount's super options in /proc/self/mountinfo (after the " - fuse.klpfs klpfs ")."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return fields[-1].split(",")
    raise AssertionError(f"{path} is not mounted")


@pytest.mark.parametrize("argv", [["mount", "-d"], ["mount", "-f", "-o", "debug"]])
def test_debug_logs_at_debug_level(mount_klpfs: Callable[..., Mount], argv: list[str]) -> None:
    require_fuse()
    m = Mount([*KLPFS, *argv]).start()
    try:
        wait_until(lambda: "INFO klpfs.fs.mount: mounted on" in m.log(), "the mount to be logged")
        assert (f" DEBUG klpfs.fs.mount: mounting on {m.path} with the FUSE options allow_other,{FUSE_DEFAULTS}\n"
                in m.log())
        assert " DEBUG pyfuse3: " in m.log()
        assert "debug" not in super_options(m.path)
    finally:
        m.stop()


def test_info_level_by_default(mount_klpfs: Callable[..., Mount]) -> None:
    m = mount_klpfs()
    wait_until(lambda: "INFO klpfs.fs.mount: mounted on" in m.log(), "the mount to be logged")
    assert " DEBUG " not in m.log()
    assert "allow_other" in super_options(m.path)


def test_a_user_mounts_without_allow_other() -> None:
    """This host's fuse.conf has no user_allow_other: asked for it, fusermount3 would refuse
    the user's mount.  Without it the user, and only the user, reads the tree."""
    require_fuse()
    assert not any(line.strip() == "user_allow_other" for line in Path("/etc/fuse.conf").read_text().splitlines())
    m = Mount([*NOBODY, *KLPFS, "mount", "-f"])
    os.chown(m.path, 65534, 65534)
    m.start()
    try:
        assert "allow_other" not in super_options(m.path)
        assert "user_id=65534" in super_options(m.path)
        listing = subprocess.run([*NOBODY, "ls", str(m.path / "sys/kernel")], capture_output=True, text=True,
                                 timeout=DEADLINE)
        assert listing.stdout.split() == ["debug", "livepatch", "tracing"]
        with pytest.raises(PermissionError):
            os.listdir(m.path / "sys")
    finally:
        m.stop()


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_is_type_notify_and_documented() -> None:
    service = unit()["Service"]
    assert (service["Type"], service["Environment"]) == ("notify", "KLPFS_KERNEL=4.15")
    assert service["ExecStart"] == "/opt/klpfs/.venv/bin/klpfs mount -f --kernel ${KLPFS_KERNEL} %f"
    docs = (ROOT / "docs/containers.md").read_text()
    block = re.search(r"<!-- unit:[^>]*-->\n```ini\n(.*?)```", docs, re.S)
    assert block is not None and block.group(1) == UNIT.read_text()


def test_the_unit_s_command_tells_systemd_when_the_mount_is_ready(tmp_path: Path) -> None:
    """ExecStart as systemd runs it for klpfs@<escaped path>.service: READY=1 arrives once the
    tree is mounted, STOPPING=1 as SIGTERM (systemctl stop) begins the unmount."""
    require_fuse()
    mountpoint = make_mountpoint()
    argv = [arg.replace("${KLPFS_KERNEL}", "4.15").replace("%f", str(mountpoint))
            for arg in shlex.split(unit()["Service"]["ExecStart"])]
    argv[0] = KLPFS[0]
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(DEADLINE)
    daemon = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert manager.recv(64) == b"READY=1"
        assert is_klpfs_mount(mountpoint)
        assert (mountpoint / "sys/kernel/livepatch").is_dir()
        daemon.send_signal(signal.SIGTERM)
        assert manager.recv(64) == b"STOPPING=1"
        assert daemon.wait(timeout=DEADLINE) == 0
        assert find_mount(str(mountpoint)) is None
    finally:
        daemon.kill()
        daemon.wait()
        manager.close()
        if is_klpfs_mount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        wait_until(lambda: not is_klpfs_mount(mountpoint), "the unit's mount to go")
        mountpoint.rmdir()
