"""The Python bodies of a real .ko's functions: what klpfs does when one is called.

Machine code cannot run here, so a function's body is recovered from its code
(klpfs.elf.x86) and replayed:

* calls to printk (`_printk`) log the message when the format and every
  argument it consumes are known: string literals, constants, module
  variables (read when the call happens, so a parameter set by insmod or
  sysfs counts) and what the module's own functions returned; a message
  with any unknown argument is not logged at all (no guessed text);
* seq_printf/seq_puts/seq_putc and sysfs_emit/sprintf/scnprintf/snprintf
  print into the show call's seq_file, formatted the same way; when an
  argument is unknown, the call prints its literal string arguments instead
  (each on a line), which is all that can be said;
* calls to the module's own functions go through the kernel's call path
  (ftrace), so a livepatched function answers with its replacement;
* klp_enable_patch/klp_register_patch/klp_unregister_patch/klp_disable_patch
  act on the module's patch (klpfs.elf.klp);
* every other kernel call is skipped and returns an unknown value; the
  function returns what it leaves in %rax when that is known (a constant, a
  variable, a string literal, a call's result), else 0.

A function whose code the decoder cannot follow (branches, stores, ...)
falls back to its relocations: a show function (one that calls a seq_file
or sysfs print) prints the literal strings it references that are not
formats, each on a line; anything else returns 0.  A Python module beside the
.ko replaces all of this (klpfs.elf.companion).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from klpfs.elf.reader import ElfFile, Place
from klpfs.elf.x86 import UNKNOWN, Addr, Arg, Call, Const, Program, Result, Str, Unknown, Value, Var
from klpfs.kernel.kallsyms import Body
from klpfs.kernel.printf import SPEC, PrintfError, vsnprintf
from klpfs.kernel.printk import KERN_WARNING
from klpfs.kernel.seq_file import SeqFile

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel
    from klpfs.kernel.module import Module

PRINTK = {"_printk": 0, "printk": 0}
"""Kernel print functions -> the index of their format argument."""
OUTPUT = {"seq_printf": 1, "sysfs_emit": 1, "sprintf": 1, "scnprintf": 2, "snprintf": 2}
"""Functions that print into a show function's buffer -> the index of their format."""
SHOW_CALLS = {*OUTPUT, "seq_puts", "seq_putc", "seq_write"}
KLP_CALLS = ("klp_enable_patch", "klp_register_patch", "klp_unregister_patch", "klp_disable_patch")
KERN_SOH = "\x01"


@dataclass(frozen=True)
class ModuleAddress:
    """A pointer into the module at run time (&patch, a function's address)."""

    place: Place
    name: str


KlpCall = Callable[[str, ModuleAddress | None], int]
"""klp_enable_patch() and friends, by name, as a module's code calls them with its patch."""


class Runtime:
    """What a running .ko function reaches: the kernel, its module, its variables and patch."""

    def __init__(self, kernel: Kernel, module: Module, elf: ElfFile):
        self.kernel = kernel
        self.module = module
        self.elf = elf
        self.klp: KlpCall | None = None
        """Runs klp_enable_patch and friends for this module (set by the loader)."""

    def variable(self, var: Var) -> object:
        """A module variable: its parameter value if a parameter lives in it, else its static bytes."""
        if var.name in self.module.params:
            value = self.module.params[var.name]
            return int(value) if isinstance(value, bool) else value
        try:
            if var.size == 8:
                target = self.elf.pointer(var.place.section, var.place.offset)
                if isinstance(target, Place):
                    return self.elf.cstring(target)
            return self.elf.uint(var.place.section, var.place.offset, var.size, signed=var.signed)
        except ValueError:
            return UNKNOWN

    def function(self, name: str) -> Any:
        return next((s for s in self.module.symbols if s.name == name), None)


def _value(v: Value, rt: Runtime, args: tuple[object, ...], results: dict[int, object]) -> object:
    if isinstance(v, Str):
        return v.text
    if isinstance(v, Const):
        return v.value
    if isinstance(v, Var):
        return rt.variable(v)
    if isinstance(v, Arg):
        return args[v.index] if v.index < len(args) else None
    if isinstance(v, Result):
        return results.get(v.call, UNKNOWN)
    if isinstance(v, Addr):
        return ModuleAddress(v.place, v.name)
    return UNKNOWN


