"""Shadow variables with constructor/destructor (4.17 form, unchanged to 6.x;
notes §10, spec §12.3) through module files; refused on 4.15/4.16."""

from __future__ import annotations

import errno
import re

import pytest

from klpfs.kernel.printk import KERN_ERR

from .conftest import settle

SHMOD = """
[[function]]
name = "make"
run = [{ new = "objs", expires = 100 }, { shadow_alloc = 1, ctor_ret = 0 }, { log = "made {obj}" }]

[[function]]
name = "make_failing"
run = [{ new = "bad", expires = 100 }, { shadow_alloc = 2, ctor_ret = -12 }, { log = "made {obj}" }]

[[function]]
name = "get_or_alloc_existing"
run = [
  { for_each = "objs", do = [
    { shadow_get_or_alloc = 1, ctor_ret = -12 },
    { if_shadow = 1, then = [{ log = "has {obj}" }] },
  ] },
]

[[function]]
name = "check_bad"
run = [
  { for_each = "bad", do = [{ if_shadow = 2, then = [{ log = "bad has one" }], else = [{ log = "bad has none" }] }] },
]

[[function]]
name = "free_all"
run = [{ shadow_free_all = 1, dtor_log = "dtor {obj}" }]

[exit]
run = [{ shadow_free_all = 1, dtor_log = "exit dtor {obj}" }]
"""

FAIL_RE = re.compile(r"^livepatch: Failed to construct shadow variable <[0-9a-f]{16}, 2> \(-12\)$")


async def call(m, func: str) -> dict:
    reply = await m.ctl("call", func=func, pid=None)
    assert reply["ok"], reply
    return reply


async def test_ctor_and_dtor(m, autojump_clock):
    """notes §10: the ctor runs when the variable is really created; a failing
    ctor prints the pr_err and yields no variable; get_or_alloc of an
    existing variable does not call the ctor; free_all runs the dtor for
    each variable with that id."""
    assert (await m.insmod_text("shmod.toml", SHMOD))["ok"]
    m.take()
    await call(m, "make")
    await call(m, "make")
    made = [ln for ln in m.take() if ln.startswith("shmod: made ")]
    assert len(made) == 2
    objs = [ln.removeprefix("shmod: made ") for ln in made]
    await call(m, "make_failing")
    lines = m.take()
    assert len(lines) == 2 and FAIL_RE.match(lines[0]), lines
    assert [r.level for r in m.records() if FAIL_RE.match(r.text)] == [KERN_ERR]
    await call(m, "check_bad")
    assert m.take() == ["shmod: bad has none"]
    await call(m, "get_or_alloc_existing")
    assert m.take() == [f"shmod: has {o}" for o in objs], "ctor not called for an existing variable"
    await call(m, "free_all")
    assert sorted(m.take()) == sorted(f"shmod: dtor {o}" for o in objs)
    assert len(m.lp.shadow) == 0


async def test_dtor_at_module_exit(m, autojump_clock):
    """notes §10: variables outlive nothing by themselves; the module's exit frees them with its dtor."""
    assert (await m.insmod_text("shmod.toml", SHMOD))["ok"]
    await call(m, "make")
    m.take()
    assert (await m.rmmod_ctl("shmod"))["ok"]
    lines = m.take()
    assert len(lines) == 1 and lines[0].startswith("shmod: exit dtor ")


@pytest.mark.parametrize("old", ["4.15", "4.16"])
async def test_ctor_dtor_refused_before_4_17(boot, old, autojump_clock):
    """spec §12.3: constructors/destructors arrived in 4.17; a module file
    using them does not build for 4.15/4.16."""
    m = boot(old)
    reply = await m.insmod_text("shmod.toml", SHMOD)
    assert reply["ok"] is False and reply.get("file_error") and reply["errno"] == errno.ENOEXEC
    assert "4.17" in reply["error"]
    assert m.kernel.modules.modules == {}


async def test_shadow_fix_sample_on_later_profiles(m, autojump_clock):
    """The shipped shadow samples load and work on every later profile: new
    dummies get a shadow variable that prevents the leak; the fix frees
    them all at exit."""
    assert (await m.insmod("livepatch-shadow-mod"))["ok"]
    await settle(2.0)
    assert (await m.insmod("livepatch-shadow-fix1"))["ok"]
    await settle(16.0)
    lines = m.lines()
    assert any("livepatch_fix1_dummy_alloc: dummy @ " in ln for ln in lines)
    # From 4.17 the leak is freed, and reported, by the shadow variable's destructor.
    assert any("livepatch_fix1_dummy_leak_dtor: dummy @ " in ln and "prevented leak @ " in ln for ln in lines)
    assert any(ln.endswith(" leaked!") for ln in lines)
    assert m.write("livepatch_shadow_fix1/enabled", b"0") == 1
    await settle()
    assert not m.exists("livepatch_shadow_fix1")
    assert (await m.rmmod_ctl("livepatch_shadow_fix1"))["ok"]
    assert len(m.lp.shadow) == 0
