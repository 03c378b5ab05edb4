"""A livepatch module's patch, read from its static data by following relocations.

Two forms exist:

* the kernel's own (samples, selftests, hand-written patches): a static
  `struct klp_patch` whose `.mod` is THIS_MODULE, pointing at `klp_object[]`,
  each pointing at `klp_func[]` (and from 5.5 `klp_state[]`).  Pointers are
  zero in the file; the R_X86_64_64 relocation at each pointer field says
  what it points at (a string literal, an array, one of the module's
  functions).  The patch is the one object of the module whose first field
  relocates to `__this_module` and whose second points at module data.
* kpatch-build's: a `.kpatch.funcs` section of `struct kpatch_patch_func`
  {new_addr, new_size, old_addr, old_size, sympos, name, objname} (56 bytes;
  48 without sympos in older kpatch), from which kpatch's patch hook builds
  the klp structures at init, and `.kpatch.callbacks.<slot>` sections of
  {callback, objname}.  kpatch's replace option is a compile-time constant of
  its hook, not data: such patches read as replace = false.

Every array is checked against its symbol: the size must be a whole number
of the release's stride and end with a zeroed terminator, else PatchError
(the module was built for another layout, or the file is damaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klpfs.elf.layouts import CALLBACK_SLOTS, KlpLayout
from klpfs.elf.reader import SHF_ALLOC, SHF_EXECINSTR, STT_OBJECT, ElfFile, Extern, Place, Symbol

THIS_MODULE_SYMBOL = "__this_module"
KPATCH_FUNCS = ".kpatch.funcs"
KPATCH_CALLBACKS = ".kpatch.callbacks."


class PatchError(ValueError):
    """A patch description that cannot be read; the message says which structure and why."""


@dataclass(frozen=True)
class KoFunc:
    old_name: str | None
    new_func: str | None
    """The replacement: one of the module's function symbols."""
    old_sympos: int = 0
    immediate: bool = False


@dataclass
class KoObject:
    name: str | None
    """The patched module's name; None for vmlinux."""
    funcs: list[KoFunc] | None
    callbacks: dict[str, str] = field(default_factory=dict)
    """Callback slot (pre_patch, ...) -> the module function it points at."""


@dataclass
class KoPatch:
    """What a livepatch module's patch says, with function pointers as symbol names."""

    symbol: str
    """Where it was read: the klp_patch object's symbol, or the .kpatch.funcs section."""
    objs: list[KoObject] | None
    replace: bool = False
    immediate: bool = False
    states: list[tuple[int, int]] = field(default_factory=list)
    """(id, version) of each klp_state."""
    kpatch: bool = False

    def describe(self) -> list[str]:
        """One line per function and callback, as `modinfo`-like text for people and errors."""
        lines = []
        for obj in self.objs or ():
            where = obj.name or "vmlinux"
            for func in obj.funcs or ():
                lines.append(f"{where}: {func.old_name},{func.old_sympos or 1} -> {func.new_func}")
            for slot, name in obj.callbacks.items():
                lines.append(f"{where}: {slot} callback {name}")
        return lines


def read_patch(elf: ElfFile, layout: KlpLayout) -> KoPatch | None:
    """The module's patch (static structures first, else kpatch's sections), or None."""
    patch = _static_patch(elf, layout)
    if patch is None and elf.section(KPATCH_FUNCS) is not None:
        patch = _kpatch_patch(elf)
    return patch


# -- the kernel's static structures -------------------------------------------------------------

def _this_module(elf: ElfFile) -> Place | None:
    sym = next((s for s in elf.symbols if s.name == THIS_MODULE_SYMBOL and s.defined), None)
    return None if sym is None else Place(sym.shndx, sym.value)


def _is_data(elf: ElfFile, place: Place | Extern | int) -> bool:
    if not isinstance(place, Place):
        return False
    flags = elf.sections[place.section].flags
    return bool(flags & SHF_ALLOC) and not flags & SHF_EXECINSTR


