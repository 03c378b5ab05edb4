"""Concurrent writers and readers on a real 6.1 mount: every errno the kernel's,
no write lost, one transition at a time, the daemon alive and its memory flat
(the model is in writers.py)."""

from __future__ import annotations

from collections.abc import Callable

from fusemount import Mount

from klpfs.control.client import request

from .writers import KERNEL, Scenario, alive, rss_kib

SEED = 13
WARMUP_STEPS = 100
STEPS = 400
SPEED = "speed=100"
"""The retry work every 10 ms: many transitions start and complete within a round."""
RSS_GROWTH_KIB = 2048
"""What the daemon's resident memory may grow by over a round once its kernel log is
full and a first round has run: allocator noise (under 1 MiB measured), not a leak."""


def test_concurrent_writers_keep_the_kernel_rules(mount_klpfs: Callable[..., Mount]) -> None:
    mount = mount_klpfs(kernel=KERNEL, options=[SPEED])
    scenario = Scenario(mount.path, SEED)
    scenario.load()
    scenario.fill_log()
    pid = scenario.daemon.pid
    assert scenario.play(WARMUP_STEPS).violations == []
    before = rss_kib(pid)
    figures = scenario.play(STEPS)
    after = rss_kib(pid)
    assert figures.violations == []
    assert (figures.hangs, figures.crashes) == (0, 0)
    assert figures.outcomes["ok"] > 0 and figures.outcomes["EINVAL"] > 0 and figures.transitions > 0
    assert alive(pid)
    assert request(str(mount.path), "status")["ok"] is True
    assert after - before <= RSS_GROWTH_KIB
