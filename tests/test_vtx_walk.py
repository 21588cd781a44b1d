"""The 2-D walk: every reference of a GVA -> GPA -> HPA translation, in the SDM's order.

Expected counts come from the walk structure of the SDM (Vol. 3A 4.3-4.5: one entry read per
guest level; Vol. 3C 29.3.2: one per EPT level, each guest-physical address translated) and the
published figure for 4-level guest and host tables: 24 references per TLB miss (Bhargava et al.,
"Accelerating Two-Dimensional Page Walks for Virtualized Systems", ASPLOS 2008, section 2.3:
"a 2D page walk can require up to 24 memory references"). Walk results are checked against
:func:`hvm.vtx.paging.translate` composed with :func:`hvm.vtx.ept.ept_translate`.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvm.vtx.ept import EptAccess, EptBuilder, EptTranslation, ept_translate
from hvm.vtx.memory import ByteMemory
from hvm.vtx.pagetables import GuestTables
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, Access, PagingMode, Translation, translate
from hvm.vtx.walk import (
    RefKind,
    WalkFault,
    ept_refs_for_guest_tables,
    guest_levels_walked,
    memory_levels,
    walk_2d,
    worst_case_refs,
)

HOST = 48 << 20
EPT_POOL = 40 << 20
GUEST_POOL = 0x10_0000  # guest-physical
SHIFT = 16 << 20  # EPT maps GPA x to HPA x + SHIFT (4-KiB and 2-MiB EPT pages)
DATA_GPA = 8 << 20
BASE = {PagingMode.BITS32: 0x8000_0000, PagingMode.PAE: 0x8000_0000,
        PagingMode.LEVEL4: 0x7F_8000_0000, PagingMode.LEVEL5: 0xF0_0000_4000_0000}


class ViaEpt:
    """Guest-physical memory through EPT (the reference walker): how the guest's tables are written."""

    def __init__(self, host: ByteMemory, eptp: int) -> None:
        self.host, self.eptp = host, eptp

    def _hpa(self, gpa: int) -> int:
        result = ept_translate(self.host, self.eptp, gpa, EptAccess.READ)
        assert isinstance(result, EptTranslation)
        return result.hpa

    def read_u64(self, gpa: int) -> int:
        return self.host.read_u64(self._hpa(gpa))

    def write_u64(self, gpa: int, value: int) -> None:
        self.host.write_u64(self._hpa(gpa), value)


@functools.cache
def machine(mode: PagingMode, guest_page: int, ept_levels: int | None, ept_page: int = PAGE_4K):
    host = ByteMemory(HOST)
    eptp = None
    mem = host
    if ept_levels is not None:
        ept = EptBuilder(host, EPT_POOL, 4 << 20, levels=ept_levels)
        if ept_page == PAGE_1G:
            ept.map(0, 0, PAGE_1G, page_size=PAGE_1G)
        else:
            ept.map(0, SHIFT, SHIFT, page_size=ept_page)
        eptp = ept.eptp
        mem = ViaEpt(host, eptp)
    tables = GuestTables(mem, GUEST_POOL, 2 << 20, mode)
    size = max(guest_page, 4 << 20)
    gpa = 0 if guest_page == PAGE_1G else DATA_GPA
    tables.map(BASE[mode], gpa, size, page_size=guest_page)
    return host, tables, eptp, gpa


CASES = [(PagingMode.BITS32, PAGE_4K), (PagingMode.BITS32, PAGE_4M), (PagingMode.PAE, PAGE_4K),
         (PagingMode.PAE, PAGE_2M)] + [(m, p) for m in (PagingMode.LEVEL4, PagingMode.LEVEL5)
                                       for p in (PAGE_4K, PAGE_2M, PAGE_1G)]


def test_worst_case_formula_matches_the_published_figures() -> None:
    assert worst_case_refs(4, 4) == 24  # Bhargava et al. (ASPLOS 2008)
    assert worst_case_refs(5, 5) == 35 == 6 * 6 - 1
    assert worst_case_refs(4, None) == 4
    assert ept_refs_for_guest_tables(4, 4) == 16  # the chapter's w_g x w_h


def test_four_by_four_walk_in_sdm_order() -> None:
    host, tables, eptp, gpa = machine(PagingMode.LEVEL4, PAGE_4K, 4)
    la = BASE[PagingMode.LEVEL4] + 0x1234
    w = walk_2d(host, tables.regs(), la, eptp)
    assert w.walk_refs == 24 and w.guest_refs == 4 and w.ept_refs == 20 and len(w.refs) == 25
    # per guest level k = 4..1: an EPT walk of the entry's GPA (levels 4..1), then the entry;
    # then the final GPA's EPT walk, then the data.
    expected = []
    for k in (4, 3, 2, 1):
        expected += [(RefKind.EPT, j, k) for j in (4, 3, 2, 1)] + [(RefKind.GUEST, k, 0)]
    expected += [(RefKind.EPT, j, 0) for j in (4, 3, 2, 1)] + [(RefKind.DATA, 0, 0)]
    assert [(r.kind, r.level, r.serves if r.kind is RefKind.EPT else 0) for r in w.refs] == expected
    assert w.gpa == gpa + 0x234 + 0x1000 and w.hpa == w.gpa + SHIFT
    # EPT reads made to find the guest's own tables: the chapter's w_g x w_h
    assert sum(1 for r in w.refs if r.kind is RefKind.EPT and r.serves) == 16


