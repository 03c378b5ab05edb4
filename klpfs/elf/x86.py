"""What a module function does, read from its x86-64 machine code where that is
simple enough to be certain: the emulator cannot run machine code.

A small decoder follows a function's straight-line code -- the forms gcc
emits for short kernel functions: `call __fentry__`, loads of a string
literal's or a variable's address (`mov $sym, %reg` with R_X86_64_32S, `lea
sym(%rip), %reg`), loads of a module variable (`mov sym(%rip), %reg`),
register moves, `xor %eax,%eax`, push/pop, `call`/`jmp` to a kernel or module
function, and the return (`ret`, `jmp __x86_return_thunk`).  It tracks what
each register holds symbolically (a string literal, a constant, a module
variable, the function's own argument, a call's result) and yields the
program of calls and the returned value.

Anything else -- a branch, a memory store, an instruction outside that
subset -- makes the function "not decodable": its behaviour then falls back
to what its relocations show (klpfs.elf.bodies).  Nothing is guessed: a
register is either known or Unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klpfs.elf.reader import (
    R_X86_64_32, R_X86_64_32S, R_X86_64_PC32, R_X86_64_PLT32, SHF_EXECINSTR, SHF_WRITE, STT_OBJECT, ElfFile,
    Extern, Place, Rela, Symbol)

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
ARG_REGS = (RDI, RSI, RDX, RCX, 8, 9)
"""The System V AMD64 calling convention: the first six integer arguments."""
CALLER_SAVED = (RAX, RCX, RDX, RSI, RDI, 8, 9, 10, 11)
RETURN_THUNKS = {"__x86_return_thunk"}
IGNORED_CALLS = {"__fentry__", "mcount", "__sanitizer_cov_trace_pc"}
"""Calls that are instrumentation, not behaviour (the ftrace site and friends)."""


# -- symbolic values ------------------------------------------------------------------------

class Unknown:
    """A value the decoder cannot know (memory, a computation it does not follow)."""

    def __repr__(self) -> str:
        return "Unknown"


UNKNOWN = Unknown()


@dataclass(frozen=True)
class Str:
    """The address of a string literal (or another NUL-terminated read-only string)."""

    text: str


@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Var:
    """A module variable's value, read when the code runs (a parameter may have changed it)."""

    name: str
    place: Place
    size: int
    signed: bool


@dataclass(frozen=True)
class Addr:
    """The address of something in the module: a data object or a function."""

    place: Place
    name: str


@dataclass(frozen=True)
class Arg:
    """The function's own n-th argument, as its caller passed it."""

    index: int


@dataclass(frozen=True)
class Result:
    """What the n-th call of the program returned."""

    call: int


Value = Unknown | Str | Const | Var | Addr | Arg | Result


@dataclass(frozen=True)
class Call:
    target: str
    """An external (kernel) symbol, or one of the module's functions when `local`."""
    local: bool
    args: tuple[Value, ...]
    index: int


@dataclass
class Program:
    """A function as a sequence of calls and a returned value."""

    name: str
    calls: list[Call] = field(default_factory=list)
    ret: Value = UNKNOWN
    tail_call: int | None = None
    """The program ends by jumping to this call (a tail call): its result is returned."""
    error: str | None = None
    """Why the code could not be followed (None: the program is complete)."""

    @property
    def decoded(self) -> bool:
        return self.error is None


class _Unsupported(Exception):
    pass


# -- decoding ----------------------------------------------------------------------------------

def decode_function(elf: ElfFile, sym: Symbol) -> Program:
    """The program of one STT_FUNC symbol; Program.error says why not, if it cannot be followed."""
    prog = Program(sym.name)
    try:
        _Decoder(elf, sym, prog).run()
    except _Unsupported as e:
        prog.error = str(e)
        prog.calls.clear()
        prog.ret = UNKNOWN
        prog.tail_call = None
    return prog


