"""Without CAP_SYS_ADMIN (root with it dropped, a container started without
`--cap-add SYS_ADMIN`), `klpfs run` names the capability and how to get it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fusemount import DEADLINE, KLPFS, require_fuse

NO_SYS_ADMIN = ["setpriv", "--inh-caps", "-sys_admin", "--bounding-set", "-sys_admin"]
REFUSED = ("Operation not permitted: CAP_SYS_ADMIN is missing (run it as root with sudo, or give the "
           "container --cap-add SYS_ADMIN)")
TRY_MOUNT = """
import sys
from klpfs.control import namespace
try:
    namespace.{call}(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.strerror)
"""


def require_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop CAP_SYS_ADMIN")


def test_klpfs_run_names_the_missing_capability() -> None:
    require_fuse()
    require_setpriv()
    run = subprocess.run([*NO_SYS_ADMIN, *KLPFS, "run", "--", "true"], capture_output=True, text=True,
                         timeout=DEADLINE)
    assert (run.returncode, run.stdout, run.stderr) == (1, "", f"klpfs run: unshare(CLONE_NEWNS): {REFUSED}\n")


def test_a_mount_without_the_capability_names_it(tmp_path: Path) -> None:
    require_setpriv()
    run = subprocess.run([*NO_SYS_ADMIN, sys.executable, "-c", TRY_MOUNT.format(call="mount_tmpfs"),
                          str(tmp_path)], capture_output=True, text=True, timeout=DEADLINE)
    assert (run.stdout, run.stderr) == (f"MissingCapability 1 mount tmpfs {tmp_path}: {REFUSED}\n", "")


def test_a_refusal_with_the_capability_held_does_not_blame_it(tmp_path: Path) -> None:
    """In a user namespace of its own a process has CAP_SYS_ADMIN there, and still
    may not mount the procfs of a PID namespace that namespace does not own."""
    in_user_namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    if subprocess.run([*in_user_namespace, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs user namespaces (unshare --user)")
    run = subprocess.run([*in_user_namespace, sys.executable, "-c", TRY_MOUNT.format(call="mount_proc"),
                          str(tmp_path)], capture_output=True, text=True, timeout=DEADLINE)
    assert (run.stdout, run.stderr) == (f"PermissionError 1 mount proc {tmp_path}: Operation not permitted\n", "")
