"""--json of ps, lsmod, dmesg, task, call and status: the documented keys (docs/cli.md),
and the values the text output shows, through the CLI against a real mount."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from fusemount import DEADLINE, KLPFS, Mount, wait_until
from test_commands import LP, klpfs, m, ok, read  # noqa: F401

DOCS = Path(__file__).resolve().parents[2] / "docs/cli.md"
TASK_KEYS = ["pid", "comm", "kind", "state", "patch_state", "where"]
RECORD_KEYS = ["seq", "level", "facility", "time", "text"]
STACK = ["[<0>] msleep+0x18/0x30", "[<0>] cmdline_proc_show+0x15/0x2a", "[<0>] kthread+0x9c/0x138",
         "[<0>] ret_from_fork+0x1a/0x35"]


def as_json(m: Mount, *args: str) -> Any:
    return json.loads(ok(m, *args, "--json"))


def test_ps(m: Mount) -> None:
    tasks = as_json(m, "ps")["tasks"]
    assert all(list(task) == TASK_KEYS for task in tasks)
    assert tasks[0] == {"pid": 0, "comm": "swapper/0", "kind": "idle", "state": "R", "patch_state": -1,
                        "where": "do_idle"}
    assert {"pid": 1, "comm": "systemd", "kind": "user", "state": "S", "patch_state": -1,
            "where": "ep_poll"} in tasks
    assert [t["pid"] for t in tasks] == [int(line.split()[0]) for line in ok(m, "ps").splitlines()[1:]]


def test_lsmod(m: Mount) -> None:
    assert as_json(m, "lsmod") == {"modules": []}
    ok(m, "insmod", "livepatch-sample")
    assert as_json(m, "lsmod") == {"modules": [{"name": "livepatch_sample", "size": 16384, "refcnt": 1}]}


def test_dmesg(m: Mount) -> None:
    ok(m, "insmod", "livepatch-sample")
    ok(m, "wait")  # nothing more is logged
    records = as_json(m, "dmesg")["records"]
    assert all(list(record) == RECORD_KEYS for record in records)
    assert [(r["level"], r["facility"], r["text"]) for r in records[:3]] == [
        ("notice", 0, "livepatch_sample: tainting kernel with TAINT_LIVEPATCH"),
        ("notice", 0, "livepatch: enabling patch 'livepatch_sample'"),
        ("notice", 0, "livepatch: 'livepatch_sample': starting patching transition")]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert ok(m, "dmesg").splitlines()[:3] == [f"[{r['time']:12.6f}] {r['text']}" for r in records[:3]]
    notices = as_json(m, "dmesg", "--level", "notice")["records"]
    assert notices == [r for r in records if r["level"] == "notice"]


def test_dmesg_follow_is_json_lines(m: Mount) -> None:
    follower = subprocess.Popen([*KLPFS, "dmesg", "-m", str(m.path), "-w", "--json"], stdout=subprocess.PIPE,
                                text=True)
    try:
        (m.path / "dev/kmsg").write_text("marker\n")
        assert follower.stdout is not None
        record = json.loads(follower.stdout.readline())
        assert list(record) == RECORD_KEYS
        # A /dev/kmsg write without a <N> prefix: LOG_USER at the default level, warning.
        assert (record["level"], record["facility"], record["text"]) == ("warn", 1, "marker")
    finally:
        follower.terminate()
        follower.wait(timeout=DEADLINE)


def test_task_actions(m: Mount) -> None:
    added = as_json(m, "task", "add", "holder", "--kthread")
    pid = added["task"]["pid"]
    assert added == {"task": {"pid": pid, "comm": "holder", "kind": "kthread", "state": "S", "patch_state": -1,
                              "where": "kthread"}}
    assert json.loads(ok(m, "task", "--json", "sleep", str(pid), "cmdline_proc_show")) == {
        "task": {"pid": pid, "comm": "holder", "kind": "kthread", "state": "D", "patch_state": -1,
                 "where": "cmdline_proc_show"},
        "impl": {"name": "cmdline_proc_show", "module": None}}
    assert as_json(m, "task", "wake", str(pid)) == {
        "task": {"pid": pid, "comm": "holder", "kind": "kthread", "state": "S", "patch_state": -1,
                 "where": "kthread"}}
    assert as_json(m, "task", "run", str(pid)) == {
        "task": {"pid": pid, "comm": "holder", "kind": "kthread", "state": "R", "patch_state": -1,
                 "where": "kthread"}}
    assert as_json(m, "task", "exit", str(pid)) == {"pid": pid}


def test_call(m: Mount) -> None:
    original = read(m, "proc/cmdline")
    assert as_json(m, "call", "cmdline_proc_show") == {
        "task": {"pid": 812, "comm": "bash", "kind": "user", "state": "S", "patch_state": -1,
                 "where": "do_wait"},
        "impl": {"name": "cmdline_proc_show", "module": None}, "output": original}
    ok(m, "insmod", "livepatch-sample")
    wait_until(lambda: read(m, f"{LP}/livepatch_sample/transition") == "0\n", "the transition")
    called = as_json(m, "call", "cmdline_proc_show")
    assert (called["impl"], called["output"]) == (
        {"name": "livepatch_cmdline_proc_show", "module": "livepatch_sample"}, "this has been live patched\n")


def test_status(m: Mount) -> None:
    idle = as_json(m, "status")
    assert list(idle) == ["kernel", "now", "speed", "patches", "transition"]
    assert (idle["kernel"], idle["speed"], idle["patches"], idle["transition"]) == ("4.15", 10.0, [], None)
    pid = int(ok(m, "task", "add", "holder", "--kthread"))
    ok(m, "task", "sleep", str(pid), "cmdline_proc_show")
    ok(m, "insmod", "livepatch-sample")
    held = as_json(m, "status")
    transition = held["transition"]
    assert held["patches"] == [{"name": "livepatch_sample", "enabled": True, "transition": True}]
    assert list(transition) == ["patch", "direction", "tasks", "switched", "attempts", "next_retry", "next_signal",
                                "blocking"]
    tasks = len(as_json(m, "ps")["tasks"])
    assert (transition["patch"], transition["direction"], transition["tasks"], transition["switched"],
            transition["next_signal"]) == ("livepatch_sample", "patching", tasks, tasks - 1, None)
    assert transition["next_retry"] > held["now"]
    assert transition["blocking"] == [
        {"task": {"pid": pid, "comm": "holder", "kind": "kthread", "state": "D", "patch_state": 0,
                  "where": "cmdline_proc_show"},
         "reason": "sleeping", "function": "cmdline_proc_show", "stack": STACK}]


def shape(value: Any) -> Any:
    """The keys of a JSON value, all the way down (a list by its first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def test_the_documented_status_is_the_real_one(m: Mount) -> None:
    documented = json.loads(re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S).group(1))
    pid = int(ok(m, "task", "add", "holder", "--kthread"))
    ok(m, "task", "sleep", str(pid), "cmdline_proc_show")
    ok(m, "insmod", "livepatch-sample")
    real = as_json(m, "status")
    assert shape(real) == shape(documented)
    assert real["transition"]["blocking"][0]["stack"] == documented["transition"]["blocking"][0]["stack"]
