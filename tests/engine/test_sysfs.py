"""§2.2 generic kernfs rules, §2.4 the `enabled` attribute (state table and
every cell of the write decision table), §2.5 `transition`."""

from __future__ import annotations

import errno

from klpfs.kernel.ftrace import FTRACE_OPS_FL_IPMODIFY, FtraceOps
from klpfs.kernel.module import Module
from klpfs.modules.livepatch_module import build_klp_patch
from klpfs.sysfs.kernfs import Kernfs

from .conftest import LP, cb_line, demo_callbacks, settle, spec

A = spec("lp_a", {None: ["cmdline_proc_show"]})
B = spec("lp_b", {None: ["version_proc_show"]})
C = spec("lp_c", {None: ["meminfo_proc_show"]})


async def enabled_idle(m, *specs):
    """Load each patch module and let its transition finish."""
    for s in specs:
        assert m.load(s) == 0
        await settle()
        assert m.state(s.name) == (1, 0)


# ---------------------------------------------------------------------------
# §2.2 generic rules
# ---------------------------------------------------------------------------

async def test_open_modes(m, autojump_clock):
    """§2.2: kernfs refuses to open `transition` (0444) for writing with EACCES;
    `enabled` (0644) opens read-write."""
    assert m.register_only(A) == 0
    enabled, transition = m.lp_node("lp_a/enabled"), m.lp_node("lp_a/transition")
    assert Kernfs.open_check(enabled, True, True) == 0
    assert Kernfs.open_check(transition, True, False) == 0
    assert Kernfs.open_check(transition, False, True) == -errno.EACCES
    assert Kernfs.open_check(transition, True, True) == -errno.EACCES


async def test_zero_byte_write_does_nothing(m, autojump_clock):
    """§2.2: a write of 0 bytes returns 0 and does not call the store handler."""
    assert m.register_only(A) == 0
    m.take()
    assert m.write("lp_a/enabled", b"") == 0
    assert m.state("lp_a") == (0, 0)
    assert m.take() == []


async def test_long_write_cut_to_page_size(m, autojump_clock):
    """§2.2: a write longer than PAGE_SIZE is cut to 4096 bytes; the handler
    returns the count it saw."""
    assert m.register_only(A) == 0
    assert m.write("lp_a/enabled", b"1" + b"\n" * 5000) == 4096
    assert m.enabled("lp_a") == b"1\n"


async def test_reads_are_two_bytes_and_eof_past_end(m, autojump_clock):
    """§2.2: show handlers print "%d\\n": exactly 2 bytes; past the end, 0 bytes."""
    assert m.register_only(A) == 0
    for attr in ("enabled", "transition"):
        node = m.lp_node(f"lp_a/{attr}")
        assert Kernfs.read(node, 0, 4096) == b"0\n"
        assert Kernfs.read(node, 2, 4096) == b""
        assert Kernfs.read(node, 10, 4096) == b""


async def test_store_returns_full_count(m, autojump_clock):
    """§2.2: on success the store returns the full byte count written."""
    assert m.register_only(A) == 0
    assert m.write("lp_a/enabled", b"yes, please\n") == 12


async def test_stale_handle_after_unregister_is_enodev(m, autojump_clock):
    """§2.2: a handle opened before unregistration reads/writes ENODEV; a new
    lookup fails (ENOENT)."""
    assert m.register_only(A) == 0
    enabled, transition = m.lp_node("lp_a/enabled"), m.lp_node("lp_a/transition")
    assert m.rmmod("lp_a") == 0
    assert Kernfs.read(enabled, 0, 100) == -errno.ENODEV
    assert Kernfs.read(transition, 0, 100) == -errno.ENODEV
    assert Kernfs.write(enabled, b"1\n") == -errno.ENODEV
    assert m.lp_node("lp_a") is None
    assert m.lp_node("lp_a/enabled") is None


# ---------------------------------------------------------------------------
# §2.4 state table (reads of enabled / transition)
# ---------------------------------------------------------------------------

