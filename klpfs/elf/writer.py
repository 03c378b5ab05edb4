"""Writing a module file (.py or .toml) out as a genuine ELF relocatable .ko.

Tools that inspect module files must see a kernel module: `file`, `readelf`,
kmod's `modinfo`, and kpatch's `load`, which reads the module name with
`readelf -p .gnu.linkonce.this_module` and refuses anything else.  So the file
has what kbuild puts in a module, laid out as a Debian kernel's modules are
(see klpfs.elf.sections): the functions in `.text`, `.modinfo`, `struct
module` in `.gnu.linkonce.this_module` with the init/exit relocations,
`__mcount_loc`, the notes, a symbol table.  The functions are stubs: the
module's behaviour travels in `.klpfs.module`, the module file itself, which
the .ko loader builds the module from through the .py or TOML path.
"""

from __future__ import annotations

import ast
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from klpfs.control.modfile import ModuleFile, module_name_from_path, parse_module_file
from klpfs.elf import sections as S
from klpfs.kernel.kallsyms import FUNC_ALIGN
from klpfs.kernel.module import MODULE_NAME_LEN
from klpfs.modules.pymodule import (
    PyModuleError, _functions, _Transform, profile_version_code, read_modinfo)

if TYPE_CHECKING:
    from klpfs.profiles import Profile

INIT_EXIT_STUB = 0x10
"""The size of a TOML module's init/exit stub: the TOML declares no size for them."""


@dataclass
class KoFunction:
    """A function of the module as the .ko's symbol table lists it."""

    name: str
    size: int
    traceable: bool
    section: str = S.TEXT


@dataclass
class KoModule:
    """Everything the .ko is written from, read statically from the module file."""

    name: str
    suffix: str
    filename: str
    text: str
    functions: list[KoFunction]
    own_modinfo: list[tuple[str, str]]
    """The module's own .modinfo entries (its MODULE_*() and module_param*()), in source order."""
    in_tree: bool = True
    init: str = ""
    exit: str = ""


# -- reading the module file -----------------------------------------------------------------

def describe(source_path: str | Path, text: str, profile: Profile) -> KoModule:
    """What goes into the .ko of this module file, for this profile (a Python module's
    `#if LINUX_VERSION_CODE` is decided for it, as a build for that kernel would).
    PyModuleError or ModuleFileError for a file that would not load."""
    path = Path(source_path)
    if path.suffix == ".py":
        return _describe_py(path, text, profile)
    if path.suffix == ".toml":
        return _describe_toml(path, text)
    raise ValueError(f"{path}: not a module file (a .py or .toml)")


def _describe_py(path: Path, text: str, profile: Profile) -> KoModule:
    info = read_modinfo(path, text)
    if not info.name.isidentifier() or len(info.name) >= MODULE_NAME_LEN:
        raise PyModuleError(f"{path}: {info.name!r} is not a valid module name")
    tree = _Transform(profile_version_code(profile)).visit(ast.parse(text, str(path)))
    functions = [KoFunction(name, size, not notrace) for name, size, notrace in _functions(tree)]
    names = {f.name for f in functions}
    # MODULE_INFO(intree, ...) is not the module's to say: modpost adds it to in-tree builds.
    own = [(key, value) for key, value in info.entries if key != "intree"]
    return KoModule(info.name, ".py", path.name, text, functions, own,
                    in_tree=info.info.get("intree", "Y") == "Y",
                    init=info.init if info.init in names else "", exit=info.exit if info.exit in names else "")


def _describe_toml(path: Path, text: str) -> KoModule:
    mf = parse_module_file(path, text)
    functions = [KoFunction(f.name, f.size, not f.notrace) for f in mf.functions]
    names = {f.name for f in functions}
    # The init and exit a TOML module always has are __init/__exit code, in their own
    # sections as kbuild places them (__exit implies notrace).
    if mf.init_func not in names:
        functions.append(KoFunction(mf.init_func, INIT_EXIT_STUB, True, S.INIT_TEXT))
    if mf.exit_func not in names:
        functions.append(KoFunction(mf.exit_func, INIT_EXIT_STUB, False, S.EXIT_TEXT))
    return KoModule(mf.name, ".toml", path.name, text, functions, _toml_modinfo(mf),
                    in_tree=not mf.out_of_tree, init=mf.init_func, exit=mf.exit_func)


