"""The red pill: its unprivileged probes give the trap engine away, and not the VT-x model with the
controls a hypervisor uses to hide (descriptor-table exiting, a CR0 read shadow), nor KVM."""

from __future__ import annotations

import pytest

from hvm.lab.trap_emulate import run_guest
from tests.conftest import needs_kvm
from tests.test_trap_engine import needs_model


def test_redpill_detects_the_trap_engine() -> None:
    row = run_guest("trap", "redpill")
    lines = row["evidence"].split(" / ")
    assert row["detected"] is True
    assert lines[-1] == "virtualized (4 of 4 probes)"
    # The evidence, probe by probe: the hypervisor's own tables and CR0, and a POPF that kept IF = 0.
    assert lines[0].startswith("sgdt base=0xffc00000 ") and lines[0].endswith("-> differs")
    assert lines[1].startswith("sidt base=0xffc10000 ") and lines[1].endswith("-> differs")
    assert lines[2] == "smsw=0x33, mov from cr0=0x00000011 -> differs"  # real MP|ET|NE|PE vs the virtual CR0
    assert lines[3] == "popf of an image with IF=1 left IF=0 -> differs"


@needs_model
def test_redpill_does_not_detect_the_vtx_model_with_the_right_controls() -> None:
    row = run_guest("model", "redpill")
    assert "descriptor-table exiting" in row["controls"] and "read shadow" in row["controls"]
    assert row["detected"] is False
    lines = row["evidence"].split(" / ")
    assert lines[-1] == "not detected"
    assert all(line.endswith("-> same") for line in lines[:4])
    assert row["exits_by_kind"].get("descriptor_table", 0) >= 2  # SGDT and SIDT (and LIDT) exited


@needs_kvm
def test_redpill_does_not_detect_kvm() -> None:
    row = run_guest("kvm", "redpill")
    assert row["detected"] is False


@pytest.mark.parametrize("engine", ["trap"])
def test_redpill_row_has_the_report_fields(engine: str) -> None:
    row = run_guest(engine, "redpill")
    assert row["evidence"].count(" / ") == 4 and row["workload"] == "redpill"
