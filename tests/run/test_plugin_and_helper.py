"""The pytest plugin's fixture as a project would use it, and the fstab mount helper."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, is_klpfs_mount, make_mountpoint, require_fuse, wait_until

from klpfs.pytest_plugin import Emulator, KlpfsError

P = "sys/kernel/livepatch/livepatch_sample"


def test_fixture_default_kernel(klpfs_emulator: Emulator) -> None:
    assert klpfs_emulator.kernel == "4.15"
    klpfs_emulator.insmod("livepatch-sample")
    klpfs_emulator.wait_for(f"{P}/transition", "0")
    assert klpfs_emulator.read("proc/cmdline") == "this has been live patched\n"
    assert klpfs_emulator.lsmod() == ["livepatch_sample"]
    with pytest.raises(KlpfsError) as info:
        klpfs_emulator.rmmod("livepatch_sample")
    assert info.value.errno == errno.EAGAIN
    with pytest.raises(OSError) as written:
        klpfs_emulator.write(f"{P}/enabled", "2")
    assert written.value.errno == errno.EINVAL


@pytest.mark.klpfs(kernel="6.1", speed=10)
def test_fixture_marker_and_held_transition(klpfs_emulator: Emulator) -> None:
    assert klpfs_emulator.kernel == "6.1"
    pid = klpfs_emulator.add_task("holder", kthread=True)
    klpfs_emulator.sleep_in(pid, "cmdline_proc_show")
    klpfs_emulator.insmod("livepatch-sample")
    assert klpfs_emulator.read(f"{P}/vmlinux/patched") == "1\n"
    assert klpfs_emulator.call("cmdline_proc_show", pid)[0] == "cmdline_proc_show"
    assert klpfs_emulator.read(f"{P}/transition") == "1\n"
    klpfs_emulator.wake(pid)
    klpfs_emulator.wait_for(f"{P}/transition", "0")
    klpfs_emulator.write(f"{P}/enabled", "0")
    wait_until(lambda: not (klpfs_emulator / P).exists(), "the freed patch's directory to go")
    klpfs_emulator.rmmod("livepatch_sample")
    assert "livepatch: 'livepatch_sample': unpatching complete" in klpfs_emulator.dmesg()


@pytest.mark.klpfs(kernel="6.12")
def test_fixture_on_6_12_insmod_returns_with_the_transition_over(klpfs_emulator: Emulator) -> None:
    """6.12 obs #2: with nothing holding it, the transition is over when insmod returns."""
    assert klpfs_emulator.kernel == "6.12"
    klpfs_emulator.insmod("livepatch-sample")
    assert klpfs_emulator.read(f"{P}/transition") == "0\n"
    assert klpfs_emulator.read(f"{P}/replace") == "0\n"
    assert klpfs_emulator.dmesg()[-1] == "livepatch: 'livepatch_sample': patching complete"


def test_fstab_mount_helper() -> None:
    require_fuse()
    helper = str(Path(KLPFS[0]).with_name("mount.fuse.klpfs"))
    mnt = make_mountpoint()
    try:
        run = subprocess.run([helper, "klpfs", str(mnt), "-o", "kernel=6.14,nofail,defaults,speed=10"],
                             capture_output=True, text=True, timeout=DEADLINE)
        assert run.returncode == 0, run.stderr
        assert is_klpfs_mount(mnt)
        subprocess.run([*KLPFS, "insmod", "-m", str(mnt), "livepatch-sample"], check=True, timeout=DEADLINE)
        assert (mnt / P / "stack_order").read_text() == "1\n"
    finally:
        subprocess.run([*KLPFS, "umount", str(mnt)], timeout=DEADLINE)
        wait_until(lambda: not is_klpfs_mount(mnt), "the helper's mount to go")
        mnt.rmdir()
