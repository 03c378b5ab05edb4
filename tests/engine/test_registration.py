"""§3 registration (checks in order, messages, errno), §2.1 the sysfs tree it
creates, §4.4 unregistration."""

from __future__ import annotations

import errno
import stat

import pytest

from klpfs.kernel.kallsyms import FuncDef, const_body
from klpfs.kernel.module import Module
from klpfs.livepatch.structs import KlpFunc, KlpObject, KlpPatch

from .conftest import LP, settle, spec, target_module

DUP_LINES = [
    "sysfs: cannot create duplicate filename '/kernel/livepatch/{path}'",
    "kobject_add_internal failed for {name} with -EEXIST, don't try to register things with the "
    "same name in the same directory.",
]


def dup_lines(path: str) -> list[str]:
    name = path.rsplit("/", 1)[-1]
    return [line.format(path=path, name=name) for line in DUP_LINES]


def bare_module(m, name: str, funcs: list[str], livepatch: bool = True) -> Module:
    """A loaded module (no init) holding replacement functions `funcs`."""
    mod = Module(name, [FuncDef(f, 0x40, const_body(f"{name}:{f}\n")) for f in funcs], livepatch=livepatch)
    assert m.load(mod) == 0
    return mod


def func(mod: Module, old: str, pos: int = 0, new: str | None = None) -> KlpFunc:
    new = new or mod.symbols[0].name
    sym = next(s for s in mod.symbols if s.name == new)
    return KlpFunc(old, sym, pos)


# ---------------------------------------------------------------------------
# §3.1 checks in order
# ---------------------------------------------------------------------------

async def test_null_patch_or_module_einval(m, autojump_clock):
    """§3.1 check 1: patch or patch->mod NULL -> EINVAL, no message."""
    m.take()
    assert m.lp.klp_register_patch(None) == -errno.EINVAL
    assert m.lp.klp_register_patch(KlpPatch(None, [])) == -errno.EINVAL
    assert m.take() == []


async def test_not_a_livepatch_module(m, autojump_clock):
    """§3.1 check 2: module without the livepatch modinfo -> pr_err + EINVAL;
    insmod fails with EINVAL; no TAINT_LIVEPATCH (§4.6)."""
    assert m.load(spec("not_lp", livepatch=False)) == -errno.EINVAL
    assert m.take() == ["livepatch: module not_lp is not marked as a livepatch module"]
    assert m.lp_node("not_lp") is None
    assert m.lp.klp_patches == []


async def test_not_a_livepatch_module_checked_before_reliable_stacks(boot, autojump_clock):
    """§3.1: check 2 (livepatch module) comes before check 4 (reliable stacks)."""
    m = boot("4.15", reliable_stacks=False)
    assert m.register_only(spec("not_lp", livepatch=False)) == -errno.EINVAL
    assert m.take() == ["livepatch: module not_lp is not marked as a livepatch module"]


async def test_no_reliable_stacks_without_immediate_enosys_415(boot, autojump_clock):
    """§3.1 check 4 (4.15): no reliable stacks and patch->immediate false -> pr_err
    and ENOSYS (a func-level immediate does not help)."""
    m = boot("4.15", reliable_stacks=False)
    s = spec("lp_x", {None: [("cmdline_proc_show", 0, True)]})
    assert m.register_only(s) == -errno.ENOSYS
    assert m.take() == [
        "lp_x: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: This architecture doesn't have support for the livepatch consistency model.",
    ]
    assert m.lp_node("lp_x") is None


async def test_no_reliable_stacks_immediate_ok_415(boot, autojump_clock):
    """§3.1 check 4 / §4.1: an immediate patch registers without reliable stacks."""
    m = boot("4.15", reliable_stacks=False)
    assert m.register_only(spec("lp_x", immediate=True)) == 0
    assert m.lp_node("lp_x") is not None


async def test_sample_init_bypasses_on_415(boot, autojump_clock):
    """§4.6: on 4.15 the sample's init sets immediate itself when the arch has no
    reliable stacks, with its notice, and the patch applies immediately."""
    m = boot("4.15", reliable_stacks=False)
    assert m.load(spec("lp_x")) == 0
    assert m.take() == [
        "lp_x: tainting kernel with TAINT_LIVEPATCH",
        "lp_x: The consistency model isn't supported for your architecture.  Bypassing safety "
        "mechanisms and applying the patch immediately.",
        "livepatch: enabling patch 'lp_x'",
        "livepatch: 'lp_x': initializing patching transition",
        "livepatch: 'lp_x': starting patching transition",
        "livepatch: 'lp_x': completing patching transition",
        "livepatch: 'lp_x': patching complete",
    ]
    assert m.state("lp_x") == (1, 0)


