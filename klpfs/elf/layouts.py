"""Where the patch author's fields of the livepatch structures lie, by release.

A livepatch module's `struct klp_patch`, `klp_object[]`, `klp_func[]` and
`klp_state[]` are static data in the .ko; their layout is
include/linux/livepatch.h of the release the module was built for, x86-64,
with a 64-byte `struct kobject` and 16-byte `list_head` (distribution
kernels: no CONFIG_DEBUG_KOBJECT_RELEASE).  The tables below were worked out
from those headers (4.15; 4.16 to 5.0; 5.1 to 5.4; 5.5 on, checked against
Debian 6.1 modules built with kbuild: funcs[] 2 x 152 bytes, objs[] 2 x 168,
patch 200), not read from DWARF: a .ko need not carry debug info, and the
array strides are checked against each array symbol's size instead, so a
module of another layout fails with an error rather than being misread.

    4.15      klp_func gains `immediate` (after old_sympos), klp_patch `immediate`
    4.16-5.0  `immediate` gone
    5.1-5.4   klp_func/klp_object gain list nodes and nop/dynamic; klp_patch `replace`
    5.5 on    klp_patch `states` (before `replace`); struct klp_state
"""

from __future__ import annotations

from dataclasses import dataclass

CALLBACK_SLOTS = ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")


@dataclass(frozen=True)
class KlpLayout:
    name: str
    """The releases it covers, as docstrings and errors name them."""
    func_size: int
    """sizeof(struct klp_func): the stride of a klp_func[] array."""
    func_immediate: int | None
    obj_size: int
    patch_external: int
    """The end of klp_patch's author fields (the patch symbol is at least this big)."""
    patch_immediate: int | None
    patch_states: int | None
    patch_replace: int | None
    state_size: int | None
    """sizeof(struct klp_state), 5.5 on."""

    # Offsets common to every release: author fields come first.
    func_old_name = 0
    func_new_func = 8
    func_old_sympos = 16
    obj_name = 0
    obj_funcs = 8
    obj_callbacks = 16
    """pre_patch, post_patch, pre_unpatch, post_unpatch: four pointers from here."""
    patch_mod = 0
    patch_objs = 8
    state_id = 0
    state_version = 8


LAYOUT_4_15 = KlpLayout("4.15", func_size=144, func_immediate=24, obj_size=136, patch_external=17,
                        patch_immediate=16, patch_states=None, patch_replace=None, state_size=None)
LAYOUT_4_16 = KlpLayout("4.16 to 5.0", func_size=136, func_immediate=None, obj_size=136, patch_external=16,
                        patch_immediate=None, patch_states=None, patch_replace=None, state_size=None)
LAYOUT_5_1 = KlpLayout("5.1 to 5.4", func_size=152, func_immediate=None, obj_size=168, patch_external=17,
                       patch_immediate=None, patch_states=None, patch_replace=16, state_size=None)
LAYOUT_5_5 = KlpLayout("5.5 on", func_size=152, func_immediate=None, obj_size=168, patch_external=25,
                       patch_immediate=None, patch_states=16, patch_replace=24, state_size=24)


class LayoutError(ValueError):
    """No layout is known for that release."""


def layout_for(version: tuple[int, int]) -> KlpLayout:
    """The layout of a release (major, minor); LayoutError before 4.15 (callbacks came in 4.15)."""
    if version < (4, 15):
        raise LayoutError(f"no livepatch structure layout for {version[0]}.{version[1]} "
                          "(klpfs reads modules for 4.15 and later)")
    if version < (4, 16):
        return LAYOUT_4_15
    if version < (5, 1):
        return LAYOUT_4_16
    if version < (5, 5):
        return LAYOUT_5_1
    return LAYOUT_5_5
