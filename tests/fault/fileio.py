"""One open + write + close, or open + read + close, of a mounted file, as a
shell's `echo v > f` and `cat f` do, reduced to its outcome: 0 or the text
read on success, else the errno of whichever call failed."""

from __future__ import annotations

import os
from pathlib import Path


class CloseFailed(Exception):
    """close(2) of a sysfs attribute never fails; klpfs's flush did."""


def write_file(path: Path, data: bytes) -> tuple[int, int]:
    """(errno or 0, bytes written)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return _errno(e), 0
    count = 0
    err = 0
    try:
        count = os.write(fd, data)
    except OSError as e:
        err = _errno(e)
    finally:
        _close(fd, path)
    return err, count


def read_file(path: Path) -> tuple[int, str]:
    """(errno or 0, the text read)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return _errno(e), ""
    chunks = []
    err = 0
    try:
        while chunk := os.read(fd, 8192):
            chunks.append(chunk)
    except OSError as e:
        err = _errno(e)
    finally:
        _close(fd, path)
    return err, b"".join(chunks).decode(errors="replace")


def _errno(error: OSError) -> int:
    """A failed system call's errno (an OSError raised for one always has it)."""
    assert error.errno is not None
    return error.errno


def _close(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    except OSError as e:
        raise CloseFailed(f"close of {path}: {os.strerror(_errno(e))}") from None
