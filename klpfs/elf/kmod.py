"""Loading a real x86-64 kernel module (.ko) into the emulated kernel.

`build_ko_module(path, data, system)` is load_module() up to the point where
the generic loader (klpfs.kernel.module) takes over, in the kernel's order
(6.1's kernel/module/main.c) and with its log lines:

1. module_sig_check: an appended signature is split off; a well-formed
   PKCS#7 one counts as verified (the emulated kernel trusts its signer), a
   malformed one is EBADMSG; without one, the loader's "module verification
   failed" taint line follows later;
2. elf_validity_check: the kernel's checks and its exact pr_err line
   ("Invalid ELF header magic: != \\x7fELF", ...), -ENOEXEC;
3. setup_load_info: "module has no symbols (stripped?)", "No module found
   in object";
4. check_modstruct_version: the `module_layout` CRC in __versions against
   the profile's (6.1: "disagrees about version of symbol module_layout");
5. check_modinfo: vermagic compared by same_magic() (the release word is
   ignored when the module has CRCs): "<mod>: version magic '...' should be
   '...'", -ENOEXEC;
   finit_module()'s MODULE_INIT_IGNORE_MODVERSIONS / _VERMAGIC (`insmod -f`)
   skip checks 4 and 5 through try_to_force_load(): with
   CONFIG_MODULE_FORCE_LOAD "<mod>: <reason>: kernel tainted." and taint F,
   without it -ENOEXEC;
6. then the Module is built; simplify_symbols ("Unknown symbol") and
   apply_relocations (unknown relocation types, `.klp.rela.vmlinux.*`
   symbols resolved by livepatch) run as its check_symbols hook, after the
   taints, as in the kernel; `.klp.rela.<module>.*` are resolved when that
   module loads (KlpObject.relocs).

Any refusal raises KoError(errno, message) after logging what the kernel
logs; nothing is loaded half-way.  A .ko written by klpfs itself (with a
`.klpfs.module` section) is built through the .py/TOML path it came from.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from klpfs.elf.bodies import SHOW_CALLS, KlpCall, ModuleAddress, Runtime, fallback_body, program_body
from klpfs.elf.coresize import module_sizes
from klpfs.elf.klp import KoPatch, PatchError, read_patch
from klpfs.elf.layouts import LayoutError, layout_for
from klpfs.elf.modinfo import (
    KoParam, modinfo_get, read_modinfo, read_params, release_version, struct_module_name)
from klpfs.elf.reader import (
    EHDR, MODULE_RELOCATIONS, SHDR, SHF_ALLOC, SHF_RELA_LIVEPATCH, SHN_COMMON, SHN_LIVEPATCH, SHN_LORESERVE,
    SHN_UNDEF, SHT_NOBITS, SHT_NULL, SHT_SYMTAB, STB_WEAK, STT_FUNC, ElfError, ElfFile, Extern, Symbol)
from klpfs.elf.x86 import Program, decode_function, referenced_strings
from klpfs.kernel.kallsyms import Body, FuncDef
from klpfs.kernel.module import TAINT_FORCED_MODULE, Module
from klpfs.kernel.params import ParamSpec
from klpfs.kernel.printk import KERN_ERR, KERN_WARNING
from klpfs.livepatch.structs import KlpCallbacks, KlpFunc, KlpObject, KlpPatch, KlpState
from klpfs.profiles import Rule

if TYPE_CHECKING:
    from klpfs.system import System

MODULE_SIG_STRING = b"~Module signature appended~\n"
MODULE_SIGNATURE_SIZE = 12
"""struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], __be32 sig_len."""
PKEY_ID_PKCS7 = 2
MODVERSION_INFO_SIZE = 64
"""struct modversion_info: unsigned long crc; char name[MODULE_NAME_LEN]."""
KLPFS_MODULE = ".klpfs.module"
KLP_SYM_RE = re.compile(r"\.klp\.sym\.([^.]{1,55})\.([^,]{1,511}),(\d+)")
KLP_RELA_RE = re.compile(r"\.klp\.rela\.([^.]{1,55})")
INIT_SYMBOL, EXIT_SYMBOL = "init_module", "cleanup_module"


class KoError(Exception):
    """A .ko the emulated kernel refuses: errno and a message for the person loading it."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