async def test_state_table_reads(m, autojump_clock):
    """§2.4 table: disabled (0,0); patching (1,1); enabled (1,0); unpatching (0,1);
    and back to disabled (0,0)."""
    assert m.register_only(A) == 0
    assert m.state("lp_a") == (0, 0)
    blocker = m.blocker()
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.state("lp_a") == (1, 1)
    await settle(3)
    assert m.state("lp_a") == (1, 1)
    m.sched.rest(blocker)
    await settle()
    assert m.state("lp_a") == (1, 0)
    m.sched.run(blocker)
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)
    await settle(3)
    assert m.state("lp_a") == (0, 1)
    m.sched.rest(blocker)
    await settle()
    assert m.state("lp_a") == (0, 0)


async def test_enabled_flips_at_request_time(m, autojump_clock):
    """§2.4: `enabled` is set when the enable request is accepted (before the
    transition finishes), and cleared when the disable request is accepted."""
    blocker = m.blocker()
    assert m.load(A) == 0
    assert m.lp.klp_transition_patch is m.patch("lp_a")
    assert m.enabled("lp_a") == b"1\n"
    m.sched.rest(blocker)
    await settle()
    m.sched.run(blocker)
    assert m.write("lp_a/enabled", b"0\n") == 2
    assert m.lp.klp_transition_patch is m.patch("lp_a")
    assert m.enabled("lp_a") == b"0\n"


async def test_transition_reads_one_for_only_the_transition_patch(m, autojump_clock):
    """§2.5: `transition` is 1 only for klp_transition_patch; at most one patch reads 1."""
    await enabled_idle(m, A)
    assert m.register_only(B) == 0
    assert m.register_only(C) == 0
    m.blocker()
    assert m.write("lp_b/enabled", b"1") == 1
    assert [m.transition(p) for p in ("lp_a", "lp_b", "lp_c")] == [b"0\n", b"1\n", b"0\n"]


# ---------------------------------------------------------------------------
# §2.4 write decision table: A disabled, idle
# ---------------------------------------------------------------------------

async def test_disabled_write1_other_in_transition_ebusy(m, autojump_clock):
    """§2.4 [disabled, write 1]: EBUSY if another patch is in transition (here
    the predecessor is enabled, so only the transition rule applies)."""
    m.blocker()
    assert m.load(A) == 0
    assert m.register_only(B) == 0
    m.take()
    assert m.write("lp_b/enabled", b"1") == -errno.EBUSY
    assert m.state("lp_b") == (0, 0)
    assert m.take() == []


async def test_disabled_write1_predecessor_not_enabled_ebusy(m, autojump_clock):
    """§2.4 [disabled, write 1]: EBUSY if the predecessor in the registered list
    is not enabled."""
    assert m.register_only(A) == 0
    assert m.register_only(B) == 0
    m.take()
    assert m.write("lp_b/enabled", b"1") == -errno.EBUSY
    assert m.state("lp_b") == (0, 0)
    assert m.take() == []
    assert m.refcnt("lp_b") == 0


async def test_disabled_write1_module_going_enodev(m, autojump_clock):
    """§2.4 [disabled, write 1]: ENODEV if the module reference cannot be taken
    (the patch module is going away: here a write races with its exit)."""
    results = []
    mod = Module("lp_going", list(A.functions), livepatch=True)
    lp = m.lp

    def init(mm):
        mm.data["patch"] = build_klp_patch(mm, A.objs, False)
        return lp.klp_register_patch(mm.data["patch"])

    def exit_(mm):
        results.append(Kernfs.write(m.lp_node("lp_going/enabled"), b"1\n"))
        lp.klp_unregister_patch(mm.data["patch"])

    mod.init, mod.exit = init, exit_
    assert m.load(mod) == 0
    m.take()
    assert m.rmmod("lp_going") == 0
    assert results == [-errno.ENODEV]
    assert m.take() == []


async def test_disabled_write1_predecessor_rule_before_module_ref(m, autojump_clock):
    """§2.4: the stacking EBUSY is checked before the module reference (ENODEV)."""
    results = []
    assert m.register_only(A) == 0
    mod = Module("lp_going", list(B.functions), livepatch=True)
    lp = m.lp

    def init(mm):
        mm.data["patch"] = build_klp_patch(mm, B.objs, False)
        return lp.klp_register_patch(mm.data["patch"])

    def exit_(mm):
        results.append(Kernfs.write(m.lp_node("lp_going/enabled"), b"1\n"))
        lp.klp_unregister_patch(mm.data["patch"])

    mod.init, mod.exit = init, exit_
    assert m.load(mod) == 0
    assert m.rmmod("lp_going") == 0
    assert results == [-errno.EBUSY]


