"""vsnprintf (lib/vsprintf.c) for module code: C conversions over Python values.

Length modifiers (h, hh, l, ll, z, t, j) set the width of the integer type,
so `%u` of -1 prints 4294967295 and `%lx` of -1 ffffffffffffffff, as in C.
Pointers are anything with an address: `%p` prints the kernel's hashed
form, `%px` the raw value, `%pS`/`%ps` the symbol, `%pGg` GFP flag names.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

from klpfs.kernel.memory import addr_of, hashed_pointer

SPEC = re.compile(r"%(?P<flags>[-+ #0]*)(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?"
                  r"(?P<length>hh|h|ll|l|z|t|j|L)?(?P<conv>[diouxXcspn%])")
INT_BITS = {None: 32, "hh": 8, "h": 16, "l": 64, "ll": 64, "z": 64, "t": 64, "j": 64, "L": 64}
POINTER_EXT = re.compile(r"[A-Za-z]+")

GFP_NAMES = [(0xcc0, "GFP_KERNEL"), (0xa20, "GFP_ATOMIC"), (0x800, "GFP_NOWAIT"), (0xc00, "GFP_NOIO"),
             (0xc40, "GFP_NOFS")]
"""Composite GFP masks of 6.x, named as %pGg names them."""

SymbolName = Callable[[int], str]


class PrintfError(ValueError):
    """A format that does not match its arguments (what -Wformat would have caught)."""


def _int(value: object) -> int:
    if value is None:
        return 0
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PrintfError(f"integer conversion of {value!r}") from None


def _gfp(value: int) -> str:
    for mask, name in GFP_NAMES:
        if value == mask:
            return name
    return f"{value:#x}"


def vsnprintf(fmt: str, args: tuple[object, ...], symbol: SymbolName | None = None) -> str:
    """Format like the kernel's vsnprintf; PrintfError when fmt and args disagree."""
    out: list[str] = []
    pos = 0
    argi = 0

    def next_arg() -> object:
        nonlocal argi
        if argi >= len(args):
            raise PrintfError(f"too few arguments for format {fmt!r}")
        argi += 1
        return args[argi - 1]

    while True:
        i = fmt.find("%", pos)
        if i < 0:
            out.append(fmt[pos:])
            break
        out.append(fmt[pos:i])
        m = SPEC.match(fmt, i)
        if m is None:
            raise PrintfError(f"bad conversion at {fmt[i:i + 4]!r} in {fmt!r}")
        pos = m.end()
        conv = m["conv"]
        if conv == "%":
            out.append("%")
            continue
        flags = m["flags"]
        width = m["width"]
        if width == "*":
            width = str(_int(next_arg()))
        prec = m["prec"]
        if prec == "*":
            prec = str(max(0, _int(next_arg())))
        value = next_arg()
        if conv == "p":
            ext = POINTER_EXT.match(fmt, pos)
            kind = ext.group(0)[:2] if ext else ""
            text = _pointer(value, kind, symbol)
            if ext:
                pos += len(kind) if kind in ("Gg", "Gp") else 1 if kind else 0
            out.append(_pad(text, flags, width))
            continue
        spec = "%" + flags + (width or "") + (f".{prec}" if prec is not None else "")
        if conv == "s":
            text = "(null)" if value is None else str(value)
            out.append((spec + "s") % text)
        elif conv == "c":
            ch = value if isinstance(value, str) else chr(_int(value) & 0xFF)
            out.append((spec + "c") % ch)
        elif conv == "n":
            raise PrintfError("%n is not supported by the kernel")
        else:
            number = _int(value)
            bits = INT_BITS[m["length"]]
            if conv in "di":
                number &= (1 << bits) - 1
                if number >> (bits - 1):
                    number -= 1 << bits
                out.append((spec + "d") % number)
            else:
                number &= (1 << bits) - 1
                out.append((spec + ("d" if conv == "u" else conv)) % number)
    if argi < len(args):
        raise PrintfError(f"too many arguments for format {fmt!r}")
    return "".join(out)


def _pointer(value: object, kind: str, symbol: SymbolName | None) -> str:
    if kind in ("Gg", "Gp"):
        return _gfp(_int(value))
    if value is None:
        return "(null)"
    addr = addr_of(value)
    if kind and kind[0] == "x":
        return f"{addr:016x}"
    if kind and kind[0] in "SsBF" and symbol is not None:
        return symbol(addr) if kind[0] != "s" else symbol(addr).split("+")[0]
    return hashed_pointer(addr)


def _pad(text: str, flags: str, width: str | None) -> str:
    if not width:
        return text
    return text.ljust(int(width)) if "-" in flags else text.rjust(int(width))
