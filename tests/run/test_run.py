"""`klpfs run`: shell scripts written the way real livepatch tools are, run
unmodified against the emulator at /sys/kernel/livepatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, NOBODY, require_fuse

TOOL = r"""
set -u
P=/sys/kernel/livepatch/livepatch_sample
insmod /lib/modules/$(uname -r)/extra/livepatch-sample.ko || exit 10
wait_for() {  # wait_for CONDITION WHAT: the tool's 10 s timeout
  for _ in $(seq 100); do eval "$1" && return 0; sleep 0.1; done
  echo "timeout waiting for $2"; exit 3
}
wait_for '[ "$(cat $P/transition)" = 0 ]' "the patching transition"
echo "enabled=$(cat $P/enabled)"
echo "refcnt=$(cat /sys/module/livepatch_sample/refcnt)"
echo "livepatch=$(modinfo -F livepatch livepatch_sample)"
lsmod | grep -c '^livepatch_sample '
rmmod livepatch_sample; echo "rmmod while enabled: $?"
freed=0   # 5.1 and later (force, no signal) free a disabled patch
[ ! -e $P/signal ] && [ -e $P/force ] && freed=1
echo 0 > $P/enabled
if [ $freed = 1 ]; then
  wait_for '[ ! -d $P ]' "the patch directory to go"
else
  wait_for '[ "$(cat $P/enabled)$(cat $P/transition)" = 00 ]' "the unpatching transition"
