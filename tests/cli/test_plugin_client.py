"""The pytest fixture's wait() and status(), as `klpfs wait` and `klpfs status --json`."""

from __future__ import annotations

import errno

import pytest

from klpfs.pytest_plugin import Emulator, KlpfsError

P = "sys/kernel/livepatch/livepatch_sample"


@pytest.mark.klpfs(kernel="4.15", speed=10)
def test_wait_and_status(klpfs_emulator: Emulator) -> None:
    pid = klpfs_emulator.add_task("holder", kthread=True)
    klpfs_emulator.sleep_in(pid, "cmdline_proc_show")
    klpfs_emulator.insmod("livepatch-sample")
    with pytest.raises(AssertionError) as held:
        klpfs_emulator.wait(timeout=0.2)
    lines = str(held.value).splitlines()
    assert lines[0] == "the transition was still under way after 0.2s:"
    assert f"    {pid} holder (kthread, D): sleeping on function cmdline_proc_show" in lines
    transition = klpfs_emulator.status().transition
    assert transition is not None
    assert [(b.task.pid, b.reason, b.function) for b in transition.blocking] == [
        (pid, "sleeping", "cmdline_proc_show")]
    klpfs_emulator.wake(pid)
    klpfs_emulator.wait()
    assert klpfs_emulator.read(f"{P}/transition") == "0\n"
    assert klpfs_emulator.status().transition is None


def test_a_refusal_is_klpfs_error_with_the_errno(klpfs_emulator: Emulator) -> None:
    with pytest.raises(KlpfsError) as refused:
        klpfs_emulator.rmmod("livepatch_sample")
    assert (refused.value.errno, refused.value.not_loaded) == (errno.ENOENT, True)
