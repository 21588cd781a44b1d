"""The VMCS as data: Intel SDM Vol. 3C, 25.11.2 and Vol. 3D, Appendix B "Field Encoding in VMCS".

Software never sees the VMCS layout; it names a field by a 32-bit *encoding*
and uses VMREAD/VMWRITE. :class:`VMCS` models exactly that::

    vmcs = VMCS()
    vmcs.vmwrite(VmcsField.GUEST_RIP, 0x7C00)
    vmcs.vmread(VmcsField.GUEST_RIP)              # 0x7C00
    vmcs.vmwrite(VmcsField.VM_EXIT_REASON, 1)     # raises VmxInstructionError(13)
    vmcs.set_exit_info(VmcsField.VM_EXIT_REASON, 12)  # the processor itself may

:class:`FieldEncoding` decodes an encoding into its bit fields, :func:`fields`
lists every supported field for tools (``hvm info vmcs --json``).

The model is a 64-bit processor: natural-width fields hold 64 bits, and a
"full" access to a 64-bit field reads or writes all 64 bits.
Field names follow Linux's ``enum vmcs_field`` (arch/x86/include/asm/vmx.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from hvm.vtx.errors import VmInstructionErrorNumber, VmxInstructionError


class VmcsField(IntEnum):
    """Every VMCS component the model supports, by encoding (SDM Appendix B).

    64-bit fields also have a ``*_HIGH`` encoding (access type 1) naming bits 63:32.
    """

    # B.1.1 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    LAST_PID_POINTER_INDEX = 0x0008

    # B.1.2 16-bit guest-state fields
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTR_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812

    # B.1.3 16-bit host-state fields
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C

    # B.2.1 64-bit control fields
    IO_BITMAP_A = 0x2000
    IO_BITMAP_A_HIGH = 0x2001
    IO_BITMAP_B = 0x2002
    IO_BITMAP_B_HIGH = 0x2003
    MSR_BITMAP = 0x2004
    MSR_BITMAP_HIGH = 0x2005
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_STORE_ADDR_HIGH = 0x2007
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_EXIT_MSR_LOAD_ADDR_HIGH = 0x2009
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    VM_ENTRY_MSR_LOAD_ADDR_HIGH = 0x200B
    PML_ADDRESS = 0x200E
    PML_ADDRESS_HIGH = 0x200F
    TSC_OFFSET = 0x2010
    TSC_OFFSET_HIGH = 0x2011
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    VIRTUAL_APIC_PAGE_ADDR_HIGH = 0x2013
    APIC_ACCESS_ADDR = 0x2014
    APIC_ACCESS_ADDR_HIGH = 0x2015
    POSTED_INTR_DESC_ADDR = 0x2016
    POSTED_INTR_DESC_ADDR_HIGH = 0x2017
    VM_FUNCTION_CONTROL = 0x2018
    VM_FUNCTION_CONTROL_HIGH = 0x2019
    EPT_POINTER = 0x201A
    EPT_POINTER_HIGH = 0x201B
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP0_HIGH = 0x201D
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP1_HIGH = 0x201F
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP2_HIGH = 0x2021
    EOI_EXIT_BITMAP3 = 0x2022
    EOI_EXIT_BITMAP3_HIGH = 0x2023
    EPTP_LIST_ADDRESS = 0x2024
    EPTP_LIST_ADDRESS_HIGH = 0x2025
    VMREAD_BITMAP = 0x2026
    VMREAD_BITMAP_HIGH = 0x2027
    VMWRITE_BITMAP = 0x2028
    VMWRITE_BITMAP_HIGH = 0x2029
    VE_INFORMATION_ADDRESS = 0x202A
    VE_INFORMATION_ADDRESS_HIGH = 0x202B
    XSS_EXIT_BITMAP = 0x202C
    XSS_EXIT_BITMAP_HIGH = 0x202D
    ENCLS_EXITING_BITMAP = 0x202E
    ENCLS_EXITING_BITMAP_HIGH = 0x202F
    TSC_MULTIPLIER = 0x2032
    TSC_MULTIPLIER_HIGH = 0x2033
    TERTIARY_VM_EXEC_CONTROL = 0x2034
    TERTIARY_VM_EXEC_CONTROL_HIGH = 0x2035
    PID_POINTER_TABLE = 0x2042
    PID_POINTER_TABLE_HIGH = 0x2043

    # B.2.2 64-bit read-only data fields
    GUEST_PHYSICAL_ADDRESS = 0x2400
    GUEST_PHYSICAL_ADDRESS_HIGH = 0x2401

    # B.2.3 64-bit guest-state fields
    VMCS_LINK_POINTER = 0x2800
    VMCS_LINK_POINTER_HIGH = 0x2801
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_DEBUGCTL_HIGH = 0x2803
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_PAT_HIGH = 0x2805
    GUEST_IA32_EFER = 0x2806
    GUEST_IA32_EFER_HIGH = 0x2807
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    GUEST_IA32_PERF_GLOBAL_CTRL_HIGH = 0x2809
    GUEST_PDPTR0 = 0x280A
    GUEST_PDPTR0_HIGH = 0x280B
    GUEST_PDPTR1 = 0x280C
    GUEST_PDPTR1_HIGH = 0x280D
    GUEST_PDPTR2 = 0x280E
    GUEST_PDPTR2_HIGH = 0x280F
    GUEST_PDPTR3 = 0x2810
    GUEST_PDPTR3_HIGH = 0x2811
    GUEST_BNDCFGS = 0x2812
    GUEST_BNDCFGS_HIGH = 0x2813
    GUEST_IA32_RTIT_CTL = 0x2814
    GUEST_IA32_RTIT_CTL_HIGH = 0x2815

    # B.2.4 64-bit host-state fields
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_PAT_HIGH = 0x2C01
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_EFER_HIGH = 0x2C03
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    HOST_IA32_PERF_GLOBAL_CTRL_HIGH = 0x2C05

    # B.3.1 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO_FIELD = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    PLE_GAP = 0x4020
    PLE_WINDOW = 0x4022
    NOTIFY_WINDOW = 0x4024

    # B.3.2 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO_FIELD = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E

    # B.3.3 32-bit guest-state fields
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR_BYTES = 0x4814
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_DS_AR_BYTES = 0x481A
    GUEST_FS_AR_BYTES = 0x481C
    GUEST_GS_AR_BYTES = 0x481E
    GUEST_LDTR_AR_BYTES = 0x4820
    GUEST_TR_AR_BYTES = 0x4822
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E

    # B.3.4 32-bit host-state fields
    HOST_IA32_SYSENTER_CS = 0x4C00

    # B.4.1 Natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E

    # B.4.2 Natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400
    GUEST_LINEAR_ADDRESS = 0x640A

    # B.4.3 Natural-width guest-state fields
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    GUEST_S_CET = 0x6828
    GUEST_SSP = 0x682A
    GUEST_INTR_SSP_TABLE = 0x682C

    # B.4.4 Natural-width host-state fields
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16
    HOST_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C


class AccessType(IntEnum):
    """Encoding bit 0 (SDM 25.11.2)."""

    FULL = 0
    HIGH = 1  # bits 63:32 of a 64-bit field


class FieldType(IntEnum):
    """Encoding bits 11:10 (SDM 25.11.2)."""

    CONTROL = 0
    READ_ONLY_DATA = 1  # the VM-exit information fields
    GUEST_STATE = 2
    HOST_STATE = 3


class FieldWidth(IntEnum):
    """Encoding bits 14:13 (SDM 25.11.2)."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3

    @property
    def bits(self) -> int:
        """Field size in this model (natural width is 64 bits on a 64-bit processor)."""
        return {0: 16, 1: 64, 2: 32, 3: 64}[self.value]


