"""The ``klpfs`` command: one subcommand per verb, like the kernel tools it stands in for.

The control commands are run often (by scripts, in loops), so this module
imports only what they need; the daemon, mount and run machinery (trio,
pyfuse3, the engine) is imported by the commands that use it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from klpfs.control import commands as control
from klpfs.control.run import SHIMS
from klpfs.elf import command as ko_command
from klpfs.host import HOST
from klpfs.profiles import DEFAULT, PROFILES, get_profile

if TYPE_CHECKING:
    import trio

    from klpfs.fs.operations import KernfsOperations
    from klpfs.fs.realtasks import RealTasks
    from klpfs.kernel.kallsyms_file import SymbolFile
    from klpfs.system import System


MAIN_EXAMPLES = """\
examples:
  klpfs mount /mnt/klp && cd /mnt/klp      start an emulated machine (klpfs mount --help)
  klpfs insmod livepatch-sample            load the kernel's livepatch sample
  klpfs wait                               until its transition is over
  klpfs status                             patches, the transition, the tasks holding it
  klpfs watch                              the transition live
  klpfs umount /mnt/klp

Every command has --help with examples: klpfs task sleep --help
"""


MOUNT_EXAMPLES = """\
examples:
  klpfs mount /mnt/klp                     mount in the background (exit 0 once mounted)
  klpfs mount -f /mnt/klp                  serve in the foreground; Ctrl-C unmounts
  klpfs mount --kernel 4.16 /mnt/klp       emulate Linux 4.16 (signal and force attributes)
  klpfs mount --kernel 6.1 --kallsyms System.map --release 6.1.0-28-amd64 /mnt/klp
                                           one particular build: its symbols and release
  klpfs mount -o log=/tmp/klpfs.log /mnt/klp
                                           keep the background daemon's log
  klpfs mount -d /mnt/klp                  foreground, logging at debug level
  cat /mnt/klp/sys/kernel/livepatch/*/enabled
  klpfs umount /mnt/klp

options (-o, comma separated, repeatable):
  log=PATH   append the daemon's log to PATH (default: stderr with -f, nowhere otherwise)
  speed=N    run the emulated clock N times faster (default 1: the kernel's own timing;
             speed=10 retries a stuck transition ten times a second)
  procunion=DIR
             proc/ is also the procfs mounted at DIR, whose processes become
             tasks of the emulated kernel (what `klpfs run` uses)
  hostkernel=DIR
             sys/kernel/ also has an empty entry for each of DIR's that the emulator
             lacks, to bind DIR's onto (what `klpfs run` does with /sys/kernel)
  debug      log at debug level (klpfs's and pyfuse3's messages; default: info)
  anything else is passed to libfuse, after the defaults
  fsname=klpfs,subtype=klpfs,default_permissions,auto_unmount, and allow_other
  (every user may read the tree, as sysfs) where it is allowed: as root, or with
  user_allow_other in /etc/fuse.conf

under systemd (Type=notify), the daemon sends READY=1 to $NOTIFY_SOCKET once mounted:
  see contrib/systemd/klpfs@.service

signals to the daemon:
  SIGINT, SIGTERM, SIGHUP, SIGQUIT   unmount and exit
  SIGUSR1                            log the daemon's trio tasks (to stderr with -f, or log=)
"""


def kernel_version(value: str) -> str:
    """argparse type of --kernel: the version of a profile the engine has ("latest" resolved,
    "host" kept: the running kernel, resolved where the machine is built)."""
    if value == HOST:
        return value
    try:
        return get_profile(value).version
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Daemon:
    """What ``klpfs mount`` serves: the emulated system and its control socket."""

    def __init__(self, kernel: str, mountpoint: str, speed: float = 1.0, procunion: str | None = None,
                 host_kernel: str | None = None, release: str | None = None,
                 symbols: SymbolFile | None = None, module_layout_crc: int | None = None) -> None:
        # Imported here, in the daemon after the fork: the engine is not needed before.
        from klpfs.system import System
        self.system: System = System(kernel_version=kernel, speed=speed, release=release, symbols=symbols,
                                     module_layout_crc=module_layout_crc)
        self.kernfs = self.system.kernfs
        if host_kernel is not None:
            from klpfs.control.run import add_host_placeholders
            add_host_placeholders(self.kernfs, self.system.kernel_kobj, host_kernel)
        self.mountpoint = mountpoint
        self.operations: KernfsOperations | None = None
        """proc/ as the union with the procfs at `procunion` (klpfs run); else plain kernfs."""
        self.real_tasks: RealTasks | None = None
        if procunion is not None:
            from klpfs.fs.caller import Callers
            from klpfs.fs.procunion import ProcUnionOperations
            from klpfs.fs.realtasks import RealTasks
            self.real_tasks = RealTasks(self.system.kernel, procunion)
            self.operations = ProcUnionOperations(self.kernfs, self.system.kernel, self.real_tasks,
                                                  Callers(procunion))

    async def run(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        import trio

        from klpfs.control.server import serve_control
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, self.system, self.mountpoint)
            if self.real_tasks is not None:
                nursery.start_soon(self.real_tasks.run)
            if task_status is not None:
                task_status.started()
            await self.system.run()


def build_options(args: argparse.Namespace) -> list[str]:
    """-o options with --kallsyms and --release among them: the daemon, klpfs run and the
    pytest fixture all pass a build on as mount options."""
    return [*args.options, *([f"kallsyms={args.kallsyms}"] if args.kallsyms else []),
            *([f"release={args.release}"] if args.release else []),
            *([f"symvers={args.symvers}"] if args.symvers else [])]


def load_layout_crc(kernel: str, symvers: str | None) -> int | None:
    """The build's module_layout CRC: from --symvers, or with --kernel host from the
    running kernel's headers when they are installed; None: no CRC is checked."""
    from klpfs.kernel.symvers import module_layout_crc
    if symvers is None and kernel == HOST:
        host = Path("/lib/modules") / os.uname().release / "build/Module.symvers"
        symvers = str(host) if host.is_file() else None
    return None if symvers is None else module_layout_crc(symvers)


HOST_KALLSYMS = "/proc/kallsyms"


def load_symbols(kernel: str, kallsyms: str | None) -> SymbolFile | None:
    """The symbol file to emulate, read before anything is mounted (KallsymsFileError if it
    cannot be one); with --kernel host and none given, the running kernel's when it shows
    its addresses, else the built-in image, said once."""
    from klpfs.kernel.kallsyms_file import host_kallsyms_usable, read_kallsyms
    if kallsyms is not None:
        return read_kallsyms(kallsyms)
    if kernel != HOST:
        return None
    if host_kallsyms_usable(HOST_KALLSYMS):
        return read_kallsyms(HOST_KALLSYMS)
    print(f"klpfs: {HOST_KALLSYMS} shows no addresses (not root, or kptr_restrict): "
          "the built-in image's symbols stand in for the host's", file=sys.stderr)
    return None


def _cmd_mount(args: argparse.Namespace) -> int:
    from klpfs.fs.mount import MountError, MountOptions, mount
    from klpfs.kernel.kallsyms_file import KallsymsFileError
    from klpfs.kernel.symvers import SymversError
    try:
        options = MountOptions.parse([*build_options(args), *(["debug"] if args.debug else [])])
        symbols = load_symbols(args.kernel, options.kallsyms)
        crc = load_layout_crc(args.kernel, options.symvers)
    except (MountError, KallsymsFileError, SymversError) as exc:
        print(f"klpfs: {exc}", file=sys.stderr)
        return 1
    return mount(lambda mountpoint: Daemon(args.kernel, mountpoint, options.speed, options.procunion,
                                           options.host_kernel, options.release, symbols, crc),
                 args.mountpoint, options, foreground=args.foreground or args.debug)


RUN_EXAMPLES = """\
examples:
  sudo klpfs run -- sh -c 'insmod livepatch-sample.ko; cat /sys/kernel/livepatch/*/enabled'
  sudo klpfs run --kernel 6.1 --modules ./ko -- ./my-livepatch-tool --check
  sudo klpfs run --kernel host --modules ./ko -- insmod ./livepatch-for-this-machine.ko
  sudo klpfs run -o speed=10 -- pytest tests/     # a faster emulated clock
