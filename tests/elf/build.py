"""Build real kernel modules (.ko) against Debian's 6.1 headers, at test time.

The tests load genuine `.ko` files into klpfs, so they need files that a real
Debian 6.1 kernel would accept: built by kbuild, against the very headers of
the release the emulated 6.1 profile reports (6.1.0-50-amd64), with the
machine's gcc-12.  Nothing is installed into the machine's /usr/src or
/lib/modules:

* `apt-get download` fetches the three header packages into the cache (the
  kbuild package at the version the headers depend on, so the prebuilt
  modpost/objtool match the headers exactly);
* `dpkg-deb -x` unpacks them into a staging root inside the cache;
* the only absolute path kbuild meets is the first line of the flavour's
  Makefile, `include /usr/src/linux-headers-6.1.0-50-common/Makefile`
  (everything else -- `scripts` and `tools` -- is a relative symlink into
  the kbuild package, and the common Makefile finds its own source tree with
  `realpath`).  That one line is rewritten, in the cache's copy only, to an
  include relative to the Makefile itself, which keeps the staging root
  relocatable.  This was preferred to symlinks under /usr/src and /usr/lib
  (visible to everything else on the machine, and colliding with an
  installed linux-headers package) and to a bind mount in a private mount
  namespace (needs unshare and CAP_SYS_ADMIN, and a place to mount on, for
  what a one-line edit of a file the cache owns achieves).

Built modules are cached too, under a key made of every input that can change
the output (the sources, the header package versions, the compiler's version),
so a CI run builds once and later runs and tests reuse the files.  The cache
lives outside the checkout: $KLPFS_KBUILD_CACHE, else /var/cache/klpfs-kbuild
(root), else ~/.cache/klpfs-kbuild.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RELEASE = "6.1.0-50-amd64"
"""The emulated 6.1 profile's `uname -r`, hence the headers to build against."""
ABI = RELEASE.removesuffix("-amd64")
FLAVOUR_PKG = f"linux-headers-{RELEASE}"
COMMON_PKG = f"linux-headers-{ABI}-common"
KBUILD_PKG = "linux-kbuild-6.1"
COMPILER = "gcc-12"
"""What the headers' .kernelvariables set CC to (Debian builds 6.1 with gcc-12)."""

CACHE_ENV = "KLPFS_KBUILD_CACHE"
DEFAULT_CACHE = Path("/var/cache/klpfs-kbuild")

TOOLS = ("apt-get", "dpkg-deb", "make", COMPILER)
"""Programs the builder runs; scripts/setup installs them (and the libraries
kbuild's prebuilt host programs link against: libelf1, libssl3)."""


class KbuildUnavailable(RuntimeError):
    """The machine cannot build modules (a tool or the packages are missing)."""


@dataclass
class Timings:
    """Seconds spent by each step in this process; 0.0 when the cache answered."""
    download: float = 0.0
    extract: float = 0.0
    build: float = 0.0
    cached: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reused = f" (reused from cache: {', '.join(self.cached)})" if self.cached else ""
        return (f"download {self.download:.1f}s, extract {self.extract:.1f}s, "
                f"build {self.build:.1f}s{reused}")


TIMINGS = Timings()
"""What this test process spent, reported at the end of the session."""


