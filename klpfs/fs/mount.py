"""Mounting a machine's kernfs: checks, the serving loop, the background daemon.

A machine is anything with a ``kernfs`` tree and an ``async run()`` doing its
background work (the CLI's System with its control socket, or a test's fake).
It is built by a factory, given the mountpoint, inside trio and after any
fork: trio and threads do not survive fork().  Its ``run`` is started with
``nursery.start``: ``klpfs mount`` returns once it has called
``task_status.started()``, so whatever it serves besides the files (the
control socket) is ready too.

Shutdown order matters.  On SIGINT, SIGTERM, SIGHUP or SIGQUIT the last cache
invalidations are delivered while FUSE still answers requests (a delivery can
wait for a process that waits for us); only then does the FUSE loop stop, the
file system get unmounted and the machine (its control socket with whatever
clients it has) get cancelled.  If someone else unmounts us, the loop ends by
itself and everything else is cancelled.  SIGUSR1 logs the trio task tree,
whatever the daemon is doing: what a daemon that does not stop waits for.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyfuse3
import trio

from klpfs.sysfs.kernfs import Kernfs

from .mountinfo import FSTYPE, find_mount
from .operations import KernfsOperations
from .sdnotify import sd_notify
from .tasktree import task_tree

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
FUSE_OPTIONS = frozenset({
    "fsname=klpfs", "subtype=klpfs",  # shows as "klpfs on MNT type fuse.klpfs"
    "default_permissions",            # the kernel checks modes and owners, as for sysfs
    "auto_unmount",                   # a killed daemon leaves no dead mount behind
})
ALLOW_OTHER = "allow_other"
"""sysfs is for everyone, not just the mounter: asked for wherever fusermount3 allows it."""
FUSE_CONF = Path("/etc/fuse.conf")
LOG_FORMAT = "%(asctime)s klpfs[%(process)d] %(levelname)s %(name)s: %(message)s"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""Each unmounts and ends the daemon cleanly (its socket and record removed).  Left to
their default action SIGHUP (a closed terminal) and SIGQUIT would kill it as SIGKILL
does, with both left behind."""
DUMP_SIGNAL = signal.SIGUSR1
"""Logs the trio task tree at warning level, so a log kept at any level has it."""
SHUTDOWN_GRACE = 5.0
"""Seconds FUSE requests under way at a stop signal have to finish (one waiting for
cache invalidations gives up after 2) before they are cancelled: pyfuse3.main()
waits for every one, and a daemon told to stop must stop."""


class Machine(Protocol):
    kernfs: Kernfs
    """Served by a KernfsOperations, unless the machine has an ``operations`` of its own."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until cancelled; call task_status.started() once ready."""


MachineFactory = Callable[[str], Machine]
"""Builds the machine to serve at the mountpoint it is given."""


class MountError(Exception):
    """Why klpfs cannot (un)mount, in one line for the user's terminal."""


def allow_other_allowed(conf: Path) -> bool:
    """Whether fusermount3 takes allow_other from us: from root always, from another
    user only where fuse.conf has a line `user_allow_other` (read_conf() in
    fusermount.c: a line counts once it ends in a newline, from a '#' on is a
    comment, and blanks around it do not count)."""
    if os.geteuid() == 0:
        return True
    try:
        lines = conf.read_text(errors="replace").split("\n")[:-1]
    except OSError:
        return False
    return any(line.partition("#")[0].strip() == "user_allow_other" for line in lines)


def default_fuse_options() -> set[str]:
    """FUSE_OPTIONS, with allow_other where it is allowed: a user's mount would fail with it."""
    return set(FUSE_OPTIONS | ({ALLOW_OTHER} if allow_other_allowed(FUSE_CONF) else set()))


PATH_OPTIONS = {
    "log": ("log", "a file name"),
    "procunion": ("procunion", "a directory"),
    "hostkernel": ("host_kernel", "a directory"),
    "kallsyms": ("kallsyms", "a file name"),
    "symvers": ("symvers", "a file name"),
}
"""Mount options naming a path: the MountOptions field each sets, and what it must name."""


