"""hvm.vtx.paging: guest paging (SDM Vol. 3A 4.3-4.8) with page tables built by hand, and the 2-D walk."""

import pytest

from hvm.vtx.ept import EptAccess, EptBuilder, EptTranslation, ept_translate
from hvm.vtx.memory import ByteMemory
from hvm.vtx.paging import (
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    PAGE_4M,
    Access,
    PageFault,
    PagingMode,
    PagingRegs,
    PfError,
    Translation,
    load_pdptes,
    translate,
)
from hvm.vtx.regs import Cr0, Cr4, Efer

P, RW, US, A, D, PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
XD = 1 << 63
PRW = P | RW | US  # present, writable, user: 7
R, W, X = Access.READ, Access.WRITE, Access.FETCH


def put32(mem: ByteMemory, address: int, value: int) -> None:
    mem.data[address : address + 4] = value.to_bytes(4, "little")


def get32(mem: ByteMemory, address: int) -> int:
    return int.from_bytes(mem.data[address : address + 4], "little")


def fault(result) -> int:
    assert isinstance(result, PageFault), result
    return result.error_code


# --- 32-bit paging (SDM 4.3) ---

REGS32 = PagingRegs(cr0=Cr0.PE | Cr0.PG, cr3=0x1000)


def mem32() -> ByteMemory:
    """Page directory at 1000H; PDE 1 -> page table at 2000H; PTE 1 -> page 5000H (user, writable)."""
    mem = ByteMemory(0x10000)
    put32(mem, 0x1000 + 1 * 4, 0x2000 | PRW)
    put32(mem, 0x2000 + 1 * 4, 0x5000 | PRW)
    return mem


def test_32bit_4k_translation_and_accessed_dirty():
    mem = mem32()
    # 401234H: directory index 401234H >> 22 = 1, table index (401234H >> 12) & 3FFH = 1, offset 234H.
    result = translate(mem, REGS32, 0x40_1234, R)
    assert result == Translation(0x5234, PAGE_4K, (0x1004, 0x2004))
    # SDM 4.8: reads set A (20H) in both entries, no D.
    assert (get32(mem, 0x1004), get32(mem, 0x2004)) == (0x2027, 0x5027)
    translate(mem, REGS32, 0x40_1234, W)
    # A write sets D (40H) in the PTE only.
    assert (get32(mem, 0x1004), get32(mem, 0x2004)) == (0x2027, 0x5067)
    assert get32(mem, 0x1000) == 0 and get32(mem, 0x1008) == 0  # neighbours untouched


def test_32bit_4m_pages_need_cr4_pse():
    mem = mem32()
    # PDE 2: 4-MByte page at C000000H, PS = 1; bits 14:13 = 3 give physical-address bits 33:32 (PSE-36).
    put32(mem, 0x1000 + 2 * 4, 0x0C00_0000 | 3 << 13 | PS | PRW)
    pse = PagingRegs(cr0=REGS32.cr0, cr3=0x1000, cr4=Cr4.PSE)
    # 89ABCDH: directory index 2, offset 9ABCDH within the 4-MByte page.
    assert translate(mem, pse, 0x89_ABCD, R) == Translation(0x3_0C09_ABCD, PAGE_4M, (0x1008,))
    # SDM 4.3: with CR4.PSE = 0 the PS flag is ignored and the PDE points to a page table
    # (here at C006000H, beyond memory: the walker reads it).
    with pytest.raises(IndexError):
        translate(mem, REGS32, 0x89_ABCD, R)


@pytest.mark.parametrize(
    "la, access, user, cr0, code",
    [
        # SDM 4.7: not present -> P = 0; W/R and U/S describe the access.
        (0xC0_0000, R, False, 0, 0),
        (0xC0_0000, W, True, 0, PfError.WRITE | PfError.USER),  # 6
        # 32-bit paging has no execute-disable: I/D stays 0 for fetches.
        (0xC0_0000, X, False, 0, 0),
    ],
)
def test_32bit_not_present_error_codes(la, access, user, cr0, code):
    assert fault(translate(mem32(), REGS32, la, access, user=user)) == code


