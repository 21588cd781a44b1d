"""I/O and MSR bitmaps: Intel SDM Vol. 3C, 25.6.4, 25.6.9 and 26.1.3.

Two questions the model engine asks on every IN/OUT and RDMSR/WRMSR in the
guest: does this access cause a VM exit? ::

    io_instruction_exits(proc, port=0x3F8, size=1, bitmap_a=a, bitmap_b=b)
    msr_instruction_exits(proc, msr=0xC0000080, write=True, bitmap=msr_bitmap)

``proc`` is the primary processor-based VM-execution controls; the bitmaps are
the 4-KiB pages the VMCS points to. :class:`IoBitmaps` and :class:`MsrBitmap`
build those pages for a hypervisor.
"""

from __future__ import annotations

from hvm.vtx.controls import ProcBased

PAGE_SIZE = 4096


def _bit(page: bytes, index: int) -> bool:
    return bool(page[index // 8] >> (index % 8) & 1)


# --- I/O bitmaps ---


def io_access_exits(bitmap_a: bytes, bitmap_b: bytes, port: int, size: int) -> bool:
    """Does an access to ``size`` ports from ``port`` exit, given the I/O bitmaps?"""
    # SDM 26.1.3: an access that wraps around the 16-bit port space (touches FFFFH and 0000H) exits.
    if port + size > 0x10000:
        return True
    # SDM 25.6.4: bitmap A holds one bit per port 0000H-7FFFH, bitmap B one per port 8000H-FFFFH;
    # SDM 26.1.3: the access exits if the bit of any port it touches is 1.
    return any(_bit(bitmap_a if p < 0x8000 else bitmap_b, p & 0x7FFF) for p in range(port, port + size))


def io_instruction_exits(
    proc: int, port: int, size: int, bitmap_a: bytes = b"", bitmap_b: bytes = b""
) -> bool:
    """Does IN/INS/OUT/OUTS on ``size`` ports from ``port`` cause a VM exit?"""
    # SDM 26.1.3: with "use I/O bitmaps" 1 the bitmaps decide ("unconditional I/O exiting" is ignored);
    # with it 0, "unconditional I/O exiting" decides.
    if proc & ProcBased.USE_IO_BITMAPS:
        return io_access_exits(bitmap_a, bitmap_b, port, size)
    return bool(proc & ProcBased.UNCONDITIONAL_IO_EXITING)


class IoBitmaps:
    """I/O bitmaps A and B, starting with every port intercepted."""

    def __init__(self) -> None:
        self.a = bytearray(b"\xff" * PAGE_SIZE)
        self.b = bytearray(b"\xff" * PAGE_SIZE)

    def intercept(self, port: int, count: int = 1) -> None:
        self._set(port, count, True)

    def pass_through(self, port: int, count: int = 1) -> None:
        self._set(port, count, False)

    def _set(self, port: int, count: int, exits: bool) -> None:
        if port < 0 or count < 0 or port + count > 0x10000:
            raise ValueError(f"ports {port:#x}+{count} outside 0000H-FFFFH")
        for p in range(port, port + count):
            page = self.a if p < 0x8000 else self.b
            index = p & 0x7FFF
            if exits:
                page[index // 8] |= 1 << (index % 8)
            else:
                page[index // 8] &= ~(1 << (index % 8))


# --- MSR bitmap ---

# SDM 25.6.9: byte offsets of the four 1-KiB bitmaps within the MSR-bitmap page.
_READ_LOW, _READ_HIGH, _WRITE_LOW, _WRITE_HIGH = 0, 1024, 2048, 3072


def _msr_bit(msr: int, write: bool) -> int | None:
    """Bit index of ``msr`` in the MSR-bitmap page, or None if the MSR is outside both ranges."""
    # SDM 25.6.9: the "low" bitmaps cover MSRs 00000000H-00001FFFH, the "high" ones C0000000H-C0001FFFH.
    if 0 <= msr <= 0x1FFF:
        base = _WRITE_LOW if write else _READ_LOW
    elif 0xC000_0000 <= msr <= 0xC000_1FFF:
        base = _WRITE_HIGH if write else _READ_HIGH
    else:
        return None
    return base * 8 + (msr & 0x1FFF)


def msr_access_exits(bitmap: bytes, msr: int, write: bool) -> bool:
    """Does RDMSR (``write`` False) or WRMSR of ``msr`` exit, given the MSR bitmap?"""
    bit = _msr_bit(msr, write)
    # SDM 26.1.3: an MSR outside both ranges always exits; otherwise its bit decides.
    return bit is None or _bit(bitmap, bit)


def msr_instruction_exits(proc: int, msr: int, write: bool, bitmap: bytes = b"") -> bool:
    """Does RDMSR/WRMSR of ``msr`` cause a VM exit (after the CPL-0 check, which faults first)?"""
    # SDM 26.1.3: with "use MSR bitmaps" 0, every RDMSR and WRMSR exits.
    if not proc & ProcBased.USE_MSR_BITMAPS:
        return True
    return msr_access_exits(bitmap, msr, write)


class MsrBitmap:
    """An MSR-bitmap page, starting with every MSR intercepted."""

    def __init__(self) -> None:
        self.page = bytearray(b"\xff" * PAGE_SIZE)

    def intercept(self, msr: int, read: bool = True, write: bool = True) -> None:
        self._set(msr, read, write, True)

    def pass_through(self, msr: int, read: bool = True, write: bool = True) -> None:
        self._set(msr, read, write, False)

    def exits(self, msr: int, write: bool) -> bool:
        return msr_access_exits(self.page, msr, write)

    def _set(self, msr: int, read: bool, write: bool, exits: bool) -> None:
        for direction, selected in ((False, read), (True, write)):
            if not selected:
                continue
            bit = _msr_bit(msr, direction)
            if bit is None:
                raise ValueError(f"MSR {msr:#x} is outside the bitmap's ranges (it always exits)")
            if exits:
                self.page[bit // 8] |= 1 << (bit % 8)
            else:
                self.page[bit // 8] &= ~(1 << (bit % 8))
