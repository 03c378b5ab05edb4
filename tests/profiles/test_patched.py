"""<object>/patched (6.1+): its life cycle (notes §8.2, obs #12, #17; selftest
test-sysfs "object/patched")."""

from __future__ import annotations

import pytest

from .conftest import SIX, logging_callbacks, settle, spec, target_module


class PatchedAtRemoval:
    """Remembers what each `patched` file showed when it was removed."""

    def __init__(self, m):
        self.m = m
        self.values: dict[str, str] = {}
        m.kernfs.listeners.append(self)

    def node_added(self, node) -> None:
        pass

    def node_removed(self, node) -> None:
        if node.name == "patched" and node.show is not None:
            self.values[node.path.split("/livepatch/", 1)[1]] = node.show()

    def close(self) -> None:
        self.m.kernfs.listeners.remove(self)


pytestmark = pytest.mark.parametrize("version", SIX)

P = spec("lp_p", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]})


async def test_vmlinux_patched_from_insmod(m, autojump_clock):
    """obs #12 / notes §8.2: vmlinux's patched is 1 as soon as insmod returns,
    while the patching transition still runs, and stays 1."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    assert m.state("lp_p") == (1, 1)
    assert m.patched("lp_p", "vmlinux") == 1
    assert m.patched("lp_p", "tmod") == 0
    m.sched.wake(holder)
    await settle()
    assert m.state("lp_p") == (1, 0) and m.patched("lp_p", "vmlinux") == 1


async def test_module_object_follows_the_module(m, autojump_clock):
    """obs #17 / notes §8.2: a patch for a module loaded before its target:
    patched=0, enabled=1, transition completes; the target loading -> 1;
    unloading -> 0 with the patch still enabled; reloading -> 1."""
    assert m.load(P) == 0
    await settle()
    assert m.state("lp_p") == (1, 0)
    assert m.patched("lp_p", "tmod") == 0
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.patched("lp_p", "tmod") == 1
    assert m.rmmod("tmod") == 0
    assert m.patched("lp_p", "tmod") == 0
    assert m.state("lp_p") == (1, 0)
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.patched("lp_p", "tmod") == 1


async def test_module_loaded_during_transitions(m, autojump_clock):
    """notes §8.2: a module loading during a transition of either direction is
    patched synchronously: patched=1."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.patched("lp_p", "tmod") == 1
    assert m.rmmod("tmod") == 0
    assert m.patched("lp_p", "tmod") == 0
    m.sched.wake(holder)
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder2")      # in lp_p's code
    assert m.write("lp_p/enabled", b"0") == 1
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.patched("lp_p", "tmod") == 1
    m.sched.wake(holder)


async def test_disable_keeps_1_until_freed(m, autojump_clock):
    """notes §8.2: disabling: 1 during the whole unpatching transition; the
    objects are unpatched at completion, just before their dirs go."""
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.load(P) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.write("lp_p/enabled", b"0") == 1
    await settle()
    assert m.state("lp_p") == (0, 1)
    assert m.patched("lp_p", "vmlinux") == 1 and m.patched("lp_p", "tmod") == 1
    seen = PatchedAtRemoval(m)
    m.sched.wake(holder)
    await settle()
    seen.close()
    assert not m.exists("lp_p")
    assert seen.values == {"lp_p/vmlinux/patched": "0\n", "lp_p/tmod/patched": "0\n"}


async def test_reversal_keeps_1_until_completion(m, autojump_clock):
    """notes §8.2: reversal patching -> unpatching: 1 until completion, then freed."""
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    another = m.kthread("k2")
    m.sched.enter(another, m.sym("cmdline_proc_show"), "D")       # switched: in lp_p's code
    assert another.activity.impl.name == "lp_p__cmdline_proc_show"
    assert m.write("lp_p/enabled", b"0") == 1
    await settle()
    assert m.state("lp_p") == (0, 1) and m.patched("lp_p") == 1
    m.sched.wake(another)
    await settle()
    assert not m.exists("lp_p")
    m.sched.wake(holder)


async def test_replace_completion(m, autojump_clock):
    """notes §8.2: at replace completion the replaced patches' objects go to 0
    just before their dirs are removed; the new patch's static objects stay
    1; dynamic (nop-only) objects: 1 if loaded, then freed."""
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"],
                                "absent": ["absent_fn"]})) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    assert m.patched("lp_r", "vmlinux") == 1
    assert m.patched("lp_r", "tmod") == 1
    assert m.patched("lp_r", "absent") == 0
    seen = PatchedAtRemoval(m)
    m.sched.wake(holder)
    await settle()
    seen.close()
    assert {k: v for k, v in seen.values.items() if k.startswith("lp_a/")} == {
        "lp_a/vmlinux/patched": "0\n", "lp_a/tmod/patched": "0\n", "lp_a/absent/patched": "0\n"}
    # klp_discard_nops -> __klp_unpatch_object(obj, nops_only=true) clears
    # obj->patched of a dynamic object before klp_free_objects_dynamic removes it.
    dynamic = {k: v for k, v in seen.values.items() if k.startswith("lp_r/")}
    assert dynamic == {"lp_r/tmod/patched": "0\n", "lp_r/absent/patched": "0\n"}, (
        f"ENGINE BUG (notes §8.2, invisible from user space): a discarded dynamic object "
        f"keeps patched=1 until its directory is removed: {dynamic}")
    assert m.patched("lp_r", "vmlinux") == 1


async def test_enable_failure_unpatches_before_removal(m, autojump_clock):
    """notes §8.2: on an enable failure the objects already patched are
    unpatched by the cancel before the tree is removed."""
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    cbs = {"tmod": {"pre_patch": lambda mod, obj: -19}}
    seen = PatchedAtRemoval(m)
    assert m.load(spec("lp_f", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == -19
    seen.close()
    assert seen.values == {"lp_f/vmlinux/patched": "0\n", "lp_f/tmod/patched": "0\n"}
    assert m.ls() == []


async def test_module_coming_failure_leaves_0(m, autojump_clock):
    """obs #17 / notes §8.1: a pre_patch failure for a loading target refuses
    it (ENODEV, the message); patched stays 0, the patch enabled."""
    cbs = {"tmod": logging_callbacks(m.printk, "lp_p", pre_patch_ret=-19)}
    assert m.load(spec("lp_p", {None: ["cmdline_proc_show"], "tmod": ["tmod_fn"]}, callbacks=cbs)) == 0
    await settle()
    m.take()
    assert m.load(target_module("tmod", ["tmod_fn"])) == -19
    lines = m.take()
    assert "livepatch: patch 'lp_p' failed for module 'tmod', refusing to load module 'tmod'" in lines
    assert m.patched("lp_p", "tmod") == 0
    assert m.state("lp_p") == (1, 0)
    assert m.module("tmod") is None