async def test_disabled_write1_pre_patch_error_returned(m, autojump_clock):
    """§2.4 [disabled, write 1]: an enable failing in a pre_patch callback returns
    the callback's error; `enabled` stays 0; the module reference is released."""
    rets = {"vmlinux": -errno.ENOMEM}
    s = spec("lp_cb", callbacks={None: demo_callbacks(m.printk, pre_patch_ret=rets)})
    assert m.register_only(s) == 0
    m.take()
    assert m.write("lp_cb/enabled", b"1") == -errno.ENOMEM
    assert m.state("lp_cb") == (0, 0)
    assert m.refcnt("lp_cb") == 0
    assert m.take() == [
        "livepatch: enabling patch 'lp_cb'",
        "livepatch: 'lp_cb': initializing patching transition",
        cb_line("pre_patch"),
        "livepatch: pre-patch callback failed for object 'vmlinux'",
        "livepatch: failed to enable patch 'lp_cb'",
        "livepatch: 'lp_cb': canceling patching transition, going to unpatch",
        "livepatch: 'lp_cb': completing unpatching transition",
        "livepatch: 'lp_cb': unpatching complete",
    ]


async def test_disabled_write1_ftrace_error_returned(m, autojump_clock):
    """§2.4 [disabled, write 1] / §6.2: another IPMODIFY ftrace user owns the
    function: registering the handler fails with EBUSY, which the write returns."""
    other = FtraceOps(lambda ip, task: None, FTRACE_OPS_FL_IPMODIFY)
    addr = m.sym("cmdline_proc_show").addr
    assert m.kernel.ftrace.set_filter_ip(other, addr) == 0
    assert m.kernel.ftrace.register_ftrace_function(other) == 0
    assert m.register_only(A) == 0
    m.take()
    assert m.write("lp_a/enabled", b"1") == -errno.EBUSY
    assert m.state("lp_a") == (0, 0)
    assert m.take() == [
        "livepatch: enabling patch 'lp_a'",
        "livepatch: 'lp_a': initializing patching transition",
        "livepatch: failed to register ftrace handler for function 'cmdline_proc_show' (-16)",
        "livepatch: failed to patch object 'vmlinux'",
        "livepatch: failed to enable patch 'lp_a'",
        "livepatch: 'lp_a': canceling patching transition, going to unpatch",
        "livepatch: 'lp_a': completing unpatching transition",
        "livepatch: 'lp_a': unpatching complete",
    ]
    assert m.refcnt("lp_a") == 0


async def test_disabled_write1_success(m, autojump_clock):
    """§2.4 [disabled, write 1]: success returns the byte count; patching starts."""
    assert m.register_only(A) == 0
    assert m.write("lp_a/enabled", b"1\n") == 2
    assert m.state("lp_a") == (1, 1)
    await settle()
    assert m.state("lp_a") == (1, 0)


async def test_disabled_write0_einval(m, autojump_clock):
    """§2.4 [disabled, write 0]: EINVAL (same value), also while another patch is
    in transition (the same-value check comes first)."""
    assert m.register_only(A) == 0
    assert m.write("lp_a/enabled", b"0") == -errno.EINVAL
    m.blocker()
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.register_only(B) == 0
    assert m.write("lp_b/enabled", b"0") == -errno.EINVAL


# ---------------------------------------------------------------------------
# A in a patching transition
# ---------------------------------------------------------------------------

async def test_patching_write1_einval(m, autojump_clock):
    """§2.4 [patching, write 1]: EINVAL."""
    m.blocker()
    assert m.load(A) == 0
    m.take()
    assert m.write("lp_a/enabled", b"1") == -errno.EINVAL
    assert m.state("lp_a") == (1, 1)
    assert m.take() == []


