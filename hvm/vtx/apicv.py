"""APIC virtualization: Intel SDM Vol. 3C, chapter 30 "APIC Virtualization and Virtual Interrupts".

With APICv the processor itself keeps a guest's APIC state on the 4-KByte
*virtual-APIC page* (30.1) and, in VMX non-root operation, performs the
virtualizations the VMM would otherwise do after a VM exit::

    page = VirtualApicPage()                     # or over the VMM's LocalApic register page
    vapic = VirtualApic(page, ApicvControls.from_vmcs(vmcs), vmcs=vmcs)   # RVI/SVI from 0x810
    vapic.vm_entry()                             # 27.3.2.5: PPR virtualization + evaluation
    vapic.read(0x30, 4)                          # APIC-access page read (30.4.2): value or ApicvExit
    vapic.write(0xB0, 4, 0)                      # EOI virtualization (30.1.4); ApicvExit(45) if the
                                                 # vector's EOI-exit bitmap bit is 1
    vapic.recognized                             # 30.2.1: a virtual interrupt is pending
    vapic.deliver()                              # 30.2.2: RVI -> SVI, VIRR -> VISR; returns the vector
    desc = PostedInterruptDescriptor()
    desc.post(0x20)                              # a sender: PIR bit + ON (True: send the notification)
    vapic.process_posted_interrupts(desc)        # 30.6: PIR -> VIRR, RVI = max(RVI, highest)

A VM exit that a virtualization causes is raised as :class:`ApicvExit` with its
basic exit reason and exit qualification: APIC access (44, fault-like: the
access has not happened), APIC write (56, trap-like: the write is on the
virtual-APIC page), EOI-induced (45, trap-like), TPR below threshold (43,
trap-like). Section numbers are those of the current SDM (chapter 30; in
editions before 2023 the chapter is 29, e.g. 29.4.3.2 for 30.4.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from hvm.vtx import apic as A
from hvm.vtx.controls import Controls, PinBased, ProcBased, ProcBased2
from hvm.vtx.exit_reasons import ExitReason
from hvm.vtx.qualification import ApicAccessQualification, ApicAccessType
from hvm.vtx.vmcs import VMCS, VmcsField

_MASK32 = 0xFFFF_FFFF

# 30.4.2: with "APIC-register virtualization" 1, reads entirely within these 4-byte ranges are
# virtualized (no PPR 0A0H, no APR 090H, no current count 390H, ...).
_ARV_READ = frozenset(
    [A.ID, A.VERSION, A.TPR, A.EOI, A.LDR, A.DFR, A.SVR, A.ESR, A.ICR_LOW, A.ICR_HIGH, A.LVT_TIMER,
     A.LVT_THERMAL, A.LVT_PERF, A.LVT_LINT0, A.LVT_LINT1, A.LVT_ERROR, A.TIMER_ICR, A.TIMER_DCR,
     *range(A.ISR, A.IRR + 0x80, 0x10)]
)
# 30.4.3.1: with "APIC-register virtualization" 1, writes entirely within these ranges are virtualized.
_ARV_WRITE = frozenset(
    [A.ID, A.TPR, A.EOI, A.LDR, A.DFR, A.SVR, A.ESR, A.ICR_LOW, A.ICR_HIGH, A.LVT_TIMER, A.LVT_THERMAL,
     A.LVT_PERF, A.LVT_LINT0, A.LVT_LINT1, A.LVT_ERROR, A.TIMER_ICR, A.TIMER_DCR]
)
# 30.4.3.1: with "virtual-interrupt delivery" 1 (and APIC-register virtualization 0): TPR, EOI, ICR low.
_VID_WRITE = frozenset([A.TPR, A.EOI, A.ICR_LOW])
# 30.4.3.2: bits of VICR_LO that must be 0 for self-IPI virtualization (reserved 31:20, 17:16, 13).
_VICR_RESERVED = 0xFFF0_0000 | 0x3_0000 | 1 << 13


class ApicvExit(Exception):
    """A VM exit caused by APIC virtualization: ``reason`` (SDM Appendix C) and ``qualification``."""

    def __init__(self, reason: ExitReason, qualification: int = 0, detail: str = "") -> None:
        self.reason = reason
        self.qualification = qualification
        super().__init__(f"{reason.name} (exit reason {int(reason)}), qualification {qualification:#x}"
                         + (f": {detail}" if detail else ""))


class ApicvGP(Exception):
    """The virtualized instruction raises #GP(0) (SDM 30.5: a bad WRMSR to EOI or SELF IPI)."""