def _toml_modinfo(mf: ModuleFile) -> list[tuple[str, str]]:
    """The entries of the C a TOML module stands for, in its source order: the parameters
    at the top (module_param then MODULE_PARM_DESC), MODULE_LICENSE, MODULE_DESCRIPTION
    and MODULE_INFO(livepatch, "Y") at the bottom, as the kernel's samples are written."""
    entries: list[tuple[str, str]] = []
    for pname, param in mf.params.items():
        entries.append(("parmtype", f"{pname}:{param.type}"))
        if param.description:
            entries.append(("parm", f"{pname}:{param.description}"))
    entries.append(("license", mf.license))
    if mf.description:
        entries.append(("description", mf.description))
    if mf.livepatch:
        entries.append(("livepatch", "Y"))
    return entries


def modinfo(mod: KoModule, profile: Profile) -> list[tuple[str, str]]:
    """The .modinfo entries in section order: the module's own last first (gcc emits a
    file's top-level variables in reverse), then those kbuild adds (`modpost_keys`)."""
    version = next((value for key, value in mod.own_modinfo if key == "version"), None)
    added = {"srcversion": _srcversion(mod.text) if version is not None else None, "depends": "",
             "retpoline": "Y", "intree": "Y" if mod.in_tree else None, "name": mod.name,
             "vermagic": S.vermagic(profile)}
    kbuild = [(key, value) for key in S.module_layout(profile).modpost_keys
              if (value := added[key]) is not None]
    return [*reversed(mod.own_modinfo), *kbuild]


def _srcversion(text: str) -> str:
    """modpost's srcversion: a digest of the module's sources, 24 upper-case hex digits."""
    return hashlib.md5(text.encode()).hexdigest()[:24].upper()


# -- assembling the ELF file ---------------------------------------------------------------------

@dataclass
class _Section:
    name: str
    type: int
    flags: int = 0
    data: bytes = b""
    align: int = 1
    entsize: int = 0
    link: int = 0
    info: int = 0


@dataclass
class _Symbol:
    name: str
    type: int
    bind: int
    shndx: int
    value: int = 0
    size: int = 0


class _StringTable:
    """An ELF string table: offsets of NUL-terminated names, the empty name at 0."""

    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def add(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.data)
            self.data += name.encode() + b"\0"
        return self.offsets[name]


def _note(owner: str, note_type: int, desc: bytes) -> bytes:
    """One ELF note: namesz, descsz, type, then name and desc each padded to 4 bytes."""
    name = owner.encode() + b"\0"
    return (struct.pack("<III", len(name), len(desc), note_type)
            + name + bytes(-len(name) % 4) + desc + bytes(-len(desc) % 4))


def _code(fn: KoFunction) -> bytes:
    """A stub of the function's size: the 5-byte NOP ftrace leaves at a traceable entry,
    a `ret`, int3 padding."""
    body = (S.NOP5 if fn.traceable else b"") + S.RET
    return (body + S.INT3 * fn.size)[:fn.size]


def _layout_code(functions: list[KoFunction], section: str) -> tuple[bytes, dict[int, int]]:
    """The section's bytes and the offset of each of its functions (by index in `functions`):
    one after another, each start aligned as klpfs's kallsyms (and the kernel's
    -falign-functions) lays them out."""
    data = bytearray()
    offsets = {}
    for i, fn in enumerate(functions):
        if fn.section != section:
            continue
        data += S.INT3 * (-len(data) % FUNC_ALIGN)
        offsets[i] = len(data)
        data += _code(fn)
    return bytes(data), offsets


def write_ko(source_path: str | Path, text: str, profile: Profile) -> bytes:
    """The .ko file of the module file at `source_path` (its text given), built for `profile`."""
    return build_ko(describe(source_path, text, profile), profile)