def test_32bit_protection_error_codes():
    mem = mem32()
    put32(mem, 0x2000 + 2 * 4, 0x6000 | P)  # PTE 2: present, read-only, supervisor
    la = 0x40_2000
    assert fault(translate(mem, REGS32, la, R, user=True)) == 0x5  # P | U/S: user access to supervisor page
    put32(mem, 0x2000 + 2 * 4, 0x6000 | P | US)  # now user, still read-only
    assert fault(translate(mem, REGS32, la, W, user=True)) == 0x7  # P | W/R | U/S
    # SDM 4.6: with CR0.WP = 0 supervisor writes ignore R/W; with WP = 1 they fault with P | W/R.
    assert isinstance(translate(mem, REGS32, la, W), Translation)
    wp = PagingRegs(cr0=REGS32.cr0 | Cr0.WP, cr3=0x1000)
    assert fault(translate(mem, wp, la, W)) == 0x3
    assert isinstance(translate(mem, REGS32, la, X, user=True), Translation)  # no NX in 32-bit paging


def test_32bit_rights_are_the_and_of_both_levels():
    mem = mem32()
    put32(mem, 0x1004, 0x2000 | P | US)  # the PDE is read-only, the PTE writable
    assert fault(translate(mem, REGS32, 0x40_1000, W, user=True)) == 0x7


def test_32bit_4m_page_reserved_bit_21():
    mem = mem32()
    put32(mem, 0x1000 + 2 * 4, 0x0C00_0000 | 1 << 21 | PS | PRW)
    pse = PagingRegs(cr0=REGS32.cr0, cr3=0x1000, cr4=Cr4.PSE)
    assert fault(translate(mem, pse, 0x80_0000, R)) == PfError.PRESENT | PfError.RSVD  # 9


# --- PAE paging (SDM 4.4) ---


def pae() -> tuple[ByteMemory, PagingRegs]:
    """PDPT at 1000H: PDPTE0 -> directory at 2000H; PDE 1 -> table at 3000H; PTE 3 -> page 7000H."""
    mem = ByteMemory(0x10000)
    mem.write_u64(0x1000, 0x2000 | P)
    mem.write_u64(0x2000 + 1 * 8, 0x3000 | PRW)
    mem.write_u64(0x3000 + 3 * 8, 0x7000 | PRW)
    mem.write_u64(0x2000 + 2 * 8, 0x60_0000 | PS | PRW)  # PDE 2: 2-MByte page at 600000H
    regs = PagingRegs(
        cr0=Cr0.PE | Cr0.PG | Cr0.WP, cr3=0x1000, cr4=Cr4.PAE, efer=Efer.NXE, pdptes=load_pdptes(mem, 0x1000)
    )
    return mem, regs


def test_pae_translations():
    mem, regs = pae()
    assert regs.mode is PagingMode.PAE
    # 203456H: PDPTE 0 (bits 31:30), PDE 1 (bits 29:21), PTE 3 (bits 20:12), offset 456H.
    # The PDPTE is a register, not a memory reference: only the PDE and PTE are read.
    assert translate(mem, regs, 0x20_3456, R) == Translation(0x7456, PAGE_4K, (0x2008, 0x3018))
    assert translate(mem, regs, 0x41_2345, W) == Translation(0x61_2345, PAGE_2M, (0x2010,))
    assert mem.read_u64(0x2010) & D


def test_pae_execute_disable():
    mem, regs = pae()
    mem.write_u64(0x3018, 0x7000 | PRW | XD)
    # SDM 4.7: a fetch from an XD page: P | I/D = 11H; from user mode P | U/S | I/D = 15H.
    assert fault(translate(mem, regs, 0x20_3000, X)) == 0x11
    assert fault(translate(mem, regs, 0x20_3000, X, user=True)) == 0x15
    assert isinstance(translate(mem, regs, 0x20_3000, R), Translation)
    # With IA32_EFER.NXE = 0, bit 63 is reserved: P | RSVD = 9, and I/D is never set.
    no_nx = PagingRegs(cr0=regs.cr0, cr3=regs.cr3, cr4=regs.cr4, efer=0, pdptes=regs.pdptes)
    assert fault(translate(mem, no_nx, 0x20_3000, R)) == 0x9
    assert fault(translate(mem, no_nx, 0x20_3000, X)) == 0x9


def test_pae_not_present_pdpte_and_reserved_bits():
    mem, regs = pae()
    # 40000000H selects PDPTE 1, which is not present: a fault with no memory reference.
    assert translate(mem, regs, 0x4000_0000, W) == PageFault(PfError.WRITE, ())
    mem.write_u64(0x3018, 0x7000 | PRW | 1 << 50)  # SDM 4.4.2: bits 62:M reserved (M = 46)
    assert fault(translate(mem, regs, 0x20_3000, R)) == 0x9
    mem.write_u64(0x2010, 0x60_0000 | 1 << 13 | PS | PRW)  # 2-MByte PDE: bits 20:13 reserved
    assert fault(translate(mem, regs, 0x40_0000, R)) == 0x9


