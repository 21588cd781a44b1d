"""Emulating what faulted: each privileged instruction against the virtual CPU.

:func:`privileged` is the hypervisor's #GP/#UD handler. It decodes the instruction at the
faulting RIP and, when the instruction is one a deprivileged guest kernel is entitled to
(it would have run at the guest's ring 0), performs its effect on the :class:`VirtualCpu`
(and on the real CPU where the effect must be real: RIP, registers, the mirrored IF, shadow
drops), then resumes the guest past it. Anything else is the guest's own fault and is reflected
to it through its IDT, with the error code the real CPU gave.

The rules are the SDM's for the guest's ring 0 (Vol. 2 instruction pages; Vol. 3A 2.5 for the
control registers, 10.8.5 for IA-32e activation). Exits returned to the VMM use the shared
vocabulary (io, hlt, cr_access, descriptor_table, invlpg, rdmsr/wrmsr for MSRs the engine does
not keep); the other emulations (CLI, STI, IRET, MOV SS, CLTS, LMSW, WBINVD, known MSRs) finish
inside the engine, as a kernel hypervisor finishes them, and show in the engine's counters.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from unicorn import x86_const as R

from hvm.cpu import CR0_ET, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE, RFLAGS_IF, Segment
from hvm.engine.model.decode import GPR_NUMBER
from hvm.engine.model.events import GP, UD, Event, Fault, parse_descriptor
from hvm.engine.trap.cpu import CR0_TS
from hvm.engine.trap.decode import Insn, MemOperand, unicorn_reg
from hvm.exits import Exit, ExitKind
from hvm.vtx.qualification import CrAccessType, CrQualification, IoQualification

if TYPE_CHECKING:
    from hvm.engine.trap.engine import Trap, TrapEngine

CR4_PSE, CR4_PGE, CR4_LA57 = 1 << 4, 1 << 7, 1 << 12
MSR_EFER = 0xC000_0080
MSR_FS_BASE, MSR_GS_BASE = 0xC000_0100, 0xC000_0101
EFER_WRITABLE = 0x1 | EFER_LME | EFER_NXE  # SCE, LME, NXE (LMA is read-only: SDM 10.8.5)
# MSRs the virtual CPU keeps (written and read back by the guest, no device behind them), with
# their reset values (SDM Vol. 4): SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, SFMASK,
# KERNEL_GS_BASE, TSC_AUX, PAT.
KEPT_MSRS = {
    0x174: 0,
    0x175: 0,
    0x176: 0,
    0xC000_0081: 0,
    0xC000_0082: 0,
    0xC000_0083: 0,
    0xC000_0084: 0,
    0xC000_0102: 0,
    0xC000_0103: 0,
    0x277: 0x0007_0406_0007_0406,
}

Emulator = Callable[["TrapEngine", Insn, "Trap"], "Exit | None"]


def privileged(eng: TrapEngine, trap: Trap) -> Exit | None:
    """The #GP/#UD handler: emulate what the guest's ring 0 may do, reflect the rest."""
    insn = eng.fetch(trap.rip)
    emulator = _EMULATORS.get(insn.mnemonic)
    if emulator is None and insn.mnemonic == "mov" and any(_is_control(op) for op in insn.operands):
        emulator = _guarded(_mov_cr_dr)
    if emulator is None and insn.mnemonic in ("mov", "pop") and insn.operands[0] == "ss":
        emulator = _load_ss
    if emulator is not None:
        return emulator(eng, insn, trap)
    if insn.mnemonic in _NOT_MODELLED:
        return Exit(
            ExitKind.INTERNAL_ERROR,
            detail=f"trap engine: '{insn.text}' at {trap.rip:#x} is not emulated "
            f"({_NOT_MODELLED[insn.mnemonic]})",
        )
    code = trap.error_code if trap.vector == GP else None
    fault = Event(trap.vector, error_code=code if trap.vector == GP else None)
    eng.account(
        f"#{'GP' if trap.vector == GP else 'UD'}(guest)",
        insn,
        trap.rip,
        fault=f"#{'GP' if trap.vector == GP else 'UD'}: not a ring-0 privilege the guest lacks",
        effect="reflected to the guest's IDT",
        resume="RIP <- the guest's handler",
    )
    return eng.deliver_exit(fault, trap.rip, insn.text)


