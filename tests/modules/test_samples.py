"""The kernel's samples/livepatch modules, as shipped (klpfs/data/modules/*.py),
doing what their C does on each profile: livepatch-sample's /proc/cmdline,
the callbacks demo held by busymod's sleeping kworker, and the shadow
variable demo (the leaking module, fix1 and fix2) over two minutes.

Engine level under MockClock, debug messages off (the kernel's default
level).  Expectations come from the C samples: the 6.1 ones (unchanged in
6.12) and, on 4.15/4.16, the forms the samples had then.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from klpfs.kernel.memory import Mem, hashed_pointer
from klpfs.modules.program import INITIAL_JIFFIES
from klpfs.sysfs.kernfs import Kernfs

from profiles.conftest import IN_WRITE, Machine, autojump_clock, make_machine, settle  # noqa: F401

ALL = ("4.15", "4.16", "5.1", "6.1", "6.11", "6.12", "6.14")
PATCHED = b"this has been live patched\n"
HZ = 250

SAMPLE = "livepatch_sample"
DEMO = "livepatch_callbacks_demo"
BUSY = "livepatch_callbacks_busymod"
LIVE = "[MODULE_STATE_LIVE] Normal state"
FIX1 = "livepatch_shadow_fix1"
FIX2 = "livepatch_shadow_fix2"


def lp(text: str) -> str:
    return f"livepatch: {text}"


def cmdline(m: Machine) -> bytes:
    """A read of /proc/cmdline (by the console shell)."""
    data = Kernfs.read(m.node("proc/cmdline"), 0, 4096)
    assert isinstance(data, bytes), data
    return data


async def until(m: Machine, t: float) -> None:
    """Let the emulated kernel run until t seconds after boot."""
    await trio.sleep_until(m.kernel.timers.boot_time + t)


# -- livepatch-sample ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ALL)
async def test_sample_patches_proc_cmdline(nursery: trio.Nursery, version: str,
                                           autojump_clock: trio.testing.MockClock) -> None:
    """/proc/cmdline reads "this has been live patched" while the patch is
    enabled, the boot command line again once it is disabled; the module
    goes with rmmod.  Before 5.1 the disabled patch stays registered until
    the module's exit unregisters it; from 5.1 disabling frees it."""
    m = make_machine(nursery, version)
    original = cmdline(m)
    assert original.startswith(b"BOOT_IMAGE=") and original != PATCHED
    assert (await m.insmod("livepatch-sample"))["ok"]
    started = [f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH", lp(f"enabling patch '{SAMPLE}'"),
               lp(f"'{SAMPLE}': starting patching transition")]
    complete = [lp(f"'{SAMPLE}': patching complete")]
    in_write = version in IN_WRITE                     # the idle CPUs switched as it started
    assert m.take() == (started + complete if in_write else started)
    assert cmdline(m) == PATCHED                       # the reader has switched already
    await settle()
    assert m.take() == ([] if in_write else complete)
    assert cmdline(m) == PATCHED
    assert (await m.rmmod_ctl(SAMPLE))["in_use"] is True  # the enabled patch holds the module
    assert m.write(f"{SAMPLE}/enabled", b"0") == 1
    await settle()
    assert m.take() == [lp(f"'{SAMPLE}': starting unpatching transition"), lp(f"'{SAMPLE}': unpatching complete")]
    assert cmdline(m) == original
    assert m.exists(SAMPLE) is (version in ("4.15", "4.16"))
    assert m.refcnt(SAMPLE) == 0
    assert (await m.rmmod_ctl(SAMPLE)) == {"ok": True, "name": SAMPLE}
    assert m.take() == []
    assert not m.exists(SAMPLE) and m.module(SAMPLE) is None


