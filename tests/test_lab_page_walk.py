"""Experiment `page-walk`: references per TLB miss, TLB misses and cycles for native, EPT and shadow.

Expected values come from the walk structure of the SDM (Vol. 3A 4.3-4.5: entries read per guest
level, a PS=1 entry ending the walk; Vol. 3C 29.3.2: the same for EPT, each guest-physical
address translated) and the published 24 for a 4-level/4-level walk (Bhargava et al., ASPLOS
2008). The TLB-miss count is checked against the guest's own pseudo-random sequence, replayed
here: a cold guest misses once per distinct page it reads.
"""

from __future__ import annotations

import json

import pytest

from hvm.engine import available_engines
from hvm.lab import EXPERIMENTS, page_walk
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M

QUICK = page_walk.EXPERIMENT.quick
N, PAGES = QUICK["n"], QUICK["pages"]

# Entries a guest walk reads from memory (SDM 4.3 32-bit: PD, PT; 4.5: PML4/PML5 down to the PT),
# minus the levels a large page skips (4-MiB/2-MiB page at the PD, 1-GiB at the PDPT).
GUEST_READS = {("32", PAGE_4K): 2, ("32", PAGE_4M): 1,
               ("4", PAGE_4K): 4, ("4", PAGE_2M): 3, ("4", PAGE_1G): 2,
               ("5", PAGE_4K): 5, ("5", PAGE_2M): 4, ("5", PAGE_1G): 3}
EPT_READS = {(4, PAGE_4K): 4, (5, PAGE_4K): 5, (4, PAGE_2M): 3}  # SDM 29.3.2: a 2-MiB leaf at the EPT PDE


