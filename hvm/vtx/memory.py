"""The memory interface of the address-translation walkers (:mod:`hvm.vtx.ept`, :mod:`hvm.vtx.paging`).

A walker reads and updates 8-byte paging-structure entries, nothing else::

    class MyMemory:                        # anything with these two methods
        def read_u64(self, addr: int) -> int: ...
        def write_u64(self, addr: int, value: int) -> None: ...

The model engine adapts guest RAM to :class:`PhysicalMemory` (and, for the
guest's own page tables under EPT, wraps an EPT walk around each access).
:class:`ByteMemory` is the simplest implementation: a little-endian bytearray.
"""

from __future__ import annotations

from typing import Protocol


class PhysicalMemory(Protocol):
    def read_u64(self, addr: int) -> int: ...

    def write_u64(self, addr: int, value: int) -> None: ...


class ByteMemory:
    """``size`` bytes of zeroed, little-endian memory at physical addresses ``base``...``base+size-1``."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.data = bytearray(size)
        self.base = base

    def _offset(self, addr: int) -> int:
        offset = addr - self.base
        if not 0 <= offset <= len(self.data) - 8:
            raise IndexError(f"8-byte access at {addr:#x} outside memory")
        return offset

    def read_u64(self, addr: int) -> int:
        offset = self._offset(addr)
        return int.from_bytes(self.data[offset : offset + 8], "little")

    def write_u64(self, addr: int, value: int) -> None:
        offset = self._offset(addr)
        self.data[offset : offset + 8] = value.to_bytes(8, "little")
