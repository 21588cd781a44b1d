"""Experiment `msr-bitmap`: trapping every MSR write vs passing IA32_TSC_AUX through."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvm.engine import available_engines
from hvm.lab import EXPERIMENTS, msr_bitmap

N = 500


@pytest.fixture(scope="module")
def model_rows() -> dict[str, dict]:
    rows = msr_bitmap.run("model", {"n": N}, lambda *a: None)
    json.dumps(rows)
    return {r["case"]: r for r in rows}


def test_model_trap_all_exits_once_per_wrmsr(model_rows) -> None:
    row = model_rows["trap_all"]
    assert row["finished"] and row["available"]
    assert row["wrmsr_exits"] >= N and row["engine_exit_reasons"]["MSR_WRITE"] >= N
    assert row["sdm_exit_reason_wrmsr"] == 32
    # the VMM emulated every trapped write: the guest sees the last one
    assert row["guest_tsc_aux"] == N and not row["unhandled"]


def test_model_pass_through_has_no_tsc_aux_exits(model_rows) -> None:
    row = model_rows["pass_through"]
    assert row["finished"] and row["wrmsr_exits"] == 0 and row["rdmsr_exits"] == 0
    assert "wrmsr" not in row["exits_by_kind"]
    assert row["guest_rdtscp"] is True and row["guest_tsc_aux"] == N  # RDTSCP shows the last write
    trap = model_rows["trap_all"]
    per_exit = trap["modelled_cycles_per_exit"]
    saved = trap["modelled_overhead_cycles"] - row["modelled_overhead_cycles"]
    assert saved == trap["wrmsr_exits"] * per_exit


def test_model_compare(model_rows) -> None:
    (cmp,) = EXPERIMENTS["msr-bitmap"].compare(list(model_rows.values()))
    assert cmp.engine == "model" and cmp.measured == 1
    assert cmp.figure.section == "原理与机制 › 微调的艺术" and "IA32_TSC_AUX" in cmp.figure.quote


def test_model_trapped_bitmap_page_is_consulted() -> None:
    """The pass-through bitmap clears exactly IA32_TSC_AUX's bits; the trap-all page has all bits set."""
    from hvm.vtx.bitmaps import MsrBitmap

    bitmap = MsrBitmap()
    bitmap.pass_through(msr_bitmap.MSR_TSC_AUX)
    assert not bitmap.exits(msr_bitmap.MSR_TSC_AUX, write=True)
    assert bitmap.exits(0xC000_0080, write=True) and MsrBitmap().exits(msr_bitmap.MSR_TSC_AUX, write=True)


@pytest.mark.skipif("kvm" not in available_engines(), reason="no usable /dev/kvm")
def test_kvm_filtered_exits_to_userspace_in_kernel_does_not() -> None:
    rows = {r["case"]: r for r in msr_bitmap.run("kvm", {"n": N}, lambda *a: None)}
    json.dumps(rows)
    kernel, filtered = rows["in_kernel"], rows["filtered"]
    assert kernel["userspace_wrmsr_exits"] == 0
    if kernel["available"]:
        assert kernel["guest_tsc_aux"] == N
    else:
        assert kernel["note"].startswith("not available on this host")
    if filtered["filter"]:
        assert filtered["available"] and filtered["finished"]
        assert filtered["userspace_wrmsr_exits"] == N == filtered["filter_reason_wrmsr_exits"]
        assert filtered["guest_tsc_aux"] == N
    else:
        assert not filtered["available"] and filtered["note"].startswith("not available on this host")


def test_plot(model_rows, tmp_path) -> None:
    (path,) = EXPERIMENTS["msr-bitmap"].plot(list(model_rows.values()), tmp_path)
    assert path.exists() and path.stat().st_size > 0


def test_cli_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hvm", "lab", "run", "msr-bitmap", "--json", "-"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    data = json.loads(out.stdout)
    text = json.dumps(data)
    assert "trap_all" in text and "pass_through" in text
