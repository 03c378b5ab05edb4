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
FIELD_WIDTH_MAX = (1 << 23) - 1
PRECISION_MAX = (1 << 15) - 1
"""The widest field and longest precision struct printf_spec holds (lib/vsprintf.c)."""
NUMBER_DIGITS_MAX = 24
"""More characters than any 64-bit number prints without a precision (22 octal digits, a prefix)."""
NUMBER_LEAD = re.compile(r"[-+ ]?(?:0[xXo])?")
"""What precedes a number's zero padding: its sign, then its 0x prefix."""
KMALLOC_MAX_SIZE = 1 << 22
"""The largest buffer kmalloc() gives (x86-64, SLUB): what a caller that names no size formats into."""

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


def vsnprintf(fmt: str, args: tuple[object, ...], symbol: SymbolName | None = None,
              size: int = KMALLOC_MAX_SIZE) -> str:
    """Format like the kernel's vsnprintf into a buffer of `size`: at most size - 1
    characters; PrintfError when fmt and args disagree.

    Widths and precisions are the kernel's: struct printf_spec keeps a width in 24
    bits and a precision in 16, so a literal one is cut to those bits (a width of
    50000000 becomes negative: no padding), and a `*` one is clamped to
    FIELD_WIDTH_MAX/PRECISION_MAX by set_field_width()/set_precision() (which also
    WARN once; klpfs prints no splat).  Padding is never built past what the
    buffer can still take, so a huge width costs no more than `size`."""
    out = _Buffer(size)
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
            out.add(fmt[pos:])
            break
        out.add(fmt[pos:i])
        m = SPEC.match(fmt, i)
        if m is None:
            raise PrintfError(f"bad conversion at {fmt[i:i + 4]!r} in {fmt!r}")
        pos = m.end()
        conv = m["conv"]
        if conv == "%":
            out.add("%")
            continue
        flags = m["flags"]
        left = "-" in flags
        if m["width"] == "*":  # va_arg(args, int)
            width = min(max(_bitfield(_int(next_arg()), 32), -FIELD_WIDTH_MAX), FIELD_WIDTH_MAX)
            left = left or width < 0  # format_decode(): a negative `*` width left-justifies
            width = abs(width)
        else:
            width = _bitfield(int(m["width"] or -1), 24)
        prec: int | None = None
        if m["prec"] == "*":
            prec = min(max(_bitfield(_int(next_arg()), 32), 0), PRECISION_MAX)
        elif m["prec"] is not None:
            prec = max(_bitfield(int(m["prec"]), 16), 0)
        value = next_arg()
        room = out.room
        if conv == "p":
            ext = POINTER_EXT.match(fmt, pos)
            kind = ext.group(0)[:2] if ext else ""
            text = _pointer(value, kind, symbol)
            if ext:
                pos += len(kind) if kind in ("Gg", "Gp") else 1 if kind else 0
            out.add(_field(text[:room], len(text), width, left, None, room))
        elif conv == "s":
            text = "(null)" if value is None else str(value)
            length = len(text) if prec is None else min(len(text), prec)
            out.add(_field(text[:min(length, room)], length, width, left, None, room))
        elif conv == "c":
            if isinstance(value, str) and len(value) != 1:
                raise PrintfError(f"%c of {value!r}")
            out.add(_field(value if isinstance(value, str) else chr(_int(value) & 0xFF), 1, width, left, None, room))
        elif conv == "n":
            raise PrintfError("%n is not supported by the kernel")
        else:
            out.add(_number(_int(value), m["length"], conv, flags, width, left, prec, room))
    if argi < len(args):
        raise PrintfError(f"too many arguments for format {fmt!r}")
    return out.text()


class _Buffer:
    """The caller's buffer of `size` bytes: what fits in size - 1 is kept, the rest dropped."""

    def __init__(self, size: int):
        self.parts: list[str] = []
        self.room = max(size - 1, 0)

    def add(self, text: str) -> None:
        if self.room > 0 and text:
            piece = text[:self.room]
            self.parts.append(piece)
            self.room -= len(piece)

    def text(self) -> str:
        return "".join(self.parts)


def _bitfield(value: int, bits: int) -> int:
    """`value` stored in a signed bit-field of `bits` bits (GCC keeps it modulo 2**bits)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _number(number: int, length: str | None, conv: str, flags: str, width: int, left: bool,
            prec: int | None, room: int) -> str:
    """number(): an integer of the length modifier's width; a precision asks for that many
    digits, and only the zeros the buffer can take (`room`) are made, plus the few a
    64-bit number may have of its own, so the text's start is exact."""
    bits = INT_BITS[length]
    number &= (1 << bits) - 1
    if conv in "di":
        if number >> (bits - 1):
            number -= 1 << bits
        conv = "d"
    elif conv == "u":
        conv = "d"
    precision, unmade = "", 0
    if prec is not None:
        shown = min(prec, room + NUMBER_DIGITS_MAX)
        precision, unmade = f".{shown}", prec - shown
    body = ("%" + flags.replace("-", "").replace("0", "") + precision + conv) % number
    lead = None
    if "0" in flags and not left:
        lead = len(NUMBER_LEAD.match(body).group(0))  # type: ignore[union-attr]
    return _field(body, len(body) + unmade, width, left, lead, room)


def _field(body: str, length: int, width: int, left: bool, lead: int | None, room: int) -> str:
    """A conversion's text padded to `width`.  `body` is the unpadded text (or at least
    its first `room` characters), `length` the length it really has; `lead` is how many
    of its characters go before zero padding (None: pad with spaces).  At most `room`
    padding characters are made: the buffer takes no more."""
    pad = min(max(width - length, 0), room)
    if left:
        return body + " " * pad
    if lead is not None:
        return body[:lead] + "0" * pad + body[lead:]
    return " " * pad + body


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
