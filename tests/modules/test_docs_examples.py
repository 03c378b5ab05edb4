"""The Python module examples in docs/modules.md load and do what the text says."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from profiles.conftest import Machine, autojump_clock, make_machine, settle  # noqa: F401

DOC = Path(__file__).parents[2] / "docs" / "modules.md"


def examples() -> dict[str, str]:
    text = DOC.read_text()
    return dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.S))


@pytest.fixture
async def m(nursery) -> Machine:
    return make_machine(nursery, "6.1", debug=False)


def test_the_doc_has_the_three_examples() -> None:
    assert sorted(examples()) == ["example_callbacks.py", "example_livepatch.py", "example_target.py"]


async def test_livepatch_example(m: Machine, autojump_clock) -> None:
    assert (await m.insmod_text("example_livepatch.py", examples()["example_livepatch.py"]))["ok"]
    assert m.take()[-1] == "example_livepatch: klp_enable_patch() returned 0"
    assert (await m.ctl("call", func="cmdline_proc_show", pid=None))["output"] == "this has been live patched\n"


async def test_target_and_callbacks_examples(m: Machine, autojump_clock) -> None:
    ex = examples()
    assert (await m.insmod_text("example_target.py", ex["example_target.py"]))["ok"]
    kthread = next(t for t in m.sched.tasks.values() if t.comm == "example_target")
    assert [s.name for s in m.sched.stack(kthread)][2:5] == ["example_target_thread", "example_target_wait", "msleep"]
    reply = await m.insmod_text("example_callbacks.py", ex["example_callbacks.py"], "fail_pre_patch=1")
    assert reply == {"ok": False, "errno": errno.ENODEV, "error": "No such device"}
    assert "livepatch: pre-patch callback failed for object 'example_target'" in m.lines()
    assert (await m.insmod_text("example_callbacks.py", ex["example_callbacks.py"]))["ok"]
    await settle(2.5)
    assert m.transition("example_callbacks") == b"0\n"
    proc = m.node("proc/example_target")
    assert m.kernfs.read(proc, 0, 4096) == b"example_callbacks: this has been live patched\n"
    assert m.write("example_callbacks/enabled", b"0") == 1
    await settle(2.5)
    assert "example_callbacks: post_unpatch_callback: example_target" in m.lines()
    assert (await m.rmmod_ctl("example_callbacks"))["ok"]
    assert (await m.rmmod_ctl("example_target"))["ok"]
    assert m.take()[-1] == "example_target: example_target_exit"
    assert m.node("proc/example_target") is None
