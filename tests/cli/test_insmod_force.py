"""`klpfs insmod -f`: the CLI passes finit_module()'s MODULE_INIT_IGNORE_* flags as
kmod's `insmod -f` does; a module built for the running kernel then loads tainted F
where the kernel has CONFIG_MODULE_FORCE_LOAD (6.1), and is refused where it has not (4.15)."""

from __future__ import annotations

from cli.test_commands import klpfs, ok, read


def test_forced_insmod_taints(mount_klpfs) -> None:
    m = mount_klpfs(kernel="6.1")
    assert ok(m, "insmod", "-f", "livepatch-sample") == ""
    assert ok(m, "dmesg").splitlines()[0].endswith("] livepatch_sample: bad vermagic: kernel tainted.")
    assert read(m, "sys/module/livepatch_sample/taint") == "FK\n"


def test_forced_insmod_refused_without_force_load(mount_klpfs) -> None:
    m = mount_klpfs(kernel="4.15")
    run = klpfs(m, "insmod", "-f", "livepatch-sample")
    assert (run.returncode, run.stderr) == (
        1, "insmod: ERROR: could not insert module livepatch-sample: Invalid module format\n"
           "livepatch_sample: bad vermagic, and this kernel has no CONFIG_MODULE_FORCE_LOAD\n")
    assert ok(m, "lsmod") == "Module                  Size  Used by\n"