def cache_dir() -> Path:
    """The cache root: the environment's choice, else a system or per-user cache."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        path = Path(chosen)
    elif os.access(DEFAULT_CACHE.parent, os.W_OK) or os.access(DEFAULT_CACHE, os.W_OK):
        path = DEFAULT_CACHE
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "klpfs-kbuild"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """One builder at a time per cache (parallel test runs share it)."""
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True)


def _apt_download(debs: Path, *specs: str) -> subprocess.CompletedProcess[str]:
    # As root apt would hand the download to the _apt user, who cannot write
    # into a root-owned cache: download as the caller instead (no warning).
    return _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *specs], cwd=debs)


def _deb_for(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def download(root: Path) -> dict[str, Path]:
    """The three .deb files, downloaded once into <cache>/debs."""
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    have = {p: _deb_for(debs, p) for p in (FLAVOUR_PKG, COMMON_PKG, KBUILD_PKG)}
    if all(have.values()):
        TIMINGS.cached.append("debs")
        return have  # type: ignore[return-value]
    start = time.monotonic()
    res = _apt_download(debs, FLAVOUR_PKG, COMMON_PKG)
    if res.returncode != 0 and "Unable to locate package" in res.stderr and os.geteuid() == 0:
        # A machine whose package lists were cleaned (container images): fetch them once.
        _run(["apt-get", "update", "-qq"])
        res = _apt_download(debs, FLAVOUR_PKG, COMMON_PKG)
    if res.returncode != 0:
        raise KbuildUnavailable(f"apt-get download {FLAVOUR_PKG} {COMMON_PKG} failed:\n{res.stderr}")
    flavour = _deb_for(debs, FLAVOUR_PKG)
    assert flavour is not None
    # The headers depend on `linux-kbuild-6.1 (>= V)`: take exactly V when the
    # archive still has it (its modpost/objtool were built with these headers),
    # else the newest one, which also satisfies the dependency.
    wanted = re.search(rf"{re.escape(KBUILD_PKG)} \(>= ([^)]+)\)", _deb_field(flavour, "Depends"))
    res = _apt_download(debs, f"{KBUILD_PKG}={wanted.group(1)}") if wanted else None
    if res is None or res.returncode != 0:
        res = _apt_download(debs, KBUILD_PKG)
    if res.returncode != 0:
        raise KbuildUnavailable(f"apt-get download {KBUILD_PKG} failed:\n{res.stderr}")
    TIMINGS.download += time.monotonic() - start
    have = {p: _deb_for(debs, p) for p in (FLAVOUR_PKG, COMMON_PKG, KBUILD_PKG)}
    assert all(have.values()), have
    return have  # type: ignore[return-value]


def headers_dir(staging: Path) -> Path:
    """The directory `make -C` is run in (what /lib/modules/<release>/build points at)."""
    return staging / "usr" / "src" / FLAVOUR_PKG


def extract(root: Path, debs: dict[str, Path]) -> Path:
    """The staging root: the packages unpacked, the flavour Makefile made relative.

    Keyed by the packages' file names (hence versions), built in a temporary
    directory and renamed into place so an interrupted run leaves nothing half done.
    """
    key = hashlib.sha256("\n".join(sorted(p.name for p in debs.values())).encode()).hexdigest()[:16]
    staging = root / f"headers-{RELEASE}-{key}"
    if (staging / ".complete").exists():
        TIMINGS.cached.append("headers")
        return staging
    start = time.monotonic()
    shutil.rmtree(staging, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the tree from unprivileged builds
    try:
        # The three packages have disjoint files: unpack them side by side.
        procs = {deb: subprocess.Popen(["dpkg-deb", "-x", str(deb), str(tmp)], stderr=subprocess.PIPE, text=True)
                 for deb in debs.values()}
        for deb, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise KbuildUnavailable(f"dpkg-deb -x {deb.name} failed:\n{err}")
        makefile = headers_dir(tmp) / "Makefile"
        text = makefile.read_text()
        absolute = f"include /usr/src/{COMMON_PKG}/Makefile"
        if absolute not in text:
            raise KbuildUnavailable(f"{makefile}: unexpected contents {text!r}")
        # Relative to this Makefile's own location, wherever the cache is.
        makefile.write_text(text.replace(
            absolute, f"include $(dir $(realpath $(lastword $(MAKEFILE_LIST))))../{COMMON_PKG}/Makefile"))
        # lib/modules/<release>/{build,source} point at the machine's /usr/src:
        # drop them so nothing can follow them out of the staging root.
        for link in (tmp / "lib" / "modules" / RELEASE).glob("*"):
            if link.is_symlink():
                link.unlink()
        (tmp / ".complete").write_text(json.dumps({p: d.name for p, d in debs.items()}, indent=1) + "\n")
        tmp.rename(staging)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    TIMINGS.extract += time.monotonic() - start
    return staging


def prune(root: Path, max_age: float = 3600.0) -> None:
    """Remove what killed runs left: temporary staging and build directories."""
    now = time.time()
    for leftover in [*root.glob(".staging-*"), *root.glob("ko/.build-*")]:
        if now - leftover.stat().st_mtime > max_age:
            shutil.rmtree(leftover, ignore_errors=True)


def prepare_headers() -> Path:
    """The headers directory to build against, downloading and unpacking as needed."""
    missing = missing_tools()
    if missing:
        raise KbuildUnavailable(f"missing build tools: {', '.join(missing)} (scripts/setup installs them)")
    root = cache_dir()
    with locked(root):
        prune(root)
        return headers_dir(extract(root, download(root)))


def compiler_version() -> str:
    return _run([COMPILER, "--version"]).stdout.splitlines()[0]


def build_modules(sources: Mapping[str, str]) -> dict[str, Path]:
    """Build every `<name>.c` of `sources` (name -> C text) with one `make`; name -> .ko path.

    The .ko files are cached under a key of the sources, the header packages
    and the compiler; a hit costs no make at all.  Module names may contain
    '-' (kbuild turns them into '_' for the module's own name, as for in-tree
    modules).  Raises KbuildUnavailable when the machine cannot build, and
    RuntimeError with make's output when the build fails.
    """
    headers = prepare_headers()
    root = cache_dir()
    digest = hashlib.sha256()
    for part in (RELEASE, headers.parent.parent.parent.name, compiler_version()):
        digest.update(part.encode() + b"\0")
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    out = root / "ko" / digest.hexdigest()[:16]
    result = {name: out / f"{name}.ko" for name in sources}
    with locked(root):
        if (out / ".complete").exists() and all(p.exists() for p in result.values()):
            TIMINGS.cached.append("modules")
            return result
        start = time.monotonic()
        out.parent.mkdir(exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
        tmp.chmod(0o755)  # tests also read the .ko files as nobody
        try:
            for name, text in sources.items():
                (tmp / f"{name}.c").write_text(text)
            (tmp / "Kbuild").write_text("".join(f"obj-m += {name}.o\n" for name in sorted(sources)))
            argv = ["make", "-C", str(headers), f"M={tmp}", f"-j{os.cpu_count() or 1}", "modules"]
            res = _run(argv)
            (tmp / "build.log").write_text(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
            if res.returncode != 0:
                raise RuntimeError(f"module build failed ({' '.join(argv)}):\n{res.stdout}{res.stderr}")
            (tmp / ".complete").write_text("")
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        TIMINGS.build += time.monotonic() - start
    # kbuild embeds the build directory in the objects' debug info only; the
    # renamed directory holds finished files, nothing refers back to tmp.
    return result