class VirtualApicPage:
    """Accessors for the virtual-APIC page (SDM 30.1.1): VTPR, VPPR, VEOI, VISR, VIRR, VICR_LO/HI.

    ``data`` is any 4-KByte buffer: for the model engine it is the VMM's own LocalApic register page,
    which has the same layout.
    """

    def __init__(self, data: bytearray | memoryview | None = None) -> None:
        self.data = data if data is not None else bytearray(A.PAGE_SIZE)
        if len(self.data) != A.PAGE_SIZE:
            raise ValueError("the virtual-APIC page is 4 KBytes")

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 4], "little")

    def write32(self, offset: int, value: int) -> None:
        self.data[offset : offset + 4] = (value & _MASK32).to_bytes(4, "little")

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    vtpr = property(lambda self: self.read32(A.TPR), lambda self, v: self.write32(A.TPR, v))
    vppr = property(lambda self: self.read32(A.PPR), lambda self, v: self.write32(A.PPR, v))
    veoi = property(lambda self: self.read32(A.EOI), lambda self, v: self.write32(A.EOI, v))
    vicr_lo = property(lambda self: self.read32(A.ICR_LOW), lambda self, v: self.write32(A.ICR_LOW, v))
    vicr_hi = property(lambda self: self.read32(A.ICR_HIGH), lambda self, v: self.write32(A.ICR_HIGH, v))

    # 30.1.1: bit x of VISR/VIRR is bit (x & 1FH) at offset base | ((x & E0H) >> 1).
    def _bit(self, base: int, vector: int) -> bool:
        return bool(self.read32(base | (vector & 0xE0) >> 1) >> (vector & 31) & 1)

    def _setbit(self, base: int, vector: int, on: bool) -> None:
        offset = base | (vector & 0xE0) >> 1
        word = self.read32(offset)
        self.write32(offset, word | 1 << (vector & 31) if on else word & ~(1 << (vector & 31)))

    def _highest(self, base: int) -> int | None:
        for i in range(7, -1, -1):
            word = self.read32(base + i * 0x10)
            if word:
                return i * 32 + word.bit_length() - 1
        return None

    def visr(self, vector: int) -> bool:
        return self._bit(A.ISR, vector)

    def virr(self, vector: int) -> bool:
        return self._bit(A.IRR, vector)

    def set_visr(self, vector: int, on: bool = True) -> None:
        self._setbit(A.ISR, vector, on)

    def set_virr(self, vector: int, on: bool = True) -> None:
        self._setbit(A.IRR, vector, on)

    def highest_visr(self) -> int | None:
        return self._highest(A.ISR)

    def highest_virr(self) -> int | None:
        return self._highest(A.IRR)


class PostedInterruptDescriptor:
    """The 64-byte posted-interrupt descriptor (SDM 30.6, Table 30-1).

    Bits 255:0 are the posted-interrupt requests (PIR, one bit per vector), bit 256 the outstanding-
    notification bit (ON); bits 511:257 are free for software (VT-d's posting format uses some).
    """

    ON_BIT = 256

    def __init__(self, data: bytearray | memoryview | None = None) -> None:
        self.data = data if data is not None else bytearray(64)
        if len(self.data) != 64:
            raise ValueError("the posted-interrupt descriptor is 64 bytes")

    @property
    def pir(self) -> int:
        return int.from_bytes(self.data[0:32], "little")

    @pir.setter
    def pir(self, value: int) -> None:
        self.data[0:32] = value.to_bytes(32, "little")

    @property
    def on(self) -> bool:
        return bool(self.data[32] & 1)

    @on.setter
    def on(self, value: bool) -> None:
        self.data[32] = self.data[32] & ~1 | int(value)

    def post(self, vector: int) -> bool:
        """What a sender (the VMM, another CPU) does: set the PIR bit, then ON.

        Returns True when ON was clear, i.e. the sender must now send the notification vector (as
        KVM's vmx_deliver_posted_interrupt: pi_test_and_set_pir, then pi_test_and_set_on).
        """
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"vector {vector} out of range 0-255")
        self.pir = self.pir | 1 << vector
        was_on = self.on
        self.on = True
        return not was_on


