"""hvm.vtx.ept: EPTP (SDM 25.6.11), EPT translation (SDM 29.3.2), misconfigurations (29.3.3.1),
violations (29.3.3.2), accessed and dirty flags (29.3.5)."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx.capabilities import MODEL_CAPS, EptVpidCap
from hvm.vtx.ept import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    EptAccess,
    EptBuilder,
    EptMisconfig,
    Eptp,
    EptPerm,
    EptTranslation,
    EptViolation,
    MemoryType,
    ept_translate,
)
from hvm.vtx.memory import ByteMemory

POOL = 0x10000  # tables are allocated from here: root at 0x10000, then 0x11000, 0x12000, ...
A, D = 1 << 8, 1 << 9


def setup(**kwargs) -> tuple[ByteMemory, EptBuilder]:
    mem = ByteMemory(0x40000)
    return mem, EptBuilder(mem, pool=POOL, pool_size=0x30000, **kwargs)


def test_eptp_format():
    # SDM 25.6.11: bits 2:0 memory type (WB = 6), bits 5:3 walk length - 1 (3), bit 6 A/D, bits N-1:12 root.
    assert Eptp(root=0x10000).encode() == 0x1_001E
    assert Eptp(root=0x10000, accessed_dirty=True).encode() == 0x1_005E
    assert Eptp(root=0x10000, levels=5, memory_type=MemoryType.UC).encode() == 0x1_0020
    assert Eptp.decode(0x1_005E) == Eptp(0x10000, 4, MemoryType.WB, True)
    with pytest.raises(ValueError):
        Eptp.decode(0x1_0016)  # bits 5:3 = 2: a 3-level walk


def test_4k_translation_reads_four_entries():
    mem, ept = setup()
    ept.map(gpa=0x1234_5000, hpa=0x7_0000_0000, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, 0x1234_5678, EptAccess.READ)
    assert isinstance(result, EptTranslation)
    assert result.hpa == 0x7_0000_0678
    assert result.page_size == PAGE_4K
    assert result.permissions == EptPerm.RWX
    assert result.memory_type is MemoryType.WB and not result.ignore_pat
    # PML4 index 0, PDPT index 0, PD index 12345678H >> 21 = 91H, PT index 12345H & 1FFH = 145H;
    # tables at 10000H, 11000H, 12000H, 13000H: entry i of a table is at table + 8*i.
    assert result.refs == (0x10000, 0x11000, 0x12000 + 0x91 * 8, 0x13000 + 0x145 * 8)
    # The leaf: address | RWX (7) | memory type WB (6 << 3 = 30H).
    assert mem.read_u64(0x13A28) == 0x7_0000_0037


def test_2m_and_1g_pages_walk_fewer_levels():
    mem, ept = setup()
    ept.map(gpa=0x4000_0000, hpa=0x8000_0000, size=2 * PAGE_2M, page_size=PAGE_2M)
    ept.map(gpa=0x80_0000_0000, hpa=0x1_4000_0000, size=PAGE_1G, page_size=PAGE_1G)  # PML4 index 1
    two_m = ept_translate(mem, ept.eptp, 0x4032_3456, EptAccess.WRITE)
    assert (two_m.hpa, two_m.page_size, len(two_m.refs)) == (0x8032_3456, PAGE_2M, 3)
    one_g = ept_translate(mem, ept.eptp, 0x80_1234_5678, EptAccess.FETCH)
    assert (one_g.hpa, one_g.page_size, len(one_g.refs)) == (0x1_5234_5678, PAGE_1G, 2)
    assert one_g.refs[0] == POOL + 8


def test_five_level_walk_reads_five_entries():
    mem, ept = setup(levels=5)
    ept.map(gpa=0x3000, hpa=0x5000, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, 0x3008, EptAccess.READ)
    assert result.hpa == 0x5008
    assert len(result.refs) == 5
    # GPA bit 48 selects PML5 entry 1; such GPAs need a physical-address width above 48 bits.
    wide = replace(MODEL_CAPS, phys_addr_width=52)
    ept.map(gpa=1 << 48, hpa=0x6000, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, 1 << 48 | 8, EptAccess.READ, caps=wide)
    assert result.hpa == 0x6008
    assert result.refs[0] == POOL + 8


def test_write_to_read_only_page_is_a_violation():
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.READ)
    assert isinstance(ept_translate(mem, ept.eptp, 0x3010, EptAccess.READ), EptTranslation)
    result = ept_translate(mem, ept.eptp, 0x3010, EptAccess.WRITE)
    assert isinstance(result, EptViolation)
    assert result.gpa == 0x3010 and len(result.refs) == 4
    assert result.permissions == EptPerm.READ
    # Qualification: write (bit 1 = 2) + readable (bit 3 = 8); with a linear address: + 0x80 + 0x100.
    assert result.qualification().encode() == 0xA
    assert result.qualification(gla_valid=True, linear_translation=True).encode() == 0x18A


def test_not_present_entry_is_a_violation_with_no_permissions():
    mem, ept = setup()
    ept.map(gpa=0, hpa=0x9000, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, 0x20_0000, EptAccess.FETCH)  # PD index 1: not present
    assert isinstance(result, EptViolation)
    assert result.permissions == 0
    assert len(result.refs) == 3
    assert result.qualification().encode() == 0x4  # fetch, and bits 3-5 clear


def test_execute_only_page():
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.EXECUTE)
    assert isinstance(ept_translate(mem, ept.eptp, 0x3000, EptAccess.FETCH), EptTranslation)
    read = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ)
    assert isinstance(read, EptViolation)
    assert read.qualification().encode() == 0x21  # read (bit 0) + executable (bit 5)
    # SDM 29.3.3.1: without IA32_VMX_EPT_VPID_CAP[0], an execute-only entry is a misconfiguration.
    no_xo = replace(MODEL_CAPS, ept_vpid_cap=MODEL_CAPS.ept_vpid_cap & ~EptVpidCap.EXECUTE_ONLY)
    assert isinstance(ept_translate(mem, ept.eptp, 0x3000, EptAccess.FETCH, caps=no_xo), EptMisconfig)


@pytest.mark.parametrize("permissions", [EptPerm.WRITE, EptPerm.WRITE | EptPerm.EXECUTE])
def test_write_without_read_is_a_misconfiguration(permissions):
    # SDM 29.3.3.1: bits 2:0 = 010b or 110b.
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=permissions)
    result = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ)
    assert isinstance(result, EptMisconfig)
    assert result.entry_address == 0x13000 + 3 * 8
    assert "read" in result.reason


def leaf_address(mem, ept, gpa):
    return ept_translate(mem, ept.eptp, gpa, EptAccess.READ).refs[-1]


@pytest.mark.parametrize(
    "which, bits",
    [
        ("pml4e", 1 << 3),  # SDM 29.3.2: PML4E bits 7:3 reserved
        ("pml4e", 1 << 7),
        ("pdpte", 1 << 5),  # non-leaf PDPTE bits 6:3 reserved
        ("pde", 1 << 3),  # non-leaf PDE bits 6:3 reserved
        ("pte", 1 << 46),  # bits 51:N with N = 46
        ("pte", 1 << 51),
    ],
)
def test_reserved_bits_are_misconfigurations(which, bits):
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K)
    refs = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ).refs
    address = refs[["pml4e", "pdpte", "pde", "pte"].index(which)]
    mem.write_u64(address, mem.read_u64(address) | bits)
    result = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ)
    assert isinstance(result, EptMisconfig)
    assert result.entry_address == address
    assert "reserved bits" in result.reason


def test_large_page_reserved_bits():
    mem, ept = setup()
    ept.map(gpa=PAGE_2M, hpa=PAGE_2M, size=PAGE_2M, page_size=PAGE_2M)
    pde = leaf_address(mem, ept, PAGE_2M)
    mem.write_u64(pde, mem.read_u64(pde) | 1 << 12)  # SDM 29.3.2: 2-MByte PDE bits 20:12 reserved
    assert isinstance(ept_translate(mem, ept.eptp, PAGE_2M, EptAccess.READ), EptMisconfig)
    ept.map(gpa=PAGE_1G, hpa=PAGE_1G, size=PAGE_1G, page_size=PAGE_1G)
    pdpte = leaf_address(mem, ept, PAGE_1G)
    # SDM 29.3.2: without 1-GByte page support, bit 7 of a PDPTE is reserved.
    no_1g = replace(MODEL_CAPS, ept_vpid_cap=MODEL_CAPS.ept_vpid_cap & ~EptVpidCap.PDPTE_1G)
    assert isinstance(ept_translate(mem, ept.eptp, PAGE_1G, EptAccess.READ, caps=no_1g), EptMisconfig)
    mem.write_u64(pdpte, mem.read_u64(pdpte) | 1 << 29)  # 1-GByte PDPTE bits 29:12 reserved
    assert isinstance(ept_translate(mem, ept.eptp, PAGE_1G, EptAccess.READ), EptMisconfig)


@pytest.mark.parametrize("memory_type", [2, 3, 7])
def test_reserved_leaf_memory_type_is_a_misconfiguration(memory_type):
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.READ)
    pte = leaf_address(mem, ept, 0x3000)
    mem.write_u64(pte, mem.read_u64(pte) & ~(7 << 3) | memory_type << 3)
    # Misconfiguration takes priority over the violation a write would otherwise be.
    result = ept_translate(mem, ept.eptp, 0x3000, EptAccess.WRITE)
    assert isinstance(result, EptMisconfig)
    assert "memory type" in result.reason


def test_memory_type_and_ignore_pat_are_reported():
    mem, ept = setup()
    ept.map(gpa=0xFEE0_0000, hpa=0xFEE0_0000, size=PAGE_4K, memory_type=MemoryType.UC, ignore_pat=True)
    result = ept_translate(mem, ept.eptp, 0xFEE0_0300, EptAccess.WRITE)
    assert result.memory_type is MemoryType.UC and result.ignore_pat
    assert mem.read_u64(result.refs[-1]) & 0x7F == 0x47  # IPAT (40H) | UC (0 << 3) | RWX (7)


def test_accessed_and_dirty_flags():
    # SDM 29.3.5: with EPTP bit 6, every entry used gets A; the leaf gets D on a write.
    mem, ept = setup(accessed_dirty=True)
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K)
    refs = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ).refs
    assert all(mem.read_u64(r) & A for r in refs)
    assert not any(mem.read_u64(r) & D for r in refs)
    ept_translate(mem, ept.eptp, 0x3000, EptAccess.WRITE)
    assert [bool(mem.read_u64(r) & D) for r in refs] == [False, False, False, True]


def test_no_flags_without_eptp_bit_6():
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K)
    before = bytes(mem.data)
    ept_translate(mem, ept.eptp, 0x3000, EptAccess.WRITE)
    assert bytes(mem.data) == before


def test_failed_translation_sets_no_flags():
    mem, ept = setup(accessed_dirty=True)
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.READ)
    before = bytes(mem.data)
    assert isinstance(ept_translate(mem, ept.eptp, 0x3000, EptAccess.WRITE), EptViolation)
    assert bytes(mem.data) == before


def test_guest_paging_structure_accesses_count_as_writes_with_ad():
    # SDM 29.3.3.2: with EPT A/D flags, reading a guest page table is a write for EPT purposes.
    mem, ept = setup(accessed_dirty=True)
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.READ)
    ept.map(gpa=0x4000, hpa=0xA000, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ, paging_structure=True)
    assert isinstance(result, EptViolation)
    assert result.access == EptAccess.READ | EptAccess.WRITE
    assert result.qualification().encode() == 0xB  # read + write (bits 0, 1) + readable (bit 3)
    ok = ept_translate(mem, ept.eptp, 0x4000, EptAccess.READ, paging_structure=True)
    assert mem.read_u64(ok.refs[-1]) & D


def test_guest_paging_structure_reads_without_ad_are_reads():
    mem, ept = setup()
    ept.map(gpa=0x3000, hpa=0x9000, size=PAGE_4K, permissions=EptPerm.READ)
    assert isinstance(
        ept_translate(mem, ept.eptp, 0x3000, EptAccess.READ, paging_structure=True), EptTranslation
    )


def test_gpa_beyond_physical_address_width():
    mem, ept = setup()
    with pytest.raises(ValueError):
        ept_translate(mem, ept.eptp, 1 << 46, EptAccess.READ)


def test_builder_rejects_bad_requests():
    mem, ept = setup()
    with pytest.raises(ValueError):
        ept.map(gpa=0x1000, hpa=0, size=PAGE_2M, page_size=PAGE_2M)  # misaligned
    with pytest.raises(ValueError):
        ept.map(gpa=0, hpa=0, size=PAGE_4K, page_size=0x8000)
    ept.map(gpa=PAGE_2M, hpa=0, size=PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(ValueError):
        ept.map(gpa=PAGE_2M + PAGE_4K, hpa=0, size=PAGE_4K)  # inside a 2-MiB page
    ept.map(gpa=0, hpa=0, size=PAGE_4K)
    with pytest.raises(ValueError):
        ept.map(gpa=0, hpa=0, size=PAGE_2M, page_size=PAGE_2M)  # over a page table
    small = EptBuilder(ByteMemory(0x10000), pool=0x1000, pool_size=0x3000)  # room for 3 tables only
    with pytest.raises(ValueError):
        small.map(gpa=0, hpa=0, size=PAGE_4K)


@given(st.integers(0, (1 << 34) - 1), st.integers(0, (1 << 34) - 1), st.integers(0, 0xFFF))
def test_mapped_pages_translate_to_their_host_page(gpa_page, hpa_page, offset):
    mem, ept = setup()
    ept.map(gpa=gpa_page << 12, hpa=hpa_page << 12, size=PAGE_4K)
    result = ept_translate(mem, ept.eptp, gpa_page << 12 | offset, EptAccess.WRITE)
    assert result.hpa == hpa_page << 12 | offset
