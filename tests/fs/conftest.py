"""The fake-tree mount (see fakefs.py) the generic file-system tests run against."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusemount import Mount, require_fuse

FAKEFS = Path(__file__).with_name("fakefs.py")


@pytest.fixture
def fakefs() -> Iterator[Mount]:
    require_fuse()
    mount = Mount([sys.executable, str(FAKEFS)])
    try:
        yield mount.start()
    finally:
        mount.stop()
