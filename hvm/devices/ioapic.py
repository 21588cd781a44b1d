"""An I/O APIC for a VMM that owns the local APIC: Intel 82093AA I/O APIC datasheet (order 290566-001).

Used when the VMM emulates the local APIC itself (the model engine with ``apic="legacy"|"apicv"``,
KVM with ``irqchip="user"``); with KVM's in-kernel irqchip, KVM's own IOAPIC routes the lines.

Registers (datasheet 3.0, Tables 1 and 2): two memory-mapped ones at 0xFEC00000, IOREGSEL (offset
00h, 3.1.1: bits 7:0 select the indirect register) and IOWIN (offset 10h, 3.1.2: the selected
register's 32 bits), and behind them IOAPICID (00h, 3.2.1: bits 27:24 the ID, R/W), IOAPICVER (01h,
3.2.2: bits 23:16 the maximum redirection entry, 17h for 24 entries, bits 7:0 the version, read-only),
IOAPICARB (02h, 3.2.3: bits 27:24 the arbitration ID, read-only) and IOREDTBL[0:23] (10h-3Fh, 3.2.4:
two words per entry, the low one at the even index). Redirection entry fields (3.2.4): vector 7:0,
delivery mode 10:8, destination mode 11, delivery status 12 (RO), polarity 13, remote IRR 14 (RO),
trigger mode 15, mask 16 (1 at reset: default value xxx1 xxxx xxxx xxxxh), destination 63:56.
The version reported, 11h with maximum entry 17h (IOAPICVER = 0x00170011), is the 82093AA's and
what KVM's in-kernel IOAPIC reports (QEMU with -accel kvm uses that one); the ID and the arbitration
ID are 0 after reset and the arbitration register reads the ID, and an index with no register (03h-0Fh,
40h-FFh) reads all ones, as KVM's does (observed with uartirq under QEMU -accel kvm). A version 11h IOAPIC
has no EOI register (that came with the 20h I/O xAPIC), so EOIs arrive only as the local APIC's EOI
messages (:meth:`eoi`). Reserved bits of an entry keep what the guest writes, as KVM and QEMU do.

Delivery (3.2.4): an edge-triggered pin sends one message per rising edge; an edge on a masked pin
is ignored, not held pending. A level-triggered pin sends a message while its line is asserted and
remote IRR is 0; remote IRR is set when the local APIC accepts it and cleared by an EOI message with
the entry's vector (the local APIC sends one when a level-triggered interrupt is retired - its TMR bit
set, SDM Vol. 3A 11.8.5); a line still asserted then is delivered again. Assert/deassert on a masked
level pin has no side effect, but a line still asserted when the entry is unmasked is delivered then
(the level is what the pin sees). ``set_irq``'s ``level`` is the line's asserted state, as KVM's and
QEMU's IOAPICs take it: polarity is stored and read back, not applied. Fixed and lowest-priority
delivery reach the one local APIC when the destination names it (physical ID or logical mask, SDM
11.6.2); SMI, NMI, INIT and ExtINT have no receiver here (no 8259) and are counted in ``stats``.

ISA IRQ n is pin (GSI) n for all 16 ISA lines. On a PC the firmware's ACPI MADT usually declares an
interrupt source override IRQ 0 -> GSI 2 (QEMU wires the PIT to pin 2); there is no PIT and no
firmware table here, so there is no override, as KVM's default routing (identity) without QEMU.

Threading: lines may be driven from any thread (the console input thread); ``set_irq`` only records
the request (delivery status 1, "send pending") and the vCPU thread sends the messages in
:meth:`service`, which the engine calls before it looks for a pending interrupt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x1000
IOREGSEL = 0x00
IOWIN = 0x10
IOAPICID = 0x00
IOAPICVER = 0x01
IOAPICARB = 0x02
IOREDTBL = 0x10
PINS = 24
VERSION = 0x11
VERSION_VALUE = (PINS - 1) << 16 | VERSION  # 0x00170011

# IOREDTBL fields (datasheet 3.2.4)
VECTOR_MASK = 0xFF
DELMOD_SHIFT = 8
DELMOD_FIXED, DELMOD_LOWEST, DELMOD_SMI, DELMOD_NMI, DELMOD_INIT, DELMOD_EXTINT = 0, 1, 2, 4, 5, 7
DESTMOD_LOGICAL = 1 << 11
DELIVS = 1 << 12
INTPOL_LOW = 1 << 13
REMOTE_IRR = 1 << 14
TRIGGER_LEVEL = 1 << 15
MASKED = 1 << 16
DEST_SHIFT = 56
RO_BITS = DELIVS | REMOTE_IRR


class IoApic:
    name = "ioapic"
    base = IOAPIC_BASE
    size = IOAPIC_SIZE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.regsel = 0
        self.id = 0
        self.redir = [MASKED] * PINS  # datasheet 3.2.4: mask bit set at reset
        self.lines = [False] * PINS  # the input pins' levels (asserted or not)
        self._send = [False] * PINS  # a message to send (delivery status)
        #: The local APIC it delivers to: a :class:`hvm.vtx.apic.LocalApic` (``matches``, ``accept``,
        #: ``hw_enabled``, ``level_eoi``), set by :meth:`connect`.
        self.lapic = None
        #: Called when a redirection entry changes (the model's APICv keeps its EOI-exit bitmap by it).
        self.on_change: Callable[[], None] | None = None
        #: Called after set_irq made a message pending (an engine kicks its vCPU to service it).
        self.on_pending: Callable[[], None] | None = None
        self.stats = {"delivered": 0, "eoi": 0, "undeliverable": 0, "reads": 0, "writes": 0}

    def connect(self, lapic) -> None:
        """Deliver to ``lapic`` and receive its EOI messages for level-triggered vectors."""
        self.lapic = lapic
        lapic.level_eoi = self.eoi

    # --- the MMIO window (datasheet 3.1) -------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.stats["reads"] += 1
        if offset == IOREGSEL:
            value = self.regsel
        elif offset == IOWIN:
            with self._lock:
                value = self._read_indirect(self.regsel)
        else:
            return 0
        if size < 4:
            value &= (1 << 8 * size) - 1
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.stats["writes"] += 1
        if offset == IOREGSEL:
            self.regsel = value & 0xFF  # 3.1.1: bits 7:0
        elif offset == IOWIN and size == 4:
            with self._lock:
                self._write_indirect(self.regsel, value & 0xFFFF_FFFF)
            if IOREDTBL <= self.regsel < IOREDTBL + 2 * PINS and self.on_change is not None:
                self.on_change()

    def _read_indirect(self, index: int) -> int:
        if index == IOAPICID or index == IOAPICARB:
            return (self.id & 0xF) << 24
        if index == IOAPICVER:
            return VERSION_VALUE
        if IOREDTBL <= index < IOREDTBL + 2 * PINS:
            pin = (index - IOREDTBL) >> 1
            entry = self.redir[pin] | (DELIVS if self._send[pin] else 0)
            return entry >> 32 if index & 1 else entry & 0xFFFF_FFFF
        return 0xFFFF_FFFF  # an index the datasheet defines no register for: all ones, as KVM's IOAPIC

    def _write_indirect(self, index: int, value: int) -> None:
        if index == IOAPICID:
            self.id = value >> 24 & 0xF  # 3.2.1: bits 27:24
            return
        if not IOREDTBL <= index < IOREDTBL + 2 * PINS:
            return  # IOAPICVER and IOAPICARB are read-only; other indexes decode nothing
        pin = (index - IOREDTBL) >> 1
        old = self.redir[pin]
        if index & 1:
            entry = (old & 0xFFFF_FFFF) | value << 32
        else:
            entry = (old & ~0xFFFF_FFFF) | (value & ~RO_BITS) | (old & RO_BITS)
        if not entry & TRIGGER_LEVEL:
            entry &= ~REMOTE_IRR  # remote IRR has no meaning for an edge entry
        self.redir[pin] = entry
        if entry & TRIGGER_LEVEL and self.lines[pin] and not entry & (MASKED | REMOTE_IRR):
            self._send[pin] = True  # a level still asserted when unmasked (or re-armed)
        elif entry & MASKED and not entry & TRIGGER_LEVEL:
            self._send[pin] = False  # an edge not yet sent and now masked is lost

    # --- the input pins -----------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input pin ``pin`` (ISA IRQ n = pin n); any thread."""
        if not 0 <= pin < PINS:
            return
        with self._lock:
            old, self.lines[pin] = self.lines[pin], level
            entry = self.redir[pin]
            if not level or entry & MASKED:
                return
            if entry & TRIGGER_LEVEL:
                if entry & REMOTE_IRR:
                    return
            elif old:
                return  # edge: no new rising edge
            self._send[pin] = True
        if self.on_pending is not None:
            self.on_pending()

    def pending(self) -> bool:
        return any(self._send)

    def service(self) -> None:
        """Send the pending messages to the local APIC (on the vCPU thread)."""
        if not any(self._send):
            return
        with self._lock:
            for pin in range(PINS):
                if self._send[pin]:
                    self._send[pin] = False
                    self._deliver(pin)

    def _deliver(self, pin: int) -> None:
        entry = self.redir[pin]
        level = bool(entry & TRIGGER_LEVEL)
        if entry & MASKED or (level and (entry & REMOTE_IRR or not self.lines[pin])):
            return
        mode = entry >> DELMOD_SHIFT & 7
        lapic = self.lapic
        if mode not in (DELMOD_FIXED, DELMOD_LOWEST) or lapic is None or not lapic.hw_enabled:
            self.stats["undeliverable"] += 1
            return
        if not lapic.matches(entry >> DEST_SHIFT, bool(entry & DESTMOD_LOGICAL)):
            self.stats["undeliverable"] += 1
            return
        lapic.accept(entry & VECTOR_MASK, level)
        self.stats["delivered"] += 1
        if level:
            self.redir[pin] = entry | REMOTE_IRR  # accepted by the local APIC

    def eoi(self, vector: int) -> None:
        """An EOI message from the local APIC for ``vector`` (vCPU thread)."""
        with self._lock:
            for pin in range(PINS):
                entry = self.redir[pin]
                if entry & VECTOR_MASK == vector and entry & TRIGGER_LEVEL and entry & REMOTE_IRR:
                    self.stats["eoi"] += 1
                    self.redir[pin] = entry & ~REMOTE_IRR
                    if self.lines[pin] and not entry & MASKED:
                        self._deliver(pin)  # still asserted: the interrupt again

    def level_vectors(self) -> set[int]:
        """Vectors of the level-triggered entries (their EOIs must reach the I/O APIC)."""
        return {e & VECTOR_MASK for e in self.redir if e & TRIGGER_LEVEL}

    def entry(self, pin: int) -> int:
        with self._lock:
            return self.redir[pin] | (DELIVS if self._send[pin] else 0)

    def counters(self) -> dict[str, int]:
        return dict(self.stats)
