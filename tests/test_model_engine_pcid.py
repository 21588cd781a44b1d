"""PCIDs and INVPCID on the model engine, against the Intel SDM.

Expected values: CPUID bits from SDM Vol. 2 CPUID (01H:ECX bit 17 PCID, 07H/0:EBX bit 10 INVPCID);
the #GP conditions of SDM Vol. 3A 4.10.1 and Vol. 2 MOV (to CR0/CR4) and INVPCID; CR3 with PCIDs
(SDM 4.10.4.1: bits 11:0 the PCID, bit 63 of the source "do not invalidate", never stored); the
effects of INVPCID types 0-3 (SDM Vol. 2 INVPCID); "enable INVPCID" (SDM 26.3: #UD when 0) and
the INVPCID VM exit (SDM 26.1.3: "INVLPG exiting" with "enable INVPCID"; basic reason 58,
Appendix C; exit qualification the displacement, 28.2.1; instruction information, 28.2.5).
"""

from __future__ import annotations

import pytest

from hvm.boot import layout as L
from hvm.engine.model import ModelEngine
from hvm.exits import ExitKind
from hvm.vtx.controls import ProcBased as P
from hvm.vtx.controls import ProcBased2 as P2
from hvm.vtx.exit_reasons import ExitReason as X
from hvm.vtx.qualification import AddressSize, InterruptionInfo, InvInfo, MemoryOperand, SegmentRegister
from tests.test_model_engine_support import CODE, F, Tiny, entry_state, gate64, install_idt, needs_as

pytestmark = needs_as

GP, UD = 13, 6
DESC = 0x20000  # where the tests put INVPCID descriptors
PCIDE = "mov rax, cr4\nbts rax, 17\nmov cr4, rax\n"  # CR3[11:0] of the Tiny guest is 0


def tiny(source: str, bits: int = 64, tlb: str | None = None) -> Tiny:
    g = Tiny(source, bits=bits, mem=16 << 20)
    if tlb is not None:
        g.engine.close()
        g.engine = ModelEngine(g.memory, tlb=tlb)
        g.engine.set_state(entry_state(bits))
    g.vmwrite(F.EXCEPTION_BITMAP, 1 << GP | 1 << UD)  # each fault is an exception exit we can read
    return g


def fault_of(g: Tiny) -> tuple[int, int | None] | None:
    """(vector, error code) of the exception exit the run ended with, or None if it reached HLT."""
    for _ in range(20):
        last = g.engine.run()
        if last.kind is ExitKind.HLT:
            return None
        if last.kind is ExitKind.EXCEPTION:
            break
        assert last.kind is ExitKind.CPUID, last  # the only other exits these guests make
    else:
        raise AssertionError("neither HLT nor an exception")
    info = InterruptionInfo.decode(g.vmread(F.VM_EXIT_INTR_INFO))
    return info.vector, g.vmread(F.VM_EXIT_INTR_ERROR_CODE) if info.error_code_valid else None


def desc(g: Tiny, pcid: int, la: int = 0, high: int = 0) -> None:
    """An INVPCID descriptor at DESC: bits 11:0 the PCID, 63:12 ``high`` (reserved), 127:64 ``la``."""
    g.memory.write(DESC, ((high << 12 | pcid) | la << 64).to_bytes(16, "little"))


# --- CPUID --------------------------------------------------------------------------------------

@pytest.mark.parametrize("enable_invpcid", [True, False])
def test_cpuid_reports_pcid_and_invpcid(enable_invpcid: bool) -> None:
    g = tiny("mov eax, 1\nxor ecx, ecx\ncpuid\nmov r8, rcx\n"
             "mov eax, 7\nxor ecx, ecx\ncpuid\nmov r9, rbx\nhlt")
    try:
        if not enable_invpcid:
            g.controls(off2=P2.ENABLE_INVPCID)
        assert fault_of(g) is None
        assert g.reg("r8") >> 17 & 1 == 1  # CPUID.01H:ECX.PCID
        assert g.reg("r9") >> 10 & 1 == int(enable_invpcid)  # CPUID.(07H,0):EBX.INVPCID
    finally:
        g.close()


