"""Experiment `context-switch`: shadow paging vs EPT, VPID off vs on, and KVM's MMU counters."""

from __future__ import annotations

import json

import pytest

from hvm.engine import available_engines
from hvm.engine.model.cost import SPLITX_DIRECT_CYCLES
from hvm.lab import EXPERIMENTS, context_switch
from tests.test_shadow_paging import expected_ctxsw_line

PARAMS = {"p": 3, "n": 30, "k": 4, "x": 1, "ring": 3}


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], dict]:
    out = context_switch.run("model", PARAMS, lambda *a: None)
    json.dumps(out)
    return {(r["paging"], r["vpid"]): r for r in out}


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
    ept, vpid = EXPERIMENTS["context-switch"].compare(list(rows.values()))
    assert ept.engine == "model" and ept.measured == 0 == ept.figure.value
    assert "内存的双体问题" in ept.figure.section and "EPT" in ept.figure.quote
    assert vpid.measured >= 1 == vpid.figure.value and "VPID" in vpid.figure.quote


def test_plot(rows, tmp_path) -> None:
    (path,) = EXPERIMENTS["context-switch"].plot(list(rows.values()), tmp_path)
    assert path.exists() and path.stat().st_size > 0


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
