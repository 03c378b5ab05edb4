"""<patch>/replace (6.11+) and <patch>/stack_order (6.14+) values through a
life cycle (notes §3.2, §6.5; selftest test-sysfs.sh)."""

from __future__ import annotations

import pytest

from .conftest import settle, spec, tick

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})
C = spec("lp_c", {None: ["meminfo_proc_show"]})
R = spec("lp_r", {None: ["cmdline_proc_show"]}, replace=True)


def order(m, name) -> int:
    v = m.read(f"{name}/stack_order")
    assert isinstance(v, bytes) and v.endswith(b"\n") and len(v) >= 2, v
    return int(v)


@pytest.mark.parametrize("version", ["6.11", "6.12", "6.14"])
async def test_replace_values(m, autojump_clock):
    """notes §3.2: replace shows the flag as 0/1, constant for the patch's life
    (during its transition, after it, during a reversal)."""
    assert m.load(A) == 0
    assert m.read("lp_a/replace") == b"0\n"
    await settle()
    assert m.read("lp_a/replace") == b"0\n"
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(R) == 0
    assert m.read("lp_r/replace") == b"1\n" and m.read("lp_a/replace") == b"0\n"
    assert m.write("lp_r/enabled", b"0") == 1
    assert m.read("lp_r/replace") == b"1\n"
    assert m.write("lp_r/enabled", b"1") == 1
    m.sched.wake(holder)
    await settle()
    assert m.read("lp_r/replace") == b"1\n"


@pytest.mark.parametrize("version", ["5.1", "6.1"])
async def test_no_replace_attr_before_6_11(m, autojump_clock):
    assert m.load(R) == 0
    assert not m.exists("lp_r/replace")


@pytest.mark.parametrize("version", ["5.1", "6.1", "6.11"])
async def test_no_stack_order_before_6_14(m, autojump_clock):
    assert m.load(A) == 0
    assert not m.exists("lp_a/stack_order")


@pytest.mark.parametrize("version", ["6.14"])
async def test_stack_order_renumbered(m, autojump_clock):
    """notes §3.2 (selftest): load A, B, C -> 1, 2, 3; disable and unload B ->
    A = 1, C = 2; a patch loaded later is last."""
    for p in (A, B, C):
        assert m.load(p) == 0
        await settle()
    assert [order(m, n) for n in ("lp_a", "lp_b", "lp_c")] == [1, 2, 3]
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    assert m.rmmod("lp_b") == 0
    assert [order(m, n) for n in ("lp_a", "lp_c")] == [1, 2]
    assert m.load(spec("lp_b", {None: ["version_proc_show"]})) == 0
    assert [order(m, n) for n in ("lp_a", "lp_c", "lp_b")] == [1, 2, 3]
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert [order(m, n) for n in ("lp_c", "lp_b")] == [1, 2]


@pytest.mark.parametrize("version", ["6.14"])
async def test_stack_order_during_replace(m, autojump_clock):
    """notes §6.5 / §3.2: during an atomic-replace transition the new patch is
    last (N+1); after completion the replaced patches are gone and it is 1.
    Reversed, it stays N+1 until it is freed."""
    assert m.load(A) == 0
    await settle()
    assert m.load(B) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.load(R) == 0
    assert [order(m, n) for n in ("lp_a", "lp_b", "lp_r")] == [1, 2, 3]
    assert m.write("lp_r/enabled", b"0") == 1
    assert order(m, "lp_r") == 3
    assert m.write("lp_r/enabled", b"1") == 1
    m.sched.wake(holder)
    await settle()
    assert m.ls() == ["lp_r"]
    assert order(m, "lp_r") == 1


@pytest.mark.parametrize("version", ["6.14"])
async def test_stack_order_while_being_freed(m, autojump_clock):
    """notes §3.2 quirk: a patch already off the list but whose directory still
    exists (between free start and finish) reads the number of listed
    patches, as the kernel's loop never breaks."""
    for cpu in range(len(m.sched.cpu_online)):
        m.sched.set_cpu_online(cpu, False)               # completions inside the writes
    for p in (A, B, C):
        assert m.load(p) == 0
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.exists("lp_a") and m.read("lp_a/transition") == b"0\n"
    assert order(m, "lp_a") == 2, "ENGINE BUG (notes §3.2 quirk)"
    assert [order(m, n) for n in ("lp_b", "lp_c")] == [1, 2]
    await tick()
    assert not m.exists("lp_a")