@dataclass(frozen=True)
class ApicvControls:
    """The controls of SDM 30 as they stand in one VMCS."""

    use_tpr_shadow: bool = False
    virtualize_apic_accesses: bool = False
    virtualize_x2apic_mode: bool = False
    apic_register_virtualization: bool = False
    virtual_interrupt_delivery: bool = False
    posted_interrupts: bool = False
    interrupt_window_exiting: bool = False
    tpr_threshold: int = 0
    eoi_exit_bitmap: int = 0  # 256 bits, vector -> EOI-induced VM exit (25.6.8)
    notification_vector: int = 0

    @classmethod
    def from_vmcs(cls, vmcs: VMCS) -> ApicvControls:
        c = Controls.read(vmcs)
        bitmap = 0
        for i, field in enumerate((VmcsField.EOI_EXIT_BITMAP0, VmcsField.EOI_EXIT_BITMAP1,
                                   VmcsField.EOI_EXIT_BITMAP2, VmcsField.EOI_EXIT_BITMAP3)):
            bitmap |= vmcs.vmread(field) << 64 * i
        proc2 = c.proc2 if c.proc & ProcBased.ACTIVATE_SECONDARY_CONTROLS else 0
        return cls(
            use_tpr_shadow=bool(c.proc & ProcBased.USE_TPR_SHADOW),
            virtualize_apic_accesses=bool(proc2 & ProcBased2.VIRTUALIZE_APIC_ACCESSES),
            virtualize_x2apic_mode=bool(proc2 & ProcBased2.VIRTUALIZE_X2APIC_MODE),
            apic_register_virtualization=bool(proc2 & ProcBased2.APIC_REGISTER_VIRTUALIZATION),
            virtual_interrupt_delivery=bool(proc2 & ProcBased2.VIRTUAL_INTERRUPT_DELIVERY),
            posted_interrupts=bool(c.pin & PinBased.POSTED_INTERRUPTS),
            interrupt_window_exiting=bool(c.proc & ProcBased.INTERRUPT_WINDOW_EXITING),
            tpr_threshold=vmcs.vmread(VmcsField.TPR_THRESHOLD) & 0xF,
            eoi_exit_bitmap=bitmap,
            notification_vector=vmcs.vmread(VmcsField.POSTED_INTR_NV) & 0xFF,
        )


