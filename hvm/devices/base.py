"""What a device is to the VMM: registers read and written by offset, and an IRQ line.

A device never knows which engine runs the guest. It is registered on the PIO or
MMIO bus over a range; the bus hands it the offset within that range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

#: Raise (True) or lower (False) the device's interrupt line.
IrqLine = Callable[[bool], None]


def no_irq(level: bool) -> None:
    """An IRQ line wired to nothing."""


class Device(Protocol):
    name: str

    def read(self, offset: int, size: int) -> int:
        """Value of ``size`` bytes at ``offset`` (little-endian)."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Store ``size`` bytes of ``value`` at ``offset``."""


class StopMachine(Exception):
    """Raised by a device to end the run with an exit status (e.g. isa-debug-exit)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
