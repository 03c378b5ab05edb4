"""Under `klpfs run`, /proc is the emulated kernel's and the command's own at once:
the emulated files and tasks, the real processes' own entries (self, fd, exe,
status), and those processes as user tasks of the emulated kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fusemount import DEADLINE, KLPFS, require_fuse

PATH = f"{Path(KLPFS[0]).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
"""klpfs itself on PATH inside the run, after the shims."""
WAIT = f"""
wait_for() {{  # wait_for CONDITION WHAT: poll with a {DEADLINE:.0f} s deadline
  end=$(( $(date +%s) + {DEADLINE:.0f} ))
  until eval "$1"; do [ "$(date +%s)" -le "$end" ] || {{ echo "timeout waiting for $2"; exit 3; }}; done
}}
"""


def klpfs_run(script: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", *options, "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=6 * DEADLINE, env={**os.environ, "PATH": PATH})


def proc_mounts() -> list[str]:
    """The host's mounts on /proc and any a run could have left behind."""
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4].startswith("/proc") or "klpfs-run-" in fields[4]:
            lines.append(" ".join(fields[4:]))
    return lines


def test_a_process_keeps_its_own_proc_entries() -> None:
    require_fuse()
    script = r"""
echo "pid=$$"
readlink /proc/self/exe
ls /proc/self/fd | tr '\n' ' '; echo
echo hi | cat /proc/self/fd/0
cat /dev/stdin < /proc/self/comm
grep -e '^Name:' -e '^PPid:' /proc/self/status
cat /proc/self/cmdline | tr '\0' ' '; echo
cat /proc/self/environ | tr '\0' '\n' | grep -c '^KLPFS_MOUNT='
sh -c 'echo "$$"; exec readlink /proc/self' | uniq | wc -l
"""
    run = klpfs_run(script)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert int(lines[0].removeprefix("pid=")) >= 10000  # far above the emulated kernel's tasks
    assert lines[1:] == [os.path.realpath(shutil.which("readlink") or "readlink"), "0 1 2 3 ", "hi",
                         "sh",  # the shell opened it, for cat's stdin
                         "Name:\tgrep", f"PPid:\t{lines[0].removeprefix('pid=')}", "cat /proc/self/cmdline ",
                         "1", "1"]


def test_patch_state_of_a_shell_and_of_new_processes() -> None:
    """As on a kernel (and on the plain mount, tests/fs/test_proc.py): -1 with no
    transition; during a held one a new process inherits its switched shell's 1."""
    require_fuse()
    script = WAIT + r"""
echo "idle=$(cat /proc/self/patch_state)"
holder=$(klpfs task add holder --kthread)
klpfs task sleep "$holder" cmdline_proc_show >/dev/null
insmod livepatch-sample.ko
P=/sys/kernel/livepatch/livepatch_sample
echo "transition=$(cat $P/transition)"
echo "new=$(cat /proc/self/patch_state) shell=$(cat /proc/$$/patch_state)"
echo "thread=$(cat /proc/$$/task/$$/patch_state) holder=$(cat /proc/$holder/patch_state)"
grep -c 'cmdline_proc_show' /proc/$holder/stack
klpfs task wake "$holder" >/dev/null
wait_for '[ "$(cat $P/transition)" = 0 ]' "the transition to complete"
echo "after=$(cat /proc/self/patch_state)"
"""
    run = klpfs_run(script, "--kernel", "6.1", "-o", "speed=10")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == ["idle=-1", "transition=1", "new=1 shell=1", "thread=1 holder=0", "1",
                                       "after=-1"]


def test_klpfs_ps_lists_the_command() -> None:
    require_fuse()
    run = klpfs_run('echo "$$"; klpfs ps')
    assert run.returncode == 0, run.stderr
    shell, *table = run.stdout.splitlines()
    rows = {fields[0]: fields for fields in (line.split() for line in table[1:])}
    assert rows[shell][1:4] == ["sh", "user", "S"], table
    assert rows["812"][1] == "bash"  # the emulated console shell is still there


