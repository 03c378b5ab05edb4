"""The ELF reader, the livepatch structure layouts, .modinfo/parameters, the size
and the code decoder, on .ko files the tests generate (tests/elf/elfgen.py)."""

from __future__ import annotations

import struct

import pytest

from elf.elfgen import ElfBuilder, Patch, layout_of, livepatch_ko
from klpfs.elf.coresize import module_sizes
from klpfs.elf.klp import PatchError, read_patch
from klpfs.elf.kmod import KoError, elf_validity_line, modinfo_fields, read_ko, strip_signature
from klpfs.elf.layouts import LayoutError, layout_for
from klpfs.elf.modinfo import read_params
from klpfs.elf.reader import ElfError, ElfFile
from klpfs.elf.x86 import Const, Str, Var, decode_function, referenced_strings

RELEASES = {"4.15": "4.15.0-213-generic", "4.16": "4.16.0-2-amd64", "5.1": "5.1.20-300.fc30.x86_64",
            "6.1": "6.1.0-50-amd64"}


def small_elf(**kw: int) -> bytes:
    b = ElfBuilder()
    b.sec(".text", flags=6).put(b"\xc3")
    return b.build(**kw)


# -- bad files -----------------------------------------------------------------------------------------

BAD = {
    "not ELF": (b"#!/bin/sh\necho this is a script, not a module\n" * 3,
                "not an ELF file", "Invalid ELF header magic: != \x7fELF"),
    "short": (b"\x7fELF\x02\x01\x01", "shorter than the 64-byte ELF64 header", "Invalid ELF header len 7"),
    "32-bit": (small_elf(elfclass=1, machine=3), "32-bit (ELFCLASS32)", "Invalid architecture in ELF header: 3"),
    "big endian": (small_elf(encoding=2), "big endian", None),
    "executable": (small_elf(etype=2), "ELF type 2, not a relocatable object", "Invalid ELF header type: 2 != 1"),
    "arm64": (small_elf(machine=183), "machine 183 (AArch64), not x86-64", "Invalid architecture in ELF header: 183"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_raise_one_error_naming_the_problem(case: str) -> None:
    data, problem, kernel_line = BAD[case]
    with pytest.raises(ElfError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        ElfFile(data)
    if kernel_line is not None:
        assert elf_validity_line(data) == kernel_line


def test_truncated_and_corrupt_offsets() -> None:
    data = livepatch_ko(Patch())
    cut = data[:len(data) // 2]
    with pytest.raises(ElfError, match="truncated: the section header table"):
        ElfFile(cut)
    assert elf_validity_line(cut) == "Invalid ELF section header overflow"
    # A section whose offset points past the end of the file.
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    bad = bytearray(data)
    struct.pack_into("<Q", bad, shoff + 64 + 24, len(data) + 100)  # section 1's sh_offset
    with pytest.raises(ElfError, match="truncated: section 1"):
        ElfFile(bytes(bad))
    assert elf_validity_line(bytes(bad)) == "Invalid ELF section in module (section 1 type 1)"
    # e_shstrndx out of range
    bad = bytearray(data)
    struct.pack_into("<H", bad, 0x3E, 999)
    with pytest.raises(ElfError, match="section name table index 999"):
        ElfFile(bytes(bad))
    assert elf_validity_line(bytes(bad)).startswith("Invalid ELF section name index: 999")


def test_a_good_module_passes_the_kernel_checks() -> None:
    data = livepatch_ko(Patch())
    assert elf_validity_line(data) is None
    elf = ElfFile(data)
    assert elf.section(".gnu.linkonce.this_module") is not None
    assert {s.name for s in elf.symbols if s.type == 2} >= {"patched_show", "init_module", "cleanup_module"}


def test_signature_is_split_off() -> None:
    data = livepatch_ko(Patch())
    sig = b"\x30" * 40
    signed = data + sig + bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(sig)) + \
        b"~Module signature appended~\n"
    assert strip_signature(signed) == (data, True)
    assert strip_signature(data) == (data, False)
    with pytest.raises(KoError):
        strip_signature(data + bytes([1, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", 4)
                        + b"~Module signature appended~\n")


# -- layouts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", RELEASES)
def test_each_release_layout_reads_back(version: str) -> None:
    """4.15 (immediate), 4.16-5.0, 5.1-5.4 (replace), 5.5+ (states, replace)."""
    p = Patch(release=RELEASES[version], funcs=[("cmdline_proc_show", "a_show", 0), ("type_show", "b_show", 2)],
              objname="some_mod", replace=version in ("5.1", "6.1"), immediate=version == "4.15",
              states=[(7, 3)] if version == "6.1" else [], callbacks=True)
    ko = read_ko("/tmp/t.ko", livepatch_ko(p))
    patch = read_patch(ko.elf, layout_of(p))
    assert patch is not None and patch.symbol == "patch"
    assert len(patch.objs) == 1
    obj = patch.objs[0]
    assert obj.name == "some_mod"
    assert [(f.old_name, f.new_func, f.old_sympos, f.immediate) for f in obj.funcs] == [
        ("cmdline_proc_show", "a_show", 0, version == "4.15"), ("type_show", "b_show", 2, version == "4.15")]
    assert obj.callbacks == {"pre_patch": "pre_patch"}
    assert patch.replace == (version in ("5.1", "6.1"))
    assert patch.immediate == (version == "4.15")
    assert patch.states == ([(7, 3)] if version == "6.1" else [])


@pytest.mark.parametrize("wrong", [(4, 16), (4, 15), (5, 1)])
def test_a_wrong_layout_is_an_error_not_a_guess(wrong: tuple[int, int]) -> None:
    """A 6.1 module read with another release's layout: the klp_func[] stride does not fit
    (4.x), or klp_patch has its `states` pointer where 5.1-5.4 have `replace`."""
    p = Patch(funcs=[("cmdline_proc_show", "a_show", 0)] * 3, states=[(1, 1)])
    ko = read_ko("/tmp/t.ko", livepatch_ko(p))
    with pytest.raises(PatchError, match="built for another layout"):
        read_patch(ko.elf, layout_for(wrong))


def test_missing_terminator_is_refused() -> None:
    p = Patch(terminator=False, funcs=[("cmdline_proc_show", "a_show", 0), ("version_proc_show", "b_show", 0)])
    ko = read_ko("/tmp/t.ko", livepatch_ko(p))
    with pytest.raises(PatchError, match="funcs: its last klp_func entry is not the zeroed terminator"):
        read_patch(ko.elf, layout_of(p))


def test_no_layout_before_4_15() -> None:
    with pytest.raises(LayoutError, match="4.9"):
        layout_for((4, 9))


def test_kpatch_funcs_section() -> None:
    """kpatch-build's .kpatch.funcs: {new_addr, new_size, old_addr, old_size, sympos, name, objname}."""
    b = ElfBuilder()
    text = b.sec(".text", flags=6, align=16)
    text.put(b"\x31\xc0\xc3")
    b.sym("cmdline_proc_show", ".text", 0, 3, 2)
    strings = b.sec(".kpatch.strings", flags=2)
    name_at = strings.put(b"cmdline_proc_show\0")
    obj_at = strings.put(b"vmlinux\0")
    funcs = b.sec(".kpatch.funcs", flags=2, align=8)
    funcs.put(struct.pack("<QQQQQQQ", 0, 3, 0, 0, 1, 0, 0))
    b.rela(".kpatch.funcs", 0, 1, "cmdline_proc_show")
    b.rela(".kpatch.funcs", 40, 1, ".kpatch.strings", name_at)
    b.rela(".kpatch.funcs", 48, 1, ".kpatch.strings", obj_at)
    patch = read_patch(ElfFile(b.build()), layout_for((6, 1)))
    assert patch is not None and patch.kpatch
    assert [(o.name, [(f.old_name, f.new_func, f.old_sympos) for f in o.funcs]) for o in patch.objs] == [
        (None, [("cmdline_proc_show", "cmdline_proc_show", 1)])]


# -- modinfo, parameters, size ----------------------------------------------------------------------------

def test_modinfo_fields_in_kmod_order() -> None:
    data = livepatch_ko(Patch(param="pre_patch_ret"))
    fields = modinfo_fields("/tmp/t.ko", data)
    assert fields == [
        ("filename", "/tmp/t.ko"), ("livepatch", "Y"), ("license", "GPL"), ("description", "A test livepatch"),
        ("depends", ""), ("retpoline", "Y"), ("name", "test_ko_patch"),
        ("vermagic", "6.1.0-50-amd64 SMP preempt mod_unload modversions "),
        ("parm", "pre_patch_ret:What pre_patch returns (int)")]


def test_parameters_from_param_section() -> None:
    ko = read_ko("/tmp/t.ko", livepatch_ko(Patch(param="pre_patch_ret")))
    [param] = read_params(ko.elf)
    assert (param.name, param.type, param.ops, param.perm, param.var, param.default) == (
        "pre_patch_ret", "int", "param_ops_int", 0o644, "pre_patch_ret", 0)


def test_a_small_module_is_four_pages() -> None:
    """text, read-only data, data and the kept symbols: a page each (6.1's layout)."""
    ko = read_ko("/tmp/t.ko", livepatch_ko(Patch()))
    assert module_sizes(ko.elf, livepatch=True)[0] == 16384


def test_name_must_agree() -> None:
    data = livepatch_ko(Patch()).replace(b"name=test_ko_patch", b"name=test_ko_other")
    with pytest.raises(KoError, match="struct module names the module 'test_ko_patch', .modinfo 'test_ko_other'"):
        read_ko("/tmp/t.ko", data)


# -- code -----------------------------------------------------------------------------------------------------

def test_show_function_decodes_to_its_seq_printf() -> None:
    ko = read_ko("/tmp/t.ko", livepatch_ko(Patch(param="pre_patch_ret")))
    syms = {s.name: s for s in ko.elf.symbols}
    show = decode_function(ko.elf, syms["patched_show"])
    assert show.decoded and show.calls[0].target == "seq_printf"
    assert show.calls[0].args[1:3] == (Str("%s\n"), Str("this has been live patched by a test .ko"))
    assert show.ret == Const(0)
    pre = decode_function(ko.elf, syms["pre_patch"])
    assert isinstance(pre.ret, Var) and pre.ret.name == "pre_patch_ret" and pre.ret.size == 4


def test_code_the_decoder_does_not_follow() -> None:
    """A branch: the function is not decodable; its literals remain."""
    b = ElfBuilder()
    ro = b.sec(".rodata.str1.1", flags=2)
    at = ro.put(b"a literal\0")
    text = b.sec(".text", flags=6)
    code = bytearray(b"\x48\xc7\xc6\0\0\0\0\x85\xc0\x74\x02\xc3")  # mov $s,%rsi; test; je; ret
    b.rela(".text", 3, 11, ".rodata.str1.1", at)
    text.put(bytes(code))
    b.sym("f", ".text", 0, len(code), 2)
    elf = ElfFile(b.build())
    sym = next(s for s in elf.symbols if s.name == "f")
    prog = decode_function(elf, sym)
    assert not prog.decoded and "instruction 85" in (prog.error or "")
    assert referenced_strings(elf, sym) == ["a literal"]