async def test_patching_write0_reverses(m, autojump_clock):
    """§2.4 [patching, write 0] / §8.9: success, the transition is reversed to
    unpatching and `enabled` becomes 0 at once; no completion attempt is made
    during the write; the retry work completes it."""
    m.debug = True
    blocker = m.blocker()
    assert m.load(A) == 0
    m.take()
    assert m.write("lp_a/enabled", b"0\n") == 2
    assert m.state("lp_a") == (0, 1)
    assert m.take() == [
        "livepatch: 'lp_a': reversing transition from patching to unpatching",
        "livepatch: 'lp_a': starting unpatching transition",
    ]
    # The blocker never switched: it is already in the unpatched state, so the
    # reversed transition completes at the next retry.
    assert blocker.patch_state == 0
    await settle(1.5)
    assert m.state("lp_a") == (0, 0)
    assert m.take_lp() == [
        "livepatch: 'lp_a': completing unpatching transition",
        "livepatch: 'lp_a': unpatching complete",
    ]


async def test_reversal_not_refused_by_own_transition(m, autojump_clock):
    """§2.4 step 4 / §13.2: writing the opposite value to the transition patch
    reverses it; the "a patch is in transition" EBUSY of enable/disable does not
    apply, and a successor registered after it does not matter."""
    m.blocker()
    assert m.load(A) == 0
    assert m.register_only(B) == 0
    assert m.write("lp_a/enabled", b"0") == 1
    assert m.state("lp_a") == (0, 1)
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.state("lp_a") == (1, 1)


# ---------------------------------------------------------------------------
# A enabled, idle
# ---------------------------------------------------------------------------

async def test_enabled_write1_einval(m, autojump_clock):
    """§2.4 [enabled, write 1]: EINVAL."""
    await enabled_idle(m, A)
    m.take()
    assert m.write("lp_a/enabled", b"1") == -errno.EINVAL
    assert m.state("lp_a") == (1, 0)
    assert m.take() == []


async def test_enabled_write0_other_in_transition_ebusy(m, autojump_clock):
    """§2.4 [enabled, write 0]: EBUSY if another patch is in transition.  B is
    after A and unpatching (enabled 0), so the successor rule alone would allow it."""
    await enabled_idle(m, A, B)
    m.blocker()
    assert m.write("lp_b/enabled", b"0") == 1
    assert m.state("lp_b") == (0, 1)
    m.take()
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
    assert m.state("lp_a") == (1, 0)
    assert m.take() == []


async def test_enabled_write0_successor_enabled_ebusy(m, autojump_clock):
    """§2.4 [enabled, write 0]: EBUSY if the successor in the list is enabled."""
    await enabled_idle(m, A, B)
    m.take()
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
    assert m.state("lp_a") == (1, 0)
    assert m.take() == []


async def test_enabled_write0_success(m, autojump_clock):
    """§2.4 [enabled, write 0]: disable starts; byte count returned."""
    await enabled_idle(m, A, B)
    assert m.write("lp_b/enabled", b"0\n") == 2
    assert m.state("lp_b") == (0, 1)
    await settle()
    assert m.state("lp_b") == (0, 0)
    assert m.write("lp_a/enabled", b"0\n") == 2     # successor now disabled
    await settle()
    assert m.state("lp_a") == (0, 0)


# ---------------------------------------------------------------------------
# A in an unpatching transition
# ---------------------------------------------------------------------------

async def test_unpatching_write1_reverses(m, autojump_clock):
    """§2.4 [unpatching, write 1] / §8.9: success, reversed to patching,
    `enabled` becomes 1; completes on the retry work."""
    await enabled_idle(m, A)
    blocker = m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    m.take()
    assert m.write("lp_a/enabled", b"1") == 1
    assert m.state("lp_a") == (1, 1)
    assert m.take() == [
        "livepatch: 'lp_a': reversing transition from unpatching to patching",
        "livepatch: 'lp_a': starting patching transition",
    ]
    assert blocker.patch_state == 1
    await settle(1.5)
    assert m.state("lp_a") == (1, 0)
    assert m.take_lp() == [
        "livepatch: 'lp_a': completing patching transition",
        "livepatch: 'lp_a': patching complete",
    ]


async def test_unpatching_write0_einval(m, autojump_clock):
    """§2.4 [unpatching, write 0]: EINVAL."""
    await enabled_idle(m, A)
    m.blocker()
    assert m.write("lp_a/enabled", b"0") == 1
    m.take()
    assert m.write("lp_a/enabled", b"0") == -errno.EINVAL
    assert m.state("lp_a") == (0, 1)
    assert m.take() == []


