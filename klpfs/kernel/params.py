"""Module parameters (kernel/params.c): the kernel's types, arrays, and the
messages of parse_args() for `insmod M name=value ...`."""

from __future__ import annotations

import errno
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from klpfs.kernel.kstrtox import KstrtoxError, kstrtobool, kstrtoll, kstrtoull

INT_RANGES = {
    "byte": (0, 0xFF), "short": (-(1 << 15), (1 << 15) - 1), "ushort": (0, 0xFFFF),
    "int": (-(1 << 31), (1 << 31) - 1), "uint": (0, (1 << 32) - 1), "hexint": (0, (1 << 32) - 1),
    "long": (-(1 << 63), (1 << 63) - 1), "ulong": (0, (1 << 64) - 1), "ullong": (0, (1 << 64) - 1),
}
PARAM_TYPES = (*INT_RANGES, "bool", "invbool", "charp")
MAX_CHARP = 1024
"""param_set_charp() refuses longer values with -ENOSPC."""


class ParamError(ValueError):
    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


def param_set(ptype: str, text: str | None) -> int | bool | str:
    """param_set_<type>(): the value, or ParamError(-EINVAL/-ERANGE/-ENOSPC).

    `text` is None for a bare `name` on the insmod command line (only bools
    accept that: it means true).
    """
    if ptype in ("bool", "invbool"):
        value = True if text is None else kstrtobool(text.encode("utf-8", "surrogateescape"))
        if value is None:
            raise ParamError(errno.EINVAL)
        return value if ptype == "bool" else not value
    if text is None:
        raise ParamError(errno.EINVAL)
    raw = text.encode("utf-8", "surrogateescape")
    if ptype == "charp":
        if len(raw) > MAX_CHARP:
            raise ParamError(errno.ENOSPC)
        return text.rstrip("\n")
    low, high = INT_RANGES[ptype]
    try:
        number = kstrtoll(raw) if low < 0 else kstrtoull(raw)
    except KstrtoxError as e:
        raise ParamError(e.errno) from None
    if not low <= number <= high:
        raise ParamError(errno.ERANGE)
    return number


def param_get(ptype: str, value: object) -> str:
    """param_get_<type>(): what reading /sys/module/M/parameters/P prints."""
    if ptype in ("bool", "invbool"):
        shown = bool(value) if ptype == "bool" else not value
        return "Y\n" if shown else "N\n"
    if ptype == "hexint":
        return f"{value:#x}\n"
    return f"{'(null)' if value is None else value}\n"


def param_array_set(ptype: str, text: str | None, max_elems: int, name: str,
                    printk_err: Callable[[str], None]) -> list[object]:
    """param_array_set(): comma-separated elements, at most max_elems of them."""
    if text is None:
        raise ParamError(errno.EINVAL)
    parts = text.rstrip("\n").split(",")
    if len(parts) > max_elems:
        printk_err(f"{name}: can only take {max_elems} arguments")
        raise ParamError(errno.EINVAL)
    return [param_set(ptype, part) for part in parts]


def param_array_get(ptype: str, values: list[object]) -> str:
    return ",".join(param_get(ptype, v).rstrip("\n") for v in values) + "\n"


@dataclass
class ParamSpec:
    """A module_param(): its type, sysfs mode (0: no file) and where the value lives."""

    type: str
    perm: int
    description: str = ""
    var: str = ""
    """The variable holding the value (module_param_named can differ from the name)."""
    array_max: int | None = None
    """module_param_array: the array's size; the variable is a list."""
    nump: str | None = None
    """module_param_array: the variable counting the elements set, if any."""


def set_param(spec: ParamSpec, values: MutableMapping[str, object], text: str | None, name: str,
              printk_err: Callable[[str], None]) -> None:
    """Store a parameter from its text (insmod argument or sysfs write); ParamError if refused."""
    if spec.array_max is None:
        values[spec.var] = param_set(spec.type, text)
        return
    elems = param_array_set(spec.type, text, spec.array_max, name, printk_err)
    array = values[spec.var]
    assert isinstance(array, list)
    array[:len(elems)] = elems
    if spec.nump is not None:
        values[spec.nump] = len(elems)


def get_param(spec: ParamSpec, values: MutableMapping[str, object]) -> str:
    """What reading the parameter's sysfs file prints."""
    if spec.array_max is None:
        return param_get(spec.type, values[spec.var])
    array = values[spec.var]
    assert isinstance(array, list)
    count = values[spec.nump] if spec.nump is not None else len(array)
    assert isinstance(count, int)
    return param_array_get(spec.type, array[:count])
