"""Kernel profiles: the behaviour of one kernel release as a set of switches.

The engine never asks "which version is this?"; it reads the switch for the
behaviour in question.  Each release is its predecessor plus the changes
that release made, so a later profile is a `derive` away.  The changes that
came with a known upstream release are `Rule`s: each names that release, and
every profile from it on has the change (and none before), whatever its
predecessor said.
"""

from __future__ import annotations

from typing import Any

import enum
import re
from dataclasses import dataclass, replace

from klpfs.host import HOST, host_release, host_vermagic_flags
from klpfs.kernel.ftrace import SHOW_RI, SHOW_RID, SHOW_RIDOM
from klpfs.kernel.oops import OOPS_4_16, OOPS_6_1, OOPS_6_12



def release_key(release: str) -> tuple[int, ...]:
    """"6.12" -> (6, 12): releases compare as numbers, not as text ("6.9" < "6.12")."""
    return tuple(int(part) for part in release.split("."))


@dataclass(frozen=True)
class Change:
    """What one upstream commit changed, the release it came in and, if a later one undid
    it, the first release without it."""

    what: str
    since: str | None = None
    """None: older than any profile."""
    until: str | None = None

    def in_release(self, release: str) -> bool:
        key = release_key(release)
        return ((self.since is None or release_key(self.since) <= key)
                and (self.until is None or key < release_key(self.until)))


class Rule(enum.Enum):
    """The kernel changes a profile takes from the release that brought them: every
    profile of that release or a later one has the change, every earlier one lacks it."""

    PAGE_FAULT_OOPS = Change(
        since="4.20",
        what="page_fault_oops(): \"BUG: unable to handle page fault for address:\" and the #PF lines, "
             "where \"unable to handle kernel paging request\" was")
    WATCHDOG_KTHREADS = Change(
        until="4.19",
        what="the softlockup watchdog runs as per-CPU kthreads, watchdog/N (4.19 moved it to the "
             "stopper: softlockup_fn() on cpu_stop)")
    RCU_BH_KTHREAD = Change(
        until="4.20",
        what="RCU-bh has a grace-period kthread of its own, rcu_bh (4.20 folded the flavours into one)")
    CALL_PADDING = Change(
        since="6.2",
        what="CONFIG_CALL_PADDING: 16 bytes of padding before every function of vmlinux and of each "
             "module, each with its __pfx_ symbol in kallsyms")
    MODULE_MEMORY = Change(
        since="6.4",
        what="module_memory (ac3b43283923): a module's kept symbols are laid out in its data area, "
             "no longer on pages of their own")
    KLP_COND_RESCHED = Change(
        since="6.4", until="6.16",
        what="klp_start_transition() enables klp_cond_resched (e3ff7c609f39): a busy kthread switches "
             "itself at cond_resched(), and rewriting the cond_resched static call IPIs every CPU, "
             "which takes an idle CPU round do_idle() through its switch point before the first "
             "klp_try_complete_transition()")
    RET_FROM_FORK_ASM = Change(
        since="6.5",
        what="x86's ret_from_fork() in C (3aec4ecb3d1f), entered from ret_from_fork_asm: both "
             "frames end a kthread's stack")
    RESCUER_KWORKER = Change(
        since="6.6",
        what="a workqueue's rescuer is a kworker named kworker/R-<workqueue> (b6a46f7263bd), "
             "no longer a kthread named after the workqueue")
    VERBOSE_OOPS_HEADER = Change(
        since="6.11",
        what="die()'s header starts \"Oops: \" (f9f62a877da1, 6.10); dump_stack_print_info() prints "
             "the UID and, on a line of their own, the taints spelled out (print_tainted_verbose()), "
             "both 6.11")


# Values of Profile.no_reliable_stack: what registration/enable does on an
# arch without reliable stack traces (klp_register_patch(), from 5.1 klp_enable_patch(),
# in kernel/livepatch/core.c).
ENOSYS_UNLESS_IMMEDIATE = "enosys-unless-immediate"
ENOSYS = "enosys"
EOPNOTSUPP = "eopnotsupp"
WARN = "warn"

# Values of Profile.force_marks: whom `force` pins for good (klp_force_transition()
# in kernel/livepatch/transition.c).
FORCE_NONE = "none"
FORCE_GLOBAL = "global"
"""klp_forced: one flag, every patch module pinned (4.16 to 5.0)."""
FORCE_LISTED = "listed"
"""Every patch listed at the time (5.1 to 5.17)."""
FORCE_REMOVED = "removed"
"""Only the patches being removed: an unpatching patch, or those a replace patch replaces (5.18 on)."""


