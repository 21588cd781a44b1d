"""The model engine's local APIC: legacy interrupt injection or APICv (``ModelEngine(apic=...)``).

The hypervisor side of one vCPU's local APIC, as KVM keeps it in the kernel: a
:class:`~hvm.vtx.apic.LocalApic` whose timer runs from the guest TSC, and the
exits the APIC causes handled inside the engine (they count in the engine's
exit counters by SDM reason, not in the VMM's ledger). Two modes:

``legacy`` (no APIC virtualization)
    The xAPIC page at 0xFEE00000 is not in EPT: every guest access to it is an
    EPT violation (reason 48) that the hypervisor emulates on the LocalApic;
    IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC MSRs exit through the MSR
    bitmap (31/32). An interrupt the LocalApic has pending is injected at VM
    entry through the VM-entry interruption-information field (SDM Vol. 3C
    27.6); when RFLAGS.IF is 0 or an STI/MOV SS blocks, the hypervisor sets
    "interrupt-window exiting" and injects at the interrupt-window exit (7).
    A timer expiry while the guest runs is a host interrupt, so an
    external-interrupt exit (1).

``apicv`` (SDM Vol. 3C chapter 30, :mod:`hvm.vtx.apicv`)
    "use TPR shadow", "virtualize APIC accesses", "APIC-register
    virtualization", "virtual-interrupt delivery" and "process posted
    interrupts". The LocalApic's register page *is* the virtual-APIC page (as
    KVM's ``apic->regs``). Guest accesses to the APIC page are virtualized:
    reads and TPR/EOI/self-IPI writes take no exit; the rest exit as APIC access
    (44) or APIC write (56) and the hypervisor emulates them. Timer interrupts
    are posted: PIR bit and ON set in the posted-interrupt descriptor and the
    notification processed as SDM 30.6 says, without a VM exit (as with KVM's
    ``pi_inject_timer``, the timer firing on another host CPU), and delivered
    through RVI/SVI virtual-interrupt delivery (30.2).

Where the model stands in for hardware: the guest-physical APIC page stays out
of EPT in both modes, so the EPT violation is where the model processor checks
whether the access is to the APIC-access page (the VMCS APIC-access address is
a page of the model's own). Blocking by STI is tracked while an interrupt waits
for its window; at other instruction boundaries an STI right before RIP (byte
0xFB) is taken to block, which can only delay an injection by one instruction.
CR8 is the TPR's other name in 64-bit mode (SDM Vol. 3A 11.8.6): ``legacy`` sets
"CR8-load exiting" and "CR8-store exiting" (as KVM does without a TPR shadow)
and emulates the control-register exits (28) on the LocalApic; ``apicv``
virtualizes MOV to/from CR8 through VTPR (SDM 30.3).

x2APIC mode (SDM Vol. 3A 11.12; CPUID reports it when the APIC is on): ``legacy``
keeps every x2APIC MSR access exiting (31/32) and emulates it on the LocalApic.
``apicv`` follows the guest's switch through IA32_APIC_BASE.EXTD as KVM does:
"virtualize x2APIC mode" replaces "virtualize APIC accesses" and the MSR bitmap
lets through RDMSR of the readable registers (not the current count) and WRMSR
of TPR, EOI and SELF IPI, which the processor virtualizes on the virtual-APIC
page (SDM Vol. 3C 30.5); the other writes exit (32) and are emulated.
An I/O APIC (:mod:`hvm.devices.ioapic`, :meth:`ApicSupport.attach_ioapic`) delivers device interrupts
to this LocalApic: ``legacy`` into the IRR (with the TMR bit for level-triggered ones, whose EOI then
reaches the I/O APIC as an EOI message, SDM Vol. 3A 11.8.5); ``apicv`` posts them, and as KVM does
(its IOAPIC scan) sets the EOI-exit bitmap bit of every level-triggered vector, so that the guest's
EOI of it is an EOI-induced VM exit (45, SDM Vol. 3C 30.1.4) the hypervisor forwards to the I/O APIC.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from unicorn import UC_HOOK_CODE
from unicorn import x86_const as R

from hvm.engine.model.events import GP, Event
from hvm.engine.model.instructions import VmExit, set_gpr
from hvm.engine.model.vmcs import ExitInfo
from hvm.exits import Exit
from hvm.vtx.apic import (
    MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
    TIMER_CCR,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
    ApicGP,
    LocalApic,
    x2apic_offset,
    x2apic_readable,
)
from hvm.vtx.apicv import ApicvControls, ApicvExit, PostedInterruptDescriptor, VirtualApic, VirtualApicPage
from hvm.vtx.bitmaps import MsrBitmap
from hvm.vtx.controls import ExitControls, PinBased, ProcBased, ProcBased2
from hvm.vtx.exit_reasons import ExitReason
from hvm.vtx.qualification import CrAccessType, CrQualification, InterruptionInfo, InterruptionType
from hvm.vtx.vmcs import VmcsField

if TYPE_CHECKING:
    from hvm.engine.model.engine import ModelEngine, _MmioStep

F = VmcsField
MODES = ("off", "legacy", "apicv")
#: Posted-interrupt notification vector: Linux's POSTED_INTR_VECTOR (arch/x86/include/asm/irq_vectors.h).
NOTIFICATION_VECTOR = 0xF2
RFLAGS_IF = 1 << 9
_STI = 0xFB
_POLL_FLOOR = 0.0003  # s: the guest must get time to run between host timer stops
_POLL_CEILING = 0.02  # s: how long the timer thread sleeps when nothing is armed


#: x2APIC MSRs whose WRMSR KVM lets the processor virtualize (vmx_update_msr_bitmap_x2apic): TPR, EOI
#: and SELF IPI, the ones SDM Vol. 3C 30.5 virtualizes with "virtual-interrupt delivery".
_X2APIC_WRITES_VIRTUALIZED = frozenset({0x808, 0x80B, 0x83F})
#: CPUID.01H:ECX[21]: x2APIC (SDM Vol. 2A, CPUID).
CPUID_1_ECX_X2APIC = 1 << 21


class _X2apicCpuid:
    """The engine's CPUID answers with the x2APIC feature bit: the local APIC here implements x2APIC mode
    (as KVM reports X2APIC whenever it emulates the local APIC in the kernel)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        eax, ebx, ecx, edx = self.policy(leaf, subleaf)
        if leaf == 1:
            ecx |= CPUID_1_ECX_X2APIC
        return eax, ebx, ecx, edx

    def __getattr__(self, name: str):
        return getattr(self.policy, name)