# SDM 25.11.2: bit 12, bit 15 and bits 31:16 of an encoding are reserved (must be 0).
_RESERVED_ENCODING_BITS = ~0x6FFF


@dataclass(frozen=True)
class FieldEncoding:
    """The four parts of a VMCS field encoding (SDM 25.11.2, table "Structure of VMCS Component Encoding")."""

    access: AccessType  # bit 0
    index: int  # bits 9:1
    type: FieldType  # bits 11:10
    width: FieldWidth  # bits 14:13

    @classmethod
    def decode(cls, encoding: int) -> FieldEncoding:
        if encoding < 0 or encoding & _RESERVED_ENCODING_BITS:
            raise ValueError(f"{encoding:#x}: reserved bits set in a VMCS field encoding")
        enc = cls(
            access=AccessType(encoding & 1),
            index=(encoding >> 1) & 0x1FF,
            type=FieldType((encoding >> 10) & 3),
            width=FieldWidth((encoding >> 13) & 3),
        )
        # SDM 25.11.2: access type must be 0 (full) for 16-bit, 32-bit and natural-width fields.
        if enc.access is AccessType.HIGH and enc.width is not FieldWidth.BITS64:
            raise ValueError(f"{encoding:#x}: high access to a field that is not 64-bit")
        return enc

    def encode(self) -> int:
        return self.access | self.index << 1 | self.type << 10 | self.width << 13

    @property
    def read_only(self) -> bool:
        """VM-exit information fields are read-only to VMWRITE (SDM 25.9)."""
        return self.type is FieldType.READ_ONLY_DATA


