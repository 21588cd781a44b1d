"""Walk accounting on the model engine (``tlb="fast"|"detailed"``): the guest's own INVLPG and MOV to
CR3 reach the modelled TLB with their SDM effect (Vol. 3A 4.10.4.1), fast mode sees a subset of the
detailed mode's misses, and bad options are one-line errors."""

from __future__ import annotations

import pytest

from hvm.engine import create_engine
from hvm.engine.model import ModelEngine
from hvm.engine.model.cost import CostModel
from hvm.errors import EngineUnavailable
from hvm.exits import ExitKind
from tests.test_model_engine_support import Tiny, entry_state, needs_as

pytestmark = needs_as

# Three reads of one page: the first misses, INVLPG drops it (the second misses), the third hits;
# then MOV to CR3 (CR4.PCIDE = 0: all non-global entries go) and a fourth read misses again.
GUEST = """
mov rax, [0x400000]
invlpg [0x400000]
mov rax, [0x400000]
mov rax, [0x400008]
mov rbx, cr3
mov cr3, rbx
mov rax, [0x400010]
hlt
"""


def run(tlb: str) -> dict[str, int]:
    g = Tiny(GUEST, bits=64, mem=8 << 20)
    g.engine.close()
    g.engine = ModelEngine(g.memory, tlb=tlb)
    g.engine.set_state(entry_state(64))
    try:
        assert g.run()[-1].kind is ExitKind.HLT
        return g.engine.counters()
    finally:
        g.close()


def test_detailed_mode_sees_invlpg_and_mov_to_cr3() -> None:
    c = run("detailed")
    assert c["tlb.data_misses"] == 3 and c["tlb.data_accesses"] == 4
    assert c["tlb.invalidations.invlpg"] == 1 and c["tlb.invalidations.mov_cr3"] == 1
    assert c["tlb.walk_mismatches"] == 0 and c["tlb.alias_fills"] == 0 and c["tlb.unattributed"] == 0
    # the loader's tables map 2-MiB pages, the engine's EPT too: each walk reads 3 guest levels and
    # 3 EPT levels for each of the 4 GPAs (SDM 4.5, 29.3.2): (3+1)(3+1)-1 = 15
    assert c["tlb.data_walk_refs"] == 3 * 15
    assert c["tlb.modelled_walk_cycles"] == c["tlb.walk_refs"] * CostModel().walk_ref


def test_fast_mode_sees_at_most_the_detailed_misses() -> None:
    fast, detailed = run("fast"), run("detailed")
    assert 1 <= fast["tlb.data_misses"] <= detailed["tlb.data_misses"]
    assert fast["tlb.mode_detailed"] == 0 and fast["tlb.walk_mismatches"] == 0


def test_bad_tlb_options_are_one_line_errors() -> None:
    from hvm.vmm.memory import GuestMemory

    memory = GuestMemory(2 << 20)
    try:
        with pytest.raises(EngineUnavailable, match="'fast' or 'detailed'"):
            create_engine("model", memory, {"tlb": "exact"})
        with pytest.raises(EngineUnavailable, match="tlb_caches"):
            create_engine("model", memory, {"tlb": "fast", "tlb_caches": -1})
    finally:
        memory.close()


def test_a_tlb_geometry_from_the_config() -> None:
    # One 4-KiB DTLB entry and no STLB: the page read after another page misses again.
    from hvm.vtx.paging import PAGE_2M, PAGE_4K
    from hvm.vtx.tlb import SKYLAKE, ArrayConfig, TlbConfig

    tiny = TlbConfig(itlb=SKYLAKE.itlb, dtlb=(ArrayConfig("d", 1, 1, (PAGE_4K, PAGE_2M)),), stlb=())
    g = Tiny("mov rax, [0x400000]\nmov rax, [0x600000]\nmov rax, [0x400000]\nhlt", bits=64, mem=8 << 20)
    g.engine.close()
    g.engine = ModelEngine(g.memory, tlb="detailed", tlb_config=tiny)
    g.engine.set_state(entry_state(64))
    try:
        assert g.run()[-1].kind is ExitKind.HLT
        assert g.engine.counters()["tlb.data_misses"] == 3
    finally:
        g.close()


@pytest.mark.parametrize("vpid", [True, False])
def test_vm_exits_without_vpid_empty_the_modelled_tlb(vpid: bool) -> None:
    # SDM 29.4.3.3: with "enable VPID" 0 every VM exit and entry invalidates the linear and combined
    # mappings of VPID 0000H; with VPIDs they survive. The OUT exits to the VMM between the reads.
    from hvm.vtx.controls import ProcBased2

    g = Tiny("mov rax, [0x400000]\nmov dx, 0x500\nout dx, al\nmov rax, [0x400000]\nhlt", bits=64, mem=8 << 20)
    g.engine.close()
    g.engine = ModelEngine(g.memory, tlb="detailed")
    g.engine.set_state(entry_state(64))
    if not vpid:
        g.controls(off2=ProcBased2.ENABLE_VPID)
    try:
        exits = g.run()
        assert [e.kind for e in exits] == [ExitKind.IO, ExitKind.HLT]
        assert g.engine.counters()["tlb.data_misses"] == (1 if vpid else 2)
    finally:
        g.close()
