"""allow_other is asked for only where fusermount3 takes it: from root, or where
/etc/fuse.conf has `user_allow_other` as fusermount.c's read_conf() reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from klpfs.fs import mount
from klpfs.fs.mount import FUSE_OPTIONS, MountOptions, allow_other_allowed


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount.os, "geteuid", lambda: 1000)


@pytest.mark.parametrize(("conf", "allowed"), [
    ("user_allow_other\n", True),
    ("  user_allow_other   # let users share their mounts\n", True),
    ("mount_max = 1000\nuser_allow_other\n", True),
    ("#user_allow_other\n", False),
    ("user_allow_other", False),  # fusermount3 parses only lines that end in a newline
    ("user_allow_other=1\n", False),
    ("", False),
])
def test_fuse_conf(tmp_path: Path, as_user: None, conf: str, allowed: bool) -> None:
    path = tmp_path / "fuse.conf"
    path.write_text(conf)
    assert allow_other_allowed(path) is allowed


def test_no_fuse_conf(tmp_path: Path, as_user: None) -> None:
    assert allow_other_allowed(tmp_path / "missing") is False


def test_root_may(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount.os, "geteuid", lambda: 0)
    assert allow_other_allowed(tmp_path / "missing") is True


def test_the_default_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_user: None) -> None:
    monkeypatch.setattr(mount, "FUSE_CONF", tmp_path / "missing")
    assert MountOptions().fuse == set(FUSE_OPTIONS)
    assert MountOptions.parse(["allow_other"]).fuse == set(FUSE_OPTIONS) | {"allow_other"}
    (tmp_path / "missing").write_text("user_allow_other\n")
    assert MountOptions().fuse == set(FUSE_OPTIONS) | {"allow_other"}


def test_debug_is_klpfs_s_own() -> None:
    options = MountOptions.parse(["debug,speed=2"])
    assert (options.debug, options.speed, "debug" in options.fuse) == (True, 2.0, False)
    assert MountOptions.parse([]).debug is False