def _static_patch(elf: ElfFile, layout: KlpLayout) -> KoPatch | None:
    this_module = _this_module(elf)
    if this_module is None:
        return None
    candidates = []
    for sym in elf.symbols:
        if sym.type != STT_OBJECT or not sym.defined or sym.size < 16:
            continue
        if not elf.sections[sym.shndx].flags & SHF_ALLOC:
            continue
        if elf.pointer(sym.shndx, sym.value + layout.patch_mod) != this_module:
            continue
        if _is_data(elf, elf.pointer(sym.shndx, sym.value + layout.patch_objs)):
            candidates.append(sym)
    if not candidates:
        return None
    if len(candidates) > 1:
        names = ", ".join(s.name for s in candidates)
        raise PatchError(f"several objects look like a struct klp_patch ({names}); a module has one patch")
    sym = candidates[0]
    if sym.size < layout.patch_external:
        raise PatchError(f"{sym.name}: {sym.size} bytes, smaller than a {layout.name} struct klp_patch")
    base = Place(sym.shndx, sym.value)
    for field_name, offset in (("replace", layout.patch_replace), ("immediate", layout.patch_immediate)):
        if offset is not None and elf.rela_at(base.section, base.offset + offset) is not None:
            raise PatchError(f"{sym.name}: a pointer where the {layout.name} layout has the bool `{field_name}`: "
                             "the module was built for another layout")

    def flag(offset: int | None) -> bool:
        return offset is not None and elf.uint(base.section, base.offset + offset, 1) != 0

    states = []
    if layout.patch_states is not None:
        target = elf.pointer(base.section, base.offset + layout.patch_states)
        if isinstance(target, Place):
            states = _states(elf, layout, target)
    objs_ptr = elf.pointer(base.section, base.offset + layout.patch_objs)
    assert isinstance(objs_ptr, Place)
    return KoPatch(sym.name, _objects(elf, layout, objs_ptr), replace=flag(layout.patch_replace),
                   immediate=flag(layout.patch_immediate), states=states)


def _array(elf: ElfFile, place: Place, stride: int, what: str, layout: KlpLayout) -> tuple[Symbol, int]:
    """The array symbol at `place` and its number of entries, terminator included."""
    sym = elf.object_at(place)
    if sym is None or sym.value != place.offset:
        raise PatchError(f"the {what} array at {elf.describe(place)} has no symbol of its own")
    if sym.size == 0 or sym.size % stride:
        raise PatchError(f"{sym.name}: {sym.size} bytes is not a whole number of {stride}-byte {what} entries "
                         f"(the {layout.name} layout): the module was built for another layout")
    count = sym.size // stride
    last = place.offset + (count - 1) * stride
    relocated = any(last <= r.offset < last + stride for r in elf.relas.get(place.section, []))
    if relocated or any(elf.read(place.section, last, stride)):
        raise PatchError(f"{sym.name}: its last {what} entry is not the zeroed terminator "
                         f"(the {layout.name} layout, {stride}-byte entries): the module was built for "
                         "another layout")
    return sym, count


def _string(elf: ElfFile, place: Place | Extern | int, what: str) -> str | None:
    if place == 0:
        return None
    if not isinstance(place, Place):
        raise PatchError(f"{what} points at {elf.describe(place)}, not at a string of the module")
    return elf.cstring(place)


def _function(elf: ElfFile, place: Place | Extern | int, what: str) -> str | None:
    if place == 0:
        return None
    sym = elf.function_at(place) if isinstance(place, Place) else None
    if sym is None:
        raise PatchError(f"{what} points at {elf.describe(place)}, not at one of the module's functions")
    return sym.name


def _objects(elf: ElfFile, layout: KlpLayout, place: Place) -> list[KoObject]:
    sym, count = _array(elf, place, layout.obj_size, "klp_object", layout)
    objs = []
    for i in range(count):
        at = place.offset + i * layout.obj_size
        name_ptr = elf.pointer(place.section, at + layout.obj_name)
        funcs_ptr = elf.pointer(place.section, at + layout.obj_funcs)
        if name_ptr == 0 and funcs_ptr == 0:  # klp_for_each_object_static's end
            break
        name = _string(elf, name_ptr, f"{sym.name}[{i}].name")
        funcs = None
        if isinstance(funcs_ptr, Place):
            funcs = _funcs(elf, layout, funcs_ptr)
        elif funcs_ptr != 0:
            raise PatchError(f"{sym.name}[{i}].funcs points at {elf.describe(funcs_ptr)}")
        callbacks = {}
        for n, slot in enumerate(CALLBACK_SLOTS):
            fn = _function(elf, elf.pointer(place.section, at + layout.obj_callbacks + 8 * n),
                           f"{sym.name}[{i}].callbacks.{slot}")
            if fn is not None:
                callbacks[slot] = fn
        objs.append(KoObject(name, funcs, callbacks))
    return objs


