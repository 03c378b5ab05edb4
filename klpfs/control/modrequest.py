"""What the CLI and the shims send the daemon to load a module file.

The daemon receives file contents, not paths (it may not see the caller's
files): a .py or TOML module as text, a .ko as its bytes in base64 (a .ko is
binary), with the Python module that supplies its functions' behaviour --
named with an option, else X.py beside X.ko -- as text.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

ELF_MAGIC = b"\x7fELF"


def is_ko(path: Path, data: bytes) -> bool:
    """A kernel module file: named .ko, or an ELF file whatever its name."""
    return path.suffix == ".ko" or data.startswith(ELF_MAGIC)


def companion(path: Path) -> Path | None:
    """X.py beside X.ko: the Python module that supplies the .ko's behaviour by default."""
    candidate = path.with_suffix(".py")
    return candidate if path.suffix == ".ko" and candidate.is_file() else None


def insmod_file_args(path: Path, behaviour: Path | None = None) -> dict[str, Any]:
    """The file arguments of an insmod request; OSError/UnicodeDecodeError if unreadable."""
    data = path.read_bytes()
    if not is_ko(path, data):
        return {"path": str(path), "text": data.decode()}
    args: dict[str, Any] = {"path": str(path), "data": base64.b64encode(data).decode("ascii")}
    source = behaviour if behaviour is not None else companion(path)
    if source is not None:
        args["behaviour"] = {"path": str(source), "text": source.read_text()}
    return args
