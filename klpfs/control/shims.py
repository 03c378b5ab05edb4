"""insmod, rmmod, modprobe, lsmod, modinfo, dmesg and uname as livepatch tools call them,
acting on the emulator and answering in the real tools' formats and exit codes.

`klpfs run` puts these first on PATH.  Module names resolve to module files
in the run's --modules directories, then the shipped samples, so a script
written for a real kernel's .ko files finds their emulated counterparts.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from klpfs.control.client import Client, ControlError, Refused
from klpfs.control.commands import print_lsmod
from klpfs.control.logview import UnknownLevel, format_record, parse_levels, wanted
from klpfs.control.modfile import ModuleFileError, load_module_file
from klpfs.control.modrequest import is_ko
from klpfs.control.run import RunState, sync_after_module_change
from klpfs.control.runtime import NoDaemon
from klpfs.control.samples import find_module_file, module_stem
from klpfs.control.toolwords import (
    busybox_insert, busybox_remove, kmod_insert, kmod_missing, kmod_remove, mod_strerror, modprobe_insert,
    modprobe_remove)
from klpfs.elf.kmod import MODULE_INIT_IGNORE_MODVERSIONS, MODULE_INIT_IGNORE_VERMAGIC, KoError
from klpfs.elf.kmod import modinfo_fields as ko_modinfo_fields
from klpfs.modules.pymodule import PyModuleError, read_modinfo

__all__ = ["TOOLS", "main", "mod_strerror"]

CLIENT = Client()
"""The run's only daemon, found from the run's runtime directory (KLPFS_RUNTIME_DIR)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors the way the real tools exit: status 1."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(1)


def _search() -> list[Path]:
    state = RunState.current()
    return state.modules_dirs if state is not None else []


def _resolve(name: str) -> Path | None:
    """A module file for NAME: the file itself if it is one, else by module name."""
    path = Path(name)
    if path.suffix in (".toml", ".py", ".ko") and path.is_file():
        return path
    return find_module_file(module_stem(name), _search())


def _loaded(name: str) -> bool:
    return any(m.name == name for m in CLIENT.lsmod())


def _real_tool(tool: str) -> str | None:
    """The program the shim stands in for: the next `tool` on PATH after the shims."""
    state = RunState.current()
    shim_dir = str(state.workdir / "bin") if state is not None else ""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != shim_dir)
    return shutil.which(tool, path=path)


def _busybox(tool: str) -> bool:
    """Does the namespace's `tool` belong to busybox (then answer in busybox's words)?"""
    real = _real_tool(tool)
    return real is not None and Path(os.path.realpath(real)).name == "busybox"


def busybox_insmod(argv: list[str]) -> int:
    """busybox insmod: finit_module(), and after a failure init_module() of the
    same file once more (bb_init_module); the exit status is that errno."""
    if not argv:
        print("BusyBox insmod: usage: insmod FILE [SYMBOL=VALUE]...", file=sys.stderr)
        return 1
    filename, params = argv[0], argv[1:]
    path = _resolve(filename)
    if path is None:
        print(f"insmod: can't insert '{filename}': No such file or directory", file=sys.stderr)
        return 256 - errno.ENOENT
    try:
        try:
            CLIENT.insmod(path, params)
        except Refused:
            CLIENT.insmod(path, params)
    except Refused as refusal:
        err = errno.ENOEXEC if refusal.file_error else refusal.errno
        print(busybox_insert(filename, err), file=sys.stderr)
        return err
    sync_after_module_change()
    return 0


def busybox_rmmod(argv: list[str]) -> int:
    """busybox rmmod: delete_module(O_NONBLOCK|O_EXCL) of each name, O_TRUNC with -f;
    strerror on failure."""
    status = 0
    flags = os.O_NONBLOCK | os.O_EXCL | (os.O_TRUNC if any(a in ("-f", "--force") for a in argv) else 0)
    for name in (a for a in argv if not a.startswith("-")):
        stem = module_stem(name)
        try:
            CLIENT.rmmod(stem, flags)
        except Refused as refusal:
            print(busybox_remove(stem, refusal), file=sys.stderr)
            status = 1
            break
        sync_after_module_change()
    return status


