"""The size /proc/modules and lsmod show for a .ko: what the kernel's loader lays out.

Mirrors 6.1's layout_sections() and layout_symtab() (kernel/module/main.c,
kernel/module/kallsyms.c) for x86-64 distribution kernels
(CONFIG_STRICT_MODULE_RWX, CONFIG_KALLSYMS_ALL, CONFIG_MODULE_UNLOAD):

* `.modinfo` and `__versions` stop being allocated, `.data..percpu` goes to
  the per-cpu area; `.data..ro_after_init` and `__jump_table` are
  ro-after-init;
* allocated sections are placed in groups -- text, read-only data,
  ro-after-init, writable data, the rest -- each section at its alignment,
  and every group (but writable data) is rounded up to a page; `.init*`
  sections go to the init area the same way;
* the core area then gets the kept symbols (all of a livepatch module's, a
  module's named symbols in core sections otherwise), their names and type
  bytes, rounded up to a page.

/proc/modules prints init + core size (m_show); do_init_module() frees the
init area and zeroes its size, so a live module shows its core size: 16384
for a small module (a page each of text, read-only data, data and symbols).
Earlier releases lay modules out the same way (one page-aligned layout per
area).  6.4's module_memory (`module_memory=True`) allocates each kind of
memory on its own, page-aligned, and puts the kept symbols in the data: a
small module takes 12288 then, unless its symbols and data fill more than
the page (a livepatch module keeps them all).
"""

from __future__ import annotations

from klpfs.elf.reader import SHF_ALLOC, SHF_EXECINSTR, SHF_RO_AFTER_INIT, SHF_WRITE, SYM, ElfFile

PAGE_SIZE = 4096
NOT_PLACED = -1
MOD_KALLSYMS_SIZE = 32
MASKS = ((SHF_EXECINSTR | SHF_ALLOC, 0), (SHF_ALLOC, SHF_WRITE), (SHF_RO_AFTER_INIT | SHF_ALLOC, 0),
         (SHF_WRITE | SHF_ALLOC, 0), (SHF_ALLOC, 0))
"""layout_sections()'s groups: (flags required, flags refused); ARCH_SHF_SMALL is 0 on x86."""


def _align(value: int, alignment: int) -> int:
    alignment = alignment or 1
    return -(-value // alignment) * alignment


def _page(value: int) -> int:
    return _align(value, PAGE_SIZE)


def module_sizes(elf: ElfFile, livepatch: bool, module_memory: bool = False) -> tuple[int, int]:
    """(core_layout.size, init_layout.size) of the module as the loader lays it out."""
    flags = [s.flags for s in elf.sections]
    for sec in elf.sections:
        if sec.name in (".modinfo", "__versions", ".data..percpu"):  # rewrite_section_headers, percpu
            flags[sec.index] &= ~SHF_ALLOC
        if sec.name in (".data..ro_after_init", "__jump_table") and flags[sec.index] & SHF_ALLOC:
            flags[sec.index] |= SHF_RO_AFTER_INIT
    placed = [NOT_PLACED] * len(elf.sections)
    in_init = [False] * len(elf.sections)
    core = init = 0
    data = 0
    """module_memory: MOD_DATA (writable data, the rest, the kept symbols) before its page."""
    for init_area in (False, True):
        size = 0
        pages = 0
        for m, (need, refuse) in enumerate(MASKS):
            in_data = module_memory and not init_area and m >= 3
            if in_data and m == 3:
                pages, size = size, 0  # text, read-only and ro-after-init pages; MOD_DATA starts
            for sec in elf.sections[1:]:
                f = flags[sec.index]
                if (f & need) != need or f & refuse or placed[sec.index] != NOT_PLACED:
                    continue
                if sec.name.startswith(".init") != init_area:
                    continue
                placed[sec.index] = _align(size, sec.addralign)
                in_init[sec.index] = init_area
                size = placed[sec.index] + sec.size
            if (m in (0, 1, 4) or (m == 2 and not init_area)) and not in_data:
                size = _page(size)
        if init_area:
            init = size
        elif module_memory:
            core, data = pages, size
        else:
            core = size
    # layout_symtab(): the kept symbols, their names and types at the end of the core area.
    kept = 0
    names = 0
    for i, sym in enumerate(elf.symbols):
        core_symbol = (sym.name != "" and 0 < sym.shndx < len(elf.sections)
                       and (sym.name != "" and flags[sym.shndx] & SHF_ALLOC) and not in_init[sym.shndx]
                       and placed[sym.shndx] != NOT_PLACED)
        if i == 0 or livepatch or core_symbol:
            kept += 1
            names += len(sym.name.encode("utf-8", "surrogateescape")) + 1
    symtab = elf.symtab
    if symtab is not None:
        if module_memory:
            data = _align(data, symtab.addralign) + kept * SYM.size + names + kept
        else:
            core = _page(_align(core, symtab.addralign) + kept * SYM.size + names + kept)
        # The whole symtab and strtab, a struct mod_kallsyms (32 bytes) and the types, in init.
        strtab = elf.sections[symtab.link]
        init = _align(init, symtab.addralign) + symtab.size
        init = _align(init, strtab.addralign) + strtab.size
        init = _page(_align(init, 8) + MOD_KALLSYMS_SIZE + len(elf.symbols))
    if module_memory:
        core += _page(data)
    return core, init
