"""The model's host-physical memory: guest RAM, and a pool of pages only the hypervisor can see.

Guest RAM (the VMM's :class:`~hvm.vmm.memory.GuestMemory` mapping) sits at host-physical
address 0 and is what Unicorn executes from; every further memory region the VMM adds sits at
the host-physical address equal to its guest-physical one (the default EPT is the identity).
The *pool* holds what a hypervisor keeps in its
own memory and points the VMCS at: EPT paging structures, I/O bitmaps, the MSR bitmap. It lies
far above RAM (:data:`POOL_BASE`) and is never mapped into Unicorn, so no guest access can reach
it: a guest access reaches host memory only through an EPT translation, and the default EPT maps
guest-physical RAM only.
"""

from __future__ import annotations

import struct

from hvm.vmm.memory import PAGE_SIZE, GuestMemory

POOL_BASE = 0x70_0000_0000  # 448 GiB: above any guest RAM this VMM lays out
POOL_SIZE = 1 << 20
_U64 = struct.Struct("<Q")


class HostMemory:
    """Host-physical memory as :class:`hvm.vtx.memory.PhysicalMemory` (for the EPT walker)."""

    def __init__(self, ram: GuestMemory, pool_size: int = POOL_SIZE) -> None:
        self.ram = ram
        self.ram_size = ram.size
        self.pool = bytearray(pool_size)
        self._next = 0
        self._regions: list[tuple[int, int, memoryview]] = []  # (hpa, size, view)

    def add(self, hpa: int, view: memoryview) -> None:
        """Back [hpa, hpa+len(view)) with a further guest memory region."""
        self._regions.append((hpa, len(view), view))

    def allocate(self, pages: int = 1) -> int:
        """HPA of ``pages`` zeroed, 4-KiB-aligned pages in the pool."""
        address = self._next
        if address + pages * PAGE_SIZE > len(self.pool):
            raise MemoryError("the model's host page pool is exhausted")
        self._next += pages * PAGE_SIZE
        return POOL_BASE + address

    def _where(self, hpa: int, length: int) -> tuple[memoryview | bytearray, int]:
        if 0 <= hpa and hpa + length <= self.ram_size:
            return self.ram.ram, hpa
        offset = hpa - POOL_BASE
        if 0 <= offset and offset + length <= len(self.pool):
            return self.pool, offset
        for base, size, view in self._regions:
            if base <= hpa and hpa + length <= base + size:
                return view, hpa - base
        raise IndexError(f"host-physical range {hpa:#x}+{length:#x} is not backed by memory")

    def read(self, hpa: int, length: int) -> bytes:
        buf, offset = self._where(hpa, length)
        return bytes(buf[offset : offset + length])

    def write(self, hpa: int, data: bytes) -> None:
        buf, offset = self._where(hpa, len(data))
        buf[offset : offset + len(data)] = data

    def view(self, hpa: int, length: int) -> memoryview:
        """A live view of ``length`` bytes (a bitmap page the processor consults)."""
        buf, offset = self._where(hpa, length)
        return memoryview(buf)[offset : offset + length]

    def read_u64(self, addr: int) -> int:
        if 0 <= addr <= self.ram_size - 8:  # the common case first: an entry in guest RAM
            return _U64.unpack_from(self.ram.ram, addr)[0]
        buf, offset = self._where(addr, 8)
        return _U64.unpack_from(buf, offset)[0]

    def write_u64(self, addr: int, value: int) -> None:
        buf, offset = self._where(addr, 8)
        _U64.pack_into(buf, offset, value & 0xFFFF_FFFF_FFFF_FFFF)

    def is_ram(self, hpa: int) -> bool:
        """Is ``hpa`` guest memory (RAM or a further region), i.e. memory Unicorn has mapped?"""
        if 0 <= hpa < self.ram_size:
            return True
        return any(base <= hpa < base + size for base, size, _ in self._regions)

    def close(self) -> None:
        self._regions.clear()