async def test_sample_without_reliable_stacks_on_4_15(nursery: trio.Nursery,
                                                      autojump_clock: trio.testing.MockClock) -> None:
    """4.15's sample: no reliable stack traces, so it sets patch.immediate
    with its notice; every task switches at once, and the module can never
    be removed (an immediate patch keeps its module reference)."""
    m = make_machine(nursery, "4.15", reliable_stacks=False)
    original = cmdline(m)
    assert (await m.insmod("livepatch-sample"))["ok"]
    assert m.take() == [
        f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH",
        f"{SAMPLE}: The consistency model isn't supported for your architecture.  "
        "Bypassing safety mechanisms and applying the patch immediately.",
        lp(f"enabling patch '{SAMPLE}'"), lp(f"'{SAMPLE}': starting patching transition"),
        lp(f"'{SAMPLE}': patching complete")]
    assert m.patch(SAMPLE).immediate is True
    assert cmdline(m) == PATCHED
    assert m.write(f"{SAMPLE}/enabled", b"0") == 1
    assert m.take() == [lp(f"'{SAMPLE}': starting unpatching transition"), lp(f"'{SAMPLE}': unpatching complete")]
    assert cmdline(m) == original
    await settle()
    assert m.refcnt(SAMPLE) == 1
    assert (await m.rmmod_ctl(SAMPLE))["errno"] == errno.EWOULDBLOCK


@pytest.mark.parametrize("version, err", [("4.16", errno.ENOSYS), ("5.1", errno.EOPNOTSUPP)])
async def test_sample_refused_without_reliable_stacks(nursery: trio.Nursery, version: str, err: int,
                                                      autojump_clock: trio.testing.MockClock) -> None:
    """From 4.16 (no more immediate) to 6.0 a kernel without reliable stack
    traces refuses the patch; the load fails with that errno and leaves nothing."""
    m = make_machine(nursery, version, reliable_stacks=False)
    reply = await m.insmod("livepatch-sample")
    assert (reply["ok"], reply["errno"]) == (False, err)
    assert m.take() == [f"{SAMPLE}: tainting kernel with TAINT_LIVEPATCH",
                        lp("This architecture doesn't have support for the livepatch consistency model.")]
    assert m.module(SAMPLE) is None and m.ls() == []


# -- livepatch-callbacks-demo, -busymod -------------------------------------------------------------

def cb(name: str, obj: str | None = None) -> str:
    return f"{DEMO}: {name}_callback: " + ("vmlinux" if obj is None else f"{obj} -> {LIVE}")


@pytest.mark.parametrize("version", ["4.15", "6.1"])
async def test_busymod_holds_the_callbacks_demo(nursery: trio.Nursery, version: str,
                                                autojump_clock: trio.testing.MockClock) -> None:
    """busymod's delayed work sleeps sleep_secs=10 inside busymod_work_func,
    which the demo replaces: the patching transition waits for the kworker
    to leave it, then post_patch runs and the function is redirected to
    patched_work_func.  Disabling runs the unpatch callbacks; the modules go."""
    m = make_machine(nursery, version)
    assert (await m.insmod("livepatch-callbacks-busymod", "sleep_secs=10"))["ok"]
    await until(m, 0.5)
    assert m.take() == [f"{BUSY}: livepatch_callbacks_mod_init",
                        f"{BUSY}: busymod_work_func, sleeping 10 seconds ..."]
    assert (await m.insmod("livepatch-callbacks-demo"))["ok"]
    assert m.take() == [f"{DEMO}: tainting kernel with TAINT_LIVEPATCH", lp(f"enabling patch '{DEMO}'"),
                        cb("pre_patch"), cb("pre_patch", BUSY), lp(f"'{DEMO}': starting patching transition")]
    kworker = next(t for t in m.sched.tasks.values() if "busymod_work_func" in [s.name for s in m.sched.stack(t)])
    await until(m, 9.5)
    assert m.take() == [] and m.state(DEMO) == (1, 1) and kworker.patch_state == 0
    # msleep(10000) sleeps 2501 jiffies; the next retry (11 s) completes the transition.
    await until(m, 10.5)
    assert m.take() == [f"{BUSY}: busymod_work_func exit"]
    await until(m, 11.5)
    assert m.take() == [cb("post_patch"), cb("post_patch", BUSY), lp(f"'{DEMO}': patching complete")]
    busy_fn = m.sym("busymod_work_func", BUSY)
    assert m.kernel.resolve(busy_fn, kworker).name == "patched_work_func"
    assert m.write(f"{DEMO}/enabled", b"0") == 1
    await settle()
    assert m.take() == [cb("pre_unpatch"), cb("pre_unpatch", BUSY), lp(f"'{DEMO}': starting unpatching transition"),
                        cb("post_unpatch"), cb("post_unpatch", BUSY), lp(f"'{DEMO}': unpatching complete")]
    assert m.kernel.resolve(busy_fn, kworker) is busy_fn
    assert (await m.rmmod_ctl(DEMO))["ok"]
    assert (await m.rmmod_ctl(BUSY))["ok"]
    assert m.take() == [f"{BUSY}: livepatch_callbacks_mod_exit"]


