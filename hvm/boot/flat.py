"""Flat binaries: raw code loaded at a fixed address, entered in real or long mode."""

from __future__ import annotations

from hvm.boot import layout as L
from hvm.boot.gdt import GDT_LIMIT, write_gdt, write_identity_map_4g
from hvm.cpu import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuState,
    DescriptorTable,
    flat_segment,
)
from hvm.errors import ImageError
from hvm.vmm.memory import GuestMemory


def _place(mem: GuestMemory, gpa: int, image: bytes) -> None:
    if not image:
        raise ImageError("image is empty")
    if gpa + len(image) > mem.size:
        raise ImageError(f"image of {len(image)} bytes does not fit in guest memory at {gpa:#x}")
    mem.write(gpa, image)


def load_real(mem: GuestMemory, image: bytes) -> CpuState:
    """Load at 0000:7C00 and enter in real mode, as a PC BIOS starts a boot sector (DL = drive 0x80)."""
    if len(image) > L.LOW_MEM_END - L.REALMODE_LOAD_ADDR:
        raise ImageError("real-mode image is larger than conventional memory above 0x7C00")
    _place(mem, L.REALMODE_LOAD_ADDR, image)
    state = CpuState()  # real-mode segments with selector 0
    state.rip = L.REALMODE_LOAD_ADDR
    state.regs["rsp"] = L.REALMODE_LOAD_ADDR
    state.regs["rdx"] = 0x80
    return state


def load_long(mem: GuestMemory, image: bytes) -> CpuState:
    """Load at 1 MiB and enter in 64-bit mode with the first 4 GiB identity-mapped (2-MiB pages)."""
    _place(mem, L.LONGMODE_LOAD_ADDR, image)
    write_gdt(mem)
    state = CpuState()
    state.cr3 = write_identity_map_4g(mem)
    state.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    state.cr4 = CR4_PAE
    state.efer = EFER_LME | EFER_LMA
    state.cs = flat_segment(L.SEL_CODE64, code=True, long_mode=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, flat_segment(L.SEL_DATA, code=False))
    state.gdt = DescriptorTable(L.GDT_ADDR, GDT_LIMIT)
    state.idt = DescriptorTable(0, 0)
    state.rip = L.LONGMODE_LOAD_ADDR
    state.regs["rsp"] = L.LONGMODE_STACK
    return state
