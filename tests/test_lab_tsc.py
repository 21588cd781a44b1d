"""Experiment `tsc`: the guest TSC equals the SDM formula exactly; nesting gives T_H + d1 + d2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvm.engine import available_engines
from hvm.lab import EXPERIMENTS, tsc
from hvm.vtx.tsc import TSC_MULTIPLIER_ONE as ONE
from hvm.vtx.tsc import TscLevel, compose

MASK64 = (1 << 64) - 1


def _check_exact(row: dict, formula) -> None:
    assert row["host_source"] == "recorded per read"
    assert row["reads"] >= 2 and row["mismatches"] == 0 and row["exact"] is True
    assert row["measured"] == row["expected"] == formula(row["host_tsc"])


@pytest.mark.parametrize(
    "offset, multiplier",
    [(0, None), (1 << 40, None), (-(1 << 30), None), (12345, ONE // 2), (-7, 13 * ONE // 4)],
)
def test_model_guest_tsc_is_the_sdm_formula(offset: int, multiplier: int | None) -> None:
    level = TscLevel(offset, ONE if multiplier is None else multiplier)
    row = tsc._model_row("t", level, False, 2)
    m = ONE if multiplier is None else multiplier
    _check_exact(row, lambda h: (((h * m) >> 48) + offset) & MASK64)


@pytest.mark.parametrize("multiplier", [ONE, MASK64])
def test_model_guest_tsc_wraps_mod_2_64(multiplier: int) -> None:
    row = tsc._model_row("wrap", TscLevel(-(1 << 62), multiplier), False, 2)
    _check_exact(row, lambda h: (((h * multiplier) >> 48) - (1 << 62)) % (1 << 64))
    assert (row["host_tsc"] * multiplier >> 48) < 1 << 62  # the sum really went below zero and wrapped
    assert row["measured"] > 1 << 63


def test_rdtsc_exiting_exits_and_keeps_the_formula() -> None:
    row = tsc._model_row("exiting", TscLevel(1 << 40), True, 2)
    _check_exact(row, lambda h: h + (1 << 40))
    assert row["rdtsc_exits"] == row["reads"]


def test_nested_composition_is_t_h_plus_d1_plus_d2() -> None:
    d1, d2 = 5_000_000_000, -2_000_000_000
    merged = compose([TscLevel(d1), TscLevel(d2)])
    assert merged == TscLevel(d1 + d2)
    row = tsc._model_row("nested", merged, False, 2)
    _check_exact(row, lambda h: h + d1 + d2)


def test_nested_general_form_with_multipliers() -> None:
    l1, l2 = TscLevel(1_000_000, 2 * ONE), TscLevel(-5_000, 3 * ONE)
    row = tsc._model_row("nested-m", compose([l1, l2]), False, 2)
    _check_exact(row, lambda h: l2.apply(l1.apply(h)))
    _check_exact(row, lambda h: 6 * h + 3 * 1_000_000 - 5_000)


def test_model_rows_and_compare() -> None:
    rows = tsc.run("model", {"n": 2}, lambda *a: None)
    assert rows and all(r["exact"] for r in rows)
    json.dumps(rows)
    (cmp,) = EXPERIMENTS["tsc"].compare(rows)
    assert cmp.figure.quote == "T_{L2} = T_H + δ1 + δ2" and cmp.figure.section == "原理与机制 › 微调的艺术"
    assert cmp.measured == 0


@pytest.mark.skipif("kvm" not in available_engines(), reason="no usable /dev/kvm")
def test_kvm_row_is_exact_or_marked_unavailable() -> None:
    (row,) = tsc.run("kvm", {"n": 2, "kvm_offset": 1 << 40}, lambda *a: None)
    json.dumps(row)
    if row["available"]:
        assert row["exact"] is True and row["measured"] - row["expected"] >= 0
    else:
        assert row["exact"] is False and row["measured"] is None and row["expected"] is None
        assert row["note"].startswith("not available on this host")


def test_cli_json(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hvm", "lab", "run", "tsc", "--json", "-"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    data = json.loads(out.stdout)
    text = json.dumps(data)
    assert "offset_wraps_below_0" in text and "nested_d1_5e9_d2_-2e9" in text
