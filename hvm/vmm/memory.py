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

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"guest physical range {gpa:#x}+{length:#x} is outside RAM")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return bytes(self.ram[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.ram[gpa : gpa + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        self._check(gpa, 1)
        end = min(gpa + limit, self.size)
        chunk = bytes(self.ram[gpa:end])
        return chunk.split(b"\0", 1)[0]

    def close(self) -> None:
        self.ram.release()
        for region in self.regions:
            region.mem.close()
