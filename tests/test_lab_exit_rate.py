"""Experiment `exit-rate`: λ = λ_cpu + λ_io·x, baseline against the features, on the model and KVM."""

from __future__ import annotations

import json
import math

import pytest

from hvm.engine import available_engines
from hvm.lab import EXPERIMENTS, exit_rate

PARAMS = {"intensities": [0, 3, 6], "units": 20, "work": 200, "sys": 1, "tick": 4_000_000, "poll_ms": 1.0}


def test_fit_matches_the_textbook_formulas() -> None:
    """(0,1), (1,3), (2,2): slope 0.5, intercept 1.5, residuals -0.5, 1, -0.5; s² = RSS/(n-2) = 1.5;
    se(slope) = sqrt(s²/Sxx) = sqrt(1.5/2); se(intercept) = sqrt(s²(1/n + x̄²/Sxx)) = sqrt(1.25)."""
    f = exit_rate.fit([(0, 1), (1, 3), (2, 2)])
    assert f["lambda_io"] == pytest.approx(0.5) and f["lambda_cpu"] == pytest.approx(1.5)
    assert f["residuals"] == pytest.approx([-0.5, 1.0, -0.5])
    assert f["se_io"] == pytest.approx(math.sqrt(0.75)) and f["se_cpu"] == pytest.approx(math.sqrt(1.25))
    with pytest.raises(ValueError):
        exit_rate.fit([(2, 1), (2, 3)])


def test_reduction_propagates_both_slopes_errors() -> None:
    """R = 1 - f/b, σ_R² = (σ_f/b)² + (f σ_b/b²)²: b = 2 ± 0.1, f = 0.5 ± 0.05 -> 0.75 ± 0.02795."""
    r, se = exit_rate.reduction({"lambda_io": 2.0, "se_io": 0.1}, {"lambda_io": 0.5, "se_io": 0.05})
    assert r == pytest.approx(0.75) and se == pytest.approx(math.sqrt(0.025**2 + 0.0125**2))


@pytest.fixture(scope="module")
def model_rows() -> list[dict]:
    rows = exit_rate.run("model", PARAMS, lambda *a: None)
    json.dumps(rows)
    return rows


def test_model_rows_finish_and_count_the_work_phase(model_rows) -> None:
    assert len(model_rows) == 2 * len(PARAMS["intensities"]) and all(r["ok"] for r in model_rows)
    for r in model_rows:
        assert r["commands"] == r["intensity"] * PARAMS["units"] and r["tsc_aux"] == PARAMS["units"]
        if r["config"] == "baseline":
            # SDM Vol. 3C 25.1.3 / 25.6.9: with every MSR intercepted each WRMSR exits (reason 32);
            # each OUT to the doorbell port is an I/O-instruction exit (reason 30), plus the OUT that ends
            # the phase.
            assert r["engine_exit_reasons"]["MSR_WRITE"] == PARAMS["units"] * PARAMS["sys"]
            assert r["engine_exit_reasons"]["IO_INSTRUCTION"] == r["commands"] + 1
            assert not r["msr_pass_through"] and r["io_design"] == "pio"
        else:
            assert "MSR_WRITE" not in r["engine_exit_reasons"] and r["msr_pass_through"]
            assert r["engine_exit_reasons"].get("IO_INSTRUCTION") == 1  # only the phase mark


def test_model_fit_and_compare(model_rows) -> None:
    fitted = exit_rate.fits(model_rows)
    base = fitted[("model", "baseline")]
    # one I/O-instruction exit per command, exactly; timer exits over the longer run come on top
    io = exit_rate.fit([(r["intensity"], r["engine_exit_reasons"]["IO_INSTRUCTION"] / r["units"])
                        for r in model_rows if r["config"] == "baseline"])
    assert io["lambda_io"] == pytest.approx(1.0, abs=1e-9) and base["lambda_io"] >= 1.0 - 3 * base["se_io"]
    (cmp,) = exit_rate.compare(model_rows)
    assert cmp.figure.value == 60 and "60%" in cmp.figure.quote and cmp.figure.section.endswith("微调的艺术")
    on = fitted[("model", "features")]
    assert cmp.measured == pytest.approx(100 * (1 - on["lambda_io"] / base["lambda_io"]), abs=1e-3)
    assert "reduction" in cmp.why and "λ_io" in cmp.why


def test_plot_writes_a_png(model_rows, tmp_path) -> None:
    (path,) = exit_rate.plot(model_rows, tmp_path)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registered() -> None:
    exp = EXPERIMENTS["exit-rate"]
    assert exp.engines == ("kvm", "model") and exp.quick["units"] < exp.defaults["units"]


@pytest.mark.skipif("kvm" not in available_engines(), reason="no usable /dev/kvm")
def test_kvm_baseline_userspace_exits_and_features_in_kernel() -> None:
    rows = exit_rate.run("kvm", {**PARAMS, "intensities": [0, 6]}, lambda *a: None)
    assert all(r["ok"] for r in rows), [r["note"] for r in rows]
    by = {(r["config"], r["intensity"]): r for r in rows}
    base, on = by[("baseline", 6)], by[("features", 6)]
    assert base["apic"] == "user" and on["apic"] == "kernel"
    # baseline: each doorbell is a KVM_EXIT_IO, each handled tick one EOI write to the APIC page (MMIO)
    assert base["exits_by_kind"]["io"] == base["commands"] + 1
    # (the guest counts ticks until it masks the timer, a moment after the phase's end)
    assert base["exits_by_kind"]["mmio"] >= base["ticks"] - 2
    # features: no doorbell exits and no APIC exits in userspace
    assert on["exits_by_kind"].get("io") == 1 and "mmio" not in on["exits_by_kind"]
    assert on["commands"] == base["commands"] == 6 * PARAMS["units"]
    (cmp,) = exit_rate.compare(rows)
    assert cmp.engine == "kvm" and cmp.measured is not None


def test_cli_sets_list_and_bool_parameters() -> None:
    """`--set intensities=0,5` becomes [0, 5]; a boolean takes true/false; a bad value is one line."""
    import subprocess
    import sys
    from pathlib import Path

    from hvm.cli import _params
    from hvm.errors import HvmError

    assert _params(["intensities=0,5", "units=7"], exit_rate.EXPERIMENT.defaults) == {
        "intensities": [0, 5], "units": 7}
    assert _params(["flag=false"], {"flag": True}) == {"flag": False}
    with pytest.raises(HvmError, match="not a bool"):
        _params(["flag=maybe"], {"flag": True})
    with pytest.raises(HvmError, match="not a list"):
        _params(["intensities=0,x"], exit_rate.EXPERIMENT.defaults)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "hvm", "lab", "run", "exit-rate", "--engine", "model",
         "--set", "intensities=0,5", "--set", "units=10", "--json", "-"],
        capture_output=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted({r["intensity"] for r in doc["rows"]}) == [0, 5] and doc["params"]["units"] == 10
