"""PIO and MMIO buses: devices registered by address range.

The PIO bus keeps a per-port table (65,536 entries at most) so that the hot path
of a port exit is one dict lookup; the MMIO bus keeps sorted ranges and bisects.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from hvm.devices.base import Device


class BusConflict(ValueError):
    """Two devices claimed overlapping ranges."""


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._starts: list[int] = []
        self._maps: list[Mapping] = []

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusConflict(f"{self.name}: range {base:#x}+{length:#x} is outside the bus")
        for m in self._maps:
            if base < m.end and m.base < base + length:
                raise BusConflict(
                    f"{self.name}: {device.name} at {base:#x}+{length:#x} overlaps "
                    f"{m.device.name} at {m.base:#x}+{m.length:#x}"
                )
        i = bisect.bisect(self._starts, base)
        self._starts.insert(i, base)
        self._maps.insert(i, Mapping(base, length, device))

    def lookup(self, addr: int) -> tuple[Device, int] | None:
        """The device covering ``addr`` and the offset within its range, or None."""
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                return m.device, addr - m.base
        return None

    def mappings(self) -> list[Mapping]:
        return list(self._maps)


class PioBus(Bus):
    def __init__(self) -> None:
        super().__init__("pio", 0x10000)
        self._ports: dict[int, tuple[Device, int]] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        super().register(base, length, device)
        for port in range(base, base + length):
            self._ports[port] = (device, port - base)

    def lookup(self, addr: int) -> tuple[Device, int] | None:
        return self._ports.get(addr)


class MmioBus(Bus):
    def __init__(self) -> None:
        super().__init__("mmio", 1 << 52)
