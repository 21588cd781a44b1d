"""The Popek-Goldberg analyzer. Expected facts come from the SDM and Robin & Irvine (USENIX Security
2000), never from the analyzer's own output: it must find them by executing the instructions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvm.lab import popek_goldberg as pg
from tests.test_trap_engine import needs_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not pg.assembler_available(), reason="GNU as/ld (binutils) not installed")

# Robin & Irvine's sensitive, unprivileged Pentium instructions (MOV split into its two directions).
ROBIN_IRVINE = ("SGDT", "SIDT", "SLDT", "SMSW", "PUSHF", "POPF", "LAR", "LSL", "VERR", "VERW", "POP", "PUSH",
                "CALL", "JMP", "INT n", "RET", "STR", "MOV from Sreg", "MOV to Sreg")
# SDM Vol. 2 / Vol. 3A 2.8: instructions that fault at CPL > 0 (CLI/STI and IN/OUT when CPL > IOPL).
PRIVILEGED = ("CLI", "STI", "HLT", "IN", "OUT", "MOV to CR0", "MOV from CR0", "MOV to CR3", "LGDT", "LIDT",
              "LLDT", "LTR", "LMSW", "CLTS", "RDMSR", "WRMSR", "INVLPG")
UMIP = ("SGDT", "SIDT", "SLDT", "SMSW", "STR")  # SDM Vol. 3A 2.5, CR4.UMIP


def entry(name: str) -> pg.Entry:
    return next(e for e in pg.CATALOGUE if e.mnemonic == name)


@pytest.fixture(scope="module")
def doc() -> dict:
    return pg.analyze()


def rows(doc: dict) -> dict[str, dict]:
    return {i["mnemonic"]: i for i in doc["instructions"]}


# --- single facts, by execution ----------------------------------------------------------------

def test_sgdt_at_cpl3_does_not_fault_and_shows_the_gdtr() -> None:
    out = pg.run_bare("sgdt [0x20000]", cpl=3, state1=False)
    assert out.fault is None
    stored = bytes.fromhex(out.result["data"])[:6]
    assert stored == (8 * len(pg.GDT_ENTRIES) - 1).to_bytes(2, "little") + pg.GDT0.to_bytes(4, "little")


def test_sgdt_at_cpl3_with_umip_faults_gp() -> None:
    out = pg.run_bare("sgdt [0x20000]", cpl=3, state1=False, umip=True)
    assert out.fault == pg.GP
    assert "UMIP" in out.compensated  # Unicorn has no UMIP check: the harness raises the SDM's #GP
    assert pg.run_bare("sgdt [0x20000]", cpl=0, state1=False, umip=True).fault is None  # CPL 0 unaffected


def test_popf_at_cpl3_with_iopl0_silently_keeps_if() -> None:
    variant = entry("POPF").variants[0]  # flips IF in the image it pops
    low, high = pg.run_bare(variant, 0, False), pg.run_bare(variant, 3, False)
    assert low.fault is None and low.privileged["if"] is False  # CPL 0: IF 1 -> 0
    assert high.fault is None and high.privileged["if"] is True  # CPL 3: no fault, IF unchanged


def test_mov_to_cr0_at_cpl3_faults_gp() -> None:
    variant = entry("MOV to CR0").variants[0]
    assert pg.run_bare(variant, 3, False).fault == pg.GP
    low = pg.run_bare(variant, 0, False)
    assert low.fault is None and low.privileged["cr0"] == pg.CR0_S ^ pg.CR0_MP


def test_out_at_cpl3_faults_gp_through_the_compensation() -> None:
    out = pg.run_bare(entry("OUT").variants[0], 3, False)
    assert out.fault == pg.GP and "I/O permission" in out.compensated
    assert pg.run_bare(entry("OUT").variants[0], 0, False).privileged["io"] == (0x70,)


def test_invlpg_is_seen_through_the_stale_tlb_probe() -> None:
    # the warm-up leaves a stale translation of PROBE (page A) after rewriting its PTE to page B
    assert pg.run_bare("nop", 0, False).privileged["tlb"] == 0xAAAAAAAA
    assert pg.run_bare(entry("INVLPG").variants[0], 0, False).privileged["tlb"] == 0xBBBBBBBB


# --- the classification and the verdicts -------------------------------------------------------------

def test_the_catalogue_holds_robin_and_irvine_and_the_chapters_four() -> None:
    names = {e.mnemonic for e in pg.CATALOGUE}
    assert set(ROBIN_IRVINE) <= names and set(PRIVILEGED) <= names
    assert {e.mnemonic for e in pg.CATALOGUE if e.named} == {"SGDT", "SIDT", "SMSW", "POPF"}


def test_robin_irvine_instructions_are_sensitive_and_unprivileged(doc) -> None:
    by = rows(doc)
    for name in ROBIN_IRVINE:
        assert by[name]["sensitive"] and not by[name]["privileged"], (name, by[name]["cpl3_behaviour"])


def test_privileged_instructions_are_privileged_and_sensitive(doc) -> None:
    by = rows(doc)
    for name in PRIVILEGED:
        assert by[name]["privileged"] and by[name]["sensitive"], name
        assert by[name]["cpl3_behaviour"].startswith("#GP"), name


def test_innocent_instructions_are_neither(doc) -> None:
    by = rows(doc)
    for name in ("NOP", "ADD", "MOV", "CPUID"):
        assert not by[name]["privileged"] and not by[name]["sensitive"], name


def test_umip_makes_exactly_the_store_instructions_privileged(doc) -> None:
    by = rows(doc)
    for name in ROBIN_IRVINE:
        assert by[name]["umip_privileged"] == (name in UMIP), name


def test_verdicts(doc) -> None:
    assert doc["verdicts"]["legacy_x86"] is False
    assert doc["verdicts"]["x86_umip"] is False  # PUSHF, POPF, LAR, ... remain
    by = rows(doc)
    assert not by["POPF"]["umip_privileged"] and not by["PUSHF"]["umip_privileged"]
    if "vtx_skipped" in doc:
        pytest.skip(doc["vtx_skipped"])
    assert doc["verdicts"]["vtx"] is True
    assert by["SGDT"]["vtx"] == "exits (descriptor_table)"
    assert by["POPF"]["vtx"] == "runs as on bare metal"  # at the guest's own ring 0


@needs_model
def test_vtx_verdict_depends_on_the_read_shadows() -> None:
    # Without CR0/CR4 guest/host masks the host-forced CR0.NE shows through SMSW and MOV from CR0.
    handled, how = pg.vtx_handles(entry("SMSW"), read_shadows=False)
    assert not handled and "rax" in how
    assert pg.vtx_handles(entry("SMSW"))[0]


def test_cli_json_shape() -> None:
    proc = subprocess.run([sys.executable, "-m", "hvm", "lab", "run", "popek-goldberg", "--json", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["rows"][0]
    assert set(row["verdicts"]) == {"legacy_x86", "x86_umip", "vtx"}
    for item in row["instructions"]:
        assert {"mnemonic", "privileged", "sensitive", "cpl3_behaviour"} <= set(item)
        assert isinstance(item["privileged"], bool) and isinstance(item["sensitive"], bool)
