"""Reading a kernel build's symbol table: a `/proc/kallsyms` dump or a `System.map`.

Both are lines of `ADDRESS TYPE NAME`; /proc/kallsyms adds `\t[module]` to the
symbols of loaded modules, which belong to that machine's modules, not to its
vmlinux, and are left out.  What cannot stand for a build is refused with the
file (and line) named: an empty file, one without text symbols, and a dump
read without root, where kptr_restrict made every address zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

TEXT_TYPES = frozenset("TtWw")
"""nm's types of code: global, local (static) and weak functions."""
SYMBOL_TYPES = frozenset("AaBbCDdGgiNnpRrSsTtUuVvWw")
"""The type letters nm (and so kallsyms and System.map) print."""


class KallsymsFileError(ValueError):
    """Why the file cannot be the emulated build's symbol table."""


class SymbolFile(NamedTuple):
    """A build's vmlinux symbols in the file's order (the kernel's table order), column by
    column: a 200,000-symbol table is three lists, not 200,000 objects."""

    addrs: list[int]
    kinds: list[str]
    names: list[str]


def parse_kallsyms(lines: Iterable[str], path: str) -> SymbolFile:
    """The vmlinux symbols of a dump's lines."""
    addrs: list[int] = []
    kinds: list[str] = []
    names: list[str] = []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 4 and fields[3].startswith("[") and fields[3].endswith("]"):
            continue
        if len(fields) != 3 or len(fields[1]) != 1 or fields[1] not in SYMBOL_TYPES:
            raise KallsymsFileError(f"{path}:{lineno}: not an `ADDRESS TYPE NAME` line: {line.strip()!r}")
        try:
            addr = int(fields[0], 16)
        except ValueError:
            raise KallsymsFileError(f"{path}:{lineno}: {fields[0]!r} is not a hexadecimal address") from None
        addrs.append(addr)
        kinds.append(fields[1])
        names.append(fields[2])
    if not addrs:
        raise KallsymsFileError(f"{path}: no symbols (an empty file?)")
    text_addrs = [addr for addr, kind in zip(addrs, kinds) if kind in TEXT_TYPES]
    if not text_addrs:
        raise KallsymsFileError(f"{path}: no text symbols (types T, t, W or w): not a kernel's symbol table")
    if not any(text_addrs):
        raise KallsymsFileError(f"{path}: every address is zero: a /proc/kallsyms read without root "
                                "(kptr_restrict); read it as root")
    return SymbolFile(addrs, kinds, names)


def read_kallsyms(path: str) -> SymbolFile:
    """parse_kallsyms() of a file; KallsymsFileError names what is wrong with it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_kallsyms(f, path)
    except OSError as exc:
        raise KallsymsFileError(f"{path}: {exc.strerror}") from None


def host_kallsyms_usable(path: str = "/proc/kallsyms") -> bool:
    """Does the running kernel show its addresses to us (root, kptr_restrict allowing)?"""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[1] in TEXT_TYPES:
                    return int(fields[0], 16) != 0
    except (OSError, ValueError):
        return False
    return False
