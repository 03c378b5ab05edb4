"""--kernel host and --release: which profile's rules a release string gets, and the
vermagic VERMAGIC_STRING makes of a configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from klpfs.host import host_vermagic_flags, vermagic_flags
from klpfs.kernel.kallsyms import Kallsyms
from klpfs.kernel.kallsyms_file import parse_kallsyms
from klpfs.profiles import get_profile, profile_for_release


@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v1300", "6.14"), ("6.12.0", "6.12"), ("6.13.2-arch1", "6.12"), ("6.1.0-28-amd64", "6.1"),
    ("5.10.0-30-amd64", "5.1"), ("4.9.0-19-amd64", "4.15"), ("4.15.0-213-generic", "4.15"),
])
def test_newest_profile_not_newer(release: str, version: str) -> None:
    assert profile_for_release(release).version == version


def test_release_without_a_version() -> None:
    with pytest.raises(ValueError) as caught:
        profile_for_release("custom")
    assert str(caught.value) == "release 'custom' does not start with a version (X.Y)"


@pytest.mark.parametrize(("config", "flags"), [
    ("CONFIG_SMP=y\nCONFIG_PREEMPT_BUILD=y\nCONFIG_PREEMPT_RT=y\nCONFIG_MODULE_UNLOAD=y\nCONFIG_MODVERSIONS=y\n",
     "SMP preempt mod_unload modversions "),
    ("CONFIG_SMP=y\n# CONFIG_PREEMPT_BUILD is not set\nCONFIG_PREEMPT_RT=y\nCONFIG_MODULE_UNLOAD=y\n",
     "SMP preempt_rt mod_unload "),
    ("CONFIG_MODVERSIONS=y\n", "modversions "),
])
def test_vermagic_flags(config: str, flags: str) -> None:
    assert vermagic_flags(config) == flags


def test_host_config_found_in_headers_first(tmp_path: Path) -> None:
    assert host_vermagic_flags("9.9.9", tmp_path) is None
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/config-9.9.9").write_text("CONFIG_SMP=y\n")
    assert host_vermagic_flags("9.9.9", tmp_path) == "SMP "
    conf = tmp_path / "lib/modules/9.9.9/build/include/config"
    conf.mkdir(parents=True)
    (conf / "auto.conf").write_text("CONFIG_SMP=y\nCONFIG_MODULE_UNLOAD=y\n")
    assert host_vermagic_flags("9.9.9", tmp_path) == "SMP mod_unload "


def test_host_profile() -> None:
    release = os.uname().release
    profile = get_profile("host")
    assert profile.release == release
    assert profile.version == profile_for_release(release).version
    assert profile.vermagic.startswith(f"{release} ")
    assert profile.module_layout_crc is None


def test_release_keeps_the_rules() -> None:
    base = get_profile("6.1")
    built = base.built_as("6.1.0-28-amd64")
    assert (built.version, built.release, built.vermagic_flags) == ("6.1", "6.1.0-28-amd64", base.vermagic_flags)
    assert base.built_as(None) is base


def test_unsorted_table_sizes_and_aliases() -> None:
    """kallsyms_lookup_size_offset(): the next higher address ends a symbol, aliases share it."""
    k = Kallsyms()
    table = parse_kallsyms(["ffffffff81000100 T b", "ffffffff81000000 T a", "ffffffff81000000 T a_alias",
                            "ffffffff81000180 t c"], "map")
    syms = k.add_vmlinux([], table)
    assert [(s.name, s.size) for s in syms] == [("b", 0x80), ("a", 0x100), ("a_alias", 0x100), ("c", 0x100)]
    assert k.lookup(0xFFFFFFFF81000010) is syms[1]
