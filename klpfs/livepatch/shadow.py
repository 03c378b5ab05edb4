"""Shadow variables (kernel/livepatch/shadow.c).

A table of <obj, id> -> data, independent of any patch's state: variables
outlive the patch that made them unless freed.  The 4.17 form adds an
optional constructor (runs only when the variable is really created; a
failure prints the kernel's error and yields None) and destructors on free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from klpfs.kernel.memory import addr_of, hashed_pointer
from klpfs.kernel.printk import KERN_ERR, KERN_WARNING

if TYPE_CHECKING:
    from klpfs.kernel.kernel import Kernel

Ctor = Callable[[object, list[object], object], int]
"""ctor(obj, shadow_data_cell, ctor_data) -> 0 or -errno; it fills shadow_data_cell[0]."""
Dtor = Callable[[object, object], None]


class KlpShadow:
    """Variables are keyed by the address of their object (`addr_of`), and
    remember the object itself to hand it to destructors."""

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self._vars: dict[tuple[int, int], tuple[object, list[object]]] = {}

    def klp_shadow_get(self, obj: object, id: int) -> list[object] | None:
        """The variable's data cell (a one-item list standing for the data pointer), or None."""
        entry = self._vars.get((addr_of(obj), id))
        return None if entry is None else entry[1]

    def _alloc(self, obj: object, id: int, data: object, ctor: Ctor | None, ctor_data: object,
               warn_on_exist: bool) -> list[object] | None:
        existing = self.klp_shadow_get(obj, id)
        if existing is not None:
            if warn_on_exist:
                self._kernel.printk(KERN_WARNING,
                                    f"Duplicate shadow variable <{hashed_pointer(addr_of(obj))}, {id:x}>")
                return None
            return existing
        cell: list[object] = [data]
        if ctor is not None:
            ret = ctor(obj, cell, ctor_data)
            if ret:
                self._kernel.printk(KERN_ERR, f"livepatch: Failed to construct shadow variable "
                                              f"<{hashed_pointer(addr_of(obj))}, {id:x}> ({ret})")
                return None
        self._vars[(addr_of(obj), id)] = (obj, cell)
        return cell

    def klp_shadow_alloc(self, obj: object, id: int, data: object = None, ctor: Ctor | None = None,
                         ctor_data: object = None) -> list[object] | None:
        """A new variable; an existing one is a WARNING and None."""
        return self._alloc(obj, id, data, ctor, ctor_data, warn_on_exist=True)

    def klp_shadow_get_or_alloc(self, obj: object, id: int, data: object = None, ctor: Ctor | None = None,
                                ctor_data: object = None) -> list[object] | None:
        """The existing variable, or a new one initialised from data/ctor."""
        return self._alloc(obj, id, data, ctor, ctor_data, warn_on_exist=False)

    def klp_shadow_free(self, obj: object, id: int, dtor: Dtor | None = None) -> None:
        entry = self._vars.pop((addr_of(obj), id), None)
        if entry is not None and dtor is not None:
            dtor(entry[0], entry[1][0])

    def klp_shadow_free_all(self, id: int, dtor: Dtor | None = None) -> None:
        for key in [key for key in self._vars if key[1] == id]:
            entry = self._vars.pop(key)
            if dtor is not None:
                dtor(entry[0], entry[1][0])

    def __len__(self) -> int:
        return len(self._vars)
