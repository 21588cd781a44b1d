"""Guest time-stamp counter: Intel SDM Vol. 3C, 25.6.5 and 26.3 (RDTSC, RDTSCP, RDMSR of IA32_TSC).

With "use TSC offsetting" (and optionally "use TSC scaling") a guest reads
not the host TSC but::

    guest = ((host * multiplier) >> 48) + offset      (mod 2**64)

where the TSC multiplier is a 64-bit fixed-point number with 48 fractional
bits (1.0 = ``TSC_MULTIPLIER_ONE``) and the offset is a signed 64-bit value::

    level = TscLevel.from_vmcs(vmcs)      # what RDTSC in this guest would see
    level.apply(host_tsc)
    compose([l1, l2]).apply(host_tsc)     # a nested guest: L0 runs L1 runs L2
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hvm.vtx.controls import Controls, ProcBased, ProcBased2
from hvm.vtx.vmcs import VMCS, VmcsField

TSC_MULTIPLIER_ONE = 1 << 48  # SDM 25.6.5: the multiplier has 48 fractional bits
_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


@dataclass(frozen=True)
class TscLevel:
    """One virtualization level's view of the TSC of the level below it."""

    offset: int = 0  # signed 64-bit TSC offset
    multiplier: int = TSC_MULTIPLIER_ONE

    def apply(self, tsc: int) -> int:
        # SDM 26.3 (RDTSC): product with the multiplier, shifted right 48 bits, plus the offset, in 64 bits.
        return ((tsc * self.multiplier >> 48) + self.offset) & _MASK64

    @classmethod
    def from_vmcs(cls, vmcs: VMCS) -> TscLevel:
        """The TSC that RDTSC in the guest of ``vmcs`` returns (when "RDTSC exiting" is 0)."""
        controls = Controls.read(vmcs)
        # SDM 26.3: with "use TSC offsetting" 0, RDTSC returns the TSC unchanged (scaling is not applied).
        if not controls.proc & ProcBased.USE_TSC_OFFSETTING:
            return cls()
        offset = _signed64(vmcs.vmread(VmcsField.TSC_OFFSET))
        # SDM 26.3: the multiplier is used only with "use TSC scaling" 1.
        if not controls.proc2 & ProcBased2.USE_TSC_SCALING:
            return cls(offset)
        return cls(offset, vmcs.vmread(VmcsField.TSC_MULTIPLIER))


def compose(levels: Iterable[TscLevel]) -> TscLevel:
    """The single level equivalent to ``levels`` stacked outermost first (L1's view, then L2's, ...).

    For T1 = (T0*m1 >> 48) + o1 and T2 = (T1*m2 >> 48) + o2 the result is
    m = m1*m2 >> 48 and o = (o1*m2 >> 48) + o2 (as KVM computes a nested
    guest's values). It is exact when every multiplier is a whole number (with
    all at 1.0: T_L2 = T_H + o1 + o2); otherwise it can differ from applying the
    levels one after another by the rounding of the 48-bit fractions.
    """
    result = TscLevel()
    for level in levels:
        result = TscLevel(
            offset=_signed64((result.offset * level.multiplier >> 48) + level.offset),
            multiplier=result.multiplier * level.multiplier >> 48,
        )
    return result
