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


def write_record(mountpoint: str | Path, kernel: str) -> DaemonRecord:
    """Announce this process as the daemon of mountpoint (the directory is made 0700)."""
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
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


def _alive(record: DaemonRecord) -> bool:
    """Whether the daemon runs; one whose pid cannot be seen from here (a klpfs run's
    command) runs while its socket is there (the daemon removes it when it stops)."""
    if record.pidns and record.pidns != _pid_namespace():
        return os.path.exists(record.socket)
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_daemons() -> list[DaemonRecord]:
    """Every daemon whose record is here and whose process is alive."""
    records = []
    directory = runtime_dir()
    if not directory.is_dir():
        return []
    for path in sorted(directory.glob("*.json")):
        try:
            record = DaemonRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _alive(record):
            records.append(record)
    return records


class NoDaemon(Exception):
    """No daemon could be chosen; the message says why and what to do."""


def find_daemon(mountpoint: str | None) -> DaemonRecord:
    """The daemon serving mountpoint, or the only one running when none is named."""
    daemons = running_daemons()
    if mountpoint is not None:
        wanted = {os.path.abspath(mountpoint), os.path.realpath(mountpoint)}
        for record in daemons:
            if record.mountpoint in wanted or os.path.realpath(record.mountpoint) in wanted:
                return record
        _not_yours()
        raise NoDaemon(f"no klpfs daemon is serving {mountpoint} (start one with: klpfs mount {mountpoint})")
    if len(daemons) == 1:
        return daemons[0]
    if not daemons:
        _not_yours()
        raise NoDaemon("no klpfs daemon is running (start one with: klpfs mount MNT)")
    mounts = ", ".join(d.mountpoint for d in daemons)
    raise NoDaemon(f"several klpfs daemons are running ({mounts}); name one with --mount MNT")


def _not_yours() -> None:
    """A user who finds no daemon of their own where root runs some is told why."""
    if os.geteuid() != 0 and ROOT_RUNTIME_DIR.exists():
        raise NoDaemon(f"the klpfs daemons here are root's ({ROOT_RUNTIME_DIR}): only a daemon's "
                       "owner may use its control socket; run this as root")