# -- livepatch-shadow-mod, -fix1, -fix2 -------------------------------------------------------------

SIZEOF_DUMMY = 24
SIZEOF_INT = 4


def jiffies(t: float) -> int:
    return INITIAL_JIFFIES + int(t * HZ)


@dataclass
class Dummy:
    d: str
    """%p of the dummy."""
    leak: str
    """%p of the int it leaks."""
    expires: int
    shadow_leak: bool = False
    """It has an SV_LEAK shadow variable (allocated by fix1's dummy_alloc)."""
    counter: int | None = None
    """Its SV_COUNTER shadow variable (fix2's dummy_check)."""


@dataclass
class ShadowDemo:
    """What livepatch-shadow-mod, -fix1 and -fix2 print, computed from their C.

    The module allocates a dummy every second (and leaks an int with it),
    and every three seconds frees the dummies that expired (twelve seconds
    after their allocation, time_after: strictly later), walking its list
    from the newest.  Works due at the same jiffy run in the order their
    timers were armed, so a cleanup runs before the allocation due with it.
    """

    ctor_dtor: bool
    """4.17 on: fix1 frees the leak in the shadow variable's destructor."""
    allocs: list[tuple[float, int, Mem]]
    """Every kzalloc: (time, size, block), to know each dummy's and leak's address."""
    dummies: list[Dummy] = field(default_factory=list)
    """The module's dummy_list, newest first."""
    orphans: list[Dummy] = field(default_factory=list)
    """Freed dummies whose shadow variables stayed: a dummy_free that does not
    know SV_LEAK (the module's) or SV_COUNTER (the module's, fix1's) leaves them."""
    alloc_fn: str = "orig"
    free_fn: str = "orig"
    check_fn: str = "orig"

    def ptr(self, t: float, size: int, after: Mem | None = None) -> Mem:
        """The first block of `size` allocated at t (after `after`)."""
        blocks = [mem for when, sz, mem in self.allocs if when == t]
        if after is not None:
            blocks = blocks[blocks.index(after) + 1:]
        return next(mem for mem in blocks if mem.size == size)

    def alloc(self, t: float) -> list[str]:
        d = self.ptr(t, SIZEOF_DUMMY)
        leak = self.ptr(t, SIZEOF_INT, after=d)
        dummy = Dummy(hashed_pointer(d.addr), hashed_pointer(leak.addr), jiffies(t) + 12 * HZ)
        self.dummies.insert(0, dummy)
        if self.alloc_fn == "orig":
            return [f"dummy_alloc: dummy @ {dummy.d}, expires @ {dummy.expires:x}"]
        dummy.shadow_leak = True
        return [f"{FIX1}: livepatch_fix1_dummy_alloc: dummy @ {dummy.d}, expires @ {dummy.expires:x}"]

    def cleanup(self, t: float) -> list[str]:
        j = jiffies(t)
        lines = [f"cleanup_work_func: jiffies = {j:x}"]
        for dummy in list(self.dummies):
            if self.check_fn == "fix2":
                dummy.counter = (dummy.counter or 0) + 1
            if j > dummy.expires:
                self.dummies.remove(dummy)
                lines += self.free(dummy)
        return lines

    def free(self, dummy: Dummy) -> list[str]:
        lines = self._free(dummy)
        if dummy.shadow_leak or dummy.counter is not None:
            self.orphans.append(dummy)
        return lines

    def _free(self, dummy: Dummy) -> list[str]:
        if self.free_fn == "orig":
            return [f"dummy_free: dummy @ {dummy.d}, expired = {dummy.expires:x}"]
        fix = FIX1 if self.free_fn == "fix1" else FIX2
        prefix = f"{fix}: livepatch_{self.free_fn}_dummy"
        if not dummy.shadow_leak:
            lines = [f"{prefix}_free: dummy @ {dummy.d} leaked!"]
        elif self.ctor_dtor:
            lines = [f"{prefix}_leak_dtor: dummy @ {dummy.d}, prevented leak @ {dummy.leak}"]
        else:
            lines = [f"{prefix}_free: dummy @ {dummy.d}, prevented leak @ {dummy.leak}"]
        dummy.shadow_leak = False
        if self.free_fn == "fix2" and dummy.counter is not None:
            lines.append(f"{prefix}_free: dummy @ {dummy.d}, check counter = {dummy.counter}")
            dummy.counter = None
        return lines

    def run(self, load: float, start: float, end: float) -> list[str]:
        """The lines of the works due in [start, end) for a module loaded at `load`."""
        lines: list[str] = []
        for k in range(1, int(end - load) + 1):
            t = load + k
            if start <= t < end:
                if k % 3 == 0:
                    lines += self.cleanup(t)
                lines += self.alloc(t)
        return lines


