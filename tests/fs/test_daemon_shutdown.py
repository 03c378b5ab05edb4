"""The serving loop's stop by signal, without FUSE: a stand-in for pyfuse3 whose main loop
returns at terminate(), or never (a request handler that does not finish)."""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from klpfs.fs import mount


class FakeFuse:
    """pyfuse3's main() and terminate(); `stuck`: a request under way ignores terminate()."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self._terminated = trio.Event()

    async def main(self) -> None:
        async with trio.open_nursery() as workers:
            workers.start_soon(self._worker, name="pyfuse-02")

    async def _worker(self) -> None:
        await self._terminated.wait()
        if self.stuck:
            await trio.sleep_forever()

    def terminate(self) -> None:
        self._terminated.set()


class FakeInvalidator:
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


class FakeOperations:
    def __init__(self) -> None:
        self.invalidator = FakeInvalidator()
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True


async def stop_by_signal(fuse: FakeFuse, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, float]:
    """_serve_mounted stopped by `stop`: what it returns, and how long it took."""
    monkeypatch.setattr(mount, "pyfuse3", fuse)
    operations = FakeOperations()
    stop = trio.Event()
    stop.set()
    start = trio.current_time()
    by_signal = await mount._serve_mounted(operations, stop, None)  # type: ignore[arg-type]
    assert operations.shut_down
    return by_signal, trio.current_time() - start


async def test_a_stop_waits_for_requests_under_way(autojump_clock: trio.testing.MockClock,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    assert await stop_by_signal(FakeFuse(stuck=False), monkeypatch) == (True, 0)
    assert caplog.records == []


async def test_a_request_that_never_ends_is_cancelled_after_the_grace(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    assert await stop_by_signal(FakeFuse(stuck=True), monkeypatch) == (True, mount.SHUTDOWN_GRACE)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(
        "FUSE requests still under way 5s after the stop signal, cancelled; trio tasks:\n<init>\n")
    assert re.search(r"\n +pyfuse-02 at \S+/test_daemon_shutdown\.py:\d+ in _worker$", message)
