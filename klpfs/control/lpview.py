"""The livepatch core as `klpfs status`, `klpfs wait` and `klpfs watch` print it:
pure functions from a LivepatchState to lines of text."""

from __future__ import annotations

from klpfs.control.replies import Blocker, LivepatchState, Patch, Transition

REASONS = {"running": "running", "unreliable_stack": "unreliable stack",
           "no_reliable_stacks": "no reliable stacks (the architecture cannot check them)",
           "pending": "switches at the next attempt"}
"""How a Blocker's reason reads; "sleeping" names its functions instead."""


def patch_table(patches: tuple[Patch, ...]) -> list[str]:
    """The patches as their sysfs attributes read: enabled and transition, 0 or 1."""
    if not patches:
        return ["no patches"]
    width = max(20, *(len(p.name) for p in patches))
    return [f"{'PATCH':<{width}}  ENABLED  TRANSITION",
            *(f"{p.name:<{width}}  {int(p.enabled):>7}  {int(p.transition):>10}" for p in patches)]


def progress(transition: Transition) -> str:
    return f"{transition.patch} {transition.direction}: {transition.switched} of {transition.tasks} tasks switched"


def blocker_line(blocker: Blocker) -> str:
    """`PID COMM (kind, state): why`.  A sleeping task is "sleeping on function F", as the
    kernel's debug line says, F the function the transition replaces; where the task is
    in another (the new function, while unpatching) that one is named too."""
    task = blocker.task
    if blocker.reason != "sleeping":
        return f"{task.pid} {task.comm} ({task.kind}, {task.state}): {REASONS[blocker.reason]}"
    why = f"sleeping on function {blocker.function}"
    if task.where and task.where != blocker.function:
        why += f", in {task.where}"
    return f"{task.pid} {task.comm} ({task.kind}, {task.state}): {why}"


def seconds_until(when: float, now: float) -> str:
    return f"{max(0.0, when - now):.1f}s"


def timing(transition: Transition, now: float) -> str:
    """Attempts so far, and when the next attempt and the next fake signals come."""
    parts = [f"attempts {transition.attempts}"]
    if transition.next_retry is not None:
        parts.append(f"next retry in {seconds_until(transition.next_retry, now)}")
    if transition.next_signal is not None:
        parts.append(f"next fake signal in {seconds_until(transition.next_signal, now)}")
    return ", ".join(parts)


def transition_lines(transition: Transition, now: float, stacks: bool) -> list[str]:
    """The transition: its progress, its timing, and each task it waits for (with its
    stack, as /proc/<pid>/stack shows it, if `stacks`)."""
    lines = [f"transition: {progress(transition)}", f"  {timing(transition, now)}"]
    if transition.blocking:
        lines.append("  waiting for:")
    for blocker in transition.blocking:
        lines.append(f"    {blocker_line(blocker)}")
        if stacks:
            lines += [f"      {frame}" for frame in blocker.stack]
    return lines


def status_lines(state: LivepatchState) -> list[str]:
    """`klpfs status`: the kernel and its clock, the patches, the transition."""
    lines = [f"kernel {state.kernel}, {state.now:.6f} seconds since boot", *patch_table(state.patches)]
    if state.transition is None:
        return [*lines, "transition: none"]
    return [*lines, *transition_lines(state.transition, state.now, stacks=True)]
