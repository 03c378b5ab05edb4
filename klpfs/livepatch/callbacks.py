"""The callback wrappers (kernel/livepatch/core.h): post_unpatch runs at most once
per successful pre_patch, gated by post_unpatch_enabled."""

from __future__ import annotations

from klpfs.livepatch.structs import KlpObject


def klp_pre_patch_callback(obj: KlpObject) -> int:
    ret = 0
    if obj.callbacks.pre_patch is not None:
        ret = obj.callbacks.pre_patch(obj)
    obj.callbacks.post_unpatch_enabled = not ret
    return ret


def klp_post_patch_callback(obj: KlpObject) -> None:
    if obj.callbacks.post_patch is not None:
        obj.callbacks.post_patch(obj)


def klp_pre_unpatch_callback(obj: KlpObject) -> None:
    if obj.callbacks.pre_unpatch is not None:
        obj.callbacks.pre_unpatch(obj)


def klp_post_unpatch_callback(obj: KlpObject) -> None:
    if obj.callbacks.post_unpatch_enabled and obj.callbacks.post_unpatch is not None:
        obj.callbacks.post_unpatch(obj)
    obj.callbacks.post_unpatch_enabled = False
