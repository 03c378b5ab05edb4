"""The release-keyed rules (klpfs.profiles.Rule): each kernel change with the
release that brought it, on every profile from that release on and on none
before -- 6.11 and 6.14 included for the changes 6.12 shows."""

from __future__ import annotations

import pytest

from klpfs.kernel.oops import OOPS_4_16, OOPS_6_1, OOPS_6_12
from klpfs.profiles import PROFILES, Rule, get_profile, release_key

RELEASES = {
    Rule.PAGE_FAULT_OOPS: ("4.20", None),
    Rule.WATCHDOG_KTHREADS: (None, "4.19"),
    Rule.RCU_BH_KTHREAD: (None, "4.20"),
    Rule.CALL_PADDING: ("6.2", None),
    Rule.MODULE_MEMORY: ("6.4", None),
    Rule.KLP_COND_RESCHED: ("6.4", "6.16"),
    Rule.RET_FROM_FORK_ASM: ("6.5", None),
    Rule.RESCUER_KWORKER: ("6.6", None),
    Rule.VERBOSE_OOPS_HEADER: ("6.11", None),
}
"""The upstream releases, from the kernel's history (the commits each rule names)."""


def test_every_rule_has_its_release() -> None:
    assert set(RELEASES) == set(Rule)


@pytest.mark.parametrize("rule", list(Rule), ids=lambda r: r.name)
def test_rule_holds_from_its_release(rule: Rule) -> None:
    since, until = RELEASES[rule]
    assert (rule.value.since, rule.value.until) == (since, until)
    for version, profile in PROFILES.items():
        expected = ((since is None or release_key(version) >= release_key(since))
                    and (until is None or release_key(version) < release_key(until)))
        assert profile.has(rule) is expected, version


def test_releases_compare_as_numbers() -> None:
    assert release_key("6.9") < release_key("6.12") < release_key("6.14")


@pytest.mark.parametrize("version, oops, cond_resched", [
    ("4.15", OOPS_4_16, False), ("4.16", OOPS_4_16, False), ("5.1", OOPS_6_1, False), ("6.1", OOPS_6_1, False),
    ("6.11", OOPS_6_12, True), ("6.12", OOPS_6_12, True), ("6.14", OOPS_6_12, True)])
def test_switches_read_from_the_rules(version: str, oops: str, cond_resched: bool) -> None:
    """The oops style and the cond_resched() switching follow their rules."""
    profile = get_profile(version)
    assert (profile.oops_style, profile.cond_resched_switch) == (oops, cond_resched)
