"""`klpfs run -- COMMAND`: unmodified tools against the emulator at the real paths.

In a private mount namespace: a daemon mounts the emulator on a scratch
directory; /sys/kernel becomes the emulator's (its `livepatch`, its debugfs,
its modules' kobjects), with the host's other entries bound onto stand-ins
the daemon made for them, so it is a sysfs directory to `ls -la` too (size
0, not a tmpfs's); /sys/module becomes a tmpfs holding the host's modules
(bound back) and gets the emulated modules' directories as they load; shims
for insmod, rmmod, modprobe, lsmod, modinfo and dmesg go first on PATH;
/dev/kmsg is the emulated log's (for `echo ... > /dev/kmsg` and util-linux
dmesg).  Then COMMAND runs in a PID namespace of its own, under a /proc that
is the emulated kernel's and its own at once (pidns.py), and everything is
torn down with the namespaces.  The host's mount table is never touched.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from klpfs.control import namespace
from klpfs.fs.child import MountedChild, MountFailed
from klpfs.profiles import get_profile
from klpfs.sysfs.kernfs import Kernfs, KernfsNode

SHIMS = ("insmod", "rmmod", "modprobe", "lsmod", "modinfo", "dmesg", "uname")
PROC_FILES = ("cmdline", "version", "meminfo", "modules", "kallsyms", "sys/kernel/tainted",
              "sys/kernel/ftrace_enabled")
"""The emulated kernel's /proc files bound over the host's in the run's mount namespace (what
`nsenter --mount` finds, and COMMAND where its own procfs cannot be mounted); COMMAND's /proc
is otherwise the whole union of the emulated and its real one (pidns.py)."""
KDIR_MAKEFILE = """\
# klpfs: the emulated kernel's build directory.  Its modules are Python or TOML
# module files (klpfs insmod FILE), not compiled objects; `klpfs selftests`
# gives the kernel's livepatch selftests the test_modules/*.ko they look for.
all modules:
\t@echo "klpfs: modules for the emulated kernel are module files, not compiled" >&2; exit 1
"""
STATE_ENV = "KLPFS_RUN_STATE"
HOST_KERNEL = Path("/sys/kernel")
EMULATED_SYS_KERNEL = frozenset({"livepatch", "debug", "tracing"})
"""The emulator's own entries of /sys/kernel, shown in place of any the host has."""


class RunError(Exception):
    """`klpfs run` cannot set up; the message says what is missing."""


@dataclass(frozen=True)
class RunState:
    """What the shims inside a `klpfs run` need to know, kept in its scratch directory."""

    workdir: Path

    @property
    def mountpoint(self) -> Path:
        return self.workdir / "mnt"

    @property
    def ns_proc(self) -> Path:
        """Where the procfs of COMMAND's PID namespace is mounted, for the daemon."""
        return self.workdir / "ns-proc"

    @property
    def modules_dirs(self) -> list[Path]:
        return [Path(p) for p in json.loads((self.workdir / "modules.json").read_text())]

    @classmethod
    def current(cls) -> RunState | None:
        """The run this process is inside, if any."""
        workdir = os.environ.get(STATE_ENV)
        return cls(Path(workdir)) if workdir else None

    def sync_modules(self) -> None:
        """Bind each loaded emulated module's directory into /sys/module; drop gone ones.

        Host modules keep their own entries; an emulated module of the same
        name is not shown there.
        """
        record = self.workdir / "module-binds.json"
        bound = set(json.loads(record.read_text())) if record.exists() else set()
        emulated = set(os.listdir(self.mountpoint / "sys/module"))
        for name in sorted(bound - emulated):
            namespace.detach(f"/sys/module/{name}")
            os.rmdir(f"/sys/module/{name}")
        for name in sorted(emulated - bound):
            target = Path("/sys/module") / name
            if target.exists():
                continue
            target.mkdir()
            namespace.bind(self.mountpoint / "sys/module" / name, target)
            bound.add(name)
        record.write_text(json.dumps(sorted(bound & emulated)))


def sync_after_module_change() -> None:
    """Inside a `klpfs run`, show a module that came or went under /sys/module."""
    state = RunState.current()
    if state is not None:
        state.sync_modules()


def _require_privilege() -> None:
    if os.geteuid() != 0:
        raise RunError("needs root: it makes a private mount namespace and mounts over "
                       "/sys/kernel and /sys/module (CAP_SYS_ADMIN); run it with sudo, or in a "
                       "container started with --cap-add SYS_ADMIN --device /dev/fuse")
    if not os.path.exists("/dev/fuse"):
        raise RunError("/dev/fuse does not exist (load the fuse module, or give the container "
                       "--device /dev/fuse)")


def _write_shims(bindir: Path) -> None:
    bindir.mkdir()
    for tool in SHIMS:
        shim = bindir / tool
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m klpfs shim {tool} "$@"\n')
        shim.chmod(0o755)


def add_host_placeholders(kernfs: Kernfs, directory: KernfsNode, host: str | Path) -> None:
    """In the daemon (``-o hostkernel=``): an empty stand-in in `directory` for each
    entry of `host` it lacks, of the same type and mode (a symlink is copied), for
    `_expose` to bind the host's entry onto.  They are never removed: removing
    one would unmount what is bound on it."""
    for entry in sorted(os.scandir(host), key=lambda entry: entry.name):
        if kernfs.lookup(directory, entry.name) is not None:
            continue
        try:
            if entry.is_symlink():
                target = functools.partial(str, os.readlink(entry.path))  # a show returning the target
                kernfs.create_link(directory, entry.name, target)
                continue
            st = entry.stat()
        except OSError:
            continue  # gone meanwhile
        if entry.is_dir():
            kernfs.create_dir(directory, entry.name, stat.S_IMODE(st.st_mode))
        else:
            kernfs.create_file(directory, entry.name, stat.S_IMODE(st.st_mode), size=st.st_size)