@pytest.mark.parametrize("version", ["4.15", "5.1", "6.1"])
async def test_shadow_demo_over_two_minutes(nursery: trio.Nursery, version: str,
                                            autojump_clock: trio.testing.MockClock) -> None:
    """The leaking module, then fix1 (new dummies get an SV_LEAK variable
    holding the leak; dummies from before it are reported leaked), then fix2
    on top (dummy_check counts in an SV_COUNTER variable, reported when the
    dummy goes).  Then both fixes are disabled and everything is removed:
    fix1's exit frees the SV_LEAK variables left, fix2's the counters, the
    module's exit the dummies left.  4.15's fixes use the shadow API of then
    (no constructor or destructor: dummy_free frees the leak itself)."""
    m = make_machine(nursery, version)
    allocs: list[tuple[float, int, Mem]] = []
    kzalloc = m.kernel.heap.kzalloc

    def recording_kzalloc(size: int) -> Mem:
        mem = kzalloc(size)
        allocs.append((m.kernel.now(), size, mem))
        return mem
    m.kernel.heap.kzalloc = recording_kzalloc  # type: ignore[method-assign]
    demo = ShadowDemo(ctor_dtor=version != "4.15", allocs=allocs)

    async def run_until(t: float, last: float) -> None:
        await until(m, t)
        assert m.take() == demo.run(load, last, t)

    async def switched(t: float, patch: str, direction: str) -> None:
        """The works until t, then the transition's retry on the next whole
        second completes it (kworkers sleep between works, so they switched
        at the start already)."""
        await run_until(t, t - 1.0)
        await until(m, t + 0.5)
        assert m.take() == [lp(f"'{patch}': {direction} complete")]

    load = 0.5
    await until(m, load)
    assert (await m.insmod("livepatch-shadow-mod"))["ok"]
    assert m.take() == []
    await run_until(4.75, load)
    assert [ln.split(":")[0] for ln in m.lines()] == ["dummy_alloc", "dummy_alloc", "cleanup_work_func",
                                                       "dummy_alloc", "dummy_alloc"]

    assert (await m.insmod("livepatch-shadow-fix1"))["ok"]
    assert m.take() == [f"{FIX1}: tainting kernel with TAINT_LIVEPATCH", lp(f"enabling patch '{FIX1}'"),
                        lp(f"'{FIX1}': starting patching transition")]
    demo.alloc_fn = demo.free_fn = "fix1"
    await switched(5.75, FIX1, "patching")
    await run_until(20.75, 6.25)

    assert (await m.insmod("livepatch-shadow-fix2"))["ok"]
    assert m.take() == [lp(f"enabling patch '{FIX2}'"), lp(f"'{FIX2}': starting patching transition")]
    demo.free_fn = demo.check_fn = "fix2"
    await switched(21.75, FIX2, "patching")
    await run_until(120.75, 22.25)

    # What the two minutes showed, beyond the exact lines: leaks reported
    # for the four dummies from before fix1, prevented for the later ones
    # gone by now (allocated at 5.5 s to 107.5 s), counts of 1 to 5 checks.
    lines = m.lines()
    assert sum(ln.endswith(" leaked!") for ln in lines) == 4
    assert sum("prevented leak @ " in ln for ln in lines) == 103
    assert {int(ln.rsplit(" ", 1)[1]) for ln in lines if "check counter" in ln} == {1, 2, 3, 4, 5}

    # Disabling in the reverse order (the only one 4.x allows).
    assert m.write(f"{FIX2}/enabled", b"0") == 1
    assert m.take() == [lp(f"'{FIX2}': starting unpatching transition")]
    demo.free_fn, demo.check_fn = "fix1", "orig"
    await switched(121.75, FIX2, "unpatching")
    await run_until(122.75, 122.25)
    assert m.write(f"{FIX1}/enabled", b"0") == 1
    assert m.take() == [lp(f"'{FIX1}': starting unpatching transition")]
    demo.alloc_fn = demo.free_fn = "orig"
    await switched(123.75, FIX1, "unpatching")
    await run_until(130.25, 124.25)
    shadow = m.lp.shadow
    counters = sum(1 for dummy in demo.dummies + demo.orphans if dummy.counter is not None)
    leaks = sum(1 for dummy in demo.dummies + demo.orphans if dummy.shadow_leak)
    # No cleanup ran while only fix1 was left; the module's own dummy_free
    # freed the dummies from 108.5 s to 116.5 s with both their variables.
    # Of the 13 left (117.5 s on), fix2 checked 3 and fix1 allocated 6.
    assert (len(demo.orphans), counters, leaks) == (9, 9 + 3, 9 + 6)
    assert len(shadow) == counters + leaks
    assert (await m.rmmod_ctl(FIX2))["ok"]
    assert m.take() == [] and len(shadow) == leaks       # klp_shadow_free_all(SV_COUNTER, NULL)
    assert (await m.rmmod_ctl(FIX1))["ok"]
    if demo.ctor_dtor:
        # klp_shadow_free_all(SV_LEAK, dtor): the destructor for each, in the
        # shadow hash table's order (which the kernel does not define).
        assert sorted(m.take()) == sorted(
            f"{FIX1}: livepatch_fix1_dummy_leak_dtor: dummy @ {dummy.d}, prevented leak @ {dummy.leak}"
            for dummy in demo.dummies + demo.orphans if dummy.shadow_leak)
    else:
        assert m.take() == []                            # 4.15: freed without a word
    assert len(shadow) == 0
    assert (await m.rmmod_ctl("livepatch_shadow_mod"))["ok"]
    assert m.take() == [f"dummy_free: dummy @ {dummy.d}, expired = {dummy.expires:x}" for dummy in demo.dummies]
    await settle(5)
    assert m.take() == []                                # the works were cancelled


