"""The trap-and-emulate experiment: rows side by side (traps/exits per kind, wall time, modelled cycles)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hvm.engine.trap import TrapCostModel
from hvm.lab import EXPERIMENTS
from hvm.lab.report import build
from hvm.lab.trap_emulate import SPLITX_CYCLES, run_guest
from tests.conftest import KVM
from tests.test_trap_engine import needs_model

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"engine", "workload", "exit_status", "console_sha1", "events", "wall_s", "modelled_overhead_cycles",
          "cycles_per_event", "by_kind", "exits_by_kind", "cost", "detected", "evidence", "controls"}


def test_registered() -> None:
    exp = EXPERIMENTS["trap-and-emulate"]
    assert exp.engines == ("trap", "model", "kvm")
    assert "popek-goldberg" in EXPERIMENTS


def test_trap_row() -> None:
    row = run_guest("trap", "trapkern")
    assert FIELDS <= set(row)
    assert row["exit_status"] == 1
    assert row["by_kind"]["cli"] == 4 and row["by_kind"]["iretq"] == 2
    assert row["events"] == sum(row["by_kind"].values())
    assert row["cycles_per_event"] == TrapCostModel().per_trap
    assert row["modelled_overhead_cycles"] == row["events"] * row["cycles_per_event"]
    json.dumps(row)  # JSON-ready


@needs_model
def test_model_row_same_console_fewer_kinds() -> None:
    trap, model = run_guest("trap", "trapkern"), run_guest("model", "trapkern")
    assert model["console_sha1"] == trap["console_sha1"]
    assert model["cycles_per_event"] == SPLITX_CYCLES
    assert "cli" not in model["by_kind"]  # a guest CLI at its own ring 0 is no VM exit
    assert model["events"] < trap["events"]


def test_lab_run_json_and_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hvm", "lab", "run", "trap-and-emulate", "--json", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    engines = [r["engine"] for r in doc["rows"] if r["workload"] == "trapkern"]
    assert "trap" in engines and ("kvm" in engines) == KVM
    for row in doc["rows"]:
        assert FIELDS <= set(row)
    trapkern = [r for r in doc["rows"] if r["workload"] == "trapkern"]
    assert len({r["console_sha1"] for r in trapkern}) == 1  # the same console on every engine
    sections = build(tmp_path, names=["trap-and-emulate"])
    assert (tmp_path / "trap-and-emulate.png").exists()
    text = (tmp_path / "report.md").read_text()
    assert "redpill detects virtualization" in text
    assert any(c.engine == "trap" and c.measured == 6 for c in sections[0].comparisons)
