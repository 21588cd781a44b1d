"""hvm.vtx.bitmaps: I/O bitmaps (SDM 25.6.4), MSR bitmap (SDM 25.6.9), exit conditions (SDM 26.1.3)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx.bitmaps import (
    IoBitmaps,
    MsrBitmap,
    io_access_exits,
    io_instruction_exits,
    msr_access_exits,
    msr_instruction_exits,
)
from hvm.vtx.controls import ProcBased

ZERO = bytes(4096)


def with_bit(byte: int, bit: int, page: bytes = ZERO) -> bytes:
    data = bytearray(page)
    data[byte] |= 1 << bit
    return bytes(data)


@pytest.mark.parametrize(
    "msr, write, byte, bit",
    [
        # IA32_TSC_AUX C0000103H, WRMSR: write-high bitmap at 3072; 103H = 259 = 32 * 8 + 3.
        (0xC000_0103, True, 3104, 3),
        # IA32_EFER C0000080H, RDMSR: read-high bitmap at 1024; 80H = 16 * 8 + 0.
        (0xC000_0080, False, 1040, 0),
        # IA32_SYSENTER_CS 174H, RDMSR: read-low bitmap at 0; 174H = 372 = 46 * 8 + 4.
        (0x174, False, 46, 4),
        # x2APIC ICR 830H, WRMSR: write-low bitmap at 2048; 830H = 2096 = 262 * 8 + 0.
        (0x830, True, 2310, 0),
        # Last MSR of the low range, 1FFFH, RDMSR: 1FFFH = 1023 * 8 + 7.
        (0x1FFF, False, 1023, 7),
    ],
)
def test_msr_bitmap_positions(msr, write, byte, bit):
    page = with_bit(byte, bit)
    assert msr_access_exits(page, msr, write)
    assert not msr_access_exits(page, msr, not write)
    assert not msr_access_exits(ZERO, msr, write)
    built = MsrBitmap()
    built.page[:] = ZERO
    built.intercept(msr, read=not write, write=write)
    assert bytes(built.page) == page


@pytest.mark.parametrize("msr", [0x2000, 0x4000_0000, 0xBFFF_FFFF, 0xC000_2000, 0xC001_0000])
def test_msrs_outside_both_ranges_always_exit(msr):
    # SDM 26.1.3: RDMSR/WRMSR of an MSR outside 0-1FFFH and C0000000H-C0001FFFH exits.
    assert msr_access_exits(ZERO, msr, write=False)
    assert msr_access_exits(ZERO, msr, write=True)
    with pytest.raises(ValueError):
        MsrBitmap().pass_through(msr)


def test_without_msr_bitmaps_every_msr_access_exits():
    # SDM 26.1.3: "use MSR bitmaps" 0 -> all RDMSR/WRMSR exit.
    assert msr_instruction_exits(0, 0x10, write=False, bitmap=ZERO)
    assert not msr_instruction_exits(ProcBased.USE_MSR_BITMAPS, 0x10, write=False, bitmap=ZERO)


def test_msr_bitmap_builder():
    bitmap = MsrBitmap()  # starts intercepting everything
    assert bitmap.exits(0xC000_0100, write=False)
    bitmap.pass_through(0xC000_0100)  # IA32_FS_BASE
    bitmap.pass_through(0x10, write=False)  # IA32_TIME_STAMP_COUNTER: reads only
    assert not bitmap.exits(0xC000_0100, write=False) and not bitmap.exits(0xC000_0100, write=True)
    assert bitmap.exits(0x10, write=True) and not bitmap.exits(0x10, write=False)
    bitmap.intercept(0xC000_0100, write=False)
    assert bitmap.exits(0xC000_0100, write=False) and not bitmap.exits(0xC000_0100, write=True)
    assert msr_instruction_exits(ProcBased.USE_MSR_BITMAPS, 0x10, True, bytes(bitmap.page))


@given(st.one_of(st.integers(0, 0x1FFF), st.integers(0xC000_0000, 0xC000_1FFF)), st.booleans())
def test_builder_touches_only_its_msr(msr, write):
    bitmap = MsrBitmap()
    bitmap.pass_through(msr, read=not write, write=write)
    assert not bitmap.exits(msr, write)
    assert bitmap.page.count(0xFF) == 4095  # every other bit still set


@pytest.mark.parametrize(
    "port, byte, bitmap_b, bit",
    [
        (0x3F8, 127, False, 0),  # COM1: 3F8H = 1016 = 127 * 8 + 0, bitmap A
        (0x60, 12, False, 0),  # 60H = 96 = 12 * 8
        (0x7FFF, 4095, False, 7),  # last port of bitmap A
        (0x8001, 0, True, 1),  # 8001H - 8000H = 1: bitmap B byte 0 bit 1
        (0xCFC, 415, False, 4),  # PCI config data: CFCH = 3324 = 415 * 8 + 4
    ],
)
def test_io_bitmap_positions(port, byte, bitmap_b, bit):
    page = with_bit(byte, bit)
    a, b = (ZERO, page) if bitmap_b else (page, ZERO)
    assert io_access_exits(a, b, port, 1)
    assert not io_access_exits(ZERO, ZERO, port, 1)
    built = IoBitmaps()
    built.a[:], built.b[:] = ZERO, ZERO
    built.intercept(port)
    assert (bytes(built.a), bytes(built.b)) == (a, b)


def test_io_access_exits_if_any_byte_is_intercepted():
    # SDM 26.1.3: a multi-byte access exits if the bit of any port it touches is set.
    a = with_bit(127, 1)  # port 3F9H only
    assert io_access_exits(a, ZERO, 0x3F8, 2)
    assert io_access_exits(a, ZERO, 0x3F6, 4)
    assert not io_access_exits(a, ZERO, 0x3F8, 1)
    assert not io_access_exits(a, ZERO, 0x3FA, 4)
    # A 2-byte access at 7FFFH touches 7FFFH (bitmap A) and 8000H (bitmap B).
    assert io_access_exits(ZERO, with_bit(0, 0), 0x7FFF, 2)


def test_io_access_wrapping_the_port_space_exits():
    # SDM 26.1.3: an access touching both FFFFH and 0000H exits, whatever the bitmaps say.
    assert io_access_exits(ZERO, ZERO, 0xFFFE, 4)
    assert io_access_exits(ZERO, ZERO, 0xFFFF, 2)
    assert not io_access_exits(ZERO, ZERO, 0xFFFF, 1)
    assert not io_access_exits(ZERO, ZERO, 0xFFFC, 4)


def test_use_io_bitmaps_overrides_unconditional_io_exiting():
    # SDM 26.1.3: without I/O bitmaps, "unconditional I/O exiting" decides; with them it is ignored.
    assert not io_instruction_exits(0, 0x3F8, 1)
    assert io_instruction_exits(ProcBased.UNCONDITIONAL_IO_EXITING, 0x3F8, 1)
    both = ProcBased.UNCONDITIONAL_IO_EXITING | ProcBased.USE_IO_BITMAPS
    assert not io_instruction_exits(both, 0x3F8, 1, ZERO, ZERO)
    assert io_instruction_exits(both, 0x3F8, 1, with_bit(127, 0), ZERO)


def test_io_bitmaps_builder():
    bitmaps = IoBitmaps()  # starts intercepting everything
    bitmaps.pass_through(0x3F8, 8)
    assert not io_access_exits(bitmaps.a, bitmaps.b, 0x3F8, 4)
    assert not io_access_exits(bitmaps.a, bitmaps.b, 0x3FC, 4)
    assert io_access_exits(bitmaps.a, bitmaps.b, 0x3FE, 4)  # 400H-401H still intercepted
    bitmaps.intercept(0x3F9)
    assert io_access_exits(bitmaps.a, bitmaps.b, 0x3F8, 2)
    with pytest.raises(ValueError):
        bitmaps.pass_through(0xFFFF, 2)
