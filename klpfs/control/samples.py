"""The module files shipped with klpfs, found by name like .ko files by modprobe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def samples_dir() -> Path:
    return Path(str(resources.files("klpfs").joinpath("data/modules")))


def module_stem(name: str) -> str:
    """livepatch_sample, livepatch-sample.ko, ./x/livepatch-sample.toml -> livepatch_sample."""
    base = Path(name).name
    for suffix in (".ko", ".toml"):
        base = base.removesuffix(suffix)
    return base.replace("-", "_")


def find_module_file(name: str, search: list[Path] | None = None) -> Path | None:
    """An existing file as given, else a module file of that name in `search` then the samples."""
    path = Path(name)
    if path.is_file():
        return path
    stem = module_stem(name)
    for directory in [*(search or []), samples_dir()]:
        for candidate in sorted(directory.glob("*.toml")):
            if module_stem(candidate.name) == stem:
                return candidate
    return None


def list_samples() -> list[Path]:
    return sorted(samples_dir().glob("*.toml"))