@dataclass
class MountOptions:
    """-o options: ``log=PATH``, ``speed=N``, ``procunion=DIR``, ``hostkernel=DIR``,
    ``kallsyms=FILE``, ``release=R``, ``symvers=FILE`` and ``debug`` are klpfs's own; the
    rest go to libfuse."""

    fuse: set[str] = field(default_factory=default_fuse_options)
    log: str | None = None
    debug: bool = False
    """Log at debug level (klpfs's messages and pyfuse3's), not info."""
    speed: float = 1.0
    procunion: str | None = None
    """A procfs to merge under the mount's proc/ (klpfs run's; see procunion.py)."""
    host_kernel: str | None = None
    """A /sys/kernel whose entries get empty stand-ins in sys/kernel, for klpfs run to bind
    them onto (see klpfs.control.run.add_host_placeholders)."""
    kallsyms: str | None = None
    """The build's symbol table: a /proc/kallsyms dump or a System.map (--kallsyms)."""
    release: str | None = None
    """The build's release string, for the profile's own (--release)."""
    symvers: str | None = None
    """The build's Module.symvers, whose module_layout CRC modules must carry (--symvers)."""

    @property
    def log_level(self) -> int:
        return logging.DEBUG if self.debug else logging.INFO

    @classmethod
    def parse(cls, values: Iterable[str]) -> MountOptions:
        options = cls()
        for value in values:
            for option in value.split(","):
                name, _, arg = option.partition("=")
                if not option:
                    raise MountError("empty mount option")
                if option == "debug":
                    options.debug = True
                elif name in PATH_OPTIONS:
                    field_name, what = PATH_OPTIONS[name]
                    if not arg:
                        raise MountError(f"{name}= needs {what}")
                    setattr(options, field_name, os.path.abspath(arg))
                elif name == "release":
                    if not arg or arg != arg.strip() or any(c.isspace() for c in arg):
                        raise MountError(f"release= needs a release string without spaces, not {arg!r}")
                    options.release = arg
                elif name == "speed":
                    try:
                        options.speed = float(arg)
                    except ValueError:
                        options.speed = 0
                    if not 0 < options.speed <= 1000:
                        raise MountError(f"speed= needs a number from 0 to 1000, not {arg!r}")
                else:
                    options.fuse.add(option)
        return options


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, if klpfs can be mounted there."""
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(f"{FUSE_DEVICE} does not exist (load the fuse module, or give a "
                         "container the device)")
    entry = find_mount(path)
    if entry is not None:
        raise MountError(f"cannot mount on {path}: already a mountpoint ({entry.fstype})")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MountError(f"cannot mount on {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise MountError(f"cannot mount on {path}: Not a directory")
    return os.path.abspath(path)


def unmount(path: str) -> None:
    """Unmount a klpfs mount (its daemon then exits); refuse anything else."""
    entry = find_mount(path)
    if entry is None:
        raise MountError(f"{path} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountError(f"{path} is not a klpfs mount (it is {entry.fstype})")
    try:
        result = subprocess.run(["fusermount3", "-u", entry.mountpoint],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise MountError("fusermount3 not found (install fuse3)") from None
    if result.returncode:
        raise MountError(result.stderr.strip() or f"fusermount3 -u {path} failed")


def mount(factory: MachineFactory, mountpoint: str, options: MountOptions,
          foreground: bool) -> int:
    """Check, then serve here (foreground) or in a daemon; the exit status."""
    try:
        path = check_mountpoint(mountpoint)
    except MountError as exc:
        print(f"klpfs: {exc}", file=sys.stderr)
        return 1
    if not foreground:
        return _daemonize(factory, path, options)
    _log_to(options.log, options.log_level)
    try:
        trio.run(serve, factory, path, options.fuse)
    except MountError as exc:
        print(f"klpfs: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(factory: MachineFactory, mountpoint: str, fuse_options: set[str],
                ready: Callable[[], None] | None = None) -> None:
    """Build the machine, mount it, serve until told to stop; always unmount."""
    with trio.open_signal_receiver(*STOP_SIGNALS, DUMP_SIGNAL) as signals:
        stop = trio.Event()
        async with trio.open_nursery() as watcher:
            watcher.start_soon(_watch_signals, signals, stop)
            failure = await _serve(factory, mountpoint, fuse_options, stop, ready)
            watcher.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event) -> None:
    """For the daemon's whole life, shutdown included: a stop signal sets `stop`, the
    dump signal logs the task tree."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == DUMP_SIGNAL:
            log.warning("%s: trio tasks:\n%s", name, task_tree())
        elif not stop.is_set():
            log.info("%s: unmounting", name)
            stop.set()


