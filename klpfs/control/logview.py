"""The kernel log as dmesg shows it: the record line, --level, and which records
a command asked for.  Shared by `klpfs dmesg` and the dmesg of `klpfs run`."""

from __future__ import annotations

from klpfs.control.replies import Record
from klpfs.kernel.printk import LEVEL_NAMES

KERNEL_FACILITY = 0
"""LOG_KERN: what the kernel printed itself (1, LOG_USER, is a /dev/kmsg write)."""


class UnknownLevel(ValueError):
    """A --level name dmesg does not know; the message is dmesg's own."""


def parse_levels(value: str | None) -> frozenset[str] | None:
    """--level's comma-separated names (None: every level); UnknownLevel for the
    first unknown one, in sorted order."""
    if value is None:
        return None
    levels = frozenset(name.strip() for name in value.split(","))
    unknown = sorted(levels - set(LEVEL_NAMES))
    if unknown:
        raise UnknownLevel(f"dmesg: unknown level '{unknown[0]}'")
    return levels


def format_record(record: Record, notime: bool = False) -> str:
    """A record as dmesg prints it: `[seconds.micros] text`, or the text alone (-t)."""
    return record.text if notime else f"[{record.time:12.6f}] {record.text}"


def wanted(record: Record, levels: frozenset[str] | None, kernel: bool = False, user: bool = False) -> bool:
    """Whether dmesg shows the record: its level among `levels`, and with -k or -u
    (not both) only kernel or user-space messages."""
    from_kernel = record.facility == KERNEL_FACILITY
    return (levels is None or record.level in levels) and (kernel == user or from_kernel == kernel)
