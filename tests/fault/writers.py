"""Concurrent writers and readers against a mounted 6.1 tree, with a model of
what each write may do.

Every patch has one owner thread, the only one writing valid values to its
`enabled` and its module's parameters and the only one reloading it, so the
owner knows the patch's state and can tell what the kernel must answer:

- enabled (1): `enabled_store()` refuses a write of 1 or of garbage with
  EINVAL; a write of 0 disables it, or is EBUSY while another patch is in
  transition.  An enabled patch never goes away.
- disabled (0): writing 0 is EINVAL, writing 1 reverses the unpatching
  transition while it runs, else EINVAL; once the transition completes the
  patch is freed (6.1) and its directory may vanish at any time.
- gone: the directory was seen vanish; the module is still loaded until the
  owner's rmmod, which waits for the freed patch's module reference
  (`klp_free_patch_finish()`), kept for good after a forced unpatching.
- unloaded: the owner's rmmod went through; insmod brings the patch back,
  or is EBUSY while another patch is in transition.

Chaos threads meanwhile read everything and write garbage everywhere, and
0 to `force`; those never change what an owner expects.  After the run
the final state must be what each owner's last successful write left.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from klpfs.control.client import ControlError, request
from klpfs.control.modrequest import insmod_file_args
from klpfs.control.runtime import NoDaemon, find_daemon
from klpfs.control.samples import find_module_file
from klpfs.kernel.printk import LOG_BUF_RECORDS

from . import kernel_errnos as kerr
from .fileio import CloseFailed, read_file, write_file
from .transitions import TransitionMonitor
from .values import (BOOL_INVALID, BOOL_VALUES, INT_INVALID, INT_VALUES, shown_bool_param, shown_int,
                     written)

KERNEL = "6.1"
LIVEPATCH = "sys/kernel/livepatch"
SETTLE = 30.0
"""Seconds the last transitions get to finish once the writers are done."""
HANG = 10.0
"""A file operation or control request still running after this long is a hang."""
Errnos = Collection[int]
FORCE_ODDS = 0.05
"""How often an owner's write to `force` is a 1.  Only owners write 1, and only to an
enabled patch, whose transition can only be a patching one: forcing an unpatching
transition would pin the patch's module for good (klp_force_transition() marks it
forced) and end its churn."""


@dataclass(frozen=True)
class PatchModule:
    name: str
    params: dict[str, str] = field(default_factory=dict)
    """Each writable parameter's type: "int" or "bool"."""


PATCHES = (
    PatchModule("livepatch_sample"),
    PatchModule("klp_stack_a"),
    PatchModule("klp_stack_b"),
    PatchModule("test_klp_livepatch"),
    PatchModule("test_klp_callbacks_demo", {"pre_patch_ret": "int"}),
)
TARGET = PatchModule("test_klp_callbacks_busy", {"block_transition": "bool"})
"""Loaded first with block_transition=Y: its kworker stays inside busymod_work_func,
which test_klp_callbacks_demo patches, until its owner writes N (or a force)."""


