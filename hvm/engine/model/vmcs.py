"""The model processor's current VMCS: guest-state sync, VM-entry guest-state checks, defaults.

:class:`ModelVmcs` is :class:`hvm.vtx.vmcs.VMCS` as a processor holds it while a guest runs.
The SDM lets a processor keep the current VMCS's data in processor-specific form and write it
to the VMCS region only when it must (SDM Vol. 3C 25.11.1); VMREAD and VMWRITE are how software
sees it. The model does the same: at a VM exit it records the exit-information fields and marks
the guest-state area as held by the processor; the first VMREAD or VMWRITE afterwards writes
guest state and exit information into the fields (the processor "saves guest state into the
guest-state area", SDM 29.3), so software always reads what a VM exit saved. A VMWRITE to a
guest-state or control field marks it, and the next VM entry checks and loads it (SDM 28.2-28.3).
An exit that software never inspects therefore costs no field writes.

Register state that VT-x does not keep in the VMCS (the general registers other than RSP) is,
as for any VMX hypervisor, kept by the VMM: here in the Unicorn CPU itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hvm.cpu import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, GPRS, CpuState, DescriptorTable, Segment
from hvm.vtx.capabilities import MODEL_CAPS
from hvm.vtx.controls import Controls, EntryControls, ExitControls, PinBased, ProcBased, ProcBased2
from hvm.vtx.vmcs import VMCS, VmcsField

F = VmcsField

# --- field groups (SDM Appendix B) ----------------------------------------------------------
_SEGMENT_FIELDS = {
    "es": (F.GUEST_ES_SELECTOR, F.GUEST_ES_BASE, F.GUEST_ES_LIMIT, F.GUEST_ES_AR_BYTES),
    "cs": (F.GUEST_CS_SELECTOR, F.GUEST_CS_BASE, F.GUEST_CS_LIMIT, F.GUEST_CS_AR_BYTES),
    "ss": (F.GUEST_SS_SELECTOR, F.GUEST_SS_BASE, F.GUEST_SS_LIMIT, F.GUEST_SS_AR_BYTES),
    "ds": (F.GUEST_DS_SELECTOR, F.GUEST_DS_BASE, F.GUEST_DS_LIMIT, F.GUEST_DS_AR_BYTES),
    "fs": (F.GUEST_FS_SELECTOR, F.GUEST_FS_BASE, F.GUEST_FS_LIMIT, F.GUEST_FS_AR_BYTES),
    "gs": (F.GUEST_GS_SELECTOR, F.GUEST_GS_BASE, F.GUEST_GS_LIMIT, F.GUEST_GS_AR_BYTES),
    "ldt": (F.GUEST_LDTR_SELECTOR, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT, F.GUEST_LDTR_AR_BYTES),
    "tr": (F.GUEST_TR_SELECTOR, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT, F.GUEST_TR_AR_BYTES),
}
_CONTROL_TYPE, _GUEST_STATE_TYPE = 0, 2  # encoding bits 11:10 (SDM 25.11.2)

# Activity states (SDM 25.4.2)
ACTIVE, HLT_STATE, SHUTDOWN_STATE, WAIT_FOR_SIPI = 0, 1, 2, 3

# CR0/CR4 bits a guest may not hold in VMX non-root operation: IA32_VMX_CR0_FIXED0/1, CR4_FIXED0/1
# (SDM A.7-A.8). Hardware fixes CR0.NE and CR4.VMXE to 1 as well; the model does not, so guests
# need no read-shadow tricks for them (a documented simplification). PE and PG may be 0 with
# "unrestricted guest" (SDM 27.3.1.1).
CR0_FIXED0 = CR0_PE | CR0_PG
CR0_FIXED1 = 0xFFFF_FFFF
CR4_FIXED0 = 0
CR4_FIXED1 = 0x0037_37FF  # VME..OSXMMEXCPT, LA57, UMIP, VMXE, SMXE, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP


def access_rights(seg: Segment) -> int:
    """Segment access-rights field (SDM 25.4.1, table "Format of Access Rights")."""
    return (seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7 | seg.avl << 12 | seg.l << 13
            | seg.db << 14 | seg.g << 15 | seg.unusable << 16)


def segment_from(selector: int, base: int, limit: int, ar: int) -> Segment:
    return Segment(selector=selector, base=base, limit=limit, type=ar & 0xF, s=ar >> 4 & 1,
                   dpl=ar >> 5 & 3, present=ar >> 7 & 1, avl=ar >> 12 & 1, l=ar >> 13 & 1,
                   db=ar >> 14 & 1, g=ar >> 15 & 1, unusable=ar >> 16 & 1)


@dataclass(frozen=True)
class ExitInfo:
    """The VM-exit information fields one exit writes (SDM 25.9)."""

    reason: int  # basic exit reason, plus bit 31 for a VM-entry failure
    qualification: int = 0
    instruction_length: int = 0
    instruction_info: int = 0
    guest_linear_address: int = 0
    guest_physical_address: int = 0
    interruption_info: int = 0
    interruption_error_code: int = 0
    idt_vectoring_info: int = 0
    idt_vectoring_error_code: int = 0


class ModelVmcs(VMCS):
    """The current VMCS, with guest state and exit information written back on first access."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: Callable[[], None] | None = None
        self.guest_written = False
        self.controls_written = True
        self.injection_written = False  # VM-entry interruption information (SDM 25.8.3)

    def hold(self, writeback: Callable[[], None]) -> None:
        """Processor side: guest state and exit information are held until software looks."""
        self._pending = writeback

    def writeback(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending()

    def vmread(self, encoding: int) -> int:
        self.writeback()
        return super().vmread(encoding)

    def vmwrite(self, encoding: int, value: int) -> None:
        self.writeback()
        super().vmwrite(encoding, value)
        kind = encoding >> 10 & 3
        if encoding == F.VM_ENTRY_INTR_INFO_FIELD:
            self.injection_written = True
        if kind == _GUEST_STATE_TYPE:
            self.guest_written = True
        elif kind == _CONTROL_TYPE:
            self.controls_written = True

    def peek(self, encoding: int) -> int:
        """Processor side: read a field as it stands, without writing back held state."""
        return super().vmread(encoding)

    def store(self, encoding: int, value: int) -> None:
        """Processor side: write a field without marking it (the processor saving guest state)."""
        super().vmwrite(encoding, value)

    def record_exit(self, info: ExitInfo) -> None:
        """Processor side: the VM-exit information fields (SDM 29.2)."""
        set_info = self.set_exit_info
        set_info(F.VM_EXIT_REASON, info.reason)
        set_info(F.EXIT_QUALIFICATION, info.qualification)
        set_info(F.VM_EXIT_INSTRUCTION_LEN, info.instruction_length)
        set_info(F.VMX_INSTRUCTION_INFO, info.instruction_info)
        set_info(F.GUEST_LINEAR_ADDRESS, info.guest_linear_address)
        set_info(F.GUEST_PHYSICAL_ADDRESS, info.guest_physical_address)
        set_info(F.VM_EXIT_INTR_INFO, info.interruption_info)
        set_info(F.VM_EXIT_INTR_ERROR_CODE, info.interruption_error_code)
        set_info(F.IDT_VECTORING_INFO_FIELD, info.idt_vectoring_info)
        set_info(F.IDT_VECTORING_ERROR_CODE, info.idt_vectoring_error_code)


def save_guest_state(vmcs: ModelVmcs, state: CpuState, activity: int = ACTIVE) -> None:
    """Processor side of a VM exit: the guest-state area from ``state`` (SDM 29.3)."""
    store = vmcs.store
    for name, (sel, base, limit, ar) in _SEGMENT_FIELDS.items():
        seg: Segment = getattr(state, name)
        store(sel, seg.selector)
        store(base, seg.base)
        store(limit, seg.limit)
        store(ar, access_rights(seg))
    store(F.GUEST_GDTR_BASE, state.gdt.base)
    store(F.GUEST_GDTR_LIMIT, state.gdt.limit)
    store(F.GUEST_IDTR_BASE, state.idt.base)
    store(F.GUEST_IDTR_LIMIT, state.idt.limit)
    store(F.GUEST_CR0, state.cr0)
    store(F.GUEST_CR3, state.cr3)
    store(F.GUEST_CR4, state.cr4)
    store(F.GUEST_IA32_EFER, state.efer)
    store(F.GUEST_RSP, state.regs["rsp"])
    store(F.GUEST_RIP, state.rip)
    store(F.GUEST_RFLAGS, state.rflags)
    store(F.GUEST_ACTIVITY_STATE, activity)
    # SDM 29.3.4: "IA-32e mode guest" is saved as EFER.LMA (the VM-exit "save" of the entry control).
    entry = vmcs.peek(F.VM_ENTRY_CONTROLS)
    lma = EntryControls.IA32E_MODE_GUEST if state.efer & EFER_LMA else 0
    store(F.VM_ENTRY_CONTROLS, entry & ~EntryControls.IA32E_MODE_GUEST | lma)


def write_guest_state(vmcs: ModelVmcs, state: CpuState) -> None:
    """Software side (a VMM's set-registers call): every guest-state field from ``state``."""
    save_guest_state(vmcs, state)
    vmcs.guest_written = True
    vmcs.controls_written = True  # the IA-32e mode guest entry control follows EFER.LMA


def load_guest_state(vmcs: VMCS, regs: dict[str, int]) -> CpuState:
    """The state VM entry loads (SDM 28.3.2); ``regs`` holds the GPRs the VMCS does not."""
    read = vmcs.vmread
    state = CpuState()
    state.regs = {name: regs.get(name, 0) for name in GPRS}
    state.regs["rsp"] = read(F.GUEST_RSP)
    for name, (sel, base, limit, ar) in _SEGMENT_FIELDS.items():
        setattr(state, name, segment_from(read(sel), read(base), read(limit), read(ar)))
    state.gdt = DescriptorTable(read(F.GUEST_GDTR_BASE), read(F.GUEST_GDTR_LIMIT))
    state.idt = DescriptorTable(read(F.GUEST_IDTR_BASE), read(F.GUEST_IDTR_LIMIT))
    state.cr0, state.cr3, state.cr4 = read(F.GUEST_CR0), read(F.GUEST_CR3), read(F.GUEST_CR4)
    state.rip, state.rflags = read(F.GUEST_RIP), read(F.GUEST_RFLAGS)
    entry = read(F.VM_ENTRY_CONTROLS)
    if entry & EntryControls.LOAD_EFER:
        state.efer = read(F.GUEST_IA32_EFER)
    else:
        # SDM 28.3.2.1: without "load IA32_EFER", LMA and LME follow "IA-32e mode guest".
        lm = EFER_LMA | EFER_LME if entry & EntryControls.IA32E_MODE_GUEST else 0
        state.efer = read(F.GUEST_IA32_EFER) & ~(EFER_LMA | EFER_LME) | lm
    return state


# --- VM-entry checks on the guest-state area (SDM 27.3.1) ----------------------------------

# SDM 27.3.1.4: RFLAGS bits 63:22, 15, 5 and 3 are reserved (must be 0); bit 1 must be 1.
_RFLAGS_RESERVED0 = (((1 << 64) - 1) & ~((1 << 22) - 1)) | 1 << 15 | 1 << 5 | 1 << 3
_RFLAGS_VM, _RFLAGS_IF = 1 << 17, 1 << 9


def _canonical(address: int) -> bool:
    top = address >> 47
    return top in (0, (1 << 17) - 1)


def _limit_granularity_ok(seg: Segment) -> bool:
    # SDM 27.3.1.2: if any of limit bits 11:0 is 0, G must be 0; if any of bits 31:20 is 1, G must be 1.
    if seg.limit & 0xFFF != 0xFFF and seg.g:
        return False
    return not (seg.limit >> 20 and not seg.g)


def check_guest_state(state: CpuState, vmcs: VMCS, controls: Controls) -> str | None:
    """The first guest-state rule ``state`` breaks (SDM 27.3.1), as "SDM <section>: <rule>", or None."""
    unrestricted = bool(controls.proc2 & ProcBased2.UNRESTRICTED_GUEST)
    ia32e = bool(controls.entry & EntryControls.IA32E_MODE_GUEST)
    fixed0 = CR0_FIXED0 & ~(CR0_PE | CR0_PG) if unrestricted else CR0_FIXED0
    cr0, cr4 = state.cr0, state.cr4
    # 27.3.1.1 control registers and MSRs
    if cr0 & fixed0 != fixed0 or cr0 & ~CR0_FIXED1 & 0xFFFF_FFFF or cr0 >> 32:
        return "SDM 27.3.1.1: CR0 must have the bits IA32_VMX_CR0_FIXED0/1 fix"
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        return "SDM 27.3.1.1: with CR0.PG = 1, CR0.PE must be 1"
    if cr4 & CR4_FIXED0 != CR4_FIXED0 or cr4 & ~CR4_FIXED1:
        return "SDM 27.3.1.1: CR4 must have the bits IA32_VMX_CR4_FIXED0/1 fix"
    if ia32e and not (cr0 & CR0_PG and cr4 & CR4_PAE):
        return "SDM 27.3.1.1: an IA-32e mode guest needs CR0.PG = 1 and CR4.PAE = 1"
    if not ia32e and cr4 & (1 << 17):
        return "SDM 27.3.1.1: outside IA-32e mode, CR4.PCIDE must be 0"
    if state.cr3 >> MODEL_CAPS.phys_addr_width:
        return "SDM 27.3.1.1: CR3 bits beyond the physical-address width must be 0"
    if controls.entry & EntryControls.LOAD_EFER:
        efer = state.efer
        if bool(efer & EFER_LMA) != ia32e:
            return "SDM 27.3.1.1: with \"load IA32_EFER\", EFER.LMA must equal \"IA-32e mode guest\""
        if cr0 & CR0_PG and bool(efer & EFER_LME) != bool(efer & EFER_LMA):
            return "SDM 27.3.1.1: with CR0.PG = 1, EFER.LME must equal EFER.LMA"
    # 27.3.1.2 segment registers
    cs, ss, tr, ldt = state.cs, state.ss, state.tr, state.ldt
    vm86 = bool(state.rflags & _RFLAGS_VM)
    if tr.selector & 4:
        return "SDM 27.3.1.2: TR's TI flag must be 0"
    if not ldt.unusable and ldt.selector & 4:
        return "SDM 27.3.1.2: a usable LDTR's TI flag must be 0"
    if not vm86 and not unrestricted and (ss.selector & 3) != (cs.selector & 3):
        return "SDM 27.3.1.2: SS.RPL must equal CS.RPL"
    if not vm86:
        if cs.type not in (9, 11, 13, 15) and not (unrestricted and cs.type == 3):
            return "SDM 27.3.1.2: CS must be an accessed code segment (or type 3 with \"unrestricted guest\")"
        if not cs.s or not cs.present:
            return "SDM 27.3.1.2: CS must be a present code or data segment (S = 1, P = 1)"
        if not _limit_granularity_ok(cs):
            return "SDM 27.3.1.2: CS limit and granularity disagree"
        if ia32e and cs.l and cs.db:
            return "SDM 27.3.1.2: a 64-bit CS (L = 1) must have D/B = 0"
        if cs.type == 3 and cs.dpl != 0:
            return "SDM 27.3.1.2: a type-3 CS must have DPL 0"
        if cs.type in (9, 11) and cs.dpl != ss.dpl:
            return "SDM 27.3.1.2: a non-conforming CS must have DPL = SS.DPL"
        if not ss.unusable:
            if ss.type not in (3, 7) or not ss.s or not ss.present:
                return "SDM 27.3.1.2: a usable SS must be a present read/write data segment"
            if not _limit_granularity_ok(ss):
                return "SDM 27.3.1.2: SS limit and granularity disagree"
        if not unrestricted and ss.dpl != (ss.selector & 3):
            return "SDM 27.3.1.2: SS.DPL must equal SS.RPL"
        if not cr0 & CR0_PE and ss.dpl != 0:
            return "SDM 27.3.1.2: with CR0.PE = 0, SS.DPL must be 0"
        for name in ("ds", "es", "fs", "gs"):
            seg: Segment = getattr(state, name)
            if seg.unusable:
                continue
            if not seg.type & 1 or not seg.s or not seg.present:
                return (f"SDM 27.3.1.2: a usable {name.upper()} must be an accessed, present segment "
                        "with S = 1")
            if seg.type & 8 and not seg.type & 2:
                return f"SDM 27.3.1.2: a code segment in {name.upper()} must be readable"
            if not _limit_granularity_ok(seg):
                return f"SDM 27.3.1.2: {name.upper()} limit and granularity disagree"
    for name in ("fs", "gs", "ldt", "tr"):
        if not _canonical(getattr(state, name).base):
            return f"SDM 27.3.1.2: the {name.upper()} base must be canonical"
    if not ia32e and tr.type not in (3, 11) or ia32e and tr.type != 11:
        return "SDM 27.3.1.2: TR must be a busy TSS (type 11, or 3 outside IA-32e mode)"
    if tr.s or not tr.present or tr.unusable or not _limit_granularity_ok(tr):
        return "SDM 27.3.1.2: TR must be a usable, present system segment"
    if not ldt.unusable and (ldt.type != 2 or ldt.s or not ldt.present):
        return "SDM 27.3.1.2: a usable LDTR must be a present LDT descriptor"
    # 27.3.1.3 descriptor-table registers
    for name, table in (("GDTR", state.gdt), ("IDTR", state.idt)):
        if not _canonical(table.base) or table.limit >> 16:
            return f"SDM 27.3.1.3: the {name} base must be canonical and its limit fit 16 bits"
    # 27.3.1.4 RIP and RFLAGS
    if not (ia32e and cs.l) and state.rip >> 32:
        return "SDM 27.3.1.4: outside 64-bit mode, RIP bits 63:32 must be 0"
    if state.rflags & _RFLAGS_RESERVED0 or not state.rflags & 2:
        return "SDM 27.3.1.4: RFLAGS reserved bits must be 0 (bit 1 must be 1)"
    if (ia32e or not cr0 & CR0_PE) and vm86:
        return "SDM 27.3.1.4: RFLAGS.VM must be 0 in IA-32e mode or with CR0.PE = 0"
    # 27.3.1.5 non-register state
    activity = vmcs.vmread(F.GUEST_ACTIVITY_STATE)
    if activity > WAIT_FOR_SIPI:
        return "SDM 27.3.1.5: the activity state must be 0-3"
    if activity == HLT_STATE and ss.dpl != 0:
        return "SDM 27.3.1.5: the HLT activity state needs SS.DPL = 0"
    if vmcs.vmread(F.GUEST_INTERRUPTIBILITY_INFO) >> 5:
        return "SDM 27.3.1.5: interruptibility-state bits 31:5 must be 0"
    # 27.3.1.6 VMCS link pointer (no VMCS shadowing in this model)
    if vmcs.vmread(F.VMCS_LINK_POINTER) != (1 << 64) - 1:
        return "SDM 27.3.1.6: the VMCS link pointer must be FFFFFFFF_FFFFFFFFH"
    return None


# --- the defaults a KVM-like hypervisor programs ---------------------------------------------

#: Primary controls as KVM sets them on a VMX host with EPT (arch/x86/kvm/vmx/vmx.c,
#: vmx_exec_control): HLT, MWAIT, MONITOR and RDPMC exit, every I/O instruction exits,
#: MSR bitmaps decide MSR accesses, the TSC is offset, MOV DR exits, and CR3 accesses and
#: INVLPG do not exit because EPT virtualizes paging.
DEFAULT_PROC = (ProcBased.HLT_EXITING | ProcBased.MWAIT_EXITING | ProcBased.MONITOR_EXITING
                | ProcBased.RDPMC_EXITING | ProcBased.UNCONDITIONAL_IO_EXITING | ProcBased.USE_MSR_BITMAPS
                | ProcBased.USE_TSC_OFFSETTING | ProcBased.MOV_DR_EXITING
                | ProcBased.ACTIVATE_SECONDARY_CONTROLS)
DEFAULT_PROC2 = (ProcBased2.ENABLE_EPT | ProcBased2.ENABLE_RDTSCP | ProcBased2.UNRESTRICTED_GUEST
                 | ProcBased2.ENABLE_VPID | ProcBased2.ENABLE_INVPCID)
DEFAULT_PIN = PinBased.EXTERNAL_INTERRUPT_EXITING | PinBased.NMI_EXITING
DEFAULT_EXIT = (ExitControls.HOST_ADDRESS_SPACE_SIZE | ExitControls.ACK_INTERRUPT_ON_EXIT
                | ExitControls.SAVE_EFER | ExitControls.LOAD_EFER)
DEFAULT_ENTRY = EntryControls.LOAD_EFER


def program_defaults(vmcs: VMCS, *, eptp: int, msr_bitmap: int, io_bitmap_a: int, io_bitmap_b: int) -> None:
    """Write the KVM-like default controls (adjusted to the model's capability MSRs)."""
    caps = MODEL_CAPS
    write = vmcs.vmwrite
    write(F.PIN_BASED_VM_EXEC_CONTROL, caps.true_pinbased_ctls.adjust(DEFAULT_PIN))
    write(F.CPU_BASED_VM_EXEC_CONTROL, caps.true_procbased_ctls.adjust(DEFAULT_PROC))
    write(F.SECONDARY_VM_EXEC_CONTROL, caps.procbased_ctls2.adjust(DEFAULT_PROC2))
    write(F.VM_EXIT_CONTROLS, caps.true_exit_ctls.adjust(DEFAULT_EXIT))
    write(F.VM_ENTRY_CONTROLS, caps.true_entry_ctls.adjust(DEFAULT_ENTRY))
    write(F.EXCEPTION_BITMAP, 0)
    write(F.EPT_POINTER, eptp)
    write(F.VIRTUAL_PROCESSOR_ID, 1)
    write(F.MSR_BITMAP, msr_bitmap)
    write(F.IO_BITMAP_A, io_bitmap_a)
    write(F.IO_BITMAP_B, io_bitmap_b)
    write(F.TSC_OFFSET, 0)
    write(F.TSC_MULTIPLIER, 1 << 48)
    write(F.CR3_TARGET_COUNT, 0)
    write(F.VMCS_LINK_POINTER, (1 << 64) - 1)
    write(F.GUEST_ACTIVITY_STATE, ACTIVE)
    write(F.GUEST_INTERRUPTIBILITY_INFO, 0)
