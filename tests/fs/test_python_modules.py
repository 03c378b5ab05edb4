"""Python modules through a real mount and the CLI: parameters written with
sh, files the modules create read with cat, a bad module's error."""

from __future__ import annotations

import subprocess

from fusemount import DEADLINE, KLPFS, Mount, wait_until


def klpfs(m: Mount, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*KLPFS, args[0], "-m", str(m.path), *args[1:]], check=check, capture_output=True,
                          text=True, timeout=DEADLINE)


def test_parameter_write_releases_the_busy_target(mount_klpfs) -> None:
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    klpfs(m, "insmod", "test_klp_callbacks_busy", "block_transition=Y")
    params = "sys/module/test_klp_callbacks_busy/parameters/block_transition"
    assert (m.path / params).read_text() == "Y\n"
    kworker = [line for line in klpfs(m, "ps").stdout.splitlines() if "busymod_work_func" in line]
    assert len(kworker) == 1 and kworker[0].endswith(" busymod_work_func [test_klp_callbacks_busy]")
    klpfs(m, "insmod", "test_klp_callbacks_demo")
    transition = m.path / "sys/kernel/livepatch/test_klp_callbacks_demo/transition"
    assert transition.read_text() == "1\n"
    m.run(["sh", "-c", f"echo N > {params}"])
    assert (m.path / params).read_text() == "N\n"
    wait_until(lambda: transition.read_text() == "0\n", "the transition to complete")
    dmesg = klpfs(m, "dmesg").stdout
    assert "test_klp_callbacks_busy: busymod_work_func exit" in dmesg


def test_a_module_proc_file_and_its_patch(mount_klpfs) -> None:
    m = mount_klpfs(kernel="6.1", options=["speed=10"])
    klpfs(m, "insmod", "test_klp_mod_target")
    assert m.run(["cat", "proc/test_klp_mod_target"]).stdout == "test_klp_mod_target: original output\n"
    klpfs(m, "insmod", "test_klp_mod_patch")
    transition = m.path / "sys/kernel/livepatch/test_klp_mod_patch/transition"
    wait_until(lambda: transition.read_text() == "0\n", "the transition to complete")
    assert m.run(["cat", "proc/test_klp_mod_target"]).stdout == "test_klp_mod_patch: this has been live patched\n"


def test_a_module_whose_init_raises(mount_klpfs, tmp_path) -> None:
    m = mount_klpfs(kernel="6.1")
    bad = tmp_path / "bad_init.py"
    bad.write_text("from klpfs.kapi import *\n\n\ndef bad_init():\n    return 1 // 0\n\n\nmodule_init(bad_init)\n")
    res = klpfs(m, "insmod", str(bad), check=False)
    assert res.returncode == 1
    assert res.stderr == (f"insmod: ERROR: could not insert module {bad}: Bad address\n"
                          f"{bad}: init faulted: ZeroDivisionError: integer division or modulo by zero "
                          f"at {bad}:5 in bad_init\n")
    assert "bad_init" not in klpfs(m, "lsmod").stdout
    assert not (m.path / "sys/module/bad_init").exists()
