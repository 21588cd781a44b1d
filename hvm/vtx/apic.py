"""The local APIC as data and rules: Intel SDM Vol. 3A, chapter 11 "Advanced Programmable Interrupt
Controller".

One :class:`LocalApic` is one processor's local APIC, in software, with no CPU
behind it: the VMM (or a test) drives it through the same three interfaces a
guest uses plus the processor's side of interrupt delivery::

    apic = LocalApic(tsc_hz=2_000_000_000)      # xAPIC mode at 0xFEE00000, like after reset
    apic.write(SVR, 0x1FF)                      # xAPIC MMIO page, offset -> 32-bit value
    apic.write(LVT_TIMER, 0x20 | TIMER_PERIODIC, now=tsc)
    apic.write(TIMER_ICR, 100_000, now=tsc)     # the timer runs from the caller's clock
    apic.tick(now=later_tsc)                    # fires expirations up to ``now`` into the IRR
    apic.pending()                              # 0x20: highest IRR vector above the PPR's class
    apic.ack()                                  # INTA: IRR -> ISR, returns 0x20
    apic.write(EOI, 0)                          # clears the highest ISR bit
    apic.wrmsr(0x1B, base | EN | EXTD)          # IA32_APIC_BASE: into x2APIC mode
    apic.wrmsr(0x830, (0 << 32) | SHORTHAND_SELF | 0x40)    # x2APIC ICR: a self-IPI
    apic.rdmsr(0x80B)                           # raises ApicGP: EOI is write-only (SDM 11.12.1.2)

Time is an explicit argument everywhere (``now``, in ticks of the guest TSC), so
the timer is deterministic: the count-down timer runs at ``bus_hz`` divided by
the divide configuration (``bus_hz`` defaults to 1 GHz, the 1 ns APIC bus cycle
KVM and QEMU give their guests), TSC-deadline mode compares ``now`` with
IA32_TSC_DEADLINE directly. Calls without ``now`` use the last time seen.

The register file is one 4-KByte page in the xAPIC layout (Table 11-1), the
same layout as the VMX virtual-APIC page (SDM Vol. 3C 30.1), so
:mod:`hvm.vtx.apicv` can use this page as a virtual-APIC page.

A single processor: IPIs that reach this APIC (shorthand self or all-including-
self, or a physical/logical destination that matches it) with fixed or
lowest-priority delivery are accepted into its own IRR; everything else (other
destinations, NMI/INIT/SIPI/SMI) is recorded in :attr:`LocalApic.sent` and
otherwise dropped. Section numbers are those of the current SDM (in editions
before 2023 the APIC chapter is 10, e.g. 10.8.3.1 for 11.8.3.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# --- xAPIC register offsets (SDM 11.4.1, Table 11-1 "Local APIC Register Address Map") ---
ID = 0x20
VERSION = 0x30
TPR = 0x80
APR = 0x90
PPR = 0xA0
EOI = 0xB0
RRD = 0xC0
LDR = 0xD0
DFR = 0xE0
SVR = 0xF0
ISR = 0x100  # 0x100-0x170, eight 32-bit words, vectors 0-255
TMR = 0x180
IRR = 0x200
ESR = 0x280
LVT_CMCI = 0x2F0
ICR_LOW = 0x300
ICR_HIGH = 0x310
LVT_TIMER = 0x320
LVT_THERMAL = 0x330
LVT_PERF = 0x340
LVT_LINT0 = 0x350
LVT_LINT1 = 0x360
LVT_ERROR = 0x370
TIMER_ICR = 0x380  # initial count
TIMER_CCR = 0x390  # current count
TIMER_DCR = 0x3E0  # divide configuration
SELF_IPI = 0x3F0  # x2APIC only (MSR 0x83F)

APIC_MMIO_BASE = 0xFEE0_0000  # SDM 11.4.1: default base after power-up or reset
PAGE_SIZE = 0x1000

# --- MSRs ---
MSR_APIC_BASE = 0x1B  # IA32_APIC_BASE (SDM 11.4.4)
MSR_TSC_DEADLINE = 0x6E0  # IA32_TSC_DEADLINE (SDM 11.5.4.1)
X2APIC_MSR_FIRST, X2APIC_MSR_LAST = 0x800, 0x8FF  # SDM 11.12.1.2
MSR_X2APIC_ICR = 0x830
MSR_X2APIC_SELF_IPI = 0x83F

# IA32_APIC_BASE bits (SDM 11.4.4, Figure 11-5; 11.12.1, Table 11-5)
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_EN = 1 << 11

#: Version register as KVM (in-kernel irqchip) and QEMU report it: version 0x14, max LVT entry 5 (six
#: LVT entries: timer, thermal, perf, LINT0, LINT1, error), bit 24 (EOI-broadcast suppression) 0.
#: KVM: arch/x86/kvm/lapic.c kvm_apic_set_version (APIC_VERSION | (nr_lvt_entries - 1) << 16);
#: QEMU: hw/intc/apic.c (s->version | (APIC_LVT_NB - 1) << 16).
VERSION_VALUE = 0x0005_0014

# SVR bits (SDM 11.9, Figure 11-23)
SVR_ENABLE = 1 << 8
# LVT bits (SDM 11.5.1, Figure 11-8)
LVT_MASKED = 1 << 16
LVT_DELIVERY_STATUS = 1 << 12
TIMER_MODE_SHIFT = 17
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0 << 17, 1 << 17, 2 << 17
TIMER_MODE_MASK = 3 << 17
# ICR bits (SDM 11.6.1, Figure 11-12)
ICR_DELIVERY_MODE_SHIFT = 8
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP = 0, 1, 2, 4, 5, 6
ICR_DEST_LOGICAL = 1 << 11
ICR_DELIVERY_STATUS = 1 << 12
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = 0 << 18, 1 << 18, 2 << 18, 3 << 18
# ESR bits (SDM 11.5.3, Figure 11-9)
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

_LVT_OFFSETS = (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)
# Writable bits of each register (SDM 11.5.1 Figure 11-8, 11.6.1 Figure 11-12, 11.9 Figure 11-23,
# 11.5.4 Figure 11-10); the others are reserved or read-only and keep their value.
_WRITABLE = {
    TPR: 0xFF,
    LDR: 0xFF00_0000,
    DFR: 0xF000_0000,
    SVR: 0x3FF,  # vector, APIC software enable, focus processor checking
    LVT_CMCI: 0x1_07FF,  # vector, delivery mode, mask
    LVT_TIMER: 0x7_00FF,  # vector, mask, timer mode
    LVT_THERMAL: 0x1_07FF,
    LVT_PERF: 0x1_07FF,
    LVT_LINT0: 0x1_A7FF,  # vector, delivery mode, polarity, trigger mode, mask
    LVT_LINT1: 0x1_A7FF,
    LVT_ERROR: 0x1_00FF,  # vector, mask
    TIMER_DCR: 0xB,
    ICR_LOW: 0xC_CFFF,  # vector, delivery mode, destination mode, level, trigger, shorthand
    ICR_HIGH: 0xFF00_0000,
}
# x2APIC ICR bits that are reserved (SDM 11.12.9, Figure 11-28): 31:20, 17:16, 13 and 12 (delivery
# status is gone in x2APIC mode). KVM (kvm_x2apic_icr_write) answers a write with any of them set with #GP.
_X2APIC_ICR_RESERVED = 0xFFF0_0000 | 0x3_0000 | 1 << 13 | 1 << 12

# xAPIC registers by access (Table 11-1).
_XAPIC_READABLE = frozenset(
    [ID, VERSION, TPR, APR, PPR, RRD, LDR, DFR, SVR, ESR, ICR_LOW, ICR_HIGH, TIMER_ICR, TIMER_CCR,
     TIMER_DCR, *_LVT_OFFSETS, *range(ISR, IRR + 0x80, 0x10)]
)
_XAPIC_WRITABLE = frozenset([ID, TPR, EOI, LDR, DFR, SVR, ESR, ICR_LOW, ICR_HIGH, TIMER_ICR, TIMER_DCR,
                             *_LVT_OFFSETS])
# x2APIC MSRs by access (SDM 11.12.1.2, Table 11-6): no APR, RRD, DFR or ICR high; ID and LDR read-only;
# EOI and SELF IPI write-only; ICR one 64-bit MSR.
_X2APIC_READABLE = frozenset(
    [ID, VERSION, TPR, PPR, LDR, SVR, ESR, ICR_LOW, TIMER_ICR, TIMER_CCR, TIMER_DCR, *_LVT_OFFSETS,
     *range(ISR, IRR + 0x80, 0x10)]
)
_X2APIC_WRITABLE = frozenset([TPR, EOI, SVR, ESR, ICR_LOW, TIMER_ICR, TIMER_DCR, SELF_IPI, *_LVT_OFFSETS])


def x2apic_readable(msr: int) -> bool:
    """Is ``msr`` a readable x2APIC register (SDM 11.12.1.2, Table 11-6)?"""
    return X2APIC_MSR_FIRST <= msr <= X2APIC_MSR_LAST and x2apic_offset(msr) in _X2APIC_READABLE

_MASK32 = 0xFFFF_FFFF
SENT_KEPT = 256


class ApicGP(Exception):
    """The access raises #GP(0) in the guest (SDM 11.4.4, 11.12.1.2, 11.12.5 state the cases)."""


