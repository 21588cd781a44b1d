"""hvm.vtx.qualification: exit qualifications (SDM 28.2.1), instruction information (SDM 28.2.5),
interruption information (SDM 25.8.3, 25.9.2). Fixed values are worked out from the SDM bit tables."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx.qualification import (
    AddressSize,
    ApicAccessQualification,
    ApicAccessType,
    CrAccessType,
    CrQualification,
    DrQualification,
    EptViolationQualification,
    GdtrIdtrInfo,
    GdtrIdtrInstruction,
    InterruptionInfo,
    InterruptionType,
    IoQualification,
    LdtrTrInfo,
    LdtrTrInstruction,
    MemoryOperand,
    SegmentRegister,
    TaskSwitchQualification,
    TaskSwitchSource,
)

u = st.integers
reg = u(0, 15)

io = st.builds(
    IoQualification,
    size=st.sampled_from([1, 2, 4]),
    is_in=st.booleans(),
    string=st.booleans(),
    rep=st.booleans(),
    immediate=st.booleans(),
    port=u(0, 0xFFFF),
)
cr = st.builds(
    CrQualification,
    cr=reg,
    access_type=st.sampled_from(CrAccessType),
    gpr=reg,
    lmsw_memory=st.booleans(),
    lmsw_source=u(0, 0xFFFF),
)
dr = st.builds(DrQualification, dr=u(0, 7), from_dr=st.booleans(), gpr=reg)
ept = st.builds(
    EptViolationQualification,
    read=st.booleans(),
    write=st.booleans(),
    fetch=st.booleans(),
    readable=st.booleans(),
    writable=st.booleans(),
    executable=st.booleans(),
    user_executable=st.booleans(),
    gla_valid=st.just(True),
    linear_translation=st.booleans(),
    nmi_unblocking=st.booleans(),
) | st.builds(
    EptViolationQualification,
    read=st.booleans(),
    write=st.booleans(),
    fetch=st.booleans(),
    readable=st.booleans(),
    writable=st.booleans(),
    executable=st.booleans(),
    gla_valid=st.just(False),
)
task = st.builds(TaskSwitchQualification, selector=u(0, 0xFFFF), source=st.sampled_from(TaskSwitchSource))
apic = st.builds(ApicAccessQualification, offset=u(0, 0xFFF), access_type=st.sampled_from(ApicAccessType))
memory = st.builds(
    MemoryOperand,
    segment=st.sampled_from(SegmentRegister),
    address_size=st.sampled_from(AddressSize),
    base=st.none() | reg,
    index=st.none() | reg,
    scaling=u(0, 3),
)
gdtr = st.builds(
    GdtrIdtrInfo,
    instruction=st.sampled_from(GdtrIdtrInstruction),
    operand=memory,
    operand_size_32=st.booleans(),
)
ldtr = st.builds(LdtrTrInfo, instruction=st.sampled_from(LdtrTrInstruction), operand=reg | memory)
interruption = st.builds(
    InterruptionInfo,
    vector=u(0, 255),
    type=st.sampled_from(InterruptionType),
    error_code_valid=st.booleans(),
    nmi_unblocking=st.booleans(),
    valid=st.booleans(),
)


@given(st.one_of(io, cr, dr, ept, task, apic, gdtr, ldtr, interruption))
def test_decode_inverts_encode(value):
    encoded = value.encode()
    assert 0 <= encoded < 1 << 32
    assert type(value).decode(encoded) == value


@pytest.mark.parametrize(
    "qualification, value",
    [
        # OUT DX, AL to 3F8H: size 1 -> bits 2:0 = 0; OUT -> bit 3 = 0; port 3F8H << 16 = 0x03F8_0000.
        (IoQualification(1, False, False, False, False, 0x3F8), 0x03F8_0000),
        # IN AX, 60H: size 2 -> 1; IN -> 0x08; immediate -> 0x40; 60H << 16 -> 0x0060_0000.
        (IoQualification(2, True, False, False, True, 0x60), 0x0060_0049),
        # REP OUTSD to port 80H: size 4 -> 3; string 0x10; REP 0x20; 80H << 16 = 0x0080_0000.
        (IoQualification(4, False, True, True, False, 0x80), 0x0080_0033),
    ],
)
def test_io_qualification_values(qualification, value):
    assert qualification.encode() == value
    assert IoQualification.decode(value) == qualification


@pytest.mark.parametrize(
    "qualification, value",
    [
        # MOV CR3, RAX: CR 3, type 0, GPR 0.
        (CrQualification(3, CrAccessType.MOV_TO_CR), 0x3),
        # MOV R12, CR8: CR 8; type 1 -> 1 << 4 = 0x10; R12 -> 12 << 8 = 0xC00.
        (CrQualification(8, CrAccessType.MOV_FROM_CR, gpr=12), 0xC18),
        # CLTS: type 2 -> 0x20.
        (CrQualification(0, CrAccessType.CLTS), 0x20),
        # LMSW [mem] with source 1: type 3 -> 0x30; memory -> 0x40; source 1 << 16.
        (CrQualification(0, CrAccessType.LMSW, lmsw_memory=True, lmsw_source=1), 0x1_0070),
    ],
)
def test_cr_qualification_values(qualification, value):
    assert qualification.encode() == value
    assert CrQualification.decode(value) == qualification


@pytest.mark.parametrize(
    "qualification, value",
    [
        # MOV DR7, RCX: DR 7; to DR -> bit 4 = 0; RCX -> 1 << 8.
        (DrQualification(7, False, 1), 0x107),
        # MOV RDX, DR6: DR 6; from DR -> 0x10; RDX -> 2 << 8 = 0x200.
        (DrQualification(6, True, 2), 0x216),
    ],
)
def test_dr_qualification_values(qualification, value):
    assert qualification.encode() == value
    assert DrQualification.decode(value) == qualification


def test_ept_violation_qualification_values():
    # Write (bit 1) to a read-only page (bit 3) at a linear address (bits 7, 8): 2 + 8 + 0x80 + 0x100.
    q = EptViolationQualification(
        read=False,
        write=True,
        fetch=False,
        readable=True,
        writable=False,
        executable=False,
        gla_valid=True,
        linear_translation=True,
    )
    assert q.encode() == 0x18A
    # Fetch (bit 2) from a not-present page while walking the guest's page tables (bit 7, not 8),
    # after an IRET that unblocked NMIs (bit 12): 4 + 0x80 + 0x1000.
    fetch = EptViolationQualification(
        True, False, True, False, False, False, gla_valid=True, nmi_unblocking=True
    )
    assert fetch.encode() == 0x1085
    assert EptViolationQualification.decode(0x1085) == fetch


def test_ept_violation_bit_8_needs_bit_7():
    # SDM 28.2.1: bit 8 is meaningful only when bit 7 is 1 (otherwise reserved, 0).
    with pytest.raises(ValueError):
        EptViolationQualification(True, False, False, True, True, True, linear_translation=True).encode()
    assert not EptViolationQualification.decode(0x100).linear_translation


def test_task_switch_and_apic_access_values():
    # IRET to TSS selector 28H: source 1 << 30.
    assert TaskSwitchQualification(0x28, TaskSwitchSource.IRET).encode() == 0x4000_0028
    # Task gate in the IDT (3 << 30) to selector FFF8H.
    assert TaskSwitchQualification.decode(0xC000_FFF8) == TaskSwitchQualification(
        0xFFF8, TaskSwitchSource.TASK_GATE
    )
    # Linear write to the ICR (offset 300H): type 1 << 12.
    assert ApicAccessQualification(0x300, ApicAccessType.LINEAR_WRITE).encode() == 0x1300
    # Guest-physical access during instruction execution: type 15 << 12, offset undefined (0).
    assert ApicAccessQualification.decode(0xF000).access_type is ApicAccessType.PHYSICAL_INSTRUCTION


def test_descriptor_table_instruction_information_values():
    # LGDT [RAX] in 64-bit mode: address size 2 << 7 = 0x100; DS = 3 << 15 = 0x1_8000;
    # no index -> bit 22 = 0x40_0000; base RAX = 0 << 23; LGDT = 2 << 28 = 0x2000_0000.
    lgdt = GdtrIdtrInfo(
        GdtrIdtrInstruction.LGDT, MemoryOperand(SegmentRegister.DS, AddressSize.BITS64, base=0)
    )
    assert lgdt.encode() == 0x2041_8100
    # LTR AX: register form -> Reg1 0 in bits 6:3, bit 10 = 0x400; LTR = 3 << 28.
    assert LdtrTrInfo(LdtrTrInstruction.LTR, 0).encode() == 0x3000_0400
    # SLDT [RBX + RSI*4]: scaling 2; 64-bit 0x100; DS 0x1_8000; index RSI 6 << 18 = 0x18_0000;
    # base RBX 3 << 23 = 0x180_0000; SLDT = 0.
    sldt = LdtrTrInfo(
        LdtrTrInstruction.SLDT,
        MemoryOperand(SegmentRegister.DS, AddressSize.BITS64, base=3, index=6, scaling=2),
    )
    assert sldt.encode() == 0x0199_8102
    # SIDT ES:[BX] with 16-bit addressing and a 32-bit operand: ES 0; 16-bit 0; bit 11 = 0x800;
    # base BX 3 << 23; no index 0x40_0000; SIDT 1 << 28.
    assert GdtrIdtrInfo.decode(0x11C0_0800) == GdtrIdtrInfo(
        GdtrIdtrInstruction.SIDT,
        MemoryOperand(SegmentRegister.ES, AddressSize.BITS16, base=3),
        operand_size_32=True,
    )


def test_instruction_information_ignores_undefined_bits():
    # LTR with register 5 and garbage in undefined bits 2, 14:11 and 31:30.
    assert LdtrTrInfo.decode(0xF000_7C2C | 1 << 10) == LdtrTrInfo(LdtrTrInstruction.LTR, 5)


@pytest.mark.parametrize(
    "info, value",
    [
        # #PF (vector 14) delivering an error code: type 3 << 8, bit 11, valid bit 31.
        (InterruptionInfo(14, InterruptionType.HARDWARE_EXCEPTION, error_code_valid=True), 0x8000_0B0E),
        # External interrupt, vector 20H.
        (InterruptionInfo(0x20, InterruptionType.EXTERNAL_INTERRUPT), 0x8000_0020),
        # NMI: vector 2, type 2.
        (InterruptionInfo(2, InterruptionType.NMI), 0x8000_0202),
        # INT 80H: type 4.
        (InterruptionInfo(0x80, InterruptionType.SOFTWARE_INTERRUPT), 0x8000_0480),
        # #GP after an IRET that unblocked NMIs: 13 | 3 << 8 | 1 << 11 | 1 << 12 | 1 << 31.
        (InterruptionInfo(13, InterruptionType.HARDWARE_EXCEPTION, True, True), 0x8000_1B0D),
    ],
)
def test_interruption_information_values(info, value):
    assert info.encode() == value
    assert InterruptionInfo.decode(value) == info


@pytest.mark.parametrize(
    "decode, value",
    [
        (IoQualification.decode, 0x2),  # bits 2:0 = 2: not an I/O size
        (InterruptionInfo.decode, 0x8000_0100),  # interruption type 1 is reserved
        (ApicAccessQualification.decode, 0x4000),  # access type 4 is not defined
    ],
)
def test_decode_rejects_undefined_values(decode, value):
    with pytest.raises(ValueError):
        decode(value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: IoQualification(3, False, False, False, False, 0).encode(),
        lambda: IoQualification(1, False, False, False, False, 0x1_0000).encode(),
        lambda: CrQualification(16, CrAccessType.MOV_TO_CR).encode(),
        lambda: InterruptionInfo(256, InterruptionType.NMI).encode(),
        lambda: MemoryOperand(SegmentRegister.DS, AddressSize.BITS64, scaling=4).encode(),
    ],
)
def test_encode_rejects_values_that_do_not_fit(make):
    with pytest.raises(ValueError):
        make()