@dataclass(frozen=True)
class Profile:
    version: str
    release: str
    """What `uname -r` reports: a release string a distribution shipped for that
    kernel (4.15: Ubuntu 18.04; 4.16 and 6.1, 6.11, 6.12: Debian; 5.1: Fedora 30;
    6.14: Ubuntu 25.04), so tools parsing it meet the real shapes."""
    # -- patch structures and API --------------------------------------------
    immediate: bool
    """klp_patch.immediate and klp_func.immediate exist (4.15 only)."""
    register_api: bool
    """klp_register_patch/klp_unregister_patch exist; patches stay registered when
    disabled.  Without it (5.1 on) klp_enable_patch does everything and a
    disabled patch is freed: its directory goes and its module is released."""
    stacking_rule: bool
    """Enable/disable only in registration order (__klp_enable_patch() and __klp_disable_patch() in
    kernel/livepatch/core.c; < 5.1)."""
    atomic_replace: bool
    """klp_patch.replace with nop functions (5.1 on)."""
    system_states: bool
    """klp_patch.states and the compatibility check at enable (5.5 on)."""
    no_reliable_stack: str
    """See ENOSYS_UNLESS_IMMEDIATE and friends."""
    name_limits: bool
    """old_name and object names longer than the kernel's limits are -EINVAL (5.0 on)."""
    ksym_name_len: int
    """KSYM_NAME_LEN: 128, 512 from 6.1."""
    null_checks_first: bool
    """klp_enable_patch checks for missing objs/funcs before anything else (5.17 on)."""
    # -- transition --------------------------------------------------------------
    sysfs_signal: bool
    """<patch>/signal, 0200 (signal_store() in kernel/livepatch/core.c, 4.16 to 5.0)."""
    sysfs_force: bool
    """<patch>/force, 0200 (force_store() in kernel/livepatch/core.c, 4.16 on)."""
    force_marks: str
    """See FORCE_*."""
    auto_signals: bool
    """Fake signals every 15 unsuccessful retries, the first round announced (5.1 on)."""
    stack_check_in_try_switch: bool
    """All per-task debug lines name klp_try_switch_task (5.16 on, 6.1 observed)."""
    replaced_freed_after_callbacks: bool
    """Replaced patches are freed after the replace patch's post_patch callbacks (5.5 on)."""
    # -- sysfs ----------------------------------------------------------------------
    sysfs_patched: bool
    """<patch>/<object>/patched, 0444 (6.1 on)."""
    sysfs_replace: bool
    """<patch>/replace, 0444 (6.11 on)."""
    sysfs_stack_order: bool
    """<patch>/stack_order, 0444 (6.14 on)."""
    # -- shadow variables and the module loader ------------------------------------
    ftrace_permanent: bool
    """Livepatch's ftrace ops are permanent: ftrace_enabled cannot be turned off under a
    patch, and a patch cannot be enabled while it is off (-EBUSY) (5.5 on).  Before,
    turning it off silently stops every redirection."""
    ftrace_save_regs: bool
    """Livepatch's ftrace ops ask for FTRACE_OPS_FL_SAVE_REGS (an `R` in enabled_functions):
    x86 before HAVE_DYNAMIC_FTRACE_WITH_ARGS (5.11)."""
    ftrace_show: str
    """The flags enabled_functions prints (klpfs.kernel.ftrace.SHOW_*): R and I; D from 5.5;
    O and M from 6.4."""
    trace_mode_read: int
    """The mode of tracefs's read-only files: 0444, 0440 (TRACE_MODE_READ) from 5.16."""
    shadow_ctor_dtor: bool
    """klp_shadow_alloc takes a constructor, klp_shadow_free a destructor (4.17 on)."""
    vmlinux_name_check: bool
    """A module named vmlinux is refused by the livepatch coming hook (5.8 on)."""
    module_sig_messages: bool
    """The loader warns about unsigned modules (a distro kernel with CONFIG_MODULE_SIG)."""
    module_force_unload: bool
    """CONFIG_MODULE_FORCE_UNLOAD: `rmmod -f` (delete_module with O_TRUNC) removes a module
    that is in use, tainting R.  Debian's kernels set it (4.16, 6.1, 6.11, 6.12 here; the 6.1
    and 6.12 kernels observed); Ubuntu's (4.15, 6.14) and Fedora's (5.1) leave it unset, and
    there `rmmod -f` of a module in use fails as plain `rmmod` does."""
    # -- dynamic debug ----------------------------------------------------------------
    dyndbg: str
    """The lib/dynamic_debug.c the control file behaves as (klpfs.kernel.dyndbg_query.GENERATIONS):
    "4.15" (formats shown with octal escapes, no `file foo.c:func`), "6.1", "6.12" (the `s` flag)."""
    livepatch_sources: str
    """The kernel/livepatch sources whose pr_debug() line numbers and functions the control
    file lists (klpfs.livepatch.debug): "4.15", "6.1" or "6.12"."""
    image: str
    """The observed kernel whose vmlinux the emulated one follows (klpfs.kernel.image): its
    kernel threads after boot and, where observed, its functions' sizes: "4.15" (the
    default image), "6.1" or "6.12"."""
    # -- module files (.ko) ----------------------------------------------------------
    vermagic_flags: str = "SMP mod_unload modversions "
    """What follows the release in VERMAGIC_STRING (include/linux/vermagic.h): `preempt`
    for CONFIG_PREEMPT_BUILD (Debian's and Ubuntu's 6.x kernels, PREEMPT_DYNAMIC), absent
    for the 4.x/5.1 distribution kernels (voluntary preemption); every one has modversions."""
    module_layout_crc: int | None = None
    """The CRC of `module_layout` (check_modstruct_version) when known: Debian 6.1.0-50-amd64's
    Module.symvers; None: a module's is not checked."""
    package_id: str = ""
    """LINUX_PACKAGE_ID, which Debian's kernels print after the build number where a stack
    dump names the kernel (dump_stack_print_info()); "" where it was not observed."""
    module_force_load: bool = False
    """CONFIG_MODULE_FORCE_LOAD: finit_module()'s MODULE_INIT_IGNORE_* flags (`insmod -f`)
    load a module whose vermagic or module_layout CRC disagrees, tainting F.  Debian's 6.1
    and 6.12 configs set it; the other kernels' configs are not at hand, and there a forced
    load is refused as the kernel without it refuses it."""

    def has(self, rule: Rule) -> bool:
        """Does this release have the change `rule` stands for?"""
        return rule.value.in_release(self.version)

    @property
    def cond_resched_switch(self) -> bool:
        """A busy kthread switches itself at cond_resched() when it is not in patched code."""
        return self.has(Rule.KLP_COND_RESCHED)

    @property
    def oops_style(self) -> str:
        """How an oops reads (klpfs.kernel.oops.OOPS_*): "paging request" before 4.20, the #PF
        lines after, "Oops: Oops:" with the UID and the spelled-out taints from 6.11."""
        if self.has(Rule.VERBOSE_OOPS_HEADER):
            return OOPS_6_12
        return OOPS_6_1 if self.has(Rule.PAGE_FAULT_OOPS) else OOPS_4_16

    @property
    def vermagic(self) -> str:
        """VERMAGIC_STRING: what a module built for this kernel carries in its .modinfo."""
        return f"{self.release} {self.vermagic_flags}"

    @property
    def reenable(self) -> bool:
        """`1` to a disabled patch's `enabled` enables it again (only while patches stay registered)."""
        return self.register_api

    def derive(self, version: str, release: str, **changes: Any) -> Profile:
        return replace(self, version=version, release=release, **changes)

    @property
    def modversions(self) -> bool:
        """CONFIG_MODVERSIONS, as the vermagic says: symbol CRCs are checked, and same_magic()
        leaves the release out when the module has them."""
        return "modversions" in self.vermagic_flags.split()

    def built_as(self, release: str | None = None, vermagic_flags: str | None = None,
                 module_layout_crc: int | None = None) -> Profile:
        """The same rules for another build of the kernel (--release): its release string,
        which uname, /proc/version and the vermagic follow, and its module_layout CRC
        (--symvers).  A CRC is one build's: another build without one has none to check."""
        if release is None and vermagic_flags is None and module_layout_crc is None:
            return self
        return replace(self, release=release or self.release,
                       vermagic_flags=self.vermagic_flags if vermagic_flags is None else vermagic_flags,
                       module_layout_crc=module_layout_crc)


