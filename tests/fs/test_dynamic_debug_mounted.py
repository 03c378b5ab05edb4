"""sys/kernel/debug/dynamic_debug/control through a real klpfs mount, driven by
the shell lines of the kernel's livepatch selftests (functions.sh
push_config, set_dynamic_debug, pop_config) on the 6.1 profile.

The emulated clock runs 10x faster; every wait has a deadline.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, Mount, wait_until

CONTROL = "sys/kernel/debug/dynamic_debug/control"
SAMPLE = "livepatch_sample"
TRANSITION = "kernel/livepatch/transition.c"
CONTROL_6_1 = "".join(f"{line}\n" for line in [
    "# filename:lineno [module]function flags format",
    f"{TRANSITION}:75 [livepatch]klp_complete_transition =_ \"'%s': completing %s transition\\n\"",
    f"{TRANSITION}:148 [livepatch]klp_cancel_transition =_ "
    "\"'%s': canceling patching transition, going to unpatch\\n\"",
    f"{TRANSITION}:316 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is running\\n\"",
    f"{TRANSITION}:320 [livepatch]klp_try_switch_task =_ \"%s: %s:%d has an unreliable stack\\n\"",
    f"{TRANSITION}:324 [livepatch]klp_try_switch_task =_ \"%s: %s:%d is sleeping on function %s\\n\"",
    f"{TRANSITION}:329 [livepatch]klp_try_switch_task =_ "
    "\"%s: Unknown error code (%d) when trying to switch %s:%d\\n\"",
    f"{TRANSITION}:521 [livepatch]klp_init_transition =_ \"'%s': initializing %s transition\\n\"",
    f"{TRANSITION}:582 [livepatch]klp_reverse_transition =_ \"'%s': reversing transition from %s\\n\"",
])
PUSH_AND_SET = f"""\
grep '^kernel/livepatch' {CONTROL} | awk -F'[: ]' '{{print "file " $1 " line " $2 " " $4}}'
cat <<-EOF > {CONTROL}
\t\tfile kernel/livepatch/* +p
\t\tfunc klp_try_switch_task -p
\t\tEOF
"""


@pytest.fixture
def m(mount_klpfs: Callable[..., Mount]) -> Mount:
    return mount_klpfs(kernel="6.1", options=["speed=10"])


def klpfs(m: Mount, command: str, *args: str) -> str:
    result = subprocess.run([*KLPFS, command, "-m", str(m.path), *args], capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 0, result.stderr
    return result.stdout


def lp_log(m: Mount) -> list[str]:
    """The livepatch core's lines of `klpfs dmesg`, without timestamps."""
    lines = [re.sub(r"^\[ *\d+\.\d{6}\] ", "", line) for line in klpfs(m, "dmesg").splitlines()]
    return [line for line in lines if line.startswith("livepatch: ")]


def test_selftest_dynamic_debug_sequence(m: Mount) -> None:
    assert m.run(["stat", "-c", "%A %s %U", "sys/kernel/debug", "sys/kernel/debug/dynamic_debug", CONTROL,
                  "proc/dynamic_debug/control"], check=True).stdout.splitlines() == [
        "drwx------ 0 root", "drwxr-xr-x 0 root", "-rw-r--r-- 0 root", "-rw-r--r-- 0 root"]
    assert m.run(["cat", CONTROL], check=True).stdout == CONTROL_6_1

    pushed = m.sh(PUSH_AND_SET)
    assert pushed.returncode == 0, pushed.stderr
    saved = pushed.stdout.rstrip("\n")
    assert saved.splitlines() == [f"file kernel/livepatch/transition.c line {n} =_"
                                  for n in (75, 148, 316, 320, 324, 329, 521, 582)]
    assert [line.split(" ")[2] for line in m.run(["cat", CONTROL], check=True).stdout.splitlines()[1:]] == [
        "=p", "=p", "=_", "=_", "=_", "=_", "=p", "=p"]

    klpfs(m, "insmod", "livepatch-sample")
    wait_until(lambda: (m / f"sys/kernel/livepatch/{SAMPLE}/transition").read_bytes() == b"0\n",
               "the patching transition to end")
    assert lp_log(m) == [
        f"livepatch: enabling patch '{SAMPLE}'",
        f"livepatch: '{SAMPLE}': initializing patching transition",
        f"livepatch: '{SAMPLE}': starting patching transition",
        f"livepatch: '{SAMPLE}': completing patching transition",
        f"livepatch: '{SAMPLE}': patching complete",
    ]

    bad = m.bash(f"echo 'func klp_init_transition +x' > {CONTROL}")
    assert (bad.returncode, bad.stderr) == (1, "bash: line 1: echo: write error: Invalid argument\n")

    # pop_config: `echo -n "$DYNAMIC_DEBUG" > control`.
    popped = m.sh(f"echo -n '{saved}' > {CONTROL}")
    assert (popped.returncode, popped.stderr) == (0, "")
    assert m.run(["cat", CONTROL], check=True).stdout == CONTROL_6_1


LONG_MOD = "from klpfs.kapi import *\n\n\ndef long_mod_init():\n" + "".join(
    f"    pr_debug(\"message number {i} of a module with many debug callsites\\n\")\n" for i in range(100)) + (
    "    return 0\n\n\nmodule_init(long_mod_init)\nMODULE_LICENSE(\"GPL\")\n")


def test_cat_reads_a_long_control_file_whole(m: Mount, tmp_path: Path) -> None:
    """The control file is a seq_file: `cat` gets every line, however many pages."""
    module = tmp_path / "long_mod.py"
    module.write_text(LONG_MOD)
    klpfs(m, "insmod", str(module))
    text = m.run(["cat", CONTROL], check=True).stdout
    assert len(text) > 3 * 4096
    assert text.splitlines()[9:] == [
        f"{module}:{5 + i} [long_mod]long_mod_init =_ "
        f"\"message number {i} of a module with many debug callsites\\n\"" for i in range(100)]
    assert m.sh(f"echo 'module long_mod +p' > {CONTROL}").returncode == 0
    assert m.run(["grep", "-c", "=p", CONTROL], check=True).stdout == "100\n"
