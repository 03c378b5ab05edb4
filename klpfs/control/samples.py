"""The module files shipped with klpfs, found by name like .ko files by modprobe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def samples_dir() -> Path:
    return Path(str(resources.files("klpfs").joinpath("data/modules")))


def module_stem(name: str) -> str:
    """livepatch_sample, livepatch-sample.ko, ./x/livepatch-sample.toml or .py -> livepatch_sample."""
    base = Path(name).name
    for suffix in (".ko", ".toml", ".py"):
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


def find_module_file(name: str, search: list[Path] | None = None) -> Path | None:
    """An existing file as given, else a module file of that name in `search` then the samples."""
    path = Path(name)
    if path.is_file():
        return path
    stem = module_stem(name)
    for directory in [*(search or []), samples_dir()]:
        for candidate in sorted(module_files(directory)):
            if module_stem(candidate.name) == stem:
                return candidate
    return None


def module_files(directory: Path) -> list[Path]:
    """The module files in a directory: TOML, Python and .ko files."""
    return [*directory.glob("*.toml"), *directory.glob("*.py"), *directory.glob("*.ko")]


def list_samples() -> list[Path]:
    return sorted(module_files(samples_dir()))