def _expose_sys_kernel(state: RunState) -> None:
    """/sys/kernel: the emulator's (its livepatch, its debugfs with dynamic debug's
    control file in place of the host's, its tracefs, its modules' kobjects), and on the
    daemon's stand-ins the host's other entries (mm, security, ...), with what is
    mounted below them."""
    keep = state.workdir / "host-kernel"
    keep.mkdir()
    namespace.bind(HOST_KERNEL, keep)
    namespace.bind(state.mountpoint / "sys/kernel", HOST_KERNEL)
    for name in sorted(os.listdir(keep)):
        source, target = keep / name, HOST_KERNEL / name
        if name in EMULATED_SYS_KERNEL or source.is_symlink() or not os.path.lexists(target):
            continue
        namespace.bind(source, target)


def _expose(state: RunState, release: str) -> None:
    """/sys/kernel, /sys/module/<emulated>, the kernel's /proc files and
    /lib/modules/<release> at their real paths."""
    _expose_sys_kernel(state)
    namespace.overlay_dir(Path("/sys/module"), state.workdir / "host-module", skip=set())
    state.sync_modules()
    for name in PROC_FILES:
        # procfs cannot get new entries: a file the host kernel lacks (/proc/modules
        # without CONFIG_MODULES) stays missing.
        if (Path("/proc") / name).exists():
            namespace.bind(state.mountpoint / "proc" / name, Path("/proc") / name)
    if os.path.exists("/dev/kmsg"):  # /dev is the host's: nothing can be created there to bind onto
        namespace.bind(state.mountpoint / "dev/kmsg", "/dev/kmsg")
    _expose_release(state, release)


def _expose_release(state: RunState, release: str) -> None:
    """/lib/modules/<release> with an empty module index and `build` (KDIR), the
    host's other releases kept.  Without a /lib/modules, its parent is overlaid."""
    modules = Path("/lib/modules").resolve()
    if modules.is_dir():
        namespace.overlay_dir(modules, state.workdir / "host-lib-modules", skip={release})
    else:
        namespace.overlay_dir(modules.parent, state.workdir / "host-lib", skip=set())
        modules.mkdir()
    tree = modules / release
    (tree / "build").mkdir(parents=True)
    (tree / "build" / "Makefile").write_text(KDIR_MAKEFILE)
    for index in ("modules.dep", "modules.alias", "modules.builtin", "modules.order", "modules.symbols"):
        (tree / index).touch()


def run(command: Sequence[str], kernel: str, modules: Sequence[str], options: Sequence[str],
        keep_mounted: bool) -> int:
    """Set up, run COMMAND, tear down; COMMAND's exit status."""
    from klpfs.fs.mount import MountOptions
    _require_privilege()
    for directory in modules:
        if not Path(directory).is_dir():
            raise RunError(f"--modules {directory}: not a directory")
    try:
        namespace.unshare_mounts()
    except namespace.MissingCapability as exc:
        raise RunError(exc.strerror) from None
    state = RunState(Path(tempfile.mkdtemp(prefix="klpfs-run-")))
    (state.workdir / "modules.json").write_text(json.dumps([os.path.abspath(d) for d in modules]))
    env = {**os.environ, "KLPFS_RUNTIME_DIR": str(state.workdir / "run"), "KLPFS_MOUNT": str(state.mountpoint),
           STATE_ENV: str(state.workdir)}
    _write_shims(state.workdir / "bin")
    os.environ.update(env)
    state.mountpoint.mkdir()
    state.ns_proc.mkdir()
    log = open(state.workdir / "daemon.log", "w+b")
    try:
        daemon = MountedChild(state.mountpoint, kernel,
                              [*options, f"procunion={state.ns_proc}", f"hostkernel={HOST_KERNEL}"], log, env)
    except MountFailed as e:
        raise RunError(str(e)) from None
    try:
        # /lib/modules/<release> of the build emulated: the profile's, or release= (--release).
        _expose(state, get_profile(kernel).built_as(MountOptions.parse(options).release).release)
        env["PATH"] = f"{state.workdir / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        status = subprocess.run([sys.executable, "-m", "klpfs.control.pidns", str(state.ns_proc),
                                 str(state.mountpoint / "proc"), "--", *command], env=env).returncode
        if keep_mounted:
            _wait_for_interrupt(os.getpid())
        return status
    finally:
        for name in PROC_FILES:
            namespace.detach(Path("/proc") / name)
        for target in ("/sys/kernel", "/sys/module", "/dev/kmsg", str(Path("/lib/modules").resolve()),
                       str(Path("/lib/modules").resolve().parent)):
            namespace.detach(target)
        daemon.stop()
        log.close()
        for kept in ("host-kernel", "host-module", "host-lib-modules", "host-lib", "ns-proc"):
            namespace.detach(state.workdir / kept)
        shutil.rmtree(state.workdir, ignore_errors=True)


def _wait_for_interrupt(pid: int) -> None:
    print(f"klpfs run: the emulator stays up; enter it with: nsenter --mount --target {pid}\n"
          "klpfs run: press Ctrl-C (or send SIGTERM) to tear it down", file=sys.stderr)
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
