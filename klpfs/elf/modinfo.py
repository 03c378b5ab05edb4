"""What a .ko says about itself: `.modinfo`, the name in `.gnu.linkonce.this_module`,
and its parameters (`__param`).

`.modinfo` is a run of NUL-separated `key=value` strings (MODULE_LICENSE,
MODULE_INFO, modpost's name/vermagic/depends/...), kept here in section order
because kmod's modinfo prints them in that order.

Each `__param` entry is a `struct kernel_param` {name, mod, ops, perm (u16),
level (s8), flags (u8), arg} -- 40 bytes, the same from 4.15 to 6.x.  The
relocation of `ops` names the kernel's `param_ops_<type>` (or
`param_array_ops`), which gives the type; `arg` relocates to the variable,
whose bytes in .data (zero in .bss) are the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from klpfs.elf.reader import ElfFile, ElfError, Extern, Place
from klpfs.kernel.params import PARAM_TYPES

MODINFO = ".modinfo"
THIS_MODULE = ".gnu.linkonce.this_module"
PARAM_SECTION = "__param"
MODULE_NAME_OFFSET = 24
"""struct module: `enum module_state state` (padded to 8), `struct list_head list`, then `name`."""
MODULE_NAME_LEN = 56
KERNEL_PARAM_SIZE = 40
INT_SIZES = {"byte": (1, False), "short": (2, True), "ushort": (2, False), "int": (4, True), "uint": (4, False),
             "hexint": (4, False), "long": (8, True), "ulong": (8, False), "ullong": (8, False)}
OPS_ALIASES = {"bool_enable_only": "bool", "bint": "int", "string": "charp"}
"""Kernel parameter types klpfs's params do not have, stored as the nearest one."""
VERSION_RE = re.compile(r"^(\d+)\.(\d+)")


def read_modinfo(elf: ElfFile) -> list[tuple[str, str]]:
    """The (key, value) pairs of .modinfo, in section order."""
    sec = elf.section(MODINFO)
    if sec is None:
        return []
    entries = []
    for raw in elf.section_data(sec).split(b"\0"):
        if not raw:
            continue
        key, eq, value = raw.decode("utf-8", "surrogateescape").partition("=")
        if eq:
            entries.append((key, value))
    return entries


def modinfo_get(entries: list[tuple[str, str]], key: str) -> str | None:
    """get_modinfo(): the first value of the key."""
    return next((v for k, v in entries if k == key), None)


def release_version(vermagic: str) -> tuple[int, int] | None:
    """(major, minor) of the release that starts a vermagic string."""
    m = VERSION_RE.match(vermagic)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def struct_module_name(elf: ElfFile) -> str | None:
    """The `name` field of the struct module in .gnu.linkonce.this_module."""
    sec = elf.section(THIS_MODULE)
    if sec is None:
        return None
    raw = elf.section_data(sec)[MODULE_NAME_OFFSET:MODULE_NAME_OFFSET + MODULE_NAME_LEN]
    if len(raw) < MODULE_NAME_LEN:
        raise ElfError(f"{THIS_MODULE}: {sec.size} bytes, too small for struct module's name")
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class KoParam:
    """One module_param() of the .ko."""

    name: str
    type: str
    """A klpfs.kernel.params type (what the kernel's param_ops_<type> parses)."""
    ops: str
    """The kernel_param_ops symbol the .ko uses (param_ops_int, param_array_ops, ...)."""
    perm: int
    var: str
    """The variable's symbol: where the value lives."""
    default: object
    array_max: int | None = None
    nump: str | None = None


def read_params(elf: ElfFile) -> list[KoParam]:
    """Every `struct kernel_param` of __param, in section order; ElfError if one cannot be read."""
    sec = elf.section(PARAM_SECTION)
    if sec is None:
        return []
    if sec.size % KERNEL_PARAM_SIZE:
        raise ElfError(f"{PARAM_SECTION}: {sec.size} bytes is not a whole number of struct kernel_param")
    params = []
    for i in range(sec.size // KERNEL_PARAM_SIZE):
        at = i * KERNEL_PARAM_SIZE
        name_ptr = elf.pointer(sec.index, at)
        if not isinstance(name_ptr, Place):
            raise ElfError(f"{PARAM_SECTION}[{i}]: its name is not a string of the module")
        name = elf.cstring(name_ptr)
        ops = elf.pointer(sec.index, at + 16)
        ops_name = ops.name if isinstance(ops, Extern) else "(module's own ops)"
        perm = elf.uint(sec.index, at + 24, 2)
        arg = elf.pointer(sec.index, at + 32)
        params.append(_param(elf, name, ops_name, perm, arg))
    return params


def _type(ops: str) -> str:
    """param_ops_int -> int; a module's own kernel_param_ops keeps its text as charp does."""
    base = ops.removeprefix("param_ops_")
    base = OPS_ALIASES.get(base, base)
    return base if base in PARAM_TYPES else "charp"


def _param(elf: ElfFile, name: str, ops: str, perm: int, arg: Place | Extern | int) -> KoParam:
    if ops == "param_array_ops" and isinstance(arg, Place):
        # struct kparam_array {unsigned int max, elemsize; unsigned int *num; ops; void *elem}
        count = elf.uint(arg.section, arg.offset, 4)
        elem_ops = elf.pointer(arg.section, arg.offset + 16)
        num = elf.pointer(arg.section, arg.offset + 8)
        elem = elf.pointer(arg.section, arg.offset + 24)
        ptype = _type(elem_ops.name if isinstance(elem_ops, Extern) else "")
        stride = elf.uint(arg.section, arg.offset + 4, 4)
        values = [_value(elf, ptype, Place(elem.section, elem.offset + n * stride))
                  if isinstance(elem, Place) else None for n in range(count)]
        nump = _var_name(elf, num, None) if isinstance(num, Place) else None
        return KoParam(name, ptype, ops, perm, _var_name(elf, elem, name), values, array_max=count, nump=nump)
    ptype = _type(ops)
    if ops == "param_ops_string" and isinstance(arg, Place):
        # struct kparam_string {unsigned int maxlen; char *string}
        arg = elf.pointer(arg.section, arg.offset + 8)
        string = elf.cstring(arg) if isinstance(arg, Place) else None
        return KoParam(name, ptype, ops, perm, _var_name(elf, arg, name), string)
    default = _value(elf, ptype, arg) if isinstance(arg, Place) else None
    return KoParam(name, ptype, ops, perm, _var_name(elf, arg, name), default)


def _var_name(elf: ElfFile, place: Place | Extern | int, fallback: str | None) -> str:
    sym = elf.object_at(place) if isinstance(place, Place) else None
    if sym is not None and sym.value == place.offset:  # type: ignore[union-attr]
        return sym.name
    return fallback if fallback is not None else elf.describe(place)


def _value(elf: ElfFile, ptype: str, place: Place) -> object:
    """A variable's initial value, as the parameter type stores it."""
    if ptype in ("bool", "invbool"):
        return elf.uint(place.section, place.offset, 1) != 0
    if ptype == "charp":
        target = elf.pointer(place.section, place.offset)
        return elf.cstring(target) if isinstance(target, Place) else None
    size, signed = INT_SIZES[ptype]
    return elf.uint(place.section, place.offset, size, signed=signed)
