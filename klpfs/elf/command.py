"""`klpfs ko`: write a module file out as a .ko that file inspectors (readelf, modinfo,
kpatch) take for a kernel module, and that `klpfs insmod` loads like its source.

It needs no daemon: like kbuild, it only turns a source into a module file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from klpfs.profiles import DEFAULT, PROFILES, get_profile

EXAMPLES = """\
examples:
  klpfs ko test_klp_livepatch --kernel 6.1      # a shipped module, by name: ./test_klp_livepatch.ko
  klpfs ko ./my-patch.toml                      # writes ./my-patch.ko, next to it
  klpfs ko ./fix.py -o /tmp/ko/ --kernel latest # into a directory
  readelf -p .gnu.linkonce.this_module test_klp_livepatch.ko
  modinfo ./test_klp_livepatch.ko
"""


def _kernel(value: str) -> str:
    try:
        return get_profile(value).version
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `klpfs ko` on the CLI's subparsers."""
    cmd = subparsers.add_parser(
        "ko", help="write a module file (.py or .toml) out as an ELF kernel module (.ko)",
        description="Write a module file out as an ELF relocatable .ko, built for a kernel profile: "
                    ".modinfo (vermagic from the profile), .gnu.linkonce.this_module, the functions "
                    "as symbols, and the module file itself, so `klpfs insmod X.ko` loads it as before.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("file", help="a module file (.py or .toml), or the name of a shipped module")
    cmd.add_argument("-o", dest="out", metavar="OUT",
                     help="the .ko to write, or a directory to write it in (default: next to FILE; "
                          "the current directory for a shipped module named by name)")
    cmd.add_argument("--kernel", type=_kernel, default=DEFAULT, metavar="VERSION",
                     help=f"the kernel profile to build for: {', '.join(PROFILES)} or latest (default {DEFAULT})")
    cmd.set_defaults(func=cmd_ko)


def cmd_ko(args: argparse.Namespace) -> int:
    from klpfs.control.modfile import ModuleFileError
    from klpfs.control.samples import find_module_file, list_samples
    from klpfs.elf.writer import write_ko_file
    from klpfs.modules.pymodule import PyModuleError

    path = find_module_file(args.file)
    if path is None:
        names = ", ".join(p.stem for p in list_samples())
        print(f"klpfs ko: {args.file}: no such module file (shipped modules: {names})", file=sys.stderr)
        return 1
    out = args.out
    if out is None and not Path(args.file).is_file():
        out = Path.cwd()  # a shipped module: not into the installed package
    try:
        written = write_ko_file(path, get_profile(args.kernel), out)
    except (ModuleFileError, PyModuleError, ValueError, OSError) as exc:
        print(f"klpfs ko: {exc}", file=sys.stderr)
        return 1
    print(written)
    return 0
