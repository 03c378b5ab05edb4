"""`klpfs selftests`: the kernel's own livepatch selftests, unmodified, against the emulator.

The scripts come from a kernel tree (`--tree DIR`, the directory holding
test-livepatch.sh and functions.sh), or from Debian's linux-source-<V>
package (`--fetch 6.1`): downloaded with apt-get, only the selftest
directory extracted, and cached.  Each script runs in a scratch copy of the
directory under its own `klpfs run`, a fresh emulated kernel: the shims give
it insmod/modprobe/modinfo/dmesg/uname, and the copy gets
`test_modules/<mod>.ko`: each shipped selftest module written out as a
genuine .ko for the profile (`klpfs ko`), which newer trees look for, so the
scripts find, inspect and load their modules as on a real kernel.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from klpfs.control.samples import list_samples, module_stem
from klpfs.profiles import get_profile

SELFTESTS = "tools/testing/selftests/livepatch"
NOT_EMULATED = {
    "test-syscall.sh": "needs real processes calling getpid() through the emulated kernel",
    "test-kprobe.sh": "kprobes are not emulated",
}
"""Scripts reported rather than run, and why."""


def cache_root() -> Path:
    """Where fetched trees are kept: $KLPFS_CACHE, else /var/cache/klpfs as root, else ~/.cache/klpfs."""
    if os.environ.get("KLPFS_CACHE"):
        return Path(os.environ["KLPFS_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/klpfs")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "klpfs"


def fetch_source(version: str, wanted: tuple[str, ...] = (SELFTESTS,), cache: Path | None = None) -> Path:
    """The directories `wanted` of Debian's linux-source-<version>, extracted once into the cache."""
    root = (cache or cache_root()) / f"linux-source-{version}"
    done = root / ".complete"
    if done.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            work = Path(tmp)
            got = subprocess.run(["apt-get", "download", f"linux-source-{version}"], cwd=work,
                                 capture_output=True, text=True)
            if got.returncode:
                raise RuntimeError(f"apt-get download linux-source-{version} failed: {got.stderr.strip()}")
            deb = next(work.glob(f"linux-source-{version}_*.deb"))
            subprocess.run(f"dpkg-deb --fsys-tarfile {deb.name} | tar -x --wildcards '*/linux-source-{version}.tar.xz'",
                           shell=True, cwd=work, check=True)
            tarball = next(work.rglob(f"linux-source-{version}.tar.xz"))
            prefix = f"linux-source-{version}"
            # A directory the tree lacks (lib/livepatch after 6.9) is not an error.
            subprocess.run(["tar", "-xJf", str(tarball), "--ignore-failed-read", *(f"{prefix}/{w}" for w in wanted)],
                           cwd=work, capture_output=True)
            if root.exists():
                shutil.rmtree(root)
            shutil.move(str(work / prefix), root)
        done.touch()
    return root


def write_test_modules(directory: Path, kernel: str) -> list[Path]:
    """<mod>.ko of each shipped selftest module for the profile, in directory (made if missing)."""
    from klpfs.elf.writer import write_ko_file
    directory.mkdir(parents=True, exist_ok=True)
    profile = get_profile(kernel)
    written = []
    for path in list_samples():
        name = module_stem(path.name)
        if name.startswith("test_klp") and path.suffix == ".py":
            target = write_ko_file(path, profile, directory / f"{name}.ko")
            written.append(target)
    return written


def prepare(tree: Path, workdir: Path, kernel: str) -> Path:
    """A scratch copy of the selftest directory with its test_modules/<mod>.ko."""
    copy = workdir / "livepatch"
    shutil.copytree(tree, copy)
    write_test_modules(copy / "test_modules", kernel)
    return copy


def scripts(tree: Path, chosen: list[str]) -> list[str]:
    found = sorted(p.name for p in tree.glob("test-*.sh"))
    if not chosen:
        return found
    wanted = [name if name.endswith(".sh") else f"{name}.sh" for name in chosen]
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f"no such selftest in {tree}: {', '.join(missing)} (there are: {', '.join(found)})")
    return wanted


def run(tree: Path, kernel: str, chosen: list[str]) -> int:
    """Run the scripts; print their output and a summary; 0 if every one run passed."""
    if not (tree / "functions.sh").is_file():
        raise ValueError(f"{tree}: not a livepatch selftest directory (no functions.sh)")
    names = scripts(tree, chosen)
    results: list[tuple[str, str]] = []
    klpfs = [sys.executable, "-m", "klpfs"]
    with tempfile.TemporaryDirectory(prefix="klpfs-selftests-") as tmp:
        copy = prepare(tree, Path(tmp), kernel)
        for name in names:
            if name in NOT_EMULATED:
                print(f"# {name}: not emulated: {NOT_EMULATED[name]}", flush=True)
                results.append((name, "not emulated"))
                continue
            print(f"# {name}", flush=True)
            proc = subprocess.run([*klpfs, "run", "--kernel", kernel, "--", "bash", f"./{name}"], cwd=copy,
                                  capture_output=True, text=True)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            results.append((name, "ok" if proc.returncode == 0 else
                            "skip" if proc.returncode == 4 else f"FAIL (exit {proc.returncode})"))
    width = max(len(name) for name in names)
    print("\n# summary (kernel profile %s)" % kernel)
    for name, outcome in results:
        print(f"#   {name:<{width}}  {outcome}")
    return 0 if all(outcome in ("ok", "not emulated") for _, outcome in results) else 1


def result_lines(output: str) -> list[tuple[str, str]]:
    """(title, "ok" | "not ok") of each `TEST: title ... ok` line a script printed."""
    return re.findall(r"^TEST: (.*?) \.\.\. (ok|not ok)$", output, re.M)
