""".dockerignore: `COPY . /opt/klpfs` takes the checkout's sources and nothing
a checkout that followed the README has made (its .venv, whose python points
at the host's interpreter, broke the image build)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from buildcontext import IGNORE_FILE, context_files, excluded, read_patterns

ROOT = Path(__file__).resolve().parents[2]

SOURCES = {"pyproject.toml", "README.md", ".gitignore", ".dockerignore", ".ci/run", "scripts/setup",
           "klpfs/__init__.py", "klpfs/control/run.py", "tests/conftest.py", "tests/elf/build.py",
           "docs/containers.md"}
MADE = {
    # python3 -m venv .venv, pip install -e .: the venv and the egg-info
    ".venv/bin/python3", ".venv/pyvenv.cfg", ".venv/lib/python3.11/site-packages/trio/__init__.py",
    "klpfs.egg-info/PKG-INFO",
    # git clone
    ".git/HEAD", ".git/objects/pack/pack-1.pack",
    # scripts/test: byte code, pytest's and hypothesis's caches, setuptools' build tree
    "klpfs/__pycache__/cli.cpython-311.pyc", "klpfs/control/__pycache__/run.cpython-311.pyc",
    "tests/run/__pycache__/test_run.cpython-311-pytest-9.2.0.pyc",
    ".pytest_cache/v/cache/nodeids", "tests/.pytest_cache/README.md",
    ".hypothesis/examples/0a1b/2c3d", "build/lib/klpfs/__init__.py",
}


def make_tree(root: Path, files: set[str]) -> None:
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(relative)


def test_a_readme_checkout_sends_its_sources_only(tmp_path: Path) -> None:
    make_tree(tmp_path, (SOURCES - {IGNORE_FILE}) | MADE)
    shutil.copy(ROOT / IGNORE_FILE, tmp_path / IGNORE_FILE)
    (tmp_path / ".venv/bin/python").symlink_to("/usr/bin/python3.11")  # the host's: absent in an image
    assert context_files(tmp_path) == SOURCES


def test_the_context_is_the_checkout_without_what_git_ignores() -> None:
    """Whatever the tree grows, .dockerignore keeps up with .gitignore: the files
    sent are the tracked ones and the untracked ones git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    before = git_view()
    sent = context_files(ROOT)
    after = git_view()
    # A file that comes or goes meanwhile (an editor's temporary file) may be in either view.
    assert sorted(sent - (before | after)) == []
    assert sorted((before & after) - sent) == []


def git_view() -> set[str]:
    """The files of the tree git tracks or would track: what is not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {path for path in listed.split("\0") if path and (ROOT / path).is_file()}


@pytest.mark.parametrize("pattern, path, left_out", [
    ("__pycache__", "__pycache__/x.pyc", True),
    ("__pycache__", "klpfs/__pycache__/x.pyc", False),  # a plain name is the top directory's only
    ("**/__pycache__", "klpfs/control/__pycache__/x.pyc", True),
    ("**/__pycache__", "__pycache__/x.pyc", True),
    ("*.egg-info", "klpfs.egg-info/PKG-INFO", True),
    ("*.egg-info", "src/klpfs.egg-info/PKG-INFO", False),  # `*` stays within one element
    ("/.venv/", ".venv/bin/python", True),  # cleaned: leading and trailing slashes go
    (".venv", "tests/.venv/x", False),
    ("b?ild", "build/x", True),
    ("build", "tests/elf/build.py", False),
])
def test_patterns_match_as_the_engines_match_them(tmp_path: Path, pattern: str, path: str,
                                                 left_out: bool) -> None:
    ignore = tmp_path / IGNORE_FILE
    ignore.write_text(f"# comment\n\n  {pattern}  \n")
    assert excluded(read_patterns(ignore), path) is left_out


def test_an_exception_sends_a_file_again(tmp_path: Path) -> None:
    make_tree(tmp_path, {"docs/a.md", "docs/keep.md", "x.py"})
    (tmp_path / IGNORE_FILE).write_text("docs\n!docs/keep.md\n")
    assert context_files(tmp_path) == {".dockerignore", "docs/keep.md", "x.py"}
