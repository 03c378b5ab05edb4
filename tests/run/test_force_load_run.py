"""`insmod -f` and modprobe's --force flags under `klpfs run`, with a real .ko built
against Debian 6.1.0-50's headers: kmod's tools pass finit_module()'s
MODULE_INIT_IGNORE_* flags, the kernel (6.1: CONFIG_MODULE_FORCE_LOAD) loads the
module tainted F; 4.15's profile has no force load and refuses; busybox's insmod
has no -f and takes it for the file name."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from elf.conftest import kos  # noqa: F401  (the built fixture modules)
from elf.conftest import module_name
from fusemount import DEADLINE, KLPFS, require_fuse

STEM = "klpfs-ko-target"
NAME = module_name(STEM)
BUILT = "6.1.0-50-amd64 SMP preempt mod_unload modversions "
DISAGREES = f"{NAME}: disagrees about version of symbol module_layout"


@pytest.fixture
def modules(kos: dict[str, Path], tmp_path: Path) -> Path:  # noqa: F811
    """A --modules directory holding the target module, for modprobe to find by name."""
    directory = tmp_path / "modules"
    directory.mkdir()
    shutil.copy(kos[STEM], directory / f"{STEM}.ko")
    return directory


def run(modules: Path, script: str, *options: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"PATH": path} if path else {})}
    return subprocess.run([*KLPFS, "run", *options, "--modules", str(modules), "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=6 * DEADLINE, cwd=modules, env=env)


def symvers(tmp_path: Path) -> str:
    """A Module.symvers whose module_layout CRC is not the fixture modules'."""
    path = tmp_path / "Module.symvers"
    path.write_text("0x12345678\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n")
    return str(path)


def test_insmod_force_on_6_1(modules: Path, tmp_path: Path) -> None:
    require_fuse()
    script = f"""
insmod {STEM}.ko; echo "plain=$?"; dmesg -t | tail -n 1; cat /proc/sys/kernel/tainted
insmod -f {STEM}.ko; echo "forced=$?"; dmesg -t | grep 'kernel tainted'; cat /proc/sys/kernel/tainted
grep {NAME} /proc/modules | cut -d' ' -f7; lsmod | grep -c {NAME}
"""
    res = run(modules, script, "--kernel", "6.1", "--symvers", symvers(tmp_path))
    assert res.stderr == (f"insmod: ERROR: could not insert module {STEM}.ko: Invalid module format\n"
                          f"{STEM}.ko: module_layout CRC 0xbce1a965, this kernel's is 0x12345678\n")
    assert res.stdout.splitlines() == ["plain=1", DISAGREES, "0", "forced=0",
                                       f"{NAME}: module_layout: kernel tainted.", "12290", "(FOE)", "1"]


def test_modprobe_force_flags(modules: Path, tmp_path: Path) -> None:
    """--force-vermagic leaves the CRC checked; --force-modversion leaves the vermagic
    to be compared whole, the release too; -f passes both."""
    require_fuse()
    script = f"""
modprobe --force-vermagic {STEM}; echo "vermagic=$?"; dmesg -t | tail -n 1
modprobe --force-modversion {STEM}; echo "modversion=$?"; dmesg -t | tail -n 1
modprobe -f {STEM}; echo "both=$?"; cat /proc/sys/kernel/tainted
"""
    res = run(modules, script, "--kernel", "6.1", "--release", "6.1.0-28-amd64", "--symvers", symvers(tmp_path))
    assert res.stdout.splitlines() == [
        "vermagic=1", DISAGREES,
        "modversion=1", f"{NAME}: version magic '{BUILT}' should be '6.1.0-28-amd64 SMP preempt mod_unload "
                        "modversions '",
        "both=0", "12290"]
    ko = modules / f"{STEM}.ko"
    assert res.stderr == (f"modprobe: ERROR: could not insert '{NAME}': {ko}: module_layout CRC 0xbce1a965, "
                          "this kernel's is 0x12345678\n"
                          f"modprobe: ERROR: could not insert '{NAME}': {ko}: built for '{BUILT}', "
                          "this kernel is '6.1.0-28-amd64 SMP preempt mod_unload modversions '\n")


def test_insmod_force_refused_without_force_load(modules: Path) -> None:
    """4.15 (no CONFIG_MODULE_FORCE_LOAD): the vermagic mismatch is refused either way."""
    require_fuse()
    script = f"""
insmod {STEM}.ko; echo "plain=$?"; dmesg -t | tail -n 1
insmod -f {STEM}.ko; echo "forced=$?"; dmesg -t | tail -n 1; cat /proc/sys/kernel/tainted
"""
    res = run(modules, script, "--kernel", "4.15")
    line = f"{NAME}: version magic '{BUILT}' should be '4.15.0-213-generic SMP mod_unload modversions '"
    assert res.stdout.splitlines() == ["plain=1", line, "forced=1", line, "0"]
    refused = f"insmod: ERROR: could not insert module {STEM}.ko: Invalid module format\n"
    assert res.stderr == (f"{refused}{STEM}.ko: built for '{BUILT}', this kernel is '4.15.0-213-generic SMP "
                          f"mod_unload modversions '\n{refused}{STEM}.ko: bad vermagic, and this kernel has no "
                          "CONFIG_MODULE_FORCE_LOAD\n")


def test_busybox_insmod_has_no_force(modules: Path, tmp_path: Path) -> None:
    """busybox's insmod (no 2.4 module support) takes its first argument as the file."""
    require_fuse()
    busybox = shutil.which("busybox")
    assert busybox is not None, "busybox is not installed (scripts/setup installs Debian's busybox)"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "insmod").symlink_to(busybox)
    res = run(modules, f'insmod -f {STEM}.ko; echo "rc=$?"', "--kernel", "6.1",
              path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.stdout == "rc=254\n"
    assert res.stderr == "insmod: can't insert '-f': No such file or directory\n"