def test_five_by_five_walk_is_35_references() -> None:
    host, tables, eptp, _ = machine(PagingMode.LEVEL5, PAGE_4K, 5)
    w = walk_2d(host, tables.regs(), BASE[PagingMode.LEVEL5] + 0x5000, eptp)
    assert w.walk_refs == 35 and w.guest_refs == 5 and w.ept_refs == 30


@pytest.mark.parametrize(("mode", "guest_page"), CASES)
@pytest.mark.parametrize("ept", [None, (4, PAGE_4K), (5, PAGE_4K), (4, PAGE_2M), (5, PAGE_1G)])
def test_counts_follow_the_walk_structure(mode, guest_page, ept) -> None:
    ept_levels, ept_page = ept or (None, PAGE_4K)
    host, tables, eptp, _ = machine(mode, guest_page, ept_levels, ept_page)
    w = walk_2d(host, tables.regs(), BASE[mode] + 0x3008, eptp)
    # guest levels read from memory: SDM 4.3 (32-bit: PD, PT), 4.4 (PAE: PD, PT; PDPTEs are
    # registers), 4.5 (PML4/PML5 down); a PS=1 entry ends the walk (4-MiB/2-MiB at the PD, 1 GiB at the PDPT)
    g = {PagingMode.BITS32: 2, PagingMode.PAE: 2, PagingMode.LEVEL4: 4, PagingMode.LEVEL5: 5}[mode]
    assert memory_levels(mode) == g
    g_walked = g - {PAGE_4K: 0, PAGE_4M: 1, PAGE_2M: 1, PAGE_1G: 2}[guest_page]
    assert guest_levels_walked(mode, guest_page) == g_walked
    assert w.guest_refs == g_walked
    if ept_levels is None:
        assert w.walk_refs == g_walked and w.ept_page_size is None
    else:
        # SDM 29.3.2: an EPT walk reads levels down to the leaf (bit 7 at the PDE: 2 MiB, PDPTE: 1 GiB)
        h_walked = ept_levels - {PAGE_4K: 0, PAGE_2M: 1, PAGE_1G: 2}[ept_page]
        assert w.ept_refs == (g_walked + 1) * h_walked
        assert w.walk_refs == (g_walked + 1) * (h_walked + 1) - 1
        assert w.ept_page_size == ept_page
    assert w.page_size == min(guest_page, ept_page if ept_levels else guest_page)


def test_not_present_is_a_walk_fault() -> None:
    host, tables, eptp, _ = machine(PagingMode.LEVEL4, PAGE_4K, 4)
    with pytest.raises(WalkFault):
        walk_2d(host, tables.regs(), 0x1000, eptp)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), ept=st.sampled_from([None, (4, PAGE_4K), (4, PAGE_2M), (5, PAGE_4K),
                                                         (5, PAGE_1G)]),
       offset=st.integers(0, (4 << 20) - 1))
def test_agrees_with_the_reference_walkers(case, ept, offset) -> None:
    """Same GPA and HPA as paging.translate then ept_translate; the same entries, in the same order."""
    mode, guest_page = case
    ept_levels, ept_page = ept or (None, PAGE_4K)
    host, tables, eptp, _ = machine(mode, guest_page, ept_levels, ept_page)
    la = BASE[mode] + offset
    regs = tables.regs()
    w = walk_2d(host, regs, la, eptp)
    gmem = ViaEpt(host, eptp) if eptp is not None else host
    ref = translate(gmem, regs, la, Access.READ)
    assert isinstance(ref, Translation)
    assert w.gpa == ref.address and w.guest_page_size == ref.page_size
    assert [r.gpa for r in w.refs if r.kind is RefKind.GUEST] == list(ref.refs)
    if eptp is None:
        assert w.hpa == ref.address
        return
    final = ept_translate(host, eptp, ref.address, EptAccess.READ)
    assert isinstance(final, EptTranslation)
    assert w.hpa == final.hpa
    assert [r.address for r in w.refs if r.kind is RefKind.EPT and r.serves == 0] == list(final.refs)
    for r in (r for r in w.refs if r.kind is RefKind.GUEST):
        entry = ept_translate(host, eptp, r.gpa, EptAccess.READ)
        assert isinstance(entry, EptTranslation) and r.address == entry.hpa
