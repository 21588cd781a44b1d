"""Guest physical memory: anonymous host mappings, one per slot.

The guest sees RAM from physical address 0 up to ``size``; bounds are checked on
every VMM access so that nothing the guest passes (a pointer in a multiboot
structure, a DMA address) can reach host memory outside its own mapping.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

PAGE_SIZE = 4096
#: Highest RAM size this VMM lays out below the 32-bit PCI/MMIO hole (as QEMU's PC does).
MAX_LOW_RAM = 0xC000_0000


class GuestMemoryError(ValueError):
    """An access outside guest RAM."""


@dataclass
class Region:
    slot: int
    gpa: int
    size: int
    mem: mmap.mmap
    flags: int = 0

    @property
    def host_addr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    def __init__(self, size: int) -> None:
        if size < 2 * 1024 * 1024:
            raise GuestMemoryError("guest memory must be at least 2 MiB")
        if size > MAX_LOW_RAM:
            raise GuestMemoryError(
                f"guest memory above {MAX_LOW_RAM >> 20} MiB is not supported (no high-RAM layout yet)"
            )
        if size % PAGE_SIZE:
            raise GuestMemoryError("guest memory size must be a multiple of 4 KiB")
        self.size = size
        mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.regions = [Region(0, 0, size, mem)]
        self.ram = memoryview(mem)
        self._views: dict[int, memoryview] = {0: self.ram}

    def add_region(self, gpa: int, size: int, flags: int = 0) -> Region:
        """More guest-physical memory outside RAM (e.g. a device's register pages), in a slot of its own.

        ``flags`` are KVM_MEM_* flags (KVM_MEM_LOG_DIRTY_PAGES to track guest writes).
        """
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise GuestMemoryError("memory regions are whole 4-KiB pages")
        for region in self.regions:
            if gpa < region.end and region.gpa < gpa + size:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps slot {region.slot}")
        mem = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        region = Region(max(r.slot for r in self.regions) + 1, gpa, size, mem, flags)
        self.regions.append(region)
        self._views[region.slot] = memoryview(mem)
        return region

    def _locate(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """The host view holding [gpa, gpa+length) and the offset in it; never outside the guest's memory."""
        if gpa >= 0 and length >= 0:
            if gpa + length <= self.size:
                return self.ram, gpa
            for region in self.regions[1:]:
                if region.gpa <= gpa and gpa + length <= region.end:
                    return self._views[region.slot], gpa - region.gpa
        raise GuestMemoryError(f"guest physical range {gpa:#x}+{length:#x} is outside guest memory")

    def _check(self, gpa: int, length: int) -> None:
        self._locate(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        view, off = self._locate(gpa, length)
        return bytes(view[off : off + length])

    def write(self, gpa: int, data: bytes) -> None:
        view, off = self._locate(gpa, len(data))
        view[off : off + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        view, off = self._locate(gpa, 1)
        chunk = bytes(view[off : min(off + limit, len(view))])
        return chunk.split(b"\0", 1)[0]

    def close(self) -> None:
        for view in self._views.values():
            view.release()
        for region in self.regions:
            region.mem.close()
