"""§9 message catalogue: every message the stories can produce is printed with
the catalogue's level, and every catalogue entry reachable in the emulator is
reached by these stories."""

from __future__ import annotations

import errno
import re

from klpfs.kernel.ftrace import FTRACE_OPS_FL_IPMODIFY, FtraceOps
from klpfs.kernel.printk import KERN_DEBUG, KERN_ERR, KERN_INFO, KERN_NOTICE, KERN_WARNING

from .conftest import demo_callbacks, settle, spec, target_module

# (catalogue number, level, regex of the text after "livepatch: ")
CATALOGUE = [
    (1, KERN_ERR, r"symbol '[^']+' not found in symbol table"),
    (2, KERN_ERR, r"unresolvable ambiguity for symbol '[^']+' in object '[^']+'"),
    (3, KERN_ERR, r"symbol position \d+ for symbol '[^']+' in object '[^']+' not found"),
    (7, KERN_NOTICE, r"enabling patch '[^']+'"),
    (8, KERN_WARNING, r"pre-patch callback failed for object '[^']+'"),
    (9, KERN_WARNING, r"failed to patch object '[^']+'"),
    (10, KERN_WARNING, r"failed to enable patch '[^']+'"),
    (13, KERN_ERR, r"module \S+ is not marked as a livepatch module"),
    (14, KERN_ERR, r"This architecture doesn't have support for the livepatch consistency model\."),
    (15, KERN_NOTICE, r"reverting patch '[^']+' on unloading module '[^']+'"),
    (16, KERN_WARNING, r"failed to initialize patch '[^']+' for module '[^']+' \(-\d+\)"),
    (17, KERN_NOTICE, r"applying patch '[^']+' to loading module '[^']+'"),
    (18, KERN_WARNING, r"failed to apply patch '[^']+' to module '[^']+' \(-\d+\)"),
    (19, KERN_WARNING, r"patch '[^']+' failed for module '[^']+', refusing to load module '[^']+'"),
    (21, KERN_ERR, r"failed to find location for function '[^']+'"),
    (23, KERN_ERR, r"failed to register ftrace handler for function '[^']+' \(-\d+\)"),
    (24, KERN_DEBUG, r"'[^']+': completing (un)?patching transition"),
    (25, KERN_NOTICE, r"'[^']+': (un)?patching complete"),
    (26, KERN_DEBUG, r"'[^']+': canceling patching transition, going to unpatch"),
    (27, KERN_DEBUG, r"klp_check_stack: .+:\d+ has an unreliable stack"),
    (28, KERN_DEBUG, r"klp_check_stack: .+:\d+ is sleeping on function \S+"),
    (29, KERN_DEBUG, r"klp_try_switch_task: .+:\d+ is running"),
    (30, KERN_NOTICE, r"'[^']+': starting (un)?patching transition"),
    (31, KERN_DEBUG, r"'[^']+': initializing (un)?patching transition"),
    (32, KERN_DEBUG, r"'[^']+': reversing transition from (patching to unpatching|unpatching to patching)"),
    (33, KERN_NOTICE, r"signaling remaining tasks"),
    (34, KERN_WARNING, r"forcing remaining tasks to the patched state"),
]
OTHER = [
    ("taint", KERN_NOTICE, r"\S+: tainting kernel with TAINT_LIVEPATCH"),
    ("bypass", KERN_NOTICE, r"\S+: The consistency model isn't supported for your architecture\.  "
                            r"Bypassing safety mechanisms and applying the patch immediately\."),
    ("sysfs", KERN_WARNING, r"sysfs: cannot create duplicate filename '\S+'"),
    ("kobject", KERN_ERR, r"kobject_add_internal failed for \S+ with -EEXIST, don't try to register "
                          r"things with the same name in the same directory\."),
]


def classify(text: str):
    if text.startswith("livepatch: "):
        body = text[len("livepatch: "):]
        for num, level, rx in CATALOGUE:
            if re.fullmatch(rx, body):
                return num, level
        return None
    for name, level, rx in OTHER:
        if re.fullmatch(rx, text):
            return name, level
    return "foreign"


