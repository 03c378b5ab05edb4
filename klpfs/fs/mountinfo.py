"""What is mounted where, from /proc/self/mountinfo.

os.path.ismount misses bind mounts and fails on a dead FUSE mount (ENOTCONN),
so the mount table is the one reliable answer to "is MNT a klpfs mount?".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

FSTYPE = "fuse.klpfs"
"""How a klpfs mount appears in the mount table (fuse + subtype=klpfs)."""

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(table: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(table, encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            fields = line.split()
            sep = fields.index("-")
            entries.append(MountEntry(_unescape(fields[4]), _unescape(fields[sep + 1]),
                                      _unescape(fields[sep + 2])))
    return entries


def find_mount(path: str) -> MountEntry | None:
    """The mount whose mountpoint is exactly path (the topmost if stacked)."""
    target = os.path.realpath(path)
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found