async def _serve(factory: MachineFactory, mountpoint: str, fuse_options: set[str], stop: trio.Event,
                 ready: Callable[[], None] | None) -> MountError | None:
    """Serve until `stop` or an unmount; why mounting failed, if it did.

    The machine runs before the mount exists and stops after it is gone: its
    trio thread must never touch a path under the mountpoint while mounted
    (a stat of the mountpoint would wait for an answer only this thread can
    give), and setting up or tearing down is when it is tempted to.
    """
    machine = factory(mountpoint)
    operations = getattr(machine, "operations", None) or KernfsOperations(machine.kernfs)
    failure = None
    async with trio.open_nursery() as background:
        await background.start(machine.run)
        log.debug("mounting on %s with the FUSE options %s", mountpoint, ",".join(sorted(fuse_options)))
        try:
            pyfuse3.init(operations, mountpoint, fuse_options)
        except RuntimeError as exc:
            failure = MountError(f"cannot mount on {mountpoint}: {exc}")
        else:
            log.info("mounted on %s", mountpoint)
            stopped_here = True
            try:
                stopped_here = await _serve_mounted(operations, stop, ready)
            finally:
                pyfuse3.close(unmount=stopped_here)
                log.info("unmounted %s", mountpoint)
        background.cancel_scope.cancel()
    return failure


async def _serve_mounted(operations: KernfsOperations, stop: trio.Event,
                         ready: Callable[[], None] | None) -> bool:
    """True when a signal stopped us (we unmount), False when we were unmounted."""
    by_signal = False
    async with trio.open_nursery() as fuse:
        async def fuse_loop() -> None:
            await pyfuse3.main()
            fuse.cancel_scope.cancel()

        fuse.start_soon(fuse_loop)
        async with trio.open_nursery() as invalidation:
            await invalidation.start(operations.invalidator.run)
            if ready is not None:
                ready()
            sd_notify("READY=1")
            await stop.wait()
            sd_notify("STOPPING=1")
            by_signal = True
            invalidation.cancel_scope.cancel()  # finishes a delivery while FUSE still serves
        operations.shutdown()  # a read waiting for a record would hold the loop
        pyfuse3.terminate()
        await trio.sleep(SHUTDOWN_GRACE)  # cut short by fuse_loop once the requests are done
        log.warning("FUSE requests still under way %gs after the stop signal, cancelled; "
                    "trio tasks:\n%s", SHUTDOWN_GRACE, task_tree())
        fuse.cancel_scope.cancel()
    return by_signal


def _log_to(path: str | None, level: int) -> None:
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _daemonize(factory: MachineFactory, mountpoint: str, options: MountOptions) -> int:
    """Fork a daemon; succeed once it has mounted, or print why it could not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        if report == "ok":
            return 0
        os.waitpid(pid, 0)
        print(report or "klpfs: the daemon died before it was ready", file=sys.stderr)
        return 1
    os.close(read_end)
    os._exit(_daemon(factory, mountpoint, options, write_end))


def _daemon(factory: MachineFactory, mountpoint: str, options: MountOptions,
            report_fd: int) -> int:
    """The forked child: serve, telling the parent through report_fd how mounting went.

    Until then its output (libfuse's and fusermount3's complaints included) is
    kept in a scratch file, to be sent along if mounting fails: a terminal or
    pipe the parent inherited must not be held open by the daemon, nor by the
    auto_unmount helper fusermount3 leaves running for the mount's lifetime.
    """
    os.setsid()
    os.chdir("/")
    scratch = tempfile.TemporaryFile()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(scratch.fileno(), 2)
    mounted = False
    failure = ""

    def ready() -> None:
        nonlocal mounted
        mounted = True
        os.write(report_fd, b"ok")
        os.close(report_fd)
        os.dup2(null, 2)

    if options.log:
        _log_to(options.log, options.log_level)
    try:
        trio.run(serve, factory, mountpoint, options.fuse, ready)
        status = 0
    except MountError as exc:
        failure = f"klpfs: {exc}"
        status = 1
    except BaseException:
        log.exception("daemon failed")
        failure = "klpfs: the daemon failed"
        status = 1
    logging.shutdown()
    if not mounted:
        sys.stderr.flush()
        scratch.seek(0)
        output = scratch.read().decode(errors="replace").strip()
        os.write(report_fd, "\n".join(filter(None, (output, failure))).encode())
    return status
