"""The real modules the ELF tests load: C sources, built once per run by elf.build.

Five modules, written for these tests (not taken from the kernel's samples),
each exercising one thing a .ko loader has to read from the ELF file:

* klpfs-ko-cmdline   -- a livepatch of cmdline_proc_show whose replacement
                        seq_printf()s a literal (the simplest patch there is);
* klpfs-ko-callbacks -- a livepatch with the four object callbacks and an int
                        parameter that pre_patch returns (0 by default), so a
                        load with pre_patch_ret=-19 fails the way the kernel does;
* klpfs-ko-replace   -- an atomic-replace patch (.replace = true) of
                        meminfo_proc_show;
* klpfs-ko-target    -- an ordinary module with a function to patch;
* klpfs-ko-twoobj    -- a patch of two objects: vmlinux's second type_show
                        (old_sympos = 2: the emulated image has three) and
                        klpfs-ko-target's function.

Build failures and missing build tools fail the tests that need the modules
(`KLPFS_KBUILD_OPTIONAL=1` turns the latter into skips, for machines without
apt); the build's timings are printed in the session's summary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from elf import build

CMDLINE_TEXT = "klpfs-ko-cmdline: this has been live patched by a real .ko"
MEMINFO_TEXT = "klpfs-ko-replace: meminfo replaced by a real .ko"
TYPE_SHOW_TEXT = "klpfs-ko-twoobj: patched type_show"
TARGET_ORIGINAL = "klpfs-ko-target: original message"
TARGET_PATCHED = "klpfs-ko-twoobj: patched message"

_HEADER = """\
// SPDX-License-Identifier: GPL-2.0
// Written for klpfs's tests: built against Debian's 6.1 headers and loaded into the emulator.
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt
#include <linux/kernel.h>
#include <linux/module.h>
"""

CMDLINE_C = _HEADER + f"""\
#include <linux/livepatch.h>
#include <linux/seq_file.h>

/* Takes the place of fs/proc/cmdline.c's cmdline_proc_show(). */
static int klpfs_cmdline_proc_show(struct seq_file *m, void *v)
{{
	seq_printf(m, "%s\\n", "{CMDLINE_TEXT}");
	return 0;
}}

static struct klp_func funcs[] = {{
	{{ .old_name = "cmdline_proc_show", .new_func = klpfs_cmdline_proc_show, }},
	{{ }}
}};

static struct klp_object objs[] = {{
	{{ /* name NULL: vmlinux */ .funcs = funcs, }},
	{{ }}
}};

static struct klp_patch patch = {{
	.mod = THIS_MODULE,
	.objs = objs,
}};

static int __init klpfs_cmdline_init(void)
{{
	return klp_enable_patch(&patch);
}}

static void __exit klpfs_cmdline_exit(void)
{{
}}

module_init(klpfs_cmdline_init);
module_exit(klpfs_cmdline_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("klpfs tests");
MODULE_DESCRIPTION("Live patch of cmdline_proc_show, built for klpfs");
MODULE_INFO(livepatch, "Y");
"""

CALLBACKS_C = _HEADER + """\
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int pre_patch_ret;
module_param(pre_patch_ret, int, 0644);
MODULE_PARM_DESC(pre_patch_ret, "What the pre_patch callback returns (default 0)");

static int klpfs_version_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\\n", "klpfs-ko-callbacks: version");
	return 0;
}

static int pre_patch(struct klp_object *obj)
{
	pr_info("pre_patch_callback: returning %d\\n", pre_patch_ret);
	return pre_patch_ret;
}

static void post_patch(struct klp_object *obj)
{
	pr_info("post_patch_callback\\n");
}

static void pre_unpatch(struct klp_object *obj)
{
	pr_info("pre_unpatch_callback\\n");
}

static void post_unpatch(struct klp_object *obj)
{
	pr_info("post_unpatch_callback\\n");
}

static struct klp_func funcs[] = {
	{ .old_name = "version_proc_show", .new_func = klpfs_version_proc_show, },
	{ }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
		.callbacks = {
			.pre_patch = pre_patch,
			.post_patch = post_patch,
			.pre_unpatch = pre_unpatch,
			.post_unpatch = post_unpatch,
		},
	},
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int __init klpfs_callbacks_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit klpfs_callbacks_exit(void)
{
}