async def test_no_reliable_stacks_enosys_416(boot, autojump_clock):
    """§12.2: on 4.16 registration fails with the §3.1 message and ENOSYS whenever
    the arch lacks reliable stacks; the sample prints no bypass notice."""
    m = boot("4.16", reliable_stacks=False)
    assert m.load(spec("lp_x")) == -errno.ENOSYS
    assert m.take() == [
        "lp_x: tainting kernel with TAINT_LIVEPATCH",
        "livepatch: This architecture doesn't have support for the livepatch consistency model.",
    ]


async def test_no_reliable_stacks_enosys_416_even_if_immediate_requested(boot, autojump_clock):
    """§0/§12.2: 4.16 has no `immediate` (no bypass any more): a patch cannot
    escape the ENOSYS by being immediate."""
    m = boot("4.16", reliable_stacks=False)
    ret = m.register_only(spec("lp_x", immediate=True))
    assert ret == -errno.ENOSYS, (
        f"ENGINE BUG (§12.2): on 4.16 without reliable stacks registration must fail with ENOSYS "
        f"(immediate does not exist in 4.16), got {ret}")


async def test_objs_null_einval(m, autojump_clock):
    """§3.1 check 5: patch->objs NULL -> EINVAL, no message, nothing created."""
    mod = bare_module(m, "lp_bare", ["f"])
    m.take()
    assert m.lp.klp_register_patch(KlpPatch(mod, None)) == -errno.EINVAL
    assert m.take() == []
    assert m.lp_node("lp_bare") is None


async def test_enosys_checked_before_objs_null(boot, autojump_clock):
    """§3.1: check 4 (reliable stacks) precedes check 5 (objs NULL)."""
    m = boot("4.15", reliable_stacks=False)
    mod = bare_module(m, "lp_bare", ["f"])
    assert m.lp.klp_register_patch(KlpPatch(mod, None)) == -errno.ENOSYS


async def test_registration_takes_no_module_reference(m, autojump_clock):
    """§3.1: registration does not take a module reference."""
    assert m.register_only(spec("lp_x")) == 0
    assert m.refcnt("lp_x") == 0
    assert m.rmmod("lp_x") == 0


async def test_appended_in_registration_order(m, autojump_clock):
    """§1.3/§3.1: successful registrations are appended at the tail."""
    for name in ("lp_1", "lp_3", "lp_2"):
        assert m.register_only(spec(name, {None: []})) == 0
    assert [p.name for p in m.lp.klp_patches] == ["lp_1", "lp_3", "lp_2"]


async def test_duplicate_patch_name_eexist(m, autojump_clock):
    """§3.1 (a): a second klp_patch of the same module collides on the sysfs name:
    the sysfs/kobject lines and EEXIST; the first registration is untouched."""
    mod = bare_module(m, "lp_dup", ["f"])
    p1 = KlpPatch(mod, [KlpObject(None, [func(mod, "cmdline_proc_show")])])
    p2 = KlpPatch(mod, [KlpObject(None, [func(mod, "version_proc_show")])])
    assert m.lp.klp_register_patch(p1) == 0
    m.take()
    assert m.lp.klp_register_patch(p2) == -errno.EEXIST
    assert m.take() == dup_lines("lp_dup")
    assert m.lp.klp_patches == [p1]
    assert sorted(m.lp_node("lp_dup").children) == ["enabled", "transition", "vmlinux"]
    assert sorted(m.lp_node("lp_dup/vmlinux").children) == ["cmdline_proc_show,1"]


# ---------------------------------------------------------------------------
# §3.2 / §3.3 objects and funcs
# ---------------------------------------------------------------------------

async def test_object_funcs_null_einval(m, autojump_clock):
    """§3.2 step 1: obj->funcs NULL -> EINVAL; everything created is torn down."""
    mod = bare_module(m, "lp_bare", ["f"])
    p = KlpPatch(mod, [KlpObject(None, [func(mod, "cmdline_proc_show")]), KlpObject("some_mod", None)])
    m.take()
    assert m.lp.klp_register_patch(p) == -errno.EINVAL
    assert m.take() == []
    assert m.lp_node("lp_bare") is None
    assert m.lp.klp_patches == []