def insmod(argv: list[str]) -> int:
    if _busybox("insmod"):
        return busybox_insmod(argv)
    parser = _Parser(prog="insmod", usage="insmod [options] filename [args]")
    parser.add_argument("-f", "--force", action="store_true")
    parser.add_argument("-s", "--syslog", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("filename")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    path = _resolve(args.filename)
    if path is None:
        print(kmod_missing(args.filename), file=sys.stderr)
        return 1
    try:
        # kmod's insmod -f: KMOD_PROBE_FORCE_MODVERSION | KMOD_PROBE_FORCE_VERMAGIC.
        CLIENT.insmod(path, args.args,
                      flags=MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC if args.force else 0)
    except Refused as refusal:
        print("\n".join(kmod_insert(args.filename, refusal)), file=sys.stderr)
        return 1
    sync_after_module_change()
    return 0


def _remove(name: str, tool: str, force: bool = False) -> int:
    """kmod's removal: delete_module(O_NONBLOCK), with O_TRUNC when forced (KMOD_REMOVE_FORCE),
    which also skips the in-use check."""
    try:
        CLIENT.rmmod(name, os.O_NONBLOCK | (os.O_TRUNC if force else 0))
    except Refused as refusal:
        stem = module_stem(name)
        print(modprobe_remove(stem, refusal) if tool == "modprobe" else kmod_remove(name, refusal, stem),
              file=sys.stderr)
        return 1
    sync_after_module_change()
    return 0


def rmmod(argv: list[str]) -> int:
    if _busybox("rmmod"):
        return busybox_rmmod(argv)
    parser = _Parser(prog="rmmod", usage="rmmod [options] modulename ...")
    for flag, long in (("-f", "--force"), ("-s", "--syslog"), ("-v", "--verbose"), ("-w", "--wait")):
        parser.add_argument(flag, long, action="store_true")
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args(argv)
    return max(_remove(name, "rmmod", args.force) for name in args.modules)


def modprobe(argv: list[str]) -> int:
    parser = _Parser(prog="modprobe", usage="modprobe [options] [-r] modulename [module parameters...]")
    parser.add_argument("-r", "--remove", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-n", "--dry-run", action="store_true")
    # kmod's modprobe: -f is both --force-vermagic and --force-modversion (and, with -r,
    # a forced removal); each passes its finit_module() flag.
    parser.add_argument("-f", "--force", action="store_true")
    parser.add_argument("--force-vermagic", action="store_true")
    parser.add_argument("--force-modversion", action="store_true")
    parser.add_argument("module")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    if args.remove:
        return max(_remove(name, "modprobe", args.force) for name in [args.module, *args.args])
    path = find_module_file(module_stem(args.module), _search())
    if path is None:
        if not args.quiet:
            release = CLIENT.kernel().release
            print(f"modprobe: FATAL: Module {args.module} not found in directory /lib/modules/{release}",
                  file=sys.stderr)
        return 1
    if args.dry_run or _loaded(module_stem(path.name)):
        return 0
    flags = ((MODULE_INIT_IGNORE_VERMAGIC if args.force or args.force_vermagic else 0)
             | (MODULE_INIT_IGNORE_MODVERSIONS if args.force or args.force_modversion else 0))
    try:
        CLIENT.insmod(path, args.args, flags=flags)
    except Refused as refusal:
        print(modprobe_insert(module_stem(args.module), refusal), file=sys.stderr)
        return 1
    sync_after_module_change()
    return 0


def lsmod(argv: list[str]) -> int:
    _Parser(prog="lsmod", usage="lsmod").parse_args(argv)
    print_lsmod(CLIENT.lsmod())
    return 0


def _modinfo_fields(path: Path, release: str, vermagic: str | None = None) -> list[tuple[str, str]]:
    """modinfo's fields, in its order: a .ko's own .modinfo, or what a TOML or Python module
    would have as one (with the kernel's vermagic); ModuleFileError/PyModuleError/KoError."""
    data = path.read_bytes()
    if is_ko(path, data):
        return ko_modinfo_fields(path, data)
    if path.suffix == ".py":
        pm = read_modinfo(path, path.read_text())
        name, license, description, authors = pm.name, pm.license, pm.description, pm.authors
        livepatch, intree = pm.info.get("livepatch") == "Y", pm.info.get("intree", "Y") == "Y"
        params = pm.params
    else:
        mf = load_module_file(path)
        name, license, description, authors = mf.name, mf.license, mf.description, []
        livepatch, intree = mf.livepatch, not mf.out_of_tree
        params = [(pname, p.description, p.type) for pname, p in mf.params.items()]
    fields = [("filename", str(path.resolve()))]
    if livepatch:
        fields.append(("livepatch", "Y"))
    fields += [("license", license)]
    fields += [("author", author) for author in authors]
    if description:
        fields.append(("description", description))
    fields += [("depends", ""), ("retpoline", "Y")]
    if intree:
        fields.append(("intree", "Y"))
    fields += [("name", name), ("vermagic", vermagic or f"{release} SMP mod_unload modversions ")]
    fields += [("parm", f"{pname}:{desc} ({ptype})") for pname, desc, ptype in params]
    return fields


def modinfo(argv: list[str]) -> int:
    parser = _Parser(prog="modinfo", usage="modinfo [options] filename [args]")
    parser.add_argument("-F", "--field")
    parser.add_argument("-k", dest="kernel")
    parser.add_argument("modules", nargs="+")
    args = parser.parse_args(argv)
    kernel = CLIENT.kernel()
    release = args.kernel or kernel.release
    vermagic = kernel.vermagic
    if vermagic and args.kernel:
        vermagic = args.kernel + vermagic[len(kernel.release):]
    status = 0
    for name in args.modules:
        path = _resolve(name)
        if path is None:
            print(f"modinfo: ERROR: Module {name} not found.", file=sys.stderr)
            status = 1
            continue
        try:
            fields = _modinfo_fields(path, release, vermagic)
        except (ModuleFileError, PyModuleError, KoError) as e:
            print(f"modinfo: ERROR: could not get modinfo from '{name}': Invalid argument\n{e}", file=sys.stderr)
            status = 1
            continue
        for key, value in fields:
            if args.field is None:
                # kmod: printf("%s:%-*s%s", key, 15 - keylen, "", value); a negative width pads too.
                print(f"{key}:{' ' * abs(15 - len(key))}{value}")
            elif key == args.field:
                print(value)
    return status


def dmesg(argv: list[str]) -> int:
    parser = _Parser(prog="dmesg", usage="dmesg [options]")
    parser.add_argument("-w", "--follow", action="store_true")
    parser.add_argument("-l", "--level")
    parser.add_argument("-k", "--kernel", action="store_true")
    parser.add_argument("-u", "--userspace", action="store_true")
    parser.add_argument("-t", "--notime", action="store_true")
    parser.add_argument("-C", "--clear", action="store_true")
    parser.add_argument("-c", "--read-clear", action="store_true")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels(args.level)
    except UnknownLevel as e:
        print(e, file=sys.stderr)
        return 1
    if args.clear:
        CLIENT.clear()
        return 0
    # util-linux dmesg reads /dev/kmsg from SEEK_DATA: what came after the last clear.
    records = CLIENT.follow(since_clear=True) if args.follow else iter(CLIENT.dmesg(since_clear=True))
    for record in records:
        if wanted(record, levels, args.kernel, args.userspace):
            print(format_record(record, args.notime), flush=args.follow)
    if args.read_clear:
        CLIENT.clear()
    return 0


def uname(argv: list[str]) -> int:
    """The real uname, with the emulated kernel's release where the host's would show."""
    real = _real_tool("uname")
    if real is None:
        print("uname: the real uname is not installed", file=sys.stderr)
        return 1
    res = subprocess.run([real, *argv], capture_output=True, text=True)
    sys.stderr.write(res.stderr)
    release = CLIENT.kernel().release
    sys.stdout.write(res.stdout.replace(os.uname().release, release))
    return res.returncode


def main(tool: str, argv: list[str]) -> int:
    # A reader that stops early (`modinfo X | head -3`) ends the tool by SIGPIPE, as it
    # ends kmod's C tools, not with a Python traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return TOOLS[tool](argv)
    except (NoDaemon, ControlError) as e:
        print(f"{tool}: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "insmod": insmod, "rmmod": rmmod, "modprobe": modprobe, "lsmod": lsmod, "modinfo": modinfo, "dmesg": dmesg,
    "uname": uname}
