"""isa-debug-exit as QEMU defines it: a write of v ends the VM with exit status (v << 1) | 1."""

from __future__ import annotations

from hvm.devices.base import StopMachine

DEFAULT_PORT = 0xF4
DEFAULT_SIZE = 4  # QEMU: -device isa-debug-exit,iobase=0xf4,iosize=4


class DebugExit:
    name = "isa-debug-exit"

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        raise StopMachine((value << 1) | 1, f"guest wrote {value:#x} to isa-debug-exit")


class Port80:
    """The POST-code port: writes accepted and ignored (QEMU's 'ioport80'), reads as ones."""

    name = "port80"

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        return None
