"""A tool-like `unload --all`, as kpatch and SUSE's test helpers do it:
disable every patch, then retry rmmod while the module is still in use."""

from __future__ import annotations

import os
import subprocess
import sys

from fusemount import DEADLINE, KLPFS, require_fuse

UNLOAD_ALL = r"""
set -u
modprobe livepatch-sample || exit 10
until [ "$(cat /sys/kernel/livepatch/livepatch_sample/transition)" = 0 ]; do sleep 0.1; done
holder=$($KLPFS task add holder --kthread)
$KLPFS task sleep "$holder" livepatch_cmdline_proc_show >/dev/null   # holds the unpatching transition
for patch in /sys/kernel/livepatch/*; do echo 0 > "$patch/enabled"; done
tries=0
until rmmod livepatch_sample 2>err; do
  tries=$((tries + 1))
  [ "$tries" = 1 ] && cat err
  [ "$tries" = 3 ] && $KLPFS task wake "$holder" >/dev/null         # the holder leaves the function
  [ "$tries" -gt 100 ] && { echo "gave up"; exit 3; }
  sleep 0.2
done
[ "$tries" -ge 3 ] && echo "unloaded after retrying"
ls /sys/kernel/livepatch | wc -l
"""


def test_unload_all_retries_while_in_use(tmp_path) -> None:
    require_fuse()
    env = {**os.environ, "KLPFS": f"{sys.executable} -m klpfs"}   # the CLI, as the tool's operator runs it
    res = subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "bash", "-c", UNLOAD_ALL], capture_output=True,
                         text=True, timeout=6 * DEADLINE, env=env, cwd=tmp_path)
    assert res.stdout == "rmmod: ERROR: Module livepatch_sample is in use\nunloaded after retrying\n0\n", res.stderr
    assert res.returncode == 0