def build_ko(mod: KoModule, profile: Profile) -> bytes:
    """The ELF bytes of a described module."""
    layout = S.module_layout(profile)
    sections: list[_Section] = [_Section("", S.SHT_NULL)]

    def add(section: _Section) -> int:
        sections.append(section)
        return len(sections) - 1

    build_id = add(_Section(".note.gnu.build-id", S.SHT_NOTE, S.SHF_ALLOC,
                            _note("GNU", S.NT_GNU_BUILD_ID, bytes(20)), align=4))
    notes = S.linux_notes(profile)
    if notes:
        add(_Section(".note.Linux", S.SHT_NOTE, S.SHF_ALLOC,
                     b"".join(_note("Linux", t, desc) for t, desc in notes), align=4))
    code_index: dict[str, int] = {}
    offsets: dict[int, int] = {}
    # kbuild's order: .text, then .exit.text before .init.text.
    for name in (S.TEXT, S.EXIT_TEXT, S.INIT_TEXT):
        data, placed = _layout_code(mod.functions, name)
        if name == S.TEXT or placed:
            code_index[name] = add(_Section(name, S.SHT_PROGBITS, S.SHF_ALLOC | S.SHF_EXECINSTR, data,
                                            align=FUNC_ALIGN if data else 1))
            offsets.update(placed)
    traced = [i for i, fn in enumerate(mod.functions) if fn.traceable]
    mcount = add(_Section(S.MCOUNT_LOC, S.SHT_PROGBITS, S.SHF_ALLOC, bytes(8 * len(traced)))) if traced else 0
    mcount_rela = add(_Section(".rela" + S.MCOUNT_LOC, S.SHT_RELA, S.SHF_INFO_LINK, align=8,
                               entsize=S.RELA_SIZE, info=mcount)) if traced else 0
    entries = modinfo(mod, profile)
    add(_Section(S.MODINFO, S.SHT_PROGBITS, S.SHF_ALLOC,
                 b"".join(f"{key}={value}".encode() + b"\0" for key, value in entries)))
    versions = S.modversions(profile)
    if versions:
        add(_Section(S.VERSIONS, S.SHT_PROGBITS, S.SHF_ALLOC, b"".join(
            struct.pack("<Q56s", crc, symbol.encode()) for crc, symbol in versions), align=S.VERSIONS_ALIGN))
    this_module = bytearray(layout.this_module_size)
    encoded = mod.name.encode()
    this_module[S.MODULE_NAME_OFFSET:S.MODULE_NAME_OFFSET + len(encoded)] = encoded
    this_index = add(_Section(S.THIS_MODULE, S.SHT_PROGBITS, S.SHF_WRITE | S.SHF_ALLOC, bytes(this_module),
                              align=S.THIS_MODULE_ALIGN))
    this_rela = add(_Section(".rela" + S.THIS_MODULE, S.SHT_RELA, S.SHF_INFO_LINK, align=8,
                             entsize=S.RELA_SIZE, info=this_index)) if mod.init or mod.exit else 0
    add(_Section(S.KLPFS_MODULE, S.SHT_PROGBITS, 0, S.source_section(mod.suffix, mod.filename, mod.text)))
    add(_Section(".note.GNU-stack", S.SHT_PROGBITS))
    symtab = add(_Section(".symtab", S.SHT_SYMTAB, align=8, entsize=S.SYM_SIZE))
    strtab = add(_Section(".strtab", S.SHT_STRTAB))
    shstrtab = add(_Section(".shstrtab", S.SHT_STRTAB))

    # Symbols: section symbols, the FILE, the module's (static) functions, then the globals.
    symbols = [_Symbol("", S.STT_NOTYPE, S.STB_LOCAL, S.SHN_UNDEF)]
    section_symbol: dict[int, int] = {}
    for index, section in enumerate(sections):
        if section.type in (S.SHT_PROGBITS, S.SHT_NOTE):
            section_symbol[index] = len(symbols)
            symbols.append(_Symbol("", S.STT_SECTION, S.STB_LOCAL, index))
    symbols.append(_Symbol(mod.filename, S.STT_FILE, S.STB_LOCAL, S.SHN_ABS))
    by_name: dict[str, _Symbol] = {}
    for i, fn in enumerate(mod.functions):
        by_name[fn.name] = _Symbol(fn.name, S.STT_FUNC, S.STB_LOCAL, code_index[fn.section], offsets[i], fn.size)
        symbols.append(by_name[fn.name])
    first_global = len(symbols)
    symbols.append(_Symbol("__this_module", S.STT_OBJECT, S.STB_GLOBAL, this_index, 0, layout.this_module_size))
    # module_init(fn)/module_exit(fn) define init_module/cleanup_module as aliases of fn.
    aliases = {}
    for alias, target in (("init_module", mod.init), ("cleanup_module", mod.exit)):
        if target:
            fn_sym = by_name[target]
            aliases[alias] = len(symbols)
            symbols.append(_Symbol(alias, S.STT_FUNC, S.STB_GLOBAL, fn_sym.shndx, fn_sym.value, fn_sym.size))

    strings = _StringTable()
    sections[symtab].data = b"".join(
        struct.pack("<IBBHQQ", strings.add(sym.name), (sym.bind << 4) | sym.type, 0, sym.shndx, sym.value, sym.size)
        for sym in symbols)
    sections[symtab].link, sections[symtab].info = strtab, first_global
    sections[strtab].data = bytes(strings.data)
    if traced:
        # Each traceable function's entry, as recordmcount/objtool list them: section symbol + offset.
        sections[mcount_rela].data = b"".join(
            _rela(8 * n, section_symbol[code_index[mod.functions[i].section]], offsets[i])
            for n, i in enumerate(traced))
        sections[mcount_rela].link = symtab
    if this_rela:
        relocs = [(layout.init_offset, aliases["init_module"])] if mod.init else []
        relocs += [(layout.exit_offset, aliases["cleanup_module"])] if mod.exit else []
        sections[this_rela].data = b"".join(_rela(offset, sym, 0) for offset, sym in relocs)
        sections[this_rela].link = symtab
    names = _StringTable()
    name_offsets = [names.add(section.name) for section in sections]
    sections[shstrtab].data = bytes(names.data)

    image, file_offsets = _assemble(sections, name_offsets, shstrtab)
    # NT_GNU_BUILD_ID is the SHA-1 of the file with its own bytes zero, as ld --build-id=sha1.
    desc = file_offsets[build_id] + 16  # past the note header and "GNU\0"
    image[desc:desc + 20] = hashlib.sha1(bytes(image)).digest()
    return bytes(image)


