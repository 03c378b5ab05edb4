"""Under `klpfs run`, /sys/kernel/debug is the emulated debugfs: the selftests'
dynamic debug setup (functions.sh set_dynamic_debug) reaches the emulated
kernel, and the host's dynamic debug is left alone."""

from __future__ import annotations

import subprocess

from fusemount import DEADLINE, KLPFS, require_fuse

CONTROL = "/sys/kernel/debug/dynamic_debug/control"
SCRIPT = f"""\
stat -c '%A %n' /sys/kernel/debug {CONTROL}
grep -c '^kernel/livepatch' {CONTROL}
cat <<-EOF > {CONTROL}
\t\tfile kernel/livepatch/* +p
\t\tfunc klp_try_switch_task -p
\t\tEOF
modprobe livepatch-sample
while [ "$(cat /sys/kernel/livepatch/livepatch_sample/transition)" != 0 ]; do sleep 0.01; done
dmesg | grep -o 'livepatch: .*transition$'
"""


def test_selftest_dynamic_debug_setup_reaches_the_emulator() -> None:
    require_fuse()
    res = subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c", SCRIPT], capture_output=True,
                         text=True, timeout=6 * DEADLINE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "drwx------ /sys/kernel/debug", f"-rw-r--r-- {CONTROL}", "8",
        "livepatch: 'livepatch_sample': initializing patching transition",
        "livepatch: 'livepatch_sample': starting patching transition",
        "livepatch: 'livepatch_sample': completing patching transition",
    ]
