"""Freed patches (notes §5, obs #8, #9, #20, #21): the order in which a
disabled patch goes away, module references, rmmod before and after."""

from __future__ import annotations

import errno

import pytest

from klpfs.kernel.module import O_TRUNC
from klpfs.kernel.oops import PageFault

from .conftest import EAGAIN, ENOENT, Recorder, settle, spec, target_module, tick

A = spec("lp_a", {None: ["cmdline_proc_show", "version_proc_show"], "tmod": ["tmod_fn"]})


async def test_refcount_and_rmmod_through_a_lifecycle(m, autojump_clock):
    """obs #20 / notes §5.2: refcnt 1 from the livepatch core while the patch is
    listed; rmmod EAGAIN while enabled and during the unpatching transition;
    refcnt 0 and rmmod succeeds once the directory is gone; not loaded: ENOENT."""
    assert m.load(A) == 0
    assert m.refcnt("lp_a") == 1
    assert m.rmmod("lp_a") == -EAGAIN
    await settle()
    assert m.rmmod("lp_a") == -EAGAIN
    assert m.rmmod("lp_a", 0o4000) == -EAGAIN                   # O_NONBLOCK (rmmod -w or not)
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.refcnt("lp_a") == 1
    assert m.rmmod("lp_a") == -EAGAIN
    await settle()
    assert m.exists("lp_a") and m.rmmod("lp_a") == -EAGAIN
    m.sched.wake(holder)
    await settle()
    assert not m.exists("lp_a")
    assert m.refcnt("lp_a") == 0
    assert (await m.ctl("lsmod"))["modules"] == [{"name": "lp_a", "size": 16384, "refcnt": 0}]
    assert m.rmmod("lp_a") == 0
    assert m.rmmod("lp_a") == -ENOENT


async def test_free_order_after_disable(m, autojump_clock):
    """notes §5.1: "unpatching complete" printed -> every func dir then its
    object dir gone (objects in list order) -> the patch dir (attributes
    included) gone -> only then the module reference dropped."""
    assert m.load(A) == 0
    await settle()
    holder = m.sleeper("cmdline_proc_show", comm="holder")
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    rec = Recorder(m, watch=("lp_a",))
    m.sched.wake(holder)
    await settle()
    rec.close()
    done = rec.index("log", "livepatch: 'lp_a': unpatching complete")
    removed = rec.removed()
    assert removed, "nothing removed"
    first_rm = rec.index("rm", removed[0])
    assert done < first_rm, "ENGINE BUG (notes §5.1): dirs go after 'unpatching complete'"
    funcs_objs = [r for r in removed if r.count("/") >= 1 and r.split("/")[-1] not in (
        "enabled", "transition", "force", "replace", "stack_order")]
    # func dirs before their object, objects in list order
    order = [r for r in funcs_objs if r != "lp_a"]
    assert order.index("lp_a/vmlinux/cmdline_proc_show,1") < order.index("lp_a/vmlinux")
    assert order.index("lp_a/vmlinux/version_proc_show,1") < order.index("lp_a/vmlinux")
    assert order.index("lp_a/vmlinux") < order.index("lp_a/tmod/tmod_fn,1") < order.index("lp_a/tmod")
    patch_rm = rec.index("rm", "lp_a")
    assert patch_rm == max(i for i, e in enumerate(rec.events) if e[0] == "rm"), \
        "ENGINE BUG (notes §5.1): the patch dir goes last"
    assert rec.index("rm", "lp_a/tmod") < rec.index("rm", "lp_a/enabled") < patch_rm
    assert rec.refs_at("rm", "lp_a") == {"lp_a": 1}, \
        "ENGINE BUG (notes §5.1): the module reference drops after the patch dir is gone"
    assert m.refcnt("lp_a") == 0


async def test_disable_completing_in_write(m, autojump_clock):
    """notes §5.1 / §12.6: when the unpatching completes inside the write, the
    object dirs are gone when the write returns, the patch dir a moment later
    (free work), then refcnt 0."""
    for cpu in range(len(m.sched.cpu_online)):
        m.sched.set_cpu_online(cpu, False)
    assert m.load(A) == 0
    assert m.read("lp_a/transition") == b"0\n", "the patching should complete inside insmod (obs #5)"
    assert m.take()[-1] == "livepatch: 'lp_a': patching complete"
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.take()[-2:] == ["livepatch: 'lp_a': starting unpatching transition",
                             "livepatch: 'lp_a': unpatching complete"]
    assert m.exists("lp_a") and not m.exists("lp_a/vmlinux") and not m.exists("lp_a/tmod")
    assert m.refcnt("lp_a") == 1
    await tick()
    assert not m.exists("lp_a")
    assert m.refcnt("lp_a") == 0


