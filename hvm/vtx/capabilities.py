"""The model's VMX capability MSRs: Intel SDM Vol. 3D, Appendix A "VMX Capability Reporting Facility".

A real processor tells the hypervisor which VMX controls it supports through
the ``IA32_VMX_*`` MSRs; VM entry fails if a VMCS uses a control the processor
does not allow. :data:`MODEL_CAPS` is that description for this model: what
the model engine implements. Use it to build valid controls::

    from hvm.vtx.capabilities import MODEL_CAPS
    pin = MODEL_CAPS.true_pinbased_ctls.adjust(PinBased.EXTERNAL_INTERRUPT_EXITING)

The values mirror common Intel parts: the "default1" controls (reserved bits
that the first VMX processors required to be 1) must still be 1, as
``IA32_VMX_TRUE_*_CTLS`` reports them on most hardware. Only the TRUE MSRs are
modelled (``IA32_VMX_BASIC[55]`` = 1 in SDM terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag


def _bits(*positions: int) -> int:
    value = 0
    for position in positions:
        value |= 1 << position
    return value


class EptVpidCap(IntFlag):
    """IA32_VMX_EPT_VPID_CAP (MSR 48CH), SDM A.10."""

    EXECUTE_ONLY = 1 << 0  # EPT entries may be execute-only (bits 2:0 = 100b)
    PAGE_WALK_4 = 1 << 6  # page-walk length of 4 supported
    PAGE_WALK_5 = 1 << 7  # page-walk length of 5 supported
    MEMTYPE_UC = 1 << 8  # EPTP memory type UC (0) allowed
    MEMTYPE_WB = 1 << 14  # EPTP memory type WB (6) allowed
    PDE_2M = 1 << 16  # EPT PDE may map a 2-MByte page
    PDPTE_1G = 1 << 17  # EPT PDPTE may map a 1-GByte page
    INVEPT = 1 << 20  # INVEPT supported
    ACCESSED_DIRTY = 1 << 21  # EPTP bit 6 (accessed and dirty flags for EPT) allowed
    INVEPT_SINGLE_CONTEXT = 1 << 25
    INVEPT_ALL_CONTEXT = 1 << 26
    INVVPID = 1 << 32
    INVVPID_INDIVIDUAL_ADDRESS = 1 << 40
    INVVPID_SINGLE_CONTEXT = 1 << 41
    INVVPID_ALL_CONTEXT = 1 << 42
    INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43


@dataclass(frozen=True)
class AllowedSettings:
    """One VMX control capability MSR (SDM A.3-A.5).

    ``allowed0`` is bits 31:0 of the MSR: a 1 in bit X means control X must be 1.
    ``allowed1`` is bits 63:32: a 0 in bit X means control X must be 0.
    """

    allowed0: int
    allowed1: int

    @property
    def msr(self) -> int:
        """The 64-bit MSR value RDMSR would return."""
        return self.allowed1 << 32 | self.allowed0

    def permits(self, controls: int) -> bool:
        """Would VM entry accept these control bits? (SDM 27.2.1, "reserved bits ... set properly")."""
        return controls & self.allowed0 == self.allowed0 and controls & ~self.allowed1 == 0

    def adjust(self, desired: int) -> int:
        """Force the must-be-1 bits on and the must-be-0 bits off (SDM A.2, choosing control settings)."""
        return (desired | self.allowed0) & self.allowed1


@dataclass(frozen=True)
class VmxCapabilities:
    """What a VMX implementation supports, in the shape of its capability MSRs."""

    true_pinbased_ctls: AllowedSettings  # IA32_VMX_TRUE_PINBASED_CTLS (48DH), SDM A.3.1
    true_procbased_ctls: AllowedSettings  # IA32_VMX_TRUE_PROCBASED_CTLS (48EH), SDM A.3.2
    procbased_ctls2: AllowedSettings  # IA32_VMX_PROCBASED_CTLS2 (48BH), SDM A.3.3
    true_exit_ctls: AllowedSettings  # IA32_VMX_TRUE_EXIT_CTLS (48FH), SDM A.4.1
    true_entry_ctls: AllowedSettings  # IA32_VMX_TRUE_ENTRY_CTLS (490H), SDM A.5
    ept_vpid_cap: EptVpidCap  # IA32_VMX_EPT_VPID_CAP (48CH), SDM A.10
    vmfunc: int  # IA32_VMX_VMFUNC (491H), SDM A.11: allowed-1 VM-function controls
    cr3_target_count: int  # IA32_VMX_MISC[24:16], SDM A.6
    phys_addr_width: int  # MAXPHYADDR, CPUID.80000008H:EAX[7:0]


# Reserved controls that must be 1 (SDM A.2 "default1" classes, as the TRUE MSRs report them).
_PIN_DEFAULT1 = _bits(1, 2, 4)
_PROC_DEFAULT1 = _bits(1, 4, 5, 6, 8, 13, 14, 26)
_EXIT_DEFAULT1 = _bits(0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 16, 17)
_ENTRY_DEFAULT1 = _bits(0, 1, 3, 4, 5, 6, 7, 8, 12)

MODEL_CAPS = VmxCapabilities(
    true_pinbased_ctls=AllowedSettings(
        allowed0=_PIN_DEFAULT1,
        # external-interrupt exiting 0, NMI exiting 3, virtual NMIs 5,
        # VMX-preemption timer 6, posted interrupts 7
        allowed1=_PIN_DEFAULT1 | _bits(0, 3, 5, 6, 7),
    ),
    true_procbased_ctls=AllowedSettings(
        allowed0=_PROC_DEFAULT1,
        # everything in SDM table "Primary Processor-Based VM-Execution Controls"
        # except 17 (activate tertiary controls: the model has none)
        allowed1=_PROC_DEFAULT1
        | _bits(2, 3, 7, 9, 10, 11, 12, 15, 16, 19, 20, 21, 22, 23, 24, 25, 27, 28, 29, 30, 31),
    ),
    procbased_ctls2=AllowedSettings(
        allowed0=0,
        # 0-14, RDSEED exiting 16, PML 17, EPT-violation #VE 18, XSAVES 20,
        # mode-based execute control for EPT 22, TSC scaling 25
        allowed1=_bits(*range(15), 16, 17, 18, 20, 22, 25),
    ),
    true_exit_ctls=AllowedSettings(
        allowed0=_EXIT_DEFAULT1,
        # save debug controls 2, host address-space size 9, acknowledge interrupt on
        # exit 15, save/load IA32_PAT 18/19, save/load IA32_EFER 20/21,
        # save VMX-preemption timer value 22
        allowed1=_EXIT_DEFAULT1 | _bits(2, 9, 15, 18, 19, 20, 21, 22),
    ),
    true_entry_ctls=AllowedSettings(
        allowed0=_ENTRY_DEFAULT1,
        # load debug controls 2, IA-32e mode guest 9, load IA32_PAT 14, load IA32_EFER 15
        # (no SMM: "entry to SMM" 10 and "deactivate dual-monitor treatment" 11 stay 0)
        allowed1=_ENTRY_DEFAULT1 | _bits(2, 9, 14, 15),
    ),
    ept_vpid_cap=(
        EptVpidCap.EXECUTE_ONLY
        | EptVpidCap.PAGE_WALK_4
        | EptVpidCap.PAGE_WALK_5
        | EptVpidCap.MEMTYPE_UC
        | EptVpidCap.MEMTYPE_WB
        | EptVpidCap.PDE_2M
        | EptVpidCap.PDPTE_1G
        | EptVpidCap.INVEPT
        | EptVpidCap.ACCESSED_DIRTY
        | EptVpidCap.INVEPT_SINGLE_CONTEXT
        | EptVpidCap.INVEPT_ALL_CONTEXT
        | EptVpidCap.INVVPID
        | EptVpidCap.INVVPID_INDIVIDUAL_ADDRESS
        | EptVpidCap.INVVPID_SINGLE_CONTEXT
        | EptVpidCap.INVVPID_ALL_CONTEXT
        | EptVpidCap.INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS
    ),
    vmfunc=_bits(0),  # EPTP switching (VM function 0)
    cr3_target_count=4,
    phys_addr_width=46,
)
