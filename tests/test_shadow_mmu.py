"""The shared shadow MMU (hvm/vmm/shadow.py) on hand-built guest page tables.

Expected values come from the Intel SDM Vol. 3A: accessed/dirty flags (4.8), access rights and
CR0.WP (4.6), page-fault error codes (4.7); and from the classic shadow-paging rules the module
states (write-protected guest tables, roots cached per CR3).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvm.vmm.memory import GuestMemory
from hvm.vmm.shadow import Policy, ShadowMmu, TablePages, root_key
from hvm.vtx.paging import Access, PagingRegs, Translation, translate

P, RW, US, A, D = 1, 2, 4, 1 << 5, 1 << 6
XD = 1 << 63
CR0_PE_PG_WP = 1 | 1 << 31 | 1 << 16
CR4_PAE = 1 << 5
EFER_LME_LMA_NXE = 1 << 8 | 1 << 10 | 1 << 11
POOL = 0x7E_0000_0000
VA = 0x8000_0000_00  # PML4 index 1


class Guest:
    """A 2-MiB guest with two 4-level trees (CR3 0x1000 and 0x10000) mapping VA + i*4K."""

    def __init__(self) -> None:
        self.mem = GuestMemory(2 << 20)
        self.cr0, self.cr3 = CR0_PE_PG_WP, 0x1000
        for base in (0x1000, 0x10000):
            self.mem.write_u64(base + 8, base + 0x1000 | P | RW | US)  # PML4[1] -> PDPT
            self.mem.write_u64(base + 0x1000, base + 0x2000 | P | RW | US)  # PDPT[0] -> PD
            self.mem.write_u64(base + 0x2000, base + 0x3000 | P | RW | US)  # PD[0] -> PT
        self.flushes = 0

    def pte(self, cr3: int, i: int) -> int:
        return cr3 + 0x3000 + 8 * i

    def map(self, i: int, frame: int, flags: int = P | RW | US, cr3: int = 0x1000) -> None:
        self.mem.write_u64(self.pte(cr3, i), frame | flags)

    def regs(self) -> PagingRegs:
        return PagingRegs(self.cr0, self.cr3, CR4_PAE, EFER_LME_LMA_NXE)

    def flush(self) -> None:
        self.flushes += 1

    def mmu(self, **kw) -> ShadowMmu:
        pages = kw.pop("pool_pages", 64)
        return ShadowMmu(TablePages(POOL, pages), self.mem, self.mem.size, self.regs, self.flush,
                         pool_base=POOL, pool_pages=pages, **kw)


@pytest.fixture
def g() -> Guest:
    return Guest()


def test_a_read_sets_accessed_not_dirty_and_maps_read_only(g: Guest) -> None:
    g.map(0, 0x40000)
    mmu = g.mmu()
    assert mmu.lookup(VA, Access.READ, False) is None  # empty shadow: the processor faults
    fill = mmu.fill(VA, Access.READ)
    assert fill.fault is None and fill.frame == 0x40000
    pte = g.mem.read_u64(g.pte(0x1000, 0))
    assert pte & A and not pte & D  # SDM 4.8: a read sets A only
    assert mmu.lookup(VA, Access.READ, False) is not None
    assert mmu.lookup(VA, Access.WRITE, False) is None  # D clear: the first write must fault
    mmu.fill(VA, Access.WRITE)
    assert g.mem.read_u64(g.pte(0x1000, 0)) & D  # ... and the walk for it sets D
    entry = mmu.lookup(VA, Access.WRITE, False)
    assert entry is not None and entry & 0x000F_FFFF_FFFF_F000 == 0x40000


def test_a_page_already_dirty_maps_writable_at_once(g: Guest) -> None:
    g.map(0, 0x40000, P | RW | US | A | D)
    mmu = g.mmu()
    mmu.fill(VA, Access.READ)
    assert mmu.lookup(VA, Access.WRITE, False) is not None


def test_rights_follow_the_guest(g: Guest) -> None:
    g.map(0, 0x40000, P | US | XD)  # read-only, user, execute-disable
    g.map(1, 0x41000, P | RW)  # supervisor-only
    mmu = g.mmu()
    mmu.fill(VA, Access.READ, user=True)
    assert mmu.lookup(VA, Access.READ, True) is not None
    assert mmu.lookup(VA, Access.FETCH, False) is None  # XD (NXE = 1)
    mmu.fill(VA + 0x1000, Access.READ)
    assert mmu.lookup(VA + 0x1000, Access.READ, True) is None  # U/S = 0
    assert mmu.lookup(VA + 0x1000, Access.READ, False) is not None


def test_true_faults_carry_the_sdm_error_code(g: Guest) -> None:
    g.map(0, 0x40000, P | US)
    mmu = g.mmu()
    assert int(mmu.fill(VA + 0x5000, Access.READ).fault.error_code) == 0  # not present, read
    assert int(mmu.fill(VA + 0x5000, Access.WRITE, user=True).fault.error_code) == 2 | 4
    assert int(mmu.fill(VA, Access.WRITE).fault.error_code) == 1 | 2  # CR0.WP = 1, read-only page
    assert mmu.stats.guest_faults == 3


def test_wp0_supervisor_write_to_a_read_only_page_is_writable_but_supervisor_only(g: Guest) -> None:
    g.cr0 = CR0_PE_PG_WP & ~(1 << 16)
    g.map(0, 0x40000, P | US)
    mmu = g.mmu()
    fill = mmu.fill(VA, Access.WRITE)
    assert fill.fault is None  # SDM 4.6: CR0.WP = 0 lets supervisor writes through
    entry = mmu.lookup(VA, Access.WRITE, False)
    assert entry is not None and not entry & US  # a user write could not use it


def test_guest_page_tables_are_write_protected_and_a_write_zaps_what_came_from_them(g: Guest) -> None:
    g.map(0, 0x40000)
    g.map(1, 0x4000)  # VA+4K maps the page table itself (0x4000 = 0x1000 + 0x3000)
    mmu = g.mmu()
    mmu.fill(VA, Access.READ)
    assert mmu.protected[0x4000] == "page table"
    mmu.fill(VA + 0x1000, Access.WRITE)  # the guest writes its PT through an alias
    assert mmu.lookup(VA + 0x1000, Access.WRITE, False) is None  # mapped read-only
    mmu.write_fault(0x4000)  # unprotect and resync
    assert mmu.lookup(VA, Access.READ, False) is None  # the entry walked through the PT is gone
    assert mmu.stats.zapped >= 1 and 0x4000 not in mmu.protected
    mmu.fill(VA + 0x1000, Access.WRITE)
    assert mmu.protected.get(0x4000) == "page table"  # the walk read it again: protected again


def test_roots_are_cached_per_cr3(g: Guest) -> None:
    g.map(0, 0x40000)
    g.map(0, 0x50000, cr3=0x10000)
    mmu = g.mmu()
    mmu.fill(VA, Access.READ)
    g.cr3 = 0x10000
    mmu.switch()
    assert mmu.lookup(VA, Access.READ, False) is None  # another address space: its own shadow
    assert mmu.fill(VA, Access.READ).frame == 0x50000
    g.cr3 = 0x1000
    mmu.switch()
    entry = mmu.lookup(VA, Access.READ, False)  # back: the shadow is reused, no fill needed
    assert entry is not None and entry & 0xFFFFF000 == 0x40000
    assert (mmu.stats.cr3_switches, mmu.stats.root_hits, mmu.stats.root_misses) == (2, 1, 2)
    assert mmu.stats.fills == 2


def test_a_write_to_a_cached_roots_tables_reaches_it(g: Guest) -> None:
    g.map(0, 0x40000)
    mmu = g.mmu()
    mmu.fill(VA, Access.READ)
    g.cr3 = 0x10000
    mmu.switch()
    mmu.write_fault(0x4000)  # while CR3 = B, the guest writes A's page table
    g.cr3 = 0x1000
    mmu.switch()
    assert mmu.lookup(VA, Access.READ, False) is None


def test_the_cache_is_bounded_least_recently_used_goes(g: Guest) -> None:
    mmu = g.mmu(max_roots=2)
    for cr3 in (0x1000, 0x10000, 0x20000):
        g.cr3 = cr3
        mmu.switch()
    assert mmu.cached_roots == 2 and mmu.stats.evictions == 1
    assert root_key(PagingRegs(CR0_PE_PG_WP, 0x1000, CR4_PAE, EFER_LME_LMA_NXE)) not in mmu._roots


def test_pool_exhaustion_evicts_other_roots_first(g: Guest) -> None:
    g.map(0, 0x40000)
    g.map(0, 0x50000, cr3=0x10000)
    mmu = g.mmu(pool_pages=8)  # a root and its 3 tables: 4 pages
    mmu.fill(VA, Access.READ)
    g.cr3 = 0x10000
    mmu.switch()
    assert mmu.fill(VA, Access.READ).frame == 0x50000
    g.mem.write_u64(0x10000 + 8 * 2, 0x10000 + 0x1000 | P | RW)  # PML4[2] shares the PDPT
    assert mmu.fill(VA + (1 << 39), Access.READ).frame == 0x50000  # needs 2 more pages: evicts A
    assert mmu.stats.evictions == 1 and mmu.cached_roots == 1
    assert mmu.lookup(VA, Access.READ, False) is not None


def test_invlpg_zaps_one_entry(g: Guest) -> None:
    g.map(0, 0x40000)
    g.map(1, 0x41000)
    mmu = g.mmu()
    mmu.fill(VA, Access.READ)
    mmu.fill(VA + 0x1000, Access.READ)
    mmu.invlpg(VA)
    assert mmu.lookup(VA, Access.READ, False) is None
    assert mmu.lookup(VA + 0x1000, Access.READ, False) is not None


def test_verified_policy_maps_only_what_was_checked(g: Guest) -> None:
    g.map(0, 0x40000, P | RW | US | A | D)
    mmu = g.mmu(policy=Policy.VERIFIED)
    mmu.fill(VA, Access.READ)
    assert mmu.lookup(VA, Access.WRITE, False) is None
    assert mmu.lookup(VA, Access.FETCH, False) is None
    mmu.fill(VA, Access.FETCH)
    assert mmu.lookup(VA, Access.FETCH, False) is not None


def test_dirty_logging_by_write_protection(g: Guest) -> None:
    g.map(0, 0x40000, P | RW | US | A | D)
    g.map(1, 0x41000, P | RW | US | A | D)
    mmu = g.mmu()
    mmu.log_dirty(0x40000, 0x2000)
    mmu.fill(VA, Access.READ)
    assert mmu.lookup(VA, Access.WRITE, False) is None  # clean: read-only although the guest allows writes
    mmu.fill(VA, Access.WRITE)  # the write fault logs the page
    assert mmu.lookup(VA, Access.WRITE, False) is not None
    assert mmu.harvest_dirty(0x40000, 0x2000) == [0]
    assert mmu.lookup(VA, Access.WRITE, False) is None  # clean again after the harvest
    assert mmu.harvest_dirty(0x40000, 0x2000) == []


# --- property: the shadow never answers differently from the guest's own tables -----------------

# data frames, and the two trees' page tables and page directories (aliases of paging structures)
_FRAMES = [0x80000 + i * 0x1000 for i in range(12)] + [0x4000, 0x13000, 0x3000, 0x12000]
_FLAGS = [0, P | RW | US, P | US, P | RW, P, P | RW | US | A | D, P | US | A, P | RW | XD | A | D]


class _ReadOnly:
    """Guest memory for a reference walk that must not set accessed/dirty flags."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    def read_u64(self, gpa: int) -> int:
        return self.mem.read_u64(gpa)

    def write_u64(self, gpa: int, value: int) -> None:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["access", "access", "write_pte", "invlpg", "switch"]),
                          st.integers(0, 1), st.integers(0, 2), st.sampled_from(list(Access)),
                          st.booleans(), st.sampled_from(_FLAGS), st.integers(0, 15)),
                min_size=1, max_size=60))