@pytest.mark.parametrize("which", ["old_name", "new_func"])
async def test_func_missing_name_or_new_func_einval(m, autojump_clock, which):
    """§3.3 step 1: old_name or new_func NULL -> EINVAL, no message."""
    mod = bare_module(m, "lp_bare", ["f"])
    f = func(mod, "cmdline_proc_show")
    setattr(f, which, None)
    p = KlpPatch(mod, [KlpObject(None, [f])])
    m.take()
    assert m.lp.klp_register_patch(p) == -errno.EINVAL
    assert m.take() == []
    assert m.lp_node("lp_bare") is None


async def test_two_vmlinux_objects_eexist(m, autojump_clock):
    """§3.2 step 4: two vmlinux objects clash on the object directory -> EEXIST."""
    mod = bare_module(m, "lp_bare", ["f"])
    p = KlpPatch(mod, [KlpObject(None, [func(mod, "cmdline_proc_show")]),
                       KlpObject(None, [func(mod, "version_proc_show")])])
    m.take()
    assert m.lp.klp_register_patch(p) == -errno.EEXIST
    assert m.take() == dup_lines("lp_bare/vmlinux")
    assert m.lp_node("lp_bare") is None


async def test_two_objects_same_module_eexist(m, autojump_clock):
    """§3.2 step 4: two objects naming the same module -> EEXIST."""
    mod = bare_module(m, "lp_bare", ["f"])
    p = KlpPatch(mod, [KlpObject("tmod", [func(mod, "a")]), KlpObject("tmod", [func(mod, "b")])])
    m.take()
    assert m.lp.klp_register_patch(p) == -errno.EEXIST
    assert m.take() == dup_lines("lp_bare/tmod")
    assert m.lp_node("lp_bare") is None


async def test_func_dirs_sympos_0_and_1_collide(m, autojump_clock):
    """§2.1/§3.3: sympos 0 and 1 both display as ",1" -> the second func dir
    clashes -> EEXIST, and the whole patch is torn down."""
    s = spec("lp_x", {None: [("type_show", 1), ("type_show", 0)]})
    assert m.register_only(s) == -errno.EEXIST
    assert m.take()[1:] == dup_lines("lp_x/vmlinux/type_show,1")
    assert m.lp_node("lp_x") is None


async def test_func_dirs_created_before_symbol_resolution(m, autojump_clock):
    """§2.1: an object's func dirs are all created before its symbols are
    resolved: a dir clash wins over an unknown symbol earlier in the array."""
    s = spec("lp_x", {None: ["no_such_function", ("cmdline_proc_show", 0), ("cmdline_proc_show", 1)]})
    assert m.register_only(s) == -errno.EEXIST
    lines = m.take()
    assert lines[1:] == dup_lines("lp_x/vmlinux/cmdline_proc_show,1")


async def test_failure_in_later_object_tears_down_earlier(m, autojump_clock):
    """§3.1 step 6: on an object failure, earlier objects and the patch dir go."""
    s = spec("lp_x", {None: ["cmdline_proc_show"], "tmod": ["a"], "tmod2": ["b", "b"]})
    assert m.register_only(s) == -errno.EEXIST
    assert m.lp_node("lp_x") is None
    assert m.lp.klp_patches == []


# ---------------------------------------------------------------------------
# §3.4 symbol lookup
# ---------------------------------------------------------------------------

async def test_symbol_not_found(m, autojump_clock):
    """§3.4: no match -> "symbol '%s' not found in symbol table", EINVAL."""
    assert m.register_only(spec("lp_x", {None: ["no_such_function"]})) == -errno.EINVAL
    assert m.take()[1:] == ["livepatch: symbol 'no_such_function' not found in symbol table"]
    assert m.lp_node("lp_x") is None


async def test_vmlinux_ambiguity_prints_null(m, autojump_clock):
    """§3.4 / §13.7: sympos 0 with duplicates in vmlinux -> the object name printed
    is "(null)"; EINVAL."""
    assert m.register_only(spec("lp_x", {None: ["type_show"]})) == -errno.EINVAL
    assert m.take()[1:] == ["livepatch: unresolvable ambiguity for symbol 'type_show' in object '(null)'"]


async def test_module_ambiguity_prints_module(m, autojump_clock):
    """§3.4: sympos 0 with duplicates in a module -> the module's name is printed."""
    assert m.load(target_module("tmod", ["dup", "other", "dup"])) == 0
    m.take()
    assert m.register_only(spec("lp_x", {"tmod": ["dup"]})) == -errno.EINVAL
    assert m.take()[1:] == ["livepatch: unresolvable ambiguity for symbol 'dup' in object 'tmod'"]


