"""scripts/installed.py, the check that lets scripts/setup skip pip: against a
pyproject.toml and distributions made up for each case (Python run with -S,
so that only they are seen)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = """\
[project]
name = "klpfs"
version = "0.1.0"
dependencies = ["alpha>=1.2", "beta"]

[project.optional-dependencies]
test = ["gamma>=2,<3"]
odd = ["delta; python_version < '3.11'"]

[project.scripts]
klpfs = "klpfs.cli:main"

[project.entry-points.pytest11]
klpfs = "klpfs.pytest_plugin"
"""
ENTRY_POINTS = "[console_scripts]\nklpfs = klpfs.cli:main\n\n[pytest11]\nklpfs = klpfs.pytest_plugin\n"


class Site:
    """A checkout and a directory of installed distributions for the check to look at."""

    def __init__(self, tmp_path: Path) -> None:
        self.checkout = tmp_path / "checkout"
        self.checkout.mkdir()
        (self.checkout / "pyproject.toml").write_text(PYPROJECT)
        self.path = tmp_path / "site-packages"
        self.path.mkdir()
        self.install("klpfs", "0.1.0", direct_url={"url": self.checkout.as_uri(), "dir_info": {"editable": True}},
                     entry_points=ENTRY_POINTS)
        self.install("alpha", "1.2")
        self.install("beta", "0.1")

    def install(self, name: str, version: str, direct_url: dict | None = None, entry_points: str = "") -> None:
        self.uninstall(name)
        info = self.path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        if direct_url is not None:
            (info / "direct_url.json").write_text(json.dumps(direct_url))
        if entry_points:
            (info / "entry_points.txt").write_text(entry_points)

    def uninstall(self, name: str) -> None:
        for info in self.path.glob(f"{name}-*.dist-info"):
            for file in info.iterdir():
                file.unlink()
            info.rmdir()

    def check(self, *extras: str) -> tuple[int, str, str]:
        run = subprocess.run([sys.executable, "-S", str(ROOT / "scripts/installed.py"), str(self.checkout), *extras],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(self.path)})
        return run.returncode, run.stdout, run.stderr


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_everything_installed(site: Site) -> None:
    site.install("gamma", "2.5.1")
    assert site.check() == (0, "", "")
    assert site.check("test") == (0, "", "")


def test_an_extra_is_checked_only_when_asked_for(site: Site) -> None:
    assert site.check() == (0, "", "")
    assert site.check("test") == (1, "gamma>=2,<3 is not installed\n", "")


@pytest.mark.parametrize("version", ["1.99", "3.0", "2.0rc1", "2.0.dev3"])
def test_a_version_outside_the_specifiers(site: Site, version: str) -> None:
    site.install("gamma", version)
    assert site.check("test") == (1, f"gamma {version} is installed, gamma>=2,<3 is required\n", "")


@pytest.mark.parametrize("version", ["2", "2.0.0", "2.0.post1", "2.9.9+local"])
def test_a_version_inside_the_specifiers(site: Site, version: str) -> None:
    site.install("gamma", version)
    assert site.check("test") == (0, "", "")


def test_a_dependency_too_old(site: Site) -> None:
    site.install("alpha", "1.1.9")
    assert site.check() == (1, "alpha 1.1.9 is installed, alpha>=1.2 is required\n", "")


def test_klpfs_not_installed(site: Site) -> None:
    site.uninstall("klpfs")
    assert site.check() == (1, "klpfs is not installed\n", "")


def test_klpfs_from_another_checkout(site: Site) -> None:
    site.install("klpfs", "0.1.0", direct_url={"url": "file:///elsewhere", "dir_info": {"editable": True}},
                 entry_points=ENTRY_POINTS)
    assert site.check() == (1, f"klpfs is installed from file:///elsewhere, not from {site.checkout.as_uri()}\n", "")


def test_klpfs_from_an_index(site: Site) -> None:
    site.install("klpfs", "0.1.0", entry_points=ENTRY_POINTS)
    assert site.check() == (1, f"klpfs is installed from an index, not from {site.checkout.as_uri()}\n", "")


def test_klpfs_copied_in_not_editable(site: Site) -> None:
    site.install("klpfs", "0.1.0", direct_url={"url": site.checkout.as_uri(), "dir_info": {}},
                 entry_points=ENTRY_POINTS)
    assert site.check() == (1, f"klpfs is installed from {site.checkout.as_uri()}, but not editable\n", "")


def test_klpfs_of_another_version(site: Site) -> None:
    site.install("klpfs", "0.0.9", direct_url={"url": site.checkout.as_uri(), "dir_info": {"editable": True}},
                 entry_points=ENTRY_POINTS)
    assert site.check() == (1, "klpfs 0.0.9 is installed, pyproject.toml says 0.1.0\n", "")


def test_klpfs_installed_before_an_entry_point_was_added(site: Site) -> None:
    site.install("klpfs", "0.1.0", direct_url={"url": site.checkout.as_uri(), "dir_info": {"editable": True}},
                 entry_points="[console_scripts]\nklpfs = klpfs.cli:main\n")
    assert site.check() == (1, "klpfs's installed entry points are not pyproject.toml's\n", "")


def test_a_requirement_it_cannot_read_is_left_to_pip(site: Site) -> None:
    assert site.check("odd") == (1, "cannot check the requirement \"delta; python_version < '3.11'\" "
                                    "without pip\n", "")


def test_an_unknown_extra(site: Site) -> None:
    assert site.check("docs") == (2, "", "pyproject.toml has no extra 'docs'\n")


def test_no_checkout_given() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts/installed.py")], capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (
        2, "", "usage: python scripts/installed.py CHECKOUT [EXTRA ...]\n")