def _funcs(elf: ElfFile, layout: KlpLayout, place: Place) -> list[KoFunc]:
    sym, count = _array(elf, place, layout.func_size, "klp_func", layout)
    funcs = []
    for i in range(count):
        at = place.offset + i * layout.func_size
        old_name = elf.pointer(place.section, at + layout.func_old_name)
        new_func = elf.pointer(place.section, at + layout.func_new_func)
        sympos = elf.u64(place.section, at + layout.func_old_sympos)
        if old_name == 0 and new_func == 0 and sympos == 0:  # klp_for_each_func_static's end
            break
        immediate = (layout.func_immediate is not None
                     and elf.uint(place.section, at + layout.func_immediate, 1) != 0)
        funcs.append(KoFunc(_string(elf, old_name, f"{sym.name}[{i}].old_name"),
                            _function(elf, new_func, f"{sym.name}[{i}].new_func"), sympos, immediate))
    return funcs


def _states(elf: ElfFile, layout: KlpLayout, place: Place) -> list[tuple[int, int]]:
    assert layout.state_size is not None
    sym, count = _array(elf, place, layout.state_size, "klp_state", layout)
    states = []
    for i in range(count):
        at = place.offset + i * layout.state_size
        state_id = elf.u64(place.section, at + layout.state_id)
        if state_id == 0:  # klp_for_each_state's end
            break
        states.append((state_id, elf.uint(place.section, at + layout.state_version, 4)))
    return states


# -- kpatch-build's sections ------------------------------------------------------------------------

def _kpatch_stride(elf: ElfFile, section: int, size: int) -> int:
    """56 bytes (with sympos) or 48 (older kpatch): the one whose name pointer is relocated."""
    for stride, name_at in ((56, 40), (48, 32)):
        if size and size % stride == 0 and elf.rela_at(section, name_at) is not None:
            return stride
    raise PatchError(f"{KPATCH_FUNCS}: {size} bytes is not a whole number of struct kpatch_patch_func "
                     "entries (56 bytes, or 48 in older kpatch)")


def _kpatch_patch(elf: ElfFile) -> KoPatch:
    sec = elf.section(KPATCH_FUNCS)
    assert sec is not None
    stride = _kpatch_stride(elf, sec.index, sec.size)
    name_at = stride - 16
    by_object: dict[str | None, KoObject] = {}
    for i in range(sec.size // stride):
        at = i * stride
        what = f"{KPATCH_FUNCS}[{i}]"
        new_func = _function(elf, elf.pointer(sec.index, at), f"{what}.new_addr")
        sympos = elf.u64(sec.index, at + 32) if stride == 56 else 0
        name = _string(elf, elf.pointer(sec.index, at + name_at), f"{what}.name")
        objname = _string(elf, elf.pointer(sec.index, at + name_at + 8), f"{what}.objname")
        obj = _kpatch_object(by_object, objname)
        assert obj.funcs is not None
        obj.funcs.append(KoFunc(name, new_func, sympos))
    for slot in CALLBACK_SLOTS:
        cb_sec = elf.section(KPATCH_CALLBACKS + slot)
        if cb_sec is None:
            continue
        for i in range(cb_sec.size // 16):
            what = f"{cb_sec.name}[{i}]"
            fn = _function(elf, elf.pointer(cb_sec.index, 16 * i), f"{what}.callback")
            objname = _string(elf, elf.pointer(cb_sec.index, 16 * i + 8), f"{what}.objname")
            if fn is not None:
                _kpatch_object(by_object, objname).callbacks[slot] = fn
    return KoPatch(KPATCH_FUNCS, list(by_object.values()), kpatch=True)


def _kpatch_object(by_object: dict[str | None, KoObject], objname: str | None) -> KoObject:
    key = None if objname in (None, "vmlinux") else objname
    if key not in by_object:
        by_object[key] = KoObject(key, [])
    return by_object[key]
