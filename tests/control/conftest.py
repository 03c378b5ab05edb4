"""A booted System with its background work running.

Tests request pytest-trio's `autojump_clock` themselves: pytest-trio takes
the clock only from the test function's own arguments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from klpfs.system import System


@pytest.fixture(params=["4.15"])
async def system(request: pytest.FixtureRequest) -> AsyncIterator[System]:
    async with trio.open_nursery() as nursery:
        machine = System(request.param)
        machine.kernel.log.debug_enabled = True
        nursery.start_soon(machine.run)
        yield machine
        nursery.cancel_scope.cancel()