def format_known(fmt: object, values: list[object]) -> str | None:
    """The formatted text when the format and every argument it uses are known, else None."""
    if not isinstance(fmt, str):
        return None
    kinds = []
    for m in SPEC.finditer(fmt):
        if m["conv"] == "%":
            continue
        for star in (m["width"], m["prec"]):
            if star == "*":
                kinds.append("d")
        kinds.append(m["conv"])
    needed = len(kinds)
    if needed > len(values):
        return None
    used = values[:needed]
    for kind, value in zip(kinds, used):
        if kind == "s" and not (value is None or isinstance(value, str)):
            return None
        if kind in "diouxXc" and not isinstance(value, int):
            return None
        if kind in "pn":
            return None
    try:
        return vsnprintf(fmt, tuple(used))
    except PrintfError:
        return None


def _literals(values: list[object]) -> str:
    return "".join(v if v.endswith("\n") else v + "\n" for v in values if isinstance(v, str) and "%" not in v)


def _sink(buffer: object, args: tuple[object, ...]) -> SeqFile | None:
    """Where a show function's output goes: its buffer argument if that is the reader's
    seq_file, else the first seq_file it was called with."""
    if isinstance(buffer, SeqFile):
        return buffer
    return next((a for a in args if isinstance(a, SeqFile)), None)


def _printk(rt: Runtime, fmt: object, values: list[object]) -> object:
    level = KERN_WARNING
    if isinstance(fmt, str) and fmt.startswith(KERN_SOH) and len(fmt) > 1:
        if fmt[1].isdigit():
            level = int(fmt[1])
        fmt = fmt[2:]
    text = format_known(fmt, values)
    if text is None:
        return UNKNOWN
    rt.kernel.printk(level, text[:-1] if text.endswith("\n") else text)
    return len(text)


def _extern(rt: Runtime, call: Call, values: list[object], args: tuple[object, ...]) -> object:
    name = call.target
    if name in PRINTK:
        return _printk(rt, values[0], values[1:])
    if name in OUTPUT:
        i = OUTPUT[name]
        sink = _sink(values[0], args)
        text = format_known(values[i], values[i + 1:])
        if text is None:
            text = _literals(values[i:])
        if sink is not None:
            sink.puts(text)
        return len(text)
    if name == "seq_puts":
        sink = _sink(values[0], args)
        if sink is not None and isinstance(values[1], str):
            sink.puts(values[1])
        return UNKNOWN
    if name == "seq_putc":
        sink = _sink(values[0], args)
        if sink is not None and isinstance(values[1], int):
            sink.puts(chr(values[1] & 0xFF))
        return UNKNOWN
    if name in KLP_CALLS:
        if rt.klp is None:
            return -errno.EINVAL
        target = values[0] if isinstance(values[0], ModuleAddress) else None
        return rt.klp(name, target)
    return UNKNOWN


def program_body(prog: Program, rt: Runtime) -> Body:
    """The body of a decoded function: replay its calls, return its %rax."""
    def body(*args: object) -> object:
        results: dict[int, object] = {}
        for call in prog.calls:
            values = [_value(v, rt, args, results) for v in call.args]
            if call.local:
                sym = rt.function(call.target)
                ret = UNKNOWN if sym is None else rt.kernel.invoke(sym, rt.kernel.current, tuple(
                    None if isinstance(v, Unknown) else v for v in values))
            else:
                ret = _extern(rt, call, values, args)
            results[call.index] = ret
        value = _value(prog.ret, rt, args, results)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, str)):
            return value
        return 0
    body.__name__ = prog.name
    return body


def fallback_body(name: str, strings: list[str], show: bool) -> Body:
    """A function the decoder could not follow: a show function prints its literals."""
    text = _literals(list(strings)) if show else ""

    def body(*args: object) -> int:
        sink = _sink(None, args)
        if text and sink is not None:
            sink.puts(text)
        return 0
    body.__name__ = name
    return body