class ApicSupport:
    """One vCPU's local APIC for :class:`~hvm.engine.model.engine.ModelEngine` (see the module docstring)."""

    def __init__(self, engine: ModelEngine, mode: str) -> None:
        if mode not in ("legacy", "apicv"):
            raise ValueError(f"apic mode {mode!r}: one of {', '.join(MODES)}")
        self.engine = engine
        self.mode = mode
        host = engine.host
        self.page_hpa = host.allocate()  # the LocalApic's registers = the virtual-APIC page
        self.lapic = LocalApic(tsc_hz=max(1, int(engine.tsc_hz() or 1_000_000_000)),
                               page=host.view(self.page_hpa, 4096))
        self.stats: Counter[str] = Counter()
        self._due = False  # the timer thread stopped the guest for an expiry
        self._rearm = threading.Event()
        self._hook: int | None = None  # the interrupt-window watch (a UC_HOOK_CODE on all code)
        self._hook_stale = False
        self._prev_sti = False
        self._window = False  # the watch saw the window open
        self.ioapic = None  # the VMM's I/O APIC, if attached
        self._line_raised = threading.Event()  # an I/O APIC message waits: a halted vCPU wakes at once
        self._intercept_msrs()
        engine.cpuid = _X2apicCpuid(engine.cpuid)
        self.vapic: VirtualApic | None = None
        if mode == "legacy":
            vmcs = engine.vmcs
            vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL)
                         | ProcBased.CR8_LOAD_EXITING | ProcBased.CR8_STORE_EXITING)
        self.pi: PostedInterruptDescriptor | None = None
        if mode == "apicv":
            self._enable_apicv()
        self._thread = threading.Thread(target=self._timer_thread, name="hvm-model-apic", daemon=True)
        self._thread.start()

    # --- set-up ---------------------------------------------------------------------------
    def _intercept_msrs(self) -> None:
        """IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC range exit (as KVM intercepts them)."""
        eng = self.engine
        bitmap = MsrBitmap()
        bitmap.page[:] = eng.host.read(eng.msr_bitmap, 4096)
        for msr in (MSR_APIC_BASE, MSR_TSC_DEADLINE, *range(0x800, 0x900)):
            bitmap.intercept(msr)
        eng.host.write(eng.msr_bitmap, bytes(bitmap.page))

    def _enable_apicv(self) -> None:
        eng = self.engine
        vmcs = eng.vmcs
        self.access_hpa = eng.host.allocate()  # the APIC-access page (SDM 25.6.8)
        pi_hpa = eng.host.allocate()  # the posted-interrupt descriptor, 64-byte aligned (25.6.8)
        self.pi = PostedInterruptDescriptor(eng.host.view(pi_hpa, 64))
        vmcs.vmwrite(F.PIN_BASED_VM_EXEC_CONTROL,
                     vmcs.vmread(F.PIN_BASED_VM_EXEC_CONTROL) | PinBased.POSTED_INTERRUPTS)
        vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL)
                     | ProcBased.USE_TPR_SHADOW | ProcBased.ACTIVATE_SECONDARY_CONTROLS)
        vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
                     | ProcBased2.VIRTUALIZE_APIC_ACCESSES | ProcBased2.APIC_REGISTER_VIRTUALIZATION
                     | ProcBased2.VIRTUAL_INTERRUPT_DELIVERY)
        vmcs.vmwrite(F.VM_EXIT_CONTROLS, vmcs.vmread(F.VM_EXIT_CONTROLS) | ExitControls.ACK_INTERRUPT_ON_EXIT)
        vmcs.vmwrite(F.VIRTUAL_APIC_PAGE_ADDR, self.page_hpa)
        vmcs.vmwrite(F.APIC_ACCESS_ADDR, self.access_hpa)
        vmcs.vmwrite(F.POSTED_INTR_DESC_ADDR, pi_hpa)
        vmcs.vmwrite(F.POSTED_INTR_NV, NOTIFICATION_VECTOR)
        vmcs.vmwrite(F.TPR_THRESHOLD, 0)
        for field in (F.EOI_EXIT_BITMAP0, F.EOI_EXIT_BITMAP1, F.EOI_EXIT_BITMAP2, F.EOI_EXIT_BITMAP3):
            vmcs.vmwrite(field, 0)  # only edge-triggered interrupts here: no EOI needs the hypervisor
        vmcs.vmwrite(F.GUEST_INTR_STATUS, 0)
        self.vapic = VirtualApic(VirtualApicPage(self.lapic.page), ApicvControls.from_vmcs(vmcs))
        self.lapic.accept = self._post  # the hypervisor's interrupts for the guest are posted

    # --- the I/O APIC ---------------------------------------------------------------------------
    def attach_ioapic(self, ioapic) -> None:
        self.ioapic = ioapic
        ioapic.connect(self.lapic)
        ioapic.on_pending = self._ioapic_pending
        if self.vapic is not None:
            ioapic.on_change = self._eoi_exit_bitmap

    def _ioapic_pending(self) -> None:
        """A line raised (maybe from another thread): stop a running guest so that the next instruction
        boundary sends the message (a halted vCPU finds it in :meth:`wake`)."""
        eng = self.engine
        self._line_raised.set()
        if eng._running:
            try:
                eng.uc.emu_stop()
            except Exception:  # noqa: BLE001 - the engine is closing
                pass

    def _eoi_exit_bitmap(self) -> None:
        """EOI-exit bitmap = the I/O APIC's level-triggered vectors (as KVM's ioapic scan, SDM 25.6.8)."""
        assert self.ioapic is not None and self.vapic is not None
        bitmap = 0
        for vector in self.ioapic.level_vectors():
            bitmap |= 1 << vector
        vmcs = self.engine.vmcs
        for i, field in enumerate((F.EOI_EXIT_BITMAP0, F.EOI_EXIT_BITMAP1, F.EOI_EXIT_BITMAP2,
                                   F.EOI_EXIT_BITMAP3)):
            vmcs.vmwrite(field, bitmap >> 64 * i & (1 << 64) - 1)
        self.vapic.controls = ApicvControls.from_vmcs(vmcs)

    def _eoi_induced(self, vector: int) -> None:
        """EOI-induced VM exit (SDM Vol. 3C 30.1.4, qualification = the vector): the EOI message."""
        self.stats["eoi_induced"] += 1
        if self.ioapic is not None:
            self.ioapic.eoi(vector)

    # --- counters ---------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        out = {f"apic.{name}": n for name, n in sorted(self.stats.items())}
        out.update({f"apic.lapic_{name}": n for name, n in sorted(self.lapic.stats.items())})
        return out

    # --- exits the hypervisor finishes in the engine ---------------------------------------------
    def _record(self, reason: ExitReason, qualification: int = 0, **info: int) -> None:
        eng = self.engine
        eng._record(VmExit(reason, ExitInfo(int(reason), qualification, **info), None), None)
        eng._pending = None

    def _now(self) -> int:
        return self.engine.guest_tsc()

    def _changed(self) -> None:
        """After the hypervisor touched the LocalApic: the timer thread re-reads the deadline; with
        virtual-interrupt delivery, RVI and SVI follow the IRR and ISR (as KVM's apicv updates)."""
        self._rearm.set()
        if self.vapic is not None:
            vapic = self.vapic
            vapic.rvi = vapic.page.highest_virr() or 0
            vapic.svi = vapic.page.highest_visr() or 0
            vapic.ppr_virtualization()
            vapic.evaluate()

    def claims(self, gpa: int) -> bool:
        lapic = self.lapic
        return gpa & ~0xFFF == lapic.mmio_base and lapic.hw_enabled and not lapic.x2apic

    def mmio_read(self, step: _MmioStep, gpa: int, size: int) -> bytes:
        """A guest read of the APIC page: the bytes the instruction gets (after any exit it causes)."""
        offset = gpa & 0xFFF
        if self.vapic is not None:
            try:
                value = self.vapic.read(offset, size)  # SDM 30.4.2: from the virtual-APIC page
                self.stats["virtualized_reads"] += 1
                return value.to_bytes(size, "little")
            except ApicvExit as exit_:
                self._record(exit_.reason, exit_.qualification)
        else:
            vmexit, _ = self.engine._mmio_exit(step, gpa, size, None)
            self.engine._record(vmexit, None)
            self.engine._pending = None
        value = self.lapic.mmio_read(offset, size, now=self._now())
        return value.to_bytes(size, "little")

    def mmio_write(self, step: _MmioStep, gpa: int, size: int, value: int) -> None:
        offset = gpa & 0xFFF
        if self.vapic is not None:
            vapic = self.vapic
            try:
                vapic.write(offset, size, value)  # SDM 30.4.3: virtualized, then APIC-write emulation
                self.stats["virtualized_writes"] += 1
                return
            except ApicvExit as exit_:
                self._record(exit_.reason, exit_.qualification)
                if exit_.reason is ExitReason.APIC_WRITE:
                    # Trap-like: the value is on the virtual-APIC page; the hypervisor performs the write
                    # (as KVM's kvm_apic_write_nodecode).
                    value = vapic.page.read32(exit_.qualification)
                    offset = exit_.qualification
                elif exit_.reason is not ExitReason.APIC_ACCESS:
                    if exit_.reason is ExitReason.EOI_INDUCED:
                        self._eoi_induced(exit_.qualification)
                    self._changed()  # EOI-induced / TPR below threshold: nothing more to emulate
                    return
        else:
            vmexit, _ = self.engine._mmio_exit(step, gpa, size, value)
            self.engine._record(vmexit, None)
            self.engine._pending = None
        self.lapic.mmio_write(offset, size, value, now=self._now())
        self._changed()

    def claims_msr(self, vmexit: VmExit) -> bool:
        return (vmexit.reason in (ExitReason.MSR_READ, ExitReason.MSR_WRITE) and vmexit.exit is not None
                and self.lapic.handles_msr(vmexit.exit.addr))

    def msr_exit(self, vmexit: VmExit) -> None:
        """RDMSR/WRMSR of an APIC MSR: the hypervisor emulates it on the LocalApic (or injects #GP)."""
        eng = self.engine
        exit_: Exit = vmexit.exit  # type: ignore[assignment]
        msr = exit_.addr
        try:
            if vmexit.reason is ExitReason.MSR_READ:
                data = self.lapic.rdmsr(msr, now=self._now()).to_bytes(8, "little")
            else:
                self.lapic.wrmsr(msr, int.from_bytes(exit_.data, "little"), now=self._now())
                data = b""
            complete = vmexit.complete
        except ApicGP:
            data, complete = b"", lambda _: eng.queue_event(Event(GP, error_code=0))
        eng._record(replace(vmexit, exit=None), None)
        eng._pending = None
        if complete is not None:
            complete(data)
        if msr == MSR_APIC_BASE and self.vapic is not None:
            self._follow_apic_mode()
        self._changed()

    # --- x2APIC mode with APICv (SDM Vol. 3C 30.5) ---------------------------------------------
    def _follow_apic_mode(self) -> None:
        """After the guest wrote IA32_APIC_BASE: the secondary controls and the MSR bitmap follow its
        APIC's mode, as KVM's vmx_set_virtual_apic_mode and vmx_update_msr_bitmap_x2apic do.

        x2APIC: "virtualize x2APIC mode" 1 and "virtualize APIC accesses" 0 (SDM 27.2.1.1 allows no
        other combination); RDMSR passes for the readable x2APIC registers but the current count (not on
        the page: the hypervisor computes it), WRMSR for TPR, EOI and SELF IPI only. xAPIC: the
        APIC-access page again, every x2APIC MSR intercepted. Disabled: neither control.
        """
        assert self.vapic is not None
        eng = self.engine
        vmcs = eng.vmcs
        lapic = self.lapic
        x2apic = lapic.x2apic
        proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
        proc2 &= ~(ProcBased2.VIRTUALIZE_APIC_ACCESSES | ProcBased2.VIRTUALIZE_X2APIC_MODE)
        if x2apic:
            proc2 |= ProcBased2.VIRTUALIZE_X2APIC_MODE
        elif lapic.hw_enabled:
            proc2 |= ProcBased2.VIRTUALIZE_APIC_ACCESSES
        if proc2 == vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL):
            return
        vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, proc2)
        bitmap = MsrBitmap()
        bitmap.page[:] = eng.host.read(eng.msr_bitmap, 4096)
        for msr in range(X2APIC_MSR_FIRST, X2APIC_MSR_LAST + 1):
            bitmap.intercept(msr)
            if x2apic:
                readable = x2apic_readable(msr) and x2apic_offset(msr) != TIMER_CCR
                bitmap.pass_through(msr, read=readable, write=msr in _X2APIC_WRITES_VIRTUALIZED)
        eng.host.write(eng.msr_bitmap, bytes(bitmap.page))
        # The exit is finished in the engine: its re-entry checks and latches the new controls (SDM 28.2.1).
        failed = eng._latch_controls()
        if failed is not None:
            raise RuntimeError(f"model APIC: {failed.detail}")
        self.vapic.controls = ApicvControls.from_vmcs(vmcs)
        self.stats["x2apic_virtualization" if x2apic else "xapic_virtualization"] += 1

    def x2apic_rdmsr(self, msr: int) -> int | None:
        """A RDMSR of 800H-8FFH the MSR bitmap let through with "virtualize x2APIC mode" 1 (SDM 30.5):
        the value from the virtual-APIC page, or None when the processor does not virtualize it."""
        assert self.vapic is not None
        value = self.vapic.rdmsr(msr)
        if value is not None:
            self.stats["x2apic_virtualized_reads"] += 1
        return value

    def x2apic_wrmsr(self, msr: int, value: int, next_rip: int) -> bool:
        """A WRMSR of 800H-8FFH the MSR bitmap let through with "virtualize x2APIC mode" 1 (SDM 30.5).

        Returns False when the processor does not virtualize it; raises ApicvGP for the #GP(0) cases.
        A trap-like VM exit the virtualization causes (APIC write for a SELF IPI with an illegal vector,
        EOI-induced, TPR below threshold) is taken after the instruction, at ``next_rip``.
        """
        vapic = self.vapic
        assert vapic is not None
        try:
            done = vapic.wrmsr(msr, value)
        except ApicvExit as exit_:
            eng = self.engine
            eng.uc.reg_write(R.UC_X86_REG_RIP, next_rip)  # trap-like: after the WRMSR completed

            def complete(_: bytes, exit_: ApicvExit = exit_) -> None:
                if exit_.reason is ExitReason.APIC_WRITE:
                    # The hypervisor performs the write from the virtual-APIC page (as KVM's
                    # kvm_apic_write_nodecode does for x2APIC).
                    offset = exit_.qualification
                    try:
                        self.lapic.wrmsr(X2APIC_MSR_FIRST + (offset >> 4), vapic.page.read32(offset),
                                         now=self._now())
                    except ApicGP:
                        eng.queue_event(Event(GP, error_code=0))
                elif exit_.reason is ExitReason.EOI_INDUCED:
                    self._eoi_induced(exit_.qualification)
                self._changed()
            info = ExitInfo(int(exit_.reason), exit_.qualification)
            eng.take_exit(VmExit(exit_.reason, info, None, complete))
            return True
        if done:
            self.stats["x2apic_virtualized_writes"] += 1
            self.engine.vmcs.store(F.GUEST_INTR_STATUS, vapic.svi << 8 | vapic.rvi)
        return done

    def claims_cr8(self, vmexit: VmExit) -> bool:
        return vmexit.reason is ExitReason.CR_ACCESS and vmexit.info.qualification & 0xF == 8

    def cr8_exit(self, vmexit: VmExit) -> None:
        """MOV to/from CR8 exited (legacy): CR8[3:0] is TPR[7:4] (SDM Vol. 3A 11.8.6)."""
        eng = self.engine
        qual = CrQualification.decode(vmexit.info.qualification)
        eng._record(replace(vmexit, exit=None), None)
        eng._pending = None
        rip = eng.uc.reg_read(R.UC_X86_REG_RIP)
        if qual.access_type is CrAccessType.MOV_TO_CR:
            value = eng.cpu.gpr(qual.gpr)
            self.lapic.write(0x80, (value & 0xF) << 4, now=self._now())
        else:
            set_gpr(eng, qual.gpr, (self.lapic.read(0x80, now=self._now()) & 0xFF) >> 4, 8)
        eng.uc.reg_write(R.UC_X86_REG_RIP, rip + vmexit.info.instruction_length)
        self._changed()

    def mov_to_cr8(self, value: int) -> None:
        """SDM 30.3 with "use TPR shadow": VTPR from CR8, then TPR virtualization."""
        assert self.vapic is not None
        self.vapic.mov_to_cr8(value)
        self.engine.vmcs.store(F.GUEST_INTR_STATUS, self.vapic.svi << 8 | self.vapic.rvi)

    def mov_from_cr8(self) -> int:
        assert self.vapic is not None
        return self.vapic.mov_from_cr8()

    # --- posted interrupts (apicv) ----------------------------------------------------------
    def _post(self, vector: int, level: bool = False) -> bool:
        """The hypervisor posts an interrupt (SDM 30.6: PIR bit, then ON; a notification if ON was 0)."""
        assert self.pi is not None
        if vector < 16:
            return self.lapic.set_irr(vector, level)  # the LocalApic's own illegal-vector rule
        self.lapic.set_trigger_mode(vector, level)  # level: an I/O APIC's level-triggered interrupt
        if self.pi.post(vector):
            self.stats["posted_notifications"] += 1
        self.stats["posted"] += 1
        return True

    # --- instruction boundaries: timer, injection, virtual-interrupt delivery ---------------------------
    def boundary(self) -> None:
        """Where the engine regains control between guest instructions (and at VM entry)."""
        eng = self.engine
        if eng._mmio is not None:
            return  # in the middle of an instruction's MMIO emulation
        if self._hook_stale:
            self._unhook()
        if self.ioapic is not None:
            self.ioapic.service()
        due, self._due = self._due, False
        fired = self.lapic.tick(self._now())
        if fired:
            self._rearm.set()
        if self.vapic is None:
            if due and fired:
                # The host timer interrupted the guest: with "external-interrupt exiting" that is a VM exit.
                self._record(ExitReason.EXTERNAL_INTERRUPT)
            self._inject_legacy()
        else:
            self._deliver_virtual()
        self._window = False  # what the watch saw holds for this boundary only

    def _interruptible(self) -> bool:
        """RFLAGS.IF = 1 and no blocking by STI (an STI right before RIP) - see the module docstring."""
        eng = self.engine
        uc = eng.uc
        if not uc.reg_read(R.UC_X86_REG_EFLAGS) & RFLAGS_IF:
            return False
        if self._window:
            return True  # the watch saw the window open at this very instruction
        rip = uc.reg_read(R.UC_X86_REG_RIP)
        try:
            before = eng.read_linear(eng.segment_base(1) + rip - 1, 1)
        except Exception:  # noqa: BLE001 - unreadable: no STI there
            return True
        return before[0] != _STI

    def _inject_legacy(self) -> None:
        eng = self.engine
        vector = self.lapic.pending()
        vmcs = eng.vmcs
        proc = vmcs.peek(F.CPU_BASED_VM_EXEC_CONTROL)
        if vector is None:
            if proc & ProcBased.INTERRUPT_WINDOW_EXITING:
                self._set_window_exiting(False)
            return
        if self._interruptible():
            self._window = False
            if proc & ProcBased.INTERRUPT_WINDOW_EXITING:
                self._set_window_exiting(False)
            vector = self.lapic.ack()  # the processor's INTA: IRR -> ISR (SDM 11.8.4)
            # VM entry injects it: VM-entry interruption-information field, type external interrupt.
            vmcs.vmwrite(F.VM_ENTRY_INTR_INFO_FIELD,
                         InterruptionInfo(vector, InterruptionType.EXTERNAL_INTERRUPT).encode())
            eng._entry_injection()
            self.stats["injected"] += 1
            return
        if not proc & ProcBased.INTERRUPT_WINDOW_EXITING:
            self._set_window_exiting(True)
        self._watch()

    def _set_window_exiting(self, on: bool) -> None:
        """The hypervisor sets or clears "interrupt-window exiting" (SDM 25.6.2) for the coming entry."""
        self.engine.set_exiting_control(ProcBased.INTERRUPT_WINDOW_EXITING, on)

    def _deliver_virtual(self) -> None:
        vapic = self.vapic
        assert vapic is not None and self.pi is not None
        if self.pi.on:
            # SDM 30.6: the notification vector arrived while the guest ran (or pending at entry): ON
            # cleared, PIR into VIRR, RVI raised, evaluation - and no VM exit.
            vapic.process_posted_interrupts(self.pi)
            self.stats["posted_processed"] += 1
        if not vapic.recognized:
            vapic.evaluate()
        if vapic.recognized:
            if self._interruptible():
                self._window = False
                vector = vapic.deliver()  # SDM 30.2.2
                self.engine._inject.append(Event(vector, InterruptionType.EXTERNAL_INTERRUPT))
                self.stats["virtual_delivered"] += 1
            else:
                self._watch()
        self.engine.vmcs.store(F.GUEST_INTR_STATUS, vapic.svi << 8 | vapic.rvi)

    # --- the interrupt window: a hook on every instruction while an interrupt waits for it ----------
    def _watch(self) -> None:
        if self._hook is not None:
            return
        uc = self.engine.uc
        self._prev_sti = False
        self._hook = uc.hook_add(UC_HOOK_CODE, self._on_instruction, None, 1, 0)
        uc.ctl_flush_tb()  # translated code calls a hook only if it was added before the translation

    def _unhook(self) -> None:
        self._hook_stale = False
        if self._hook is not None:
            uc = self.engine.uc
            uc.hook_del(self._hook)
            self._hook = None
            uc.ctl_flush_tb()

    def _on_instruction(self, uc, address: int, size: int, _: object) -> None:
        eng = self.engine
        if self._hook_stale or eng._mmio is not None or eng._exit is not None or eng._event is not None:
            return
        try:
            prev_sti, self._prev_sti = self._prev_sti, eng._instruction_bytes(address)[:1] == b"\xfb"
            if not uc.reg_read(R.UC_X86_REG_EFLAGS) & RFLAGS_IF or prev_sti:
                return  # SDM 25.4.1: blocked by IF = 0 or by STI for one instruction
            self._hook_stale = True  # removed after the run (never from inside a hook)
            self._window = True
            if self.vapic is None:
                # SDM 26.2: with "interrupt-window exiting", a VM exit before this instruction.
                eng.take_exit(VmExit(ExitReason.INTERRUPT_WINDOW,
                                     ExitInfo(int(ExitReason.INTERRUPT_WINDOW)), None))
            else:
                uc.emu_stop()  # the recognized virtual interrupt is delivered before this instruction
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            eng._fail(exc)

    # --- HLT and the timer thread --------------------------------------------------------------
    def wake(self) -> bool:
        """The halted vCPU: is there an interrupt for it now (timer included)? Then it wakes."""
        if self.ioapic is not None:
            self.ioapic.service()
        self.lapic.tick(self._now())
        if self.vapic is None:
            return self.lapic.pending() is not None and self._interruptible()
        return bool(self.pi is not None and self.pi.on) or self.vapic.evaluate()

    def idle(self) -> None:
        """The halted vCPU waits: until the next timer expiry is near or an I/O APIC line is raised."""
        self._line_raised.wait(self.idle_sleep())
        self._line_raised.clear()

    def idle_sleep(self) -> float:
        """How long the halted vCPU may sleep before the next timer expiry."""
        deadline = self.lapic.next_deadline()
        if deadline is None:
            return 0.002
        hz = self.lapic.tsc_hz
        return min(0.002, max(_POLL_FLOOR, (deadline - self._now()) / hz))

    def _timer_thread(self) -> None:
        """Stops the running guest when the APIC timer expires (the host timer interrupt)."""
        eng = self.engine
        lapic = self.lapic
        while not eng._closed:
            try:
                deadline = lapic.next_deadline()
                now = self._now()
            except Exception:  # noqa: BLE001 - the engine closed under us
                return
            if deadline is None:
                self._rearm.wait(_POLL_CEILING)
                self._rearm.clear()
                continue
            wait = (deadline - now) / lapic.tsc_hz
            if wait > 0:
                self._rearm.wait(min(max(wait, _POLL_FLOOR), _POLL_CEILING))
                self._rearm.clear()
                continue
            if eng._running:
                # Again every poll until the engine has taken the expiry: a stop that comes just
                # before Unicorn starts the guest's run finds nothing to stop.
                self._due = True
                try:
                    eng.uc.emu_stop()
                except Exception:  # noqa: BLE001 - the engine is closing
                    return
            time.sleep(_POLL_FLOOR)

    def close(self) -> None:
        self._rearm.set()
