"""kallsyms: every function of vmlinux and of each loaded module.

Symbols are kept per object in the order the kernel would list them, so a
name that occurs several times (static functions in different files) is
found by position, which is what klp_func.old_sympos counts (spec §3.4).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from klpfs.kernel.seq_file import SeqFile

VMLINUX_TEXT = 0xFFFFFFFF81000000
MODULES_TEXT = 0xFFFFFFFFC0000000
MODULE_SPAN = 0x100000
FUNC_ALIGN = 16
FUNCTION_PADDING_BYTES = 16
"""CONFIG_CALL_PADDING's padding before each function (x86, CONFIG_FUNCTION_PADDING_BYTES)."""
PADDING_PREFIX = "__pfx_"
"""The symbol objtool gives a function's padding: __pfx_<function>."""

Body = Callable[..., object]
"""What calling the function does: body(*args) -> its return value, run as
the calling task (Kernel.call).  A show function gets a SeqFile first."""


def const_body(text: str) -> Body:
    """A show function that always prints the same text."""
    def show(m: object = None, *_: object) -> int:
        if isinstance(m, SeqFile):
            m.puts(text)
        return 0
    return show


@dataclass(eq=False, slots=True)
class KSym:
    """One function: where it lives, how big it is and what it does."""

    name: str
    addr: int
    size: int
    module: str | None
    body: Body = field(default=const_body(""))
    traceable: bool = True
    """False for notrace functions: ftrace has no location for them."""
    ret: int | None = None
    """Where in it a frame of a sleeping task returns to, when the kernel shown has it;
    by default the middle of the function."""

    @property
    def object_name(self) -> str:
        return self.module or "vmlinux"

    @property
    def return_offset(self) -> int:
        """The offset of the return address a call made from inside it leaves on a stack."""
        return self.size // 2 if self.ret is None else self.ret

    def contains(self, addr: int) -> bool:
        return self.addr <= addr < self.addr + self.size


@dataclass(slots=True)
class FuncDef:
    """A function as an image or module file declares it, before it has an address."""

    name: str
    size: int = 0x100
    body: Body = field(default=const_body(""))
    traceable: bool = True
    ret: int | None = None
    """KSym.ret."""


class Kallsyms:
    """Symbol tables by object (None = vmlinux) plus an address index.

    With `padding` (CONFIG_CALL_PADDING) every function is laid out that many
    bytes after the previous one's end, the padding its __pfx_ symbol.
    """

    def __init__(self, padding: int = 0) -> None:
        self.padding = padding
        self._by_object: dict[str | None, list[KSym]] = {}
        self._starts: list[int] = []
        self._at: dict[int, KSym] = {}
        self._next_module_base = MODULES_TEXT
        self._free_area: tuple[int, int] | None = None
        """[start, end) of module_alloc()'s current span."""

    def add_object(self, module: str | None, funcs: list[FuncDef]) -> list[KSym]:
        """Lay out an object's functions one after another, as the linker would."""
        if module is None:
            addr = VMLINUX_TEXT
        else:
            addr = self._next_module_base
            self._next_module_base += MODULE_SPAN * (1 + sum(f.size for f in funcs) // MODULE_SPAN)
        syms = []
        for f in funcs:
            addr += self.padding
            sym = KSym(f.name, addr, f.size, module, f.body, f.traceable, f.ret)
            syms.append(sym)
            self._at[addr] = sym
            bisect.insort(self._starts, addr)
            addr += -(-f.size // FUNC_ALIGN) * FUNC_ALIGN
        self._by_object[module] = syms
        return syms

    def module_alloc(self, size: int) -> int:
        """Address space in the module area that holds no symbol (module_alloc() for an
        ftrace trampoline): %pS of an address in it prints the bare address."""
        if self._free_area is None or self._free_area[0] + size > self._free_area[1]:
            base = self._next_module_base
            self._next_module_base += MODULE_SPAN * (1 + size // MODULE_SPAN)
            self._free_area = (base, self._next_module_base)
        addr = self._free_area[0]
        self._free_area = (addr + size, self._free_area[1])
        return addr

    def remove_object(self, module: str) -> None:
        for sym in self._by_object.pop(module, []):
            del self._at[sym.addr]
            del self._starts[bisect.bisect_left(self._starts, sym.addr)]

    def each_symbol(self, module: str | None) -> Iterator[KSym]:
        """kallsyms_on_each_symbol restricted to one object, in table order."""
        return iter(self._by_object.get(module, ()))

    def symbols(self, module: str | None) -> list[KSym]:
        return self._by_object.get(module, [])

    def lookup(self, addr: int) -> KSym | None:
        """The function containing addr (kallsyms_lookup_size_offset)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        sym = self._at[self._starts[i]]
        return sym if sym.contains(addr) else None

    def at(self, addr: int) -> KSym | None:
        """The function starting exactly at addr."""
        return self._at.get(addr)

    def find(self, name: str, module: str | None = None) -> KSym | None:
        """First function of that name in the object (what `call FUNC` means)."""
        for sym in self._by_object.get(module, ()):
            if sym.name == name:
                return sym
        return None

    def find_each(self, names: Iterable[str], module: str | None = None) -> list[KSym]:
        """The first function of each name; ValueError names one that does not exist."""
        syms = []
        for name in names:
            sym = self.find(name, module)
            if sym is None:
                raise ValueError(f"no function {name!r} in {module or 'vmlinux'}")
            syms.append(sym)
        return syms

    def objects(self) -> list[str | None]:
        """vmlinux (None) first, then the modules in load order."""
        return list(self._by_object)

    def find_any(self, name: str) -> KSym | None:
        """First function of that name anywhere: vmlinux first, then modules."""
        for syms in self._by_object.values():
            for sym in syms:
                if sym.name == name:
                    return sym
        return None