class VirtualApic:
    """The processor's APIC virtualization for one guest (SDM 30.1-30.6).

    ``rvi``/``svi`` are the guest interrupt status (VMCS field 0x810: RVI bits 7:0, SVI bits 15:8);
    with ``vmcs`` given they are read from it here and written back by :meth:`save`.
    """

    def __init__(self, page: VirtualApicPage, controls: ApicvControls, *, vmcs: VMCS | None = None,
                 rvi: int = 0, svi: int = 0) -> None:
        self.page = page
        self.controls = controls
        self.vmcs = vmcs
        if vmcs is not None:
            status = vmcs.vmread(VmcsField.GUEST_INTR_STATUS)
            rvi, svi = status & 0xFF, status >> 8 & 0xFF
        self.rvi = rvi
        self.svi = svi
        self.recognized = False

    def save(self) -> None:
        """Write RVI and SVI back into the guest interrupt status field."""
        if self.vmcs is not None:
            self.vmcs.vmwrite(VmcsField.GUEST_INTR_STATUS, self.svi << 8 | self.rvi)

    # ------------------------------------------------------------- 30.1, 30.2
    def ppr_virtualization(self) -> None:
        """30.1.3: VPPR = VTPR if VTPR[7:4] >= SVI[7:4], else SVI & F0H."""
        vtpr = self.page.vtpr & 0xFF
        self.page.vppr = vtpr if vtpr >> 4 >= self.svi >> 4 else self.svi & 0xF0

    def evaluate(self) -> bool:
        """30.2.1: recognized iff "interrupt-window exiting" is 0 and RVI[7:4] > VPPR[7:4]."""
        self.recognized = (not self.controls.interrupt_window_exiting
                           and self.rvi >> 4 > (self.page.vppr & 0xFF) >> 4)
        return self.recognized

    def vm_entry(self) -> None:
        """27.3.2.5: with "virtual-interrupt delivery" 1, VM entry does PPR virtualization and evaluation."""
        if self.controls.virtual_interrupt_delivery:
            self.ppr_virtualization()
            self.evaluate()

    def can_deliver(self, rflags_if: bool, sti_blocking: bool = False, movss_blocking: bool = False) -> bool:
        """30.2.2: a recognized virtual interrupt is delivered at an instruction boundary when RFLAGS.IF = 1
        and there is no blocking by STI or by MOV SS (and "interrupt-window exiting" is 0)."""
        return (self.recognized and rflags_if and not sti_blocking and not movss_blocking
                and not self.controls.interrupt_window_exiting)

    def deliver(self) -> int:
        """30.2.2 virtual-interrupt delivery: VISR[RVI] = 1, SVI = RVI, VPPR = RVI & F0H, VIRR[RVI] = 0,
        RVI = highest VIRR bit (or 0); returns the vector to deliver through the guest IDT."""
        if not self.recognized:
            raise RuntimeError("no virtual interrupt is recognized")
        vector = self.rvi
        self.page.set_visr(vector)
        self.svi = vector
        self.page.vppr = vector & 0xF0
        self.page.set_virr(vector, False)
        self.rvi = self.page.highest_virr() or 0
        self.recognized = False  # "cease recognition of any pending virtual interrupt"
        return vector

    def tpr_virtualization(self) -> None:
        """30.1.2: without virtual-interrupt delivery, VTPR[7:4] below the TPR threshold exits (reason 43,
        trap-like); with it, PPR virtualization and evaluation of pending virtual interrupts."""
        if not self.controls.virtual_interrupt_delivery:
            if (self.page.vtpr & 0xFF) >> 4 < self.controls.tpr_threshold:
                raise ApicvExit(ExitReason.TPR_BELOW_THRESHOLD, 0, "VTPR below the TPR threshold")
        else:
            self.ppr_virtualization()
            self.evaluate()

    def eoi_virtualization(self) -> None:
        """30.1.4: clear VISR[SVI], SVI = next highest VISR bit, PPR virtualization; then an EOI-induced
        VM exit (reason 45, qualification = the vector) if the EOI-exit bitmap says so, else evaluation."""
        vector = self.svi
        self.page.set_visr(vector, False)
        self.svi = self.page.highest_visr() or 0
        self.ppr_virtualization()
        if self.controls.eoi_exit_bitmap >> vector & 1:
            raise ApicvExit(ExitReason.EOI_INDUCED, vector, f"EOI-exit bitmap bit {vector}")
        self.evaluate()

    def self_ipi_virtualization(self, vector: int) -> None:
        """30.1.5: VIRR[vector] = 1, RVI = max(RVI, vector), evaluation of pending virtual interrupts."""
        self.page.set_virr(vector)
        self.rvi = max(self.rvi, vector)
        self.evaluate()

    def mov_to_cr8(self, value: int) -> None:
        """30.3: MOV to CR8 stores bits 3:0 into VTPR[7:4], clears the rest of VTPR, TPR virtualization."""
        self.page.vtpr = (value & 0xF) << 4
        self.tpr_virtualization()

    def mov_from_cr8(self) -> int:
        """30.3: MOV from CR8 returns VTPR[7:4]."""
        return (self.page.vtpr & 0xFF) >> 4

    # ---------------------------------------------------- 30.4 APIC-access page
    def _access_exit(self, offset: int, write: bool) -> ApicvExit:
        qual = ApicAccessQualification(offset, ApicAccessType.LINEAR_WRITE if write
                                       else ApicAccessType.LINEAR_READ)
        return ApicvExit(ExitReason.APIC_ACCESS, qual.encode(),
                         f"{'write' if write else 'read'} of APIC-access page offset {offset:#x}")

    @staticmethod
    def _register(offset: int, size: int) -> int | None:
        """The 16-byte-aligned register an access falls entirely within bytes 3:0 of, else None."""
        if size not in (1, 2, 4) or (offset & 0xF) + size > 4:
            return None
        return offset & 0xFF0

    def read(self, offset: int, size: int) -> int:
        """A guest data read of ``size`` bytes at ``offset`` on the APIC-access page (30.4.2).

        Virtualized reads return the virtual-APIC page's bytes; the rest raise an APIC-access VM exit.
        """
        c = self.controls
        reg = self._register(offset, size)
        if c.apic_register_virtualization:
            ok = reg in _ARV_READ
        else:
            ok = reg == A.TPR  # 30.4.2: only VTPR, with "use TPR shadow" 1
        if not (ok and c.use_tpr_shadow):
            raise self._access_exit(offset, write=False)
        return self.page.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest data write on the APIC-access page (30.4.3): virtualized onto the virtual-APIC page,
        then APIC-write emulation (30.4.3.2); or an APIC-access VM exit before the write."""
        c = self.controls
        reg = self._register(offset, size)
        if not c.use_tpr_shadow:
            ok = False
        elif c.apic_register_virtualization:
            ok = reg in _ARV_WRITE
        elif c.virtual_interrupt_delivery:
            ok = reg in _VID_WRITE and offset & 0xF == 0  # 30.4.3.1: "page offset is 080H, 0B0H, 300H"
        else:
            ok = reg == A.TPR and offset == A.TPR
        if not ok:
            raise self._access_exit(offset, write=True)
        self.page.write(offset, size, value)
        self._apic_write_emulation(reg)

    def _apic_write_emulation(self, reg: int) -> None:
        """30.4.3.2, after the write has completed."""
        vid = self.controls.virtual_interrupt_delivery
        if reg == A.TPR:
            self.page.vtpr = self.page.vtpr & 0xFF  # clears bytes 3:1 of VTPR
            self.tpr_virtualization()
        elif reg == A.EOI and vid:
            self.page.veoi = 0
            self.eoi_virtualization()
        elif reg == A.ICR_LOW and vid and self._vicr_is_self_ipi(self.page.vicr_lo):
            self.self_ipi_virtualization(self.page.vicr_lo & 0xFF)
        elif reg == A.ICR_HIGH:
            self.page.vicr_hi = self.page.vicr_hi & 0xFF00_0000  # clears bytes 2:0 of VICR_HI
        else:
            # 30.4.3.3: trap-like APIC-write VM exit, qualification = the page offset.
            raise ApicvExit(ExitReason.APIC_WRITE, reg, f"APIC write to offset {reg:#x}")

    @staticmethod
    def _vicr_is_self_ipi(icr: int) -> bool:
        """30.4.3.2: reserved bits 0, shorthand 01 (self), edge, fixed, vector bits 7:4 not 0000."""
        return (not icr & _VICR_RESERVED and icr & (3 << 18) == A.SHORTHAND_SELF
                and not icr & A.ICR_TRIGGER_LEVEL and icr >> 8 & 7 == A.DM_FIXED and icr & 0xF0 != 0)

    # ------------------------------------------------------------- 30.5 x2APIC
    def rdmsr(self, msr: int) -> int | None:
        """RDMSR of 800H-8FFH with "virtualize x2APIC mode" 1 (30.5) after the MSR bitmap let it through.

        Returns the 64-bit value from the virtual-APIC page, or None when the read is not virtualized (it
        then behaves as without APICv: the VMM's x2APIC emulation or #GP).
        """
        c = self.controls
        if not c.virtualize_x2apic_mode or not 0x800 <= msr <= 0x8FF:
            return None
        if msr == 0x808 or c.apic_register_virtualization:
            # 30.5: the 8 bytes at page offset (ECX & FFH) << 4 - with APIC-register virtualization for
            # every ECX in 800H-8FFH (so 830H gives VICR_LO and the 4 bytes after it, not VICR_HI).
            return self.page.read((msr & 0xFF) << 4, 8)
        return None

    def wrmsr(self, msr: int, value: int) -> bool:
        """WRMSR of 800H-8FFH with "virtualize x2APIC mode" 1 (30.5); True when virtualized."""
        c = self.controls
        if not c.virtualize_x2apic_mode or not 0x800 <= msr <= 0x8FF:
            return False
        if msr == 0x808:
            if value >> 8:
                raise ApicvGP("WRMSR 808H: bits 63:8 must be 0 (SDM 30.5)")
            self.page.write(A.TPR, 8, value)
            self.tpr_virtualization()
            return True
        if not c.virtual_interrupt_delivery:
            return False
        if msr == 0x80B:
            if value:
                raise ApicvGP("WRMSR 80BH: a non-zero EOI value (SDM 30.5)")
            self.page.write(A.EOI, 8, 0)
            self.eoi_virtualization()
            return True
        if msr == 0x83F:
            if value >> 8:
                raise ApicvGP("WRMSR 83FH: bits 63:8 must be 0 (SDM 30.5)")
            self.page.write(A.SELF_IPI, 8, value)
            if value & 0xF0:
                self.self_ipi_virtualization(value & 0xFF)
            else:
                raise ApicvExit(ExitReason.APIC_WRITE, A.SELF_IPI, "self IPI with an illegal vector")
            return True
        return False

    # -------------------------------------------------- 30.6 posted interrupts
    def process_posted_interrupts(self, descriptor: PostedInterruptDescriptor) -> int:
        """30.6 steps 3-7, after the local APIC delivered the notification vector: clear ON (the EOI to the
        physical APIC is the caller's), VIRR |= PIR and PIR = 0, RVI = max(RVI, highest PIR bit),
        evaluation. Returns the PIR bits taken."""
        descriptor.on = False
        pir = descriptor.pir
        descriptor.pir = 0
        for vector in range(256):
            if pir >> vector & 1:
                self.page.set_virr(vector)
        if pir:
            self.rvi = max(self.rvi, pir.bit_length() - 1)
        self.evaluate()
        return pir
