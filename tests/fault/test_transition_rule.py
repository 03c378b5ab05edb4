"""The one-transition rule the concurrent writers are checked with (transitions.py)
flags what breaks it, and only that."""

from __future__ import annotations

from .transitions import OneTransition

START = "livepatch: '{}': starting {}patching transition"
DONE = "livepatch: '{}': {}patching complete"


def run(lines: list[str], in_transition: str | None = None) -> OneTransition:
    rule = OneTransition(in_transition)
    for line in lines:
        rule.check(line)
    return rule


def test_transitions_one_after_another_and_a_reversal_keep_the_rule() -> None:
    rule = run([START.format("a", ""), "livepatch: enabling patch 'b'", DONE.format("a", ""),
                START.format("b", ""), START.format("b", "un"), DONE.format("b", "un"),
                DONE.format("c", "un")])
    assert (rule.transitions, rule.violations, rule.open) == (2, [], None)


def test_a_second_patch_starting_or_completing_during_a_transition_breaks_it() -> None:
    rule = run([START.format("b", ""), DONE.format("c", "un")], in_transition="a")
    assert rule.violations == ["'b' started a transition while 'a' was in one",
                               "'c' completed a transition while 'b' was in one"]