async def test_shadow_api_forms_follow_the_profile(nursery: trio.Nursery,
                                                   autojump_clock: trio.testing.MockClock) -> None:
    """A module is built against its kernel's headers: the shadow API in its
    pre-4.17 form (no constructor, no destructor) does not match a 6.1
    kernel's, as the 4.17 form does not match 4.15's."""
    old_form = ("from klpfs.kapi import *\n\n\ndef old_init():\n"
                "    klp_shadow_alloc(THIS_MODULE, 1, 0, 8, GFP_KERNEL)\n    return 0\n\n\nmodule_init(old_init)\n")
    m = make_machine(nursery, "6.1")
    reply = await m.insmod_text("old_form.py", old_form)
    assert reply == {"ok": False, "errno": errno.EINVAL, "error": "Invalid argument"}
    assert m.take() == ["old_form: disagrees about version of symbol klp_shadow_alloc"]
    old = make_machine(nursery, "4.15")
    assert (await old.insmod_text("old_form.py", old_form))["ok"]
    new_form = old_form.replace("0, 8, GFP_KERNEL)", "8, GFP_KERNEL, NULL, NULL)")
    reply = await old.insmod_text("new_form.py", new_form)
    assert reply["errno"] == errno.EINVAL
    assert old.take()[-1] == "new_form: disagrees about version of symbol klp_shadow_alloc"


async def test_warn_on(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """WARN_ON(cond) (what the 4.x samples wrap klp_unregister_patch() in)
    prints the kernel's warning report when cond is true and returns it."""
    text = ("from klpfs.kapi import *\n\n\ndef warn_init():\n    WARN_ON(0)\n"
            "    return -EINVAL if WARN_ON(-EBUSY) else 0\n\n\nmodule_init(warn_init)\n")
    m = make_machine(nursery, "6.1")
    reply = await m.insmod_text("warn.py", text)
    assert reply["errno"] == errno.EINVAL
    lines = m.take()
    assert lines[0] == "------------[ cut here ]------------"
    assert re.fullmatch(r"WARNING: CPU: 0 PID: \d+ at /tmp/warn\.py:6 warn_init\+0x20/0x40 \[warn\]", lines[1])
    assert lines[2:] == ["---[ end trace 0000000000000000 ]---"]
