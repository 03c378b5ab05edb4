"""The kernel's own livepatch selftests, read at test time.

Debian's linux-source-<V> package is downloaded with apt-get, and only
tools/testing/selftests/livepatch (and 6.1's lib/livepatch) are extracted,
into a cache outside the checkout ($KLPFS_UPSTREAM_CACHE, default
/var/cache/klpfs-upstream), by the same code as `klpfs selftests --fetch`.
Nothing from it is copied into the project.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from klpfs.control.selftests import SELFTESTS, fetch_source

CACHE = Path(os.environ.get("KLPFS_UPSTREAM_CACHE", "/var/cache/klpfs-upstream"))


def source_tree(version: str) -> Path:
    """The extracted directories of linux-source-<version> (e.g. "6.1", "6.12")."""
    return fetch_source(version, (SELFTESTS, "lib/livepatch"), CACHE)


def selftests(version: str) -> Path:
    return source_tree(version) / SELFTESTS


def script_variables(script: Path) -> dict[str, str]:
    """The script's top-level NAME=value assignments (MOD_LIVEPATCH=test_klp_livepatch, ...)."""
    return dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=([^\s$`]+)$", script.read_text(), re.M))


def expected_result(script: Path, title: str) -> list[str]:
    """The lines of the check_result "..." that follows start_test "<title>" in a selftest
    script, with the script's variables ($MOD_TARGET, ${MOD_TARGET}) filled in."""
    text = script.read_text()
    start = text.find(f'start_test "{title}"')
    if start < 0:
        raise KeyError(f"{script.name}: no test {title!r}")
    m = re.compile(r'check_result "(.*?)"\n', re.S).search(text, start)
    if m is None:
        raise KeyError(f"{script.name}: no check_result after {title!r}")
    body = m.group(1)
    for name, value in sorted(script_variables(script).items(), key=lambda kv: -len(kv[0])):
        body = body.replace("${" + name + "}", value).replace("$" + name, value)
    return body.split("\n")
