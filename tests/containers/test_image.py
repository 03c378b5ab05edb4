"""docs/containers.md's image, built and run as the page says, where Podman or
Docker works and has a local Debian base image: the Dockerfile and the
commands are read from the page, so the page and the test cannot drift."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs/containers.md"
ENGINES = ("podman", "docker")
BASE_IMAGE = "debian:bookworm"
DOCUMENTED_TAG = "my-image"
TOOL = """\
#!/bin/sh
# Stands in for the user's tool: what a livepatch tool does first.
set -e
modprobe livepatch-sample
echo "$1: enabled $(cat /sys/kernel/livepatch/livepatch_sample/enabled)"
"""
BUILD_TIMEOUT = 1800
RUN_TIMEOUT = 300


def dockerfile() -> str:
    blocks = re.findall(r"^```Dockerfile\n(.*?)^```", DOCS.read_text(), re.S | re.M)
    assert len(blocks) == 1, "docs/containers.md should have one Dockerfile block"
    return blocks[0]


def documented_commands() -> list[list[str]]:
    """The commands of the page's image block, one argv each."""
    match = re.search(r"<!-- image:[^>]*-->\n```bash\n(.*?)^```", DOCS.read_text(), re.S | re.M)
    assert match, "docs/containers.md lost its image block"
    return [shlex.split(line) for line in match.group(1).replace("\\\n", " ").splitlines()]


def usable_engine() -> str:
    """The first engine that answers `info` and has the base image; skip naming why none does."""
    reasons = []
    for engine in ENGINES:
        if shutil.which(engine) is None:
            reasons.append(f"{engine} is not installed")
            continue
        info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if info.returncode != 0:
            why = (info.stderr.strip().splitlines() or [f"exit status {info.returncode}"])[-1]
            reasons.append(f"`{engine} info` failed (no daemon?): {why}")
            continue
        image = subprocess.run([engine, "image", "inspect", BASE_IMAGE], capture_output=True, timeout=RUN_TIMEOUT)
        if image.returncode != 0:
            reasons.append(f"{engine} has no local {BASE_IMAGE} image")
            continue
        return engine
    pytest.skip("; ".join(reasons))


def test_the_documented_commands_are_a_build_and_two_runs() -> None:
    """What the image test below runs, checked where no engine is: the build, the
    tool under the image's entrypoint, and the demo with no network."""
    build, tool, demo = documented_commands()
    assert build == ["docker", "build", "-t", DOCUMENTED_TAG, "."]
    assert tool[:2] == ["docker", "run"] and tool[-1] == DOCUMENTED_TAG
    assert demo[:2] == ["docker", "run"] and demo[-3:] == ["--entrypoint", "/opt/klpfs/scripts/demo", DOCUMENTED_TAG]
    assert "--network none" in shlex.join(demo)
    flags = ["--device", "/dev/fuse", "--cap-add", "SYS_ADMIN", "--security-opt", "apparmor=unconfined"]
    assert shlex.join(flags) in shlex.join(tool)
    assert shlex.join(flags) in shlex.join(demo)
    assert dockerfile().startswith(f"FROM {BASE_IMAGE}\n")


def test_the_documented_image_runs_the_tool_and_the_demo_offline(tmp_path: Path) -> None:
    engine = usable_engine()
    context = tmp_path / "klpfs"
    # The checkout as the user has it after the README, .venv, .git, caches and all:
    # .dockerignore must keep those out.
    shutil.copytree(ROOT, context, symlinks=True)
    (context / "Dockerfile").write_text(dockerfile())
    (context / "my-livepatch-tool").write_text(TOOL)
    (context / "my-livepatch-tool").chmod(0o755)
    tag = f"klpfs-test-{uuid.uuid4().hex[:12]}"
    build, tool, demo = ([engine if arg == "docker" else tag if arg == DOCUMENTED_TAG else arg for arg in argv]
                         for argv in documented_commands())
    try:
        built = subprocess.run(build, cwd=context, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        assert built.returncode == 0, built.stdout + built.stderr
        ran = subprocess.run(tool, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert (ran.returncode, ran.stdout) == (0, "--selftest: enabled 1\n"), ran.stderr
        shown = subprocess.run(demo, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "scripts/setup: nothing to do: the Debian packages and klpfs in .venv are installed"
        assert lines.count(f"{'proc/cmdline':<46} this has been live patched") == 2
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=RUN_TIMEOUT)