module_init(klpfs_callbacks_init);
module_exit(klpfs_callbacks_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("klpfs tests");
MODULE_DESCRIPTION("Live patch with object callbacks; pre_patch returns a parameter");
MODULE_INFO(livepatch, "Y");
"""

REPLACE_C = _HEADER + f"""\
#include <linux/livepatch.h>
#include <linux/seq_file.h>

static int klpfs_meminfo_proc_show(struct seq_file *m, void *v)
{{
	seq_printf(m, "%s\\n", "{MEMINFO_TEXT}");
	return 0;
}}

static struct klp_func funcs[] = {{
	{{ .old_name = "meminfo_proc_show", .new_func = klpfs_meminfo_proc_show, }},
	{{ }}
}};

static struct klp_object objs[] = {{
	{{ .funcs = funcs, }},
	{{ }}
}};

/* Replaces every patch enabled before it: what they patched and this does not reverts. */
static struct klp_patch patch = {{
	.mod = THIS_MODULE,
	.objs = objs,
	.replace = true,
}};

static int __init klpfs_replace_init(void)
{{
	return klp_enable_patch(&patch);
}}

static void __exit klpfs_replace_exit(void)
{{
}}

module_init(klpfs_replace_init);
module_exit(klpfs_replace_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("klpfs tests");
MODULE_DESCRIPTION("Atomic replace patch of meminfo_proc_show");
MODULE_INFO(livepatch, "Y");
"""

TARGET_C = _HEADER + f"""\
/* Global so the compiler keeps it whole, with its ftrace call site: a patch target. */
noinline const char *klpfs_target_message(void)
{{
	return "{TARGET_ORIGINAL}";
}}

static int __init klpfs_target_init(void)
{{
	pr_info("%s\\n", klpfs_target_message());
	return 0;
}}

static void __exit klpfs_target_exit(void)
{{
	pr_info("%s\\n", klpfs_target_message());
}}

module_init(klpfs_target_init);
module_exit(klpfs_target_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("klpfs tests");
MODULE_DESCRIPTION("An ordinary module with a function to live patch");
"""

TWOOBJ_C = _HEADER + f"""\
#include <linux/kobject.h>
#include <linux/livepatch.h>
#include <linux/sysfs.h>

/* One of vmlinux's several static type_show() functions: the second in kallsyms order. */
static ssize_t klpfs_type_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{{
	return sysfs_emit(buf, "%s\\n", "{TYPE_SHOW_TEXT}");
}}

static const char *klpfs_target_message(void)
{{
	return "{TARGET_PATCHED}";
}}

static struct klp_func vmlinux_funcs[] = {{
	{{ .old_name = "type_show", .new_func = klpfs_type_show, .old_sympos = 2, }},
	{{ }}
}};

static struct klp_func target_funcs[] = {{
	{{ .old_name = "klpfs_target_message", .new_func = klpfs_target_message, }},
	{{ }}
}};

static struct klp_object objs[] = {{
	{{ .funcs = vmlinux_funcs, }},
	{{ .name = "klpfs_ko_target", .funcs = target_funcs, }},
	{{ }}
}};

static struct klp_patch patch = {{
	.mod = THIS_MODULE,
	.objs = objs,
}};

static int __init klpfs_twoobj_init(void)
{{
	return klp_enable_patch(&patch);
}}

static void __exit klpfs_twoobj_exit(void)
{{
}}

module_init(klpfs_twoobj_init);
module_exit(klpfs_twoobj_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("klpfs tests");
MODULE_DESCRIPTION("Live patch of vmlinux and of the klpfs-ko-target module");
MODULE_INFO(livepatch, "Y");
"""

SOURCES: dict[str, str] = {
    "klpfs-ko-cmdline": CMDLINE_C,
    "klpfs-ko-callbacks": CALLBACKS_C,
    "klpfs-ko-replace": REPLACE_C,
    "klpfs-ko-target": TARGET_C,
    "klpfs-ko-twoobj": TWOOBJ_C,
}
"""File stem -> C source; the .ko's module name is the stem with '-' as '_'."""


def module_name(stem: str) -> str:
    return stem.replace("-", "_")


@pytest.fixture(scope="session")
def kos() -> dict[str, Path]:
    """Every fixture module built (or taken from the cache): stem -> .ko path."""
    try:
        return build.build_modules(SOURCES)
    except build.KbuildUnavailable as e:
        if os.environ.get("KLPFS_KBUILD_OPTIONAL") == "1":
            pytest.skip(f"cannot build kernel modules here: {e}")
        raise


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """CI logs show what building the modules cost in this run."""
    t = build.TIMINGS
    if t.download or t.extract or t.build or t.cached:
        terminalreporter.write_line(f"klpfs .ko fixtures ({build.RELEASE} headers): {t.summary()}")