# -- reading --------------------------------------------------------------------------------------------

@dataclass
class KoFile:
    """What klpfs reads of a .ko, before any kernel looks at it."""

    path: Path
    elf: ElfFile
    signed: bool
    modinfo: list[tuple[str, str]]
    name: str
    """The module's name: struct module's, which modpost writes from KBUILD_MODNAME as it
    writes .modinfo's `name` (the two are checked to agree)."""
    vermagic: str | None
    embedded: tuple[str, str, str] | None = None
    """(suffix, filename, text) of a klpfs-written .ko's `.klpfs.module` section."""
    params: list[KoParam] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return modinfo_get(self.modinfo, key)

    @property
    def livepatch(self) -> bool:
        return self.get("livepatch") is not None

    @property
    def version(self) -> tuple[int, int] | None:
        return None if self.vermagic is None else release_version(self.vermagic)


def strip_signature(data: bytes) -> tuple[bytes, bool]:
    """module_sig_check()/mod_check_sig(): the module without its appended signature, and
    whether it had a PKCS#7 one; KoError(EBADMSG) for a malformed signature."""
    if len(data) <= len(MODULE_SIG_STRING) or not data.endswith(MODULE_SIG_STRING):
        return data, False
    body = data[:-len(MODULE_SIG_STRING)]
    if len(body) <= MODULE_SIGNATURE_SIZE:
        raise KoError(errno.EBADMSG, "the module signature is truncated")
    ms = body[-MODULE_SIGNATURE_SIZE:]
    sig_len = int.from_bytes(ms[8:12], "big")
    if ms[2] != PKEY_ID_PKCS7:
        return body, False  # -ENOPKG: "module with unsupported crypto", loaded unsigned
    if any(ms[:2]) or any(ms[3:8]) or sig_len == 0 or sig_len >= len(body) - MODULE_SIGNATURE_SIZE:
        raise KoError(errno.EBADMSG, "the module signature is malformed")
    return body[:len(body) - MODULE_SIGNATURE_SIZE - sig_len], True


