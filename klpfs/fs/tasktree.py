"""The daemon's trio tasks as a tree, for its log: what each task waits in.

A daemon that does not stop when it should is waiting on something; SIGUSR1
makes it log this tree (see klpfs.fs.mount), which names the task and the
line it waits at.
"""

from __future__ import annotations

import os

import trio

TRIO = os.path.dirname(trio.__file__) + os.sep


def _where(task: trio.lowlevel.Task) -> str:
    """The innermost line outside trio itself the task is suspended at (a running task,
    the one logging, has none)."""
    frames = [(f, n) for f, n in task.iter_await_frames() if not f.f_code.co_filename.startswith(TRIO)]
    if not frames:
        return ""
    frame, lineno = frames[-1]
    return f" at {frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}"


def task_tree() -> str:
    """Every task of the current trio run, one a line, indented under the nursery
    that owns it."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}{task.name}{_where(task)}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    assert root is not None, "task_tree() runs inside trio.run()"
    walk(root, 0)
    return "\n".join(lines)
