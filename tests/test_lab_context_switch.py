"""Experiment `context-switch`: shadow paging vs EPT, VPID off vs on, PCIDs off vs on, KVM MMU counters."""

from __future__ import annotations

import json

import pytest

from hvm.engine import available_engines
from hvm.engine.model.cost import SPLITX_DIRECT_CYCLES, CostModel
from hvm.lab import EXPERIMENTS, context_switch
from tests.test_shadow_paging import expected_ctxsw_line

PARAMS = {"p": 3, "n": 30, "k": 4, "x": 1, "ring": 3}


@pytest.fixture(scope="module")
def all_rows() -> list[dict]:
    out = context_switch.run("model", PARAMS, lambda *a: None)
    json.dumps(out)
    return out


@pytest.fixture(scope="module")
def rows(all_rows) -> dict[tuple[str, str], dict]:
    return {(r["paging"], r["vpid"]): r for r in all_rows if "pcid" not in r}


@pytest.fixture(scope="module")
def pcid_rows(all_rows) -> dict[str, dict]:
    return {r["pcid"]: r for r in all_rows if "pcid" in r}


def test_four_configurations_compute_the_same_result(rows) -> None:
    assert set(rows) == {("shadow", "on"), ("shadow", "off"), ("ept", "on"), ("ept", "off")}
    expected = expected_ctxsw_line(3, 30, 4, 1, 3).split("sum=")[1].split()[0]
    for row in rows.values():
        assert row["available"] and row["isolation_ok"] and row["checksum"] == expected


def test_ept_switches_without_translation_exits(rows) -> None:
    for vpid in ("on", "off"):
        row = rows["ept", vpid]
        assert row["paging_exits"] == 0  # default controls: no CR3-load exiting, #PF not intercepted
        assert row["paging_exits_per_switch"] == 0
        # only port I/O exits: the guest's port writes (and its console output)
        assert set(row["exits_by_reason"]) == {"IO_INSTRUCTION"}
        assert row["exits_per_switch"] >= PARAMS["x"]


def test_shadow_paging_exits_once_per_cr3_load(rows) -> None:
    for vpid in ("on", "off"):
        row = rows["shadow", vpid]
        base = row["baseline"]["exits_by_reason"]
        assert row["exits_by_reason"]["CR_ACCESS"] - base["CR_ACCESS"] == PARAMS["n"]  # SDM reason 28
        assert row["exits_by_reason"]["EXCEPTION_NMI"] > base["EXCEPTION_NMI"]  # reason 0: shadow fills
        assert row["shadow"]["shadow_root_hits"] >= PARAMS["n"] - PARAMS["p"]
        assert row["paging_exits_per_switch"] >= 1


def test_vpid_off_refills_the_tlb_after_every_exit(rows) -> None:
    for paging in ("shadow", "ept"):
        on, off = rows[paging, "on"], rows[paging, "off"]
        assert on["vpid_flushes"] == 0 and off["vpid_flushes"] >= off["exits"]
        # after the port write in each slice the guest's k pages miss again
        assert off["tlb_fills_per_switch"] >= on["tlb_fills_per_switch"] + PARAMS["k"] * PARAMS["x"]


def test_modelled_cycles(rows) -> None:
    for row in rows.values():
        refs = 4 if row["paging"] == "shadow" else 24
        assert row["walk_refs_per_fill"] == refs
        assert row["modelled_walk_cycles"] == row["tlb_fills"] * refs * 4
        assert row["modelled_exit_cycles"] == row["exits"] * SPLITX_DIRECT_CYCLES
        assert row["modelled_cycles"] == row["modelled_exit_cycles"] + row["modelled_walk_cycles"]


def test_compare(rows) -> None:
    ept, vpid = EXPERIMENTS["context-switch"].compare(list(rows.values()))[:2]
    assert ept.engine == "model" and ept.measured == 0 == ept.figure.value
    assert "内存的双体问题" in ept.figure.section and "EPT" in ept.figure.quote
    assert vpid.measured >= 1 == vpid.figure.value and "VPID" in vpid.figure.quote