def test_kpatch_lists_the_stalled_kthread() -> None:
    """kpatch's listing of stalled tasks: every /proc/*/task/*/patch_state that is
    not the target, with the task's comm and kernel stack."""
    require_fuse()
    script = r"""
modprobe klp-busy || exit 10
insmod klp-busy-patch.ko || exit 11
P=/sys/kernel/livepatch/klp_busy_patch
for i in 1 2 3; do
  [ "$(cat $P/transition)" = 0 ] && { echo "transition done"; exit 4; }
  sleep 0.1
done
target=$(cat $P/enabled)
for state in /proc/*/task/*/patch_state; do
  s=$(cat "$state" 2>/dev/null)  # /proc/self/... is cat's own by then: gone
  [ -z "$s" ] || [ "$s" = "$target" ] && continue
  task=${state%/patch_state}
  pid=${task#/proc/}; pid=${pid%%/*}
  echo "$(cat "$task/comm") $pid"
  cat "/proc/$pid/stack"
done
"""
    run = klpfs_run(script)
    assert run.returncode == 0, run.stdout + run.stderr
    comm, pid = run.stdout.splitlines()[0].split()
    assert comm == "klp_busy" and int(pid) < 10000
    assert run.stdout.splitlines()[1:] == [  # the scheduler's functions are not shown
        "[<0>] busy_fn+0x20/0x40 [klp_busy]",
        "[<0>] kthread+0x9c/0x138",
        "[<0>] ret_from_fork+0x1a/0x35"]


def test_emulated_and_real_entries_side_by_side() -> None:
    """The emulated files and task directories, the real ones, and sysctls of both."""
    require_fuse()
    script = r"""
cat /proc/1/comm /proc/812/comm
cut -d' ' -f1-4 /proc/812/stat
grep -e '^State:' -e '^PPid:' /proc/2/status
head -c 29 /proc/version; echo
ls /proc | grep -c -x -e self -e thread-self -e sys -e 812 -e "$$" -e meminfo
sysctl -n kernel.ftrace_enabled
[ "$(sysctl -n kernel.pid_max)" -gt 0 ] && echo "host sysctl"
"""
    run = klpfs_run(script, "--kernel", "6.1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["systemd", "bash", "812 (bash) S 811", "State:\tS (sleeping)",
                                       "PPid:\t0", "Linux version 6.1.0-50-amd64 ", "6", "1", "host sysctl"]


def test_host_proc_untouched() -> None:
    require_fuse()
    before, cmdline = proc_mounts(), Path("/proc/cmdline").read_text()
    run = klpfs_run("cat /proc/cmdline; grep -c '^klpfs /proc fuse.klpfs ' /proc/mounts")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1] == "1"
    assert run.stdout.splitlines()[0] != cmdline.strip()
    assert proc_mounts() == before
    assert Path("/proc/cmdline").read_text() == cmdline


def test_command_status_and_missing_command() -> None:
    require_fuse()
    assert klpfs_run("exit 7").returncode == 7
    killed = klpfs_run("kill -TERM $$")
    assert killed.returncode == 128 + 15
    missing = subprocess.run([*KLPFS, "run", "--", "no-such-command"], capture_output=True, text=True,
                             timeout=6 * DEADLINE)
    assert (missing.returncode, missing.stderr) == (127, "klpfs run: no-such-command: command not found\n")


def test_threads_read_their_process_task(tmp_path: Path) -> None:
    """/proc/thread-self and a thread's own /proc/<tid> (unlisted) are the real
    thread's, with its process's emulated patch_state."""
    require_fuse()
    (tmp_path / "threads.py").write_text(
        "import os, threading\n"
        "def look():\n"
        "    tid = threading.get_native_id()\n"
        "    print(os.readlink('/proc/thread-self') == f'{os.getpid()}/task/{tid}',\n"
        "          open(f'/proc/{tid}/patch_state').read().strip(),\n"
        "          open('/proc/thread-self/stat').read().split()[0] == str(tid))\n"
        "t = threading.Thread(target=look)\n"
        "t.start()\n"
        "t.join()\n")
    run = klpfs_run(f'exec "{sys.executable}" {tmp_path / "threads.py"}')
    assert (run.returncode, run.stdout) == (0, "True -1 True\n"), run.stderr
