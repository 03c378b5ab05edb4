"""The README's walkthrough, run as written, on the default and the latest profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fusemount import DEADLINE, is_klpfs_mount, make_mountpoint, require_fuse, wait_until

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- walkthrough:[^>]*-->\n```bash\n(.*?)```", readme, re.S)
    assert match, "README.md lost its walkthrough block"
    return match.group(1)


@pytest.mark.parametrize("kernel", [None, "latest"])
def test_readme_walkthrough(kernel: str | None) -> None:
    require_fuse()
    script = walkthrough()
    if kernel is not None:
        script = script.replace('klpfs mount "$MNT"', f'klpfs mount --kernel {kernel} "$MNT"', 1)
    mnt = make_mountpoint()
    env = {**os.environ, "MNT": str(mnt), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        run = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=6 * DEADLINE)
    finally:
        if is_klpfs_mount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        wait_until(lambda: not is_klpfs_mount(mnt), "the walkthrough's mount to go")
        mnt.rmdir()
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    original = next(line for line in out if line.startswith("BOOT_IMAGE="))
    assert re.search(r"^-rw-r--r-- 1 root root 4096 .* enabled$", run.stdout, re.M)
    assert re.search(r"^-r--r--r-- 1 root root 4096 .* transition$", run.stdout, re.M)
    assert re.search(r"^drwxr-xr-x \d+ root root +0 .* vmlinux$", run.stdout, re.M)
    # the function directory, enabled and transition right after insmod, transition later
    funcdir = out.index("cmdline_proc_show,1") + (1 if kernel is None else 2)
    if kernel is not None:
        assert out[funcdir - 1] == "patched"
    # latest (6.4 on): nothing holds the transition, so it is over when insmod returns (6.12 obs #2)
    in_progress = "1" if kernel is None else "0"
    assert out[funcdir:funcdir + 4] == ["1", in_progress, "0", "this has been live patched"]
    assert out.count("this has been live patched") == 1
    assert out.count(original) == 2
    # the held transition: still 1, the holder 0, init 1
    held = out.index(original, out.index("this has been live patched")) + 2
    assert out[held:held + 3] == ["1", "0", "1"]
    assert re.search(r"holder +kthread +D +0 +cmdline_proc_show", run.stdout)
    assert "livepatch: enabling patch 'livepatch_sample'" in run.stdout
    assert out[-1] == "0"
