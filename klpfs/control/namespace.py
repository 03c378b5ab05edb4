"""Mount namespaces and bind mounts for `klpfs run` (Linux syscalls through libc).

Everything here happens in a private mount namespace made by `unshare_mounts`,
so the host's mount table is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(None, use_errno=True)


def has_sys_admin() -> bool:
    """Whether CAP_SYS_ADMIN is in the caller's effective set (CapEff of /proc/self/status)."""
    effective = re.search(r"^CapEff:\s*([0-9a-f]+)$", Path("/proc/self/status").read_text(), re.M)
    return effective is not None and bool(int(effective.group(1), 16) >> CAP_SYS_ADMIN & 1)


class MissingCapability(PermissionError):
    """EPERM from unshare() or mount() of a caller without CAP_SYS_ADMIN.

    unshare_nsproxy_namespaces() (kernel/nsproxy.c) refuses every new
    namespace, and path_mount() (fs/namespace.c, through may_mount()) every
    mount, with EPERM when `ns_capable(..., CAP_SYS_ADMIN)` fails: root with
    the capability dropped (`setpriv --bounding-set -sys_admin`) and a
    container started without `--cap-add SYS_ADMIN` (whose seccomp profile
    also answers EPERM) get there.  The message names what to add.  An EPERM
    with the capability held (mount_too_revealing() refusing a procfs in a
    user namespace) stays a plain OSError: adding the capability would not help.
    """

    def __init__(self, what: str) -> None:
        super().__init__(errno.EPERM, f"{what}: {os.strerror(errno.EPERM)}: CAP_SYS_ADMIN is missing "
                                      "(run it as root with sudo, or give the container --cap-add SYS_ADMIN)")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM and not has_sys_admin():
            raise MissingCapability(what)
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare_mounts() -> None:
    """Enter a new mount namespace whose mounts do not propagate back to the host."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def unshare_pids() -> None:
    """The caller's next child is pid 1 of a new PID namespace; the caller stays outside."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def mount_proc(target: str | Path) -> None:
    """A procfs of the caller's PID namespace at target."""
    _check(_libc.mount(b"proc", str(target).encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
           f"mount proc {target}")


def bind(source: str | Path, target: str | Path) -> None:
    _check(_libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND | MS_REC, None),
           f"mount --rbind {source} {target}")


def mount_tmpfs(target: str | Path) -> None:
    _check(_libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, b"mode=755"), f"mount tmpfs {target}")


def detach(target: str | Path) -> None:
    """umount -l; a target that is no longer mounted is fine."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL,
                                                                                           errno.ENOENT):
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def placeholder_for(source: Path, target: Path) -> None:
    """An empty file or directory at target to bind source onto (a symlink is copied)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
    else:
        target.touch()


def overlay_dir(directory: Path, keep: Path, skip: set[str]) -> list[str]:
    """Make `directory` writable: a tmpfs over it, with its entries bound back from `keep`.

    `keep` first receives a recursive bind of the original, so what was
    mounted below it (debugfs under /sys/kernel, say) comes back too.  Entries
    named in `skip` are left out for the caller to fill.  Returns the names
    bound back.
    """
    keep.mkdir(exist_ok=True)
    bind(directory, keep)
    mount_tmpfs(directory)
    names = []
    for entry in sorted(os.listdir(keep)):
        if entry in skip:
            continue
        source, target = keep / entry, directory / entry
        placeholder_for(source, target)
        if not source.is_symlink():
            bind(source, target)
        names.append(entry)
    return names