def _is_control(op: object) -> bool:
    return isinstance(op, str) and op[:2] in ("cr", "dr") and op[2:].isdigit()


# --- registers ------------------------------------------------------------------------------


def gpr(eng: TrapEngine, name: str) -> int:
    return eng.uc.reg_read(unicorn_reg(name))


def set_gpr(eng: TrapEngine, name: str, value: int, size: int) -> None:
    """Write a register operand as a MOV would (a 32-bit write clears bits 63:32)."""
    reg = unicorn_reg(name)
    if size >= 4:
        eng.uc.reg_write(reg, value & ((1 << (8 * size)) - 1))
    else:
        mask = (1 << (8 * size)) - 1
        eng.uc.reg_write(reg, eng.uc.reg_read(reg) & ~mask | value & mask)


def advance(eng: TrapEngine, insn: Insn, trap: Trap) -> int:
    nxt = trap.rip + insn.length
    eng.uc.reg_write(R.UC_X86_REG_RIP, nxt)
    return nxt


def _operand_value(eng: TrapEngine, insn: Insn, trap: Trap, index: int, size: int) -> int:
    op = insn.operands[index]
    if isinstance(op, MemOperand):
        return int.from_bytes(eng.read_linear(eng.effective_address(op, insn, trap.rip), size), "little")
    if isinstance(op, int):
        return op
    return gpr(eng, op) & ((1 << (8 * size)) - 1)


def _resume(trap: Trap, nxt: int) -> str:
    return f"RIP {trap.rip:#x} -> {nxt:#x}; guest resumes"


# --- the interrupt flag -----------------------------------------------------------------------