def _rela(offset: int, symbol: int, addend: int) -> bytes:
    return struct.pack("<QQq", offset, (symbol << 32) | S.R_X86_64_64, addend)


def _assemble(sections: list[_Section], name_offsets: list[int], shstrndx: int) -> tuple[bytearray, list[int]]:
    """ELF header, the sections' contents in order, the section header table last (as ld
    writes a relocatable file); and each section's offset in the file."""
    image = bytearray(S.EHDR_SIZE)
    file_offsets = []
    for section in sections:
        if section.type == S.SHT_NULL:
            file_offsets.append(0)
            continue
        image += bytes(-len(image) % section.align)
        file_offsets.append(len(image))
        image += section.data
    image += bytes(-len(image) % 8)
    shoff = len(image)
    for section, name_offset, offset in zip(sections, name_offsets, file_offsets):
        image += struct.pack("<IIQQQQIIQQ", name_offset, section.type, section.flags, 0, offset,
                             len(section.data), section.link, section.info,
                             section.align if section.type != S.SHT_NULL else 0, section.entsize)
    ident = bytes([0x7F, *b"ELF", S.ELFCLASS64, S.ELFDATA2LSB, S.EV_CURRENT, S.ELFOSABI_SYSV]) + bytes(8)
    image[:S.EHDR_SIZE] = ident + struct.pack("<HHIQQQIHHHHHH", S.ET_REL, S.EM_X86_64, S.EV_CURRENT, 0, 0, shoff, 0,
                                              S.EHDR_SIZE, 0, 0, S.SHDR_SIZE, len(sections), shstrndx)
    return image, file_offsets


# -- files ------------------------------------------------------------------------------------------

def ko_filename(source_path: str | Path, module_name: str) -> str:
    """The .ko's file name: kbuild names it after the source (livepatch-sample.ko), whose
    stem is the module name with '-' for '_'; a TOML module named otherwise takes its name."""
    path = Path(source_path)
    return f"{path.stem}.ko" if module_name_from_path(path) == module_name else f"{module_name}.ko"


def write_ko_file(source_path: str | Path, profile: Profile, out: str | Path | None = None) -> Path:
    """Write the module file's .ko: to `out` (a directory takes the default name), else next
    to the source.  Returns the path written."""
    path = Path(source_path)
    mod = describe(path, path.read_text(), profile)
    data = build_ko(mod, profile)
    name = ko_filename(path, mod.name)
    target = path.with_name(name) if out is None else Path(out)
    if target.is_dir():
        target = target / name
    target.write_bytes(data)
    return target
