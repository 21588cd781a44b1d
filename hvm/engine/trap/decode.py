"""Decoding the instruction that trapped: capstone, in the code size the CPU was in.

A classic hypervisor learns from the fault only *that* the guest did something privileged
(#GP carries no instruction information; there is no VMCS to report an exit qualification), so
it decodes the instruction at the faulting RIP itself. :func:`decode` returns what emulation
needs: mnemonic, length, register operands and the linear address of a memory operand.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86_const as X
from unicorn import x86_const as R

MAX_INSN = 15  # SDM Vol. 2 2.3.11

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_CS = {bits: capstone.Cs(capstone.CS_ARCH_X86, mode) for bits, mode in _MODES.items()}
for _md in _CS.values():
    _md.detail = True

# capstone segment register -> SDM segment number (ES CS SS DS FS GS)
_SEGMENT = {
    X.X86_REG_ES: 0,
    X.X86_REG_CS: 1,
    X.X86_REG_SS: 2,
    X.X86_REG_DS: 3,
    X.X86_REG_FS: 4,
    X.X86_REG_GS: 5,
}
SEG_SS, SEG_DS = 2, 3


def unicorn_reg(name: str) -> int:
    """Unicorn's id for a capstone register name ("eax", "r8d", "cr3", "ss", ...)."""
    return getattr(R, f"UC_X86_REG_{name.upper()}")


@dataclass(frozen=True)
class MemOperand:
    segment: int  # SDM numbering
    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int  # bytes accessed
    rip_relative: bool


@dataclass(frozen=True)
class Insn:
    mnemonic: str
    length: int
    text: str
    operands: tuple[str | int | MemOperand, ...]  # register name, immediate, or memory
    sizes: tuple[int, ...]  # operand sizes in bytes
    address_bits: int
    operand_bits: int

    @property
    def mem(self) -> MemOperand | None:
        return next((op for op in self.operands if isinstance(op, MemOperand)), None)


def decode(code: bytes, address: int, bits: int) -> Insn | None:
    """The instruction at the start of ``code`` (linear ``address``), or None if undecodable."""
    insn = next(_CS[bits].disasm(code[:MAX_INSN], address, 1), None)
    if insn is None:
        return None
    operands: list[str | int | MemOperand] = []
    for op in insn.operands:
        if op.type == X.X86_OP_REG:
            operands.append(insn.reg_name(op.reg))
        elif op.type == X.X86_OP_IMM:
            operands.append(op.imm)
        else:
            mem = op.mem
            base = insn.reg_name(mem.base) if mem.base else None
            index = insn.reg_name(mem.index) if mem.index else None
            rip_relative = base in ("rip", "eip")
            if mem.segment:
                segment = _SEGMENT[mem.segment]
            else:
                # SDM Vol. 1 3.7.4: addresses based on (E/R)SP or (E/R)BP default to SS.
                segment = SEG_SS if base in ("esp", "ebp", "rsp", "rbp", "sp", "bp") else SEG_DS
            operands.append(
                MemOperand(
                    segment,
                    None if rip_relative else base,
                    index,
                    mem.scale or 1,
                    mem.disp,
                    op.size,
                    rip_relative,
                )
            )
    prefixes = set(insn.prefix)
    address_bits = {16: 32, 32: 16, 64: 32}[bits] if 0x67 in prefixes else bits
    if bits == 64 and insn.rex & 8:
        operand_bits = 64
    else:
        default = 16 if bits == 16 else 32
        operand_bits = (32 if default == 16 else 16) if 0x66 in prefixes else default
    return Insn(
        insn.mnemonic,
        insn.size,
        f"{insn.mnemonic} {insn.op_str}".strip(),
        tuple(operands),
        tuple(op.size for op in insn.operands),
        address_bits,
        operand_bits,
    )