@pytest.mark.parametrize("name,count", [("type_show", 3), ("enabled_show", 2)])
async def test_sympos_too_large_vmlinux(m, autojump_clock, name, count):
    """§3.4: fewer than sympos matches -> "symbol position ... in object 'vmlinux'
    not found", EINVAL."""
    assert m.register_only(spec("lp_x", {None: [(name, count + 1)]})) == -errno.EINVAL
    assert m.take()[1:] == [
        f"livepatch: symbol position {count + 1} for symbol '{name}' in object 'vmlinux' not found"]


async def test_sympos_too_large_module(m, autojump_clock):
    assert m.load(target_module("tmod", ["dup", "dup"])) == 0
    m.take()
    assert m.register_only(spec("lp_x", {"tmod": [("dup", 3)]})) == -errno.EINVAL
    assert m.take()[1:] == ["livepatch: symbol position 3 for symbol 'dup' in object 'tmod' not found"]


async def test_sympos_too_large_but_name_unknown(m, autojump_clock):
    """§3.4: "not found" is checked first, whatever sympos is."""
    assert m.register_only(spec("lp_x", {None: [("no_such_function", 2)]})) == -errno.EINVAL
    assert m.take()[1:] == ["livepatch: symbol 'no_such_function' not found in symbol table"]


@pytest.mark.parametrize("pos", [1, 2, 3])
async def test_sympos_selects_nth_occurrence(m, autojump_clock, pos):
    """§3.4: sympos N patches the N-th occurrence only (sympos 1 = the first,
    even though the name is not unique)."""
    s = spec("lp_x", {None: [("type_show", pos)]})
    assert m.load(s) == 0
    await settle()
    t = m.kthread()
    for i in (1, 2, 3):
        expect = "lp_x:type_show" if i == pos else "<original>"
        assert m.call("type_show", t, pos=i) == expect


async def test_sympos_unique_symbol(m, autojump_clock):
    """§3.4: sympos 1 on a unique symbol works; sympos 2 on it fails."""
    assert m.register_only(spec("lp_x", {None: [("cmdline_proc_show", 1)]})) == 0
    assert m.register_only(spec("lp_y", {None: [("cmdline_proc_show", 2)]})) == -errno.EINVAL
    assert m.take()[-1] == (
        "livepatch: symbol position 2 for symbol 'cmdline_proc_show' in object 'vmlinux' not found")


async def test_lookup_counts_only_the_requested_object(m, autojump_clock):
    """§3.4: only the requested object's symbols count: a module function with a
    vmlinux function's name makes neither ambiguous."""
    assert m.load(target_module("tmod", ["cmdline_proc_show"])) == 0
    assert m.load(spec("lp_x", {None: ["cmdline_proc_show"], "tmod": ["cmdline_proc_show"]})) == 0
    await settle()
    t = m.kthread()
    assert m.call("cmdline_proc_show", t) == "lp_x:cmdline_proc_show"
    assert m.call("cmdline_proc_show", t, module="tmod") == "lp_x:cmdline_proc_show"
    assert m.state("lp_x") == (1, 0)


async def test_long_names_accepted_in_vanilla_415(m, autojump_clock):
    """§3.3: vanilla 4.15 does not reject an old_name of >= 128 chars nor a
    module object name of >= 56 chars (only Ubuntu / later kernels do)."""
    long_func = "f" * 130
    long_obj = "m" * 60
    assert m.load(target_module("tmod", [long_func])) == 0
    assert m.register_only(spec("lp_x", {"tmod": [long_func], long_obj: ["g"]})) == 0
    assert m.lp_node(f"lp_x/tmod/{long_func},1") is not None
    assert m.lp_node(f"lp_x/{long_obj}/g,1") is not None


# ---------------------------------------------------------------------------
# §2.1 the tree
# ---------------------------------------------------------------------------

def mode(node) -> tuple[str, int]:
    return ("d" if stat.S_ISDIR(node.mode) else "f"), node.mode & 0o7777


