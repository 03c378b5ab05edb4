"""Where a running daemon's control socket lives, and how a client finds it.

Each daemon puts a socket and a small JSON record, named after a hash of its
mountpoint, in a directory only its owner can enter.  A client finds the
daemon from the mountpoint it names, or takes the only one running.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


ROOT_RUNTIME_DIR = Path("/run/klpfs")


def runtime_dir() -> Path:
    """$KLPFS_RUNTIME_DIR if set (klpfs run keeps its daemon apart this way);
    else /run/klpfs for root, $XDG_RUNTIME_DIR/klpfs or /tmp/klpfs-UID for others."""
    override = os.environ.get("KLPFS_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return ROOT_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "klpfs" if xdg else Path(f"/tmp/klpfs-{os.geteuid()}")


def _key(mountpoint: str | Path) -> str:
    # abspath, never realpath: the daemon must not look up paths under its own
    # mount from the thread that serves it (the lookup would wait on itself).
    return hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


def socket_path(mountpoint: str | Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.sock"


def record_path(mountpoint: str | Path) -> Path:
    return runtime_dir() / f"{_key(mountpoint)}.json"


@dataclass(frozen=True)
class DaemonRecord:
    mountpoint: str
    pid: int
    kernel: str
    socket: str
    pidns: str = ""
    """The PID namespace `pid` belongs to ("pid:[inode]"; klpfs run's commands are in another)."""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def make_runtime_dir() -> Path:
    """The runtime directory, made if missing; 0700 either way: only its owner may
    reach the sockets in it."""
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def write_record(mountpoint: str | Path, kernel: str) -> DaemonRecord:
    """Announce this process as the daemon of mountpoint (its socket listens already)."""
    make_runtime_dir()
    record = DaemonRecord(os.path.abspath(mountpoint), os.getpid(), kernel, str(socket_path(mountpoint)),
                          _pid_namespace())
    path = record_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.__dict__))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return record


def remove_record(mountpoint: str | Path) -> None:
    for path in (record_path(mountpoint), socket_path(mountpoint)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _read_record(path: Path) -> DaemonRecord | None:
    try:
        return DaemonRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _exited(pid: int) -> bool:
    """Whether pid is gone or a zombie: a daemon whose parent exited (`klpfs mount`
    returns at once) is reaped by init, which may take its time or never do it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _alive(record: DaemonRecord) -> bool:
    """Whether the daemon runs; one whose pid cannot be seen from here (a klpfs run's
    command) runs while its socket is there (the daemon removes it when it stops)."""
    if record.pidns and record.pidns != _pid_namespace():
        return os.path.exists(record.socket)
    return not _exited(record.pid)


def forget(record: DaemonRecord) -> None:
    """Remove the record and socket a daemon that is gone left behind (SIGKILL leaves
    them), if they are still that daemon's and ours: a new daemon of the same
    mountpoint writes its record over the old one, once its socket listens."""
    path = record_path(record.mountpoint)
    try:
        if path.stat().st_uid != os.geteuid() or _read_record(path) != record:
            return
    except FileNotFoundError:
        return
    remove_record(record.mountpoint)


def _records() -> list[DaemonRecord]:
    directory = runtime_dir()
    if not directory.is_dir():
        return []
    return [r for r in map(_read_record, sorted(directory.glob("*.json"))) if r is not None]


def running_daemons() -> list[DaemonRecord]:
    """Every daemon whose record is here and whose process is alive."""
    return [record for record in _records() if _alive(record)]


class NoDaemon(Exception):
    """No daemon could be chosen; the message says why and what to do."""


def gone(record: DaemonRecord) -> NoDaemon:
    """What to say of a daemon found gone, after removing what it left behind."""
    forget(record)
    return NoDaemon(f"no klpfs daemon is serving {record.mountpoint} (it exited)")


def find_daemon(mountpoint: str | None) -> DaemonRecord:
    """The daemon serving mountpoint, or the only one running when none is named.

    A record whose daemon is gone (killed, so it could not remove it) is removed
    and named in the refusal."""
    records = _records()
    daemons = [record for record in records if _alive(record)]
    if mountpoint is not None:
        wanted = {os.path.abspath(mountpoint), os.path.realpath(mountpoint)}
        serving = [r for r in records if r.mountpoint in wanted or os.path.realpath(r.mountpoint) in wanted]
        live = [record for record in serving if record in daemons]
        if live:
            return live[0]
        if serving:
            raise gone(serving[0])
        _not_yours()
        raise NoDaemon(f"no klpfs daemon is serving {mountpoint} (start one with: klpfs mount {mountpoint})")
    for record in records:
        if record not in daemons:
            forget(record)
    if len(daemons) == 1:
        return daemons[0]
    if not daemons:
        if records:
            raise gone(records[-1])
        _not_yours()
        raise NoDaemon("no klpfs daemon is running (start one with: klpfs mount MNT)")
    mounts = ", ".join(d.mountpoint for d in daemons)
    raise NoDaemon(f"several klpfs daemons are running ({mounts}); name one with --mount MNT")


def _not_yours() -> None:
    """A user who finds no daemon of their own where root runs some is told why."""
    if os.geteuid() != 0 and ROOT_RUNTIME_DIR.exists():
        raise NoDaemon(f"the klpfs daemons here are root's ({ROOT_RUNTIME_DIR}): only a daemon's "
                       "owner may use its control socket; run this as root")
