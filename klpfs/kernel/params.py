"""Module parameters (kernel/params.c): parsing a value of each type, and showing it."""

from __future__ import annotations

from klpfs.kernel.kstrtox import kstrtobool


def param_set(ptype: str, text: str | None) -> int | bool | str | None:
    """param_set_int/bool/charp: the value, or None where the kernel says -EINVAL.

    `text` is None for a bare `name` on the insmod command line (only bools
    accept that: it means true).
    """
    if ptype == "bool":
        return True if text is None else kstrtobool(text.encode())
    if text is None:
        return None
    if ptype == "int":
        try:
            number = int(text.strip(), 0)
        except ValueError:
            return None
        return number if -(1 << 31) <= number < (1 << 31) else None
    return text.rstrip("\n")


def param_get(value: object) -> str:
    """param_get_int/bool/charp: what reading /sys/module/M/parameters/P prints."""
    if isinstance(value, bool):
        return "Y\n" if value else "N\n"
    return f"{value}\n"