# --- MOV to CR4 / CR0 / CR3 -------------------------------------------------------------------------

def test_pcide_can_be_set_in_ia32e_mode_with_cr3_pcid_0() -> None:
    g = tiny(PCIDE + "mov rbx, cr4\nhlt")
    try:
        assert fault_of(g) is None
        assert g.reg("rbx") >> 17 & 1
    finally:
        g.close()


@pytest.mark.parametrize("source,bits,unchanged", [
    # SDM 4.10.1: MOV to CR4 setting PCIDE with CR3[11:0] != 000H: #GP
    ("mov rax, cr3\nor rax, 1\nmov cr3, rax\n" + PCIDE + "hlt", 64, ("cr4", 17, 0)),
    # SDM 4.10.1: MOV to CR4 setting PCIDE with IA32_EFER.LMA = 0: #GP
    ("mov eax, cr4\nbts eax, 17\nmov cr4, eax\nhlt", 32, ("cr4", 17, 0)),
    # SDM 4.10.1: MOV to CR0 clearing PG with CR4.PCIDE = 1: #GP
    (PCIDE + "mov rax, cr0\nbtr rax, 31\nmov cr0, rax\nhlt", 64, ("cr0", 31, 1)),
], ids=["cr3-pcid-not-0", "lma-0", "clear-pg"])
def test_pcid_gp_conditions(source: str, bits: int, unchanged: tuple[str, int, int]) -> None:
    g = tiny(source, bits=bits)
    try:
        assert fault_of(g) == (GP, 0)
        register, bit, value = unchanged  # the faulting MOV changed nothing
        assert getattr(g.engine.get_state(), register) >> bit & 1 == value
    finally:
        g.close()


