"""The engine interface: what the VMM asks of whatever runs guest instructions.

An engine is created over guest memory, given the entry CPU state, and then asked
to ``run()`` until the next exit, which it returns as one :class:`hvm.exits.Exit`.
Before the next ``run()`` the VMM completes reads: ``complete_read(data)`` for
an I/O IN, an MMIO read or an RDMSR. The VMM never asks which engine it drives;
what an engine cannot do it states in ``capabilities()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from hvm.cpu import CpuState
from hvm.exits import Exit
from hvm.vmm.memory import GuestMemory


class Engine(ABC):
    name: str

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

    def capabilities(self) -> dict[str, bool]:
        return {}

    def counters(self) -> dict[str, int]:
        """The engine's own exit statistics (for KVM: the kernel's binary stats)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release host resources."""