LINUX_4_15 = Profile(
    version="4.15", release="4.15.0-213-generic",
    immediate=True, register_api=True, stacking_rule=True, atomic_replace=False, system_states=False,
    no_reliable_stack=ENOSYS_UNLESS_IMMEDIATE, name_limits=False, ksym_name_len=128, null_checks_first=False,
    sysfs_signal=False, sysfs_force=False, force_marks=FORCE_NONE, auto_signals=False,
    stack_check_in_try_switch=False,
    replaced_freed_after_callbacks=False,
    sysfs_patched=False, sysfs_replace=False, sysfs_stack_order=False,
    ftrace_permanent=False, ftrace_save_regs=True, ftrace_show=SHOW_RI, trace_mode_read=0o444,
    shadow_ctor_dtor=False, vmlinux_name_check=False, module_sig_messages=False, module_force_unload=False,
    dyndbg="4.15", livepatch_sources="4.15", image="4.15",
)

LINUX_4_16 = LINUX_4_15.derive(
    "4.16", "4.16.0-2-amd64",
    immediate=False, no_reliable_stack=ENOSYS, sysfs_signal=True, sysfs_force=True, force_marks=FORCE_GLOBAL,
    module_force_unload=True,
)

LINUX_5_1 = LINUX_4_16.derive(
    "5.1", "5.1.20-300.fc30.x86_64",
    register_api=False, stacking_rule=False, atomic_replace=True, no_reliable_stack=EOPNOTSUPP,
    name_limits=True, sysfs_signal=False, force_marks=FORCE_LISTED, auto_signals=True, shadow_ctor_dtor=True,
    module_force_unload=False,
    # 5.1's own transition.c is not at hand: its callsites are listed as 6.1's (5.1 still
    # prints the per-task lines through one `pr_debug("%s", err_buf)`, at other lines).
    livepatch_sources="6.1",
)

