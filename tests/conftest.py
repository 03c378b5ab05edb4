"""Fixtures shared by every test directory: real klpfs mounts, and a booted
engine for tests that drive it directly.

``mount_klpfs(kernel="4.16", options=("log=/tmp/x",))`` mounts ``klpfs mount -f``
on a fresh mountpoint and returns a `fusemount.Mount`; ``klpfs_mount`` is the
default-kernel one.  Every mount is unmounted and its daemon reaped at
teardown, and a test fails if its daemon logged an error it did not expect
(set ``mount.errors_expected = True``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
import trio
from fusemount import KLPFS, Mount, require_fuse

from klpfs.livepatch.debug import set_livepatch_debug
from klpfs.system import System


@pytest.fixture(params=["4.15"])
async def system(request: pytest.FixtureRequest) -> AsyncIterator[System]:
    """A booted System with its background work running and debug lines on.

    Tests request pytest-trio's `autojump_clock` themselves: pytest-trio takes
    the clock only from the test function's own arguments.  Parametrize
    indirectly for another kernel profile.
    """
    async with trio.open_nursery() as nursery:
        machine = System(request.param)
        set_livepatch_debug(machine.kernel.dyndbg, True)
        nursery.start_soon(machine.run)
        yield machine
        nursery.cancel_scope.cancel()


@pytest.fixture
def mount_klpfs() -> Iterator[Callable[..., Mount]]:
    require_fuse()
    mounts: list[Mount] = []

    def start(kernel: str | None = None, options: Sequence[str] = ()) -> Mount:
        argv = [*KLPFS, "mount", "-f"]
        argv += [f"-o{option}" for option in options]
        if kernel is not None:
            argv += ["--kernel", kernel]
        mount = Mount(argv)
        mounts.append(mount)
        return mount.start()

    yield start
    failures = []
    for mount in mounts:
        try:
            mount.stop()
        except Exception as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def klpfs_mount(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs()
