"""Sensitive instructions in VMX non-root operation: exit or not, exit information, completion.

:func:`intercept` runs in the hook at a sensitive instruction's address, *before* the
instruction executes, which is exactly when VT-x decides (SDM Vol. 3C 26.1: an instruction that
causes a VM exit does not execute; RIP still points at it). The decision reads only the VMCS
controls latched at VM entry (:class:`Latched`) and the instruction's operands, following SDM
26.1.2 (instructions that always exit) and 26.1.3 (instructions that exit conditionally), after
the exceptions that have priority over VM exits (26.1.1: the CPL checks). Three outcomes:

* **exit**: a :class:`VmExit` with the basic exit reason, qualification and instruction length;
  the engine stops and reports it; at the next VM entry :meth:`VmExit.complete` does what a
  KVM-like hypervisor does for that exit (the data the VMM supplied goes into the registers,
  RIP moves past the instruction);
* **native**: Unicorn executes the instruction (its semantics are the architecture's);
* **emulated**: the instruction does not exit but Unicorn cannot give its VMX non-root result
  (RDTSC with TSC offsetting, MOV from CR0 with a read shadow, ...); the hook computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import x86_const as R

from hvm.engine.model.cpuid import EBX_INVPCID
from hvm.engine.model.decode import Insn, Memory, Op
from hvm.engine.model.events import GP, PF, UD, Event, Fault
from hvm.engine.model.vmcs import ExitInfo
from hvm.exits import Exit, ExitKind
from hvm.vtx.apicv import ApicvGP
from hvm.vtx.bitmaps import io_instruction_exits, msr_instruction_exits
from hvm.vtx.controls import Controls, ProcBased, ProcBased2
from hvm.vtx.exit_reasons import ExitReason
from hvm.vtx.qualification import (
    AddressSize,
    CrAccessType,
    CrQualification,
    DrQualification,
    GdtrIdtrInfo,
    GdtrIdtrInstruction,
    InterruptionType,
    InvInfo,
    IoQualification,
    LdtrTrInfo,
    LdtrTrInstruction,
    MemoryOperand,
    SegmentRegister,
)
from hvm.vtx.tsc import TscLevel
from hvm.vtx.vmcs import VMCS, VmcsField

if TYPE_CHECKING:
    from hvm.engine.model.engine import ModelEngine

F = VmcsField
GPR_IDS = (R.UC_X86_REG_RAX, R.UC_X86_REG_RCX, R.UC_X86_REG_RDX, R.UC_X86_REG_RBX,
           R.UC_X86_REG_RSP, R.UC_X86_REG_RBP, R.UC_X86_REG_RSI, R.UC_X86_REG_RDI,
           R.UC_X86_REG_R8, R.UC_X86_REG_R9, R.UC_X86_REG_R10, R.UC_X86_REG_R11,
           R.UC_X86_REG_R12, R.UC_X86_REG_R13, R.UC_X86_REG_R14, R.UC_X86_REG_R15)
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
MASK64 = (1 << 64) - 1
CR0_TS = 1 << 3
CR4_TSD, CR4_PCE, CR4_UMIP, CR4_SMXE, CR4_OSXSAVE = 1 << 2, 1 << 8, 1 << 11, 1 << 14, 1 << 18
CR4_LA57, CR4_PCIDE = 1 << 12, 1 << 17
CR0_PG, EFER_LMA = 1 << 31, 1 << 10
CR3_NOFLUSH = 1 << 63  # SDM 4.10.4.1: with CR4.PCIDE = 1, bit 63 of MOV to CR3's source
RFLAGS_DF, RFLAGS_IOPL_SHIFT, RFLAGS_VM = 1 << 10, 12, 1 << 17
MSR_IA32_TSC, MSR_IA32_TSC_AUX = 0x10, 0xC000_0103
_NOT_EXCEPTIONS = (InterruptionType.EXTERNAL_INTERRUPT, InterruptionType.NMI,
                   InterruptionType.SOFTWARE_INTERRUPT)

# SDM 26.1.1: these fault at CPL > 0 before any VM-exit check (#GP from the CPL check).
_CPL0_ONLY = frozenset({Op.HLT, Op.INVLPG, Op.INVPCID, Op.RDMSR, Op.WRMSR, Op.MOV_TO_CR, Op.MOV_FROM_CR,
                        Op.CLTS, Op.LMSW, Op.MOV_TO_DR, Op.MOV_FROM_DR, Op.LGDT, Op.LIDT, Op.LLDT,
                        Op.LTR, Op.INVD, Op.WBINVD, Op.XSETBV, Op.MONITOR, Op.MWAIT})
_VMX_REASONS = {
    "vmclear": ExitReason.VMCLEAR, "vmlaunch": ExitReason.VMLAUNCH, "vmptrld": ExitReason.VMPTRLD,
    "vmptrst": ExitReason.VMPTRST, "vmread": ExitReason.VMREAD, "vmresume": ExitReason.VMRESUME,
    "vmwrite": ExitReason.VMWRITE, "vmxoff": ExitReason.VMOFF, "vmxon": ExitReason.VMON,
    "invept": ExitReason.INVEPT, "invvpid": ExitReason.INVVPID, "vmfunc": ExitReason.VMFUNC,
}
# The shared exit vocabulary (hvm.exits) names these reasons; the others (INVD, XSETBV, ...) are
# handled inside the engine, as KVM handles them in the kernel, and appear only in counters().
KIND_OF: dict[ExitReason, ExitKind] = {reason: kind for kind, reason in
                                       ((k, k.sdm_reason) for k in ExitKind) if reason is not None
                                       and kind not in (ExitKind.MMIO, ExitKind.DEBUG)}
KIND_OF[ExitReason.LDTR_TR] = ExitKind.DESCRIPTOR_TABLE


@dataclass
class Latched:
    """The VM-execution controls as the processor latched them at VM entry."""

    controls: Controls
    exception_bitmap: int
    pf_mask: int
    pf_match: int
    cr0_mask: int
    cr0_shadow: int
    cr4_mask: int
    cr4_shadow: int
    cr3_targets: tuple[int, ...]
    io_a: bytes | memoryview
    io_b: bytes | memoryview
    msr_bitmap: bytes | memoryview
    tsc: TscLevel
    eptp: int = 0

    proc: int = 0  # the control vectors as plain ints (IntFlag arithmetic is slow on a hot path)
    proc2: int = 0
    pin: int = 0

    def __post_init__(self) -> None:
        self.proc, self.proc2, self.pin = (int(self.controls.proc), int(self.controls.proc2),
                                           int(self.controls.pin))

    @classmethod
    def read(cls, vmcs: VMCS, view: Callable[[int, int], memoryview]) -> Latched:
        controls = Controls.read(vmcs)
        proc = controls.proc
        count = min(4, vmcs.vmread(F.CR3_TARGET_COUNT))
        targets = tuple(vmcs.vmread(F.CR3_TARGET_VALUE0 + 2 * i) for i in range(count))
        empty = bytes(4096)
        return cls(
            controls=controls,
            exception_bitmap=vmcs.vmread(F.EXCEPTION_BITMAP),
            pf_mask=vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MASK),
            pf_match=vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MATCH),
            cr0_mask=vmcs.vmread(F.CR0_GUEST_HOST_MASK),
            cr0_shadow=vmcs.vmread(F.CR0_READ_SHADOW),
            cr4_mask=vmcs.vmread(F.CR4_GUEST_HOST_MASK),
            cr4_shadow=vmcs.vmread(F.CR4_READ_SHADOW),
            cr3_targets=targets,
            io_a=view(vmcs.vmread(F.IO_BITMAP_A), 4096) if proc & ProcBased.USE_IO_BITMAPS else empty,
            io_b=view(vmcs.vmread(F.IO_BITMAP_B), 4096) if proc & ProcBased.USE_IO_BITMAPS else empty,
            msr_bitmap=view(vmcs.vmread(F.MSR_BITMAP), 4096) if proc & ProcBased.USE_MSR_BITMAPS else empty,
            tsc=TscLevel.from_vmcs(vmcs),
            eptp=vmcs.vmread(F.EPT_POINTER),
        )

    def exception_exits(self, event: Event) -> bool:
        """Does this exception cause a VM exit (SDM Vol. 3C 26.2, exception bitmap)?"""
        # External interrupts, NMIs and INT n are not exceptions; INT3, INTO and INT1 are.
        if event.vector >= 32 or event.type in _NOT_EXCEPTIONS:
            return False
        bit = bool(self.exception_bitmap >> event.vector & 1)
        if event.vector == PF:
            # SDM 26.2: a #PF exits iff bit 14 equals ((error code AND mask) == match).
            return bit == ((event.error_code or 0) & self.pf_mask == self.pf_match)
        return bit


@dataclass
class VmExit:
    """One VM exit the model produced: the SDM's view, the VMM's view, and how to finish it."""

    reason: ExitReason
    info: ExitInfo
    exit: Exit | None  # what run() returns; None: handled inside the engine
    complete: Callable[[bytes], None] | None = None  # at the next VM entry, with the VMM's read data
    read_size: int = 0  # bytes complete_read must supply


def gpr(eng: ModelEngine, number: int) -> int:
    """A GPR as the hook found it (from the CPU-state copy the hook took)."""
    return eng.cpu.gpr(number)


def set_gpr(eng: ModelEngine, number: int, value: int, width: int) -> None:
    """Write ``width`` bytes of a GPR the way a MOV does (a 4-byte write zero-extends in 64-bit mode)."""
    uc = eng.uc
    reg = GPR_IDS[number]
    if width >= 4:
        uc.reg_write(reg, value & ((1 << (8 * width)) - 1))
    else:
        mask = (1 << (8 * width)) - 1
        uc.reg_write(reg, uc.reg_read(reg) & ~mask | value & mask)


# --- the decision ----------------------------------------------------------------------------

def intercept(eng: ModelEngine, insn: Insn, linear: int, rip: int) -> None:
    """Hook body: decide for ``insn`` at ``linear`` (RIP ``rip``); sets ``eng.pending_exit`` to exit."""
    latched = eng.latched
    op = insn.op
    cpl = eng.cpl()
    if op is Op.INVPCID:
        _invpcid(eng, latched, insn, linear, rip, cpl)  # Unicorn has no INVPCID: all of it is here
        return
    if cpl and op in _CPL0_ONLY:
        return  # Unicorn raises the #GP the CPL check gives (SDM 26.1.1)
    handler = _HANDLERS.get(op)
    if handler is not None:
        handler(eng, latched, insn, linear, rip, cpl)


def _exit(eng: ModelEngine, reason: ExitReason, insn: Insn, rip: int, *, qualification: int = 0,
          exit: Exit | None = None, complete: Callable[[bytes], None] | None = None, read_size: int = 0,
          instruction_info: int = 0, linear_address: int = 0) -> None:
    info = ExitInfo(reason=int(reason), qualification=qualification, instruction_length=insn.length,
                    instruction_info=instruction_info, guest_linear_address=linear_address)
    kind = KIND_OF.get(reason)
    if exit is None and kind is not None:
        exit = Exit(kind, qualification=qualification)
    if complete is None:
        complete = _skip(eng, insn, rip)
    eng.take_exit(VmExit(reason, info, exit if kind is not None else None, complete, read_size))


def _skip(eng: ModelEngine, insn: Insn, rip: int) -> Callable[[bytes], None]:
    """The usual completion: the hypervisor emulated the instruction; RIP moves past it."""
    def complete(_: bytes) -> None:
        eng.uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
    return complete


def _native_once(eng: ModelEngine, linear: int) -> Callable[[bytes], None]:
    """Completion by letting the instruction execute natively on re-entry (the hook passes it once)."""
    def complete(_: bytes) -> None:
        eng.pass_once(linear)
    return complete


def _inject_ud(eng: ModelEngine) -> Callable[[bytes], None]:
    def complete(_: bytes) -> None:
        eng.queue_event(Event(UD))
    return complete


def _emulated(eng: ModelEngine, insn: Insn, rip: int) -> None:
    """Continue after an instruction the hook emulated (Unicorn resumes at the new RIP)."""
    eng.uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)


# --- I/O (SDM 26.1.3; qualification: table "Exit Qualification for I/O Instructions") ---------

def _io(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    uc = eng.uc
    port = insn.port if insn.port is not None else gpr(eng, RDX) & 0xFFFF
    size = insn.io_size
    if eng.protected_mode() and (cpl > eng.iopl() or eng.vm86()) and not eng.tss_io_allowed(port, size):
        return  # #GP from the I/O permission check has priority (SDM 26.1.1)
    if not io_instruction_exits(latched.proc, port, size, latched.io_a, latched.io_b):
        return  # native: Unicorn's IN/OUT hooks answer as an empty port
    string = insn.op in (Op.INS, Op.OUTS)
    is_in = insn.op in (Op.IN, Op.INS)
    qualification = IoQualification(size=size, is_in=is_in, string=string, rep=insn.rep,
                                    immediate=insn.port is not None, port=port).encode()
    if not string:
        if is_in:
            def complete(data: bytes) -> None:
                set_gpr(eng, RAX, int.from_bytes(data, "little"), size)
                uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
            _exit(eng, ExitReason.IO_INSTRUCTION, insn, rip, qualification=qualification,
                  exit=Exit(ExitKind.IO, port=port, size=size, qualification=qualification),
                  complete=complete, read_size=size)
        else:
            data = (gpr(eng, RAX) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            _exit(eng, ExitReason.IO_INSTRUCTION, insn, rip, qualification=qualification,
                  exit=Exit(ExitKind.IO, port=port, size=size, is_write=True, data=data,
                            qualification=qualification))
        return
    _string_io(eng, insn, rip, port, size, is_in, qualification)


def _string_io(eng: ModelEngine, insn: Insn, rip: int, port: int, size: int, is_in: bool,
               qualification: int) -> None:
    """INS/OUTS: one exit per chunk, as KVM's emulator does: the elements up to the end of the page."""
    uc = eng.uc
    mask = (1 << insn.address_size) - 1
    reg = RDI if is_in else RSI
    pointer = gpr(eng, reg) & mask
    step = -size if uc.reg_read(R.UC_X86_REG_RFLAGS) & RFLAGS_DF else size
    count = gpr(eng, RCX) & mask if insn.rep else 1
    if count == 0:
        _emulated(eng, insn, rip)  # REP with RCX = 0 does nothing
        return
    segment = 0 if is_in else (insn.mem.segment if insn.mem else 3)  # INS writes ES:rDI
    linear = eng.segment_base(segment) + pointer
    room = (4096 - (linear & 0xFFF)) // size if step > 0 else (linear & 0xFFF) // size + 1
    count = max(1, min(count, room))

    def advance() -> None:
        set_gpr(eng, reg, (pointer + step * count) & mask, insn.address_size // 8)
        if insn.rep:
            left = (gpr(eng, RCX) & mask) - count
            set_gpr(eng, RCX, left, insn.address_size // 8)
            if left:
                return  # RIP stays: the instruction continues at the next entry
        uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)

    first = linear if step > 0 else linear - size * (count - 1)
    if is_in:
        def complete(data: bytes) -> None:
            if step < 0:  # elements arrive in port order, memory fills downwards
                data = b"".join(data[i : i + size] for i in range(len(data) - size, -1, -size))
            eng.write_linear(first, data)
            advance()
        _exit(eng, ExitReason.IO_INSTRUCTION, insn, rip, qualification=qualification,
              exit=Exit(ExitKind.IO, port=port, size=size, count=count, qualification=qualification),
              complete=complete, read_size=size * count, linear_address=linear)
        return
    try:
        raw = eng.read_linear(first, size * count)
    except Fault as fault:
        eng.raise_event(fault.event)
        return
    if step < 0:
        raw = b"".join(raw[i : i + size] for i in range(len(raw) - size, -1, -size))
    _exit(eng, ExitReason.IO_INSTRUCTION, insn, rip, qualification=qualification,
          exit=Exit(ExitKind.IO, port=port, size=size, count=count, is_write=True, data=raw,
                    qualification=qualification),
          complete=lambda _: advance(), linear_address=linear)


# --- software interrupts: INT n never exits; INT3, INTO, INT1 as the exception bitmap says ----

_INT_TYPES = {"int": InterruptionType.SOFTWARE_INTERRUPT, "int3": InterruptionType.SOFTWARE_EXCEPTION,
              "into": InterruptionType.SOFTWARE_EXCEPTION,
              "int1": InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION}
RFLAGS_OF = 1 << 11


def _int(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if insn.mnemonic == "into" and not eng.uc.reg_read(R.UC_X86_REG_RFLAGS) & RFLAGS_OF:
        return  # INTO without OF does nothing
    event = Event(insn.vector, _INT_TYPES[insn.mnemonic])
    if latched.exception_exits(event):
        eng.exception_exit(event, insn.length, rip)
        return
    # Delivered now, with the return address past the instruction (SDM Vol. 3A 6.4.2).
    eng.uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
    eng.raise_event(event)


# --- instructions that always exit (SDM 26.1.2) ----------------------------------------------

def _cpuid(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    uc = eng.uc
    leaf, subleaf = gpr(eng, RAX) & 0xFFFF_FFFF, gpr(eng, RCX) & 0xFFFF_FFFF

    def complete(_: bytes) -> None:
        answer = list(eng.cpuid(leaf, subleaf))
        if leaf == 7 and subleaf == 0 and not eng.latched.proc2 & ProcBased2.ENABLE_INVPCID:
            answer[1] &= ~EBX_INVPCID  # SDM 26.3: without "enable INVPCID" INVPCID is #UD
        for number, value in zip((RAX, RBX, RCX, RDX), answer, strict=True):
            set_gpr(eng, number, value, 4)
        uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
    _exit(eng, ExitReason.CPUID, insn, rip, complete=complete)


def _always(reason: ExitReason, completion: str, cr4_enable: int = 0):
    """An instruction that always exits (SDM 26.1.2), after the #UD its CR4 enable bit gives (26.1.1)."""
    def handler(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
        if cr4_enable and not eng.cr4() & cr4_enable:
            eng.raise_event(Event(UD))
            return
        complete = {"skip": None, "native": _native_once(eng, linear), "ud": _inject_ud(eng)}[completion]
        _exit(eng, reason, insn, rip, complete=complete)
    return handler


def _vmx(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    # Without nested VMX the hypervisor injects #UD, as KVM does with nested=0.
    _exit(eng, _VMX_REASONS[insn.mnemonic], insn, rip, complete=_inject_ud(eng))


# --- conditional exits (SDM 26.1.3) ----------------------------------------------------------

def _when(control: int, secondary: bool, reason: ExitReason, completion: str = "skip"):
    def handler(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
        if (latched.proc2 if secondary else latched.proc) & control:
            complete = {"skip": None, "native": _native_once(eng, linear)}[completion]
            _exit(eng, reason, insn, rip, complete=complete)
    return handler


def _hlt(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if latched.proc & ProcBased.HLT_EXITING:
        def complete(_: bytes) -> None:
            eng.uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
            eng.halt()
        _exit(eng, ExitReason.HLT, insn, rip, complete=complete)
        return
    eng.uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
    eng.halt()  # the logical processor enters the HLT activity state, no VM exit
    eng.uc.emu_stop()


def _rdtsc(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    uc = eng.uc
    rdtscp = insn.op is Op.RDTSCP
    if rdtscp and not latched.proc2 & ProcBased2.ENABLE_RDTSCP:
        eng.raise_event(Event(UD))  # SDM 26.1.1: RDTSCP with "enable RDTSCP" 0 is #UD
        return
    if cpl and eng.cr4() & CR4_TSD:
        return  # #GP(0) from CR4.TSD has priority
    if latched.proc & ProcBased.RDTSC_EXITING:
        def complete(_: bytes) -> None:
            _put_tsc(eng, latched, rdtscp)
            uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
        _exit(eng, ExitReason.RDTSCP if rdtscp else ExitReason.RDTSC, insn, rip, complete=complete)
        return
    _put_tsc(eng, latched, rdtscp)
    _emulated(eng, insn, rip)


def _put_tsc(eng: ModelEngine, latched: Latched, rdtscp: bool) -> None:
    value = eng.guest_tsc()
    set_gpr(eng, RAX, value & 0xFFFF_FFFF, 4)
    set_gpr(eng, RDX, value >> 32, 4)
    if rdtscp:
        set_gpr(eng, RCX, eng.uc.msr_read(MSR_IA32_TSC_AUX) & 0xFFFF_FFFF, 4)


def _rdpmc(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if cpl and not eng.cr4() & CR4_PCE:
        return  # #GP(0) has priority
    uc = eng.uc

    def zero(_: bytes = b"") -> None:
        set_gpr(eng, RAX, 0, 4)  # the model has no performance counters: they read as 0
        set_gpr(eng, RDX, 0, 4)
        uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
    if latched.proc & ProcBased.RDPMC_EXITING:
        _exit(eng, ExitReason.RDPMC, insn, rip, complete=zero)
        return
    zero()


def _mwait(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if latched.proc & ProcBased.MWAIT_EXITING:
        _exit(eng, ExitReason.MWAIT_INSTRUCTION, insn, rip)  # completed as a NOP, as KVM does
        return
    _emulated(eng, insn, rip)  # MWAIT may wake at any time (SDM Vol. 2 MWAIT): here at once


def _monitor(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if latched.proc & ProcBased.MONITOR_EXITING:
        _exit(eng, ExitReason.MONITOR_INSTRUCTION, insn, rip)
        return
    _emulated(eng, insn, rip)  # arms nothing: MWAIT wakes at once in the model (see _mwait)


def _invlpg(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if not latched.proc & ProcBased.INVLPG_EXITING:
        return
    address = eng.effective_linear(insn.mem, rip + insn.length)
    _exit(eng, ExitReason.INVLPG, insn, rip, qualification=address, linear_address=address,
          exit=Exit(ExitKind.INVLPG, addr=address, qualification=address),
          complete=_native_once(eng, linear))


def _gp(eng: ModelEngine) -> None:
    eng.raise_event(Event(GP, error_code=0))


def _canonical(eng: ModelEngine, address: int) -> bool:
    bits = 57 if eng.cr4() & CR4_LA57 else 48
    top = address >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


def _invpcid(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    """INVPCID (SDM Vol. 2 INVPCID; Vol. 3C 26.3 and 26.1.3): Unicorn's CPU lacks it in every CPU
    model (it raises #UD), so the model executes it here, in the SDM's order of checks:

    * "enable INVPCID" = 0: #UD, before any other exception (SDM 26.3);
    * CPL > 0: #GP(0), which has priority over the VM exit (26.1.1); in virtual-8086 mode: #UD;
    * "INVLPG exiting" = 1 (with "enable INVPCID" = 1): VM exit, basic reason 58, the
      displacement as exit qualification (28.2.1) and the operand in the instruction-information
      field (28.2.5); the hypervisor completes it by executing it, as KVM's handle_invpcid does;
    * otherwise the descriptor's checks (#GP(0): type > 3, descriptor bits 63:12 set, a
      non-canonical address for type 0, a non-zero PCID for types 0-1 with CR4.PCIDE = 0) and its
      invalidation: Unicorn's whole TLB (more than the architecture requires), and in the
      modelled TLB exactly the type's effect (:meth:`hvm.vtx.tlb.TlbModel.invpcid`)."""
    if not latched.proc2 & ProcBased2.ENABLE_INVPCID or eng.vm86() or insn.reg is None or insn.mem is None:
        eng.raise_event(Event(UD))
        return
    if cpl:
        _gp(eng)
        return
    passing, eng.invpcid_pass = eng.invpcid_pass == linear, None
    if latched.proc & ProcBased.INVLPG_EXITING and not passing:
        def complete(_: bytes) -> None:
            eng.invpcid_pass = linear  # at re-entry the hook executes it without the exit check
        info = InvInfo(_memory_operand(insn.mem), insn.reg).encode()
        _exit(eng, ExitReason.INVPCID, insn, rip, qualification=insn.mem.disp & MASK64,
              instruction_info=info, complete=complete)
        return
    uc = eng.uc
    kind = uc.reg_read(GPR_IDS[insn.reg]) & (MASK64 if eng.cpu.code_bits == 64 else 0xFFFF_FFFF)
    address = eng.effective_linear(insn.mem, rip + insn.length)
    if eng.cpu.code_bits == 64 and not _canonical(eng, address):
        _gp(eng)
        return
    descriptor = eng.read_linear(address, 16)  # a #PF or EPT violation here is the instruction's
    pcid_field = int.from_bytes(descriptor[:8], "little")
    la = int.from_bytes(descriptor[8:], "little")
    pcid = pcid_field & 0xFFF
    pcide = bool(eng.cr4() & CR4_PCIDE)
    if kind > 3 or pcid_field >> 12 or kind == 0 and not _canonical(eng, la) \
            or kind in (0, 1) and not pcide and pcid:
        _gp(eng)
        return
    eng.invalidate_tlb()
    if eng.walks is not None:
        eng.walks.invpcid(kind, pcid, la)
    _emulated(eng, insn, rip)


def _msr(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    uc = eng.uc
    msr = gpr(eng, RCX) & 0xFFFF_FFFF
    write = insn.op is Op.WRMSR
    if msr_instruction_exits(latched.proc, msr, write, latched.msr_bitmap):
        if write:
            value = (gpr(eng, RDX) & 0xFFFF_FFFF) << 32 | gpr(eng, RAX) & 0xFFFF_FFFF
            _exit(eng, ExitReason.MSR_WRITE, insn, rip,
                  exit=Exit(ExitKind.WRMSR, addr=msr, size=8, is_write=True,
                            data=value.to_bytes(8, "little")))
            return

        def complete(data: bytes) -> None:
            value = int.from_bytes(data, "little")
            set_gpr(eng, RAX, value & 0xFFFF_FFFF, 4)
            set_gpr(eng, RDX, value >> 32, 4)
            uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
        _exit(eng, ExitReason.MSR_READ, insn, rip, exit=Exit(ExitKind.RDMSR, addr=msr, size=8),
              complete=complete, read_size=8)
        return
    if (0x800 <= msr <= 0x8FF and latched.proc & ProcBased.ACTIVATE_SECONDARY_CONTROLS
            and latched.proc2 & ProcBased2.VIRTUALIZE_X2APIC_MODE and _vapic(eng)):
        # SDM Vol. 3C 30.5: with "virtualize x2APIC mode", against the virtual-APIC page.
        try:
            if write:
                value = (gpr(eng, RDX) & 0xFFFF_FFFF) << 32 | gpr(eng, RAX) & 0xFFFF_FFFF
                done = eng.apic.x2apic_wrmsr(msr, value, rip + insn.length)
            else:
                value = eng.apic.x2apic_rdmsr(msr)
                if value is not None:
                    set_gpr(eng, RAX, value & 0xFFFF_FFFF, 4)
                    set_gpr(eng, RDX, value >> 32, 4)
                done = value is not None
        except ApicvGP:
            eng.raise_event(Event(GP, error_code=0))
            return
        if done:
            if eng._exit is None:
                _emulated(eng, insn, rip)
            if write:
                uc.emu_stop()  # a virtual interrupt it lets through is delivered at this boundary
            return
    if msr == MSR_IA32_TSC and not write:
        value = eng.guest_tsc()  # SDM 26.3: RDMSR of IA32_TSC sees the offset and scaled TSC
        set_gpr(eng, RAX, value & 0xFFFF_FFFF, 4)
        set_gpr(eng, RDX, value >> 32, 4)
        _emulated(eng, insn, rip)


# --- control registers (SDM 26.1.3 and table "Exit Qualification for Control-Register Accesses")

def _cr_exit(eng: ModelEngine, insn: Insn, rip: int, linear: int, qualification: CrQualification,
             complete: Callable[[bytes], None] | None = None, linear_address: int = 0) -> None:
    value = qualification.encode()
    _exit(eng, ExitReason.CR_ACCESS, insn, rip, qualification=value, linear_address=linear_address,
          exit=Exit(ExitKind.CR_ACCESS, qualification=value),
          complete=complete or _native_once(eng, linear))


def _vapic(eng: ModelEngine) -> bool:
    """Is there a virtual-APIC page the model keeps (the engine's apic="apicv")?"""
    return eng.apic is not None and eng.apic.vapic is not None


def _mov_to_cr(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    uc = eng.uc
    value = gpr(eng, insn.reg) & ((1 << (8 * insn.reg_width)) - 1)
    cr = insn.control
    if cr == 0:
        exits = bool((value ^ latched.cr0_shadow) & latched.cr0_mask & 0xFFFF_FFFF)
    elif cr == 4:
        exits = bool((value ^ latched.cr4_shadow) & latched.cr4_mask)
    elif cr == 3:
        exits = bool(latched.proc & ProcBased.CR3_LOAD_EXITING) and value not in latched.cr3_targets
    elif cr == 8:
        exits = bool(latched.proc & ProcBased.CR8_LOAD_EXITING)
    else:
        return  # CR1, CR5-7: #UD from Unicorn
    if not exits and cr in (0, 3, 4) and _pcid_rules(eng, cr, value, insn, rip):
        return
    if cr == 8 and not exits and latched.proc & ProcBased.USE_TPR_SHADOW and _vapic(eng):
        eng.apic.mov_to_cr8(value)  # SDM 30.3: into VTPR, then TPR virtualization
        _emulated(eng, insn, rip)
        eng.uc.emu_stop()  # a virtual interrupt it lets through is delivered at this boundary
        return
    if exits:
        def complete(_: bytes) -> None:
            eng.cpu.sync()
            if _pcid_gp(eng, cr, value):
                eng.queue_event(Event(GP, error_code=0))  # the hypervisor's checks, as KVM's kvm_set_cr4/cr0
                return
            eng.write_cr(cr, value)  # the hypervisor performs the guest's write (and its shadow)
            uc.reg_write(R.UC_X86_REG_RIP, rip + insn.length)
        _cr_exit(eng, insn, rip, linear, CrQualification(cr, CrAccessType.MOV_TO_CR, gpr=insn.reg),
                 complete=complete)


def _pcid_gp(eng: ModelEngine, cr: int, value: int) -> bool:
    """Does this MOV to CR0/CR4 break a PCID rule (SDM Vol. 3A 4.10.1), so that it is #GP(0)?"""
    cpu = eng.cpu
    pcide = cpu.cr(4) & CR4_PCIDE
    if cr == 4 and value & CR4_PCIDE and not pcide:
        return not cpu.efer & EFER_LMA or bool(cpu.cr(3) & 0xFFF)
    return cr == 0 and bool(pcide) and not value & CR0_PG


def _pcid_rules(eng: ModelEngine, cr: int, value: int, insn: Insn, rip: int) -> bool:
    """The PCID rules of a MOV to CR0/CR3/CR4 that does not exit, where Unicorn's CPU (which lets
    CR4.PCIDE be set but implements none of them) differs from the SDM; True if handled here.

    SDM Vol. 3A 4.10.1 and Vol. 2 MOV-to-CR exceptions: #GP(0) for a MOV to CR4 that sets PCIDE
    with IA32_EFER.LMA = 0 or with CR3[11:0] != 0, and for a MOV to CR0 that clears PG while
    CR4.PCIDE = 1. SDM 4.10.4.1 and Vol. 2 MOV: with CR4.PCIDE = 1, bit 63 of the source of MOV to
    CR3 only says "do not invalidate" and is not written to CR3 (Unicorn would store it)."""
    if _pcid_gp(eng, cr, value):
        _gp(eng)
        return True
    if cr == 3 and eng.cpu.cr(4) & CR4_PCIDE and value & CR3_NOFLUSH:
        eng.uc.reg_write(R.UC_X86_REG_CR3, value & ~CR3_NOFLUSH)
        _emulated(eng, insn, rip)
        return True
    return False


def _mov_from_cr(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    cr = insn.control
    store_exiting = {3: ProcBased.CR3_STORE_EXITING, 8: ProcBased.CR8_STORE_EXITING}.get(cr, 0)
    if latched.proc & store_exiting:
        _cr_exit(eng, insn, rip, linear, CrQualification(cr, CrAccessType.MOV_FROM_CR, gpr=insn.reg))
        return
    if cr == 8 and latched.proc & ProcBased.USE_TPR_SHADOW and _vapic(eng):
        set_gpr(eng, insn.reg, eng.apic.mov_from_cr8(), 8)  # SDM 30.3: VTPR[7:4]
        _emulated(eng, insn, rip)
        return
    if cr in (0, 4):
        if cr == 0:
            mask, shadow = latched.cr0_mask, latched.cr0_shadow
        else:
            mask, shadow = latched.cr4_mask, latched.cr4_shadow
        if mask:
            # SDM 26.3: reads of CR0/CR4 return the read shadow for bits set in the guest/host mask.
            actual = eng.uc.reg_read(R.UC_X86_REG_CR0 if cr == 0 else R.UC_X86_REG_CR4)
            set_gpr(eng, insn.reg, actual & ~mask | shadow & mask, insn.reg_width)
            _emulated(eng, insn, rip)


def _clts(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    # SDM 26.1.3: CLTS exits if CR0.TS is set in both the guest/host mask and the read shadow.
    if latched.cr0_mask & CR0_TS and latched.cr0_shadow & CR0_TS:
        _cr_exit(eng, insn, rip, linear, CrQualification(0, CrAccessType.CLTS))


def _lmsw(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    address = 0
    if insn.mem is not None:
        address = eng.effective_linear(insn.mem, rip + insn.length)
        try:
            source = int.from_bytes(eng.read_linear(address, 2), "little")
        except Fault:
            return  # the fault reading the operand has priority; Unicorn raises it
    else:
        source = gpr(eng, insn.reg) & 0xFFFF
    mask, shadow = latched.cr0_mask & 0xF, latched.cr0_shadow & 0xF
    # SDM 26.1.3: LMSW exits if a masked bit among CR0[3:0] would change from the shadow's value,
    # or if CR0.PE is masked, clear in the shadow, and set by the source.
    if (source ^ shadow) & mask & 0xE or (mask & 1 and not shadow & 1 and source & 1):
        qualification = CrQualification(0, CrAccessType.LMSW, lmsw_memory=insn.mem is not None,
                                        lmsw_source=source)
        _cr_exit(eng, insn, rip, linear, qualification, linear_address=address)


def _smsw(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if cpl and eng.cr4() & CR4_UMIP:
        return
    if latched.cr0_mask & 0xFFFF and insn.mem is None:
        actual = eng.uc.reg_read(R.UC_X86_REG_CR0)
        value = actual & ~latched.cr0_mask | latched.cr0_shadow & latched.cr0_mask
        set_gpr(eng, insn.reg, value, insn.reg_width)
        _emulated(eng, insn, rip)


def _mov_dr(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int, cpl: int) -> None:
    if latched.proc & ProcBased.MOV_DR_EXITING:
        value = DrQualification(insn.control, insn.op is Op.MOV_FROM_DR, insn.reg).encode()
        _exit(eng, ExitReason.DR_ACCESS, insn, rip, qualification=value,
              exit=Exit(ExitKind.DR_ACCESS, qualification=value), complete=_native_once(eng, linear))


# --- descriptor tables (SDM 26.1.3; instruction information: SDM 28.2.5) ----------------------

_GDTR_IDTR = {Op.SGDT: GdtrIdtrInstruction.SGDT, Op.SIDT: GdtrIdtrInstruction.SIDT,
              Op.LGDT: GdtrIdtrInstruction.LGDT, Op.LIDT: GdtrIdtrInstruction.LIDT}
_LDTR_TR = {Op.SLDT: LdtrTrInstruction.SLDT, Op.STR: LdtrTrInstruction.STR,
            Op.LLDT: LdtrTrInstruction.LLDT, Op.LTR: LdtrTrInstruction.LTR}


def _memory_operand(mem: Memory) -> MemoryOperand:
    return MemoryOperand(segment=SegmentRegister(mem.segment),
                         address_size={16: AddressSize.BITS16, 32: AddressSize.BITS32,
                                       64: AddressSize.BITS64}[mem.address_size],
                         base=mem.base, index=mem.index, scaling=mem.scale.bit_length() - 1)


def _descriptor_table(eng: ModelEngine, latched: Latched, insn: Insn, linear: int, rip: int,
                      cpl: int) -> None:
    if insn.op in (Op.SGDT, Op.SIDT, Op.SLDT, Op.STR) and cpl and eng.cr4() & CR4_UMIP:
        return
    if not latched.proc2 & ProcBased2.DESCRIPTOR_TABLE_EXITING:
        return
    displacement = insn.mem.disp & MASK64 if insn.mem is not None else 0
    address = eng.effective_linear(insn.mem, rip + insn.length) if insn.mem is not None else 0
    if insn.op in _GDTR_IDTR:
        info = GdtrIdtrInfo(_GDTR_IDTR[insn.op], _memory_operand(insn.mem),
                            operand_size_32=insn.operand_size != 16).encode()
        reason = ExitReason.GDTR_IDTR
    else:
        operand = _memory_operand(insn.mem) if insn.mem is not None else insn.reg
        info = LdtrTrInfo(_LDTR_TR[insn.op], operand).encode()
        reason = ExitReason.LDTR_TR
    _exit(eng, reason, insn, rip, qualification=displacement, instruction_info=info,
          linear_address=address,
          exit=Exit(ExitKind.DESCRIPTOR_TABLE, qualification=displacement, detail=insn.text),
          complete=_native_once(eng, linear))


_HANDLERS: dict[Op, Callable[..., None]] = {
    Op.IN: _io, Op.OUT: _io, Op.INS: _io, Op.OUTS: _io,
    Op.CPUID: _cpuid,
    Op.INT: _int,
    Op.GETSEC: _always(ExitReason.GETSEC, "ud", CR4_SMXE),  # no SMX behind it: #UD as KVM does
    Op.INVD: _always(ExitReason.INVD, "skip"),
    Op.XSETBV: _always(ExitReason.XSETBV, "native", CR4_OSXSAVE),
    Op.VMCALL: _always(ExitReason.VMCALL, "skip"),
    Op.VMX: _vmx,
    Op.HLT: _hlt,
    Op.RDTSC: _rdtsc, Op.RDTSCP: _rdtsc,
    Op.RDPMC: _rdpmc,
    Op.MONITOR: _monitor,
    Op.MWAIT: _mwait,
    Op.PAUSE: _when(ProcBased.PAUSE_EXITING, False, ExitReason.PAUSE_INSTRUCTION),
    Op.WBINVD: _when(ProcBased2.WBINVD_EXITING, True, ExitReason.WBINVD),
    Op.RDRAND: _when(ProcBased2.RDRAND_EXITING, True, ExitReason.RDRAND, "native"),
    Op.RDSEED: _when(ProcBased2.RDSEED_EXITING, True, ExitReason.RDSEED, "native"),
    Op.INVLPG: _invlpg,
    Op.RDMSR: _msr, Op.WRMSR: _msr,
    Op.MOV_TO_CR: _mov_to_cr, Op.MOV_FROM_CR: _mov_from_cr, Op.CLTS: _clts, Op.LMSW: _lmsw, Op.SMSW: _smsw,
    Op.MOV_TO_DR: _mov_dr, Op.MOV_FROM_DR: _mov_dr,
    Op.LGDT: _descriptor_table, Op.LIDT: _descriptor_table, Op.SGDT: _descriptor_table,
    Op.SIDT: _descriptor_table, Op.LLDT: _descriptor_table, Op.LTR: _descriptor_table,
    Op.SLDT: _descriptor_table, Op.STR: _descriptor_table,
}