class State(Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    GONE = "gone"
    UNLOADED = "unloaded"


@dataclass
class Figures:
    """What one run did; `violations` lists every broken invariant."""

    writes: int = 0
    reads: int = 0
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    """Per write: "ok" or the errno's name."""
    hangs: int = 0
    crashes: int = 0
    transitions: int = 0
    violations: list[str] = field(default_factory=list)

    def add(self, other: Figures) -> None:
        self.writes += other.writes
        self.reads += other.reads
        self.requests += other.requests
        self.outcomes.update(other.outcomes)
        self.hangs += other.hangs
        self.crashes += other.crashes
        self.transitions += other.transitions
        self.violations += other.violations


def outcome_name(err: int) -> str:
    return "ok" if err == 0 else errno.errorcode.get(err, str(err))


class Actor(ABC):
    """One thread's part in a round: `steps` random operations, then `finish`.
    `busy_since` is when the operation in progress began (None between
    operations), for the hang watchdog."""

    def __init__(self, name: str, mount: Path, seed: int):
        self.name = name
        self.mount = mount
        self.rng = random.Random(f"{seed}:{name}")
        self.figures = Figures()
        self.busy_since: float | None = None
        self.hung = False

    def play(self, steps: int) -> None:
        try:
            for _ in range(steps):
                self.step()
            self.finish()
        except (CloseFailed, OSError, ControlError, NoDaemon) as e:
            self.violation(f"{type(e).__name__}: {e}")
        finally:
            self.busy_since = None

    @abstractmethod
    def step(self) -> None:
        """One random operation, checked."""

    def finish(self) -> None:
        """The last operations of a round, once the random ones are done."""

    def violation(self, text: str) -> None:
        self.figures.violations.append(f"{self.name}: {text}")

    def write(self, relative: str, data: bytes, allowed: Errnos) -> int:
        """Write, count, and check the outcome against the errnos allowed here (0: success)."""
        self.busy_since = time.monotonic()
        err, count = write_file(self.mount / relative, data)
        self.busy_since = None
        self.figures.writes += 1
        self.figures.outcomes[outcome_name(err)] += 1
        if err not in allowed:
            self.violation(f"write {data[:16]!r} to {relative}: {outcome_name(err)}, expected one of "
                           f"{sorted(outcome_name(e) for e in allowed)}")
        elif not err and count != written(data):
            self.violation(f"write {data[:16]!r} to {relative} returned {count}, not {written(data)}")
        return err

    def read(self, relative: str, allowed: Errnos) -> tuple[int, str]:
        self.busy_since = time.monotonic()
        err, text = read_file(self.mount / relative)
        self.busy_since = None
        self.figures.reads += 1
        if err not in allowed:
            self.violation(f"read of {relative}: {outcome_name(err)}, expected one of "
                           f"{sorted(outcome_name(e) for e in allowed)}")
        return err, text

    def expect_read(self, relative: str, value: str, allowed: Errnos = frozenset({0})) -> int:
        """Read, requiring `value` when the read succeeds."""
        err, text = self.read(relative, allowed)
        if not err and text != value:
            self.violation(f"read of {relative}: {text!r}, expected {value!r}")
        return err

    def control(self, cmd: str, **args: object) -> dict[str, Any]:
        self.busy_since = time.monotonic()
        reply = request(str(self.mount), cmd, **args)
        self.busy_since = None
        self.figures.requests += 1
        return reply


class ParamWriter(Actor):
    """Writes a module's parameters and reads them back: each shows the last
    successful write (param_attr_store() under kernel_param_lock())."""

    def __init__(self, mount: Path, seed: int, module: PatchModule, shown: dict[str, str]):
        super().__init__(module.name, mount, seed)
        self.module = module
        self.params = shown
        """What each parameter reads, as far as this actor knows."""

    def param_path(self, param: str) -> str:
        return f"sys/module/{self.module.name}/parameters/{param}"

    def write_param(self, param: str) -> None:
        ptype = self.module.params[param]
        if self.rng.random() < 0.7:
            valid = BOOL_VALUES if ptype == "bool" else INT_VALUES
            data = self.rng.choice(list(valid))
            if self.write(self.param_path(param), data, {0}) == 0:
                value = valid[data]
                self.params[param] = shown_bool_param(bool(value)) if ptype == "bool" else shown_int(int(value))
        elif ptype == "bool":
            self.write(self.param_path(param), self.rng.choice(BOOL_INVALID), {errno.EINVAL})
        else:
            data = self.rng.choice(list(INT_INVALID))
            self.write(self.param_path(param), data, {INT_INVALID[data]})
        self.check_params()

    def check_params(self) -> None:
        for param, shown in self.params.items():
            self.expect_read(self.param_path(param), shown)


class TargetOwner(ParamWriter):
    """Owns the busy target's block_transition, and sets it to N at the end of
    each round so a transition it holds can finish."""

    def step(self) -> None:
        self.write_param("block_transition")

    def finish(self) -> None:
        if self.write(self.param_path("block_transition"), b"N\n", {0}) == 0:
            self.params["block_transition"] = "N\n"
        self.check_params()


class PatchOwner(ParamWriter):
    """The only writer of valid values to one patch's `enabled` and its parameters."""

    def __init__(self, mount: Path, seed: int, module: PatchModule, state: State, shown: dict[str, str]):
        super().__init__(mount, seed, module, shown)
        self.state = state

    def attr(self, name: str) -> str:
        return f"{LIVEPATCH}/{self.module.name}/{name}"

    def on_patch(self, errnos: Errnos) -> set[int]:
        """What an access to the patch's files may end in, given what the store itself may answer.
        A patch seen gone is gone for every file of it, but one open may still find a file
        whose cached entry the mount has not yet dropped: ENODEV, as kernfs_fop_open()
        answers an open that races the removal."""
        if self.state in (State.GONE, State.UNLOADED):
            return set(kerr.GONE)
        if self.state is State.DISABLED:
            return {*errnos, *kerr.GONE}
        return set(errnos)

    def step(self) -> None:
        actions: list[tuple[Callable[[], None], int]] = [
            (self.write_enabled, 5), (self.write_garbage, 1), (self.write_force, 1), (self.read_own, 2)]
        if self.state in (State.GONE, State.UNLOADED):
            actions.append((self.reload, 3))
        if self.module.params and self.state is not State.UNLOADED:
            actions.append((lambda: self.write_param(self.rng.choice(list(self.module.params))), 2))
        funcs, weights = zip(*actions)
        self.rng.choices(funcs, weights)[0]()

    def seen_gone(self, err: int) -> None:
        if err in kerr.GONE and self.state is State.DISABLED:
            self.state = State.GONE

    def write_enabled(self) -> None:
        data = self.rng.choice(list(BOOL_VALUES))
        value = BOOL_VALUES[data]
        if self.state is State.ENABLED:
            allowed = {errno.EINVAL} if value else {0, errno.EBUSY}
        else:
            allowed = {0, errno.EINVAL} if value else {errno.EINVAL}
        err = self.write(self.attr("enabled"), data, self.on_patch(allowed))
        self.seen_gone(err)
        if err:
            return
        self.state = State.ENABLED if value else State.DISABLED
        self.seen_gone(self.expect_read(self.attr("enabled"), shown_int(int(value)), self.on_patch({0})))

    def write_garbage(self) -> None:
        self.seen_gone(self.write(self.attr("enabled"), self.rng.choice(BOOL_INVALID),
                                  self.on_patch({errno.EINVAL})))

    def write_force(self) -> None:
        ones = self.state is State.ENABLED and self.rng.random() < FORCE_ODDS
        data = self.rng.choice([d for d in (*BOOL_VALUES, *BOOL_INVALID) if bool(BOOL_VALUES.get(d)) == ones])
        value = BOOL_VALUES.get(data)
        allowed = {errno.EINVAL} if value is None else {0, errno.EINVAL} if value else {0}
        self.seen_gone(self.write(self.attr("force"), data, self.on_patch(allowed)))

    def read_own(self) -> None:
        enabled = "1\n" if self.state is State.ENABLED else "0\n"
        self.seen_gone(self.expect_read(self.attr("enabled"), enabled, self.on_patch({0})))
        err, text = self.read(self.attr("transition"), self.on_patch({0}))
        self.seen_gone(err)
        if not err and text not in ("0\n", "1\n"):
            self.violation(f"transition reads {text!r}")
        if self.state is not State.UNLOADED:
            self.check_params()

    def reload(self) -> None:
        """rmmod the freed patch's module, then insmod it: a fresh patch, enabled,
        its parameters at their defaults."""
        if self.state is State.GONE:
            reply = self.control("rmmod", name=self.module.name)
            if reply["ok"]:
                self.state = State.UNLOADED
            elif not reply.get("in_use"):
                self.violation(f"rmmod: {reply}")
            return
        reply = self.control("insmod", params=[], **module_file(self.module.name))
        if reply["ok"]:
            self.state = State.ENABLED
            self.params = dict.fromkeys(self.module.params, shown_int(0))
        elif reply.get("errno") not in kerr.INSMOD:
            self.violation(f"insmod: {reply}")

    def check_final(self) -> None:
        """With every transition over: enabled as last written; a disabled patch freed."""
        if self.state is State.ENABLED:
            self.expect_read(self.attr("enabled"), "1\n")
        else:
            self.expect_read(self.attr("enabled"), "", {errno.ENOENT})
        if self.state is not State.UNLOADED:
            self.check_params()


class Chaos(Actor):
    """Reads every attribute of every patch, writes garbage everywhere and 0 to force."""

    def step(self) -> None:
        base = f"{LIVEPATCH}/{self.rng.choice(PATCHES).name}"
        kind = self.rng.randrange(6)
        if kind == 0:
            for name in ("enabled", "transition", "vmlinux/patched"):
                err, text = self.read(f"{base}/{name}", {0, *kerr.READ})
                if not err and text not in ("0\n", "1\n"):
                    self.violation(f"{base}/{name} reads {text!r}")
        elif kind == 1:
            self.write(f"{base}/enabled", self.rng.choice(BOOL_INVALID), kerr.ENABLED_WRITE - {errno.EBUSY})
        elif kind == 2:
            data = self.rng.choice([b"0\n", b"N", b"2"])
            self.write(f"{base}/force", data, kerr.FORCE_WRITE | ({0} if data != b"2" else set()))
        elif kind == 3:
            self.write(f"{base}/{self.rng.choice(['transition', 'vmlinux/patched'])}", b"1\n",
                       kerr.READ_ONLY_WRITE)
        elif kind == 4:
            self.write(f"{base}/signal", b"1\n", kerr.ABSENT)
        else:
            self.write_param_garbage()

    def write_param_garbage(self) -> None:
        module = self.rng.choice([m for m in (*PATCHES, TARGET) if m.params])
        param, ptype = self.rng.choice(list(module.params.items()))
        path = f"sys/module/{module.name}/parameters/{param}"
        if ptype == "bool":
            self.write(path, self.rng.choice(BOOL_INVALID), kerr.BOOL_PARAM_WRITE)
        else:
            data = self.rng.choice(list(INT_INVALID))
            self.write(path, data, {INT_INVALID[data], *kerr.GONE})


def module_file(name: str) -> dict[str, Any]:
    """An insmod request's file arguments for a shipped module."""
    path = find_module_file(name)
    assert path is not None, name
    return insmod_file_args(path)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Scenario:
    """The patches loaded on one mount, the actors' knowledge of them, and rounds
    of concurrent play with every invariant checked."""

    def __init__(self, mount: Path, seed: int, chaos: int = 2):
        self.mount = mount
        self.seed = seed
        self.chaos = chaos
        self.daemon = find_daemon(str(mount))
        self.rounds = 0
        self.owners: list[PatchOwner] = []
        self.target: TargetOwner | None = None

    def load(self) -> None:
        """The four cmdline patches one after another, the busy target with its
        kworker blocking, then the callbacks demo, whose transition it holds."""
        for module in PATCHES[:-1]:
            self.insmod(module.name)
            self.wait_settled()
        self.insmod(TARGET.name, "block_transition=Y")
        self.insmod(PATCHES[-1].name)
        self.owners = [PatchOwner(self.mount, self.seed, m, State.ENABLED, dict.fromkeys(m.params, "0\n"))
                       for m in PATCHES]
        self.target = TargetOwner(self.mount, self.seed, TARGET, {"block_transition": "Y\n"})

    def fill_log(self) -> None:
        """Bring the kernel log to its full size (LOG_BUF_RECORDS records, the oldest
        dropped from then on) with one module whose init logs that many lines, so the
        daemon's memory measured afterwards is not the ring filling up."""
        text = "[init]\nrun = [" + ", ".join(['{ log = "filling the ring" }'] * LOG_BUF_RECORDS) + "]\n"
        for cmd, args in (("insmod", {"path": "klp_fill.toml", "text": text, "params": []}),
                          ("rmmod", {"name": "klp_fill"})):
            reply = request(str(self.mount), cmd, **args)
            if not reply["ok"]:
                raise AssertionError(f"{cmd} klp_fill: {reply}")

    def insmod(self, name: str, *params: str) -> None:
        reply = request(str(self.mount), "insmod", params=list(params), **module_file(name))
        if not reply["ok"]:
            raise AssertionError(f"insmod {name}: {reply}")

    def transitions(self) -> list[str]:
        """The patches whose transition reads 1 (a vanished patch is in none)."""
        busy = []
        for patch in PATCHES:
            err, text = read_file(self.mount / LIVEPATCH / patch.name / "transition")
            if not err and text == "1\n":
                busy.append(patch.name)
        return busy

    def wait_settled(self, timeout: float = SETTLE) -> list[str]:
        """Wait until no transition runs and every disabled patch is freed; what still runs, if any."""
        deadline = time.monotonic() + timeout
        while (busy := self.transitions() + self.unfreed()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return busy

    def unfreed(self) -> list[str]:
        return [o.module.name for o in self.owners
                if o.state is State.DISABLED and (self.mount / LIVEPATCH / o.module.name).exists()]

    def play(self, steps: int) -> Figures:
        """One round: every actor in its own thread for `steps` operations, the log
        followed throughout; then the final state checked."""
        assert self.target is not None
        self.rounds += 1
        seed = f"{self.seed}.{self.rounds}"
        actors: list[Actor] = [*self.owners, self.target,
                               *(Chaos(f"chaos{i}", self.mount, self.seed) for i in range(self.chaos))]
        for actor in actors:
            actor.rng.seed(f"{seed}:{actor.name}")
            actor.figures = Figures()
        busy = self.transitions()
        request(str(self.mount), "clear")
        monitor = TransitionMonitor(self.daemon.socket, busy[0] if busy else None)
        monitor.start()
        figures = Figures()
        self.watch(actors, steps, figures)
        if not alive(self.daemon.pid):
            figures.crashes += 1
            return figures
        busy = self.wait_settled()
        if busy:
            figures.violations.append(f"still in transition or not freed {SETTLE}s after the round: {busy}")
        for owner in self.owners:
            owner.check_final()
        records = request(str(self.mount), "dmesg", since_clear=True)["records"]
        if records and not monitor.wait_for(records[-1]["seq"], HANG):
            figures.violations.append(f"the log follower never got record {records[-1]['seq']}")
        monitor.stop()
        figures.transitions = monitor.rule.transitions
        figures.violations += monitor.rule.violations
        for actor in actors:
            figures.add(actor.figures)
        return figures

    def watch(self, actors: list[Actor], steps: int, figures: Figures) -> None:
        """Run the actors; an operation outlasting HANG counts as a hang, and a
        round whose every unfinished actor hangs is abandoned."""
        threads = {actor: threading.Thread(target=actor.play, args=(steps,), name=actor.name, daemon=True)
                   for actor in actors}
        for thread in threads.values():
            thread.start()
        while running := [a for a, t in threads.items() if t.is_alive()]:
            now = time.monotonic()
            for actor in running:
                since = actor.busy_since
                if since is not None and now - since > HANG and not actor.hung:
                    actor.hung = True
                    figures.hangs += 1
                    figures.violations.append(f"{actor.name}: an operation hangs")
            if all(a.hung for a in running):
                return
            threads[running[0]].join(0.05)