@dataclass(frozen=True)
class Ipi:
    """An IPI this APIC sent that it did not deliver to itself (a single-processor model)."""

    vector: int
    delivery_mode: int
    destination: int
    shorthand: int
    logical: bool


def timer_divisor(dcr: int) -> int:
    """SDM 11.5.4, Figure 11-10: divide configuration bits 3,1:0 -> 2, 4, ..., 128, 1."""
    code = (dcr & 3) | (dcr >> 1) & 4
    return 1 << ((code + 1) & 7)


def priority_class(vector: int) -> int:
    return vector >> 4


def x2apic_offset(msr: int) -> int:
    """SDM 11.12.1.2: MSR address = 0x800 + (MMIO offset >> 4)."""
    return (msr - X2APIC_MSR_FIRST) << 4


class LocalApic:
    """One local APIC (xAPIC and x2APIC modes, SDM Vol. 3A chapter 11); ``now`` is guest TSC ticks."""

    def __init__(self, apic_id: int = 0, *, tsc_hz: int = 1_000_000_000, bus_hz: int = 1_000_000_000,
                 bsp: bool = True, page: bytearray | memoryview | None = None) -> None:
        if tsc_hz <= 0 or bus_hz <= 0:
            raise ValueError("tsc_hz and bus_hz must be positive")
        self.apic_id = apic_id
        self.tsc_hz = int(tsc_hz)
        self.bus_hz = int(bus_hz)
        self.page = page if page is not None else bytearray(PAGE_SIZE)
        if len(self.page) != PAGE_SIZE:
            raise ValueError("the APIC register page is 4 KBytes")
        self.base = APIC_MMIO_BASE | APIC_BASE_EN | (APIC_BASE_BSP if bsp else 0)
        self.now = 0
        #: IPIs not delivered here (other destinations, NMI/INIT/SIPI/SMI), the latest :data:`SENT_KEPT`;
        #: ``stats["ipi_elsewhere"]`` counts them all.
        self.sent: list[Ipi] = []
        #: Counts of what happened, for experiments: timer expirations, IPIs delivered to self, EOIs.
        self.stats = {"timer": 0, "self_ipi": 0, "eoi": 0, "coalesced": 0, "ipi_elsewhere": 0}
        #: Where this APIC's own interrupt sources (timer, IPIs to itself, LVT error) send a vector:
        #: ``accept(vector, level) -> bool``, by default :meth:`set_irr`. A VMM that posts interrupts
        #: (SDM Vol. 3C 30.6) or injects them by another path replaces it.
        self.accept: Callable[[int, bool], bool] = self.set_irr
        #: Called with the vector when an EOI retires a level-triggered interrupt (its TMR bit set):
        #: SDM 11.8.5, the local APIC then broadcasts an EOI message to the I/O APICs. (The version
        #: register reports no EOI-broadcast suppression, so every such EOI is broadcast.)
        self.level_eoi: Callable[[int], None] | None = None
        self._reset_registers()

    # ----------------------------------------------------------------- state
    def _reset_registers(self) -> None:
        """SDM 11.4.7.1: state after power-up, reset, or a hardware disable."""
        self.page[:] = bytes(PAGE_SIZE)
        self._set(ID, (self.apic_id & 0xFF) << 24)
        self._set(VERSION, VERSION_VALUE)
        self._set(DFR, _MASK32)
        self._set(SVR, 0xFF)
        for lvt in _LVT_OFFSETS:
            self._set(lvt, LVT_MASKED)
        self._esr_pending = 0
        # The timer's registers as last written through this APIC. The page may hold newer values
        # before the VMM hears of them (APICv's trap-like APIC-write exits, SDM Vol. 3C 30.4.3.3), so
        # the timer runs from these (as KVM keeps its own lapic_timer state).
        self._lvtt = LVT_MASKED
        self._initial = 0
        self._dcr = 0
        self._periods = 0  # periods of a periodic count completed since _timer_start
        self._timer_start = 0  # bus-clock reference of the count-down timer (in TSC ticks)
        self._timer_armed = False
        self._tsc_deadline = 0

    def _get(self, offset: int) -> int:
        return int.from_bytes(self.page[offset : offset + 4], "little")

    def _set(self, offset: int, value: int) -> None:
        self.page[offset : offset + 4] = (value & _MASK32).to_bytes(4, "little")

    @property
    def hw_enabled(self) -> bool:
        return bool(self.base & APIC_BASE_EN)

    @property
    def x2apic(self) -> bool:
        return self.base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD

    @property
    def sw_enabled(self) -> bool:
        return bool(self._get(SVR) & SVR_ENABLE)

    @property
    def mmio_base(self) -> int:
        return self.base & ~0xFFF & ((1 << 52) - 1)

    # ------------------------------------------------------ vector bit arrays
    def _bit(self, array: int, vector: int) -> bool:
        return bool(self._get(array + (vector >> 5) * 0x10) >> (vector & 31) & 1)

    def _setbit(self, array: int, vector: int, on: bool) -> None:
        offset = array + (vector >> 5) * 0x10
        word = self._get(offset)
        self._set(offset, word | 1 << (vector & 31) if on else word & ~(1 << (vector & 31)))

    def _highest(self, array: int) -> int | None:
        for i in range(7, -1, -1):
            word = self._get(array + i * 0x10)
            if word:
                return i * 32 + word.bit_length() - 1
        return None

    def irr(self, vector: int) -> bool:
        return self._bit(IRR, vector)

    def isr(self, vector: int) -> bool:
        return self._bit(ISR, vector)

    def tmr(self, vector: int) -> bool:
        return self._bit(TMR, vector)

    def highest_irr(self) -> int | None:
        return self._highest(IRR)

    def highest_isr(self) -> int | None:
        return self._highest(ISR)

    # ------------------------------------------------------------ priorities
    def ppr(self) -> int:
        """SDM 11.8.3.1: PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV & 0xF0 (ISRV: highest ISR vector)."""
        tpr = self._get(TPR) & 0xFF
        isrv = self._highest(ISR) or 0
        return tpr if priority_class(tpr) >= priority_class(isrv) else isrv & 0xF0

    def apr(self) -> int:
        """SDM 11.6.2.4: APR = TPR if TPR[7:4] >= IRRV[7:4] and TPR[7:4] > ISRV[7:4], else the top class."""
        tpr = self._get(TPR) & 0xFF
        isrv = self._highest(ISR) or 0
        irrv = self._highest(IRR) or 0
        if priority_class(tpr) >= priority_class(irrv) and priority_class(tpr) > priority_class(isrv):
            return tpr
        return max(tpr & 0xF0, isrv & 0xF0, irrv & 0xF0)

    # ------------------------------------------------ the processor's side
    def set_irr(self, vector: int, level: bool = False) -> bool:
        """Accept a fixed interrupt (SDM 11.8.4): set its IRR bit (and TMR for level-triggered).

        Returns False when the vector was not newly set: already pending (the two coalesce),
        an illegal vector 0-15 (SDM 11.5.2: logged as "receive illegal vector" in the ESR), or the
        APIC is hardware-disabled (SDM 11.4.3: it then accepts nothing).
        """
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"vector {vector} out of range 0-255")
        if not self.hw_enabled:
            return False
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return False
        self._setbit(TMR, vector, level)
        if self._bit(IRR, vector):
            self.stats["coalesced"] += 1
            return False
        self._setbit(IRR, vector, True)
        return True

    def pending(self) -> int | None:
        """SDM 11.8.3.1/11.8.4: the highest IRR vector whose priority class is above the PPR's, else None."""
        if not self.hw_enabled:
            return None
        irrv = self._highest(IRR)
        if irrv is None or priority_class(irrv) <= priority_class(self.ppr()):
            return None
        return irrv

    def ack(self) -> int:
        """The processor's interrupt acknowledge (SDM 11.8.4): move the pending vector from IRR to ISR.

        With nothing deliverable (e.g. the TPR was raised after the request) the APIC answers with
        the spurious-interrupt vector from the SVR and changes no ISR bit (SDM 11.9).
        """
        vector = self.pending()
        if vector is None:
            return self._get(SVR) & 0xFF
        self._setbit(IRR, vector, False)
        self._setbit(ISR, vector, True)
        return vector

    def eoi(self) -> int | None:
        """SDM 11.8.5: clear the highest-priority ISR bit; returns its vector (None if ISR was empty)."""
        vector = self._highest(ISR)
        if vector is not None:
            self._setbit(ISR, vector, False)
            self.stats["eoi"] += 1
            if self._bit(TMR, vector) and self.level_eoi is not None:
                self.level_eoi(vector)  # SDM 11.8.5: the EOI message to the I/O APIC(s)
        return vector

    def set_trigger_mode(self, vector: int, level: bool) -> None:
        """The TMR bit of an interrupt accepted by another path (posted, SDM Vol. 3C 30.6) - as KVM's
        __apic_accept_irq keeps TMR with APICv too."""
        self._setbit(TMR, vector, level)

    def matches(self, destination: int, logical: bool) -> bool:
        """Whether an interrupt message's destination (physical APIC ID or logical mask) names this APIC."""
        return self._matches(destination, logical)

    def _error(self, bits: int) -> None:
        """SDM 11.5.3: record an error and, if its LVT entry is unmasked, signal the error interrupt."""
        self._esr_pending |= bits
        lvt = self._get(LVT_ERROR)
        if not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self.accept(lvt & 0xFF, False)

    # ----------------------------------------------------------------- timer
    def _timer_mode(self) -> int:
        return self._lvtt & TIMER_MODE_MASK

    def _bus_ticks(self, tsc_delta: int) -> int:
        return tsc_delta * self.bus_hz // self.tsc_hz

    def _tsc_for_bus(self, bus_ticks: int) -> int:
        # The earliest TSC delta whose bus-tick count reaches ``bus_ticks`` (ceil division).
        return -(-bus_ticks * self.tsc_hz // self.bus_hz)

    def _period_bus(self) -> int:
        """Bus cycles in one full count of the initial count at the current divisor."""
        return self._initial * timer_divisor(self._dcr)

    def current_count(self) -> int:
        """SDM 11.5.4: the current-count register, counting down from the initial count at bus/divisor."""
        if self._timer_mode() == TIMER_TSC_DEADLINE or not self._timer_armed:
            return 0  # SDM 11.5.4.1: reads 0 in TSC-deadline mode; 0 once a one-shot count reached 0
        initial = self._initial
        elapsed = self._bus_ticks(self.now - self._timer_start) // timer_divisor(self._dcr)
        if self._timer_mode() == TIMER_PERIODIC:
            return initial - elapsed % initial
        return max(initial - elapsed, 0)

    def next_deadline(self) -> int | None:
        """The TSC value at which the timer next expires (possibly already passed), or None if unarmed."""
        if not self._timer_armed or not self.hw_enabled:
            return None
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            return self._tsc_deadline
        # The earliest TSC value by which the bus clock completes the next period (exact in bus
        # cycles: periods shorter than a TSC tick are not rounded up to one).
        return self._timer_start + self._tsc_for_bus((self._periods + 1) * self._period_bus())

    def tick(self, now: int) -> int:
        """Advance time to ``now``; timer expirations up to then set the LVT timer vector in the IRR.

        Returns how many expirations happened (several periods of a periodic timer coalesce into one
        IRR bit, SDM 11.8.4). Time never runs backwards: an earlier ``now`` counts as the latest seen.
        """
        now = max(now, self.now)
        self.now = now
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return 0
        mode = self._timer_mode()
        if mode == TIMER_TSC_DEADLINE:
            fired = 1
            self._timer_armed = False
            self._tsc_deadline = 0  # SDM 11.5.4.1: the MSR reads 0 after the timer fires
        elif mode == TIMER_PERIODIC:
            # SDM 11.5.4: the count reloads from the initial count and keeps counting.
            periods = self._bus_ticks(now - self._timer_start) // self._period_bus()
            fired = periods - self._periods
            self._periods = periods
        else:
            fired = 1
            self._timer_armed = False
        self.stats["timer"] += fired
        lvt = self._lvtt
        # SDM 11.5.1: a masked LVT entry inhibits the interrupt; the count still runs.
        if not lvt & LVT_MASKED:
            self.accept(lvt & 0xFF, False)
        return fired

    def _update(self, now: int | None) -> None:
        if now is not None:
            self.tick(now)

    # ------------------------------------------------------------------- IPIs
    def _send_ipi(self, icr: int, destination: int) -> None:
        """SDM 11.6.1: issue the IPI described by ICR bits 19:0 to ``destination``."""
        vector = icr & 0xFF
        mode = icr >> ICR_DELIVERY_MODE_SHIFT & 7
        shorthand = icr & (3 << ICR_SHORTHAND_SHIFT)
        logical = bool(icr & ICR_DEST_LOGICAL)
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)  # SDM 11.5.2
            return
        if shorthand == SHORTHAND_SELF or shorthand == SHORTHAND_ALL:
            to_self = True
        elif shorthand == SHORTHAND_OTHERS:
            to_self = False
        else:
            to_self = self._matches(destination, logical)
        handled = mode in (DM_FIXED, DM_LOWEST)
        if to_self and handled:
            self.stats["self_ipi"] += 1
            self.accept(vector, bool(icr & ICR_TRIGGER_LEVEL))
        # Whatever would also (or only) reach another processor, or that this model does not deliver
        # (SMI, NMI, INIT, SIPI), is recorded: there is no other processor.
        only_self = shorthand == SHORTHAND_SELF or (
            shorthand == SHORTHAND_NONE and to_self and destination not in (0xFF, 0xFFFF_FFFF))
        if not (only_self and handled):
            self.stats["ipi_elsewhere"] += 1
            self.sent.append(Ipi(vector, mode, destination, shorthand, logical))
            if len(self.sent) > SENT_KEPT:
                del self.sent[0]  # a guest sending IPIs in a loop must not grow the VMM without bound

    def _matches(self, destination: int, logical: bool) -> bool:
        """Whether a destination names this APIC (SDM 11.6.2.1, 11.6.2.2; 11.12.9, 11.12.10)."""
        if self.x2apic:
            if not logical:
                return destination in (self.apic_id, 0xFFFF_FFFF)  # 11.12.9: all ones broadcasts
            ldr = self._x2apic_ldr()
            # 11.12.10.2: cluster ID in bits 31:16 must match, then the 16-bit mask.
            return destination == 0xFFFF_FFFF or (
                destination >> 16 == ldr >> 16 and bool(destination & ldr & 0xFFFF))
        destination &= 0xFF
        if not logical:
            return destination in (self.apic_id & 0xFF, 0xFF)  # 11.6.2.1: 0xFF is broadcast
        if destination == 0xFF:
            return True
        ldr = self._get(LDR) >> 24
        if self._get(DFR) >> 28 == 0xF:  # 11.6.2.2 flat model: bit mask
            return bool(destination & ldr)
        # cluster model: high nibble cluster, low nibble mask
        return destination >> 4 == ldr >> 4 and bool(destination & ldr & 0xF)

    def _x2apic_ldr(self) -> int:
        """SDM 11.12.10.2: logical x2APIC ID = (x2APIC ID[19:4] << 16) | 1 << x2APIC ID[3:0]."""
        return (self.apic_id >> 4) << 16 | 1 << (self.apic_id & 0xF)

    # -------------------------------------------------------- register access
    def _read_reg(self, offset: int) -> int:
        if offset == PPR:
            return self.ppr()
        if offset == APR:
            return self.apr()
        if offset == TIMER_CCR:
            return self.current_count()
        if offset == ID and self.x2apic:
            return self.apic_id
        if offset == LDR and self.x2apic:
            return self._x2apic_ldr()
        return self._get(offset)

    def _write_reg(self, offset: int, value: int) -> None:
        value &= _MASK32
        if offset == EOI:
            self.eoi()
        elif offset == ESR:
            # SDM 11.5.3: a write loads the ESR with the errors detected since the last write.
            self._set(ESR, self._esr_pending)
            self._esr_pending = 0
        elif offset == ID:
            self._set(ID, value & 0xFF00_0000)
            self.apic_id = value >> 24
        elif offset == ICR_LOW:
            self._set(ICR_LOW, value & _WRITABLE[ICR_LOW])
            self._send_ipi(value, self._get(ICR_HIGH) >> 24)
        elif offset == SVR:
            self._set(SVR, value & _WRITABLE[SVR])
            if not value & SVR_ENABLE:
                # SDM 11.4.7.2: software-disabling the APIC sets every LVT mask bit.
                for lvt in _LVT_OFFSETS:
                    self._set(lvt, self._get(lvt) | LVT_MASKED)
                self._lvtt |= LVT_MASKED
        elif offset in _LVT_OFFSETS:
            value &= _WRITABLE[offset]
            if not self.sw_enabled:
                value |= LVT_MASKED  # SDM 11.4.7.2: masks cannot be cleared while software-disabled
            if offset == LVT_TIMER:
                if (value ^ self._lvtt) & TIMER_MODE_MASK:
                    # SDM 11.5.4.1: "A write to the LVT Timer Register that changes the timer mode
                    # disarms the local APIC timer."
                    self._timer_armed = False
                    self._tsc_deadline = 0
                self._lvtt = value
            self._set(offset, value | self._get(offset) & LVT_DELIVERY_STATUS)
        elif offset == TIMER_ICR:
            if self._timer_mode() == TIMER_TSC_DEADLINE:
                return  # SDM 11.5.4.1: writes to the initial-count register are ignored
            # SDM 11.5.4: writing the initial count (re)starts the count; 0 stops the timer.
            self._set(TIMER_ICR, value)
            self._initial = value
            self._timer_start = self.now
            self._periods = 0
            self._timer_armed = value != 0
        elif offset == TIMER_DCR:
            # Keep the current count across a divisor change, continuing at the new rate.
            if self._timer_armed and self._timer_mode() != TIMER_TSC_DEADLINE:
                remaining = self.current_count()
                self._dcr = value & _WRITABLE[TIMER_DCR]
                consumed = self._initial - remaining
                self._timer_start = self.now - self._tsc_for_bus(consumed * timer_divisor(value))
                self._periods = 0
            else:
                self._dcr = value & _WRITABLE[TIMER_DCR]
            self._set(TIMER_DCR, self._dcr)
        elif offset == SELF_IPI:
            # SDM 11.12.11: a self IPI, fixed delivery, edge-triggered, vector in bits 7:0.
            self._send_ipi(value & 0xFF | SHORTHAND_SELF, 0)
        else:
            self._set(offset, value & _WRITABLE[offset] | self._get(offset) & ~_WRITABLE[offset])

    # xAPIC: the memory-mapped page (SDM 11.4.1)
    def read(self, offset: int, now: int | None = None) -> int:
        """A 32-bit read of the xAPIC page at ``offset`` (0-0xFF0, 16-byte aligned).

        Reserved offsets read 0 and set "illegal register address" in the ESR (SDM 11.5.3); write-
        only EOI reads 0. In x2APIC mode the page is not decoded (SDM 11.12.1.2) and reads return 0.
        """
        self._update(now)
        offset &= 0xFF0
        if not self.hw_enabled or self.x2apic:
            return 0
        if offset not in _XAPIC_READABLE:
            if offset != EOI:
                self._error(ESR_ILLEGAL_REGISTER)
            return 0
        return self._read_reg(offset)

    def write(self, offset: int, value: int, now: int | None = None) -> None:
        """A 32-bit write of the xAPIC page at ``offset``; read-only and reserved registers ignore it."""
        self._update(now)
        offset &= 0xFF0
        if not self.hw_enabled or self.x2apic:
            return
        if offset not in _XAPIC_WRITABLE:
            if offset not in _XAPIC_READABLE:
                self._error(ESR_ILLEGAL_REGISTER)
            return
        self._write_reg(offset, value)

    def mmio_read(self, offset: int, size: int, now: int | None = None) -> int:
        """A ``size``-byte read at any byte ``offset`` in the page: bytes of the 32-bit register there."""
        shift = (offset & 3) * 8
        if offset & 0xF >= 4:
            return 0
        return self.read(offset & 0xFF0, now) >> shift & ((1 << 8 * size) - 1)

    def mmio_write(self, offset: int, size: int, value: int, now: int | None = None) -> None:
        """Writes reach a register only as an aligned 32-bit store (SDM 11.4.1: "must be 32-bit")."""
        if size == 4 and offset & 0xF == 0:
            self.write(offset, value, now)
        elif size == 8 and offset & 0xF == 0:
            self.write(offset, value & _MASK32, now)
        else:
            self._update(now)

    # MSRs: IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC range
    def handles_msr(self, msr: int) -> bool:
        return msr in (MSR_APIC_BASE, MSR_TSC_DEADLINE) or X2APIC_MSR_FIRST <= msr <= X2APIC_MSR_LAST

    def rdmsr(self, msr: int, now: int | None = None) -> int:
        self._update(now)
        if msr == MSR_APIC_BASE:
            return self.base
        if msr == MSR_TSC_DEADLINE:
            # SDM 11.5.4.1: reads 0 outside TSC-deadline mode and once the timer has fired.
            return self._tsc_deadline if self._timer_mode() == TIMER_TSC_DEADLINE else 0
        offset = self._x2apic_offset(msr)
        if offset not in _X2APIC_READABLE:
            raise ApicGP(f"RDMSR {msr:#x}: not a readable x2APIC register (SDM 11.12.1.2)")
        if offset == ICR_LOW:
            return self._get(ICR_HIGH) << 32 | self._get(ICR_LOW)
        return self._read_reg(offset)

    def wrmsr(self, msr: int, value: int, now: int | None = None) -> None:
        self._update(now)
        if not 0 <= value < 1 << 64:
            raise ValueError("MSR values are 64-bit")
        if msr == MSR_APIC_BASE:
            self._write_apic_base(value)
            return
        if msr == MSR_TSC_DEADLINE:
            if self._timer_mode() == TIMER_TSC_DEADLINE and self.hw_enabled:
                # SDM 11.5.4.1: a non-zero value arms the timer, zero disarms it; a past deadline fires
                # at once (on the next tick).
                self._tsc_deadline = value
                self._timer_armed = value != 0
            return
        offset = self._x2apic_offset(msr)
        if offset not in _X2APIC_WRITABLE:
            raise ApicGP(f"WRMSR {msr:#x}: not a writable x2APIC register (SDM 11.12.1.2)")
        if offset == ICR_LOW:
            if value & _X2APIC_ICR_RESERVED:
                raise ApicGP(f"WRMSR {msr:#x}: reserved ICR bits set in {value:#x} (SDM 11.12.9)")
            self._set(ICR_HIGH, value >> 32)
            self._set(ICR_LOW, value & _WRITABLE[ICR_LOW])
            # The 64-bit ICR also as 8 bytes at offset 300H (as KVM keeps it in x2APIC mode), where a
            # virtualized RDMSR 830H reads it (SDM Vol. 3C 30.5: the 8 bytes at (ECX & FFH) << 4).
            self._set(ICR_LOW + 4, value >> 32)
            self._send_ipi(value & _MASK32, value >> 32)
            return
        if value >> 32:
            raise ApicGP(f"WRMSR {msr:#x}: bits 63:32 are reserved (SDM 11.12.1.2)")
        if offset in (EOI, ESR) and value:
            raise ApicGP(f"WRMSR {msr:#x}: a non-zero write causes #GP (SDM 11.12.1.2, Table 11-6)")
        if offset == SELF_IPI and value >> 8:
            raise ApicGP(f"WRMSR {msr:#x}: bits 31:8 of SELF IPI are reserved (SDM 11.12.11)")
        self._write_reg(offset, value)

    def _x2apic_offset(self, msr: int) -> int:
        if not X2APIC_MSR_FIRST <= msr <= X2APIC_MSR_LAST:
            raise ApicGP(f"MSR {msr:#x} is not a local-APIC MSR")
        if not self.x2apic:
            raise ApicGP(f"MSR {msr:#x}: x2APIC MSRs #GP unless the APIC is in x2APIC mode (SDM 11.12.1.2)")
        return x2apic_offset(msr)

    def _write_apic_base(self, value: int) -> None:
        """SDM 11.4.4 and 11.12.5 (Figure 11-27, "Local x2APIC State Transitions")."""
        # Bits 7:0 and 9 are reserved, and the base must be below MAXPHYADDR (52 here).
        if value & (0xFF | 1 << 9) or value >> 52:
            raise ApicGP(f"WRMSR IA32_APIC_BASE {value:#x}: reserved bits set (SDM 11.4.4)")
        en, extd = bool(value & APIC_BASE_EN), bool(value & APIC_BASE_EXTD)
        if extd and not en:
            raise ApicGP("WRMSR IA32_APIC_BASE: EXTD=1 with EN=0 is an invalid state (SDM 11.12.5)")
        if self.x2apic and en and not extd:
            raise ApicGP("WRMSR IA32_APIC_BASE: x2APIC -> xAPIC directly is invalid (SDM 11.12.5)")
        if not self.hw_enabled and extd:
            raise ApicGP("WRMSR IA32_APIC_BASE: disabled -> x2APIC directly is invalid (SDM 11.12.5)")
        was_enabled, was_x2apic = self.hw_enabled, self.x2apic
        # The BSP flag is set by the processor at reset; software does not change it.
        self.base = value & ~APIC_BASE_BSP | self.base & APIC_BASE_BSP
        if was_enabled and not en:
            self._reset_registers()  # SDM 11.4.3: a hardware disable returns the APIC to its reset state
        elif extd and not was_x2apic:
            # SDM 11.12.5.1: entering x2APIC mode, the ID register holds the 32-bit x2APIC ID and the
            # LDR the logical x2APIC ID (11.12.10.2); on the page too, so that a virtual-APIC page made
            # of it reads right (as KVM's kvm_apic_set_x2apic_id writes them into apic->regs).
            self._set(ID, self.apic_id)
            self._set(LDR, self._x2apic_ldr())
