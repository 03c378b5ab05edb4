"""Kernel profiles: the behaviour of one kernel release as a set of switches.

The engine never asks "which version is this?"; it reads the switch for the
behaviour in question.  Each release is its predecessor plus the changes
that release made (spec §12), so a later profile is a `derive` away.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Profile:
    version: str
    release: str
    # -- livepatch core ----------------------------------------------------
    immediate: bool
    """klp_patch.immediate and klp_func.immediate exist (4.15 only, §4.1)."""
    register_api: bool
    """klp_register_patch/klp_unregister_patch are separate from enabling (< 5.1)."""
    stacking_rule: bool
    """Enable/disable only in registration order (§2.4; < 5.1)."""
    reenable: bool
    """`1` to a disabled patch's `enabled` enables it again (< 5.1)."""
    # -- transition --------------------------------------------------------
    sysfs_signal: bool
    """<patch>/signal, 0200 (4.16 to 5.0, §2.6)."""
    sysfs_force: bool
    """<patch>/force, 0200 (4.16 on, §2.6)."""
    forced_global: bool
    """klp_forced is one global flag that pins every patch module for good (4.16 to 5.0, §8.11)."""
    stack_check_in_try_switch: bool = False
    """The per-task stack messages name klp_try_switch_task, not klp_check_stack (6.1 observed)."""
    # -- module loader around livepatch -------------------------------------
    module_sig_messages: bool = False
    """The loader warns about unsigned modules (distro kernels with CONFIG_MODULE_SIG)."""

    def derive(self, version: str, release: str, **changes: object) -> Profile:
        return replace(self, version=version, release=release, **changes)


LINUX_4_15 = Profile(
    version="4.15", release="4.15.0",
    immediate=True, register_api=True, stacking_rule=True, reenable=True,
    sysfs_signal=False, sysfs_force=False, forced_global=False,
)

LINUX_4_16 = LINUX_4_15.derive(
    "4.16", "4.16.13",
    immediate=False, sysfs_signal=True, sysfs_force=True, forced_global=True,
)

PROFILES: dict[str, Profile] = {p.version: p for p in (LINUX_4_15, LINUX_4_16)}
DEFAULT = LINUX_4_15.version
LATEST = LINUX_4_16.version


def get_profile(version: str) -> Profile:
    """The profile for `version` ("latest" names the newest); ValueError lists the choices."""
    if version == "latest":
        version = LATEST
    try:
        return PROFILES[version]
    except KeyError:
        choices = ", ".join([*PROFILES, "latest"])
        raise ValueError(f"unknown kernel version {version!r} (choose from {choices})") from None