class _Decoder:
    def __init__(self, elf: ElfFile, sym: Symbol, prog: Program):
        self.elf = elf
        self.sym = sym
        self.prog = prog
        self.code = elf.read(sym.shndx, sym.value, sym.size)
        self.regs: dict[int, Value] = {reg: Arg(i) for i, reg in enumerate(ARG_REGS)}
        self.stack: list[Value] = []

    def reg(self, n: int) -> Value:
        return self.regs.get(n, UNKNOWN)

    def rela(self, pos: int) -> Rela | None:
        """The relocation at byte `pos` of the function."""
        return self.elf.rela_at(self.sym.shndx, self.sym.value + pos)

    def run(self) -> None:
        code = self.code
        pc = 0
        while pc < len(code):
            pc = self.step(pc)
            if pc < 0:
                return
        raise _Unsupported("runs off the end of the function")

    # One instruction: returns the next pc, or -1 once the function has returned.
    def step(self, pc: int) -> int:
        code = self.code
        start = pc
        if code[pc:pc + 4] == b"\xf3\x0f\x1e\xfa":  # endbr64
            return pc + 4
        opsize16 = False
        while code[pc] in (0x66, 0x2E):  # operand-size / cs (nop padding) prefixes
            opsize16 |= code[pc] == 0x66
            pc += 1
        rex = 0
        if 0x40 <= code[pc] <= 0x4F:
            rex = code[pc]
            pc += 1
        w, r, b = bool(rex & 8), (rex >> 2) & 1, rex & 1
        op = code[pc]
        pc += 1
        if op == 0x90:
            return pc
        if op == 0x0F:
            op2 = code[pc]
            pc += 1
            if op2 == 0x1F:  # multi-byte nop
                return self.modrm(pc)[-1]
            if op2 in (0xB6, 0xB7, 0xBE, 0xBF):  # movzx / movsx
                reg, value, nxt = self.load_operand(pc, 1 if op2 in (0xB6, 0xBE) else 2, op2 >= 0xBE, r, b, start)
                self.regs[reg] = value
                return nxt
            raise _Unsupported(f"instruction 0f {op2:02x} at +{start:#x}")
        if 0x50 <= op <= 0x57:
            self.stack.append(self.reg((op - 0x50) | b << 3))
            return pc
        if 0x58 <= op <= 0x5F:
            self.regs[(op - 0x58) | b << 3] = self.stack.pop() if self.stack else UNKNOWN
            return pc
        if 0xB8 <= op <= 0xBF:  # mov $imm32, %r32
            reg = (op - 0xB8) | b << 3
            size = 8 if w else 4
            self.regs[reg] = self.immediate(pc, size, signed=False, start=start)
            return pc + size
        if op == 0xC7:  # mov $imm32, r/m
            mod, reg_field, rm, nxt = self.modrm(pc)
            if mod != 3 or reg_field != 0:
                raise _Unsupported(f"store of an immediate at +{start:#x}")
            self.regs[rm | b << 3] = self.immediate(nxt, 4, signed=w, start=start)
            return nxt + 4
        if op in (0x8B, 0x8D):  # mov r/m -> reg, lea
            if op == 0x8D:
                reg, value, nxt = self.lea(pc, r, b, start)
            else:
                reg, value, nxt = self.load_operand(pc, 8 if w else (2 if opsize16 else 4), True, r, b, start)
            self.regs[reg] = value
            return nxt
        if op == 0x89:  # mov reg -> r/m
            mod, reg_field, rm, nxt = self.modrm(pc)
            if mod != 3:
                raise _Unsupported(f"store to memory at +{start:#x}")
            self.regs[rm | b << 3] = self.reg(reg_field | r << 3)
            return nxt
        if op in (0x31, 0x33):  # xor %r,%r: zero
            mod, reg_field, rm, nxt = self.modrm(pc)
            if mod != 3 or (reg_field | r << 3) != (rm | b << 3):
                raise _Unsupported(f"xor at +{start:#x}")
            self.regs[rm | b << 3] = Const(0)
            return nxt
        if op == 0x98:  # cltq / cwtl: the value stays what it is
            return pc
        if op == 0x83 and code[pc] in (0xC4, 0xEC):  # add/sub $imm8, %rsp
            return pc + 2
        if op == 0xE8:
            self.call(pc, start, tail=False)
            return pc + 4
        if op == 0xE9:
            self.call(pc, start, tail=True)
            return -1
        if op == 0xC3:
            self.prog.ret = self.reg(RAX)
            return -1
        raise _Unsupported(f"instruction {op:02x} at +{start:#x}")

    def modrm(self, pc: int) -> tuple[int, int, int, int]:
        """(mod, reg, rm, next pc) of a ModRM operand with its SIB and displacement."""
        byte = self.code[pc]
        mod, reg, rm = byte >> 6, (byte >> 3) & 7, byte & 7
        pc += 1
        if mod != 3 and rm == 4:
            sib = self.code[pc]
            pc += 1
            if mod == 0 and sib & 7 == 5:
                pc += 4
        if mod == 1:
            pc += 1
        elif mod == 2 or (mod == 0 and rm == 5):
            pc += 4
        return mod, reg, rm, pc

    def load_operand(self, pc: int, size: int, signed: bool, r: int, b: int,
                     start: int) -> tuple[int, Value, int]:
        """A load into a register: another register, or a module variable (rip-relative)."""
        mod, reg_field, rm, nxt = self.modrm(pc)
        dest = reg_field | r << 3
        if mod == 3:
            return dest, self.reg(rm | b << 3), nxt
        if mod == 0 and rm == 5:
            place = self.rip_target(pc + 1, nxt, start)
            if isinstance(place, Place):
                obj = self.elf.object_at(place)
                name = obj.name if obj is not None else self.elf.describe(place)
                return dest, Var(name, place, size, signed), nxt
        return dest, UNKNOWN, nxt

    def lea(self, pc: int, r: int, b: int, start: int) -> tuple[int, Value, int]:
        mod, reg_field, rm, nxt = self.modrm(pc)
        if mod == 0 and rm == 5:
            place = self.rip_target(pc + 1, nxt, start)
            return reg_field | r << 3, self.address_value(place), nxt
        return reg_field | r << 3, UNKNOWN, nxt

    def rip_target(self, disp_pos: int, insn_end: int, start: int) -> Place | Extern | None:
        """What a rip-relative displacement points at: its relocation's target, adjusted by
        where the instruction ends (the CPU adds the next instruction's address)."""
        rela = self.rela(disp_pos)
        if rela is None or rela.type not in (R_X86_64_PC32, R_X86_64_PLT32):
            raise _Unsupported(f"rip-relative operand without a relocation at +{start:#x}")
        target = self.elf.target(rela)
        if isinstance(target, Place):
            return Place(target.section, target.offset + (insn_end - disp_pos))
        return target

    def immediate(self, pos: int, size: int, signed: bool, start: int) -> Value:
        rela = self.rela(pos)
        if rela is not None:
            if rela.type not in (R_X86_64_32, R_X86_64_32S) and size != 8:
                raise _Unsupported(f"immediate with relocation type {rela.type} at +{start:#x}")
            return self.address_value(self.elf.target(rela))
        value = int.from_bytes(self.code[pos:pos + size], "little", signed=signed)
        if size == 4 and not signed:
            value = value - (1 << 32) if value & 0x80000000 else value  # an int in a 32-bit register
        return Const(value)

    def address_value(self, target: Place | Extern | None) -> Value:
        """The address of a string literal becomes the string; of anything else, an Addr."""
        if not isinstance(target, Place):
            return UNKNOWN
        sec = self.elf.sections[target.section]
        obj = self.elf.object_at(target)
        if not sec.flags & (SHF_WRITE | SHF_EXECINSTR) and (obj is None or obj.type == STT_OBJECT):
            try:
                return Str(self.elf.cstring(target))
            except ValueError:
                return UNKNOWN
        func = self.elf.function_at(target)
        name = func.name if func is not None else obj.name if obj is not None else self.elf.describe(target)
        return Addr(target, name)

    def call(self, pc: int, start: int, tail: bool) -> None:
        rela = self.rela(pc)
        if rela is None or rela.type not in (R_X86_64_PLT32, R_X86_64_PC32):
            raise _Unsupported(f"{'jump' if tail else 'call'} without a relocation at +{start:#x}")
        target = self.elf.target(rela)
        if isinstance(target, Extern):
            name, local = target.name, False
        else:
            func = self.elf.function_at(Place(target.section, target.offset + 4))
            if func is None:
                raise _Unsupported(f"{'jump' if tail else 'call'} into the middle of a function at +{start:#x}")
            name, local = func.name, True
        if name in RETURN_THUNKS and tail:
            self.prog.ret = self.reg(RAX)
            return
        if name in IGNORED_CALLS and not tail:
            return
        index = len(self.prog.calls)
        self.prog.calls.append(Call(name, local, tuple(self.reg(reg) for reg in ARG_REGS), index))
        if tail:
            self.prog.tail_call = index
            self.prog.ret = Result(index)
            return
        for reg in CALLER_SAVED:
            self.regs[reg] = UNKNOWN
        self.regs[RAX] = Result(index)


def referenced_strings(elf: ElfFile, sym: Symbol) -> list[str]:
    """The string literals a function's code refers to, in code order (what can be said of
    a function the decoder cannot follow)."""
    strings = []
    for rela in elf.relas.get(sym.shndx, []):
        if not sym.value <= rela.offset < sym.value + sym.size:
            continue
        target = elf.target(rela)
        if not isinstance(target, Place):
            continue
        if rela.type in (R_X86_64_PC32, R_X86_64_PLT32):
            target = Place(target.section, target.offset + 4)
        sec = elf.sections[target.section]
        if sec.flags & (SHF_WRITE | SHF_EXECINSTR) or not sec.name.startswith(".rodata"):
            continue
        try:
            strings.append((rela.offset, elf.cstring(target)))
        except ValueError:
            continue
    return [text for _, text in sorted(strings)]
