"""A flat GDT and long-mode identity page tables, written into guest memory."""

from __future__ import annotations

import struct

from hvm.boot import layout as L
from hvm.vmm.memory import GuestMemory


def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor (SDM Vol. 3A 3.4.5): limit 19:0, base 31:0, access byte, flags nibble."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


# access: P=1, DPL=0, S=1, type; flags: G=1 and D/B=1 (32-bit) or L=1 (64-bit code)
CODE32 = descriptor(0, 0xFFFFF, 0x9A, 0xC)
DATA = descriptor(0, 0xFFFFF, 0x92, 0xC)
CODE64 = descriptor(0, 0xFFFFF, 0x9A, 0xA)
GDT_ENTRIES = (0, CODE32, DATA, CODE64)
GDT_LIMIT = 8 * len(GDT_ENTRIES) - 1


def write_gdt(mem: GuestMemory) -> None:
    mem.write(L.GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))


# Paging-structure entry bits (SDM Vol. 3A 4.5): present, writable, page size.
PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7


def write_identity_map_4g(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2-MiB pages; returns the CR3 value (the PML4)."""
    mem.write(L.PML4_ADDR, struct.pack("<Q", L.PDPT_ADDR | PTE_P | PTE_RW) + bytes(4088))
    pdpt = [L.PD_ADDR + i * 0x1000 | PTE_P | PTE_RW for i in range(4)] + [0] * 508
    mem.write(L.PDPT_ADDR, struct.pack("<512Q", *pdpt))
    pds = [(i << 21) | PTE_P | PTE_RW | PTE_PS for i in range(4 * 512)]
    mem.write(L.PD_ADDR, struct.pack(f"<{len(pds)}Q", *pds))
    return L.PML4_ADDR
