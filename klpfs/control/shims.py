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

from klpfs.control.client import ControlError, request, stream
from klpfs.control.commands import format_record, print_lsmod
from klpfs.control.modfile import ModuleFileError, load_module_file
from klpfs.control.modrequest import insmod_file_args, is_ko
from klpfs.elf.kmod import KoError
from klpfs.elf.kmod import modinfo_fields as ko_modinfo_fields
from klpfs.modules.pymodule import PyModuleError, read_modinfo
from klpfs.control.run import RunState, sync_after_module_change
from klpfs.control.runtime import NoDaemon
from klpfs.control.samples import find_module_file, module_stem
from klpfs.kernel.printk import LEVEL_NAMES


class _Parser(argparse.ArgumentParser):
    """Usage errors the way the real tools exit: status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
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


def mod_strerror(err: int) -> str:
    """What kmod's insmod says for a module the kernel refused with errno `err`:
    its own words for a few errnos, strerror() for the rest."""
    words = {errno.ENOEXEC: "Invalid module format", errno.ENOENT: "Unknown symbol in module",
             errno.ESRCH: "Module has wrong symbol version", errno.EINVAL: "Invalid parameters"}
    return words.get(err, os.strerror(err))


def _load(path: Path, params: list[str]) -> dict:
    """insmod's request: the file's text, or a .ko's bytes (with X.py beside it, if any)."""
    return request(None, "insmod", params=params, **insmod_file_args(path))


def _loaded(name: str) -> bool:
    return any(m["name"] == name for m in request(None, "lsmod")["modules"])


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


def busybox_moderror(err: int) -> str:
    """busybox's moderror(): its own words for a few errnos, strerror() for the rest."""
    return {errno.ENOEXEC: "invalid module format", errno.ENOENT: "unknown symbol in module, or unknown parameter",
            errno.ESRCH: "module has wrong symbol version",
            errno.ENOSYS: "kernel does not support requested operation"}.get(err, os.strerror(err))


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
    reply = _load(path, params)
    if not reply["ok"]:
        reply = _load(path, params)
    if reply["ok"]:
        sync_after_module_change()
        return 0
    err = errno.ENOEXEC if reply.get("file_error") else reply["errno"]
    print(f"insmod: can't insert '{filename}': {busybox_moderror(err)}", file=sys.stderr)
    return err


def busybox_rmmod(argv: list[str]) -> int:
    """busybox rmmod: delete_module(O_NONBLOCK|O_EXCL) of each name, O_TRUNC with -f;
    strerror on failure."""
    status = 0
    flags = os.O_NONBLOCK | os.O_EXCL | (os.O_TRUNC if any(a in ("-f", "--force") for a in argv) else 0)
    for name in (a for a in argv if not a.startswith("-")):
        stem = module_stem(name)
        reply = request(None, "rmmod", name=stem, flags=flags)
        if reply["ok"]:
            sync_after_module_change()
            continue
        print(f"rmmod: can't unload module '{stem}': {os.strerror(reply['errno'])}", file=sys.stderr)
        status = 1
        break
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
        print(f"insmod: ERROR: could not load module {args.filename}: No such file or directory", file=sys.stderr)
        return 1
    reply = _load(path, args.args)
    if not reply["ok"]:
        error = mod_strerror(errno.ENOEXEC if reply.get("file_error") else reply["errno"])
        print(f"insmod: ERROR: could not insert module {args.filename}: {error}", file=sys.stderr)
        if reply.get("file_error") or reply.get("detail"):
            print(reply["detail"] if reply.get("detail") else reply["error"], file=sys.stderr)
        return 1
    sync_after_module_change()
    return 0


def _remove(name: str, tool: str, force: bool = False) -> int:
    """kmod's removal: delete_module(O_NONBLOCK), with O_TRUNC when forced (KMOD_REMOVE_FORCE),
    which also skips the in-use check."""
    reply = request(None, "rmmod", name=name, flags=os.O_NONBLOCK | (os.O_TRUNC if force else 0))
    if reply["ok"]:
        sync_after_module_change()
        return 0
    stem = module_stem(name)
    if tool == "modprobe":
        message = (f"Module {stem} is in use." if reply.get("in_use") else
                   f"Module {stem} is not currently loaded" if reply.get("not_loaded") else
                   f"could not remove '{stem}': {reply['error']}")
        print(f"modprobe: FATAL: {message}", file=sys.stderr)
    elif reply.get("not_loaded"):
        print(f"rmmod: ERROR: Module {stem} is not currently loaded", file=sys.stderr)
    elif reply.get("in_use"):
        print(f"rmmod: ERROR: Module {stem} is in use", file=sys.stderr)
    else:
        print(f"rmmod: ERROR: could not remove module {name}: {reply['error']}", file=sys.stderr)
    return 1


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
    parser.add_argument("module")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    if args.remove:
        return max(_remove(name, "modprobe") for name in [args.module, *args.args])
    path = find_module_file(module_stem(args.module), _search())
    if path is None:
        if not args.quiet:
            release = request(None, "status")["release"]
            print(f"modprobe: FATAL: Module {args.module} not found in directory /lib/modules/{release}",
                  file=sys.stderr)
        return 1
    if args.dry_run or _loaded(module_stem(path.name)):
        return 0
    reply = _load(path, args.args)
    if not reply["ok"]:
        print(f"modprobe: ERROR: could not insert '{module_stem(args.module)}': {reply['error']}", file=sys.stderr)
        return 1
    sync_after_module_change()
    return 0


def lsmod(argv: list[str]) -> int:
    _Parser(prog="lsmod", usage="lsmod").parse_args(argv)
    print_lsmod(request(None, "lsmod")["modules"])
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
    status = request(None, "status")
    release = args.kernel or status["release"]
    vermagic = status.get("vermagic")
    if vermagic and args.kernel:
        vermagic = args.kernel + vermagic[len(status["release"]):]
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
    levels = None if args.level is None else set(args.level.split(","))
    if levels is not None and not levels <= set(LEVEL_NAMES):
        print(f"dmesg: unknown level '{sorted(levels - set(LEVEL_NAMES))[0]}'", file=sys.stderr)
        return 1
    if args.clear:
        request(None, "clear")
        return 0
    # util-linux dmesg reads /dev/kmsg from SEEK_DATA: what came after the last clear.
    records = (stream(None, "dmesg", follow=True, since_clear=True) if args.follow
               else iter(request(None, "dmesg", since_clear=True)["records"]))
    for record in records:
        from_kernel = record["facility"] == 0  # -k and -u: kernel or userspace messages only
        if ((levels is None or record["level"] in levels)
                and (args.kernel == args.userspace or from_kernel == args.kernel)):
            print(record["text"] if args.notime else format_record(record), flush=args.follow)
    if args.read_clear:
        request(None, "clear")
    return 0



def uname(argv: list[str]) -> int:
    """The real uname, with the emulated kernel's release where the host's would show."""
    real = _real_tool("uname")
    if real is None:
        print("uname: the real uname is not installed", file=sys.stderr)
        return 1
    res = subprocess.run([real, *argv], capture_output=True, text=True)
    sys.stderr.write(res.stderr)
    release = request(None, "status")["release"]
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