LINUX_6_1 = LINUX_5_1.derive(
    "6.1", "6.1.0-50-amd64",
    system_states=True, ftrace_permanent=True, no_reliable_stack=WARN, ksym_name_len=512, null_checks_first=True,
    force_marks=FORCE_REMOVED,
    stack_check_in_try_switch=True, replaced_freed_after_callbacks=True,
    sysfs_patched=True, vmlinux_name_check=True, module_sig_messages=True, module_force_unload=True,
    ftrace_save_regs=False, ftrace_show=SHOW_RID, trace_mode_read=0o440,
    dyndbg="6.1", image="6.1", vermagic_flags="SMP preempt mod_unload modversions ", module_layout_crc=0xBCE1A965,
    module_force_load=True,
)

# 6.11's callsites are 6.12's: its transition.c already has the cond_resched()
# switching (6.4) that moved them from where 6.1 has them.  Its vmlinux, and
# 6.14's, follow the 6.12 kernel observed, the nearest one.
LINUX_6_11 = LINUX_6_1.derive("6.11", "6.11.10-amd64", sysfs_replace=True, module_force_load=False,
                              dyndbg="6.12", livepatch_sources="6.12", image="6.12", module_layout_crc=None,
                              ftrace_show=SHOW_RIDOM)

# Debian's 6.12 LTS (Debian 13, and 12's backports), as observed: what it shows beyond
# 6.11 came with earlier releases (the Rules) or is its own build (sizes, tasks).
LINUX_6_12 = LINUX_6_11.derive("6.12", "6.12.118+deb12-amd64", package_id=" Debian 6.12.118-1~deb12u1",
                               module_force_load=True)

LINUX_6_14 = LINUX_6_11.derive("6.14", "6.14.0-37-generic", sysfs_stack_order=True, module_force_unload=False)

PROFILES: dict[str, Profile] = {p.version: p for p in (LINUX_4_15, LINUX_4_16, LINUX_5_1, LINUX_6_1,
                                                       LINUX_6_11, LINUX_6_12, LINUX_6_14)}
DEFAULT = LINUX_4_15.version
LATEST = LINUX_6_14.version


def profile_for_release(release: str) -> Profile:
    """The newest profile not newer than a release string ("6.18.44-fc" -> 6.14's rules);
    the oldest for anything older than all.  ValueError if it does not start X.Y."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        raise ValueError(f"release {release!r} does not start with a version (X.Y)")
    key = (int(match.group(1)), int(match.group(2)))
    fitting = [p for p in PROFILES.values() if release_key(p.version) <= key]
    return max(fitting, key=lambda p: release_key(p.version)) if fitting else PROFILES[DEFAULT]


def get_profile(version: str) -> Profile:
    """The profile for `version` ("latest" names the newest, "host" the running kernel's
    build: its release, the rules of the newest profile not newer, its vermagic);
    ValueError lists the choices."""
    if version == HOST:
        release = host_release()
        return profile_for_release(release).built_as(release, host_vermagic_flags(release))
    if version == "latest":
        version = LATEST
    try:
        return PROFILES[version]
    except KeyError:
        choices = ", ".join([*PROFILES, "latest", HOST])
        raise ValueError(f"unknown kernel version {version!r} (choose from {choices})") from None
