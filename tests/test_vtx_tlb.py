"""The TLB model against the SDM's caching and invalidation rules (Vol. 3A 4.10, Vol. 3C 29.4)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from hvm.vtx.ept import Eptp
from hvm.vtx.paging import PAGE_2M, PAGE_4K, PagingMode
from hvm.vtx.tlb import (
    SKYLAKE,
    Context,
    InveptType,
    InvpcidType,
    InvvpidType,
    TlbModel,
    with_caches,
)
from hvm.vtx.walk import walk_2d
from tests.test_vtx_walk import BASE, machine

L4 = PagingMode.LEVEL4
LA = BASE[L4]
PCIDE, PGE = 1 << 17, 1 << 7


def setup(ept: bool = True, caches: int = 0, glob: bool = False):
    host, tables, eptp, _ = machine(L4, PAGE_4K, 4 if ept else None)
    if glob:  # the same pages again at +1 GiB, global (G = 1)
        tables.map(LA + (1 << 30), 8 << 20, 4 << 20, glob=True)
    regs = tables.regs()
    model = TlbModel(host, with_caches(SKYLAKE, caches) if caches else SKYLAKE)
    ctx = Context(regs, vpid=1, ep4ta=eptp & ~0xFFF if eptp else None, eptp=eptp)
    return model, ctx


def test_skylake_geometry() -> None:
    # Intel Optimization Reference Manual 248966-045, Table 2-15
    arrays = {a.name: (a.entries, a.ways) for a in (*SKYLAKE.itlb, *SKYLAKE.dtlb, *SKYLAKE.stlb)}
    assert arrays["dtlb_4k"] == (64, 4) and arrays["dtlb_2m"] == (32, 4) and arrays["dtlb_1g"] == (4, 4)
    assert arrays["itlb_4k"] == (128, 8) and arrays["stlb"] == (1536, 12) and arrays["stlb_1g"] == (16, 4)


def test_miss_walks_then_hits() -> None:
    model, ctx = setup()
    hpa, walk = model.translate(ctx, LA + 0x10)
    assert walk is not None and walk.walk_refs == 24 and hpa == walk.hpa
    again, walk2 = model.translate(ctx, LA + 0x18)
    assert walk2 is None and again == hpa + 8
    assert model.stats.misses == 1 and model.stats.hits["dtlb_4k"] == 1
    assert model.stats.walk_refs["ept.L4"] == 5 and model.stats.walk_refs["guest.L1"] == 1


def test_set_conflicts_evict_the_first_level_but_the_stlb_keeps_it() -> None:
    # DTLB 4 KiB: 64 entries, 4 ways -> 16 sets: pages 16 apart share a set; five of them evict the first.
    model, ctx = setup(ept=False)
    pages = [LA + i * 16 * PAGE_4K for i in range(5)]
    for la in pages:
        model.translate(ctx, la)
    assert model.stats.misses == 5
    _, walk = model.translate(ctx, pages[0])
    assert walk is None and model.stats.hits["stlb"] == 1  # STLB: 128 sets of 12 ways, no conflict
    _, walk = model.translate(ctx, pages[0])
    assert walk is None and model.stats.hits["dtlb_4k"] == 1  # refilled into the DTLB


def test_instruction_fetches_use_the_itlb() -> None:
    model, ctx = setup(ept=False)
    model.translate(ctx, LA, fetch=True)
    model.translate(ctx, LA, fetch=True)
    assert model.stats.hits["itlb_4k"] == 1 and model.stats.lookups["dtlb_4k"] == 0


def test_pcid_and_vpid_tag_entries_and_global_entries_match_any_pcid() -> None:
    model, ctx = setup(ept=False, glob=True)
    pcid1 = replace(ctx, regs=replace(ctx.regs, cr3=ctx.regs.cr3 | 1, cr4=ctx.regs.cr4 | PCIDE | PGE))
    pcid2 = replace(pcid1, regs=replace(pcid1.regs, cr3=ctx.regs.cr3 | 2))
    model.translate(pcid1, LA)
    model.translate(pcid1, LA + (1 << 30))  # global
    assert model.translate(pcid2, LA)[1] is not None  # SDM 4.10.2.4: another PCID misses ...
    assert model.translate(pcid2, LA + (1 << 30))[1] is None  # ... except on a global entry
    assert model.translate(replace(pcid1, vpid=2), LA + (1 << 30))[1] is not None  # another VPID misses


def test_invlpg_drops_the_page_including_global_and_the_pscs() -> None:
    model, ctx = setup(ept=False, caches=8, glob=True)
    ctx = replace(ctx, regs=replace(ctx.regs, cr4=ctx.regs.cr4 | PGE))
    for la in (LA, LA + PAGE_4K, LA + (1 << 30)):
        model.translate(ctx, la)
    model.invlpg(ctx, LA + (1 << 30) + 5)
    model.invlpg(ctx, LA + 7)
    assert model.translate(ctx, LA + PAGE_4K)[1] is None
    _, walk = model.translate(ctx, LA + (1 << 30))
    # SDM 4.10.4.1: INVLPG drops the global entry and every PSC entry of the PCID: a full walk again
    assert walk is not None and walk.walk_refs == 4
    _, walk = model.translate(ctx, LA)
    # the PML4E-cache entry that walk refilled (same bits 47:39) locates the PDPT: 3 reads
    assert walk is not None and walk.walk_refs == 3 and walk.refs[0].level == 3


def test_mov_to_cr3_keeps_global_entries() -> None:
    model, ctx = setup(ept=False, glob=True)
    ctx = replace(ctx, regs=replace(ctx.regs, cr4=ctx.regs.cr4 | PGE))
    model.translate(ctx, LA)
    model.translate(ctx, LA + (1 << 30))
    model.mov_to_cr3(ctx, ctx.regs.cr3, pcide=False)
    assert model.translate(ctx, LA + (1 << 30))[1] is None and model.translate(ctx, LA)[1] is not None


def test_mov_to_cr3_with_pcide_flushes_only_the_new_pcid_and_not_with_bit_63() -> None:
    model, ctx = setup(ept=False)
    a = replace(ctx, regs=replace(ctx.regs, cr3=ctx.regs.cr3 | 1, cr4=ctx.regs.cr4 | PCIDE))
    b = replace(a, regs=replace(a.regs, cr3=ctx.regs.cr3 | 2))
    model.translate(a, LA)
    model.translate(b, LA)
    model.mov_to_cr3(a, ctx.regs.cr3 | 2 | 1 << 63, pcide=True)  # bit 63: no invalidation
    assert model.translate(b, LA)[1] is None
    model.mov_to_cr3(a, ctx.regs.cr3 | 2, pcide=True)
    assert model.translate(b, LA)[1] is not None and model.translate(a, LA)[1] is None


def test_invpcid_types() -> None:
    model, ctx = setup(ept=False, glob=True)
    a = replace(ctx, regs=replace(ctx.regs, cr3=ctx.regs.cr3 | 1, cr4=ctx.regs.cr4 | PCIDE | PGE))
    b = replace(a, regs=replace(a.regs, cr3=ctx.regs.cr3 | 2))
    g = LA + (1 << 30)

    def fill():
        for c in (a, b):
            model.translate(c, LA)
            model.translate(c, LA + PAGE_4K)
        model.translate(a, g)

    def cached(c, la):
        return model.translate(c, la)[1] is None

    fill()
    model.invpcid(a, InvpcidType.INDIVIDUAL_ADDRESS, pcid=1, la=LA)
    assert not cached(a, LA) and cached(a, LA + PAGE_4K) and cached(b, LA)
    fill()
    model.invpcid(a, InvpcidType.INDIVIDUAL_ADDRESS, pcid=1, la=g)
    assert cached(a, g)  # type 0 keeps global translations
    model.invpcid(a, InvpcidType.SINGLE_CONTEXT, pcid=2)
    assert not cached(b, LA + PAGE_4K) and cached(a, LA + PAGE_4K) and cached(b, g)
    fill()
    model.invpcid(a, InvpcidType.ALL_CONTEXTS)
    assert not cached(a, LA) and not cached(b, LA + PAGE_4K) and cached(a, g)
    fill()
    model.invpcid(a, InvpcidType.ALL_CONTEXTS_INCL_GLOBAL)
    assert not cached(a, g)


def test_invvpid_types() -> None:
    model, ctx = setup(ept=False, glob=True)
    ctx = replace(ctx, regs=replace(ctx.regs, cr4=ctx.regs.cr4 | PGE))
    v0, v1, v2 = replace(ctx, vpid=0), ctx, replace(ctx, vpid=2)
    g = LA + (1 << 30)

    def fill():
        for c in (v0, v1, v2):
            model.translate(c, LA)
            model.translate(c, LA + PAGE_4K)
            model.translate(c, g)

    def cached(c, la):
        return model.translate(c, la)[1] is None

    fill()
    model.invvpid(InvvpidType.INDIVIDUAL_ADDRESS, vpid=1, la=LA)
    assert not cached(v1, LA) and cached(v1, LA + PAGE_4K) and cached(v2, LA)
    model.invvpid(InvvpidType.SINGLE_CONTEXT_RETAINING_GLOBALS, vpid=1)
    assert not cached(v1, LA + PAGE_4K) and cached(v1, g)
    model.invvpid(InvvpidType.SINGLE_CONTEXT, vpid=1)
    assert not cached(v1, g) and cached(v2, g)
    fill()
    model.invvpid(InvvpidType.ALL_CONTEXTS)  # every VPID except 0000H
    assert cached(v0, LA) and not cached(v1, LA) and not cached(v2, g)


def test_invept_drops_combined_and_guest_physical_mappings_of_the_context() -> None:
    model, ctx = setup(ept=True, caches=8)
    other = replace(ctx, ep4ta=0x5000, eptp=ctx.eptp)  # the same tables under another EP4TA tag
    # EPT off: a linear mapping (paging off too, so nothing is read from this machine's memory)
    linear = replace(ctx, ep4ta=None, eptp=None, regs=replace(ctx.regs, cr0=1))
    for c in (ctx, other, linear):
        model.translate(c, LA)
    model.invept(InveptType.SINGLE_CONTEXT, Eptp(0x5000).encode())
    assert model.translate(ctx, LA)[1] is None and model.translate(other, LA)[1] is not None
    model.invept(InveptType.ALL_CONTEXTS)
    assert model.translate(linear, LA)[1] is None  # SDM 29.4.3.1: linear mappings stay
    assert len(model.gpa) == 0 and not any(len(c) for c in (*model.ept_psc.values(), *model.psc.values()))
    _, walk = model.translate(ctx, LA)
    cold, first = setup(ept=True, caches=8)
    assert walk is not None and walk.walk_refs == cold.translate(first, LA)[1].walk_refs


def test_vm_transition_without_vpid_flushes_vpid_0() -> None:
    model, ctx = setup(ept=False)
    v0 = replace(ctx, vpid=0)
    model.translate(v0, LA)
    model.translate(ctx, LA)
    model.vm_transition(vpid_enabled=True)
    assert model.translate(v0, LA)[1] is None
    model.vm_transition(vpid_enabled=False)
    assert model.translate(v0, LA)[1] is not None and model.translate(ctx, LA)[1] is None


def test_caches_shorten_the_walk() -> None:
    # With a combined PDE cache (HPA of the PT) and an EPT PDE cache, a miss on the next page of
    # the same 2-MiB region reads the guest PTE and one EPT PTE for the data GPA: 2 references.
    model, ctx = setup(ept=True, caches=32)
    model.translate(ctx, LA)
    _, walk = model.translate(ctx, LA + PAGE_4K)
    assert walk is not None
    assert [(r.kind.value, r.level) for r in walk.refs[:-1]] == [("guest", 1), ("ept", 1)]
    # the next 2-MiB region: the PDPTE cache locates the PD; its PDE and then a new PT's PTE are read
    _, walk = model.translate(ctx, LA + PAGE_2M)
    assert walk is not None and walk.guest_refs == 2


@settings(max_examples=40, deadline=None)
@given(pages=st.lists(st.integers(0, 1023), min_size=1, max_size=40), caches=st.sampled_from([0, 2, 32]),
       ept=st.booleans(), flush=st.integers(0, 40))
def test_caches_never_change_the_translation(pages, caches, ept, flush) -> None:
    """Whatever the TLB, paging-structure caches and guest-physical mappings hold, a translation reaches
    the HPA of the uncached walk (SDM 4.10.3: cached entries are used instead of the entries in memory,
    which here do not change)."""
    model, ctx = setup(ept=ept, caches=caches)
    reference, _ = setup(ept=ept)
    for i, page in enumerate(pages):
        la = LA + page * PAGE_4K + 8 * i
        if i == flush:
            model.invlpg(ctx, la)
        hpa, walk = model.translate(ctx, la)
        assert hpa == walk_2d(reference.mem, ctx.regs, la, ctx.eptp).hpa
        if walk is not None:
            assert walk.walk_refs <= (24 if ept else 4)
