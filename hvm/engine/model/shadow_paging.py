"""Shadow paging on the VT-x model: ``ModelEngine(paging="shadow")``, the VMM before EPT.

With "enable EPT" off the processor walks one set of tables, so the hypervisor gives it shadow
tables GVA -> HPA (:class:`hvm.vmm.shadow.ShadowMmu`) and must see every event that could make
them stale. :func:`program` sets the VMCS as KVM does without EPT (``vmx.c``: ``!enable_ept``
turns on CR3-load/-store exiting and INVLPG exiting and intercepts #PF):

* "enable EPT" 0, hence "unrestricted guest" 0 (SDM Vol. 3C 27.2.1.1: it requires EPT), hence a
  guest CR0 with PE and PG set (IA32_VMX_CR0_FIXED0, SDM 27.3.1.1). A guest that runs with paging
  off still runs with the real CR0.PG = 1 on an identity shadow, as KVM's "nonpaging" MMU does;
  the CR0 guest/host mask covers all of CR0 and the read shadow holds the guest's value, so every
  MOV to CR0 that changes it is a CR-access VM exit (basic reason 28) and reads see the guest's;
* "CR3-load exiting" and "CR3-store exiting" 1, no CR3-target values: MOV to CR3 is a VM exit
  (reason 28) at which the shadow root for the new CR3 is selected -- from the cache when the
  address space was seen before (:meth:`ShadowMmu.switch`);
* "INVLPG exiting" 1: INVLPG is a VM exit (reason 14); the page's shadow entry is zapped;
* bit 14 (#PF) of the exception bitmap 1 with PFEC mask = match = 0 (SDM 26.2: every #PF exits):
  a page fault on the shadow is a VM exit, basic reason 0 (exception or NMI), qualification the
  faulting linear address. The hypervisor walks the guest's tables: a hidden fault installs the
  shadow entry, a true fault is injected into the guest (#PF, CR2 = the address).

These exits are completed inside the engine, as KVM's kernel MMU completes them: the VMM's run
loop never sees them, ``counters()`` does (``exit_reason.EXCEPTION_NMI``, ``.CR_ACCESS``,
``.INVLPG`` and the ``shadow_*`` statistics). Unicorn's TLB is filled from the shadow tables: a
TLB miss is the processor's walk of the shadow (:meth:`ShadowPaging.translate`); where it finds
no entry allowing the access, the #PF VM exit is taken and the hypervisor's fill runs before the
instruction is retried -- within the same TLB-fill callback, which changes no count.

The model keeps the guest's CR3 value in the CPU's CR3 (the TLB fill, not Unicorn, consults the
shadow root), which is what the CR3-store exit's completion returns.

A guest write to one of its page tables through a linear page whose own walk reads that table (a
self-mapped or recursive page table: PML4[i] -> the PML4) cannot be handled by unprotecting the
page, since the fill that maps it writable walks it and protects it again. The hypervisor then
single-steps the write, as the trap engine does: the #PF VM exit makes that linear page's shadow
entry writable, the engine runs exactly the one instruction (a stop hook after it, as for an MMIO
replay), and the page is write-protected again with every shadow entry built from it zapped
(``shadow_stepped_writes`` counts the instructions). The guest's walk for the write has already
set its accessed and dirty flags, as the processor's would. A control transfer that writes such a
table (a CALL pushing onto it), an MMIO instruction that does, or an instruction that keeps
failing to complete there ends the run with a one-line internal error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as R

from hvm.cpu import CR0_PE, CR0_PG, EFER_LME
from hvm.engine.model.events import GP, PF, Event, Fault
from hvm.engine.model.instructions import VmExit
from hvm.engine.model.vmcs import ExitInfo
from hvm.vmm.shadow import PoolExhausted, ShadowMmu, TablePages
from hvm.vtx.controls import ProcBased, ProcBased2
from hvm.vtx.exit_reasons import ExitReason
from hvm.vtx.paging import Access, PageFault, PagingRegs
from hvm.vtx.qualification import CrAccessType, CrQualification, InterruptionInfo, InterruptionType
from hvm.vtx.vmcs import VmcsField

if TYPE_CHECKING:
    from hvm.cpu import CpuState
    from hvm.engine.model.engine import ModelEngine

F = VmcsField
SHADOW_BASE = 0x7E_0000_0000  # host-physical home of the shadow tables (never mapped into Unicorn)
SHADOW_PAGES = 1024
PAGE = 4096
_P, _RW, _US = 1, 2, 4
_XD = 1 << 63
_PF_PRESENT, _PF_WRITE, _PF_USER, _PF_FETCH = 1, 2, 4, 16
CR0_TS = 1 << 3
_CR0_MASK = 0xFFFF_FFFF  # every CR0 bit is owned by the hypervisor (see the module docstring)


class ShadowUnsupported(Exception):
    """A guest the shadow MMU cannot keep coherent (said in one line)."""


class SelfMappedWrite(Exception):
    """The guest writes a page table through a mapping whose walk reads it: the engine must run
    the instruction alone (:meth:`ShadowPaging.close_writes` after it)."""


def program(vmcs, guest_cr0: int) -> None:
    """Set the VMCS for shadow paging (see the module docstring)."""
    proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
    vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL,
                 proc2 & ~int(ProcBased2.ENABLE_EPT | ProcBased2.UNRESTRICTED_GUEST))
    proc = vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL)
    vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, proc | int(
        ProcBased.CR3_LOAD_EXITING | ProcBased.CR3_STORE_EXITING | ProcBased.INVLPG_EXITING))
    vmcs.vmwrite(F.CR3_TARGET_COUNT, 0)
    vmcs.vmwrite(F.EXCEPTION_BITMAP, vmcs.vmread(F.EXCEPTION_BITMAP) | 1 << PF)
    vmcs.vmwrite(F.PAGE_FAULT_ERROR_CODE_MASK, 0)
    vmcs.vmwrite(F.PAGE_FAULT_ERROR_CODE_MATCH, 0)
    vmcs.vmwrite(F.CR0_GUEST_HOST_MASK, _CR0_MASK)
    vmcs.vmwrite(F.CR0_READ_SHADOW, guest_cr0)


class ShadowPaging:
    """The hypervisor side of shadow paging on one model engine."""

    def __init__(self, eng: ModelEngine) -> None:
        self.eng = eng
        self.tables = TablePages(SHADOW_BASE, SHADOW_PAGES)
        self.mmu = ShadowMmu(self.tables, eng.host, eng.memory.size, self.guest_regs, eng._flush_tlb,
                             pool_base=SHADOW_BASE, pool_pages=SHADOW_PAGES, is_ram=eng.host.is_ram)
        self.hidden_faults = 0  # #PF exits the hypervisor fixed (shadow entry installed)
        self.true_faults = 0  # #PF exits reflected to the guest
        self._reflected: Event | None = None
        self.stepped_writes = 0  # instructions writing through a self-mapped table, single-stepped
        self.stepping = False  # the engine is running one instruction for such a write
        self._opened: set[int] = set()  # table frames writable for that instruction
        program(eng.vmcs, eng.vmcs.vmread(F.GUEST_CR0))

    # --- the guest's view of its paging registers --------------------------------------
    def guest_cr0(self) -> int:
        latched = self.eng.latched
        mask = latched.cr0_mask
        return self.eng.cpu.cr(0) & ~mask | latched.cr0_shadow & mask

    def guest_regs(self) -> PagingRegs:
        cpu = self.eng.cpu  # synced by the caller
        return PagingRegs(self.guest_cr0(), cpu.cr(3), cpu.cr(4), cpu.efer)

    def set_state(self, state: CpuState) -> None:
        """The VMM wrote the guest state: the guest's CR0 goes to the read shadow, the real CR0
        gets PG (a guest CR0 without PE fails VM entry, as without "unrestricted guest")."""
        vmcs = self.eng.vmcs
        vmcs.vmwrite(F.CR0_READ_SHADOW, state.cr0)
        vmcs.vmwrite(F.GUEST_CR0, state.cr0 | CR0_PG if state.cr0 & CR0_PE else state.cr0)

    def view(self, state: CpuState) -> CpuState:
        """A saved CPU state as the guest sees it (its own CR0)."""
        state.cr0 = self.guest_cr0()
        return state

    def write_cr0(self, value: int) -> None:
        """The hypervisor completes a guest MOV to CR0: read shadow = the value, real CR0 = value
        with PG. Paging turned on with EFER.LME = 1 activates IA-32e mode (SDM Vol. 3A 10.8.5):
        the real CR0.PG goes 0 -> 1 so that the processor (QEMU's update_cr0) sets EFER.LMA."""
        eng = self.eng
        eng.vmcs.store(F.CR0_READ_SHADOW, value)
        old = eng.latched.cr0_shadow
        eng.latched.cr0_shadow = value
        uc = eng.uc
        real = value | CR0_PG if value & CR0_PE else value
        if value & CR0_PG and not old & CR0_PG and uc.msr_read(0xC000_0080) & EFER_LME:
            uc.reg_write(R.UC_X86_REG_CR0, real & ~CR0_PG)
        uc.reg_write(R.UC_X86_REG_CR0, real)
        eng._flush_tlb()

    # --- the processor's TLB fill --------------------------------------------------------
    def translate(self, la: int, access: Access, user: bool, replaying: bool) -> tuple[int, int | None]:
        """A TLB miss at ``la``: (guest-physical page, shadow leaf entry), or (page, None) when the
        guest maps ``la`` to a guest-physical address outside RAM (the VMM's MMIO). Raises
        :class:`Fault` for the guest's own #PF (or #GP), after the #PF VM exit that found it."""
        mmu = self.mmu
        entry = mmu.lookup(la, access, user)
        if entry is not None:
            return entry & 0x000F_FFFF_FFFF_F000, entry
        frame = mmu.frame_of(la)
        code = ((_PF_PRESENT if frame is not None else 0) | (_PF_WRITE if access is Access.WRITE else 0)
                | (_PF_USER if user else 0) | (_PF_FETCH if access is Access.FETCH else 0))
        try:
            fill = mmu.fill(la, access, user)
        except ValueError:
            raise Fault(GP, 0) from None  # a non-canonical address, or a bad PDPTE
        if fill.not_ram is not None:
            # MMIO: the engine reports this #PF VM exit itself, as the VMM's mmio exit (reason 0)
            return fill.not_ram & ~(PAGE - 1), None
        if not replaying:  # an MMIO replay re-runs an instruction whose fault was already taken
            self._exit(la, code)
        if fill.fault is not None:
            return self._true_fault(la, fill.fault)
        entry = mmu.lookup(la, access, user)
        if entry is None and access is Access.WRITE and mmu.protected.get(fill.frame) == "page table":
            if fill.frame in fill.tables:
                return self._self_mapped_write(la, fill.frame, replaying)
            mmu.write_fault(fill.frame)  # unprotect and resync (see hvm.vmm.shadow)
            fill = mmu.fill(la, access, user)
            entry = mmu.lookup(la, access, user)
        if entry is None:
            raise ShadowUnsupported(f"shadow fill at {la:#x} gave no usable entry")
        self.hidden_faults += 1
        return fill.frame, entry

    def _self_mapped_write(self, la: int, frame: int, replaying: bool) -> tuple[int, int]:
        """A write to page table ``frame`` through a linear page whose own walk reads ``frame`` (a
        self-mapped or recursive table). Unprotecting the page cannot work (the fill that makes it
        writable walks it, which protects it again), so the hypervisor single-steps the write, as the
        trap engine does: this linear page's shadow entry is writable for exactly one instruction,
        after which :meth:`close_writes` protects the page again and zaps every shadow entry built
        from it. Outside that step raises :class:`SelfMappedWrite` (the engine runs the instruction
        alone); inside it (a write spanning two such pages) the second page opens too."""
        if replaying:
            raise ShadowUnsupported(f"an MMIO instruction writes page table {frame:#x} through a "
                                    "self-mapped table: not modelled")
        entry = self.mmu.open_leaf(la, frame)
        if entry is None:
            raise ShadowUnsupported(f"shadow fill at {la:#x} gave no entry for page table {frame:#x}")
        self.hidden_faults += 1
        self._opened.add(frame)
        if not self.stepping:
            raise SelfMappedWrite(la)
        return frame, entry

    def close_writes(self, stepped: bool = True) -> None:
        """After the single-stepped instruction (``stepped``; or instead of it): write-protect every
        page opened for it again and zap the shadow entries walked through it
        (:meth:`ShadowMmu.reprotect`)."""
        self.stepping = False
        self.stepped_writes += bool(stepped and self._opened)
        for frame in sorted(self._opened):
            self.mmu.reprotect(frame)
        self._opened.clear()

    def _exit(self, la: int, code: int) -> None:
        """The #PF on the shadow is a VM exit (reason 0), completed here by the hypervisor."""
        info = InterruptionInfo(PF, InterruptionType.HARDWARE_EXCEPTION, error_code_valid=True).encode()
        self.eng._vm_exit(VmExit(ExitReason.EXCEPTION_NMI, ExitInfo(
            int(ExitReason.EXCEPTION_NMI), la, interruption_info=info, interruption_error_code=code), None))

    def _true_fault(self, la: int, fault: PageFault) -> tuple[int, int | None]:
        self.true_faults += 1
        error = Fault(PF, int(fault.error_code), cr2=la)
        self._reflected = error.event
        raise error

    def reflected(self, event: Event) -> bool:
        """Is ``event`` the true #PF the hypervisor is reflecting (to deliver, not to exit on)?"""
        if event is self._reflected:
            self._reflected = None
            return True
        return False

    def guest_walk(self, la: int, access: Access, user: bool) -> int:
        """Guest-linear -> guest-physical through the guest's tables (the engine's own accesses)."""
        try:
            result = self.mmu.walk_guest(la, access, user)
        except ValueError:
            raise Fault(GP, 0) from None
        if isinstance(result, PageFault):
            raise Fault(PF, int(result.error_code), cr2=la)
        return result.address

    # --- the exits the hypervisor completes itself --------------------------------------
    def complete_in_engine(self, vmexit: VmExit) -> VmExit | None:
        """A CR0/CR3 access or INVLPG exit: the same exit, completed here (None: not ours)."""
        reason = vmexit.reason
        original = vmexit.complete
        if reason is ExitReason.CR_ACCESS:
            qualification = CrQualification.decode(vmexit.info.qualification)
            if qualification.cr not in (0, 3):
                return None
            kind = qualification.access_type
            switches = kind is not CrAccessType.MOV_FROM_CR  # the registers changed
            if kind in (CrAccessType.CLTS, CrAccessType.LMSW):
                # The guest's CR0 lives in the read shadow: CLTS and LMSW change it there (SDM Vol. 2).
                length = vmexit.info.instruction_length
                source = qualification.lmsw_source

                def original(_: bytes, kind: CrAccessType = kind) -> None:
                    cr0 = self.guest_cr0()
                    if kind is CrAccessType.CLTS:
                        cr0 &= ~CR0_TS
                    else:  # LMSW loads CR0[3:0] but cannot clear PE
                        cr0 = cr0 & ~0xE | source & 0xF
                    self.write_cr0(cr0)
                    rip = self.eng.uc.reg_read(R.UC_X86_REG_RIP)
                    self.eng.uc.reg_write(R.UC_X86_REG_RIP, rip + length)

            def complete(data: bytes) -> None:
                if original is not None:
                    original(data)
                if switches:
                    self.eng.cpu.sync()
                    self.mmu.switch()
        elif reason is ExitReason.INVLPG:
            address = vmexit.info.qualification

            def complete(data: bytes) -> None:
                if original is not None:
                    original(data)
                self.eng.cpu.sync()
                self.mmu.invlpg(address)
        else:
            return None
        return VmExit(reason, vmexit.info, None, complete)

    def guest_wrote(self, hpa: int) -> None:
        self.mmu.guest_wrote(hpa)

    def counters(self) -> dict[str, int]:
        stats = self.mmu.stats
        return {"shadow_hidden_faults": self.hidden_faults, "shadow_true_faults": self.true_faults,
                "shadow_stepped_writes": self.stepped_writes,
                "shadow_fills": stats.fills, "shadow_protected_writes": stats.protected_writes,
                "shadow_zapped": stats.zapped, "shadow_invlpg": stats.invlpg,
                "shadow_cr3_switches": stats.cr3_switches, "shadow_root_hits": stats.root_hits,
                "shadow_root_misses": stats.root_misses, "shadow_evictions": stats.evictions,
                "shadow_drops": stats.drops, "shadow_cached_roots": self.mmu.cached_roots}


__all__ = ["SHADOW_BASE", "PoolExhausted", "SelfMappedWrite", "ShadowPaging", "ShadowUnsupported", "program"]