def fields() -> dict[str, int]:
    """Name -> encoding of every supported VMCS field, in encoding order."""
    return {field.name: int(field) for field in sorted(VmcsField)}


_MASK32 = 0xFFFF_FFFF


class VMCS:
    """One VMCS's contents, read and written with VMREAD/VMWRITE semantics (SDM 31.3).

    Values are stored per field (keyed by the full encoding); fields never
    written read as 0. Values written are truncated to the field's width, so a
    negative Python int stores its two's complement (handy for TSC_OFFSET).
    """

    def __init__(self) -> None:
        self._values: dict[int, int] = {}

    def vmread(self, encoding: int) -> int:
        enc = self._supported(encoding)
        value = self._values.get(encoding & ~1, 0)
        # SDM 31.3 VMREAD: a high access reads bits 63:32 of the 64-bit field.
        return value >> 32 if enc.access is AccessType.HIGH else value

    def vmwrite(self, encoding: int, value: int) -> None:
        enc = self._supported(encoding)
        # SDM 31.3 VMWRITE: VMfailValid(13) for a VM-exit information field
        # (this model reports IA32_VMX_MISC[29] = 0).
        if enc.read_only:
            raise VmxInstructionError(
                VmInstructionErrorNumber.VMWRITE_READ_ONLY_VMCS_COMPONENT, f"field {encoding:#x}"
            )
        self._store(enc, encoding, value)

    def set_exit_info(self, encoding: int, value: int) -> None:
        """The processor's own write of a read-only data field (exit reason, qualification, error...)."""
        enc = self._supported(encoding)
        if not enc.read_only:
            raise ValueError(f"{encoding:#x} is not a VM-exit information field; use vmwrite")
        self._store(enc, encoding, value)

    def _supported(self, encoding: int) -> FieldEncoding:
        # SDM 31.3: VMfailValid(12) if the encoding names no supported component.
        if encoding not in _SUPPORTED:
            raise VmxInstructionError(
                VmInstructionErrorNumber.UNSUPPORTED_VMCS_COMPONENT, f"encoding {encoding:#x}"
            )
        return FieldEncoding.decode(encoding)

    def _store(self, enc: FieldEncoding, encoding: int, value: int) -> None:
        full = encoding & ~1
        if enc.access is AccessType.HIGH:
            # SDM 31.3 VMWRITE: a high access writes bits 63:32 and leaves bits 31:0 alone.
            old = self._values.get(full, 0)
            self._values[full] = (value & _MASK32) << 32 | old & _MASK32
        else:
            # SDM 31.3 VMWRITE: bits beyond the field's width are ignored.
            self._values[full] = value & ((1 << enc.width.bits) - 1)


_SUPPORTED = frozenset(int(field) for field in VmcsField)