def distinct_pages(guest: str, n: int, pages: int, page_size: int) -> int:
    """Distinct ``page_size`` pages the guest's LCG reads (src/pwalk64.s, src/pwalk32.s, replayed)."""
    seen = set()
    if guest in ("4", "5"):
        x = page_walk.SEED
        for _ in range(n):
            x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
            seen.add(((x >> 33) & (pages - 1)) * PAGE_4K // page_size)
    else:
        x = page_walk.SEED & 0xFFFF_FFFF
        for _ in range(n):
            x = (x * 1664525 + 1013904223) & 0xFFFF_FFFF
            seen.add(((x >> 10) & (pages - 1)) * PAGE_4K // page_size)
    return len(seen)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = page_walk.run("model", dict(QUICK), lambda *a: None)
    json.dumps(out)
    return out


def test_every_run_finished_and_the_accounting_walk_agreed(rows) -> None:
    assert rows and all(r["finished"] for r in rows)
    assert all(r["walk_mismatches"] == 0 for r in rows)
    for r in rows:
        assert {"mode", "guest_levels", "ept_levels", "page_size", "worst_case_refs",
                "measured_refs_per_miss", "tlb_misses", "modelled_cycles"} <= set(r)
        assert r["mode"] in ("native", "ept", "shadow")


def test_worst_case_measured_on_a_cold_guest(rows) -> None:
    four, five = (page_walk._find(rows, mode="ept", guest=g, ept_levels=h, page_size=PAGE_4K,
                                  ept_page_size=PAGE_4K, caches=0) for g, h in (("4", 4), ("5", 5)))
    assert four["worst_case_refs"] == four["measured_refs_per_miss"] == 24
    assert five["worst_case_refs"] == five["measured_refs_per_miss"] == 35
    # the chapter's w_g x w_h: EPT reads that locate the guest's own tables
    assert four["measured_ept_refs_for_tables_per_miss"] == 16
    assert five["measured_ept_refs_for_tables_per_miss"] == 25


def test_references_per_miss_follow_the_sdm_walk_structure(rows) -> None:
    for r in (r for r in rows if not r["caches"]):
        g = GUEST_READS[r["guest"], r["page_size"]]
        if r["mode"] == "native":
            expected = g
        elif r["mode"] == "ept":
            expected = (g + 1) * (EPT_READS[r["ept_levels"], r["ept_page_size"]] + 1) - 1
        else:
            expected = 4  # the shadow tables: 4-level, 4-KiB pages (hvm.vmm.shadow)
        assert r["measured_refs_per_miss"] == expected, r


def test_tlb_misses_are_the_distinct_pages_the_guest_reads(rows) -> None:
    for r in (r for r in rows if not r["caches"]):
        # EPT: the smaller of the guest's and EPT's page (SDM 29.4.2); shadow: 4-KiB shadow pages
        size = {"native": r["page_size"], "shadow": PAGE_4K}.get(r["mode"]) or min(r["page_size"],
                                                                                  r["ept_page_size"])
        assert r["data_tlb_misses"] == distinct_pages(r["guest"], N, PAGES, size), r


def test_shadow_trades_walk_length_for_vm_exits(rows) -> None:
    shadow = page_walk._find(rows, mode="shadow", guest="4", page_size=PAGE_4K)
    ept = page_walk._find(rows, mode="ept", guest="4", ept_levels=4, page_size=PAGE_4K, caches=0)
    # every first touch of a page is a hidden #PF VM exit while the shadow fills
    assert shadow["vm_exits"] > distinct_pages("4", N, PAGES, PAGE_4K)
    assert shadow["modelled_cycles"] > ept["modelled_cycles"]
    # large guest pages do not help the 4-KiB shadow
    big = page_walk._find(rows, mode="shadow", guest="4", page_size=PAGE_2M)
    assert big["data_tlb_misses"] == shadow["data_tlb_misses"]


def test_paging_structure_caches_shorten_the_walks(rows) -> None:
    cached = page_walk._find(rows, mode="ept", guest="4", ept_levels=4, page_size=PAGE_4K, caches=32)
    assert cached is not None and cached["measured_refs_per_miss"] < 24
    assert cached["data_tlb_misses"] == distinct_pages("4", N, PAGES, PAGE_4K)


def test_compare_and_plot(rows, tmp_path) -> None:
    comparisons = {c.figure.key: c for c in EXPERIMENTS["page-walk"].compare(rows)}
    assert comparisons["lookups_4x4"].measured == 16 and comparisons["lookups_5x5"].measured == 25
    assert "w_g" in comparisons["lookups_4x4"].figure.quote
    (path,) = EXPERIMENTS["page-walk"].plot(rows, tmp_path)
    assert path.exists() and path.stat().st_size > 0


def test_bad_region_size_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="power of two"):
        page_walk.run("model", {**QUICK, "pages": 500}, lambda *a: None)


@pytest.mark.skipif("kvm" not in available_engines(), reason="no usable /dev/kvm")
def test_kvm_reports_the_kernels_mmu_counters(rows) -> None:
    model = rows
    rows = page_walk.run("kvm", dict(QUICK), lambda *a: None)
    json.dumps(rows)
    small = page_walk._find(rows, page_size=PAGE_4K)
    assert small["finished"] and small["mode"] == "shadow"
    stats = small["kvm_mmu_stats"]
    # the kernel's MMU takes at least one fault per guest page first touched (pf_taken >= pf_fixed)
    assert stats["pf_taken"] >= stats["pf_fixed"] >= distinct_pages("4", N, PAGES, PAGE_4K)
    if "pf_fixed" in stats and not stats.get("pages_2m") and stats["pf_taken"] == stats["pf_fixed"]:
        # KVM's shadow MMU (as on this PVM host) fixes one fault per page first touched, as the
        # model's shadow paging does: the kernel is the peer the model's count is checked against
        twin = page_walk._find(model, mode="shadow", guest="4", page_size=PAGE_4K)
        assert twin["shadow_hidden_faults"] == stats["pf_fixed"]
    for r in rows:
        assert r["available"] or r["note"].startswith("not available on this host")
