"""hvm.vtx.vmcs and hvm.vtx.errors: field encodings (SDM Appendix B, 25.11.2), VMREAD/VMWRITE (SDM 31.3)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx.errors import VmInstructionErrorNumber, VmxInstructionError
from hvm.vtx.vmcs import VMCS, AccessType, FieldEncoding, FieldType, FieldWidth, VmcsField, fields

F = VmcsField


@pytest.mark.parametrize(
    "field, encoding",
    [
        (F.VIRTUAL_PROCESSOR_ID, 0x0),
        (F.POSTED_INTR_NV, 0x2),
        (F.GUEST_ES_SELECTOR, 0x800),
        (F.IO_BITMAP_A, 0x2000),
        (F.MSR_BITMAP, 0x2004),
        (F.TSC_OFFSET, 0x2010),
        (F.VIRTUAL_APIC_PAGE_ADDR, 0x2012),
        (F.APIC_ACCESS_ADDR, 0x2014),
        (F.POSTED_INTR_DESC_ADDR, 0x2016),
        (F.EPT_POINTER, 0x201A),
        (F.EOI_EXIT_BITMAP0, 0x201C),
        (F.EOI_EXIT_BITMAP3, 0x2022),
        (F.TSC_MULTIPLIER, 0x2032),
        (F.GUEST_PHYSICAL_ADDRESS, 0x2400),
        (F.VMCS_LINK_POINTER, 0x2800),
        (F.PIN_BASED_VM_EXEC_CONTROL, 0x4000),
        (F.CPU_BASED_VM_EXEC_CONTROL, 0x4002),
        (F.EXCEPTION_BITMAP, 0x4004),
        (F.SECONDARY_VM_EXEC_CONTROL, 0x401E),
        (F.VM_INSTRUCTION_ERROR, 0x4400),
        (F.VM_EXIT_REASON, 0x4402),
        (F.VMX_PREEMPTION_TIMER_VALUE, 0x482E),
        (F.CR0_GUEST_HOST_MASK, 0x6000),
        (F.CR4_GUEST_HOST_MASK, 0x6002),
        (F.CR0_READ_SHADOW, 0x6004),
        (F.CR4_READ_SHADOW, 0x6006),
        (F.EXIT_QUALIFICATION, 0x6400),
        (F.GUEST_LINEAR_ADDRESS, 0x640A),
        (F.GUEST_CR0, 0x6800),
        (F.HOST_RIP, 0x6C16),
    ],
)
def test_encodings_match_sdm_appendix_b(field, encoding):
    assert field == encoding


def test_decode_host_rip():
    # 0x6C16 = 0b0110_1100_0001_0110: bit 0 = 0 (full), bits 9:1 = 0b000001011 = 11,
    # bits 11:10 = 0b11 (host state), bits 14:13 = 0b11 (natural width).
    assert FieldEncoding.decode(0x6C16) == FieldEncoding(
        AccessType.FULL, 11, FieldType.HOST_STATE, FieldWidth.NATURAL
    )


def test_decode_io_bitmap_a_high():
    # 0x2001: bit 0 = 1 (high), index 0, type 0 (control), bits 14:13 = 0b01 (64-bit).
    assert FieldEncoding.decode(0x2001) == FieldEncoding(
        AccessType.HIGH, 0, FieldType.CONTROL, FieldWidth.BITS64
    )


def test_decode_exit_reason():
    # 0x4402: bits 14:13 = 0b10 (32-bit), bits 11:10 = 0b01 (read-only data), index 1.
    enc = FieldEncoding.decode(0x4402)
    assert enc == FieldEncoding(AccessType.FULL, 1, FieldType.READ_ONLY_DATA, FieldWidth.BITS32)
    assert enc.read_only


@pytest.mark.parametrize("encoding", [0x1000, 0x8000, 0x1_0000, 0x4001, 0x0001, 0x6001, -2])
def test_decode_rejects_reserved_bits_and_bad_high_access(encoding):
    # SDM 25.11.2: bits 12, 15, 31:16 reserved; access type 1 only for 64-bit fields.
    with pytest.raises(ValueError):
        FieldEncoding.decode(encoding)


@pytest.mark.parametrize("field", list(VmcsField))
def test_every_field_encoding_is_well_formed(field):
    enc = FieldEncoding.decode(field)
    assert enc.encode() == field
    assert field.name.endswith("_HIGH") == (enc.access is AccessType.HIGH)
    if enc.access is AccessType.HIGH:
        assert F(field - 1).name + "_HIGH" == field.name
    if field.name.startswith("HOST_"):
        assert enc.type is FieldType.HOST_STATE
    if field.name.startswith("GUEST_") and field not in (
        F.GUEST_PHYSICAL_ADDRESS,
        F.GUEST_PHYSICAL_ADDRESS_HIGH,
        F.GUEST_LINEAR_ADDRESS,
    ):
        assert enc.type is FieldType.GUEST_STATE


def test_fields_lists_names_and_encodings_as_json():
    table = fields()
    assert table["HOST_RIP"] == 0x6C16
    assert table["IO_BITMAP_A_HIGH"] == 0x2001
    assert len(table) == len(VmcsField)
    assert list(table.values()) == sorted(table.values())
    assert json.loads(json.dumps(table)) == table


def test_unwritten_field_reads_zero():
    assert VMCS().vmread(F.GUEST_RIP) == 0


def test_unsupported_encoding_is_error_12():
    # SDM 31.3: VMREAD/VMWRITE of an unsupported component -> VMfailValid(12).
    vmcs = VMCS()
    for op in (lambda: vmcs.vmread(0x7000), lambda: vmcs.vmwrite(0x0004, 1), lambda: vmcs.vmread(0x4001)):
        with pytest.raises(VmxInstructionError) as e:
            op()
        assert e.value.number == 12
        assert e.value.message == "VMREAD/VMWRITE from/to unsupported VMCS component"


@pytest.mark.parametrize("field", [F.VM_EXIT_REASON, F.EXIT_QUALIFICATION, F.GUEST_PHYSICAL_ADDRESS_HIGH])
def test_vmwrite_read_only_is_error_13(field):
    # SDM 31.3: VMWRITE to a VM-exit information field -> VMfailValid(13), field unchanged.
    vmcs = VMCS()
    with pytest.raises(VmxInstructionError) as e:
        vmcs.vmwrite(field, 5)
    assert e.value.number == VmInstructionErrorNumber.VMWRITE_READ_ONLY_VMCS_COMPONENT
    assert e.value.message == "VMWRITE to read-only VMCS component"
    assert vmcs.vmread(field) == 0


def test_processor_writes_exit_information():
    vmcs = VMCS()
    vmcs.set_exit_info(F.VM_EXIT_REASON, 12)
    vmcs.set_exit_info(F.GUEST_PHYSICAL_ADDRESS, 0x1_2345_6000)
    vmcs.set_exit_info(F.VM_INSTRUCTION_ERROR, 0x1_0000_0007)  # 32-bit field: truncated
    assert vmcs.vmread(F.VM_EXIT_REASON) == 12
    assert vmcs.vmread(F.GUEST_PHYSICAL_ADDRESS_HIGH) == 1
    assert vmcs.vmread(F.VM_INSTRUCTION_ERROR) == 7
    with pytest.raises(ValueError):
        vmcs.set_exit_info(F.GUEST_RIP, 0)


@pytest.mark.parametrize(
    "field, written, read",
    [
        (F.GUEST_CS_SELECTOR, 0x1_2345, 0x2345),  # 16-bit: bits 15:0 kept
        (F.EXCEPTION_BITMAP, 0x1_FFFF_FFFF, 0xFFFF_FFFF),  # 32-bit: bits 31:0 kept
        (F.GUEST_RIP, 0xFFFF_8000_0000_1000, 0xFFFF_8000_0000_1000),  # natural width = 64 bits here
        (F.EPT_POINTER, 0x1_2345_601E, 0x1_2345_601E),  # 64-bit field, full access
        (F.TSC_OFFSET, -1000, 2**64 - 1000),  # negative: two's complement
    ],
)
def test_vmwrite_truncates_to_field_width(field, written, read):
    vmcs = VMCS()
    vmcs.vmwrite(field, written)
    assert vmcs.vmread(field) == read


def test_high_access_reads_and_writes_bits_63_32():
    # SDM 31.3: the high encoding of a 64-bit field reads/writes bits 63:32; bits 31:0 are untouched.
    vmcs = VMCS()
    vmcs.vmwrite(F.TSC_OFFSET, 0x1111_2222_3333_4444)
    assert vmcs.vmread(F.TSC_OFFSET_HIGH) == 0x1111_2222
    vmcs.vmwrite(F.TSC_OFFSET_HIGH, 0xABCD_0000_5555_6666)  # only bits 31:0 of the operand count
    assert vmcs.vmread(F.TSC_OFFSET) == 0x5555_6666_3333_4444


@given(
    st.sampled_from([f for f in VmcsField if not FieldEncoding.decode(f).read_only]),
    st.integers(0, 2**64 - 1),
)
def test_vmwrite_vmread_round_trip(field, value):
    vmcs = VMCS()
    vmcs.vmwrite(field, value)
    enc = FieldEncoding.decode(field)
    expected = value & 0xFFFF_FFFF if enc.access is AccessType.HIGH else value & ((1 << enc.width.bits) - 1)
    assert vmcs.vmread(field) == expected


def test_error_number_table_is_complete():
    # SDM 31.4: numbers 1-28 except 14, 21 and 27.
    assert {int(e) for e in VmInstructionErrorNumber} == set(range(1, 29)) - {14, 21, 27}
    assert all(e.description for e in VmInstructionErrorNumber)


def test_error_carries_number_message_and_detail():
    e = VmxInstructionError(7, "SDM 27.2.1.1: some rule")
    assert e.number == VmInstructionErrorNumber.ENTRY_INVALID_CONTROL_FIELD
    assert e.message == "VM entry with invalid control field(s)"
    assert str(e) == "VM-instruction error 7: VM entry with invalid control field(s): SDM 27.2.1.1: some rule"
    with pytest.raises(ValueError):
        VmxInstructionError(14)
