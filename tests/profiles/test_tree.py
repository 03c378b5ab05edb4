"""The /sys/kernel/livepatch tree and its modes per profile (notes §3.1,
obs #1-#5), open-mode errors, reads, nop and dynamic-object directories."""

from __future__ import annotations

import pytest

from klpfs.sysfs.kernfs import Kernfs

from .conftest import EACCES, has_patched, has_replace_attr, has_stack_order, settle, spec

P = spec("lp_p", {None: ["cmdline_proc_show", "version_proc_show"], "tmod": ["tmod_fn"]})


def expected_patch_attrs(version: str) -> dict[str, int]:
    attrs = {"enabled": 0o644, "transition": 0o444, "force": 0o200}
    if has_replace_attr(version):
        attrs["replace"] = 0o444
    if has_stack_order(version):
        attrs["stack_order"] = 0o444
    return attrs


async def test_root_always_exists_and_is_empty(m, autojump_clock):
    """obs #1: /sys/kernel/livepatch exists (0755), empty with no patch; only
    patch directories ever appear there."""
    assert m.mode("") == 0o755
    assert m.lp_node("").is_dir
    assert m.ls() == []
    assert m.load(P) == 0
    assert m.ls() == ["lp_p"]


async def test_patch_tree_and_modes(m, version, autojump_clock):
    """notes §3.1 / obs #2 / #3: the exact tree of a patch per profile: force
    0200 present and no signal (5.1+), <object>/patched 0444 (6.1+), replace
    0444 (6.11+), stack_order 0444 (6.14+); func dirs "<func>,<sympos>" with
    sympos 0 shown as 1 and nothing inside; object dirs for vmlinux and for a
    module that is not loaded."""
    assert m.load(P) == 0
    attrs = expected_patch_attrs(version)
    obj_files = ["patched"] if has_patched(version) else []
    expected = sorted(
        list(attrs)
        + ["vmlinux/", "vmlinux/cmdline_proc_show,1/", "vmlinux/version_proc_show,1/",
           "tmod/", "tmod/tmod_fn,1/"]
        + [f"vmlinux/{f}" for f in obj_files] + [f"tmod/{f}" for f in obj_files])
    assert m.tree("lp_p") == expected, f"ENGINE BUG (notes §3.1): tree of {version}"
    assert m.mode("lp_p") == 0o755
    for name, mode in attrs.items():
        assert m.mode(f"lp_p/{name}") == mode, f"ENGINE BUG (notes §3.1): {name} mode"
    for d in ("vmlinux", "tmod", "vmlinux/cmdline_proc_show,1", "tmod/tmod_fn,1"):
        assert m.mode(f"lp_p/{d}") == 0o755
    if has_patched(version):
        assert m.mode("lp_p/vmlinux/patched") == 0o444
        assert m.mode("lp_p/tmod/patched") == 0o444
    assert not m.exists("lp_p/signal"), "ENGINE BUG (notes §1, 5.1): signal attribute gone in 5.1"
    assert not m.exists("lp_p/immediate")


async def test_sympos_directory_name(m, autojump_clock):
    """obs #3 / spec §2.1: an explicit sympos shows as given; 0 shows as 1."""
    assert m.load(spec("lp_s", {None: [("type_show", 2), ("name_show", 1), "cmdline_proc_show"]})) == 0
    assert sorted(c for c in m.ls("lp_s/vmlinux") if c != "patched") == [
        "cmdline_proc_show,1", "name_show,1", "type_show,2"]


async def test_open_mode_errors(m, version, autojump_clock):
    """obs #4 / #5 / spec §2.2: force cannot be opened for reading (EACCES, even
    root); transition, patched, replace, stack_order cannot be opened for
    writing; enabled both ways."""
    assert m.load(P) == 0
    force = m.lp_node("lp_p/force")
    assert Kernfs.open_check(force, True, False) == -EACCES
    assert Kernfs.open_check(force, False, True) == 0
    ro = ["transition"]
    if has_patched(version):
        ro.append("vmlinux/patched")
    if has_replace_attr(version):
        ro.append("replace")
    if has_stack_order(version):
        ro.append("stack_order")
    for name in ro:
        node = m.lp_node(f"lp_p/{name}")
        assert Kernfs.open_check(node, False, True) == -EACCES, name
        assert Kernfs.open_check(node, True, False) == 0, name
    enabled = m.lp_node("lp_p/enabled")
    assert Kernfs.open_check(enabled, True, True) == 0


async def test_reads_are_two_bytes(m, version, autojump_clock):
    """obs #4: enabled, transition, patched (and replace, stack_order) read
    "1\\n"/"0\\n"; a read at offset 2 is EOF."""
    assert m.load(P) == 0
    files = ["enabled", "transition"]
    if has_patched(version):
        files.append("vmlinux/patched")
    if has_replace_attr(version):
        files.append("replace")
    if has_stack_order(version):
        files.append("stack_order")
    for f in files:
        data = m.read(f"lp_p/{f}")
        assert data in (b"0\n", b"1\n"), (f, data)
        assert Kernfs.read(m.lp_node(f"lp_p/{f}"), 2, 4096) == b""


