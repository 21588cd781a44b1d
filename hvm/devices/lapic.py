"""The local APIC as a device on the VMM's MMIO bus, for an engine without its own (KVM, irqchip="user").

The registers and their rules are :class:`hvm.vtx.apic.LocalApic` (Intel SDM Vol. 3A chapter 11);
this wrapper gives it what a device needs: an MMIO range (the xAPIC page at FEE00000H, SDM 11.4.1),
a clock, and the processor-side interface the engine uses to deliver its interrupts
(:class:`hvm.engine.base.InterruptController`). Time is the host's monotonic clock in nanoseconds
since the device was made, given to the APIC as its "TSC" at 1 GHz; the APIC bus also runs at 1 GHz
(a 1 ns bus cycle, as KVM's in-kernel APIC and QEMU give their guests), so a guest that programs the
same initial count sees the same timer period under either irqchip.

The timer fires when the VMM next looks: on every entry (the engine calls :meth:`tick`) and from a
Machine poller every :attr:`poll_interval_s`, whose host timer signal is what takes a vCPU that
runs without exits out of the guest — the price of a userspace APIC.
"""

from __future__ import annotations

import time

from hvm.vtx.apic import APIC_MMIO_BASE, PAGE_SIZE, LocalApic

NS_PER_S = 1_000_000_000


class LapicDevice:
    name = "lapic"
    base = APIC_MMIO_BASE
    size = PAGE_SIZE

    def __init__(self, poll_interval_s: float = 0.0005, clock_ns=time.monotonic_ns) -> None:
        self._clock = clock_ns
        self._t0 = clock_ns()
        self.poll_interval_s = poll_interval_s
        self.apic = LocalApic(tsc_hz=NS_PER_S, bus_hz=NS_PER_S)
        self.reads = 0
        self.writes = 0
        self.acks = 0

    def now(self) -> int:
        """Nanoseconds since the device was made (the APIC's time base)."""
        return self._clock() - self._t0

    # --- the MMIO page -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return self.apic.mmio_read(offset, size, self.now())

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.apic.mmio_write(offset, size, value, self.now())

    # --- the processor's side (hvm.engine.base.InterruptController) ----------------------
    def tick(self) -> None:
        self.apic.tick(self.now())

    def pending(self) -> int | None:
        return self.apic.pending()

    def ack(self) -> int:
        self.acks += 1
        return self.apic.ack()

    def seconds_to_next(self) -> float | None:
        deadline = self.apic.next_deadline()
        if deadline is None:
            return None
        return max(deadline - self.now(), 0) / NS_PER_S

    def counters(self) -> dict[str, int]:
        return {"mmio_reads": self.reads, "mmio_writes": self.writes, "acks": self.acks,
                **{f"apic.{k}": v for k, v in self.apic.stats.items()}}