def elf_validity_line(data: bytes) -> str | None:
    """elf_validity_check(): the line the kernel logs for the first check the file fails, or None.

    The kernel reads the header as an Elf64_Ehdr whatever its class, so a 32-bit
    file fails on its machine (or its header size), as here.
    """
    if len(data) < EHDR.size:
        return f"Invalid ELF header len {len(data)}"
    if data[:4] != b"\x7fELF":
        return "Invalid ELF header magic: != \x7fELF"
    (_, e_type, e_machine, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = EHDR.unpack_from(data)
    if e_type != 1:
        return f"Invalid ELF header type: {e_type} != 1"
    if e_machine != 62:
        return f"Invalid architecture in ELF header: {e_machine}"
    if shentsize != SHDR.size:
        return "Invalid ELF section header size"
    if shoff >= len(data) or shnum * SHDR.size > len(data) - shoff:
        return "Invalid ELF section header overflow"
    if shstrndx == 0 or shstrndx >= shnum:
        return f"Invalid ELF section name index: {shstrndx} || e_shstrndx ({shstrndx}) >= e_shnum ({shnum})"
    hdrs = [SHDR.unpack_from(data, shoff + i * SHDR.size) for i in range(shnum)]
    strhdr = hdrs[shstrndx]
    if strhdr[4] + strhdr[5] > len(data):
        return f"Invalid ELF section hdr(type {strhdr[1]})"
    if strhdr[5] == 0:
        return "empty section name table"
    if data[strhdr[4] + strhdr[5] - 1] != 0:
        return "ELF Spec violation: section name table isn't null terminated"
    if hdrs[0][1] != SHT_NULL or hdrs[0][5] != 0 or hdrs[0][3] != 0:
        return f"ELF Spec violation: section 0 type({hdrs[0][1]})!=SH_NULL or non-zero len or addr"
    for i, (name, stype, flags, _, offset, size, link, _, _, _) in enumerate(hdrs[1:], 1):
        if stype in (SHT_NULL, SHT_NOBITS):
            continue
        if stype == SHT_SYMTAB and (link == 0 or link >= shnum):
            return f"Invalid ELF sh_link!=SHN_UNDEF({link}) or (sh_link({link}) >= hdr->e_shnum({shnum})"
        if offset + size > len(data):
            return f"Invalid ELF section in module (section {i} type {stype})"
        if flags & SHF_ALLOC and name >= strhdr[5]:
            return f"Invalid ELF section name in module (section {i} type {stype})"
    return None


def read_ko(path: str | Path, data: bytes) -> KoFile:
    """Read a .ko without loading it (what modinfo needs); KoError(ENOEXEC) if it cannot be read."""
    path = Path(path)
    body, signed = strip_signature(data)
    try:
        elf = ElfFile(body)
        modinfo = read_modinfo(elf)
        struct_name = struct_module_name(elf)
    except ElfError as e:
        raise KoError(errno.ENOEXEC, f"{path}: {e}") from None
    info_name = modinfo_get(modinfo, "name")
    if struct_name is not None and info_name is not None and struct_name != info_name:
        raise KoError(errno.ENOEXEC, f"{path}: struct module names the module {struct_name!r}, .modinfo "
                                     f"{info_name!r} (modpost writes both from KBUILD_MODNAME: the file was altered)")
    name = struct_name or info_name or path.stem.replace("-", "_")
    ko = KoFile(path, elf, signed, modinfo, name, modinfo_get(modinfo, "vermagic"))
    sec = elf.section(KLPFS_MODULE)
    if sec is not None:
        from klpfs.elf.sections import parse_source_section
        try:
            ko.embedded = parse_source_section(elf.section_data(sec))
        except ValueError as e:
            raise KoError(errno.ENOEXEC, f"{path}: {e}") from None
    return ko


def modinfo_fields(path: str | Path, data: bytes) -> list[tuple[str, str]]:
    """What kmod's modinfo prints for the file, in its order: filename, the .modinfo
    entries in section order, then one `parm` per parameter (kmod lists them last,
    newest first, joining each parm= with its parmtype=)."""
    ko = read_ko(path, data)
    # kmod makes the path absolute by prefixing the working directory, without resolving it.
    fields = [("filename", os.path.join(os.getcwd(), str(path)))]
    params: list[list[str | None]] = []
    for key, value in ko.modinfo:
        if key not in ("parm", "parmtype"):
            fields.append((key, value))
            continue
        pname, colon, text = value.partition(":")
        if not colon:
            continue
        entry = next((p for p in params if p[0] == pname), None)
        if entry is None:
            entry = [pname, None, None]
            params.insert(0, entry)
        entry[1 if key == "parm" else 2] = text
    for param, desc, ptype in params:
        if desc is None:
            fields.append(("parm", f"{param}:{ptype}"))
        elif ptype is not None:
            fields.append(("parm", f"{param}:{desc} ({ptype})"))
        else:
            fields.append(("parm", f"{param}:{desc}"))
    return fields


# -- the kernel's checks ----------------------------------------------------------------------------------

class _Refusal:
    """Log what the kernel logs, then refuse."""

    def __init__(self, system: System, path: Path):
        self.kernel = system.kernel
        self.path = path

    def __call__(self, err: int, message: str, *lines: tuple[int, str]) -> KoError:
        for level, line in lines:
            self.kernel.printk(level, line)
        return KoError(err, message)


def _modversion_crc(ko: KoFile, symbol: str) -> int | None:
    sec = ko.elf.section("__versions")
    if sec is None:
        return None
    raw = ko.elf.section_data(sec)
    for at in range(0, len(raw) - MODVERSION_INFO_SIZE + 1, MODVERSION_INFO_SIZE):
        if raw[at + 8:at + MODVERSION_INFO_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace") == symbol:
            return int.from_bytes(raw[at:at + 8], "little")
    return None


def same_magic(amagic: str, bmagic: str, has_crcs: bool) -> bool:
    """same_magic(): with CRCs the release (first word) is not compared."""
    if has_crcs:
        amagic = amagic[len(amagic.split(" ", 1)[0]):]
        bmagic = bmagic[len(bmagic.split(" ", 1)[0]):]
    return amagic == bmagic


# finit_module()'s flags (include/uapi/linux/module.h): skip a check, at the price of a taint.
MODULE_INIT_IGNORE_MODVERSIONS = 1
MODULE_INIT_IGNORE_VERMAGIC = 2


def check_load(ko: KoFile, system: System, refuse: _Refusal, flags: int = 0) -> bool:
    """setup_load_info, check_modstruct_version and check_modinfo's vermagic.  A check that
    `flags` skip, or that has nothing to check, goes to try_to_force_load(): the kernel is
    tainted F there and then, and True says the module is to be marked F; without
    CONFIG_MODULE_FORCE_LOAD the load is refused with -ENOEXEC and nothing logged."""
    profile = system.profile
    elf = ko.elf
    info_name = ko.get("name") or "(missing .modinfo section or name field)"
    if elf.symtab is None:
        raise refuse(errno.ENOEXEC, f"{ko.path}: no symbol table",
                     (KERN_WARNING, f"{info_name}: module has no symbols (stripped?)"))
    if elf.section(".gnu.linkonce.this_module") is None:
        raise refuse(errno.ENOEXEC, f"{ko.path}: no .gnu.linkonce.this_module (struct module) section",
                     (KERN_WARNING, f"{info_name}: No module found in object"))
    forced = False

    def try_to_force_load(reason: str) -> None:
        nonlocal forced
        if not profile.module_force_load:
            raise refuse(errno.ENOEXEC, f"{ko.path}: {reason}, and this kernel has no CONFIG_MODULE_FORCE_LOAD")
        system.kernel.modules.try_to_force_load(ko.name, reason)
        forced = True

    # rewrite_section_headers(): MODULE_INIT_IGNORE_MODVERSIONS pretends there is no __versions.
    # same_magic() and check_version() exist only with CONFIG_MODVERSIONS: without it the
    # whole vermagic is compared and no CRC is looked at.
    has_crcs = (profile.modversions and elf.section("__versions") is not None
                and not flags & MODULE_INIT_IGNORE_MODVERSIONS)
    if profile.modversions and profile.module_layout_crc is not None and ko.embedded is None:
        crc = _modversion_crc(ko, "module_layout")
        if not has_crcs:
            # check_version() with no __versions index: "modprobe --force does this".
            try_to_force_load("module_layout")
        elif crc is None:
            raise refuse(errno.ENOEXEC, f"{ko.path}: no symbol version for module_layout",
                         (KERN_WARNING, f"{ko.name}: no symbol version for module_layout"))
        elif crc != profile.module_layout_crc:
            raise refuse(errno.ENOEXEC, f"{ko.path}: module_layout CRC {crc:#x}, this kernel's is "
                                        f"{profile.module_layout_crc:#x}",
                         (KERN_WARNING, f"{ko.name}: disagrees about version of symbol module_layout"))
    # check_modinfo(): MODULE_INIT_IGNORE_VERMAGIC drops the vermagic, which is then as
    # missing, and a missing one is allowed only by forcing.
    vermagic = None if flags & MODULE_INIT_IGNORE_VERMAGIC else ko.vermagic
    if vermagic is None:
        try_to_force_load("bad vermagic")
    elif not same_magic(vermagic, profile.vermagic, has_crcs):
        raise refuse(errno.ENOEXEC, f"{ko.path}: built for '{vermagic}', this kernel is '{profile.vermagic}'",
                     (KERN_ERR, f"{ko.name}: version magic '{vermagic}' should be '{profile.vermagic}'"))
    return forced


def _simplify_symbols(ko: KoFile, mod: Module, system: System) -> int:
    """simplify_symbols(): every undefined symbol must be one the kernel has."""
    from klpfs.kapi import unknown_symbols
    missing = unknown_symbols(system.profile)
    kernel = system.kernel
    ret = 0
    nsec = len(ko.elf.sections)
    for sym in ko.elf.symbols[1:]:
        if sym.shndx == SHN_COMMON:
            kernel.printk(KERN_WARNING, f"{mod.name}: please compile with -fno-common")
            ret = -errno.ENOEXEC
        elif sym.shndx == SHN_UNDEF and sym.name in missing and sym.bind != STB_WEAK:
            kernel.printk(KERN_WARNING, f"{mod.name}: Unknown symbol {sym.name} (err {-errno.ENOENT})")
            ret = -errno.ENOENT
        elif SHN_UNDEF < sym.shndx < SHN_LORESERVE and sym.shndx >= nsec:
            kernel.printk(KERN_ERR, f"{mod.name}: Symbol {sym.name} has an invalid section index "
                                    f"{sym.shndx} (max {nsec - 1})")
            ret = -errno.ENOEXEC
    return ret


def _apply_relocations(ko: KoFile, mod: Module, system: System) -> int:
    """apply_relocations(): relocation types x86-64's apply_relocate_add() knows; the
    `.klp.rela.*` sections go to livepatch (only vmlinux's are written now)."""
    elf = ko.elf
    for sec in elf.rela_sections:
        target = elf.sections[sec.info]
        if not target.flags & SHF_ALLOC or target.name in (".modinfo", "__versions"):
            continue
        if sec.flags & SHF_RELA_LIVEPATCH:
            ret = klp_apply_section_relocs(ko, mod, system, sec.index, None)
        else:
            ret = _check_types(ko, mod, system, sec.index)
        if ret:
            return ret
    return 0


def _check_types(ko: KoFile, mod: Module, system: System, rela_section: int) -> int:
    elf = ko.elf
    sec = elf.sections[rela_section]
    for rela in elf.relas_of(sec):
        if rela.type not in MODULE_RELOCATIONS:
            system.kernel.printk(KERN_ERR, f"module: {mod.name}: Unknown rela relocation: {rela.type}")
            return -errno.ENOEXEC
    return 0


def klp_apply_section_relocs(ko: KoFile, mod: Module, system: System, rela_section: int,
                             objname: str | None) -> int:
    """klp_apply_section_relocs() for one `.klp.rela.<object>.<section>` section: nothing
    unless it is the object's; its symbols (`.klp.sym.<object>.<name>,<sympos>`) must
    resolve in the patched object's kallsyms."""
    elf = ko.elf
    lp = system.livepatch
    sec = elf.sections[rela_section]
    m = KLP_RELA_RE.match(sec.name)
    if m is None:
        lp.pr(KERN_ERR, f"section {sec.name} has an incorrectly formatted name")
        return -errno.EINVAL
    sec_objname = m.group(1)
    if (objname or "vmlinux") != sec_objname:
        return 0
    sec_vmlinux = sec_objname == "vmlinux"
    for rela in elf.relas_of(sec):
        sym = elf.symbols[rela.sym]
        if sym.shndx != SHN_LIVEPATCH:
            lp.pr(KERN_ERR, f"symbol {sym.name} is not marked as a livepatch symbol")
            return -errno.EINVAL
        sm = KLP_SYM_RE.match(sym.name)
        if sm is None:
            lp.pr(KERN_ERR, f"symbol {sym.name} has an incorrectly formatted name")
            return -errno.EINVAL
        sym_objname, sym_name, sympos = sm.group(1), sm.group(2), int(sm.group(3))
        sym_vmlinux = sym_objname == "vmlinux"
        if not sec_vmlinux and sym_vmlinux:
            lp.pr(KERN_ERR, f"invalid access to vmlinux symbol '{sym_name}' from module-specific "
                            "livepatch relocation section")
            return -errno.EINVAL
        ret = lp.klp_find_object_symbol(None if sym_vmlinux else sym_objname, sym_name, sympos)
        if ret < 0:
            return ret
    return _check_types(ko, mod, system, rela_section)


# -- the module -------------------------------------------------------------------------------------------

def _kallsyms_functions(ko: KoFile) -> list[Symbol]:
    """The functions kallsyms lists for the module, in section and address order: named
    STT_FUNC symbols, one name per address (init_module/cleanup_module alias the
    module's own init and exit), init-section ones only for a livepatch module (whose
    symbols the loader keeps whole)."""
    elf = ko.elf
    funcs = [s for s in elf.symbols if s.type == STT_FUNC and s.defined and s.name]
    funcs.sort(key=lambda s: (s.shndx, s.value, s.name in (INIT_SYMBOL, EXIT_SYMBOL)))
    seen: set[tuple[int, int]] = set()
    kept = []
    for sym in funcs:
        if (sym.shndx, sym.value) in seen:
            continue
        if elf.sections[sym.shndx].name.startswith(".init") and not ko.livepatch:
            continue
        seen.add((sym.shndx, sym.value))
        kept.append(sym)
    return kept


def _traceable(ko: KoFile) -> set[tuple[int, int]] | None:
    """The functions with an ftrace call site (`__mcount_loc` entries); None if the file has
    no such section (then every function counts as traceable)."""
    elf = ko.elf
    sec = elf.section("__mcount_loc")
    if sec is None:
        return None
    sites = set()
    for rela in elf.relas.get(sec.index, []):
        target = elf.target(rela)
        if not isinstance(target, Extern):
            sites.add((target.section, target.offset))
    return sites


def _calls_show_function(ko: KoFile, sym: Symbol) -> bool:
    elf = ko.elf
    for rela in elf.relas.get(sym.shndx, []):
        if sym.value <= rela.offset < sym.value + sym.size:
            target = elf.target(rela)
            if isinstance(target, Extern) and target.name in SHOW_CALLS:
                return True
    return False


def _body(ko: KoFile, sym: Symbol, rt: Runtime, programs: dict[str, Program]) -> Body:
    prog = decode_function(ko.elf, sym)
    programs[sym.name] = prog
    if prog.decoded:
        return program_body(prog, rt)
    return fallback_body(sym.name, referenced_strings(ko.elf, sym), _calls_show_function(ko, sym))


def build_klp_patch(kp: KoPatch, mod: Module, system: System) -> KlpPatch:
    """The emulated kernel's klp_patch for the module's static one: function pointers are
    the module's symbols, callbacks call the module's functions through ftrace."""
    kernel = system.kernel
    syms = {s.name: s for s in mod.symbols}

    def callback(fname: str, returns: bool) -> Callable[[KlpObject], int]:
        def call(obj: KlpObject) -> int:
            sym = syms.get(fname)
            if sym is None:
                return 0
            ret = kernel.code.guarded(kernel.invoke, sym, kernel.current, (obj,), fallback=-errno.EFAULT)
            return ret if returns and isinstance(ret, int) else 0
        return call

    objs = []
    for o in kp.objs or ():
        funcs = None if o.funcs is None else [
            KlpFunc(f.old_name, syms.get(f.new_func) if f.new_func else None, f.old_sympos, f.immediate)
            for f in o.funcs]
        cbs = KlpCallbacks()
        for slot, fname in o.callbacks.items():
            # Only pre_patch's return value counts (klp_pre_patch_callback()); the others return void.
            setattr(cbs, slot, callback(fname, slot == "pre_patch"))
        objs.append(KlpObject(o.name, funcs, cbs))
    return KlpPatch(mod, objs if kp.objs is not None else None, immediate=kp.immediate, replace=kp.replace,
                    states=[KlpState(i, v) for i, v in kp.states])


def _klp_calls(ko: KoFile, kp: KoPatch | None, mod: Module, system: System) -> KlpCall:
    """klp_enable_patch() and friends as the module's code calls them."""
    lp = system.livepatch

    def klp(name: str, target: ModuleAddress | None) -> int:
        if kp is None or (target is not None and target.name != kp.symbol):
            return -errno.EINVAL
        patch = mod.data.get("patch")
        if not isinstance(patch, KlpPatch):
            patch = build_klp_patch(kp, mod, system)
            for obj in patch.objs or ():
                if obj.name is not None:
                    obj.relocs = lambda name=obj.name: _module_relocs(ko, mod, system, name)
            mod.data["patch"] = patch
        if name == "klp_enable_patch":
            return lp.klp_enable_patch(patch)
        if name == "klp_register_patch":
            return lp.klp_register_patch(patch)
        if name == "klp_unregister_patch":
            return lp.klp_unregister_patch(patch)
        return lp.klp_disable_patch(patch)
    return klp


def _module_relocs(ko: KoFile, mod: Module, system: System, objname: str) -> int:
    """klp_apply_object_relocs() for one patched module."""
    for sec in ko.elf.rela_sections:
        if sec.flags & SHF_RELA_LIVEPATCH:
            ret = klp_apply_section_relocs(ko, mod, system, sec.index, objname)
            if ret:
                return ret
    return 0


def _sample_init(system: System, klp: KlpCall) -> int:
    """An init the decoder cannot follow, for a livepatch module: what every patch module's
    init does -- register then enable before 5.1 (unregistering if enabling fails), enable after."""
    if not system.profile.register_api:
        return klp("klp_enable_patch", None)
    ret = klp("klp_register_patch", None)
    if ret:
        return ret
    ret = klp("klp_enable_patch", None)
    if ret:
        klp("klp_unregister_patch", None)
    return ret


def build_ko_module(path: str | Path, data: bytes, system: System, behaviour: tuple[str, str] | None = None,
                    flags: int = 0) -> Module:
    """The Module for a .ko file's bytes, checked as load_module() checks it; KoError (after
    logging what the kernel logs) if the kernel would refuse it.  `flags`: finit_module()'s
    MODULE_INIT_IGNORE_* (a forced load).

    `behaviour`: (path, text) of a Python module that supplies the functions' behaviour
    (klpfs.elf.companion); by default X.py beside X.ko does (the caller reads it).
    """
    path = Path(path)
    refuse = _Refusal(system, path)
    try:
        body, _ = strip_signature(data)
    except KoError as e:
        raise refuse(e.errno, f"{path}: {e}") from None
    line = elf_validity_line(body)
    try:
        ko = read_ko(path, data)
    except KoError as e:
        raise refuse(e.errno, str(e), *([(KERN_ERR, line)] if line else [])) from None
    if line is not None:
        raise refuse(errno.ENOEXEC, f"{path}: {line}", (KERN_ERR, line))
    forced = check_load(ko, system, refuse, flags)
    if ko.embedded is not None:
        # klpfs's own .ko: the module file it carries, loaded as that file loads (same
        # size, taints and log), so writing a module out as a .ko changes nothing.
        mod = _embedded_module(ko, system)
        mod.data["ko"] = ko
        _mark_forced(mod, forced)
        return mod
    mod = _ko_module(ko, system, refuse)
    _mark_forced(mod, forced)
    if behaviour is not None:
        from klpfs.elf.companion import with_behaviour
        mod = with_behaviour(ko, mod, behaviour[0], behaviour[1], system)
    core, init = module_sizes(ko.elf, ko.livepatch, system.profile.has(Rule.MODULE_MEMORY))
    mod.core_size, mod.init_size = core, init
    mod.signed = ko.signed
    mod.out_of_tree = ko.get("intree") is None
    mod.data["file"] = path
    mod.data["ko"] = ko
    return mod


def _mark_forced(mod: Module, forced: bool) -> None:
    """add_taint_module()'s part in the module: its F in /proc/modules and its taint file."""
    if forced:
        mod.taint_mask |= 1 << TAINT_FORCED_MODULE[0]


def force_source_module(mod: Module, system: System, flags: int) -> None:
    """A module from a .py or TOML file is built for the running kernel: it has this
    kernel's vermagic (as the .ko klpfs writes of it) and no CRCs to ignore, so only
    MODULE_INIT_IGNORE_VERMAGIC matters, forcing as check_modinfo() forces any module."""
    if not flags & MODULE_INIT_IGNORE_VERMAGIC:
        return
    if not system.profile.module_force_load:
        raise KoError(errno.ENOEXEC, f"{mod.name}: bad vermagic, and this kernel has no CONFIG_MODULE_FORCE_LOAD")
    system.kernel.modules.try_to_force_load(mod.name, "bad vermagic")
    _mark_forced(mod, True)


def _ko_module(ko: KoFile, system: System, refuse: _Refusal) -> Module:
    try:
        params = read_params(ko.elf)
        kp = None
        if ko.livepatch:
            version = ko.version
            if version is None:
                raise KoError(errno.ENOEXEC, f"{ko.path}: no release in vermagic to pick the livepatch layout by")
            kp = read_patch(ko.elf, layout_for(version))
    except (ElfError, PatchError, LayoutError) as e:
        raise refuse(errno.ENOEXEC, f"{ko.path}: {e}") from None
    ko.params = params
    mod = Module(ko.name, livepatch=ko.livepatch)
    descriptions = {}
    for key, value in ko.modinfo:
        if key == "parm":
            pname, _, desc = value.partition(":")
            descriptions[pname] = desc
    for p in params:
        mod.params[p.var] = p.default
        if p.nump is not None:
            mod.params.setdefault(p.nump, 0)
        mod.param_specs[p.name] = ParamSpec(p.type, p.perm, descriptions.get(p.name, ""), var=p.var,
                                            array_max=p.array_max, nump=p.nump)
    rt = Runtime(system.kernel, mod, ko.elf)
    rt.klp = klp = _klp_calls(ko, kp, mod, system)
    programs: dict[str, Program] = {}
    sites = _traceable(ko)
    mod.funcs = [FuncDef(sym.name, sym.size, _body(ko, sym, rt, programs),
                         sites is None or (sym.shndx, sym.value) in sites)
                 for sym in _kallsyms_functions(ko)]
    mod.data["programs"] = programs
    mod.data["runtime"] = rt
    mod.data["ko_patch"] = kp
    by_name = {s.name: s for s in ko.elf.symbols if s.type == STT_FUNC and s.defined}
    init_sym, exit_sym = by_name.get(INIT_SYMBOL), by_name.get(EXIT_SYMBOL)
    if init_sym is not None:
        init_prog = decode_function(ko.elf, init_sym)
        if init_prog.decoded:
            init_body = program_body(init_prog, rt)
            mod.init = lambda m: init_body()
        elif kp is not None:
            mod.init = lambda m: _sample_init(system, klp)
        else:
            mod.init = lambda m: 0
    if exit_sym is not None:
        exit_prog = decode_function(ko.elf, exit_sym)
        if exit_prog.decoded:
            exit_body = program_body(exit_prog, rt)
            mod.exit = lambda m: exit_body()
        else:
            mod.exit = lambda m: (klp("klp_unregister_patch", None)
                                  if kp is not None and system.profile.register_api else None)

    def check_symbols() -> int:
        return _simplify_symbols(ko, mod, system) or _apply_relocations(ko, mod, system)
    mod.check_symbols = check_symbols
    return mod


def _embedded_module(ko: KoFile, system: System) -> Module:
    """A klpfs-written .ko: its module file, built through the path it came from."""
    assert ko.embedded is not None
    suffix, filename, text = ko.embedded
    source = ko.path.with_name(Path(filename).name)
    if suffix == ".py":
        from klpfs.modules.pymodule import PyModuleError, build_pymodule
        try:
            mod = build_pymodule(source, text, system)
        except PyModuleError as e:
            raise KoError(e.errno, f"{ko.path}: {e}") from None
    else:
        from klpfs.control.modfile import ModuleFileError, parse_module_file
        from klpfs.control.modload import build_module, check_profile
        try:
            mf = parse_module_file(source, text)
            check_profile(mf, system.profile)
        except ModuleFileError as e:
            raise KoError(errno.ENOEXEC, f"{ko.path}: {e}") from None
        mod = build_module(mf, system)
    if mod.name != ko.name:
        raise KoError(errno.ENOEXEC, f"{ko.path}: the embedded {filename} is module {mod.name!r}, "
                                     f"the .ko's struct module names {ko.name!r}")
    return mod
