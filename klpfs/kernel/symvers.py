"""The emulated build's module_layout CRC, from the Module.symvers of its headers.

check_modstruct_version() compares a module's CRC of `module_layout` with the
kernel's; the kernel's is in the Module.symvers that kbuild wrote for it and
that its headers package ships (/lib/modules/<release>/build/Module.symvers):
`CRC<TAB>SYMBOL<TAB>MODULE<TAB>EXPORT_TYPE[<TAB>NAMESPACE]` lines.
"""

from __future__ import annotations

LAYOUT_SYMBOL = "module_layout"


class SymversError(ValueError):
    """Why the file gives no module_layout CRC."""


def module_layout_crc(path: str) -> int:
    """The CRC Module.symvers gives module_layout (exported by vmlinux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 3 and fields[1] == LAYOUT_SYMBOL and fields[2] == "vmlinux":
                    try:
                        return int(fields[0], 16)
                    except ValueError:
                        raise SymversError(f"{path}:{lineno}: {fields[0]!r} is not a CRC") from None
    except OSError as exc:
        raise SymversError(f"{path}: {exc.strerror}") from None
    raise SymversError(f"{path}: no CRC for {LAYOUT_SYMBOL} (not a Module.symvers of a kernel with modversions)")
