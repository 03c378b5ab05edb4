"""Kernel memory as module code sees it: kmalloc'd objects with addresses.

Module code works with Python objects; where C would use a pointer value
(a shadow variable's key, `%p`, comparing two pointers) it uses the
object's address: a kmalloc'd `Mem` has one from the emulated heap, a
function its symbol's, any other object one derived from its identity.
"""

from __future__ import annotations

from typing import Any

HEAP_BASE = 0xFFFF888000000000
HEAP_ALIGN = 0x40


def hashed_pointer(value: int) -> str:
    """%p as kernels from 4.15 print it: a hashed value, never the address."""
    return f"{(value * 0x9E3779B97F4A7C15 >> 32) & 0xFFFFFFFF:016x}"


def addr_of(value: object) -> int:
    """The address a pointer to `value` would hold."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    addr = getattr(value, "addr", None)
    if isinstance(addr, int):
        return addr
    return HEAP_BASE | (id(value) & 0xFFFFFFFFFF)


class Mem:
    """A kmalloc'd block: its address and size, and whatever fields the code
    stores in it (`d.jiffies_expire = ...`, or `value` for a plain `int *`).
    Zeroed, `value` reads 0 (`*p += 1` on a fresh block counts from 0)."""

    def __init__(self, addr: int, size: int):
        self.addr = addr
        self.size = size
        self.value: Any = 0

    def __repr__(self) -> str:
        return f"<Mem {self.addr:#x} size {self.size}>"


class Heap:
    """The allocator behind kmalloc: fresh, never reused addresses."""

    def __init__(self) -> None:
        self._next = HEAP_BASE

    def alloc_addr(self, size: int = HEAP_ALIGN) -> int:
        self._next += max(HEAP_ALIGN, -(-size // HEAP_ALIGN) * HEAP_ALIGN)
        return self._next

    def kzalloc(self, size: int) -> Mem:
        return Mem(self.alloc_addr(size), size)
