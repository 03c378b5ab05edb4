"""System states (kernel/livepatch/state.c, 5.5): what a patch establishes,
and whether a new patch may take over from the installed ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from klpfs.livepatch.structs import KlpPatch, KlpState

if TYPE_CHECKING:
    from klpfs.livepatch.core import Livepatch


def klp_for_each_state(patch: KlpPatch) -> Iterator[KlpState]:
    """The patch's states, up to the entry with id 0 that ends the array."""
    for state in patch.states:
        if state.id == 0:
            return
        yield state


def klp_get_state(patch: KlpPatch, id: int) -> KlpState | None:
    return next((state for state in klp_for_each_state(patch) if state.id == id), None)


def klp_get_prev_state(lp: Livepatch, id: int) -> KlpState | None:
    """The state `id` of the newest patch installed before the one in transition."""
    if lp.klp_transition_patch is None:
        return None
    found = None
    for patch in lp.klp_patches:
        if patch is lp.klp_transition_patch:
            break
        found = klp_get_state(patch, id) or found
    return found


def klp_is_patch_compatible(lp: Livepatch, patch: KlpPatch) -> bool:
    """Every installed state must be kept at the same or a newer version; a
    non-replace patch may leave a state alone, a replace patch may not."""
    for old in lp.klp_patches:
        for old_state in klp_for_each_state(old):
            state = klp_get_state(patch, old_state.id)
            if state is None:
                if patch.replace:
                    return False
            elif state.version < old_state.version:
                return False
    return True
