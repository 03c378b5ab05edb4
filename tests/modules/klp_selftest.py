"""The kernel's livepatch selftest scripts (functions.sh), replayed on an
emulated machine with the shipped Python transliterations of their modules.

`Selftest` has one method per functions.sh helper the scripts use
(load_mod, load_lp, disable_lp, ...).  Each logs what the helper logs
(`echo "..." > /dev/kmsg`) at the same point and waits the way the helper
does, by polling sysfs every RETRY_INTERVAL for at most MAX_RETRIES tries:
under the MockClock a poll is a `trio.sleep`.  `check_result` selects the
new kernel log lines the way the script's check_result does.

Two script trees are replayed: "6.1" (modprobe, the modules installed) and
"6.12" (insmod of test_modules/<mod>.ko, a canary line marking the start of
a test).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest
import trio

from klpfs.kernel.printk import KERN_WARNING
from klpfs.sysfs.kernfs import Kernfs

from profiles.conftest import Machine, make_machine
from upstream import expected_result, selftests

MAX_RETRIES = 600
RETRY_INTERVAL = 0.1
"""functions.sh's loop_until: 600 tries, 0.1 s apart."""

KLP_SYSFS_DIR = "sys/kernel/livepatch"

# check_result: the lines that matter are the livepatch core's and the test
# modules'; the loader's taint notices are left out.
WANTED = re.compile(r"livepatch:|test_klp")
UNWANTED = re.compile(r"(tainting|taints) kernel")

DYNAMIC_DEBUG_CONTROL = "sys/kernel/debug/dynamic_debug/control"
SET_DYNAMIC_DEBUG = "file kernel/livepatch/* +p\nfunc klp_try_switch_task -p\n"
"""functions.sh's set_dynamic_debug: the core's debug lines, without the per-task
ones ("... is running", "... is sleeping on function ...") of klp_try_switch_task."""

RUNS = [("6.1", "6.1"), ("6.1", "6.14"), ("6.12", "6.12"), ("6.12", "6.14")]
"""(script tree, kernel profile) pairs a case is replayed on."""


