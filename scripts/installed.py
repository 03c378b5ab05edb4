"""Is this checkout's klpfs installed, with all it needs, where this Python looks?

usage: python scripts/installed.py CHECKOUT [EXTRA ...]

scripts/setup runs it with the venv's Python and calls pip only when it says
no, so a machine (or a `--network none` container) that is already set up
needs no package index.  It answers from the metadata the interpreter sees
(importlib.metadata, the standard library only: no pip, no network) against
CHECKOUT's pyproject.toml:

- klpfs is installed editable from CHECKOUT, at pyproject.toml's version,
  with its entry points (a stale install misses a new command);
- every requirement of the project, and of each EXTRA, is installed at a
  version its specifiers allow.

Exit status 0 when all holds; 1 with the first thing missing on stdout
otherwise; 2 for an EXTRA pyproject.toml does not have.  A requirement this
small reader does not understand (an environment marker, `~=`, a wildcard)
counts as missing: pip, which does, is then asked.
"""

from __future__ import annotations

import json
import operator
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

COMPARISONS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<specifiers>(?:(?:>=|<=|==|!=|>|<)\s*"
                         r"[0-9]+(?:\.[0-9]+)*\s*(?:,\s*|$))*)")
SPECIFIER = re.compile(r"(>=|<=|==|!=|>|<)\s*([0-9]+(?:\.[0-9]+)*)")
RELEASE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
PRE_RELEASE = re.compile(r"[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)", re.I)
USAGE = "usage: python scripts/installed.py CHECKOUT [EXTRA ...]"
ENTRY_POINT_GROUPS = {"scripts": "console_scripts", "gui-scripts": "gui_scripts"}


class Missing(Exception):
    """The first thing that keeps the installation from being complete."""


class UnknownExtra(Exception):
    """An EXTRA that pyproject.toml's optional-dependencies do not name."""


def version_key(version: str) -> tuple[tuple[int, ...], int]:
    """A PEP 440 version as its release numbers and 1 for a final (or post)
    release, 0 for a pre- or dev release, which sorts before it."""
    release = RELEASE.match(version)
    if release is None:
        raise Missing(f"cannot compare the version {version!r}")
    final = PRE_RELEASE.match(version[release.end():]) is None
    return tuple(map(int, release.group().split("."))), int(final)


def satisfies(installed: str, op: str, wanted: str) -> bool:
    """`installed OP wanted`, release numbers padded with zeros (3.5 == 3.5.0)."""
    (have, have_final), (want, want_final) = version_key(installed), version_key(wanted)
    width = max(len(have), len(want))
    have, want = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
    return COMPARISONS[op]((*have, have_final), (*want, want_final))


def check_requirement(requirement: str) -> None:
    match = REQUIREMENT.fullmatch(requirement.strip())
    if match is None:
        raise Missing(f"cannot check the requirement {requirement!r} without pip")
    name = match["name"]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        raise Missing(f"{requirement} is not installed") from None
    for op, wanted in SPECIFIER.findall(match["specifiers"]):
        if not satisfies(installed, op, wanted):
            raise Missing(f"{name} {installed} is installed, {requirement} is required")


def expected_entry_points(project: dict) -> set[tuple[str, str, str]]:
    """pyproject.toml's scripts and entry points as (group, name, value)."""
    points = {(group, name, value) for key, group in ENTRY_POINT_GROUPS.items()
              for name, value in project.get(key, {}).items()}
    points |= {(group, name, value) for group, table in project.get("entry-points", {}).items()
               for name, value in table.items()}
    return points


def check_klpfs(checkout: Path, project: dict) -> None:
    try:
        dist = metadata.distribution(project["name"])
    except metadata.PackageNotFoundError:
        raise Missing(f"{project['name']} is not installed") from None
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("url") != checkout.as_uri():
        raise Missing(f"{project['name']} is installed from {direct_url.get('url', 'an index')}, "
                      f"not from {checkout.as_uri()}")
    if not direct_url.get("dir_info", {}).get("editable", False):
        raise Missing(f"{project['name']} is installed from {checkout.as_uri()}, but not editable")
    if dist.version != project["version"]:
        raise Missing(f"{project['name']} {dist.version} is installed, pyproject.toml says {project['version']}")
    installed = {(point.group, point.name, point.value) for point in dist.entry_points}
    if installed != expected_entry_points(project):
        raise Missing(f"{project['name']}'s installed entry points are not pyproject.toml's")


def check(checkout: Path, extras: Sequence[str]) -> None:
    project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise UnknownExtra(extra)
    check_klpfs(checkout, project)
    for requirement in [*project.get("dependencies", []), *(r for extra in extras for r in optional[extra])]:
        check_requirement(requirement)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        check(Path(argv[0]).resolve(), argv[1:])
    except UnknownExtra as exc:
        print(f"pyproject.toml has no extra {exc.args[0]!r}", file=sys.stderr)
        return 2
    except Missing as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
