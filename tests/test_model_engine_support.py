"""Helpers for the model-engine tests: tiny guests assembled with GNU as, run on a ModelEngine.

A :class:`Tiny` guest is a few instructions at :data:`CODE` (flat segments, 16-, 32- or
64-bit code; 64-bit code gets the loader's identity page tables), run by the engine directly so
a test can program the VMCS and look at every VM exit, including those the VMM never sees.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

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
    Segment,
    flat_segment,
    real_mode_segment,
)
from hvm.engine.model import ModelEngine
from hvm.exits import Exit, ExitKind
from hvm.vmm.memory import GuestMemory
from hvm.vtx.capabilities import MODEL_CAPS
from hvm.vtx.vmcs import VmcsField

CODE = 0x10000  # where tiny guests are loaded
STACK = 0x9000
F = VmcsField

needs_as = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                              reason="GNU as/ld (binutils) not installed")


@functools.lru_cache(maxsize=256)
def assemble(source: str, bits: int = 32, origin: int = CODE) -> bytes:
    """Intel-syntax ``source`` as a flat binary linked at ``origin``."""
    directive = {16: ".code16", 32: ".code32", 64: ".code64"}[bits]
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = Path(tmp, "g.s"), Path(tmp, "g.o"), Path(tmp, "g.bin")
        src.write_text(f".intel_syntax noprefix\n{directive}\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", "--64" if bits == 64 else "--32", "-o", str(obj), str(src)], check=True,
                       capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-Ttext", hex(origin),
                        "--oformat", "binary", "-o", str(out), str(obj)], check=True, capture_output=True)
        return out.read_bytes()


def entry_state(bits: int) -> CpuState:
    state = CpuState()
    if bits == 16:
        state.cs = real_mode_segment(CODE >> 4, code=True)
        state.rip = 0
        state.regs["rsp"] = STACK
        return state
    state.gdt = DescriptorTable(L.GDT_ADDR, GDT_LIMIT)
    state.idt = DescriptorTable(0, 0)
    state.cr0 = CR0_PE | CR0_ET
    state.cs = flat_segment(L.SEL_CODE32, code=True)
    if bits == 64:
        state.cr3 = L.PML4_ADDR
        state.cr0 |= CR0_PG | CR0_NE
        state.cr4 = CR4_PAE
        state.efer = EFER_LME | EFER_LMA
        state.cs = flat_segment(L.SEL_CODE64, code=True, long_mode=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, flat_segment(L.SEL_DATA, code=False))
    state.rip = CODE
    state.regs["rsp"] = STACK
    return state


class Tiny:
    """A guest of a few instructions on a fresh model engine."""

    def __init__(self, source: str, bits: int = 32, mem: int = 4 << 20) -> None:
        self.memory = GuestMemory(mem)
        write_gdt(self.memory)
        if bits == 64:
            write_identity_map_4g(self.memory)
        self.code = assemble(source, bits, 0 if bits == 16 else CODE)
        self.memory.write(CODE, self.code)
        self.engine = ModelEngine(self.memory)
        self.engine.set_state(entry_state(bits))
        self.exits: list[Exit] = []
        self.reasons: list[int] = []  # basic exit reasons from the VMCS, one per run() that exited

    # --- VMCS -------------------------------------------------------------------------
    def vmread(self, field: int) -> int:
        return self.engine.vmcs.vmread(field)

    def vmwrite(self, field: int, value: int) -> None:
        self.engine.vmcs.vmwrite(field, value)

    def controls(self, *, on: int = 0, off: int = 0, on2: int = 0, off2: int = 0) -> None:
        """Set/clear primary (``on``/``off``) and secondary (``on2``/``off2``) controls, kept valid."""
        proc = self.vmread(F.CPU_BASED_VM_EXEC_CONTROL) & ~off | on
        self.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, MODEL_CAPS.true_procbased_ctls.adjust(proc))
        proc2 = self.vmread(F.SECONDARY_VM_EXEC_CONTROL) & ~off2 | on2
        self.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, MODEL_CAPS.procbased_ctls2.adjust(proc2))

    # --- running ----------------------------------------------------------------------
    def run(self, until: ExitKind = ExitKind.HLT, limit: int = 100, read: bytes | None = None) -> list[Exit]:
        """Run until an exit of kind ``until`` (included in the result) or a crash-like exit."""
        out: list[Exit] = []
        for _ in range(limit):
            size = self.engine.pending_read_size
            if size:
                data = read if read is not None else b"\xff" * size
                self.engine.complete_read(data[:size].ljust(size, b"\0"))
            before = sum(self.engine.exit_counts.values())
            ex = self.engine.run()
            if sum(self.engine.exit_counts.values()) > before:
                self.reasons.append(self.vmread(F.VM_EXIT_REASON))
            out.append(ex)
            self.exits.append(ex)
            if ex.kind is until or ex.kind in (ExitKind.SHUTDOWN, ExitKind.FAIL_ENTRY,
                                               ExitKind.INTERNAL_ERROR, ExitKind.EPT_MISCONFIG):
                return out
        raise AssertionError(f"no {until.value} exit within {limit} exits: {[e.kind.value for e in out]}")

    def reg(self, name: str) -> int:
        return self.engine.get_state().regs[name]

    def close(self) -> None:
        self.engine.close()
        self.memory.close()


def kinds(exits: list[Exit]) -> list[str]:
    return [e.kind.value for e in exits]


def segment(selector: int, base: int = 0, limit: int = 0xFFFF_FFFF, code: bool = False) -> Segment:
    return Segment(selector=selector, base=base, limit=limit, type=0xB if code else 0x3, db=1, g=1)


IDT = 0x20000  # where tests build IDTs


def gate64(handler: int, selector: int = 0x18, trap: bool = False, dpl: int = 0) -> bytes:
    """A 64-bit interrupt/trap gate (SDM Vol. 3A 6.14.1)."""
    kind = 0xF if trap else 0xE
    attributes = 0x80 | dpl << 5 | kind
    low = (handler & 0xFFFF) | selector << 16 | attributes << 40 | (handler >> 16 & 0xFFFF) << 48
    return low.to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little")


def gate32(handler: int, selector: int = 0x08, trap: bool = False, dpl: int = 0) -> bytes:
    """A 32-bit interrupt/trap gate (SDM Vol. 3A 6.11)."""
    kind = 0xF if trap else 0xE
    value = (handler & 0xFFFF) | selector << 16 | (0x80 | dpl << 5 | kind) << 40 | (handler >> 16) << 48
    return value.to_bytes(8, "little")


def install_idt(guest: Tiny, gates: dict[int, bytes], entries: int = 256) -> tuple[int, int]:
    """Write an IDT at :data:`IDT`; returns (base, limit) for the guest's IDTR."""
    size = len(next(iter(gates.values())))
    table = bytearray(entries * size)
    for vector, gate in gates.items():
        table[vector * size : (vector + 1) * size] = gate
    guest.memory.write(IDT, bytes(table))
    return IDT, entries * size - 1