def test_pcid_gp_after_a_cr4_exit_too() -> None:
    # CR4.PCIDE owned by the hypervisor (guest/host mask): the MOV exits (SDM 26.1.3, reason 28) and
    # the hypervisor, completing it, applies the same rule (SDM 4.10.1): #GP(0), CR4 unchanged.
    # The hypervisor injects the #GP (event injection, not subject to the exception bitmap): the
    # guest's handler records vector and error code.
    g = tiny("lidt [0x21000]\nmov rax, cr3\nor rax, 1\nmov cr3, rax\n" + PCIDE + "hlt\n"
             ".org 0x100\nmov r10, [rsp]\nmov r11, 13\nhlt")
    try:
        base, limit = install_idt(g, {GP: gate64(CODE + 0x100)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(8, "little"))
        g.vmwrite(F.CR4_GUEST_HOST_MASK, 1 << 17)
        g.vmwrite(F.CR4_READ_SHADOW, 0)
        assert g.engine.run().kind is ExitKind.CR_ACCESS
        assert fault_of(g) is None  # HLT in the handler
        assert (g.reg("r11"), g.reg("r10")) == (GP, 0)
        assert not g.engine.get_state().cr4 >> 17 & 1
    finally:
        g.close()


def test_cr3_bit_63_is_not_stored_and_bits_11_0_are_the_pcid() -> None:
    g = tiny(PCIDE + "mov rax, cr3\nor rax, 5\nbts rax, 63\nmov cr3, rax\nmov rbx, cr3\nhlt")
    try:
        assert fault_of(g) is None
        assert g.reg("rbx") == L.PML4_ADDR | 5  # SDM Vol. 2 MOV: bit 63 is not written to CR3
    finally:
        g.close()


# --- the modelled TLB: PCID tags, no-flush, INVPCID ------------------------------------------

def to_pcid(pcid: int, flush: bool = False) -> str:
    """MOV to CR3 of the same tables with ``pcid``; bit 63 set unless ``flush``."""
    return f"mov rax, {L.PML4_ADDR | pcid | (0 if flush else 1 << 63):#x}\nmov cr3, rax\n"


def run_tlb(source: str) -> dict[str, int]:
    g = tiny(source, tlb="detailed")
    try:
        assert fault_of(g) is None
        c = g.engine.counters()
        assert c["tlb.walk_mismatches"] == 0 and c["tlb.unattributed"] == 0
        return c
    finally:
        g.close()


def test_pcid_tags_and_the_no_flush_bit() -> None:
    # SDM 4.10.1/4.10.2.4: entries are tagged with the current PCID and used only under it;
    # SDM 4.10.4.1: MOV to CR3 with bit 63 set invalidates nothing, with bit 63 clear it invalidates
    # the new PCID's (non-global) entries.
    c = run_tlb(PCIDE + "mov rbx, [0x400000]\n"  # PCID 0: miss
                + to_pcid(1) + "mov rbx, [0x400000]\n"  # PCID 1: miss (PCID 0's entry is not used)
                + to_pcid(0) + "mov rbx, [0x400000]\n"  # PCID 0 again, no flush: hit
                + to_pcid(0, flush=True) + "mov rbx, [0x400000]\n"  # flushed: miss
                + to_pcid(1) + "mov rbx, [0x400000]\nhlt")  # PCID 1 untouched by that flush: hit
    assert c["tlb.data_accesses"] == 5 and c["tlb.data_misses"] == 3
    assert c["tlb.invalidations.mov_cr3"] == 1  # only the load without bit 63 invalidated


def test_without_pcide_every_mov_to_cr3_flushes() -> None:
    # SDM 4.10.4.1: with CR4.PCIDE = 0 MOV to CR3 invalidates all non-global entries (of PCID 000H).
    c = run_tlb("mov rbx, [0x400000]\nmov rax, cr3\nmov cr3, rax\nmov rbx, [0x400000]\n"
                "mov cr3, rax\nmov rbx, [0x400000]\nhlt")
    assert c["tlb.data_misses"] == 3 and c["tlb.invalidations.mov_cr3"] == 2


A, B, C = 0x400000, 0x600000, 0x800000  # C is mapped global (G = 1, CR4.PGE = 1)
# After INVPCID of the given type for PCID 1 and address A: which of A, B, C under PCID 1 and A
# under PCID 2 miss again (SDM Vol. 2 INVPCID): type 0 the one address, non-global; type 1 the
# PCID's non-global entries; type 2 everything, global ones too; type 3 all but global ones.
INVPCID_MISSES = {0: 1, 1: 2, 2: 4, 3: 3}


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_invpcid_types_on_the_modelled_tlb(kind: int) -> None:
    touch = f"mov rbx, [{A:#x}]\nmov rbx, [{B:#x}]\nmov rbx, [{C:#x}]\n"
    source = ("mov rax, cr4\nbts rax, 7\nmov cr4, rax\n" + PCIDE  # PGE, then PCIDE
              + to_pcid(1) + touch + to_pcid(2) + f"mov rbx, [{A:#x}]\n"  # 4 misses: the cold TLB
              + f"mov ecx, {kind}\ninvpcid rcx, [{DESC:#x}]\n"
              + to_pcid(1) + touch + to_pcid(2) + f"mov rbx, [{A:#x}]\nhlt")
    g = tiny(source, tlb="detailed")
    try:
        pde = L.PD_ADDR + (C >> 21) * 8
        g.memory.write(pde, (int.from_bytes(g.memory.read(pde, 8), "little") | 1 << 8).to_bytes(8, "little"))
        desc(g, pcid=1, la=A)
        assert fault_of(g) is None
        c = g.engine.counters()
        assert c["tlb.data_accesses"] == 8 and c["tlb.walk_mismatches"] == 0
        assert c["tlb.data_misses"] == 4 + INVPCID_MISSES[kind]
        assert c[f"tlb.invalidations.invpcid{kind}"] == 1
    finally:
        g.close()


# --- INVPCID faults, "enable INVPCID", the VM exit -------------------------------------------

@pytest.mark.parametrize("kind,pcid,la,high,pcide,expected", [
    (4, 0, 0, 0, True, (GP, 0)),  # type > 3
    (1, 0, 0, 1, True, (GP, 0)),  # descriptor bits 63:12 not 0
    (0, 1, 1 << 47, 0, True, (GP, 0)),  # type 0, non-canonical address
    (1, 1, 0, 0, False, (GP, 0)),  # type 0 or 1, PCID != 0 with CR4.PCIDE = 0
    (0, 1, 0, 0, False, (GP, 0)),
    (1, 0, 0, 0, False, None),  # PCID 0 with CR4.PCIDE = 0 is allowed
    (2, 0xFFF, 1 << 47, 0, False, None),  # types 2-3 ignore the descriptor's PCID and address
    (3, 0xFFF, 0, 0, True, None),
])
def test_invpcid_checks(kind, pcid, la, high, pcide, expected) -> None:
    g = tiny((PCIDE if pcide else "") + f"mov ecx, {kind}\ninvpcid rcx, [{DESC:#x}]\nhlt")
    try:
        desc(g, pcid, la, high)
        assert fault_of(g) == expected
    finally:
        g.close()


def test_invpcid_at_cpl3_is_gp() -> None:
    # SDM 26.1.1: the CPL check has priority over the VM exit ("INVLPG exiting" on here).
    g = tiny("mov ecx, 2\ninvpcid rcx, [0x20000]\nhlt")
    try:
        g.controls(on=P.INVLPG_EXITING)
        for entry in (L.PML4_ADDR, L.PDPT_ADDR, L.PD_ADDR):  # U/S = 1 down to the code's 2-MiB page
            value = int.from_bytes(g.memory.read(entry, 8), "little") | 4
            g.memory.write(entry, value.to_bytes(8, "little"))
        state = g.engine.get_state()
        state.cs.dpl = 3
        state.cs.selector |= 3
        state.ss.dpl = 3
        state.ss.selector |= 3
        g.engine.set_state(state)
        assert fault_of(g) == (GP, 0)
        assert X.INVPCID not in g.engine.exit_counts
    finally:
        g.close()


def test_enable_invpcid_off_is_ud_even_with_invlpg_exiting() -> None:
    g = tiny("mov ecx, 2\ninvpcid rcx, [0x20000]\nhlt")
    try:
        g.controls(on=P.INVLPG_EXITING, off2=P2.ENABLE_INVPCID)
        assert fault_of(g) == (UD, None)  # SDM 26.3: #UD, before any other exception or exit
        assert X.INVPCID not in g.engine.exit_counts
    finally:
        g.close()


def test_invpcid_exit_reason_58_qualification_and_instruction_information() -> None:
    g = tiny("mov ebx, 0x10000\nmov ecx, 1\n" + PCIDE + "invpcid rcx, [rbx + 0x10008]\nhlt", tlb="detailed")
    try:
        g.controls(on=P.INVLPG_EXITING)
        g.memory.write(0x20008, bytes(16))  # the descriptor: PCID 0
        taken = []
        real = g.engine.take_exit
        g.engine.take_exit = lambda vmexit: (taken.append(vmexit), real(vmexit))[1]
        assert fault_of(g) is None  # the hypervisor completed it: the guest went on to HLT
        assert g.engine.exit_counts[X.INVPCID] == 1
        info = next(v.info for v in taken if v.reason is X.INVPCID)
        assert info.reason == 58
        assert info.qualification == 0x10008  # the displacement
        assert info.instruction_length == 9  # 66 0F 38 82 /r (SDM Vol. 2 INVPCID), ModRM 8B, disp32
        assert InvInfo.decode(info.instruction_info) == InvInfo(
            MemoryOperand(SegmentRegister.DS, AddressSize.BITS64, base=3, index=None, scaling=0), reg2=1)
        # ... and it executed once, after the exit: single-context for PCID 0
        assert g.engine.counters()["tlb.invalidations.invpcid1"] == 1
    finally:
        g.close()