async def test_reversal_any_number_of_times(m, autojump_clock):
    """§8.9: a transition can be reversed any number of times; each flips
    `enabled` and prints the direction it reverses from."""
    m.blocker()
    assert m.load(A) == 0
    m.take()
    for i in range(3):
        assert m.write("lp_a/enabled", b"0") == 1
        assert m.state("lp_a") == (0, 1)
        assert m.write("lp_a/enabled", b"1") == 1
        assert m.state("lp_a") == (1, 1)
    assert m.take() == [
        "livepatch: 'lp_a': reversing transition from patching to unpatching",
        "livepatch: 'lp_a': starting unpatching transition",
        "livepatch: 'lp_a': reversing transition from unpatching to patching",
        "livepatch: 'lp_a': starting patching transition",
    ] * 3


# ---------------------------------------------------------------------------
# Not registered, stacking by registration order
# ---------------------------------------------------------------------------

async def test_write_to_unregistered_patch_einval(m, autojump_clock):
    """§2.4 step 2: a store reaching a patch that is no longer registered (race
    with unregistration) is EINVAL; a parse error is still EINVAL too."""
    assert m.register_only(A) == 0
    store = m.lp_node("lp_a/enabled").store
    assert m.rmmod("lp_a") == 0
    assert store(b"1\n") == -errno.EINVAL
    assert store(b"0\n") == -errno.EINVAL


async def test_stacking_uses_registration_order(m, autojump_clock):
    """§2.4: stacking follows the registered list, not the order patches were
    first enabled.  A and B enabled in order, then both disabled; A is
    re-registered (rmmod + insmod), so the list is now B, A: A cannot be
    enabled before B."""
    await enabled_idle(m, A, B)
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.rmmod("lp_a") == 0
    m.take()
    # insmod of A: its init enables, which fails EBUSY (predecessor B disabled)
    assert m.load(A) == -errno.EBUSY
    assert m.lp_node("lp_a") is None
    assert m.register_only(A) == 0
    assert [p.name for p in m.lp.klp_patches] == ["lp_b", "lp_a"]
    assert m.write("lp_a/enabled", b"1") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"1") == 1
    await settle()
    assert m.write("lp_a/enabled", b"1") == 1
    await settle()
    # and now B (first) cannot be disabled while A (after it) is enabled
    assert m.write("lp_b/enabled", b"0") == -errno.EBUSY
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert m.write("lp_b/enabled", b"0") == 1


async def test_stacking_three_patches(m, autojump_clock):
    """§2.4: only the first disabled patch can be enabled; only the last enabled
    one can be disabled."""
    for s in (A, B, C):
        assert m.register_only(s) == 0
    assert m.write("lp_c/enabled", b"1") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"1") == -errno.EBUSY
    assert m.write("lp_a/enabled", b"1") == 1
    await settle()
    assert m.write("lp_c/enabled", b"1") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"1") == 1
    await settle()
    assert m.write("lp_c/enabled", b"1") == 1
    await settle()
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"0") == -errno.EBUSY
    assert m.write("lp_c/enabled", b"0") == 1
    await settle()
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
    assert m.write("lp_b/enabled", b"0") == 1
    await settle()
    assert m.write("lp_a/enabled", b"0") == 1
    await settle()
    assert [m.state(p) for p in ("lp_a", "lp_b", "lp_c")] == [(0, 0)] * 3


async def test_livepatch_dir_holds_only_patch_dirs(m, autojump_clock):
    """§2.1: /sys/kernel/livepatch is 0755 and empty with no patches; it then
    holds exactly one directory per registered patch."""
    root = m.node(LP)
    assert root.mode & 0o7777 == 0o755 and root.is_dir
    assert list(root.children) == []
    assert m.register_only(A) == 0
    assert m.register_only(B) == 0
    assert sorted(root.children) == ["lp_a", "lp_b"]
    assert all(node.is_dir for node in root.children.values())


async def test_enabled_write_same_value_during_other_transition(m, autojump_clock):
    """§2.4 step 3 precedes the transition check: writing 1 to an enabled patch
    while another patch is in transition is EINVAL (not EBUSY)."""
    await enabled_idle(m, A)
    m.blocker()
    assert m.load(B) == 0
    assert m.state("lp_b") == (1, 1)
    assert m.write("lp_a/enabled", b"1") == -errno.EINVAL
    assert m.write("lp_a/enabled", b"0") == -errno.EBUSY
