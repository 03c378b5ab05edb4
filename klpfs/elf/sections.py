"""What a kernel module's ELF file holds, as constants: the ELF numbers the
writer uses, the layout of `struct module` in `.gnu.linkonce.this_module`,
the `.modinfo` keys kbuild adds, and the `.klpfs.module` section that
carries a module file's source inside the .ko.

The layouts were read off modules built with kbuild against Debian's own
headers (6.1.0-57-amd64 and 6.12.118+deb12-amd64): the offsets of the
`.rela.gnu.linkonce.this_module` relocations and the section sizes, as
`readelf -S -r` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klpfs.profiles import Profile

# -- ELF numbers (elf.h) ------------------------------------------------------------------
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ELFOSABI_SYSV = 0
ET_REL = 1
EM_X86_64 = 62
EHDR_SIZE = 64
SHDR_SIZE = 64
SYM_SIZE = 24
RELA_SIZE = 24

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOTE = 7

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_INFO_LINK = 0x40

STB_LOCAL = 0
STB_GLOBAL = 1
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
STT_SECTION = 3
STT_FILE = 4
SHN_UNDEF = 0
SHN_ABS = 0xFFF1

R_X86_64_64 = 1

NT_GNU_BUILD_ID = 3
LINUX_ELFNOTE_BUILD_SALT = 0x100
LINUX_ELFNOTE_LTO_INFO = 0x101

# -- x86-64 code ----------------------------------------------------------------------------
NOP5 = bytes.fromhex("0f1f440000")
"""What sits at a traceable function's entry once ftrace has patched out `call __fentry__`."""
RET = b"\xc3"
INT3 = b"\xcc"
"""What the linker pads between functions with on x86."""

# -- section names -----------------------------------------------------------------------------
TEXT = ".text"
INIT_TEXT = ".init.text"
EXIT_TEXT = ".exit.text"
MODINFO = ".modinfo"
THIS_MODULE = ".gnu.linkonce.this_module"
MCOUNT_LOC = "__mcount_loc"
VERSIONS = "__versions"
MODVERSION_INFO_SIZE = 64
"""struct modversion_info: `unsigned long crc` then `char name[MODULE_NAME_LEN]` (56)."""
VERSIONS_ALIGN = 32
KLPFS_MODULE = ".klpfs.module"
"""klpfs's own section: the module file the .ko was written from (see `source_section`)."""

# -- struct module -----------------------------------------------------------------------------
MODULE_NAME_OFFSET = 24
"""`name` follows `enum module_state state` (4 bytes, padded to 8) and `struct list_head list` (16)."""
THIS_MODULE_ALIGN = 64
"""struct module is ____cacheline_aligned."""


@dataclass(frozen=True)
class ModuleLayout:
    """What one kernel generation's kbuild puts in a module that klpfs reproduces."""

    measured: str
    """The Debian kernel whose module these numbers were read off."""
    this_module_size: int
    """sizeof(struct module): the size of .gnu.linkonce.this_module and of __this_module."""
    init_offset: int
    """offsetof(struct module, init): where the relocation to init_module lands."""
    exit_offset: int
    """offsetof(struct module, exit): where the relocation to cleanup_module lands."""
    modpost_keys: tuple[str, ...]
    """The .modinfo keys kbuild adds after the module's own, in section order.  gcc emits a
    file's top-level variables last first, so they come out in reverse of the .mod.c
    (6.1: vermagic, name, intree, retpoline, depends); from 6.11 vermagic and retpoline
    come from scripts/module-common.c, linked last."""


LAYOUT_6_1 = ModuleLayout("6.1.0-57-amd64", this_module_size=0x380, init_offset=0x138, exit_offset=0x350,
                          modpost_keys=("srcversion", "depends", "retpoline", "intree", "name", "vermagic"))
LAYOUT_6_12 = ModuleLayout("6.12.118+deb12-amd64", this_module_size=0x500, init_offset=0x138, exit_offset=0x4b0,
                           modpost_keys=("srcversion", "depends", "intree", "name", "retpoline", "vermagic"))


def version_tuple(profile: Profile) -> tuple[int, int]:
    major, minor = (int(x) for x in profile.version.split(".")[:2])
    return major, minor


def module_layout(profile: Profile) -> ModuleLayout:
    """The measured layout nearest to the profile's kernel: 6.12's from 6.11 on, 6.1's before
    (4.15 to 5.1 have a struct module of their own size; no module of theirs was at hand
    to measure, so they get 6.1's)."""
    return LAYOUT_6_12 if version_tuple(profile) >= (6, 11) else LAYOUT_6_1


def vermagic(profile: Profile) -> str:
    """VERMAGIC_STRING: the profile's own if it has one, else its release in the shape of a
    Debian 6.1 module's ("6.1.0-50-amd64 SMP preempt mod_unload modversions ", with the
    trailing space)."""
    own = getattr(profile, "vermagic", None)
    if isinstance(own, str) and own:
        return own
    return f"{profile.release} SMP preempt mod_unload modversions "


def linux_notes(profile: Profile) -> list[tuple[int, bytes]]:
    """(type, desc) of the .note.Linux notes, in section order: the LTO-info note
    (elfnote-lto.h, 5.12 on) then the build salt (4.18 on; Debian's is the release)."""
    notes: list[tuple[int, bytes]] = []
    version = version_tuple(profile)
    if version >= (5, 12):
        notes.append((LINUX_ELFNOTE_LTO_INFO, (0).to_bytes(4, "little")))
    if version >= (4, 18):
        notes.append((LINUX_ELFNOTE_BUILD_SALT, profile.release.encode() + b"\0"))
    return notes


def modversions(profile: Profile) -> list[tuple[int, str]]:
    """(crc, symbol) of the `__versions` entries: `module_layout`'s, which a modversions
    kernel checks before anything else (check_modstruct_version; a module with no
    __versions at all is refused), when the profile knows its CRC."""
    crc = getattr(profile, "module_layout_crc", None)
    return [] if crc is None else [(crc, "module_layout")]


# -- the .klpfs.module section ------------------------------------------------------------------
SOURCE_MAGIC = "klpfs-module"
SOURCE_SUFFIXES = (".py", ".toml")


def source_section(suffix: str, filename: str, text: str) -> bytes:
    """The `.klpfs.module` contents: `klpfs-module <suffix> <filename>` on the first line,
    then the module file's text, so a loader can build the module through the .py or
    TOML path it came from."""
    if suffix not in SOURCE_SUFFIXES:
        raise ValueError(f"{suffix!r}: a module source is one of {', '.join(SOURCE_SUFFIXES)}")
    if "\n" in filename:
        raise ValueError(f"{filename!r}: a module file name has no newline")
    return f"{SOURCE_MAGIC} {suffix} {filename}\n{text}".encode()


def parse_source_section(data: bytes) -> tuple[str, str, str]:
    """(suffix, filename, text) of a `.klpfs.module` section; ValueError if it is not one."""
    try:
        decoded = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{KLPFS_MODULE}: not UTF-8 text") from None
    header, _, text = decoded.partition("\n")
    magic, _, rest = header.partition(" ")
    suffix, _, filename = rest.partition(" ")
    if magic != SOURCE_MAGIC or suffix not in SOURCE_SUFFIXES or not filename:
        raise ValueError(f"{KLPFS_MODULE}: does not start with `{SOURCE_MAGIC} <.py|.toml> <filename>`")
    return suffix, filename, text