@pytest.mark.parametrize("version", ["4.15", "4.16"])
async def test_tree_created_at_registration(boot, autojump_clock, version):
    """§2.1: the whole tree exists after registration (before any enable):
    patch dir 0755 with enabled 0644, transition 0444 (4.16: signal and force
    0200); object dirs 0755 (vmlinux / module name, loaded or not); func dirs
    0755 named "<old_name>,<sympos or 1>", empty."""
    m = boot(version)
    s = spec("lp_tree", {None: ["cmdline_proc_show", ("type_show", 2), ("enabled_show", 1)],
                         "not_loaded_mod": ["nl_func", ("nl_other", 3)]})
    assert m.register_only(s) == 0
    root = m.lp_node("lp_tree")
    want_attrs = {"enabled": ("f", 0o644), "transition": ("f", 0o444)}
    if version == "4.16":
        want_attrs |= {"signal": ("f", 0o200), "force": ("f", 0o200)}
    assert mode(root) == ("d", 0o755)
    assert {n: mode(c) for n, c in root.children.items()} == {
        **want_attrs, "vmlinux": ("d", 0o755), "not_loaded_mod": ("d", 0o755)}
    vml = m.lp_node("lp_tree/vmlinux")
    assert {n: mode(c) for n, c in vml.children.items()} == {
        "cmdline_proc_show,1": ("d", 0o755), "type_show,2": ("d", 0o755), "enabled_show,1": ("d", 0o755)}
    nl = m.lp_node("lp_tree/not_loaded_mod")
    assert {n: mode(c) for n, c in nl.children.items()} == {
        "nl_func,1": ("d", 0o755), "nl_other,3": ("d", 0o755)}
    for d in list(vml.children.values()) + list(nl.children.values()):
        assert d.children == {}
    assert m.state("lp_tree") == (0, 0)


async def test_tree_removed_at_unregistration(m, autojump_clock):
    """§2.1/§4.4: unregistration removes every func, object and patch dir."""
    assert m.register_only(spec("lp_x", {None: ["cmdline_proc_show"], "other": ["x"]})) == 0
    nodes = [m.lp_node(p) for p in ("lp_x", "lp_x/vmlinux", "lp_x/vmlinux/cmdline_proc_show,1",
                                    "lp_x/other", "lp_x/other/x,1", "lp_x/enabled")]
    assert m.lp.klp_unregister_patch(m.patch("lp_x")) == 0
    assert all(not n.active for n in nodes)
    assert m.lp_node("lp_x") is None
    assert list(m.node(LP).children) == []
    assert m.lp.klp_patches == []


async def test_unregister_enabled_patch_ebusy(m, autojump_clock):
    """§4.4: unregistering an enabled patch -> EBUSY; rmmod is refused (module
    reference held) with EAGAIN/EWOULDBLOCK."""
    assert m.load(spec("lp_x")) == 0
    await settle()
    assert m.lp.klp_unregister_patch(m.patch("lp_x")) == -errno.EBUSY
    assert m.rmmod("lp_x") == -errno.EWOULDBLOCK
    assert m.lp_node("lp_x") is not None


async def test_unregister_unregistered_einval(m, autojump_clock):
    """§4.4: not registered -> EINVAL."""
    assert m.register_only(spec("lp_x")) == 0
    patch = m.patch("lp_x")
    assert m.lp.klp_unregister_patch(patch) == 0
    assert m.lp.klp_unregister_patch(patch) == -errno.EINVAL


async def test_unregister_during_unpatching_transition_quirk(m, autojump_clock):
    """§4.4 / §13.13: unregister only checks `enabled`, which is already false
    during an unpatching transition: it succeeds and the tree goes; the
    transition still completes afterwards."""
    assert m.load(spec("lp_x")) == 0
    await settle()
    blocker = m.blocker()
    assert m.write("lp_x/enabled", b"0") == 1
    assert m.lp.klp_unregister_patch(m.patch("lp_x")) == 0
    assert m.lp_node("lp_x") is None
    m.sched.rest(blocker)
    await settle()
    assert m.lp.klp_transition_patch is None
    assert "livepatch: 'lp_x': unpatching complete" in m.lines()
    assert m.call("cmdline_proc_show", m.kthread()) == "<original>"


async def test_register_same_structure_twice_eexist(m, autojump_clock):
    """§3.1 (b): registering the same structure again fails with EEXIST."""
    assert m.register_only(spec("lp_x")) == 0
    assert m.lp.klp_register_patch(m.patch("lp_x")) == -errno.EEXIST


async def test_module_object_resolved_only_when_loaded(m, autojump_clock):
    """§3.2 step 3/6: an object whose module is not loaded is not resolved at
    registration (an unknown symbol there is no error yet)."""
    assert m.register_only(spec("lp_x", {"tmod": ["no_such_function"]})) == 0
    assert m.lp_node("lp_x/tmod/no_such_function,1") is not None

