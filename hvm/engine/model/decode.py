"""Sensitive instructions: where they can start in a code page, and what one is when it executes.

The model intercepts an instruction by hooking its exact address (Unicorn ``UC_HOOK_CODE``
with begin = end = address, which QEMU compiles into the translated block before the
instruction). Which addresses? x86 has no fixed instruction boundaries, so a linear sweep of a
page can lose sync on data in code or on a jump into the middle of an instruction. This module
avoids the question instead of guessing: :func:`candidate_starts` returns *every* offset at
which a sensitive instruction could start, in any of the three code sizes (16, 32, 64 bits).
It finds each sensitive opcode byte sequence (a regular expression over the page), walks back
over the prefix bytes before it (legacy prefixes, and REX in 64-bit code), and keeps each start
where capstone decodes a sensitive instruction. A hook at a start that never executes costs
nothing; a hook that does execute decodes the instruction actually there, in the code size the
CPU is actually in (:func:`decode`), so over-approximating the set makes no spurious exit, and
no execution of a sensitive instruction can avoid a hook. An instruction can run past the end of
the page into bytes the scan does not have: every start in the last 15 bytes that does not decode
within the page is kept too, and decoded with both pages when it executes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import capstone
from capstone import x86_const as X

PAGE = 4096
MAX_INSN = 15  # SDM Vol. 2 2.3.11: an instruction is at most 15 bytes


class Op(Enum):
    """Sensitive instructions: those some VM-execution control (or VMX non-root operation) intercepts."""

    IN = "in"
    OUT = "out"
    INS = "ins"
    OUTS = "outs"
    HLT = "hlt"
    CPUID = "cpuid"
    RDTSC = "rdtsc"
    RDTSCP = "rdtscp"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    RDPMC = "rdpmc"
    INVLPG = "invlpg"
    MONITOR = "monitor"
    MWAIT = "mwait"
    PAUSE = "pause"
    MOV_TO_CR = "mov to cr"
    MOV_FROM_CR = "mov from cr"
    CLTS = "clts"
    LMSW = "lmsw"
    SMSW = "smsw"
    MOV_TO_DR = "mov to dr"
    MOV_FROM_DR = "mov from dr"
    LGDT = "lgdt"
    LIDT = "lidt"
    SGDT = "sgdt"
    SIDT = "sidt"
    LLDT = "lldt"
    LTR = "ltr"
    SLDT = "sldt"
    STR = "str"
    INVD = "invd"
    WBINVD = "wbinvd"
    XSETBV = "xsetbv"
    GETSEC = "getsec"
    RDRAND = "rdrand"
    RDSEED = "rdseed"
    INVPCID = "invpcid"
    INT = "int"  # INT n, INT3, INTO, INT1: the exception bitmap governs the last three
    VMCALL = "vmcall"
    VMX = "vmx"  # VMLAUNCH, VMRESUME, VMXON, ... (each has its own exit reason)


# capstone mnemonic (without REP) -> Op, for everything except MOV CR/DR
_MNEMONIC: dict[str, Op] = {
    "in": Op.IN, "out": Op.OUT,
    "insb": Op.INS, "insw": Op.INS, "insd": Op.INS,
    "outsb": Op.OUTS, "outsw": Op.OUTS, "outsd": Op.OUTS,
    "hlt": Op.HLT, "cpuid": Op.CPUID, "rdtsc": Op.RDTSC, "rdtscp": Op.RDTSCP,
    "rdmsr": Op.RDMSR, "wrmsr": Op.WRMSR, "rdpmc": Op.RDPMC, "invlpg": Op.INVLPG,
    "monitor": Op.MONITOR, "mwait": Op.MWAIT, "pause": Op.PAUSE,
    "clts": Op.CLTS, "lmsw": Op.LMSW, "smsw": Op.SMSW,
    "lgdt": Op.LGDT, "lidt": Op.LIDT, "sgdt": Op.SGDT, "sidt": Op.SIDT,
    "lldt": Op.LLDT, "ltr": Op.LTR, "sldt": Op.SLDT, "str": Op.STR,
    "invd": Op.INVD, "wbinvd": Op.WBINVD, "xsetbv": Op.XSETBV, "getsec": Op.GETSEC,
    "rdrand": Op.RDRAND, "rdseed": Op.RDSEED, "invpcid": Op.INVPCID,
    "int": Op.INT, "int3": Op.INT, "into": Op.INT, "int1": Op.INT,
    "vmcall": Op.VMCALL,
    "vmlaunch": Op.VMX, "vmresume": Op.VMX, "vmxoff": Op.VMX, "vmxon": Op.VMX, "vmclear": Op.VMX,
    "vmptrld": Op.VMX, "vmptrst": Op.VMX, "vmread": Op.VMX, "vmwrite": Op.VMX,
    "invept": Op.VMX, "invvpid": Op.VMX, "vmfunc": Op.VMX,
}
_CONTROL_REG = re.compile(r"\b[cd]r\d+\b")

# Opcode bytes of every instruction above (SDM Vol. 2, Appendix A opcode maps). A lookahead
# so that overlapping occurrences are all found.
_OPCODES = re.compile(
    rb"(?=[\xE4-\xE7\xEC-\xEF\x6C-\x6F\xF4\x90\xCC-\xCE\xF1]"  # IN/OUT, INS/OUTS, HLT, PAUSE, INT*
    rb"|\x0F[\x00\x01\x06\x08\x09\x20-\x23\x30-\x33\x37\x78\x79\xA2\xC7]"  # grp6/7, CLTS, INVD, ...
    rb"|\x0F\x38[\x80-\x82])",  # INVEPT, INVVPID, INVPCID
    re.DOTALL,
)
# Legacy prefixes (SDM Vol. 2 2.1.1) and REX (40-4F, a prefix only in 64-bit code).
_PREFIXES = frozenset(b"\xF0\xF2\xF3\x2E\x36\x3E\x26\x64\x65\x66\x67" + bytes(range(0x40, 0x50)))

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_LITE = {bits: capstone.Cs(capstone.CS_ARCH_X86, mode) for bits, mode in _MODES.items()}
_FULL = {bits: capstone.Cs(capstone.CS_ARCH_X86, mode) for bits, mode in _MODES.items()}
for _md in _FULL.values():
    _md.detail = True


def _sensitive(mnemonic: str, op_str: str) -> bool:
    word = mnemonic.rsplit(" ", 1)[-1]
    if word == "mov":
        return bool(_CONTROL_REG.search(op_str))
    return word in _MNEMONIC


def candidate_starts(page: bytes) -> set[int]:
    """Offsets in ``page`` where a sensitive instruction may start, in 16-, 32- or 64-bit code."""
    size = len(page)
    tried: set[int] = set()
    found: set[int] = set()
    lite = tuple(_LITE.values())

    def consider(start: int) -> None:
        if start in tried:
            return
        tried.add(start)
        window = page[start : start + MAX_INSN]
        for md in lite:
            insn = next(md.disasm_lite(window, start, 1), None)
            if insn is None:
                if start > size - MAX_INSN:
                    found.add(start)  # may continue on the next page: decide when it executes
                    return
            elif _sensitive(insn[2], insn[3]):
                found.add(start)
                return

    for match in _OPCODES.finditer(page):
        p = match.start()
        if page[p] == 0x90 and (p == 0 or page[p - 1] not in _PREFIXES):
            continue  # a plain NOP; 90 is sensitive only as F3 90 (PAUSE)
        start = p
        while True:
            consider(start)
            if start == 0 or p - start >= MAX_INSN - 1 or page[start - 1] not in _PREFIXES:
                break
            start -= 1
    for start in range(max(0, size - MAX_INSN + 1), size):
        consider(start)  # the tail: opcode bytes may lie on the next page
    return found


# --- one executing instruction -------------------------------------------------------------

# capstone register -> SDM general-purpose register number (0 = RAX ... 15 = R15)
_GPR_NAMES = (
    ("rax", "eax", "ax", "al", "ah"), ("rcx", "ecx", "cx", "cl", "ch"), ("rdx", "edx", "dx", "dl", "dh"),
    ("rbx", "ebx", "bx", "bl", "bh"), ("rsp", "esp", "sp", "spl"), ("rbp", "ebp", "bp", "bpl"),
    ("rsi", "esi", "si", "sil"), ("rdi", "edi", "di", "dil"),
)
GPR_NUMBER: dict[str, int] = {name: n for n, names in enumerate(_GPR_NAMES) for name in names}
for _n in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        GPR_NUMBER[f"r{_n}{_suffix}"] = _n
# capstone segment register -> SDM segment number (ES CS SS DS FS GS)
_SEGMENT = {X.X86_REG_ES: 0, X.X86_REG_CS: 1, X.X86_REG_SS: 2,
            X.X86_REG_DS: 3, X.X86_REG_FS: 4, X.X86_REG_GS: 5}
SEG_SS, SEG_DS = 2, 3


@dataclass(frozen=True)
class Memory:
    """A memory operand: segment:[base + index*scale + disp], with the address size in bits."""

    segment: int  # SDM numbering: 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS
    base: int | None  # GPR number
    index: int | None
    scale: int  # 1, 2, 4 or 8
    disp: int
    address_size: int  # 16, 32 or 64
    rip_relative: bool = False


@dataclass(frozen=True)
class Insn:
    """A decoded sensitive instruction and the operands its exit information reports."""

    op: Op
    length: int
    text: str
    mnemonic: str
    operand_size: int  # bits
    address_size: int  # bits
    rep: bool = False
    port: int | None = None  # IN/OUT with an immediate port
    io_size: int = 0  # bytes per I/O access
    reg: int | None = None  # the GPR operand (MOV CR/DR, LMSW/SMSW/LLDT/... register forms)
    reg_width: int = 0  # bytes of that register operand
    control: int = 0  # CR or DR number
    mem: Memory | None = None
    vector: int = 0  # INT n / INT3 / INTO / INT1


def decode(code: bytes, address: int, bits: int) -> Insn | None:
    """The sensitive instruction at the start of ``code`` in ``bits``-bit code, or None."""
    insn = next(_FULL[bits].disasm(code[:MAX_INSN], address, 1), None)
    if insn is None or not _sensitive(insn.mnemonic, insn.op_str):
        return None
    word = insn.mnemonic.rsplit(" ", 1)[-1]
    prefixes = set(insn.prefix)
    operand_size = _operand_size(bits, prefixes, insn.rex)
    address_size = {16: 32, 32: 16, 64: 32}[bits] if 0x67 in prefixes else bits
    rep = bool(prefixes & {0xF2, 0xF3}) and word in ("insb", "insw", "insd", "outsb", "outsw", "outsd")
    fields: dict = {}
    regs = [o for o in insn.operands if o.type == X.X86_OP_REG]
    mems = [o for o in insn.operands if o.type == X.X86_OP_MEM]
    if word == "mov":
        ctl_name = next(insn.reg_name(o.reg) for o in regs if insn.reg_name(o.reg)[:2] in ("cr", "dr"))
        gpr_name = next(insn.reg_name(o.reg) for o in regs if insn.reg_name(o.reg)[:2] not in ("cr", "dr"))
        to_control = insn.reg_name(insn.operands[0].reg) == ctl_name
        kind = {("c", True): Op.MOV_TO_CR, ("c", False): Op.MOV_FROM_CR,
                ("d", True): Op.MOV_TO_DR, ("d", False): Op.MOV_FROM_DR}[ctl_name[0], to_control]
        fields.update(control=int(ctl_name[2:]), reg=GPR_NUMBER[gpr_name], reg_width=regs[0].size)
    else:
        kind = _MNEMONIC[word]
        if kind in (Op.IN, Op.OUT):
            # IN: data register, then DX or imm8; OUT: DX or imm8, then the data register.
            data, port = insn.operands if kind is Op.IN else reversed(insn.operands)
            fields["io_size"] = data.size
            if port.type == X.X86_OP_IMM:
                fields["port"] = port.imm & 0xFF
        elif kind is Op.INT:
            fields["vector"] = {"int3": 3, "into": 4, "int1": 1}.get(word) or insn.operands[0].imm & 0xFF
        elif kind in (Op.INS, Op.OUTS):
            fields["io_size"] = {"b": 1, "w": 2, "d": 4}[word[-1]]
        elif regs and kind in (Op.LMSW, Op.SMSW, Op.LLDT, Op.LTR, Op.SLDT, Op.STR, Op.RDRAND, Op.RDSEED,
                               Op.INVPCID):
            name = insn.reg_name(regs[0].reg)
            fields.update(reg=GPR_NUMBER[name], reg_width=regs[0].size)
    if mems:
        fields["mem"] = _memory(insn, mems[0], address_size)
    return Insn(kind, insn.size, f"{insn.mnemonic} {insn.op_str}".strip(), word, operand_size,
                address_size, rep=rep, **fields)


def _operand_size(bits: int, prefixes: set[int], rex: int) -> int:
    if bits == 64 and rex & 8:
        return 64
    default = 16 if bits == 16 else 32
    if 0x66 in prefixes:
        return 32 if default == 16 else 16
    return default


def _memory(insn, op, address_size: int) -> Memory:
    mem = op.mem
    base = insn.reg_name(mem.base) if mem.base else None
    index = insn.reg_name(mem.index) if mem.index else None
    rip_relative = base in ("rip", "eip")
    base_number = None if base is None or rip_relative else GPR_NUMBER[base]
    if mem.segment:
        segment = _SEGMENT[mem.segment]
    else:
        # SDM Vol. 1 3.7.4: addresses based on (E/R)SP or (E/R)BP default to SS, others to DS.
        segment = SEG_SS if base_number in (4, 5) else SEG_DS
    return Memory(segment, base_number, None if index is None else GPR_NUMBER[index],
                  mem.scale or 1, mem.disp, address_size, rip_relative)


_CONTROL_TRANSFER = frozenset({X.X86_GRP_JUMP, X.X86_GRP_CALL, X.X86_GRP_RET, X.X86_GRP_IRET, X.X86_GRP_INT})


def instruction_summary(code: bytes, address: int, bits: int) -> tuple[int, bool, str] | None:
    """(length, transfers control, text) of whatever instruction starts ``code``, or None."""
    insn = next(_FULL[bits].disasm(code[:MAX_INSN], address, 1), None)
    if insn is None:
        return None
    return insn.size, bool(set(insn.groups) & _CONTROL_TRANSFER), f"{insn.mnemonic} {insn.op_str}".strip()


def memory_operands(code: bytes, address: int, bits: int) -> list[tuple[Memory, int]]:
    """The explicit memory operands (with their sizes in bytes) of the instruction at ``code``."""
    insn = next(_FULL[bits].disasm(code[:MAX_INSN], address, 1), None)
    if insn is None:
        return []
    prefixes = set(insn.prefix)
    address_size = {16: 32, 32: 16, 64: 32}[bits] if 0x67 in prefixes else bits
    return [(_memory(insn, op, address_size), op.size) for op in insn.operands if op.type == X.X86_OP_MEM]
