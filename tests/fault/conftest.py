"""A daemon shared by the tests of one module that only talk to its control socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fusemount import KLPFS, Mount, require_fuse


@pytest.fixture(scope="module")
def shared_mount() -> Iterator[Mount]:
    """A `klpfs mount -f` on the default kernel, stopped (and its log checked) after the module."""
    require_fuse()
    mount = Mount([*KLPFS, "mount", "-f"])
    try:
        yield mount.start()
    finally:
        mount.stop()
