"""Who made a FUSE request, in the terms of a `klpfs run`'s PID namespace.

FUSE gives the calling thread's id in the daemon's PID namespace (the one
the mount was made from), while /proc/self under the run must name the
caller as it is known inside the run's namespace.  The daemon's own procfs
says both: /proc/<tid>/ns/pid tells whether the thread is in the run's
namespace, and the NStgid and NSpid lines of /proc/<tid>/status give its
ids at every level, the innermost last.

It also tells what the caller is doing, for the links of a real process's
directory (exe, cwd, fd/N): readlink(2) must get the link's own text, while
any other path walk through them must land in the real procfs's magic link
(proc_pid_get_link()), which alone can reopen a pipe or a deleted file.
Both come to the daemon as the same FUSE_READLINK; the system call the
thread is blocked in (/proc/<tid>/syscall) tells them apart.
"""

from __future__ import annotations

import os
import platform

READLINK_SYSCALLS = {
    "x86_64": {89, 267},     # readlink, readlinkat
    "aarch64": {78},         # readlinkat (the generic table has no readlink)
    "riscv64": {78},
}
"""System call numbers that read a link's text, per architecture."""


class Callers:
    """Maps FUSE callers into the PID namespace whose procfs is at `ns_proc`."""

    def __init__(self, ns_proc: str, host_proc: str = "/proc") -> None:
        self._ns_proc = ns_proc
        self._host = host_proc
        self._ns: str | None = None
        self._readlinks = READLINK_SYSCALLS.get(platform.machine())

    def _namespace(self) -> str | None:
        """The run's PID namespace ("pid:[inode]"), once its procfs is mounted."""
        if self._ns is None:
            try:
                self._ns = os.readlink(f"{self._ns_proc}/1/ns/pid")
            except OSError:
                return None
        return self._ns

    def ids(self, host_tid: int) -> tuple[int, int] | None:
        """(tgid, tid) inside the run's namespace, or None for a thread outside it."""
        ns = self._namespace()
        if host_tid <= 0 or ns is None:
            return None
        try:
            if os.readlink(f"{self._host}/{host_tid}/ns/pid") != ns:
                return None
            with open(f"{self._host}/{host_tid}/status", "rb") as f:
                status = f.read().decode(errors="replace")
        except OSError:
            return None
        ids: dict[str, int] = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("NStgid", "NSpid") and value.split():
                ids[key] = int(value.split()[-1])
        if len(ids) != 2:
            return None
        return ids["NStgid"], ids["NSpid"]

    def reading_link(self, host_tid: int) -> bool:
        """Whether the thread asks for a link's text (readlink), not to follow it.

        When that cannot be known (another architecture, no such file), the
        text is what it gets: readlink stays right, only following a link to
        a pipe or a deleted file would fail.
        """
        if self._readlinks is None or host_tid <= 0:
            return True
        try:
            with open(f"{self._host}/{host_tid}/syscall", "rb") as f:
                first = f.read().split(maxsplit=1)[:1]
        except OSError:
            return True
        if not first or not first[0].lstrip(b"-").isdigit():
            return True
        return int(first[0]) in self._readlinks
