"""lib/kstrtox.c: kstrtobool (only the first one or two bytes decide) and the integer parsers."""

from __future__ import annotations

import errno


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


def _parse_integer(text: bytes, base: int) -> int:
    """_parse_integer_fixup_radix + _parse_integer: digits of the base, at least one."""
    if base == 0:
        if text[:1] == b"0":
            if text[1:2].lower() == b"x" and text[2:3] and text[2:3] in b"0123456789abcdefABCDEF":
                base, text = 16, text[2:]
            else:
                base = 8
        else:
            base = 10
    elif base == 16 and text[:2].lower() == b"0x":
        text = text[2:]
    value = 0
    digits = 0
    for byte in text:
        c = chr(byte).lower()
        d = int(c, 36) if c.isascii() and c.isalnum() else 99
        if d >= base:
            break
        value = value * base + d
        if value >> 64:
            raise KstrtoxError(errno.ERANGE)
        digits += 1
    if digits == 0 or text[digits:] not in (b"", b"\n"):
        raise KstrtoxError(errno.EINVAL)
    return value


class KstrtoxError(ValueError):
    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


def kstrtoull(text: bytes, base: int = 0) -> int:
    """kstrtoull(): an optional '+', digits, an optional trailing newline; -EINVAL/-ERANGE as KstrtoxError."""
    if text[:1] == b"+":
        text = text[1:]
    return _parse_integer(text, base)


def kstrtoll(text: bytes, base: int = 0) -> int:
    """kstrtoll(): kstrtoull() with an optional '-'."""
    if text[:1] == b"-":
        value = kstrtoull(text[1:], base)
        if value > 1 << 63:
            raise KstrtoxError(errno.ERANGE)
        return -value
    value = kstrtoull(text, base)
    if value >= 1 << 63:
        raise KstrtoxError(errno.ERANGE)
    return value
