"""The engine interface: what the VMM asks of whatever runs guest instructions.

An engine is created over guest memory, given the entry CPU state, and then asked
to ``run()`` until the next exit, which it returns as one :class:`hvm.exits.Exit`.
Before the next ``run()`` the VMM completes reads: ``complete_read(data)`` for
an I/O IN, an MMIO read or an RDMSR. The VMM never asks which engine it drives;
what an engine cannot do it states in ``capabilities()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from hvm.cpu import CpuState
from hvm.exits import Exit
from hvm.vmm.memory import GuestMemory, Region


class InterruptController(Protocol):
    """A local interrupt controller the VMM runs in userspace (e.g. hvm.devices.lapic.LapicDevice).

    The engine asks it before each entry: ``tick()`` brings its timers up to the host clock,
    ``pending()`` is the vector it wants delivered (None if none), ``ack()`` is the processor's
    interrupt acknowledge (IRR -> ISR) when the engine injects, ``seconds_to_next()`` how long a
    halted vCPU may sleep before the next timer event (None: no timer armed).
    """

    def tick(self) -> None: ...

    def pending(self) -> int | None: ...

    def ack(self) -> int: ...

    def seconds_to_next(self) -> float | None: ...


class Engine(ABC):
    name: str
    #: True when the engine has no interrupt controller of its own and wants the VMM's
    #: (see :meth:`attach_interrupt_controller`); the Machine then puts a local APIC on its MMIO bus.
    userspace_lapic: bool = False

    @abstractmethod
    def __init__(self, memory: GuestMemory) -> None: ...

    @abstractmethod
    def set_state(self, state: CpuState) -> None:
        """Load the architectural state the vCPU starts from."""

    @abstractmethod
    def get_state(self) -> CpuState:
        """The vCPU's current architectural state."""

    @abstractmethod
    def run(self) -> Exit:
        """Run the guest until the next exit."""

    @abstractmethod
    def complete_read(self, data: bytes) -> None:
        """Supply the bytes the guest reads for the exit just returned (IN, MMIO read, RDMSR)."""

    @abstractmethod
    def set_irq(self, line: int, level: bool) -> None:
        """Drive an ISA interrupt line of the guest's interrupt controller."""

    @abstractmethod
    def kick(self) -> None:
        """Ask a running ``run()`` to return soon with an ``intr`` exit (any thread or signal handler)."""

    @abstractmethod
    def map_region(self, region: Region) -> None:
        """Make a region added to guest memory after creation visible to the guest."""

    @abstractmethod
    def harvest_dirty(self, region: Region) -> list[int]:
        """Indexes of the region's pages the guest wrote since the last harvest; tracking restarts.

        KVM: KVM_GET_DIRTY_LOG (the kernel write-protects the pages again). VT-x model: the EPT
        dirty flags of the region's leaf entries, cleared (with the cached translations invalidated).
        """

    def register_coalesced_mmio(self, addr: int, size: int) -> bool:
        """Buffer guest writes to [addr, addr+size) without exiting; False if the engine cannot."""
        return False

    def drain_coalesced(self) -> list[tuple[int, bytes]]:
        """Buffered (address, data) writes, oldest first; empty if none."""
        return []

    def attach_interrupt_controller(self, controller: InterruptController) -> None:
        """Deliver ``controller``'s interrupts to the guest (only when ``userspace_lapic``)."""
        raise NotImplementedError(f"the {self.name} engine has its own interrupt controller")

    def attach_ioapic(self, ioapic) -> bool:
        """Route ``set_irq`` lines to ``ioapic`` (an :class:`hvm.devices.ioapic.IoApic`), which delivers to
        the local APIC the VMM emulates; False when the engine has no such APIC (an in-kernel irqchip
        routes the lines itself, or there is no local APIC). Called after any attach_interrupt_controller."""
        return False

    def tsc_hz(self) -> float | None:
        """The guest's time-stamp-counter frequency, if the engine knows it."""
        return None

    def capabilities(self) -> dict[str, bool]:
        return {}

    def counters(self) -> dict[str, int]:
        """The engine's own exit statistics (for KVM: the kernel's binary stats)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release host resources."""