async def test_stale_handles_enodev(m, version, autojump_clock):
    """obs #9: an fd opened before the patch was freed gets ENODEV on write and
    read; a new open is ENOENT."""
    from klpfs.sysfs.kernfs import Kernfs
    assert m.load(A) == 0
    await settle()
    nodes = [m.lp_node("lp_a/enabled"), m.lp_node("lp_a/transition")]
    if version != "5.1":
        nodes.append(m.lp_node("lp_a/vmlinux/patched"))
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    for n in nodes:
        assert Kernfs.read(n, 0, 10) == -errno.ENODEV
    assert Kernfs.write(nodes[0], b"1") == -errno.ENODEV
    assert m.lp_node("lp_a") is None


async def test_rmmod_force_of_enabled_patch(m, version, autojump_clock):
    """obs #21: delete_module(O_NONBLOCK|O_TRUNC) of an enabled patch returns 0,
    taints R, removes /sys/module/<m> but leaves /sys/kernel/livepatch/<m>/ -- on a
    kernel with CONFIG_MODULE_FORCE_UNLOAD (Debian's 6.1, 6.11 and 6.12 here).  Fedora's
    5.1 and Ubuntu's 6.14 have none: O_TRUNC forces nothing, EAGAIN as without it."""
    assert m.load(A) == 0
    await settle()
    before = m.kernel.modules.tainted
    if version in ("5.1", "6.14"):
        assert m.rmmod("lp_a", O_TRUNC | 0o4000) == -EAGAIN
        assert m.kernel.modules.tainted == before
        assert m.node("sys/module/lp_a") is not None and m.state("lp_a") == (1, 0)
        return
    assert m.rmmod("lp_a", O_TRUNC | 0o4000) == 0
    # TAINT_FORCED_RMMOD is bit 3 ('R'): obs #21 saw 45056 -> 45064
    assert m.kernel.modules.tainted == before | (1 << 3), (
        f"ENGINE BUG (obs #21): rmmod -f taints R = bit 3 (+8): {before} -> {m.kernel.modules.tainted}")
    assert m.node("sys/module/lp_a") is None
    assert m.exists("lp_a")
    # Its attributes now read the freed klp_patch: the reader oopses (obs #21).
    with pytest.raises(PageFault) as fault:
        m.read("lp_a/enabled")
    with pytest.raises(PageFault):
        m.write("lp_a/enabled", b"0")
    m.take()
    fault.value.die(340, "cat", 1)
    style_6_12 = version in ("6.11", "6.12")   # 6.12 obs #11: "Oops: ", the UID, the taints spelled out
    assert m.take() == [
        f"BUG: unable to handle page fault for address: {fault.value.address:016x}",
        "#PF: supervisor read access in kernel mode",
        "#PF: error_code(0x0000) - not-present page",
        ("Oops: Oops: " if style_6_12 else "Oops: ") + "0000 [#1] PREEMPT SMP NOPTI",
        f"CPU: 1 {'UID: 0 ' if style_6_12 else ''}PID: 340 Comm: cat Tainted: G  R           K    "
        f"{m.system.profile.release} #1 " + (" Debian 6.12.118-1~deb12u1" if version == "6.12" else ""),
        *(["Tainted: [R]=FORCED_RMMOD, [K]=LIVEPATCH"] if style_6_12 else []),
        "RIP: 0010:sysfs_kf_seq_show+0x1d/0x100",
        "Call Trace:",
        " <TASK>",
        " seq_read+0x1e0/0x3c0",
        " __vfs_read+0x1d/0x3a",
        " vfs_read+0x47/0x8e",
        " SyS_read+0x2a/0x55",
        " do_syscall_64+0x9e/0x13c",
        " entry_SYSCALL_64_after_hwframe+0x1e/0x3d",
        " </TASK>",
        f"CR2: {fault.value.address:016x}",
        "---[ end trace 0000000000000000 ]---"]
    assert m.kernel.modules.tainted == before | (1 << 3) | (1 << 7)  # and D, from oops_end()
    # The ftrace handler still finds the freed klp_func: a caller of the function oopses too.
    with pytest.raises(PageFault):
        m.call("cmdline_proc_show", m.kernel.console)


async def test_target_module_not_pinned(m, autojump_clock):
    """obs #17 / notes §8.1: a patched target module is never pinned: rmmod is
    allowed (refcnt 0) while the patch stays enabled."""
    assert m.load(target_module("tmod", ["tmod_fn"])) == 0
    assert m.load(A) == 0
    await settle()
    assert m.refcnt("tmod") == 0
    assert m.rmmod("tmod") == 0
    assert m.state("lp_a") == (1, 0)


async def test_same_module_twice_eexist(m, autojump_clock):
    """obs #20: the same module loaded twice: EEXIST."""
    assert m.load(A) == 0
    assert m.load(spec("lp_a")) == -errno.EEXIST
    assert m.ls() == ["lp_a"]


async def test_holders_empty(m, autojump_clock):
    """obs #20: /sys/module/<patch>/holders is empty; refcnt 1 comes from the core."""
    assert m.load(A) == 0
    holders = m.node("sys/module/lp_a/holders")
    assert holders is not None and holders.children == {}
    from klpfs.sysfs.kernfs import Kernfs
    assert Kernfs.read(m.node("sys/module/lp_a/refcnt"), 0, 10) == b"1\n"
