"""Under `klpfs run`, the shims answer in busybox's words when the tools they
stand in for are busybox's (a busybox container)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fusemount import DEADLINE, KLPFS, require_fuse

BUSYBOX = shutil.which("busybox")


@pytest.fixture
def busybox_path(tmp_path: Path) -> str:
    """A PATH whose insmod and rmmod are busybox applets, as in a busybox image."""
    if BUSYBOX is None:
        pytest.fail("busybox is not installed (scripts/setup installs Debian's busybox)")
    for tool in ("insmod", "rmmod"):
        (tmp_path / tool).symlink_to(BUSYBOX)
    return f"{tmp_path}:{os.environ['PATH']}"


def run(path: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c", script], capture_output=True,
                          text=True, timeout=6 * DEADLINE, env={**os.environ, "PATH": path})


def test_busybox_insmod_and_rmmod_words_and_status(busybox_path: str) -> None:
    require_fuse()
    script = """
insmod livepatch-sample.ko; echo "first=$?"
insmod livepatch-sample.ko; echo "again=$?"
rmmod livepatch_sample; echo "rmmod=$?"
rmmod nosuch; echo "nosuch=$?"
insmod nosuch.ko; echo "missing=$?"
"""
    res = run(busybox_path, script)
    assert res.stdout.splitlines() == ["first=0", "again=17", "rmmod=1", "nosuch=1", "missing=254"]
    assert res.stderr.splitlines() == [
        "insmod: can't insert 'livepatch-sample.ko': File exists",
        "rmmod: can't unload module 'livepatch_sample': Resource temporarily unavailable",
        "rmmod: can't unload module 'nosuch': No such file or directory",
        "insmod: can't insert 'nosuch.ko': No such file or directory",
    ]


def test_busybox_insmod_tries_init_module_after_finit_module(busybox_path: str) -> None:
    """bb_init_module() falls back to init_module() when finit_module() fails:
    a module whose pre_patch fails is loaded twice, and the kernel logs both."""
    require_fuse()
    script = ("insmod test_klp_callbacks_demo.ko pre_patch_ret=-19; echo \"rc=$?\"; "
              "dmesg | grep -c 'pre-patch callback failed for object'")
    res = run(busybox_path, script)
    assert res.stdout.splitlines() == ["rc=19", "2"]
    assert res.stderr == "insmod: can't insert 'test_klp_callbacks_demo.ko': No such device\n"
