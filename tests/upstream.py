"""The kernel's own livepatch selftests, read at test time.

Debian's linux-source-<V> package is downloaded with apt-get, and only
tools/testing/selftests/livepatch (and 6.1's lib/livepatch) are extracted,
into a cache outside the checkout ($KLPFS_UPSTREAM_CACHE, default
/var/cache/klpfs-upstream).  Nothing from it is copied into the project.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("KLPFS_UPSTREAM_CACHE", "/var/cache/klpfs-upstream"))
WANTED = ("tools/testing/selftests/livepatch", "lib/livepatch")


def source_tree(version: str) -> Path:
    """The extracted directories of linux-source-<version> (e.g. "6.1", "6.12")."""
    root = CACHE / version
    done = root / ".complete"
    if done.exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            work = Path(tmp)
            subprocess.run(["apt-get", "download", f"linux-source-{version}"], cwd=work, check=True,
                           capture_output=True)
            deb = next(work.glob(f"linux-source-{version}_*.deb"))
            subprocess.run(f"dpkg-deb --fsys-tarfile {deb.name} | tar -x --wildcards '*/linux-source-{version}.tar.xz'",
                           shell=True, cwd=work, check=True)
            inner = next(work.rglob(f"linux-source-{version}.tar.xz"))
            prefix = f"linux-source-{version}"
            members = [f"{prefix}/{w}" for w in WANTED]
            # A directory the tree lacks (lib/livepatch after 6.9) is not an error.
            subprocess.run(["tar", "-xJf", inner, "--ignore-failed-read", *members], cwd=work,
                           capture_output=True)
            if root.exists():
                shutil.rmtree(root)
            shutil.move(str(work / prefix), root)
        done.touch()
    return root


def selftests(version: str) -> Path:
    return source_tree(version) / "tools/testing/selftests/livepatch"


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
