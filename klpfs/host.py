"""The running kernel as the build to emulate (--kernel host).

Its release is `uname -r`; its vermagic is what VERMAGIC_STRING
(include/linux/vermagic.h) makes of its configuration, read from the
headers modules are built against (/lib/modules/<release>/build) or
/boot/config-<release>, so a module built for this machine passes
same_magic().  MODULE_ARCH_VERMAGIC is x86-64's generic one, empty.
"""

from __future__ import annotations

import os
from pathlib import Path

HOST = "host"
"""--kernel's name for the running kernel."""

VERMAGIC_FLAGS = (
    ("CONFIG_SMP", "SMP "),
    ("CONFIG_PREEMPT_BUILD", "preempt "),
    ("CONFIG_PREEMPT_RT", "preempt_rt "),
    ("CONFIG_MODULE_UNLOAD", "mod_unload "),
    ("CONFIG_MODVERSIONS", "modversions "),
)
"""MODULE_VERMAGIC_SMP, _PREEMPT (PREEMPT_BUILD, else PREEMPT_RT), _MODULE_UNLOAD and
_MODVERSIONS, in VERMAGIC_STRING's order."""


def host_release() -> str:
    return os.uname().release


def config_files(release: str, root: Path = Path("/")) -> list[Path]:
    """Where the host's configuration may be: its headers' auto.conf and .config, /boot's copy."""
    build = root / "lib/modules" / release / "build"
    return [build / "include/config/auto.conf", build / ".config", root / "boot" / f"config-{release}"]


def vermagic_flags(config: str) -> str:
    """What follows the release in VERMAGIC_STRING for a kernel configured so."""
    enabled = {line.split("=", 1)[0] for line in config.splitlines() if line.endswith(("=y", "=m"))}
    flags = ""
    for option, flag in VERMAGIC_FLAGS:
        if option == "CONFIG_PREEMPT_RT" and "CONFIG_PREEMPT_BUILD" in enabled:
            continue
        if option in enabled:
            flags += flag
    return flags


def host_vermagic_flags(release: str, root: Path = Path("/")) -> str | None:
    """The running kernel's vermagic flags, from the first configuration found; None
    when there is none to read (the profile's flags stand)."""
    for path in config_files(release, root):
        try:
            return vermagic_flags(path.read_text(errors="replace"))
        except OSError:
            continue
    return None