def test_load_pdptes_rejects_reserved_bits():
    mem, _ = pae()
    mem.write_u64(0x1008, 0x4000 | RW | P)  # SDM 4.4.1: bits 2:1 of a PDPTE are reserved (#GP)
    with pytest.raises(ValueError):
        load_pdptes(mem, 0x1000)
    with pytest.raises(ValueError):
        translate(mem, PagingRegs(cr0=Cr0.PE | Cr0.PG, cr3=0x1000, cr4=Cr4.PAE), 0, R)  # no PDPTEs given


# --- 4-level and 5-level paging (SDM 4.5) ---

LA = 0x80_4020_3456  # PML4 index 1, PDPT index 1, PD index 1, PT index 3, offset 456H


def level4() -> tuple[ByteMemory, PagingRegs]:
    """PML4 1000H -> PDPT 2000H -> PD 3000H -> PT 4000H -> page 9000H, all user and writable."""
    mem = ByteMemory(0x10000)
    mem.write_u64(0x1000 + 1 * 8, 0x2000 | PRW)
    mem.write_u64(0x2000 + 1 * 8, 0x3000 | PRW)
    mem.write_u64(0x3000 + 1 * 8, 0x4000 | PRW)
    mem.write_u64(0x4000 + 3 * 8, 0x9000 | PRW)
    mem.write_u64(0x3000 + 2 * 8, 0x20_0000 | PS | PRW)  # PD 2: 2-MByte page at 200000H
    mem.write_u64(0x2000 + 2 * 8, 0x4000_0000 | PS | PRW)  # PDPT 2: 1-GByte page at 40000000H
    regs = PagingRegs(
        cr0=Cr0.PE | Cr0.PG | Cr0.WP, cr3=0x1000, cr4=Cr4.PAE, efer=Efer.LME | Efer.LMA | Efer.NXE
    )
    return mem, regs


def test_4level_translations():
    mem, regs = level4()
    assert regs.mode is PagingMode.LEVEL4
    assert translate(mem, regs, LA, R, user=True) == Translation(
        0x9456, PAGE_4K, (0x1008, 0x2008, 0x3008, 0x4018)
    )
    # 80_4040_1234H: PD index 2 -> the 2-MByte page; 80_8012_3456H: PDPT index 2 -> the 1-GByte page.
    assert translate(mem, regs, 0x80_4040_1234, R) == Translation(
        0x20_1234, PAGE_2M, (0x1008, 0x2008, 0x3010)
    )
    assert translate(mem, regs, 0x80_8012_3456, R) == Translation(0x4012_3456, PAGE_1G, (0x1008, 0x2010))


def test_4level_accessed_dirty():
    mem, regs = level4()
    translate(mem, regs, LA, W)
    entries = [mem.read_u64(address) for address in (0x1008, 0x2008, 0x3008, 0x4018)]
    assert all(entry & A for entry in entries)
    assert [bool(entry & D) for entry in entries] == [False, False, False, True]


def test_4level_canonical_addresses():
    mem, regs = level4()
    with pytest.raises(ValueError):
        translate(mem, regs, 0x8000_0000_0000, R)  # bit 47 set, bits 63:48 clear
    # FFFF800000000000H is canonical: PML4 index 256, not present.
    assert fault(translate(mem, regs, 0xFFFF_8000_0000_0000, R)) == 0


@pytest.mark.parametrize(
    "address, bits, la",
    [
        (0x1008, PS, LA),  # SDM 4.5.4: PS is reserved in a PML4E
        (0x2010, 1 << 13, 0x80_8000_0000),  # 1-GByte PDPTE: bits 29:13 reserved
        (0x3010, 1 << 20, 0x80_4040_0000),  # 2-MByte PDE: bits 20:13 reserved
        (0x4018, 1 << 46, LA),  # bits 51:M reserved (M = 46)
    ],
)
def test_4level_reserved_bits(address, bits, la):
    mem, regs = level4()
    mem.write_u64(address, mem.read_u64(address) | bits)
    assert fault(translate(mem, regs, la, W, user=True)) == 0xF  # P | W/R | U/S | RSVD


def test_4level_ignored_high_bits_are_not_reserved():
    mem, regs = level4()
    mem.write_u64(0x4018, mem.read_u64(0x4018) | 0x7FF << 52)  # bits 62:52 are ignored
    assert translate(mem, regs, LA, R).address == 0x9456


