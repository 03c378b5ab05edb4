"""kstrtobool (lib/kstrtox.c): only the first one or two bytes decide (spec §2.3)."""

from __future__ import annotations


def kstrtobool(buf: bytes) -> bool | None:
    """True or False, or None where the kernel returns -EINVAL.

    The buffer is as written; the kernel sees it NUL-terminated, so a lone
    "o" is an error.
    """
    first = buf[:1]
    if first in (b"y", b"Y", b"1"):
        return True
    if first in (b"n", b"N", b"0"):
        return False
    if first in (b"o", b"O"):
        second = buf[1:2]
        if second in (b"n", b"N"):
            return True
        if second in (b"f", b"F"):
            return False
    return None
