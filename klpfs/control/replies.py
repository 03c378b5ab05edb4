"""The daemon's answers as typed values: what klpfs.control.client.Client returns.

Each is a frozen dataclass built from a reply's JSON; `dataclasses.asdict` of
one is what `--json` prints, so the field names here are the documented keys
(docs/cli.md) and change only with them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_fields(cls: type[T], data: dict[str, Any]) -> T:
    """A reply whose JSON keys are exactly the dataclass's fields, one for one."""
    return cls(**{f.name: data[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModuleInfo:
    """A loaded module, as lsmod lists it."""

    name: str
    size: int
    refcnt: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModuleInfo:
        return from_fields(cls, data)


@dataclass(frozen=True)
class Record:
    """A kernel log record: `level` by name (err, notice, ...), `facility` 0 for the
    kernel's own and 1 for user space's (/dev/kmsg writes), `time` in seconds since boot."""

    seq: int
    level: str
    facility: int
    time: float
    text: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return from_fields(cls, data)


@dataclass(frozen=True)
class TaskInfo:
    """A task: `kind` user, kthread or idle; `state` R, S, D, ...; `patch_state` -1, 0 or 1
    as /proc/<pid>/patch_state; `where` the function it runs or sleeps in ("" in user mode)."""

    pid: int
    comm: str
    kind: str
    state: str
    patch_state: int
    where: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskInfo:
        return from_fields(cls, data)


@dataclass(frozen=True)
class Implementation:
    """The function that answered a call: the original, or a patch's replacement (`module`)."""

    name: str
    module: str | None

    def __str__(self) -> str:
        return self.name + (f" [{self.module}]" if self.module else "")

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> Implementation:
        return cls(name=reply["impl"], module=reply.get("impl_module"))


@dataclass(frozen=True)
class Sleeping:
    """A task put to sleep inside a function, and the implementation it entered."""

    task: TaskInfo
    impl: Implementation


@dataclass(frozen=True)
class CallResult:
    """An emulated function run as a task: who ran it, what answered, what it printed."""

    task: TaskInfo
    impl: Implementation
    output: str


@dataclass(frozen=True)
class KernelInfo:
    """The profile (`kernel`), `uname -r` (`release`) and the vermagic modules need."""

    kernel: str
    release: str
    vermagic: str


@dataclass(frozen=True)
class Patch:
    """A registered patch: `transition` is true for the one in transition."""

    name: str
    enabled: bool
    transition: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Patch:
        return from_fields(cls, data)


@dataclass(frozen=True)
class Blocker:
    """A task the transition waits for, and why: `reason` is "sleeping" (in `function`,
    a function the transition replaces), "running" (on a CPU), "unreliable_stack",
    "no_reliable_stacks" (the architecture has none) or "pending" (nothing holds it:
    it switches at the next attempt); `stack` as /proc/<pid>/stack shows it."""

    task: TaskInfo
    reason: str
    function: str | None
    stack: tuple[str, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Blocker:
        return cls(task=TaskInfo.from_json(data["task"]), reason=data["reason"], function=data["function"],
                   stack=tuple(data["stack"]))


@dataclass(frozen=True)
class Transition:
    """The transition under way: `tasks` it covers, how many `switched`, its unsuccessful
    `attempts` so far, when the next attempt and the next automatic fake signals come
    (seconds since boot; `next_signal` is None where signals are sent by hand), and
    the tasks it waits for."""

    patch: str
    direction: str
    tasks: int
    switched: int
    attempts: int
    next_retry: float | None
    next_signal: float | None
    blocking: tuple[Blocker, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transition:
        return cls(patch=data["patch"], direction=data["direction"], tasks=data["tasks"],
                   switched=data["switched"], attempts=data["attempts"], next_retry=data["next_retry"],
                   next_signal=data["next_signal"],
                   blocking=tuple(Blocker.from_json(b) for b in data["blocking"]))


@dataclass(frozen=True)
class LivepatchState:
    """The livepatch core at `now` (seconds since boot; `speed` emulated seconds a second):
    its patches in klp_patches order and the transition, if one is under way."""

    kernel: str
    now: float
    speed: float
    patches: tuple[Patch, ...]
    transition: Transition | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LivepatchState:
        transition = data["transition"]
        return cls(kernel=data["kernel"], now=data["now"], speed=data["speed"],
                   patches=tuple(Patch.from_json(p) for p in data["patches"]),
                   transition=None if transition is None else Transition.from_json(transition))