"""


SELFTESTS_EXAMPLES = """\
examples:
  sudo klpfs selftests --fetch 6.1 --kernel 6.1                  # every script of Linux 6.1's tree
  sudo klpfs selftests --fetch 6.12 --kernel latest test-livepatch test-state
  sudo klpfs selftests --tree ~/linux/tools/testing/selftests/livepatch --kernel 6.1
  klpfs selftests --kernel 6.1 --test-modules ~/linux/tools/testing/selftests/livepatch/test_modules
"""


def _cmd_run(args: argparse.Namespace) -> int:
    from klpfs.control import run
    from klpfs.fs.mount import MountError, MountOptions
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("klpfs run: no COMMAND given (klpfs run [options] -- COMMAND ...)", file=sys.stderr)
        return 2
    options = build_options(args)
    try:
        MountOptions.parse(options)  # bad options fail before anything is set up
        return run.run(command, args.kernel, args.modules, options, args.keep_mounted)
    except (MountError, run.RunError, OSError) as exc:
        print(f"klpfs run: {exc}", file=sys.stderr)
        return 1


def _cmd_selftests(args: argparse.Namespace) -> int:
    from klpfs.control import selftests
    try:
        if args.test_modules:
            for path in selftests.write_test_modules(Path(args.test_modules), args.kernel):
                print(path)
            return 0
        if args.fetch:
            tree = selftests.fetch_source(args.fetch) / selftests.SELFTESTS
        else:
            tree = Path(args.tree)
        return selftests.run(tree, args.kernel, args.tests)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"klpfs selftests: {exc}", file=sys.stderr)
        return 1


def _cmd_umount(args: argparse.Namespace) -> int:
    from klpfs.fs.mount import MountError, unmount
    try:
        unmount(args.mountpoint)
    except MountError as exc:
        print(f"klpfs: {exc}", file=sys.stderr)
        return 1
    return 0


def add_build_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--kallsyms", metavar="FILE",
                     help="the build's symbols: a /proc/kallsyms dump (read as root) or a System.map; "
                          "functions, sizes and sympos follow it")
    cmd.add_argument("--symvers", metavar="FILE",
                     help="the build's Module.symvers (its headers'): the module_layout CRC modules must "
                          "carry (default: none checked; --kernel host: the host's headers' when installed)")
    cmd.add_argument("--release", metavar="RELEASE",
                     help="the build's release string (uname -r, /proc/version, the vermagic modules "
                          "must carry) instead of the profile's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klpfs",
        description="The Linux kernel's live patching subsystem, emulated in user space "
                    "and mounted as a file system.",
        epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser(
        "mount", help="mount an emulated machine's /sys and /proc",
        description="Mount an emulated machine: MNT/sys/kernel/livepatch, MNT/proc, ...",
        epilog=MOUNT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("-f", "--foreground", action="store_true",
                     help="serve in the foreground, logging to stderr")
    cmd.add_argument("-d", "--debug", action="store_true",
                     help="log at debug level; implies -f, as for any FUSE file system (-o debug: "
                          "debug level only)")
    cmd.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                     help="mount options (see below)")
    cmd.add_argument("--kernel", type=kernel_version, default=DEFAULT, metavar="VERSION",
                     help=f"kernel profile: {', '.join(PROFILES)}, latest, or host: the running kernel's "
                          f"release, vermagic and /proc/kallsyms (default {DEFAULT})")
    add_build_arguments(cmd)
    cmd.add_argument("mountpoint", metavar="MNT", help="an existing empty directory")
    cmd.set_defaults(func=_cmd_mount)

    cmd = commands.add_parser("umount", help="unmount a klpfs mount (its daemon exits)",
                              description="Unmount a klpfs mount; its daemon then exits.",
                              epilog="example:\n  klpfs umount /mnt/klp",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("mountpoint", metavar="MNT")
    cmd.set_defaults(func=_cmd_umount)

    control.add_commands(commands)
    ko_command.add_command(commands)

    cmd = commands.add_parser(
        "run", help="run a command with the emulator at /sys/kernel/livepatch (needs root)",
        description="Run COMMAND in a private mount namespace where /sys/kernel/livepatch and "
                    "/sys/module/<module> are the emulator's, and insmod, rmmod, modprobe, lsmod, "
                    "modinfo and dmesg act on it.  The host's mounts are never touched.  Exits with "
                    "COMMAND's status.",
        epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--kernel", type=kernel_version, default=DEFAULT, metavar="VERSION",
                     help=f"kernel profile: {', '.join(PROFILES)}, latest, or host: the running kernel's "
                          f"release, vermagic and /proc/kallsyms (default {DEFAULT})")
    add_build_arguments(cmd)
    cmd.add_argument("--modules", action="append", default=[], metavar="DIR",
                     help="directory of module files that modprobe/insmod NAME(.ko) find (repeatable; "
                          "the shipped samples are always found)")
    cmd.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                     help="mount options for the emulator, as for klpfs mount (e.g. speed=10)")
    cmd.add_argument("--keep-mounted", action="store_true",
                     help="after COMMAND exits, keep the emulator up until interrupted (enter it with nsenter)")
    cmd.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    cmd.set_defaults(func=_cmd_run)

    cmd = commands.add_parser(
        "selftests", help="run the kernel's livepatch selftests against the emulator (needs root)",
        description="Run the kernel's own livepatch selftest scripts, unmodified, each under its own "
                    "`klpfs run`, and print their results.  Exits non-zero if any script fails.",
        epilog=SELFTESTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--kernel", type=kernel_version, default=DEFAULT, metavar="VERSION",
                     help=f"kernel profile: {', '.join(PROFILES)} or latest (default {DEFAULT})")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--test-modules", metavar="DIR",
                        help="only write the shipped selftest modules as DIR/<mod>.ko for the profile (a tree's "
                             "test_modules/, to run its scripts by hand under klpfs run), then exit")
    source.add_argument("--tree", metavar="DIR",
                        help="a kernel tree's tools/testing/selftests/livepatch directory")
    source.add_argument("--fetch", metavar="VERSION", choices=["6.1", "6.12"],
                        help="download Debian's linux-source-VERSION (6.1 or 6.12) with apt-get, keep only "
                             "the selftests, cache them")
    cmd.add_argument("tests", nargs="*", metavar="TEST", help="scripts to run, e.g. test-livepatch (default: all)")
    cmd.set_defaults(func=_cmd_selftests)

    return parser


SHIM = "shim"
"""`klpfs shim TOOL ARGS`: how the tools `klpfs run` puts on PATH call us (klpfs.control.run).
Left out of the parser: it is no command for people, and argparse cannot hide a subcommand."""


FSTAB_ONLY = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "rw"}


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """mount.fuse.klpfs: what mount(8) runs for an fstab line of type fuse.klpfs.

    It is called as `mount.fuse.klpfs SOURCE MNT -o OPTIONS`; `kernel=V` among
    the options picks the profile, the rest are klpfs mount options.
    """
    parser = argparse.ArgumentParser(prog="mount.fuse.klpfs",
                                     epilog="fstab example:\n  klpfs  /mnt/klp  fuse.klpfs  kernel=6.1,nofail  0 0",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", default="")
    args = parser.parse_args(argv)
    kernel = DEFAULT
    options = []
    for option in filter(None, args.options.split(",")):
        if option.startswith("kernel="):
            kernel = option.removeprefix("kernel=")
        elif option not in FSTAB_ONLY:
            options.append(option)
    return main(["mount", "--kernel", kernel, *(["-o", ",".join(options)] if options else []), args.mountpoint])


def version() -> str:
    """The installed klpfs's version (pyproject.toml's)."""
    try:
        return metadata.version("klpfs")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == [SHIM] and len(arguments) > 1 and arguments[1] in SHIMS:
        from klpfs.control import shims
        return shims.main(arguments[1], arguments[2:])
    args = build_parser().parse_args(arguments)
    if args.command in ("mount", "umount", "run", "selftests", "ko"):
        status: int = args.func(args)
        return status
    return control.run(args)

