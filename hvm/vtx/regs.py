"""Control-register and EFER bits that the VT-x rules consult (Intel SDM Vol. 3A, 2.5 and 2.2.1).

Only the bits some :mod:`hvm.vtx` rule reads are named here, e.g.
``regs.cr0 & Cr0.PG`` in :mod:`hvm.vtx.paging`.
"""

from __future__ import annotations

from enum import IntFlag


class Cr0(IntFlag):
    PE = 1 << 0  # protection enable
    WP = 1 << 16  # write protect: supervisor writes honour R/W (SDM 4.6)
    PG = 1 << 31  # paging


class Cr4(IntFlag):
    PSE = 1 << 4  # 4-MByte pages with 32-bit paging
    PAE = 1 << 5  # physical-address extension
    LA57 = 1 << 12  # 57-bit linear addresses (5-level paging)


class Efer(IntFlag):
    """IA32_EFER (MSR C0000080H)."""

    LME = 1 << 8  # IA-32e mode enable
    LMA = 1 << 10  # IA-32e mode active
    NXE = 1 << 11  # execute-disable bit enable