def test_4level_user_and_execute_disable_along_the_walk():
    mem, regs = level4()
    mem.write_u64(0x2008, 0x3000 | P | RW)  # the PDPTE is supervisor-only
    assert fault(translate(mem, regs, LA, R, user=True)) == 0x5
    assert isinstance(translate(mem, regs, LA, R), Translation)
    mem.write_u64(0x1008, 0x2000 | PRW | XD)  # XD in the PML4E covers everything below it
    assert fault(translate(mem, regs, LA, X)) == 0x11


def test_5level_translation():
    mem = ByteMemory(0x10000)
    # PML5 1000H -> PML4 2000H -> PDPT 3000H -> PD 4000H -> PT 5000H -> page A000H.
    la = 1 << 48 | 0x3123  # PML5 index 1 (bits 56:48), PT index 3, offset 123H
    mem.write_u64(0x1000 + 1 * 8, 0x2000 | PRW)
    mem.write_u64(0x2000, 0x3000 | PRW)
    mem.write_u64(0x3000, 0x4000 | PRW)
    mem.write_u64(0x4000, 0x5000 | PRW)
    mem.write_u64(0x5000 + 3 * 8, 0xA000 | PRW)
    regs = PagingRegs(cr0=Cr0.PE | Cr0.PG, cr3=0x1000, cr4=Cr4.PAE | Cr4.LA57, efer=Efer.LME | Efer.LMA)
    assert regs.mode is PagingMode.LEVEL5
    assert translate(mem, regs, la, R) == Translation(
        0xA123, PAGE_4K, (0x1008, 0x2000, 0x3000, 0x4000, 0x5018)
    )
    with pytest.raises(ValueError):
        translate(mem, regs, 1 << 56, R)  # bit 56 set, bits 63:57 clear: not canonical
    mem.write_u64(0x1008, 0x2000 | PRW | PS)  # SDM 4.5.4: PS reserved in a PML5E
    assert fault(translate(mem, regs, la, R)) == 0x9


def test_paging_disabled_is_identity():
    regs = PagingRegs(cr0=Cr0.PE, cr3=0)
    assert regs.mode is PagingMode.NONE
    assert translate(ByteMemory(8), regs, 0x1234_5678, W) == Translation(0x1234_5678, PAGE_4K, ())


# --- The 2-D walk: guest paging with EPT under every guest-physical access ---


class EptBackedMemory:
    """Guest-physical memory seen through EPT, counting memory references."""

    def __init__(self, host: ByteMemory, eptp: int) -> None:
        self.host, self.eptp, self.references = host, eptp, 0

    def _hpa(self, gpa: int, access: EptAccess) -> int:
        result = ept_translate(self.host, self.eptp, gpa, access, paging_structure=True)
        assert isinstance(result, EptTranslation)
        self.references += len(result.refs)
        return result.hpa

    def read_u64(self, gpa: int) -> int:
        hpa = self._hpa(gpa, EptAccess.READ)
        self.references += 1
        return self.host.read_u64(hpa)

    def write_u64(self, gpa: int, value: int) -> None:
        self.host.write_u64(self._hpa(gpa, EptAccess.WRITE), value)


def test_two_dimensional_walk_makes_24_references():
    host = ByteMemory(0x80000)
    ept = EptBuilder(host, pool=0x40000, pool_size=0x10000)
    ept.map(gpa=0, hpa=0x20000, size=0x10000)  # guest-physical 0-FFFFH at host 20000H
    guest = EptBackedMemory(host, ept.eptp)
    mem, regs = level4()
    host.data[0x20000:0x30000] = mem.data  # the guest's page tables, in host memory
    for gpa in (0x1008, 0x2008, 0x3008, 0x4018):  # accessed flags already set: no A/D writes
        host.write_u64(0x20000 + gpa, host.read_u64(0x20000 + gpa) | A)

    result = translate(guest, regs, LA, R)
    assert result.address == 0x9456
    final = ept_translate(host, ept.eptp, result.address, EptAccess.READ)
    guest.references += len(final.refs)
    # Each of the 4 guest entries costs a 4-entry EPT walk plus the entry read itself (4 * 5 = 20),
    # and the final guest-physical address one more EPT walk (4): 24 memory references.
    assert len(final.refs) == 4
    assert guest.references == 24
    assert final.hpa == 0x20000 + 0x9456