@pytest.mark.parametrize("version", ["5.1"])
async def test_no_patched_on_5_1(m, autojump_clock):
    """notes §1: <object>/patched arrived in 6.1; 5.1's object dirs hold only
    function directories."""
    assert m.load(P) == 0
    assert m.ls("lp_p/vmlinux") == ["cmdline_proc_show,1", "version_proc_show,1"]
    assert m.ls("lp_p/tmod") == ["tmod_fn,1"]


async def test_nop_and_dynamic_object_dirs(m, version, autojump_clock):
    """notes §6.1 / obs #19: a replace patch's tree has nop function dirs after
    its own functions and whole dynamic objects for objects only older
    patches name (even of a module that is not loaded); all with the profile's
    attributes."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show", "version_proc_show"], "tmod": ["tmod_fn"]})) == 0
    await settle()
    blocker = m.sleeper("cmdline_proc_show", comm="holder")   # holds the replace transition
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    obj_files = ["patched"] if has_patched(version) else []
    expected = sorted(
        list(expected_patch_attrs(version))
        + ["vmlinux/", "vmlinux/cmdline_proc_show,1/", "vmlinux/version_proc_show,1/",
           "tmod/", "tmod/tmod_fn,1/"]
        + [f"vmlinux/{f}" for f in obj_files] + [f"tmod/{f}" for f in obj_files])
    assert m.tree("lp_r") == expected, "ENGINE BUG (notes §6.1): nop dirs of a replace patch"
    assert m.ls() == ["lp_a", "lp_r"]
    m.sched.wake(blocker)
    await settle()
    assert m.ls() == ["lp_r"]
    assert m.tree("lp_r") == sorted(list(expected_patch_attrs(version)) + [
        "vmlinux/", "vmlinux/cmdline_proc_show,1/"] + [f"vmlinux/{f}" for f in obj_files])


async def test_nop_sympos_quirk_collides(m, autojump_clock):
    """notes §6.1 quirk: an old func with sympos 0 and a new one with sympos 1
    (same name) do not match, so the nop dir "name,1" clashes with the real
    one: -EEXIST, the load fails and nothing is left."""
    assert m.load(spec("lp_a", {None: ["cmdline_proc_show"]})) == 0
    await settle()
    m.take()
    ret = m.load(spec("lp_r", {None: [("cmdline_proc_show", 1)]}, replace=True))
    assert ret == -17, f"ENGINE BUG (notes §6.1 quirk): expected -EEXIST, got {ret}"
    assert m.ls() == ["lp_a"]
    assert m.module("lp_r") is None
    lines = m.take()
    assert "sysfs: cannot create duplicate filename '/kernel/livepatch/lp_r/vmlinux/cmdline_proc_show,1'" in lines


async def test_attribute_values_through_a_lifecycle(m, version, autojump_clock):
    """Every attribute's value at each stage of a patch's life (obs #5, #8,
    #12; notes §3.2, §5.1, §8.2): patching, enabled, unpatching, gone."""
    def values(name: str) -> dict[str, bytes]:
        out = {}
        for f in ("enabled", "transition", "vmlinux/patched", "replace", "stack_order"):
            if m.exists(f"{name}/{f}"):
                out[f] = m.read(f"{name}/{f}")
        return out

    def expect(enabled: int, transition: int, patched: int | None, order: int) -> dict[str, bytes]:
        out = {"enabled": f"{enabled}\n".encode(), "transition": f"{transition}\n".encode()}
        if has_patched(version) and patched is not None:
            out["vmlinux/patched"] = f"{patched}\n".encode()
        if has_replace_attr(version):
            out["replace"] = b"0\n"
        if has_stack_order(version):
            out["stack_order"] = f"{order}\n".encode()
        return out

    assert m.load(spec("lp_z", {None: ["meminfo_proc_show"]})) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(P) == 0
    assert values("lp_p") == expect(1, 1, 1, 2)                 # patching
    m.sched.wake(holder)
    await settle()
    assert values("lp_p") == expect(1, 0, 1, 2)                 # enabled
    holder = m.sleeper("cmdline_proc_show", comm="holder2")
    assert m.write("lp_p/enabled", b"0") == 1
    assert values("lp_p") == expect(0, 1, 1, 2)                 # unpatching
    assert m.write("lp_z/enabled", b"0") == -16
    m.sched.wake(holder)
    await settle()
    assert not m.exists("lp_p")                                 # freed
    assert values("lp_z") == expect(1, 0, 1, 1)                 # renumbered (6.14)


async def test_nop_dir_keeps_old_sympos(m, autojump_clock):
    """notes §6.1: a nop dir is named exactly like the old patch's func dir,
    sympos included."""
    assert m.load(spec("lp_a", {None: [("type_show", 2), "cmdline_proc_show"]})) == 0
    await settle()
    m.sleeper("cmdline_proc_show", comm="holder")   # the nops exist while the transition runs
    assert m.load(spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)) == 0
    assert sorted(c for c in m.ls("lp_r/vmlinux") if c != "patched") == ["cmdline_proc_show,1", "type_show,2"]
