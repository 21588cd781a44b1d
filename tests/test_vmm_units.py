"""Bus, guest memory and CLI argument units (no KVM needed)."""

from __future__ import annotations

import argparse

import pytest

from hvm.cli import parse_size
from hvm.devices.base import StopMachine
from hvm.devices.debug_exit import DebugExit
from hvm.vmm.bus import BusConflict, MmioBus, PioBus
from hvm.vmm.memory import GuestMemory, GuestMemoryError


class Reg:
    def __init__(self, name: str) -> None:
        self.name = name

    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_pio_bus_offsets_and_misses() -> None:
    bus = PioBus()
    dev = Reg("a")
    bus.register(0x3F8, 8, dev)
    assert bus.lookup(0x3F8) == (dev, 0)
    assert bus.lookup(0x3FF) == (dev, 7)
    assert bus.lookup(0x400) is None and bus.lookup(0x3F7) is None


def test_bus_rejects_overlap_and_out_of_range() -> None:
    bus = PioBus()
    bus.register(0x60, 4, Reg("a"))
    with pytest.raises(BusConflict, match="overlaps"):
        bus.register(0x63, 2, Reg("b"))
    with pytest.raises(BusConflict):
        bus.register(0xFFFF, 2, Reg("c"))


def test_mmio_bus_bisects_ranges() -> None:
    bus = MmioBus()
    a, b = Reg("a"), Reg("b")
    bus.register(0xFEE00000, 0x1000, a)
    bus.register(0xFEC00000, 0x100, b)
    assert bus.lookup(0xFEE00030) == (a, 0x30)
    assert bus.lookup(0xFEC000FF) == (b, 0xFF)
    assert bus.lookup(0xFEC00100) is None
    assert bus.lookup(0) is None


def test_debug_exit_status_is_qemu_convention() -> None:
    # QEMU hw/misc/debugexit.c: exit((val << 1) | 1)
    with pytest.raises(StopMachine) as info:
        DebugExit().write(0, 4, 0x21)
    assert info.value.status == 0x43


def test_guest_memory_bounds() -> None:
    mem = GuestMemory(4 << 20)
    try:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        for gpa, n in ((4 << 20, 1), ((4 << 20) - 2, 4), (-1, 1)):
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
        with pytest.raises(GuestMemoryError):
            GuestMemory(1 << 20)  # below the 2 MiB minimum
    finally:
        mem.close()


@pytest.mark.parametrize(
    ("text", "value"),
    [("128M", 128 << 20), ("1G", 1 << 30), ("64MiB", 64 << 20), ("512k", 512 << 10), ("256", 256 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("12 parsecs")


def test_missing_kvm_device_says_what_to_do() -> None:
    from hvm.engine.kvm import open_system
    from hvm.errors import EXIT_SETUP, EngineUnavailable

    with pytest.raises(EngineUnavailable, match="does not exist.*--engine model") as info:
        open_system("/nonexistent/kvm")
    assert info.value.status == EXIT_SETUP


def test_info_tables_match_the_sdm(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from hvm.cli import main

    assert main(["info", "exit-reasons", "--json"]) == 0
    reasons = json.loads(capsys.readouterr().out)
    # Intel SDM Vol. 3D Appendix C
    assert reasons["IO_INSTRUCTION"] == 30 and reasons["EPT_VIOLATION"] == 48 and reasons["HLT"] == 12
    assert main(["info", "vmcs", "--json"]) == 0
    vmcs = json.loads(capsys.readouterr().out)
    # Intel SDM Vol. 3D Appendix B
    assert vmcs["EPT_POINTER"] == 0x201A and vmcs["GUEST_CR0"] == 0x6800 and vmcs["VM_EXIT_REASON"] == 0x4402


def test_engine_options_unknown_name_is_refused() -> None:
    from hvm.engine import create_engine
    from hvm.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="no option nonsense"):
        create_engine("model", GuestMemory(2 << 20), {"nonsense": 1})
    with pytest.raises(EngineUnavailable, match="no option memory"):
        create_engine("trap", GuestMemory(2 << 20), {"memory": None})


def test_engine_options_from_the_command_line() -> None:
    from hvm.engine import engine_options, parse_engine_options
    from hvm.errors import EngineUnavailable

    assert engine_options("kvm")["path"] == "/dev/kvm"
    assert parse_engine_options("kvm", ["path=/dev/null"]) == {"path": "/dev/null"}
    for bad in (["path"], ["nonsense=1"]):
        with pytest.raises(EngineUnavailable, match="expected KEY=VALUE"):
            parse_engine_options("kvm", bad)


def test_cli_bad_engine_option_is_one_line_with_status_2() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hvm", "run", "--engine", "model", "--engine-option", "x=1"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--engine-option 'x=1'" in proc.stderr
