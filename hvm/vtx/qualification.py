"""Exit qualifications and event-information fields: Intel SDM Vol. 3C, 25.8.3, 25.9 and 28.2.

A VM exit explains itself through a few VMCS fields whose bits have fixed
meanings. Each format here is a dataclass with ``encode() -> int`` and
``decode(int)``::

    q = IoQualification(size=1, is_in=False, string=False, rep=False, immediate=False, port=0x3F8)
    vmcs.set_exit_info(VmcsField.EXIT_QUALIFICATION, q.encode())
    IoQualification.decode(vmcs.vmread(VmcsField.EXIT_QUALIFICATION)) == q

Exit qualifications (SDM 28.2.1, tables "Exit Qualification for ..."): I/O
instructions, control-register accesses, MOV DR, EPT violations, task switches,
APIC accesses. VM-exit instruction information for descriptor-table exits
(SDM 28.2.5; the exit qualification of those exits holds the displacement).
Interruption information for VM exits, IDT vectoring and VM-entry injection
(SDM 25.8.3, 25.9.2, 25.9.3). ``decode`` ignores reserved and undefined bits;
``encode`` rejects values that do not fit their bit fields.

Section numbers are those of the current SDM; editions before 2023 number
these chapters one lower (27.2.1 for 28.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


def _bits(value: int, low: int, width: int) -> int:
    return value >> low & ((1 << width) - 1)


def _bit(value: int, position: int) -> bool:
    return bool(value >> position & 1)


def _fits(value: int, width: int, what: str) -> int:
    if not 0 <= value < 1 << width:
        raise ValueError(f"{what}={value:#x} does not fit in {width} bits")
    return value


# --- I/O instructions (SDM 28.2.1, table "Exit Qualification for I/O Instructions") ---


@dataclass(frozen=True)
class IoQualification:
    size: int  # bytes per access: 1, 2 or 4 (bits 2:0 hold size - 1)
    is_in: bool  # bit 3: direction, 1 = IN/INS, 0 = OUT/OUTS
    string: bool  # bit 4: INS/OUTS
    rep: bool  # bit 5: REP prefixed
    immediate: bool  # bit 6: operand encoding, 1 = immediate port, 0 = DX
    port: int  # bits 31:16

    def encode(self) -> int:
        if self.size not in (1, 2, 4):
            raise ValueError(f"I/O size {self.size} is not 1, 2 or 4")
        return (
            (self.size - 1)
            | self.is_in << 3
            | self.string << 4
            | self.rep << 5
            | self.immediate << 6
            | _fits(self.port, 16, "port") << 16
        )

    @classmethod
    def decode(cls, value: int) -> IoQualification:
        size = _bits(value, 0, 3) + 1
        if size not in (1, 2, 4):
            raise ValueError(f"bits 2:0 = {size - 1} is not an I/O size")
        return cls(
            size=size,
            is_in=_bit(value, 3),
            string=_bit(value, 4),
            rep=_bit(value, 5),
            immediate=_bit(value, 6),
            port=_bits(value, 16, 16),
        )


# --- Control-register accesses (SDM 28.2.1, table "Exit Qualification for Control-Register Accesses") ---


class CrAccessType(IntEnum):
    """Bits 5:4."""

    MOV_TO_CR = 0
    MOV_FROM_CR = 1
    CLTS = 2
    LMSW = 3


@dataclass(frozen=True)
class CrQualification:
    cr: int  # bits 3:0: control register number (0 for CLTS and LMSW)
    access_type: CrAccessType  # bits 5:4
    gpr: int = 0  # bits 11:8: MOV CR's general-purpose register (0 = RAX ... 15 = R15)
    lmsw_memory: bool = False  # bit 6: LMSW operand type, 1 = memory, 0 = register
    lmsw_source: int = 0  # bits 31:16: LMSW source data

    def encode(self) -> int:
        return (
            _fits(self.cr, 4, "cr")
            | self.access_type << 4
            | self.lmsw_memory << 6
            | _fits(self.gpr, 4, "gpr") << 8
            | _fits(self.lmsw_source, 16, "lmsw_source") << 16
        )

    @classmethod
    def decode(cls, value: int) -> CrQualification:
        return cls(
            cr=_bits(value, 0, 4),
            access_type=CrAccessType(_bits(value, 4, 2)),
            gpr=_bits(value, 8, 4),
            lmsw_memory=_bit(value, 6),
            lmsw_source=_bits(value, 16, 16),
        )


# --- MOV DR (SDM 28.2.1, table "Exit Qualification for MOV DR") ---


@dataclass(frozen=True)
class DrQualification:
    dr: int  # bits 2:0: debug register number
    from_dr: bool  # bit 4: direction, 1 = MOV from DR, 0 = MOV to DR
    gpr: int  # bits 11:8: general-purpose register

    def encode(self) -> int:
        return _fits(self.dr, 3, "dr") | self.from_dr << 4 | _fits(self.gpr, 4, "gpr") << 8

    @classmethod
    def decode(cls, value: int) -> DrQualification:
        return cls(dr=_bits(value, 0, 3), from_dr=_bit(value, 4), gpr=_bits(value, 8, 4))


# --- EPT violations (SDM 28.2.1, table "Exit Qualification for EPT Violations") ---


@dataclass(frozen=True)
class EptViolationQualification:
    read: bool  # bit 0: the access was a data read
    write: bool  # bit 1: the access was a data write
    fetch: bool  # bit 2: the access was an instruction fetch
    readable: bool  # bit 3: AND of bit 0 (R) of the EPT entries used
    writable: bool  # bit 4: AND of bit 1 (W)
    executable: bool  # bit 5: AND of bit 2 (X; supervisor-mode execute with mode-based control)
    user_executable: bool = False  # bit 6: AND of bit 10 (user-mode execute, mode-based control)
    gla_valid: bool = False  # bit 7: the guest linear-address field is valid
    linear_translation: bool = False  # bit 8 (if bit 7): 1 = the access's own translation,
    #                                   0 = an access to a guest paging-structure entry
    nmi_unblocking: bool = False  # bit 12: NMI unblocking due to IRET

    def encode(self) -> int:
        # SDM: if bit 7 is 0, bit 8 is reserved (cleared to 0).
        if self.linear_translation and not self.gla_valid:
            raise ValueError("bit 8 (linear_translation) needs bit 7 (gla_valid)")
        return (
            self.read
            | self.write << 1
            | self.fetch << 2
            | self.readable << 3
            | self.writable << 4
            | self.executable << 5
            | self.user_executable << 6
            | self.gla_valid << 7
            | self.linear_translation << 8
            | self.nmi_unblocking << 12
        )

    @classmethod
    def decode(cls, value: int) -> EptViolationQualification:
        return cls(
            read=_bit(value, 0),
            write=_bit(value, 1),
            fetch=_bit(value, 2),
            readable=_bit(value, 3),
            writable=_bit(value, 4),
            executable=_bit(value, 5),
            user_executable=_bit(value, 6),
            gla_valid=_bit(value, 7),
            linear_translation=_bit(value, 7) and _bit(value, 8),
            nmi_unblocking=_bit(value, 12),
        )


# --- Task switches (SDM 28.2.1, table "Exit Qualification for Task Switches") ---


class TaskSwitchSource(IntEnum):
    """Bits 31:30."""

    CALL = 0
    IRET = 1
    JMP = 2
    TASK_GATE = 3  # task gate in the IDT


@dataclass(frozen=True)
class TaskSwitchQualification:
    selector: int  # bits 15:0: selector of the TSS being switched to
    source: TaskSwitchSource  # bits 31:30

    def encode(self) -> int:
        return _fits(self.selector, 16, "selector") | self.source << 30

    @classmethod
    def decode(cls, value: int) -> TaskSwitchQualification:
        return cls(selector=_bits(value, 0, 16), source=TaskSwitchSource(_bits(value, 30, 2)))


# --- APIC accesses (SDM 28.2.1, table "Exit Qualification for APIC-Access VM Exits") ---


class ApicAccessType(IntEnum):
    """Bits 15:12 (names as Linux's TYPE_*_APIC_* constants)."""

    LINEAR_READ = 0  # linear access for a data read during instruction execution
    LINEAR_WRITE = 1  # linear access for a data write during instruction execution
    LINEAR_FETCH = 2  # linear access for an instruction fetch
    LINEAR_EVENT = 3  # linear access (read or write) during event delivery
    PHYSICAL_EVENT = 10  # guest-physical access during event delivery
    PHYSICAL_INSTRUCTION = 15  # guest-physical access for a fetch or during instruction execution


@dataclass(frozen=True)
class ApicAccessQualification:
    offset: int  # bits 11:0: offset within the APIC page (linear accesses)
    access_type: ApicAccessType  # bits 15:12

    def encode(self) -> int:
        return _fits(self.offset, 12, "offset") | self.access_type << 12

    @classmethod
    def decode(cls, value: int) -> ApicAccessQualification:
        return cls(offset=_bits(value, 0, 12), access_type=ApicAccessType(_bits(value, 12, 4)))


# --- VM-exit instruction information for descriptor-table exits (SDM 28.2.5, 27.2.5 before 2023) ---


class AddressSize(IntEnum):
    """Bits 9:7."""

    BITS16 = 0
    BITS32 = 1
    BITS64 = 2


class SegmentRegister(IntEnum):
    """Bits 17:15."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


class GdtrIdtrInstruction(IntEnum):
    """Bits 29:28 for exit reason 46 (GDTR/IDTR access)."""

    SGDT = 0
    SIDT = 1
    LGDT = 2
    LIDT = 3


class LdtrTrInstruction(IntEnum):
    """Bits 29:28 for exit reason 47 (LDTR/TR access)."""

    SLDT = 0
    STR = 1
    LLDT = 2
    LTR = 3


@dataclass(frozen=True)
class MemoryOperand:
    """The memory-operand part of the instruction-information field: segment:[base + index*scale + disp]."""

    segment: SegmentRegister  # bits 17:15
    address_size: AddressSize  # bits 9:7
    base: int | None = None  # bits 26:23, or None: bit 27 (BaseReg invalid) set
    index: int | None = None  # bits 21:18, or None: bit 22 (IndexReg invalid) set
    scaling: int = 0  # bits 1:0: index scaled by 1 << scaling

    def encode(self) -> int:
        return (
            _fits(self.scaling, 2, "scaling")
            | self.address_size << 7
            | self.segment << 15
            | (1 << 22 if self.index is None else _fits(self.index, 4, "index") << 18)
            | (1 << 27 if self.base is None else _fits(self.base, 4, "base") << 23)
        )

    @classmethod
    def decode(cls, value: int) -> MemoryOperand:
        return cls(
            segment=SegmentRegister(_bits(value, 15, 3)),
            address_size=AddressSize(_bits(value, 7, 3)),
            base=None if _bit(value, 27) else _bits(value, 23, 4),
            index=None if _bit(value, 22) else _bits(value, 18, 4),
            scaling=_bits(value, 0, 2),
        )


@dataclass(frozen=True)
class InvInfo:
    """Instruction information for INVEPT, INVPCID, INVVPID (SDM 28.2.5, table "Format of the VM-Exit
    Instruction-Information Field as Used for INVEPT, INVPCID, and INVVPID"): the memory operand
    (the descriptor), bit 10 cleared to 0, and Reg2 (bits 31:28), the register holding the type.
    Their exit qualification is the instruction's displacement (SDM 28.2.1)."""

    operand: MemoryOperand
    reg2: int  # bits 31:28

    def encode(self) -> int:
        return self.operand.encode() | _fits(self.reg2, 4, "reg2") << 28

    @classmethod
    def decode(cls, value: int) -> InvInfo:
        return cls(operand=MemoryOperand.decode(value), reg2=_bits(value, 28, 4))


@dataclass(frozen=True)
class GdtrIdtrInfo:
    """Instruction information for LIDT, LGDT, SIDT, SGDT (SDM 28.2.5, table "Format of the VM-Exit
    Instruction-Information Field as Used for LIDT, LGDT, SIDT, or SGDT")."""

    instruction: GdtrIdtrInstruction  # bits 29:28
    operand: MemoryOperand
    operand_size_32: bool = False  # bit 11: 0 = 16-bit, 1 = 32-bit operand (undefined in 64-bit mode)

    def encode(self) -> int:
        return self.operand.encode() | self.operand_size_32 << 11 | self.instruction << 28

    @classmethod
    def decode(cls, value: int) -> GdtrIdtrInfo:
        return cls(
            instruction=GdtrIdtrInstruction(_bits(value, 28, 2)),
            operand=MemoryOperand.decode(value),
            operand_size_32=_bit(value, 11),
        )


@dataclass(frozen=True)
class LdtrTrInfo:
    """Instruction information for LLDT, LTR, SLDT, STR (SDM 28.2.5, table "Format of the VM-Exit
    Instruction-Information Field as Used for LLDT, LTR, SLDT, and STR")."""

    instruction: LdtrTrInstruction  # bits 29:28
    operand: int | MemoryOperand  # a register (bits 6:3, bit 10 = 1) or a memory operand (bit 10 = 0)

    def encode(self) -> int:
        if isinstance(self.operand, MemoryOperand):
            operand = self.operand.encode()
        else:
            operand = _fits(self.operand, 4, "register") << 3 | 1 << 10
        return operand | self.instruction << 28

    @classmethod
    def decode(cls, value: int) -> LdtrTrInfo:
        operand = _bits(value, 3, 4) if _bit(value, 10) else MemoryOperand.decode(value)
        return cls(instruction=LdtrTrInstruction(_bits(value, 28, 2)), operand=operand)


# --- Interruption information (SDM 25.8.3 VM entry, 25.9.2 VM exit, 25.9.3 IDT vectoring) ---


class InterruptionType(IntEnum):
    """Bits 10:8 (1 is reserved)."""

    EXTERNAL_INTERRUPT = 0
    NMI = 2
    HARDWARE_EXCEPTION = 3
    SOFTWARE_INTERRUPT = 4
    PRIVILEGED_SOFTWARE_EXCEPTION = 5  # INT1
    SOFTWARE_EXCEPTION = 6  # INT3, INTO
    OTHER_EVENT = 7  # VM entry: pending MTF VM exit


@dataclass(frozen=True)
class InterruptionInfo:
    """VM-exit / IDT-vectoring / VM-entry interruption-information format.

    ``nmi_unblocking`` (bit 12) exists only in the VM-exit field; it is
    reserved in the VM-entry field and undefined in the IDT-vectoring field.
    """

    vector: int  # bits 7:0
    type: InterruptionType  # bits 10:8
    error_code_valid: bool = False  # bit 11 ("deliver error code" for VM entry)
    nmi_unblocking: bool = False  # bit 12: NMI unblocking due to IRET
    valid: bool = True  # bit 31

    def encode(self) -> int:
        return (
            _fits(self.vector, 8, "vector")
            | self.type << 8
            | self.error_code_valid << 11
            | self.nmi_unblocking << 12
            | self.valid << 31
        )

    @classmethod
    def decode(cls, value: int) -> InterruptionInfo:
        return cls(
            vector=_bits(value, 0, 8),
            type=InterruptionType(_bits(value, 8, 3)),
            error_code_valid=_bit(value, 11),
            nmi_unblocking=_bit(value, 12),
            valid=_bit(value, 31),
        )
