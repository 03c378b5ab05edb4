"""A small reader of 64-bit little-endian relocatable ELF files (kernel modules).

Written with `struct` rather than pyelftools: klpfs needs only the section
headers, the symbol table, RELA relocations and section contents, a module
file is read once and whole, and the reader stays free of a dependency (and
of a library's tolerance of files the kernel would refuse).

Every problem with a file -- not ELF, truncated, 32-bit, big endian, not
ET_REL, another machine, offsets or indexes pointing outside the file --
raises ElfError, whose message names the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property

ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_REL = 1
EM_386, EM_X86_64 = 3, 62
MACHINES = {0: "none", 3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
            62: "x86-64", 183: "AArch64", 243: "RISC-V"}

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")

SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA = 0, 1, 2, 3, 4
SHT_NOBITS, SHT_REL = 8, 9
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
SHF_RELA_LIVEPATCH = 0x00100000
"""A `.klp.rela.<object>.<section>` section: relocations livepatch applies (include/uapi/linux/elf.h)."""
SHF_RO_AFTER_INIT = 0x00200000

SHN_UNDEF = 0
SHN_LIVEPATCH = 0xFF20
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
SHN_LORESERVE = 0xFF00

STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4

# The relocation types x86-64 modules carry (arch/x86/kernel/module.c apply_relocate_add).
R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_PC32 = 2
R_X86_64_PLT32 = 4
R_X86_64_32 = 10
R_X86_64_32S = 11
R_X86_64_PC64 = 24
MODULE_RELOCATIONS = {R_X86_64_NONE: "R_X86_64_NONE", R_X86_64_64: "R_X86_64_64", R_X86_64_PC32: "R_X86_64_PC32",
                      R_X86_64_PLT32: "R_X86_64_PLT32", R_X86_64_32: "R_X86_64_32",
                      R_X86_64_32S: "R_X86_64_32S", R_X86_64_PC64: "R_X86_64_PC64"}
PC_RELATIVE = {R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_PC64}


class ElfError(ValueError):
    """A file that is not a readable x86-64 relocatable ELF object; the message says why."""


@dataclass(frozen=True, slots=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


@dataclass(frozen=True, slots=True)
class Symbol:
    index: int
    name: str
    value: int
    size: int
    bind: int
    type: int
    shndx: int

    @property
    def defined(self) -> bool:
        return self.shndx != SHN_UNDEF and self.shndx < SHN_LORESERVE


@dataclass(frozen=True, slots=True)
class Rela:
    offset: int
    type: int
    sym: int
    addend: int


@dataclass(frozen=True, slots=True)
class Place:
    """A location inside the file's sections: what a relocation points at."""

    section: int
    offset: int


@dataclass(frozen=True, slots=True)
class Extern:
    """A relocation against a symbol the module does not define (a kernel symbol)."""

    name: str
    addend: int