def rfc3339_ns(seconds: float) -> str:
    """`date --rfc-3339=ns` of a time in seconds since the epoch."""
    ns = round(seconds * 1_000_000_000)
    when = datetime.fromtimestamp(ns // 1_000_000_000, timezone.utc)
    return f"{when:%Y-%m-%d %H:%M:%S}.{ns % 1_000_000_000:09d}+00:00"


def run_id(run: tuple[str, str]) -> str:
    tree, profile = run
    return f"{tree}-tree-on-{profile}"


class Died(AssertionError):
    """functions.sh's die(): the script stops with this message."""


class Selftest:
    """One replay of a selftest script on a fresh machine of `profile`."""

    def __init__(self, nursery: trio.Nursery, tree: str, profile: str, script: str):
        self.tree = tree
        self.profile = profile
        self.script = selftests(tree) / script
        self.m: Machine = make_machine(nursery, profile)
        self.mark = 0
        self.title = ""
        self.saved_dynamic_debug = self.push_config()
        self.set_dynamic_debug()

    # -- setup_config --------------------------------------------------------------
    def push_config(self) -> str:
        """`grep '^kernel/livepatch' control | awk -F'[: ]' '{print "file " $1 " line " $2 " " $4}'`:
        the queries that put the core's callsites back as they are now."""
        node = self.m.node(DYNAMIC_DEBUG_CONTROL)
        assert node is not None
        data = Kernfs.read(node)
        assert isinstance(data, bytes), data
        lines = []
        for line in data.decode().splitlines():
            if line.startswith("kernel/livepatch"):
                fields = re.split("[: ]", line)
                lines.append(f"file {fields[0]} line {fields[1]} {fields[3]}")
        return "\n".join(lines)

    def set_dynamic_debug(self) -> None:
        """`cat <<-EOF > control` of the two queries."""
        node = self.m.node(DYNAMIC_DEBUG_CONTROL)
        assert node is not None
        data = SET_DYNAMIC_DEBUG.encode()
        assert Kernfs.write(node, data) == len(data)

    # -- the kernel log ------------------------------------------------------------
    def log(self, msg: str) -> None:
        """`echo "$msg" > /dev/kmsg`: a record at the default message loglevel (4)."""
        self.m.kernel.printk(KERN_WARNING, msg)

    def die(self, msg: str) -> None:
        self.log(f"ERROR: {msg}")
        raise Died(msg)

    def start_test(self, title: str) -> None:
        """Marks where the test's log lines begin, then logs the test's title."""
        self.title = title
        if self.tree == "6.1":
            # save_dmesg: everything printed from now on is new.
            self.mark = self._next_seq()
        else:
            # A unique canary line; the test's lines are the ones after it.
            self.log(f"livepatch kselftest timestamp: {rfc3339_ns(trio.current_time())}")
            self.mark = self._next_seq()
        self.log(f"===== TEST: {title} =====")

    def _next_seq(self) -> int:
        """The sequence number the next log record will have."""
        records = self.m.kernel.log.records
        return records[-1].seq + 1 if records else 0

    def result(self) -> list[str]:
        """check_result's $result: the new lines, filtered as the script filters them."""
        return [r.text for r in self.m.kernel.log.records
                if r.seq >= self.mark and WANTED.search(r.text) and not UNWANTED.search(r.text)]

    def expected(self, title: str | None = None) -> list[str]:
        return expected_result(self.script, title or self.title)

    def check_result(self) -> None:
        """The log since start_test equals the script's check_result text, line for line."""
        assert self.result() == self.expected()

    # -- waiting -----------------------------------------------------------------------
    async def loop_until(self, cond: Callable[[], bool | Awaitable[bool]], failure: str) -> None:
        """loop_until: retry the condition every RETRY_INTERVAL; die after MAX_RETRIES."""
        for _ in range(MAX_RETRIES + 1):
            ok = cond()
            if not isinstance(ok, bool):
                ok = await ok
            if ok:
                return
            await trio.sleep(RETRY_INTERVAL)
        self.die(failure)

    # -- sysfs and /proc ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.m.node(path) is not None

    def cat(self, path: str) -> str:
        """A sysfs or /proc file's text, read through the kernfs tree."""
        node = self.m.node(path)
        assert node is not None, f"/{path} does not exist"
        data = Kernfs.read(node, 0, 4096)
        assert isinstance(data, bytes), f"reading /{path}: error {data}"
        return data.decode()

    def echo(self, value: str, path: str) -> None:
        """`echo value > /path`: the value and a newline, written to the attribute."""
        node = self.m.node(path)
        assert node is not None, f"/{path} does not exist"
        ret = Kernfs.write(node, f"{value}\n".encode())
        if ret < 0:
            self.die(f"echo {value} > /{path}: error {ret}")

    async def proc(self, func: str) -> str:
        """`cat /proc/<file>` of a kernel /proc file: its show function, called by the shell."""
        reply = await self.m.ctl("call", func=func, pid=None)
        assert reply["ok"], reply
        return reply["output"]

    async def cat_cmdline(self) -> str:
        """`$(cat /proc/cmdline)`: the output without its trailing newlines."""
        return (await self.proc("cmdline_proc_show")).rstrip("\n")

    async def grep_to_kmsg(self, pattern: str, func: str) -> None:
        """`grep 'pattern' /proc/<file> > /dev/kmsg`: each matching line becomes a record."""
        for line in (await self.proc(func)).splitlines():
            if pattern in line:
                self.log(line)

    # -- modules -----------------------------------------------------------------------
    def _command(self, mod: str, params: tuple[str, ...]) -> str:
        tool = f"modprobe {mod}" if self.tree == "6.1" else f"insmod test_modules/{mod}.ko"
        return " ".join(("%", tool, *params))

    def _tool_error(self, mod: str, reply: dict[str, Any]) -> str:
        """What modprobe (6.1) or insmod (6.12) prints when the kernel refuses the module."""
        if self.tree == "6.1":
            return f"modprobe: ERROR: could not insert '{mod}': {reply['error']}"
        return f"insmod: ERROR: could not insert module test_modules/{mod}.ko: {reply['error']}"

    async def _insmod(self, mod: str, params: tuple[str, ...]) -> dict[str, Any]:
        self.log(self._command(mod, params))
        return await self.m.insmod(mod, *params)

    async def _load_mod(self, mod: str, params: tuple[str, ...]) -> None:
        reply = await self._insmod(mod, params)
        if not reply["ok"]:
            self.die(self._tool_error(mod, reply))
        await self.loop_until(lambda: self.exists(f"sys/module/{mod}"), f"failed to load module {mod}")

    async def load_mod(self, mod: str, *params: str) -> None:
        await self._load_mod(mod, params)

    async def load_lp_nowait(self, mod: str, *params: str) -> None:
        await self._load_mod(mod, params)
        await self.loop_until(lambda: self.exists(f"{KLP_SYSFS_DIR}/{mod}"), f"failed to load module {mod} (sysfs)")

    async def load_lp(self, mod: str, *params: str) -> None:
        await self.load_lp_nowait(mod, *params)
        await self.wait_transition(mod, "0", "failed to complete transition")

    async def wait_transition(self, mod: str, value: str, failure: str) -> None:
        """loop_until 'grep -q ^value$ /sys/kernel/livepatch/<mod>/transition'."""
        await self.loop_until(lambda: self.exists(f"{KLP_SYSFS_DIR}/{mod}/transition")
                              and self.cat(f"{KLP_SYSFS_DIR}/{mod}/transition") == f"{value}\n", failure)

    async def load_failing_mod(self, mod: str, *params: str) -> None:
        reply = await self._insmod(mod, params)
        if reply["ok"]:
            self.die(f"{mod} unexpectedly loaded")
        self.log(self._tool_error(mod, reply))

    async def unload_mod(self, mod: str) -> None:
        await self.loop_until(lambda: self.cat(f"sys/module/{mod}/refcnt") == "0\n",
                              f"failed to unload module {mod} (refcnt)")
        self.log(f"% rmmod {mod}")
        reply = await self.m.rmmod_ctl(mod)
        if not reply["ok"]:
            self.die(f"rmmod: ERROR: {reply['error']}")
        await self.loop_until(lambda: not self.exists(f"sys/module/{mod}"),
                              f"failed to unload module {mod} (/sys/module)")

    async def unload_lp(self, mod: str) -> None:
        await self.unload_mod(mod)

    async def disable_lp(self, mod: str) -> None:
        self.log(f"% echo 0 > /sys/kernel/livepatch/{mod}/enabled")
        self.echo("0", f"{KLP_SYSFS_DIR}/{mod}/enabled")
        # Wait until the transition finishes and the livepatch is gone from sysfs.
        await self.loop_until(lambda: not self.exists(f"{KLP_SYSFS_DIR}/{mod}"), f"failed to disable livepatch {mod}")

    async def set_pre_patch_ret(self, mod: str, ret: str) -> None:
        path = f"sys/module/{mod}/parameters/pre_patch_ret"
        self.log(f"% echo {ret} > /{path}")
        self.echo(ret, path)
        await self.loop_until(lambda: self.cat(path) == f"{ret}\n",
                              f"failed to set pre_patch_ret parameter for {mod} module")

    def livepatches(self) -> list[str]:
        """`/sys/kernel/livepatch/*`."""
        node = self.m.node(KLP_SYSFS_DIR)
        assert node is not None and node.children is not None
        return sorted(node.children)


def runs() -> Any:
    """Parametrize a case over RUNS."""
    return pytest.mark.parametrize("run", RUNS, ids=run_id)