async def story_415(m) -> None:
    from klpfs.livepatch.structs import KlpObject, KlpPatch
    cb = lambda rets: {None: demo_callbacks(m.printk, pre_patch_ret=rets)}  # noqa: E731
    m.load(spec("notlp", livepatch=False))                                           # 13
    m.register_only(spec("lp_nf", {None: ["nope"]}))                                 # 1
    m.register_only(spec("lp_amb", {None: ["type_show"]}))                           # 2
    m.register_only(spec("lp_pos", {None: [("type_show", 9)]}))                      # 3
    m.load(spec("lp_pre", callbacks=cb({"vmlinux": -errno.ENODEV})))                 # 7 8 10 26 24 25 31
    m.load(spec("lp_loc", {None: ["__schedule"]}))                                   # 9 21
    other = FtraceOps(lambda ip, task: None, FTRACE_OPS_FL_IPMODIFY)
    m.kernel.ftrace.set_filter_ip(other, m.sym("meminfo_proc_show").addr)
    m.kernel.ftrace.register_ftrace_function(other)
    m.load(spec("lp_busy", {None: ["meminfo_proc_show"]}))                           # 23
    spin = m.blocker()
    unrel = m.kthread("unrel")
    unrel.reliable_stack = False
    m.sleeper("cmdline_proc_show", comm="sl")
    m.load(spec("lp_ok", {None: ["cmdline_proc_show"], "tmod": ["tfunc"]}))          # 27 28 29 30
    m.write("lp_ok/enabled", b"0")                                                   # 32
    m.write("lp_ok/enabled", b"1")
    m.sched.rest(spin)
    unrel.reliable_stack = True
    for t in list(m.sched.tasks.values()):
        if t.comm == "sl":
            m.sched.wake(t)
    await settle()
    m.load(target_module("tmod", ["tfunc"]))                                         # 17
    m.rmmod("tmod")                                                                  # 15
    m.register_only(spec("lp_bad", {"tmod2": ["nope"]}))
    m.load(target_module("tmod2", ["tfunc"]))                                        # 16 19
    m.rmmod("lp_bad")
    assert m.load(spec("lp_nt", {"tmod3": ["tfunc"]})) == 0
    await settle()
    m.load(target_module("tmod3", ["tfunc"], notrace=("tfunc",)))                    # 18
    mod = m.module("lp_ok")
    p2 = KlpPatch(mod, [KlpObject(None, [m.patch("lp_ok").objs[0].funcs[0]])])
    m.lp.klp_register_patch(p2)                                                      # sysfs/kobject


async def test_levels_415(boot, autojump_clock):
    """§9: every livepatch line has the catalogue's level; 4.15 stories reach
    entries 1-3, 7-10, 13, 15-19, 21, 23-32."""
    m = boot("4.15")
    await story_415(m)
    m2 = boot("4.15", reliable_stacks=False)
    m2.register_only(spec("lp_arch"))                                                # 14
    m2.load(spec("lp_byp"))                                                          # bypass
    seen = set()
    for mm in (m, m2):
        for r in mm.records():
            kind = classify(r.text)
            assert kind is not None, f"unknown livepatch message: {r.text!r}"
            if kind == "foreign":
                assert r.level == KERN_INFO, r
                continue
            key, level = kind
            assert r.level == level, f"{r.text!r}: level {r.level}, catalogue says {level}"
            seen.add(key)
    want = {1, 2, 3, 7, 8, 9, 10, 13, 14, 15, 16, 17, 18, 19, 21, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
            "taint", "bypass", "sysfs", "kobject"}
    assert want - seen == set()


async def test_levels_416(m16, autojump_clock):
    """§9 entries 33 (notice) and 34 (warn), v4.16."""
    m = m16
    m.blocker()
    assert m.load(spec("lp_a")) == 0
    assert m.write("lp_a/signal", b"1") == 1
    assert m.write("lp_a/force", b"1") == 1
    got = {r.text: r.level for r in m.records()}
    assert got["livepatch: signaling remaining tasks"] == KERN_NOTICE
    assert got["livepatch: forcing remaining tasks to the patched state"] == KERN_WARNING


async def test_every_line_prefixed(m, autojump_clock):
    """§0: every message from the livepatch core starts with "livepatch: " (no
    catalogue text appears without the prefix)."""
    await story_415(m)
    for r in m.records():
        if r.text.startswith("livepatch: "):
            continue
        assert not any(re.fullmatch(rx, r.text) for _, _, rx in CATALOGUE), r.text
        assert not any(re.search(rx, r.text) for _, _, rx in CATALOGUE[3:]), r.text