def test_shadow_hits_agree_with_a_fresh_walk_of_the_guest_tables(ops) -> None:
    """Whatever the guest does to its tables (through write-protection faults, as the engines deliver
    them), a shadow entry that allows an access gives the frame the guest's tables give now, for an
    access they allow, with the accessed (and for writes dirty) flag already set (SDM 4.6, 4.8)."""
    g = Guest()
    cr3s = (0x1000, 0x10000)
    for cr3 in cr3s:
        for i in range(8):
            g.map(i, 0x40000 + (cr3 >> 4) + i * 0x1000, P | RW | US, cr3=cr3)
    mmu = g.mmu(pool_pages=16, max_roots=2)
    for op, tree, page, access, user, flags, frame in ops:
        la = VA + page * 0x1000
        if op == "switch":
            g.cr3 = cr3s[tree]
            mmu.switch()
        elif op == "invlpg":
            mmu.invlpg(la)
        elif op == "write_pte":
            pte = g.pte(cr3s[tree], page)
            if pte & ~0xFFF in mmu.protected:  # the guest's write faults first: unprotect and resync
                mmu.write_fault(pte & ~0xFFF)
            g.mem.write_u64(pte, _FRAMES[frame] | flags)
        else:
            entry = mmu.lookup(la, access, user)
            if entry is None:  # the #PF exit, handled as the model engine handles it
                fill = mmu.fill(la, access, user)
                entry = mmu.lookup(la, access, user)
                if entry is None and access is Access.WRITE and mmu.protected.get(fill.frame) == "page table":
                    if fill.frame in fill.tables:
                        continue  # a table written through a mapping its own walk reads: refused
                    mmu.write_fault(fill.frame)
                    mmu.fill(la, access, user)
                    entry = mmu.lookup(la, access, user)
            reference = translate(_ReadOnly(g.mem), g.regs(), la, access, user=user)
            if entry is None:
                assert not isinstance(reference, Translation) or not mmu.is_ram(reference.address)
                continue
            assert isinstance(reference, Translation), (op, la, access, user)
            assert reference.address & ~0xFFF == entry & 0x000F_FFFF_FFFF_F000
            leaf = g.mem.read_u64(g.pte(g.cr3, page))
            assert leaf & A and (access is not Access.WRITE or leaf & D)
