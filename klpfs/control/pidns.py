"""`klpfs run`'s PID namespace: its init, and the /proc its processes see.

`klpfs run` starts ``python -m klpfs.control.pidns PROC_DIR UNION -- COMMAND...``
in its private mount namespace, after the daemon has mounted.  That process
stays outside: it unshares a PID namespace, forks the namespace's init,
passes SIGTERM and SIGHUP on to it (and a SIGTERM if `klpfs run` dies) and
exits with its status.  The init, pid 1 inside:

1. dies with its parent (PR_SET_PDEATHSIG), and with it every process of
   the run, as the end of any PID namespace goes;
2. mounts the namespace's procfs at PROC_DIR in the run's mount namespace,
   where the daemon passes it through (klpfs/fs/procunion.py) and follows
   its processes as tasks (klpfs/fs/realtasks.py);
3. sets the namespace's last pid (ns_last_pid), so the command and its
   children get pids from FIRST_PID on, far above the emulated kernel's own
   tasks and the ones it creates later;
4. takes a mount namespace of its own and binds UNION (the mount's proc/)
   over /proc there: only the run's processes see the union, while the
   daemon, which must never read its own mount, keeps the real /proc;
5. runs COMMAND, reaps every orphan as an init must, and exits with
   COMMAND's status as soon as it ends (which ends the namespace).

Where no PID namespace can be made, or its procfs cannot be mounted (a
container that masks parts of its /proc refuses a new one to an
unprivileged user namespace), klpfs run says so and COMMAND sees the host's
/proc with the emulated files bound over it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from types import FrameType

from klpfs.control import namespace

FIRST_PID = 10000
PR_SET_PDEATHSIG = 1
PASSED_ON = (signal.SIGTERM, signal.SIGHUP)
"""Signals sent to `klpfs run` alone, passed on to the command."""
FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT)
"""Signals the terminal sends the command itself (its whole process group)."""

_libc = ctypes.CDLL(None, use_errno=True)


def _warn(message: str) -> None:
    print(f"klpfs run: {message}", file=sys.stderr, flush=True)


def _exit_status(status: int) -> int:
    """A shell's $? for a wait status: the exit code, or 128 + the killing signal."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _pass_on(signals: Sequence[signal.Signals], pid: int) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in signals:
        signal.signal(sig, handler)


def _ignore(signals: Sequence[signal.Signals]) -> None:
    """A handler that does nothing: unlike SIG_IGN, exec() resets it for the command."""
    for sig in signals:
        signal.signal(sig, lambda signum, frame: None)


def _set_last_pid(proc_dir: str) -> None:
    """Write ns_last_pid (pid_ns_ctl_handler()): the next fork gets FIRST_PID."""
    try:
        with open(f"{proc_dir}/sys/kernel/pid_max") as f:
            first = min(FIRST_PID, int(f.read()) // 2)
        with open(f"{proc_dir}/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(first - 1))
    except (OSError, ValueError) as exc:
        _warn(f"cannot set the run's first pid ({exc}); its processes may take pids of emulated tasks")


def _union_proc(proc_dir: str, union: str) -> None:
    try:
        namespace.mount_proc(proc_dir)
    except OSError as exc:
        _warn(f"/proc: cannot mount the run's procfs ({exc}); the host's /proc stays, "
              "with the emulated files bound over it")
        return
    _set_last_pid(proc_dir)
    namespace.unshare_mounts()
    namespace.bind(union, "/proc")


def _run(command: Sequence[str]) -> int:
    """Start the command (subprocess gives it back the signal dispositions Python
    changed), then reap until it ends; its status."""
    try:
        proc = subprocess.Popen(list(command))
    except FileNotFoundError:
        _warn(f"{command[0]}: command not found")
        return 127
    except OSError as exc:
        _warn(f"{command[0]}: {exc.strerror}")
        return 126
    _pass_on(PASSED_ON, proc.pid)
    while True:
        pid, status = os.waitpid(-1, 0)  # orphans of the namespace are ours to reap
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait for it
            return _exit_status(status)


def _init(proc_dir: str, union: str, command: Sequence[str]) -> int:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _ignore(PASSED_ON)  # until there is a command to pass them on to
    try:
        _union_proc(proc_dir, union)
    except OSError as exc:
        _warn(f"/proc: {exc}")
        return 1
    return _run(command)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        _warn("usage: python -m klpfs.control.pidns PROC_DIR UNION -- COMMAND ...")
        return 2
    proc_dir, union, command = argv[0], argv[1], argv[3:]
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # klpfs run gone: end the command
    _ignore(FROM_TERMINAL)
    try:
        namespace.unshare_pids()
    except OSError as exc:
        _warn(f"/proc: no PID namespace ({exc}); the host's /proc stays, with the emulated files bound over it")
        return _run(command)
    init = os.fork()
    if init == 0:
        status = 1
        try:
            status = _init(proc_dir, union, command)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(status)
    _pass_on(PASSED_ON, init)
    _, status = os.waitpid(init, 0)
    return _exit_status(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
