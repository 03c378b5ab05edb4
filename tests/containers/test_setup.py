"""scripts/setup does nothing, and needs no network, where everything is
installed; scripts/demo needs klpfs but not its test tools.  Offline runs are
in a network namespace of their own (`unshare --net`): no network at all."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from buildcontext import context_files
from fusemount import require_fuse

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ["unshare", "--net"]
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
"""Should pip run after all, it fails before it changes anything: no index, no find-links."""
RUNTIME = ("pyfuse3", "trio", "greenlet")
"""klpfs's own requirements (pyproject.toml's dependencies)."""
SETUP_TIMEOUT = 300


def nothing_to_do(wanted: str) -> str:
    return f"scripts/setup: nothing to do: the Debian packages and {wanted} in .venv are installed\n"


def require_offline_runs() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("dpkg") is None:
        pytest.skip("needs root, dpkg and unshare (util-linux) to run scripts/setup without a network")


def without_pip_sources(env: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in env.items() if not k.startswith("PIP_")}, **NO_INDEX}


def test_the_set_up_checkout_needs_nothing() -> None:
    """scripts/test ran scripts/setup here: running it again, twice, with or
    without the test tools, does nothing and reaches for no network."""
    require_offline_runs()
    env = without_pip_sources(dict(os.environ))
    for args, wanted in [((), "klpfs[test,dev]"), ((), "klpfs[test,dev]"), (("--no-test",), "klpfs")]:
        run = subprocess.run([*OFFLINE, str(ROOT / "scripts/setup"), *args], capture_output=True, text=True,
                             env=env, timeout=SETUP_TIMEOUT)
        assert (run.returncode, run.stdout, run.stderr) == (0, nothing_to_do(wanted), "")


def copy_checkout(destination: Path) -> None:
    """The checkout as `COPY .` takes it: its sources, no venv, no caches.  (A
    file gone meanwhile, an editor's temporary file, is no longer part of it.)"""
    for relative in context_files(ROOT):
        source, target = ROOT / relative, destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(source, target, follow_symlinks=False)
        except FileNotFoundError:
            continue


def link_runtime(site: Path) -> None:
    """klpfs's requirements and theirs, from the venv running the tests, without the
    test tools: symlinks to their installed files, for PYTHONPATH."""
    site.mkdir()
    wanted, seen = list(RUNTIME), set()
    while wanted:
        name = wanted.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for other Pythons only (exceptiongroup before 3.11)
        if dist.name in seen:
            continue
        seen.add(dist.name)
        wanted += [re.match(r"[A-Za-z0-9._-]+", requirement).group() for requirement in dist.requires or ()
                   if "extra ==" not in requirement]
        for top in {Path(file).parts[0] for file in dist.files or ()} - {".."}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))


def test_a_fresh_checkout_installs_once_then_runs_the_demo_offline(tmp_path: Path) -> None:
    """The first run creates .venv and installs klpfs with pip, from whatever
    package index the machine has (for the build's setuptools; klpfs's own
    requirements are found on PYTHONPATH).  Then pip is taken out of the
    venv: the second run, offline, must not need it, nor must the demo."""
    require_offline_runs()
    require_fuse()
    checkout = tmp_path / "klpfs"
    copy_checkout(checkout)
    link_runtime(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    setup = [str(checkout / "scripts/setup")]

    first = subprocess.run([*setup, "--no-test"], capture_output=True, text=True, env=env, timeout=SETUP_TIMEOUT)
    if first.returncode != 0 and "No matching distribution found for setuptools" in first.stderr:
        pytest.skip(f"the first run needs a package index for pip's build requirements: {first.stderr}")
    assert (first.returncode, first.stdout) == (0, "scripts/setup: creating the venv .venv\n"
                                                   "scripts/setup: installing klpfs in .venv: "
                                                   "klpfs is not installed\n"), first.stderr
    for pip in (checkout / ".venv/lib").glob("python3*/site-packages/pip*"):
        shutil.rmtree(pip)

    second = subprocess.run([*OFFLINE, *setup, "--no-test"], capture_output=True, text=True, env=env,
                            timeout=SETUP_TIMEOUT)
    assert (second.returncode, second.stdout, second.stderr) == (0, nothing_to_do("klpfs"), "")

    demo = subprocess.run([*OFFLINE, str(checkout / "scripts/demo")], capture_output=True, text=True, env=env,
                          timeout=SETUP_TIMEOUT)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    lines = demo.stdout.splitlines()
    assert lines[0] == nothing_to_do("klpfs").rstrip("\n")
    assert lines.count(f"{'proc/cmdline':<46} this has been live patched") == 2

    with_tests = subprocess.run([*OFFLINE, *setup], capture_output=True, text=True, env=env,
                                timeout=SETUP_TIMEOUT)
    assert (with_tests.returncode, with_tests.stdout, with_tests.stderr) == (
        1, "scripts/setup: installing klpfs[test,dev] in .venv: pytest>=7 is not installed\n",
        f"{checkout}/.venv/bin/python: No module named pip\n")