@dataclass
class ElfFile:
    """The parts of a relocatable ELF file a module loader reads."""

    data: bytes
    sections: list[Section] = field(default_factory=list)
    symbols: list[Symbol] = field(default_factory=list)
    symtab: Section | None = None
    relas: dict[int, list[Rela]] = field(default_factory=dict)
    """Target section index -> its relocations (from SHT_RELA sections), in file order."""
    rela_sections: list[Section] = field(default_factory=list)

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.sections = []
        self.symbols = []
        self.symtab = None
        self.relas = {}
        self.rela_sections = []
        self._by_rela_section: dict[int, list[Rela]] = {}
        self._header()
        self._section_headers()
        self._symbols()
        self._relocations()

    # -- parsing ----------------------------------------------------------------------------

    def _header(self) -> None:
        data = self.data
        if len(data) < 4 or data[:4] != ELFMAG:
            raise ElfError("not an ELF file (no \\x7fELF magic)")
        if len(data) < EHDR.size:
            raise ElfError(f"truncated: {len(data)} bytes, shorter than the 64-byte ELF64 header")
        ident = data[:16]
        if ident[4] != ELFCLASS64:
            kind = "32-bit (ELFCLASS32)" if ident[4] == ELFCLASS32 else f"of class {ident[4]}"
            raise ElfError(f"a {kind} ELF file: x86-64 kernel modules are ELFCLASS64")
        if ident[5] != ELFDATA2LSB:
            kind = "big endian (ELFDATA2MSB)" if ident[5] == ELFDATA2MSB else f"of data encoding {ident[5]}"
            raise ElfError(f"a {kind} ELF file: x86-64 kernel modules are little endian")
        (_, e_type, e_machine, _, _, _, e_shoff, _, _, _, _, e_shentsize, e_shnum, e_shstrndx) = EHDR.unpack_from(data)
        if e_type != ET_REL:
            raise ElfError(f"ELF type {e_type}, not a relocatable object (ET_REL, what a .ko is)")
        if e_machine != EM_X86_64:
            raise ElfError(f"an ELF file for machine {e_machine} ({MACHINES.get(e_machine, 'unknown')}), not x86-64")
        if e_shentsize != SHDR.size:
            raise ElfError(f"section header entries of {e_shentsize} bytes, not {SHDR.size}")
        if e_shoff == 0 or e_shnum == 0:
            raise ElfError("no section header table")
        if e_shoff + e_shnum * SHDR.size > len(data):
            raise ElfError(f"truncated: the section header table ({e_shnum} entries at {e_shoff:#x}) "
                           f"ends past the file's {len(data)} bytes")
        if not 0 < e_shstrndx < e_shnum:
            raise ElfError(f"section name table index {e_shstrndx} outside 1..{e_shnum - 1}")
        self.shoff, self.shnum, self.shstrndx = e_shoff, e_shnum, e_shstrndx

    def _section_headers(self) -> None:
        raw = [SHDR.unpack_from(self.data, self.shoff + i * SHDR.size) for i in range(self.shnum)]
        names_hdr = raw[self.shstrndx]
        names = self._bounded(names_hdr[4], names_hdr[5], "the section name table")
        for i, (name, stype, flags, addr, offset, size, link, info, align, entsize) in enumerate(raw):
            if stype not in (SHT_NOBITS, SHT_NULL):
                self._bounded(offset, size, f"section {i}")
            self.sections.append(Section(i, _cstring(names, name, f"section {i}'s name"), stype, flags, addr,
                                         offset, size, link, info, align, entsize))

    def _bounded(self, offset: int, size: int, what: str) -> bytes:
        if offset + size > len(self.data):
            raise ElfError(f"truncated: {what} ({size} bytes at {offset:#x}) ends past the file's "
                           f"{len(self.data)} bytes")
        return self.data[offset:offset + size]

    def _symbols(self) -> None:
        symtab = next((s for s in self.sections if s.type == SHT_SYMTAB), None)
        if symtab is None:
            return
        if not 0 < symtab.link < len(self.sections):
            raise ElfError(f"the symbol table's string table index {symtab.link} is not a section")
        self.symtab = symtab
        strtab = self.section_data(self.sections[symtab.link])
        raw = self.section_data(symtab)
        if symtab.entsize not in (0, SYM.size) or len(raw) % SYM.size:
            raise ElfError(f"symbol table entries of {symtab.entsize} bytes ({len(raw)} in all), not {SYM.size}")
        for i in range(len(raw) // SYM.size):
            name, info, _, shndx, value, size = SYM.unpack_from(raw, i * SYM.size)
            self.symbols.append(Symbol(i, _cstring(strtab, name, f"symbol {i}'s name"), value, size,
                                       info >> 4, info & 0xF, shndx))

    def _relocations(self) -> None:
        for sec in self.sections:
            if sec.type == SHT_REL:
                raise ElfError(f"{sec.name}: REL relocations; x86-64 modules use RELA")
            if sec.type != SHT_RELA:
                continue
            raw = self.section_data(sec)
            if len(raw) % RELA.size:
                raise ElfError(f"{sec.name}: {len(raw)} bytes is not a whole number of {RELA.size}-byte entries")
            if not 0 < sec.info < len(self.sections):
                raise ElfError(f"{sec.name}: relocates section {sec.info}, which does not exist")
            relas = []
            for i in range(len(raw) // RELA.size):
                offset, info, addend = RELA.unpack_from(raw, i * RELA.size)
                rela = Rela(offset, info & 0xFFFFFFFF, info >> 32, addend)
                if rela.sym >= len(self.symbols):
                    raise ElfError(f"{sec.name}: relocation {i} names symbol {rela.sym}, past the symbol table")
                relas.append(rela)
            self.rela_sections.append(sec)
            self._by_rela_section[sec.index] = relas
            self.relas.setdefault(sec.info, []).extend(relas)

    # -- access -------------------------------------------------------------------------------

    def section_data(self, sec: Section) -> bytes:
        """A section's bytes (zeros for SHT_NOBITS, such as .bss)."""
        if sec.type == SHT_NOBITS:
            return bytes(sec.size)
        return self.data[sec.offset:sec.offset + sec.size]

    def relas_of(self, sec: Section) -> list[Rela]:
        """The relocations one RELA section holds."""
        return self._by_rela_section.get(sec.index, [])

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    @cached_property
    def _relas_by_offset(self) -> dict[int, dict[int, Rela]]:
        return {index: {r.offset: r for r in relas} for index, relas in self.relas.items()}

    def rela_at(self, section: int, offset: int) -> Rela | None:
        """The relocation (of a RELA section, not a .klp.rela one) that patches this place."""
        return self._relas_by_offset.get(section, {}).get(offset)

    def target(self, rela: Rela) -> Place | Extern:
        """Where a relocation points, before the PC-relative adjustment: a place in this
        file (section symbol or defined symbol, plus addend) or an external symbol."""
        sym = self.symbols[rela.sym]
        if not sym.defined:
            return Extern(sym.name, rela.addend)
        if sym.shndx >= len(self.sections):
            raise ElfError(f"symbol {sym.name!r} is in section {sym.shndx}, which does not exist")
        return Place(sym.shndx, sym.value + rela.addend)

    def pointer(self, section: int, offset: int) -> Place | Extern | int:
        """An 8-byte pointer field: what its R_X86_64_64 relocation points at, or its raw
        value (0 for NULL) when nothing relocates it."""
        rela = self.rela_at(section, offset)
        if rela is not None and rela.type == R_X86_64_64:
            return self.target(rela)
        return self.u64(section, offset)

    def read(self, section: int, offset: int, size: int) -> bytes:
        sec = self.sections[section]
        if offset < 0 or offset + size > sec.size:
            raise ElfError(f"{sec.name}: {size} bytes at {offset:#x} reach past its {sec.size} bytes")
        return self.section_data(sec)[offset:offset + size]

    def u64(self, section: int, offset: int) -> int:
        return int.from_bytes(self.read(section, offset, 8), "little")

    def uint(self, section: int, offset: int, size: int, signed: bool = False) -> int:
        return int.from_bytes(self.read(section, offset, size), "little", signed=signed)

    def cstring(self, place: Place, limit: int = 4096) -> str:
        """The NUL-terminated string at a place (a string literal, a name)."""
        sec = self.sections[place.section]
        data = self.section_data(sec)
        if not 0 <= place.offset < len(data):
            raise ElfError(f"{sec.name}: a string at {place.offset:#x} lies past its {len(data)} bytes")
        end = data.find(b"\0", place.offset, place.offset + limit)
        if end < 0:
            raise ElfError(f"{sec.name}: the string at {place.offset:#x} has no terminating NUL")
        return data[place.offset:end].decode("utf-8", "surrogateescape")

    def symbols_in(self, section: int) -> list[Symbol]:
        return [s for s in self.symbols if s.shndx == section]

    def object_at(self, place: Place) -> Symbol | None:
        """The named data object (STT_OBJECT) whose extent contains the place."""
        for sym in self.symbols:
            if (sym.shndx == place.section and sym.type == STT_OBJECT
                    and sym.value <= place.offset < sym.value + max(sym.size, 1)):
                return sym
        return None

    def function_at(self, place: Place) -> Symbol | None:
        """The function symbol that starts exactly at the place."""
        return next((s for s in self.symbols if s.shndx == place.section and s.type == STT_FUNC
                     and s.value == place.offset), None)

    def describe(self, place: Place | Extern | int) -> str:
        """A place as a person reads it: `.data+0x40`, a symbol, or a number."""
        if isinstance(place, Extern):
            return place.name + (f"{place.addend:+#x}" if place.addend else "")
        if isinstance(place, int):
            return f"{place:#x}"
        return f"{self.sections[place.section].name}+{place.offset:#x}"


def _cstring(table: bytes, offset: int, what: str) -> str:
    if offset == 0 and not table:
        return ""
    if offset >= len(table):
        raise ElfError(f"{what} at {offset} lies past its string table ({len(table)} bytes)")
    end = table.find(b"\0", offset)
    if end < 0:
        raise ElfError(f"{what} at {offset} has no terminating NUL")
    return table[offset:end].decode("utf-8", "surrogateescape")
