"""vsnprintf's conversions and the kernel's parameter parsers, value by value."""

from __future__ import annotations

import errno

import pytest

from klpfs.kernel.memory import Mem, hashed_pointer
from klpfs.kernel.params import ParamError, param_get, param_set
from klpfs.kernel.printf import PrintfError, vsnprintf


@pytest.mark.parametrize("fmt, args, out", [
    ("%d %i %u", (-1, 7, -1), "-1 7 4294967295"),
    ("%lu %lx %llx", (-1, -1, 255), "18446744073709551615 ffffffffffffffff ff"),
    ("%hhu %hd", (257, 65535), "1 -1"),
    ("%5d|%-5d|%05d", (42, 42, 42), "   42|42   |00042"),
    ("%x %X %#x %o", (255, 255, 255, 8), "ff FF 0xff 10"),
    ("%s %.3s %10s|%-4s|", ("abc", "abcdef", "r", "l"), "abc abc          r|l   |"),
    ("%s", (None,), "(null)"),
    ("%c%c", (65, "b"), "Ab"),
    ("%d %d", (True, False), "1 0"),
    ("%zx %%", (4096,), "1000 %"),
    ("%pGg %pGg", (0xCC0, 0xA20), "GFP_KERNEL GFP_ATOMIC"),
    ("%*d|%-*d|", (4, 1, 3, 2), "   1|2  |"),
])
def test_conversions(fmt: str, args: tuple, out: str) -> None:
    assert vsnprintf(fmt, args) == out


def test_pointers() -> None:
    block = Mem(0xFFFF888000001000, 8)
    assert vsnprintf("%p", (block,)) == hashed_pointer(0xFFFF888000001000)
    assert vsnprintf("%px", (block,)) == "ffff888000001000"
    assert vsnprintf("%p", (None,)) == "(null)"
    assert vsnprintf("%pS", (0x1234,), lambda addr: f"fn+{addr:#x}") == "fn+0x1234"


@pytest.mark.parametrize("fmt, args", [("%d %d", (1,)), ("%d", (1, 2)), ("%d", ("x",)), ("%n", (1,))])
def test_format_and_arguments_must_agree(fmt: str, args: tuple) -> None:
    with pytest.raises(PrintfError):
        vsnprintf(fmt, args)


@pytest.mark.parametrize("ptype, text, value", [
    ("int", "017", 15), ("int", "0x1f", 31), ("int", "-5", -5), ("int", "+5", 5), ("int", "12\n", 12),
    ("uint", "4294967295", 4294967295), ("byte", "255", 255), ("short", "-32768", -32768),
    ("long", "-9223372036854775808", -(1 << 63)), ("ulong", "18446744073709551615", (1 << 64) - 1),
    ("bool", "Y", True), ("bool", "0", False), ("bool", None, True), ("invbool", "y", False),
    ("charp", "hello\n", "hello"), ("hexint", "0x10", 16),
])
def test_param_set(ptype: str, text: str | None, value: object) -> None:
    assert param_set(ptype, text) == value


@pytest.mark.parametrize("ptype, text, err", [
    ("int", "0o17", errno.EINVAL), ("int", "0b101", errno.EINVAL), ("int", "1_000", errno.EINVAL),
    ("int", " 12", errno.EINVAL), ("int", "١٢", errno.EINVAL), ("int", "", errno.EINVAL),
    ("int", "2147483648", errno.ERANGE), ("uint", "-1", errno.EINVAL), ("byte", "256", errno.ERANGE),
    ("ulong", "18446744073709551616", errno.ERANGE), ("int", None, errno.EINVAL), ("bool", "x", errno.EINVAL),
    ("charp", "x" * 1025, errno.ENOSPC),
])
def test_param_set_refuses(ptype: str, text: str | None, err: int) -> None:
    with pytest.raises(ParamError) as e:
        param_set(ptype, text)
    assert e.value.errno == err


def test_param_get() -> None:
    assert [param_get("bool", True), param_get("invbool", True), param_get("hexint", 255),
            param_get("int", -3), param_get("charp", None)] == ["Y\n", "N\n", "0xff\n", "-3\n", "(null)\n"]