def test_plot(all_rows, tmp_path) -> None:
    paths = EXPERIMENTS["context-switch"].plot(all_rows, tmp_path)
    assert [p.name for p in paths] == ["context-switch.png", "context-switch-pcid.png"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def _kernel_2m_pages() -> int:
    """How many 2-MiB pages of the identity map hold what every slice and switch touches: the
    kernel's switch loop, the ring-3 slice, their variables and stacks (from the guest's ELF)."""
    from elftools.elf.elffile import ELFFile

    from hvm import guests

    names = ("ctxsw_next", "user_slice", "ctxsw_slice_end", "ctxsw_enter_user", "g_sum", "g_switch", "g_p",
             "g_k", "g_x", "user_stack", "long64_kstack")
    with open(guests.image_path("ctxsw"), "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        found = {s.name: s["st_value"] for s in table.iter_symbols() if s.name in names}
    assert set(found) == set(names)
    return len({address >> 21 for address in found.values()})


def test_pcid_rows_follow_the_sdm(pcid_rows) -> None:
    # SDM Vol. 3A 4.10.4.1. Without PCIDs every MOV to CR3 invalidates all non-global entries: in
    # each slice every page touched misses once -- the process's k 4-KiB pages and the kernel's
    # 2-MiB page(s), whose first (instruction) miss refills the shared STLB for the data accesses
    # (the model's Skylake geometry). With PCIDs and bit 63 set, a CR3 load invalidates nothing and
    # the entries of the p PCIDs (p * k + p pages, far below the STLB's 1536) all stay: 0 misses.
    off, on = pcid_rows["off"], pcid_rows["on"]
    expected = expected_ctxsw_line(3, 30, 4, 1, 3).split("sum=")[1].split()[0]
    for row in (off, on):
        assert row["available"] and row["isolation_ok"] and row["checksum"] == expected
        assert row["walk_mismatches"] == 0 and row["unattributed"] == 0
        # aliases only where the kernel reaches the frames through the identity map (setup, final check)
        assert row["alias_fills"] == 2 * PARAMS["p"] * PARAMS["k"]
    assert off["tlb_misses_per_switch"] == PARAMS["k"] + _kernel_2m_pages()
    assert off["data_misses_per_switch"] == PARAMS["k"]
    assert off["cr3_invalidations_per_switch"] == 1
    assert on["tlb_misses_per_switch"] == 0 and on["walk_refs_per_switch"] == 0
    assert on["cr3_invalidations_per_switch"] == 0
    assert on["exits_per_switch"] == off["exits_per_switch"]
    assert on["modelled_cycles_per_switch"] < off["modelled_cycles_per_switch"]
    assert off["modelled_cycles_per_switch"] - on["modelled_cycles_per_switch"] == (
        off["walk_refs_per_switch"] * CostModel().walk_ref)
    (comparison,) = [c for c in context_switch.compare(list(pcid_rows.values()))]
    assert comparison.measured == 0 == comparison.figure.value and "VPID" in comparison.figure.quote


def test_registered_with_quick_params() -> None:
    experiment = EXPERIMENTS["context-switch"]
    assert set(experiment.quick) == set(experiment.defaults) == {"p", "n", "k", "x", "ring"}
    assert experiment.engines == ("kvm", "model")


@pytest.mark.skipif("kvm" not in available_engines(), reason="no usable /dev/kvm")
def test_kvm_runs_the_same_guest_and_reports_its_mmu_counters(rows) -> None:
    kvm = context_switch.run("kvm", PARAMS, lambda *a: None)
    json.dumps(kvm)
    assert [r["ring"] for r in kvm] == [3, 0]
    for row in kvm:
        assert row["available"] and row["checksum"] == rows["ept", "on"]["checksum"]
        delta = row["stats_delta"]
        assert "exits" in delta and "tlb_flush" in delta
        assert delta["exits"] >= PARAMS["n"] * PARAMS["x"]  # each port write leaves the guest
        assert row["stats_after"]["exits"] >= row["stats_before"]["exits"]
    (comparison,) = [c for c in context_switch.compare(kvm) if c.engine == "kvm"][:1]
    assert comparison.measured is None and comparison.why.startswith("not measurable here")