def _cli(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    eng.set_if(False)
    nxt = advance(eng, insn, trap)
    eng.account(
        "cli",
        insn,
        trap.rip,
        "#GP(0): CPL 3 > IOPL 0",
        "IF_virt <- 0 (PUSHF now shows IF = 0)",
        _resume(trap, nxt),
    )


def _sti(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    eng.set_if(True)
    nxt = advance(eng, insn, trap)
    eng.account(
        "sti",
        insn,
        trap.rip,
        "#GP(0): CPL 3 > IOPL 0",
        "IF_virt <- 1 (no interrupt is pending)",
        _resume(trap, nxt),
    )


def _hlt(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit:
    nxt = advance(eng, insn, trap)
    eng.halt()
    eng.account(
        "hlt",
        insn,
        trap.rip,
        "#GP(0): HLT at CPL 3",
        f"the vCPU halts (IF_virt = {int(eng.v.if_flag)})",
        _resume(trap, nxt),
    )
    return Exit(ExitKind.HLT)


# --- port I/O ---------------------------------------------------------------------------------


def _io(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit:
    is_in = insn.mnemonic == "in"
    data_reg, port_op = insn.operands if is_in else reversed(insn.operands)
    size = insn.sizes[0] if is_in else insn.sizes[1]
    port = port_op & 0xFF if isinstance(port_op, int) else gpr(eng, "dx") & 0xFFFF
    qualification = IoQualification(
        size=size, is_in=is_in, string=False, rep=False, immediate=isinstance(port_op, int), port=port
    ).encode()
    nxt = trap.rip + insn.length
    fault = "#GP(0): CPL 3 > IOPL 0 and no I/O permission bitmap"
    if is_in:

        def complete(data: bytes) -> None:
            set_gpr(eng, data_reg, int.from_bytes(data, "little"), size)
            eng.uc.reg_write(R.UC_X86_REG_RIP, nxt)

        eng.pend(complete, size)
        eng.account(
            "in", insn, trap.rip, fault, f"port {port:#x}: the VMM's device answers", _resume(trap, nxt)
        )
        return Exit(ExitKind.IO, port=port, size=size, qualification=qualification)
    data = (gpr(eng, data_reg) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    eng.pend(lambda _: eng.uc.reg_write(R.UC_X86_REG_RIP, nxt))
    eng.account(
        "out",
        insn,
        trap.rip,
        fault,
        f"port {port:#x} <- {data.hex()}: to the VMM's device",
        _resume(trap, nxt),
    )
    return Exit(ExitKind.IO, port=port, size=size, is_write=True, data=data, qualification=qualification)


# --- control and debug registers --------------------------------------------------------------


def _mov_cr_dr(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit | None:
    dst, src = insn.operands
    to_control = _is_control(dst)
    reg, gp = (dst, src) if to_control else (src, dst)
    number = int(reg[2:])
    width = 8 if eng.cpu.code_bits == 64 else 4
    if reg.startswith("dr"):
        if to_control:
            eng.v.dr[number] = gpr(eng, gp)
        else:
            set_gpr(eng, gp, eng.v.dr[number], width)
        nxt = advance(eng, insn, trap)
        eng.account(
            f"mov {'to' if to_control else 'from'} dr",
            insn,
            trap.rip,
            "#GP(0): MOV DR at CPL 3",
            f"virtual DR{number}",
            _resume(trap, nxt),
        )
        return None
    if to_control:
        value = gpr(eng, gp) & ((1 << (8 * width)) - 1)
        effect = write_cr(eng, number, value)
        access = CrAccessType.MOV_TO_CR
    else:
        value = read_cr(eng, number)
        set_gpr(eng, gp, value, width)
        effect = f"{gp} <- virtual CR{number} = {value:#x}"
        access = CrAccessType.MOV_FROM_CR
    nxt = advance(eng, insn, trap)
    eng.account(
        f"mov {'to' if to_control else 'from'} cr{number}",
        insn,
        trap.rip,
        f"#GP(0): MOV {'to' if to_control else 'from'} CR{number} at CPL 3",
        effect,
        _resume(trap, nxt),
    )
    return Exit(
        ExitKind.CR_ACCESS,
        qualification=CrQualification(number, access, gpr=GPR_NUMBER[gp]).encode(),
        detail=insn.text,
    )


def read_cr(eng: TrapEngine, number: int) -> int:
    v = eng.v
    return {0: v.cr0, 2: v.cr2, 3: v.cr3, 4: v.cr4, 8: 0}.get(number, 0)


def write_cr(eng: TrapEngine, number: int, value: int) -> str:
    """MOV to CRn at the guest's ring 0 (SDM Vol. 3A 2.5, 10.8.5); returns what changed."""
    v = eng.v
    if number == 0:
        value = value & 0xFFFF_FFFF | CR0_ET  # ET is fixed to 1
        if value & CR0_PG and not value & CR0_PE:
            raise Fault(GP, 0)
        if not value & CR0_PE:
            raise _Unmodelled("clearing CR0.PE (real mode)")
        old = v.cr0
        if value & CR0_PG and not old & CR0_PG and v.efer & EFER_LME:
            if not v.cr4 & CR4_PAE:
                raise Fault(GP, 0)
            v.efer |= EFER_LMA  # SDM 10.8.5: paging on with LME = 1 activates IA-32e mode
        elif not value & CR0_PG and old & CR0_PG:
            v.efer &= ~EFER_LMA
        v.cr0 = value
        if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE):
            eng.switch_shadow()
            return f"virtual CR0 {old:#x} -> {value:#x}; paging mode changed: shadow root switched"
        eng.update_real_control()
        return f"virtual CR0 {old:#x} -> {value:#x}"
    if number == 3:
        v.cr3 = value
        eng.switch_shadow()
        return f"virtual CR3 <- {value:#x}; shadow root for it selected (cached, or filled on demand)"
    if number == 4:
        old = v.cr4
        if v.efer & EFER_LMA and not value & CR4_PAE:
            raise Fault(GP, 0)
        v.cr4 = value
        if (old ^ value) & (CR4_PAE | CR4_PSE | CR4_PGE | CR4_LA57):
            eng.switch_shadow()
            return f"virtual CR4 {old:#x} -> {value:#x}; shadow root switched"
        eng.update_real_control()
        return f"virtual CR4 {old:#x} -> {value:#x}"
    if number == 2:
        v.cr2 = value
        return f"virtual CR2 <- {value:#x}"
    if number == 8:
        return "CR8 (TPR): no interrupt controller is modelled"
    raise Fault(UD)


def _clts(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    eng.v.cr0 &= ~CR0_TS
    eng.update_real_control()
    nxt = advance(eng, insn, trap)
    eng.account("clts", insn, trap.rip, "#GP(0): CLTS at CPL 3", "virtual CR0.TS <- 0", _resume(trap, nxt))


def _lmsw(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    source = _operand_value(eng, insn, trap, 0, 2)
    # SDM Vol. 2 LMSW: loads CR0[3:0]; it can set PE but not clear it.
    value = eng.v.cr0 & ~0xE | source & 0xE | (eng.v.cr0 | source) & CR0_PE
    effect = write_cr(eng, 0, value)
    nxt = advance(eng, insn, trap)
    eng.account("lmsw", insn, trap.rip, "#GP(0): LMSW at CPL 3", effect, _resume(trap, nxt))


# --- descriptor tables ------------------------------------------------------------------------


def _lgdt_lidt(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit:
    mem = insn.mem
    address = eng.effective_address(mem, insn, trap.rip)
    bits = eng.cpu.code_bits
    raw = eng.read_linear(address, 10 if bits == 64 else 6)
    limit = struct.unpack_from("<H", raw)[0]
    base = int.from_bytes(raw[2:], "little")
    if insn.operand_bits == 16 and bits != 64:
        base &= 0xFF_FFFF  # SDM Vol. 2 LGDT: a 16-bit operand loads 24 bits of base
    table = eng.v.gdt if insn.mnemonic == "lgdt" else eng.v.idt
    table.base, table.limit = base, limit
    effect = f"virtual {'GDTR' if insn.mnemonic == 'lgdt' else 'IDTR'} <- {base:#x}:{limit:#x}"
    if insn.mnemonic == "lgdt":
        eng.rebuild_gdt()
        effect += "; shadow GDT rebuilt (DPL 3), its pages write-protected"
    nxt = advance(eng, insn, trap)
    eng.account(
        insn.mnemonic, insn, trap.rip, f"#GP(0): {insn.mnemonic.upper()} at CPL 3", effect, _resume(trap, nxt)
    )
    return Exit(ExitKind.DESCRIPTOR_TABLE, qualification=mem.disp & (1 << 64) - 1, detail=insn.text)


def _ltr_lldt(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit:
    selector = _operand_value(eng, insn, trap, 0, 2)
    v = eng.v
    if insn.mnemonic == "lldt" and not selector & 0xFFFC:
        v.ldt = Segment(selector=selector, type=2, s=0, present=0, unusable=1)
        effect = "virtual LDTR <- null"
    else:
        index = selector & ~7
        system16 = bool(v.efer & EFER_LMA)  # IA-32e system descriptors are 16 bytes
        if selector & 4 or index + (15 if system16 else 7) > v.gdt.limit:
            raise Fault(GP, selector & 0xFFFC)
        raw = eng.read_linear(v.gdt.base + index, 16 if system16 else 8)
        low = int.from_bytes(raw[:8], "little")
        seg = parse_descriptor(low, selector)
        if system16:
            seg.base |= int.from_bytes(raw[8:12], "little") << 32
        wanted = (9,) if insn.mnemonic == "ltr" else (2,)
        if seg.s or seg.type not in wanted:
            raise Fault(GP, selector & 0xFFFC)
        if not seg.present:
            raise Fault(11, selector & 0xFFFC)  # #NP
        if insn.mnemonic == "ltr":
            busy = low | 2 << 40  # SDM Vol. 2 LTR: the descriptor is marked busy
            eng.write_linear(v.gdt.base + index, busy.to_bytes(8, "little"))
            v.tr = replace(seg, type=11)
            effect = f"virtual TR <- {selector:#x} (TSS at {seg.base:#x}), marked busy in the guest's GDT"
        else:
            v.ldt = seg
            effect = f"virtual LDTR <- {selector:#x}"
    nxt = advance(eng, insn, trap)
    eng.account(
        insn.mnemonic, insn, trap.rip, f"#GP(0): {insn.mnemonic.upper()} at CPL 3", effect, _resume(trap, nxt)
    )
    return Exit(ExitKind.DESCRIPTOR_TABLE, detail=insn.text)


def _load_ss(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    """MOV SS / POP SS: the guest's ring-0 stack segment has RPL 0, which CPL 3 may not load."""
    width = 8 if eng.cpu.code_bits == 64 else 4
    if insn.mnemonic == "pop":
        rsp = eng.uc.reg_read(R.UC_X86_REG_RSP)
        selector = int.from_bytes(eng.read_linear(eng.cpu.segment_base(2) + rsp, 2), "little")
    else:
        selector = _operand_value(eng, insn, trap, 1, 2)
    if not selector & 0xFFFC:
        if eng.cpu.code_bits != 64 or selector & 3 != eng.v.cpl:
            raise Fault(GP, 0)
        seg = Segment(selector=selector, base=0, limit=0, type=0, s=0, dpl=eng.v.cpl, present=0, unusable=1)
    else:
        seg = eng.guest_descriptor(selector)
        # SDM Vol. 2 MOV: SS needs RPL = CPL, a writable data segment with DPL = CPL, present.
        if selector & 3 != eng.v.cpl or seg.dpl != eng.v.cpl or not seg.s or seg.type & 8 or not seg.type & 2:
            raise Fault(GP, selector & 0xFFFC)
        if not seg.present:
            raise Fault(12, selector & 0xFFFC)  # #SS
    nxt = trap.rip + insn.length
    eng.uc.reg_write(R.UC_X86_REG_RIP, nxt)
    if insn.mnemonic == "pop":
        eng.uc.reg_write(R.UC_X86_REG_RSP, eng.uc.reg_read(R.UC_X86_REG_RSP) + width)
    eng.load_segment("ss", seg)
    eng.account(
        "mov ss",
        insn,
        trap.rip,
        "#GP(sel): SS.RPL 0 != CPL 3",
        f"SS <- {selector:#x} (real: {selector | 3:#x}, DPL 3)",
        _resume(trap, nxt),
    )


def _iret(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
    """IRET to the guest's ring 0: the frame holds its ring-0 CS, so the real CPU refuses it."""
    bits = eng.cpu.code_bits
    size = {"iret": 2, "iretd": 4, "iretq": 8}[insn.mnemonic]
    state = eng.get_state()
    rsp = state.regs["rsp"]
    stack = state.ss.base if bits != 64 else 0
    count = 5 if bits == 64 else 3
    words = [int.from_bytes(eng.read_linear(stack + rsp + i * size, size), "little") for i in range(count)]
    rip, cs_selector, rflags = words[:3]
    cs_selector &= 0xFFFF
    if cs_selector & 3 > eng.v.cpl:
        raise _Unmodelled("IRET to an outer privilege level (guest ring 3)")
    if rflags & (1 << 14) and bits != 64:
        raise _Unmodelled("IRET with EFLAGS.NT set (task return)")
    if rflags & (1 << 17) and bits != 64:
        raise _Unmodelled("IRET to virtual-8086 mode")
    cs = eng.guest_descriptor(cs_selector)
    if not cs.s or not cs.type & 8:
        raise Fault(GP, cs_selector & 0xFFFC)
    if not cs.present:
        raise Fault(11, cs_selector & 0xFFFC)
    # SDM Vol. 2 IRET: at CPL 0 every flag (IF, IOPL included) comes from the frame.
    keep = 0 if size == 8 else ~((1 << (8 * size)) - 1)
    state.rflags = state.rflags & keep | rflags & ((1 << (8 * size)) - 1) & ~(1 << 16)
    state.rip = rip
    state.cs = replace(cs, selector=cs_selector & ~3 | eng.v.cpl)
    new_rsp = rsp + count * size
    if bits == 64:
        new_rsp = words[3]
        ss_selector = words[4] & 0xFFFF
        if ss_selector & 0xFFFC:
            state.ss = replace(eng.guest_descriptor(ss_selector), selector=ss_selector)
        else:
            state.ss = Segment(
                selector=ss_selector, base=0, limit=0, type=0, s=0, dpl=eng.v.cpl, present=0, unusable=1
            )
    state.regs["rsp"] = new_rsp if size != 2 else rsp & ~0xFFFF | new_rsp & 0xFFFF
    eng.load_virtual(state)
    eng.account(
        insn.mnemonic,
        insn,
        trap.rip,
        f"#GP({cs_selector & 0xFFFC:#x}): return to CS RPL 0 from CPL 3",
        f"pop the frame; IF_virt <- {int(bool(state.rflags & RFLAGS_IF))}, CS <- {cs_selector:#x}",
        f"RIP <- {rip:#x} (the frame's); guest resumes at virtual ring 0",
    )


# --- MSRs, TLB, caches ----------------------------------------------------------------------


def _rdmsr(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit | None:
    index = gpr(eng, "ecx") & 0xFFFF_FFFF
    value = read_msr(eng, index)
    nxt = trap.rip + insn.length

    def put(data: bytes) -> None:
        result = int.from_bytes(data, "little")
        set_gpr(eng, "eax", result & 0xFFFF_FFFF, 4)
        set_gpr(eng, "edx", result >> 32, 4)
        eng.uc.reg_write(R.UC_X86_REG_RIP, nxt)

    if value is None:
        eng.pend(put, 8)
        eng.account(
            "rdmsr",
            insn,
            trap.rip,
            "#GP(0): RDMSR at CPL 3",
            f"MSR {index:#x}: asked of the VMM",
            _resume(trap, nxt),
        )
        return Exit(ExitKind.RDMSR, addr=index, size=8)
    put(value.to_bytes(8, "little"))
    eng.account(
        "rdmsr",
        insn,
        trap.rip,
        "#GP(0): RDMSR at CPL 3",
        f"EDX:EAX <- virtual MSR {index:#x} = {value:#x}",
        _resume(trap, nxt),
    )
    return None


def _wrmsr(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit | None:
    index = gpr(eng, "ecx") & 0xFFFF_FFFF
    value = (gpr(eng, "edx") & 0xFFFF_FFFF) << 32 | gpr(eng, "eax") & 0xFFFF_FFFF
    nxt = trap.rip + insn.length
    if write_msr(eng, index, value):
        eng.uc.reg_write(R.UC_X86_REG_RIP, nxt)
        eng.account(
            "wrmsr",
            insn,
            trap.rip,
            "#GP(0): WRMSR at CPL 3",
            f"virtual MSR {index:#x} <- {value:#x}",
            _resume(trap, nxt),
        )
        return None
    eng.pend(lambda _: eng.uc.reg_write(R.UC_X86_REG_RIP, nxt))
    eng.account(
        "wrmsr",
        insn,
        trap.rip,
        "#GP(0): WRMSR at CPL 3",
        f"MSR {index:#x} <- {value:#x}: to the VMM",
        _resume(trap, nxt),
    )
    return Exit(ExitKind.WRMSR, addr=index, size=8, is_write=True, data=value.to_bytes(8, "little"))


def read_msr(eng: TrapEngine, index: int) -> int | None:
    if index == MSR_EFER:
        return eng.v.efer
    if index in (MSR_FS_BASE, MSR_GS_BASE):
        return eng.uc.msr_read(index)
    if index in KEPT_MSRS:
        return eng.v.msrs.get(index, KEPT_MSRS[index])
    return None


def write_msr(eng: TrapEngine, index: int, value: int) -> bool:
    """True if the virtual CPU keeps MSR ``index`` (False: the VMM is asked)."""
    v = eng.v
    if index == MSR_EFER:
        if value & ~EFER_WRITABLE & ~EFER_LMA or v.cr0 & CR0_PG and (value ^ v.efer) & EFER_LME:
            raise Fault(GP, 0)  # reserved bits, or LME changed with paging on (SDM 10.8.5)
        old = v.efer
        v.efer = value & EFER_WRITABLE | v.efer & EFER_LMA
        if (old ^ v.efer) & EFER_NXE:
            eng.switch_shadow()
        return True
    if index in (MSR_FS_BASE, MSR_GS_BASE):
        eng.uc.msr_write(index, value)
        return True
    if index in KEPT_MSRS:
        v.msrs[index] = value
        return True
    return False


def _invlpg(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit:
    la = eng.effective_address(insn.mem, insn, trap.rip)
    eng.mmu.invlpg(la)
    nxt = advance(eng, insn, trap)
    eng.account(
        "invlpg",
        insn,
        trap.rip,
        "#GP(0): INVLPG at CPL 3",
        f"shadow entry for {la:#x} dropped",
        _resume(trap, nxt),
    )
    return Exit(ExitKind.INVLPG, addr=la, qualification=la)


def _nop(effect: str) -> Emulator:
    def emulate(eng: TrapEngine, insn: Insn, trap: Trap) -> None:
        nxt = advance(eng, insn, trap)
        eng.account(
            insn.mnemonic,
            insn,
            trap.rip,
            f"#GP(0): {insn.mnemonic.upper()} at CPL 3",
            effect,
            _resume(trap, nxt),
        )

    return emulate


class _Unmodelled(Exception):
    """A guest operation outside what the engine models; the run ends with an internal error."""


def _guarded(emulator: Emulator) -> Emulator:
    def run(eng: TrapEngine, insn: Insn, trap: Trap) -> Exit | None:
        try:
            return emulator(eng, insn, trap)
        except _Unmodelled as what:
            return Exit(
                ExitKind.INTERNAL_ERROR,
                detail=f"trap engine: {what} is not modelled ('{insn.text}' at {trap.rip:#x})",
            )

    return run


_EMULATORS: dict[str, Emulator] = {
    "cli": _cli,
    "sti": _sti,
    "hlt": _hlt,
    "in": _io,
    "out": _io,
    "clts": _clts,
    "lmsw": _guarded(_lmsw),
    "lgdt": _lgdt_lidt,
    "lidt": _lgdt_lidt,
    "ltr": _ltr_lldt,
    "lldt": _ltr_lldt,
    "iret": _guarded(_iret),
    "iretd": _guarded(_iret),
    "iretq": _guarded(_iret),
    "rdmsr": _rdmsr,
    "wrmsr": _wrmsr,
    "invlpg": _invlpg,
    "wbinvd": _nop("caches: nothing to do in an emulated machine"),
    "invd": _nop("caches: nothing to do"),
}

_NOT_MODELLED = {
    "insb": "string I/O",
    "insw": "string I/O",
    "insd": "string I/O",
    "outsb": "string I/O",
    "outsw": "string I/O",
    "outsd": "string I/O",
    "retf": "far return to ring 0 from CPL 3",
    "lret": "far return to ring 0 from CPL 3",
    "sysexit": "SYSEXIT",
    "sysret": "SYSRET",
    "swapgs": "SWAPGS",
    "lss": "LSS",
}