fi
rmmod livepatch_sample && echo removed
[ -e /sys/module/livepatch_sample ] || echo "module directory gone"
dmesg | grep -c "livepatch: 'livepatch_sample': unpatching complete"
"""


def klpfs_run(*args: str, script: str | None = None, user: str | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*(NOBODY if user == "nobody" else []), *KLPFS, "run", *args]
    if script is not None:
        argv += ["--", "sh", "-c", script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=6 * DEADLINE, cwd=cwd)


def mountinfo() -> list[str]:
    """The host's mounts under /sys, and any a run could have left behind.

    (Other tests' own klpfs mounts come and go meanwhile; they are not compared.)
    """
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mountpoint, fstype = fields[4], fields[fields.index("-") + 1]
        if mountpoint.startswith("/sys") or "klpfs-run-" in mountpoint or fstype == "tmpfs" and "/sys" in line:
            lines.append(" ".join(fields[4:]))
    return lines


@pytest.mark.parametrize("kernel, signal_attr", [("4.15", False), ("4.16", True), ("5.1", False),
                                                 ("latest", False)])
def test_a_tool_script_end_to_end(kernel: str, signal_attr: bool) -> None:
    require_fuse()
    before = mountinfo()
    run = klpfs_run("--kernel", kernel, "-o", "speed=10", script=TOOL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == ("enabled=1\nrefcnt=1\nlivepatch=Y\n1\nrmmod while enabled: 1\n"
                          "removed\nmodule directory gone\n1\n")
    assert run.stderr == "rmmod: ERROR: Module livepatch_sample is in use\n"
    assert mountinfo() == before


def test_a_held_transition_hits_the_tools_timeout() -> None:
    require_fuse()
    script = r"""
modprobe klp-busy || exit 10
insmod klp-busy-patch.ko || exit 11
for _ in $(seq 10); do
  [ "$(cat /sys/kernel/livepatch/klp_busy_patch/transition)" = 0 ] && { echo done; exit 0; }
  sleep 0.1
done
echo "transition stuck: $(cat /sys/kernel/livepatch/klp_busy_patch/enabled)" \
     "$(cat /sys/kernel/livepatch/klp_busy_patch/transition)"
dmesg -l debug | grep -c "klp_check_stack: klp_busy:[0-9]* is sleeping on function busy_fn" || true
exit 3
"""
    run = klpfs_run("-o", "speed=10", script=script)
    assert (run.returncode, run.stdout) == (3, "transition stuck: 1 1\n0\n"), run.stderr


def test_exit_status_and_missing_command() -> None:
    require_fuse()
    assert klpfs_run(script="exit 7").returncode == 7
    missing = klpfs_run("--", "no-such-command-here")
    assert (missing.returncode, missing.stderr) == (127, "klpfs run: no-such-command-here: command not found\n")
    nothing = klpfs_run()
    assert (nothing.returncode, nothing.stderr) == (
        2, "klpfs run: no COMMAND given (klpfs run [options] -- COMMAND ...)\n")


def test_modules_directory(tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "my-fix.toml").write_text(
        '[module]\ndescription = "my fix"\n[[function]]\nname = "my_version_proc_show"\noutput = "fixed\\n"\n'
        '[[patch.object]]\nname = "vmlinux"\n[[patch.object.func]]\nold_name = "version_proc_show"\n'
        'new_func = "my_version_proc_show"\n')
    script = "modprobe my_fix && modinfo -F description my-fix && ls /sys/kernel/livepatch && modprobe -r nosuch"
    run = klpfs_run("--modules", str(tmp_path), script=script)
    assert (run.returncode, run.stdout) == (1, "my fix\nmy_fix\n")
    assert run.stderr == "modprobe: FATAL: Module nosuch is not currently loaded\n"
    bad = klpfs_run("--modules", str(tmp_path / "nope"), script="true")
    assert (bad.returncode, bad.stderr) == (1, f"klpfs run: --modules {tmp_path / 'nope'}: not a directory\n")


def test_shim_formats() -> None:
    require_fuse()
    script = r"""
insmod nosuch.ko; echo "insmod=$?"
modprobe nosuch; echo "modprobe=$?"
rmmod nosuch; echo "rmmod=$?"
modinfo nosuch; echo "modinfo=$?"
insmod livepatch-sample.ko && insmod livepatch-sample.ko; echo "again=$?"
modprobe livepatch-sample; echo "modprobe loaded=$?"
modinfo livepatch-sample | head -3
dmesg --level bogus; echo "dmesg=$?"
"""
    run = klpfs_run(script=script)
    assert run.stdout.splitlines() == [
        "insmod=1", "modprobe=1", "rmmod=1", "modinfo=1", "again=1", "modprobe loaded=0",
        f"filename:       {Path(sys.modules['klpfs'].__file__).parent / 'data/modules/livepatch-sample.py'}",
        "livepatch:      Y", "license:        GPL", "dmesg=1"]
    assert run.stderr.splitlines() == [
        "insmod: ERROR: could not load module nosuch.ko: No such file or directory",
        "modprobe: FATAL: Module nosuch not found in directory /lib/modules/4.15.0-213-generic",
        "rmmod: ERROR: Module nosuch is not currently loaded",
        "modinfo: ERROR: Module nosuch not found.",
        "insmod: ERROR: could not insert module livepatch-sample.ko: File exists",
        "dmesg: unknown level 'bogus'"]


def test_host_mounts_untouched() -> None:
    require_fuse()
    before = mountinfo()
    had_livepatch = Path("/sys/kernel/livepatch").exists()
    # /sys/kernel is the emulator's (a bind of the mount's sys/kernel), livepatch in it.
    run = klpfs_run(script="ls -d /sys/kernel/livepatch && grep -c ' /sys/kernel .* - fuse.klpfs ' "
                           "/proc/self/mountinfo")
    assert (run.returncode, run.stdout) == (0, "/sys/kernel/livepatch\n1\n"), run.stderr
    assert mountinfo() == before
    assert Path("/sys/kernel/livepatch").exists() == had_livepatch


def test_needs_root() -> None:
    run = klpfs_run(script="true", user="nobody")
    assert run.returncode == 1
    assert run.stderr.startswith("klpfs run: needs root: it makes a private mount namespace and mounts over "
                                 "/sys/kernel and /sys/module (CAP_SYS_ADMIN)")


def test_klpfs_commands_inside_a_run_show_modules_too() -> None:
    require_fuse()
    script = ("klpfs insmod livepatch-callbacks-mod && cat /sys/module/livepatch_callbacks_mod/initstate "
              "&& klpfs rmmod livepatch_callbacks_mod && ls /sys/module/livepatch_callbacks_mod")
    run = subprocess.run([*KLPFS, "run", "--", "sh", "-c", script], capture_output=True, text=True,
                         timeout=6 * DEADLINE, env={"PATH": f"{Path(KLPFS[0]).parent}:/usr/bin:/bin"})
    assert run.returncode == 2 and run.stdout == "live\n", run.stderr
    assert "No such file or directory" in run.stderr


def test_keep_mounted_stays_until_interrupted() -> None:
    require_fuse()
    proc = subprocess.Popen([*KLPFS, "run", "--keep-mounted", "--", "sh", "-c", "exit 5"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("klpfs run: the emulator stays up; enter it with: nsenter --mount --target ")
        pid = int(line.rsplit(" ", 1)[1])
        listing = subprocess.run(["nsenter", "--mount", f"--target={pid}", "ls", "-d", "/sys/kernel/livepatch"],
                                 capture_output=True, text=True, timeout=DEADLINE)
        assert listing.stdout == "/sys/kernel/livepatch\n"
        proc.terminate()
        assert proc.wait(timeout=DEADLINE) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
