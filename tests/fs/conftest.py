"""The fake-tree mount (see fakefs.py) the generic file-system tests run against."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusemount import Mount

FAKEFS = Path(__file__).with_name("fakefs.py")


@pytest.fixture
def fakefs() -> Iterator[Mount]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("FUSE tests need root, /dev/fuse and fusermount3")
    mount = Mount([sys.executable, str(FAKEFS)])
    try:
        yield mount.start()
    finally:
        mount.stop()
