"""A tiny ELF64 relocatable-object writer for the loader's tests, and livepatch .ko
files made with it for every livepatch structure layout.

The modules are what kbuild would make of a patch like the kernel's sample,
reduced to what the loader reads: .text with real x86-64 code (the `call
__fentry__`, `mov $str, %reg` and `call seq_printf` gcc emits), .rodata
strings, the static klp_func[]/klp_object[]/klp_patch (and klp_state[]) in
.data with their R_X86_64_64 relocations, .gnu.linkonce.this_module,
.modinfo, __versions, __param, __mcount_loc and the symbol table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from klpfs.elf.layouts import KlpLayout, layout_for

PROGBITS, SYMTAB, STRTAB, RELA, NOBITS = 1, 2, 3, 4, 8
W, A, X = 0x1, 0x2, 0x4
LOCAL, GLOBAL = 0, 1
NOTYPE, OBJECT, FUNC, SECTION = 0, 1, 2, 3
R_64, R_PC32, R_PLT32, R_32S = 1, 2, 4, 11
SHN_UNDEF, SHN_LIVEPATCH = 0, 0xFF20
SHF_RELA_LIVEPATCH = 0x00100000
DEBIAN_61_MODULE_LAYOUT_CRC = 0xBCE1A965


@dataclass
class Sec:
    name: str
    type: int = PROGBITS
    flags: int = 0
    data: bytearray = field(default_factory=bytearray)
    align: int = 1
    entsize: int = 0
    size: int | None = None
    """For NOBITS sections."""
    relas: list[tuple[int, int, str, int]] = field(default_factory=list)
    """(offset, type, symbol name, addend)."""

    def put(self, data: bytes, align: int = 1) -> int:
        while len(self.data) % align:
            self.data.append(0)
        at = len(self.data)
        self.data += data
        return at


@dataclass
class Sym:
    name: str
    section: str | None
    value: int = 0
    size: int = 0
    type: int = NOTYPE
    bind: int = LOCAL
    shndx: int | None = None


class ElfBuilder:
    def __init__(self) -> None:
        self.sections: dict[str, Sec] = {}
        self.symbols: list[Sym] = []
        self.extra_relas: dict[str, tuple[str, int, list[tuple[int, int, str, int]]]] = {}
        """RELA sections of their own: name -> (target section, extra flags, relocations)."""

    def sec(self, name: str, **kw: object) -> Sec:
        if name not in self.sections:
            self.sections[name] = Sec(name, **kw)  # type: ignore[arg-type]
        return self.sections[name]

    def sym(self, name: str, section: str | None, value: int = 0, size: int = 0, type: int = NOTYPE,
            bind: int = LOCAL, shndx: int | None = None) -> None:
        self.symbols.append(Sym(name, section, value, size, type, bind, shndx))

    def rela(self, section: str, offset: int, rtype: int, symbol: str, addend: int = 0) -> None:
        self.sections[section].relas.append((offset, rtype, symbol, addend))

    def build(self, machine: int = 62, elfclass: int = 2, encoding: int = 1, etype: int = 1) -> bytes:
        names = [""] + list(self.sections)
        index = {name: i for i, name in enumerate(names)}
        # Section symbols (for `.data+0x40` relocations), then locals, then globals.
        syms = [Sym("", None)] + [Sym(n, n, type=SECTION) for n in self.sections]
        syms += [s for s in self.symbols if s.bind == LOCAL] + [s for s in self.symbols if s.bind != LOCAL]
        first_global = next((i for i, s in enumerate(syms) if s.bind != LOCAL), len(syms))
        sym_index = {}
        for i, s in enumerate(syms):
            sym_index.setdefault(s.name, i)
        strtab = bytearray(b"\0")
        symtab = bytearray()
        for s in syms:
            off = 0
            if s.name and s.type != SECTION:
                off = len(strtab)
                strtab += s.name.encode() + b"\0"
            shndx = s.shndx if s.shndx is not None else (index[s.section] if s.section else SHN_UNDEF)
            symtab += struct.pack("<IBBHQQ", off, (s.bind << 4) | s.type, 0, shndx, s.value, s.size)
        all_secs: list[tuple[str, int, int, bytes, int, int, int, int, int | None]] = []
        # (name, type, flags, data, link, info, align, entsize, nobits size)
        for name, sec in self.sections.items():
            all_secs.append((name, sec.type, sec.flags, bytes(sec.data), 0, 0, sec.align, sec.entsize, sec.size))
        rela_secs = [(f".rela{name}", name, 0, sec.relas) for name, sec in self.sections.items() if sec.relas]
        rela_secs += [(name, target, flags, relas) for name, (target, flags, relas) in self.extra_relas.items()]
        symtab_index = len(names) + len(rela_secs)
        for rname, target, flags, relas in rela_secs:
            raw = b"".join(struct.pack("<QQq", off, (sym_index[sym] << 32) | rtype, addend)
                           for off, rtype, sym, addend in relas)
            all_secs.append((rname, RELA, 0x40 | flags, raw, symtab_index, index[target], 8, 24, None))
        all_secs.append((".symtab", SYMTAB, 0, bytes(symtab), symtab_index + 1, first_global, 8, 24, None))
        all_secs.append((".strtab", STRTAB, 0, bytes(strtab), 0, 0, 1, 0, None))
        shstrtab = bytearray(b"\0")
        name_offs = []
        for entry in all_secs:
            name_offs.append(len(shstrtab))
            shstrtab += entry[0].encode() + b"\0"
        name_offs.append(len(shstrtab))
        shstrtab += b".shstrtab\0"
        all_secs.append((".shstrtab", STRTAB, 0, bytes(shstrtab), 0, 0, 1, 0, None))
        out = bytearray(64)
        headers = [bytes(64)]
        for (name, stype, flags, data, link, info, align, entsize, nobits), noff in zip(all_secs, name_offs):
            while len(out) % max(align, 1):
                out.append(0)
            offset = len(out)
            if stype != NOBITS:
                out += data
            size = nobits if stype == NOBITS and nobits is not None else len(data)
            headers.append(struct.pack("<IIQQQQIIQQ", noff, stype, flags, 0, offset, size, link, info, align, entsize))
        while len(out) % 8:
            out.append(0)
        shoff = len(out)
        out += b"".join(headers)
        ident = b"\x7fELF" + bytes([elfclass, encoding, 1, 0]) + bytes(8)
        out[:64] = struct.pack("<16sHHIQQQIHHHHHH", ident, etype, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                               len(headers), len(headers) - 1)
        return bytes(out)


# -- x86-64 code --------------------------------------------------------------------------------------

def call(b: ElfBuilder, sec: str, code: bytearray, target: str) -> None:
    """`call target` (e8 rel32, R_X86_64_PLT32 target-4)."""
    b.rela(sec, len(code) + 1 + _base(b, sec), R_PLT32, target, -4)
    code += b"\xe8" + bytes(4)


def jmp(b: ElfBuilder, sec: str, code: bytearray, target: str) -> None:
    b.rela(sec, len(code) + 1 + _base(b, sec), R_PLT32, target, -4)
    code += b"\xe9" + bytes(4)


def mov_addr(b: ElfBuilder, sec: str, code: bytearray, reg: int, symbol: str, addend: int) -> None:
    """`mov $symbol+addend, %reg` (48 c7 c0+reg imm32, R_X86_64_32S)."""
    b.rela(sec, len(code) + 3 + _base(b, sec), R_32S, symbol, addend)
    code += bytes([0x48, 0xC7, 0xC0 | reg]) + bytes(4)


def load_var(b: ElfBuilder, sec: str, code: bytearray, reg: int, symbol: str, addend: int = 0) -> None:
    """`mov symbol(%rip), %r32` (8b modrm disp32, R_X86_64_PC32 symbol-4)."""
    b.rela(sec, len(code) + 2 + _base(b, sec), R_PC32, symbol, addend - 4)
    code += bytes([0x8B, 0x05 | reg << 3]) + bytes(4)


def _base(b: ElfBuilder, sec: str) -> int:
    return len(b.sections[sec].data)


RDX, RSI, RDI, RAX = 2, 6, 7, 0


# -- livepatch modules -------------------------------------------------------------------------------------

@dataclass
class Patch:
    """A livepatch .ko to generate."""

    name: str = "test_ko_patch"
    release: str = "6.1.0-50-amd64"
    vermagic_flags: str = "SMP preempt mod_unload modversions "
    layout_version: tuple[int, int] | None = None
    """The struct layout to write (default: the release's)."""
    funcs: list[tuple[str, str, int]] = field(default_factory=lambda: [("cmdline_proc_show", "patched_show", 0)])
    """(old_name, new function name, old_sympos) of vmlinux."""
    show_text: str = "this has been live patched by a test .ko"
    objname: str | None = None
    replace: bool = False
    immediate: bool = False
    states: list[tuple[int, int]] = field(default_factory=list)
    callbacks: bool = False
    param: str | None = None
    """An int parameter that the pre_patch callback prints and returns."""
    crc: int | None = DEBIAN_61_MODULE_LAYOUT_CRC
    register: bool = False
    """4.x: init calls klp_register_patch then klp_enable_patch."""
    terminator: bool = True
    klp_relas: list[str] = field(default_factory=list)
    """`.klp.sym.<obj>.<name>,<pos>` symbols a `.klp.rela.vmlinux..text` section refers to."""
    undefined: list[str] = field(default_factory=list)
    """Extra kernel symbols the module needs."""
    livepatch: bool = True

    @property
    def vermagic(self) -> str:
        return f"{self.release} {self.vermagic_flags}"


def livepatch_ko(p: Patch) -> bytes:
    """The .ko bytes of a livepatch module for the patch description."""
    major, minor = (int(x) for x in p.release.split(".")[:2])
    layout = layout_for(p.layout_version or (major, minor))
    b = ElfBuilder()
    text = b.sec(".text", flags=A | X, align=16)
    b.sec(".init.text", flags=A | X)
    b.sec(".exit.text", flags=A | X)
    b.sec("__mcount_loc", flags=A)
    rodata = b.sec(".rodata.str1.1", flags=A | 0x30, entsize=1)
    modinfo = b.sec(".modinfo", flags=A)
    data = b.sec(".data", flags=W | A, align=32)
    this_module = b.sec(".gnu.linkonce.this_module", flags=W | A, align=64)
    fmt_at = rodata.put(b"%s\n\0")
    text_at = rodata.put(p.show_text.encode() + b"\0")
    mcount = bytearray()

    def function(name: str, sec: str, code: bytearray, traced: bool = True) -> None:
        at = b.sections[sec].put(bytes(code), 16 if sec == ".text" else 1)
        b.sym(name, sec, at, len(code), FUNC, LOCAL)
        if traced:
            b.rela("__mcount_loc", len(mcount), R_64, sec, at)
            mcount.extend(bytes(8))

    # The replacement functions: seq_printf(m, "%s\n", "<show_text>"); return 0;
    for _, new, _ in p.funcs:
        code = bytearray()
        b.sections[".text"].data += bytes((16 - len(text.data) % 16) % 16)
        call(b, ".text", code, "__fentry__")
        mov_addr(b, ".text", code, RDX, ".rodata.str1.1", text_at)
        mov_addr(b, ".text", code, RSI, ".rodata.str1.1", fmt_at)
        call(b, ".text", code, "seq_printf")
        code += b"\x31\xc0\xc3"
        function(new, ".text", code)
    if p.param:
        b.sec(".bss", type=NOBITS, flags=W | A, align=4, size=4)
        b.sym(p.param, ".bss", 0, 4, OBJECT)
        fmt2 = rodata.put(f"\x016{p.name}: pre_patch_callback: returning %d\n".encode() + b"\0")
        code = bytearray()
        b.sections[".text"].data += bytes((16 - len(text.data) % 16) % 16)
        call(b, ".text", code, "__fentry__")
        load_var(b, ".text", code, RSI, p.param)
        mov_addr(b, ".text", code, RDI, ".rodata.str1.1", fmt2)
        call(b, ".text", code, "_printk")
        load_var(b, ".text", code, RAX, p.param)
        code += b"\xc3"
        function("pre_patch", ".text", code)
        pname = b.sec(".rodata", flags=A, align=8)
        name_at = pname.put(p.param.encode() + b"\0")
        param = b.sec("__param", flags=A, align=8)
        param.put(bytes(24) + struct.pack("<HbB", 0o644, -1, 0) + bytes(4) + bytes(8))
        b.rela("__param", 0, R_64, ".rodata", name_at)
        b.rela("__param", 8, R_64, "__this_module")
        b.rela("__param", 16, R_64, "param_ops_int")
        b.rela("__param", 32, R_64, ".bss", 0)
    elif p.callbacks:
        code = bytearray()
        call(b, ".text", code, "__fentry__")
        code += b"\x31\xc0\xc3"
        function("pre_patch", ".text", code)
    # klp_state[] (5.5 on)
    states_at = None
    if p.states:
        assert layout.state_size is not None
        entries = b"".join(struct.pack("<QI", i, v).ljust(layout.state_size, b"\0") for i, v in p.states)
        states_at = data.put(entries + bytes(layout.state_size), 8)
        b.sym("states", ".data", states_at, len(entries) + layout.state_size, OBJECT)
    # klp_func[]
    funcs_at = data.put(bytes(layout.func_size * (len(p.funcs) + (1 if p.terminator else 0))), 32)
    b.sym("funcs", ".data", funcs_at, layout.func_size * (len(p.funcs) + (1 if p.terminator else 0)), OBJECT)
    for i, (old, new, sympos) in enumerate(p.funcs):
        at = funcs_at + i * layout.func_size
        name_at = rodata.put(old.encode() + b"\0")
        b.rela(".data", at, R_64, ".rodata.str1.1", name_at)
        b.rela(".data", at + 8, R_64, new)
        data.data[at + 16:at + 24] = struct.pack("<Q", sympos)
        if layout.func_immediate is not None and p.immediate:
            data.data[at + layout.func_immediate] = 1
    # klp_object[]: one object and the terminator
    objs_at = data.put(bytes(layout.obj_size * 2), 32)
    b.sym("objs", ".data", objs_at, layout.obj_size * 2, OBJECT)
    if p.objname is not None:
        b.rela(".data", objs_at, R_64, ".rodata.str1.1", rodata.put(p.objname.encode() + b"\0"))
    b.rela(".data", objs_at + 8, R_64, ".data", funcs_at)
    if p.param or p.callbacks:
        b.rela(".data", objs_at + layout.obj_callbacks, R_64, "pre_patch")
    # klp_patch
    patch_size = {"4.15": 144, "4.16 to 5.0": 128, "5.1 to 5.4": 192, "5.5 on": 200}[layout.name]
    patch_at = data.put(bytes(patch_size), 32)
    b.sym("patch", ".data", patch_at, patch_size, OBJECT)
    b.rela(".data", patch_at, R_64, "__this_module")
    b.rela(".data", patch_at + 8, R_64, ".data", objs_at)
    if states_at is not None and layout.patch_states is not None:
        b.rela(".data", patch_at + layout.patch_states, R_64, ".data", states_at)
    if p.replace and layout.patch_replace is not None:
        data.data[patch_at + layout.patch_replace] = 1
    if p.immediate and layout.patch_immediate is not None:
        data.data[patch_at + layout.patch_immediate] = 1
    # init: [klp_register_patch(&patch);] return klp_enable_patch(&patch);  exit: nothing
    code = bytearray()
    call(b, ".init.text", code, "__fentry__")
    if p.register:
        mov_addr(b, ".init.text", code, RDI, ".data", patch_at)
        call(b, ".init.text", code, "klp_register_patch")
    mov_addr(b, ".init.text", code, RDI, ".data", patch_at)
    jmp(b, ".init.text", code, "klp_enable_patch")
    init_name = p.name + "_init"
    function(init_name, ".init.text", code)
    b.sym("init_module", ".init.text", 0, len(code), FUNC, GLOBAL)
    function(p.name + "_exit", ".exit.text", bytearray(b"\xc3"), traced=False)
    b.sym("cleanup_module", ".exit.text", 0, 1, FUNC, GLOBAL)
    b.sections["__mcount_loc"].data += mcount
    # struct module: its name at 24; init and exit pointers
    this_module.put(bytes(0x380))
    this_module.data[24:24 + len(p.name)] = p.name.encode()
    b.sym("__this_module", ".gnu.linkonce.this_module", 0, 0x380, OBJECT, GLOBAL)
    b.rela(".gnu.linkonce.this_module", 0x138, R_64, "init_module")
    b.rela(".gnu.linkonce.this_module", 0x350, R_64, "cleanup_module")
    info = []
    if p.livepatch:
        info.append("livepatch=Y")
    info += ["license=GPL", "description=A test livepatch"]
    if p.param:
        info += [f"parm={p.param}:What pre_patch returns", f"parmtype={p.param}:int"]
    info += ["depends=", "retpoline=Y", f"name={p.name}", f"vermagic={p.vermagic}"]
    modinfo.put(b"".join(s.encode() + b"\0" for s in info))
    if p.crc is not None:
        versions = b.sec("__versions", flags=A, align=32)
        versions.put(struct.pack("<Q", p.crc) + b"module_layout".ljust(56, b"\0"))
    # .klp.rela.<obj>..text: symbols livepatch resolves (8-byte slots at the end of .text)
    for n, name in enumerate(p.klp_relas):
        obj = name.split(".")[3]
        at = text.put(bytes(8), 8)
        b.sym(name, None, 0, 0, NOTYPE, GLOBAL, shndx=SHN_LIVEPATCH)
        b.extra_relas.setdefault(f".klp.rela.{obj}..text", (".text", SHF_RELA_LIVEPATCH, []))[2].append(
            (at, R_64, name, 0))
    needed = ["__fentry__", "seq_printf", "klp_enable_patch", "_printk", "param_ops_int"]
    needed += [n for n in (["klp_register_patch"] if p.register else []) + p.undefined if n not in needed]
    for name in dict.fromkeys(needed):
        b.sym(name, None, 0, 0, NOTYPE, GLOBAL)
    return b.build()


def layout_of(p: Patch) -> KlpLayout:
    major, minor = (int(x) for x in p.release.split(".")[:2])
    return layout_for(p.layout_version or (major, minor))
