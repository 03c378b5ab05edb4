"""kallsyms: every function of vmlinux and of each loaded module.

Symbols are kept per object in the order the kernel would list them, so a
name that occurs several times (static functions in different files) is
found by position, which is what klp_func.old_sympos counts (klp_find_object_symbol()
in kernel/livepatch/core.c).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from klpfs.kernel.kallsyms_file import TEXT_TYPES, SymbolFile
from klpfs.kernel.seq_file import SeqFile

VMLINUX_TEXT = 0xFFFFFFFF81000000
MODULES_TEXT = 0xFFFFFFFFC0000000
MODULE_SPAN = 0x100000
FUNC_ALIGN = 16
DEFAULT_SIZE = 0x100
"""A function's size when nothing says otherwise: an image function's, and the last
symbol of a symbol file's (the file does not say where text ends)."""
FUNCTION_PADDING_BYTES = 16
"""CONFIG_CALL_PADDING's padding before each function (x86, CONFIG_FUNCTION_PADDING_BYTES)."""
PADDING_PREFIX = "__pfx_"
"""The symbol objtool gives a function's padding: __pfx_<function>."""
LISTING_CHUNK = 4096
"""Lines joined at a time while the listing is made: never a list of every line."""

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
    kind: str | None = None
    """Its type letter in a symbol file (--kallsyms); None: laid out by klpfs, a function."""

    @property
    def is_function(self) -> bool:
        return self.kind is None or self.kind in TEXT_TYPES

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
    size: int = DEFAULT_SIZE
    body: Body = field(default=const_body(""))
    traceable: bool = True
    ret: int | None = None
    """KSym.ret."""


def _next_higher(addrs: list[int]) -> list[int]:
    """For each address the next higher one in the table, where kallsyms_lookup_size_offset()
    ends a symbol (aliases share an end); the highest gets DEFAULT_SIZE, the table not
    saying where text ends.  A sorted table (any dump) is one backward pass."""
    if all(a <= b for a, b in zip(addrs, addrs[1:])):
        ends = [0] * len(addrs)
        end = addrs[-1] + DEFAULT_SIZE
        for i in range(len(addrs) - 1, -1, -1):
            if i + 1 < len(addrs) and addrs[i + 1] > addrs[i]:
                end = addrs[i + 1]
            ends[i] = end
        return ends
    unique = sorted(set(addrs))
    following = dict(zip(unique, unique[1:]))
    return [following.get(a, a + DEFAULT_SIZE) for a in addrs]


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
        self._by_name: dict[str | None, dict[str, KSym | list[KSym]]] = {}
        """Each object's symbols by name, in table order (a list only for duplicates):
        lookups never walk a table."""
        self._vmlinux_listing: str | None = None

    def _index(self, module: str | None, syms: list[KSym]) -> None:
        index: dict[str, KSym | list[KSym]] = {}
        for sym in syms:
            seen = index.get(sym.name)
            if seen is None:
                index[sym.name] = sym
            elif isinstance(seen, list):
                seen.append(sym)
            else:
                index[sym.name] = [seen, sym]
        self._by_name[module] = index

    def add_vmlinux(self, funcs: list[FuncDef], symbols: SymbolFile | None) -> list[KSym]:
        """vmlinux: the image's functions laid out (add_object), or a build's symbol file.

        From a file every symbol keeps its address, type and table position; its size
        is the distance to the next higher address, as kallsyms_lookup_size_offset()
        computes it.  An image function the file has lends that symbol its behaviour;
        one the file lacks is laid out after the file's last symbol, so the emulated
        tasks can still run in it.
        """
        if symbols is None:
            return self.add_object(None, funcs)
        ends = _next_higher(symbols.addrs)
        syms = [KSym(name, addr, end - addr, None, traceable=kind in TEXT_TYPES, kind=kind)
                for name, addr, kind, end in zip(symbols.names, symbols.addrs, symbols.kinds, ends)]
        first_text: dict[str, KSym] = {}
        for sym in syms:
            if sym.traceable:
                first_text.setdefault(sym.name, sym)
        addr = -(-max(ends) // FUNC_ALIGN) * FUNC_ALIGN
        for f in funcs:
            found = first_text.get(f.name)
            if found is not None:
                found.body, found.traceable = f.body, f.traceable
                continue
            syms.append(KSym(f.name, addr, f.size, None, f.body, f.traceable, f.ret, "T"))
            addr += -(-f.size // FUNC_ALIGN) * FUNC_ALIGN
        for sym in syms:
            self._at.setdefault(sym.addr, sym)
        self._starts = sorted(self._at)
        self._next_module_base = max(MODULES_TEXT, -(-addr // MODULE_SPAN) * MODULE_SPAN)
        self._by_object[None] = syms
        self._index(None, syms)
        self.vmlinux_listing()  # made at boot: the first `cat /proc/kallsyms` costs no more than the next
        return syms

    def vmlinux_listing(self) -> str:
        """vmlinux's lines of /proc/kallsyms (s_show()), made once: vmlinux never changes.

        From a symbol file: its symbols as it gives them.  Laid out by klpfs: a name
        that occurs more than once is a static function, 't'; with CONFIG_CALL_PADDING
        each function's padding comes first, as the __pfx_ symbol objtool gives it."""
        if self._vmlinux_listing is None:
            index = self._by_name.get(None, {})
            chunks, lines = [], []
            for sym in self.symbols(None):
                kind = sym.kind or ("t" if isinstance(index.get(sym.name), list) else "T")
                if sym.kind is None and self.padding:
                    lines.append(f"{sym.addr - self.padding:016x} {kind} {PADDING_PREFIX}{sym.name}\n")
                lines.append(f"{sym.addr:016x} {kind} {sym.name}\n")
                if len(lines) >= LISTING_CHUNK:
                    chunks.append("".join(lines))
                    lines.clear()
            chunks.append("".join(lines))
            self._vmlinux_listing = "".join(chunks)
        return self._vmlinux_listing

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
        self._index(module, syms)
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
        self._by_name.pop(module, None)
        for sym in self._by_object.pop(module, []):
            del self._at[sym.addr]
            del self._starts[bisect.bisect_left(self._starts, sym.addr)]

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
        """First function of that name in the object (what `call FUNC` means): a symbol
        file's data symbols of the name are passed over."""
        seen = self._by_name.get(module, {}).get(name)
        if isinstance(seen, list):
            return next((sym for sym in seen if sym.is_function), None)
        return seen if seen is not None and seen.is_function else None

    def find_all(self, name: str, module: str | None = None) -> list[KSym]:
        """Every symbol of that name in the object, in table order: what
        kallsyms_on_each_symbol() would meet, without walking the table."""
        seen = self._by_name.get(module, {}).get(name)
        return seen if isinstance(seen, list) else [] if seen is None else [seen]

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
        for module in self._by_object:
            sym = self.find(name, module)
            if sym is not None:
                return sym
        return None
