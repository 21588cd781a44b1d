"""The VMCS decides what exits: each control on gives exactly its exits, off gives none.

Each tiny guest executes a sensitive instruction and then CPUID, which exits unconditionally
(SDM Vol. 3C 26.1.2) and ends the run. Expected values come from the SDM: basic exit reasons
(Appendix C), exit qualifications (28.2.1), instruction information (28.2.5), interruption
information (25.9.2), EPT rules (29.3).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvm.engine.model.decode import candidate_starts, decode
from hvm.engine.model.hostcpu import host_tsc
from hvm.exits import ExitKind
from hvm.vtx.bitmaps import IoBitmaps, MsrBitmap
from hvm.vtx.controls import ProcBased as P
from hvm.vtx.controls import ProcBased2 as P2
from hvm.vtx.ept import EptAccess, EptBuilder, EptPerm, ept_translate
from hvm.vtx.exit_reasons import ExitReason as X
from hvm.vtx.qualification import (
    CrAccessType,
    CrQualification,
    DrQualification,
    EptViolationQualification,
    GdtrIdtrInfo,
    GdtrIdtrInstruction,
    InterruptionInfo,
    InterruptionType,
    IoQualification,
    LdtrTrInfo,
    LdtrTrInstruction,
)
from tests.test_model_engine_support import CODE, F, Tiny, gate32, gate64, install_idt, kinds, needs_as

pytestmark = needs_as

# (id, code, bits, primary control, secondary control, expected basic exit reason)
CONDITIONAL = [
    ("invlpg", "invlpg [0x1234]", 32, P.INVLPG_EXITING, 0, X.INVLPG),
    ("mwait", "xor eax, eax\nxor ecx, ecx\nmwait", 32, P.MWAIT_EXITING, 0, X.MWAIT_INSTRUCTION),
    ("monitor", "mov eax, 0x2000\nxor ecx, ecx\nxor edx, edx\nmonitor", 32, P.MONITOR_EXITING, 0,
     X.MONITOR_INSTRUCTION),
    ("rdpmc", "xor ecx, ecx\nrdpmc", 32, P.RDPMC_EXITING, 0, X.RDPMC),
    ("rdtsc", "rdtsc", 32, P.RDTSC_EXITING, 0, X.RDTSC),
    ("pause", "pause", 32, P.PAUSE_EXITING, 0, X.PAUSE_INSTRUCTION),
    ("cr3-load", "mov eax, cr3\nmov cr3, eax", 32, P.CR3_LOAD_EXITING, 0, X.CR_ACCESS),
    ("cr3-store", "mov eax, cr3", 32, P.CR3_STORE_EXITING, 0, X.CR_ACCESS),
    ("cr8-load", "xor eax, eax\nmov cr8, rax", 64, P.CR8_LOAD_EXITING, 0, X.CR_ACCESS),
    ("cr8-store", "mov rax, cr8", 64, P.CR8_STORE_EXITING, 0, X.CR_ACCESS),
    ("mov-dr", "mov eax, dr7", 32, P.MOV_DR_EXITING, 0, X.DR_ACCESS),
    ("io", "out 0x80, al", 32, P.UNCONDITIONAL_IO_EXITING, 0, X.IO_INSTRUCTION),
    ("lgdt", "sgdt [0x2000]\nlgdt [0x2000]", 32, 0, P2.DESCRIPTOR_TABLE_EXITING, X.GDTR_IDTR),
    ("sldt", "sldt ax", 32, 0, P2.DESCRIPTOR_TABLE_EXITING, X.LDTR_TR),
    ("wbinvd", "wbinvd", 32, 0, P2.WBINVD_EXITING, X.WBINVD),
    ("rdrand", "rdrand eax", 32, 0, P2.RDRAND_EXITING, X.RDRAND),
]
CONDITIONAL_IDS = [case[0] for case in CONDITIONAL]
# Controls a default (KVM-like) VMCS turns on, off for the "off" runs.
EVERYTHING_OFF = (P.HLT_EXITING | P.MWAIT_EXITING | P.MONITOR_EXITING | P.RDPMC_EXITING | P.MOV_DR_EXITING
                  | P.UNCONDITIONAL_IO_EXITING | P.USE_IO_BITMAPS)


def run_to_cpuid(g: Tiny) -> dict[X, int]:
    exits = g.run(until=ExitKind.CPUID)
    assert exits[-1].kind is ExitKind.CPUID
    return {X(reason): n for reason, n in g.engine.exit_counts.items()}


@pytest.mark.parametrize("name,code,bits,control,control2,reason", CONDITIONAL, ids=CONDITIONAL_IDS)
def test_control_on_gives_exactly_one_exit(name, code, bits, control, control2, reason) -> None:
    g = Tiny(f"{code}\ncpuid", bits)
    try:
        g.controls(off=EVERYTHING_OFF, on=control, on2=control2)
        counts = run_to_cpuid(g)
        expected = 2 if name == "lgdt" else 1  # SGDT and LGDT each exit
        assert counts == {reason: expected, X.CPUID: 1}
    finally:
        g.close()


@pytest.mark.parametrize("name,code,bits,control,control2,reason", CONDITIONAL, ids=CONDITIONAL_IDS)
def test_control_off_gives_no_exit(name, code, bits, control, control2, reason) -> None:
    g = Tiny(f"{code}\ncpuid", bits)
    try:
        g.controls(off=EVERYTHING_OFF | control, off2=control2)
        assert run_to_cpuid(g) == {X.CPUID: 1}
    finally:
        g.close()


def test_every_control_off_no_sensitive_instruction_exits() -> None:
    body = "\n".join(code for _, code, bits, *_ in CONDITIONAL if bits == 32)
    g = Tiny(f"{body}\nmov ecx, 0xC0000080\nrdmsr\nwrmsr\nin al, 0x80\nrdtscp\ncpuid")
    try:
        g.controls(off=EVERYTHING_OFF | P.INVLPG_EXITING | P.RDTSC_EXITING | P.PAUSE_EXITING
                   | P.CR3_LOAD_EXITING | P.CR3_STORE_EXITING,
                   off2=P2.DESCRIPTOR_TABLE_EXITING | P2.WBINVD_EXITING | P2.RDRAND_EXITING)
        assert run_to_cpuid(g) == {X.CPUID: 1}
    finally:
        g.close()


# --- instructions that always exit (SDM 26.1.2) ----------------------------------------------

def test_cpuid_always_exits_with_the_policy_answer() -> None:
    g = Tiny("xor eax, eax\ncpuid\nhlt")
    try:
        g.controls(off=EVERYTHING_OFF & ~P.HLT_EXITING)
        exits = g.run()
        assert kinds(exits) == ["cpuid", "hlt"] and g.reasons == [X.CPUID, X.HLT]
        assert g.vmread(F.VM_EXIT_INSTRUCTION_LEN) == 1  # HLT's length (the last exit)
        eax, ebx, ecx, edx = g.engine.cpuid(0, 0)
        state = g.engine.get_state()
        assert (state.regs["rbx"], state.regs["rdx"], state.regs["rcx"]) == (ebx, edx, ecx)
    finally:
        g.close()


def test_vmcall_exits_and_vmx_instructions_get_ud_after_their_exit() -> None:
    g = Tiny("lidt [0x21000]\nvmcall\nvmxoff\ncpuid\n.org 0x100\nmov ebx, 6\nadd dword ptr [esp], 3\niret")
    try:
        base, limit = install_idt(g, {6: gate32(CODE + 0x100)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(4, "little"))
        # The #UD is injected at VM entry, so the exception bitmap does not apply to it (SDM 28.6).
        g.vmwrite(F.EXCEPTION_BITMAP, 1 << 6)
        exits = g.run(until=ExitKind.CPUID)
        assert kinds(exits) == ["vmcall", "cpuid"]
        assert g.engine.exit_counts[X.VMOFF] == 1  # a VM exit the engine completed itself
        assert g.reg("rbx") == 6
    finally:
        g.close()


def test_invd_exits_in_engine() -> None:
    g = Tiny("invd\ncpuid")
    try:
        assert run_to_cpuid(g) == {X.INVD: 1, X.CPUID: 1}
    finally:
        g.close()


# --- HLT -------------------------------------------------------------------------------------

def test_hlt_exiting() -> None:
    g = Tiny("hlt\ncpuid")
    try:
        exits = g.run()
        assert kinds(exits) == ["hlt"] and g.reasons == [X.HLT]
        assert g.vmread(F.GUEST_RIP) == CODE  # the exit happens before HLT executes
        assert g.vmread(F.VM_EXIT_INSTRUCTION_LEN) == 1
    finally:
        g.close()


# --- qualifications ----------------------------------------------------------------------------

def test_invlpg_qualification_is_the_linear_address() -> None:
    g = Tiny("mov ebx, 0x1000\ninvlpg [ebx + 0x234]\ncpuid")
    try:
        g.controls(on=P.INVLPG_EXITING)
        exits = g.run(until=ExitKind.INVLPG)
        assert exits[-1].qualification == 0x1234 == g.vmread(F.EXIT_QUALIFICATION)
        assert g.vmread(F.VM_EXIT_INSTRUCTION_LEN) == 7
    finally:
        g.close()


@pytest.mark.parametrize("code,cr,access,gpr", [
    ("mov ecx, cr3\nmov cr3, ecx", 3, CrAccessType.MOV_TO_CR, 1),
    ("mov esi, cr3", 3, CrAccessType.MOV_FROM_CR, 6),
])
def test_cr3_access_qualification(code, cr, access, gpr) -> None:
    g = Tiny(f"{code}\ncpuid")
    try:
        g.controls(on=P.CR3_LOAD_EXITING if access is CrAccessType.MOV_TO_CR else P.CR3_STORE_EXITING)
        g.run(until=ExitKind.CR_ACCESS)
        assert CrQualification.decode(g.vmread(F.EXIT_QUALIFICATION)) == CrQualification(cr, access, gpr=gpr)
    finally:
        g.close()


def test_cr3_target_values_suppress_the_exit() -> None:
    g = Tiny("xor eax, eax\nmov cr3, eax\nmov eax, 0x5000\nmov cr3, eax\ncpuid")
    try:
        g.controls(on=P.CR3_LOAD_EXITING)
        g.vmwrite(F.CR3_TARGET_COUNT, 1)
        g.vmwrite(F.CR3_TARGET_VALUE0, 0)
        assert run_to_cpuid(g) == {X.CR_ACCESS: 1, X.CPUID: 1}  # only the load of 0x5000
        assert g.engine.get_state().cr3 == 0x5000  # the hypervisor completed the load
    finally:
        g.close()


def test_mov_dr_qualification() -> None:
    g = Tiny("mov edx, dr7\nmov dr0, ebx\ncpuid")
    try:
        exits = g.run(until=ExitKind.DR_ACCESS)
        assert DrQualification.decode(exits[-1].qualification) == DrQualification(7, True, 2)
        exits = g.run(until=ExitKind.DR_ACCESS)
        assert DrQualification.decode(exits[-1].qualification) == DrQualification(0, False, 3)
    finally:
        g.close()


@pytest.mark.parametrize("code,size,is_in,imm,port", [
    ("out 0x80, al", 1, False, True, 0x80),
    ("mov dx, 0x3f8\nin ax, dx", 2, True, False, 0x3F8),
    ("mov dx, 0xcfc\nin eax, dx", 4, True, False, 0xCFC),
    ("in al, 0x71", 1, True, True, 0x71),
])
def test_io_qualification(code, size, is_in, imm, port) -> None:
    g = Tiny(f"{code}\ncpuid")
    try:
        exits = g.run(until=ExitKind.IO, read=b"\x5a\x5b\x5c\x5d")
        ex = exits[-1]
        assert (ex.port, ex.size, ex.is_write) == (port, size, not is_in)
        assert IoQualification.decode(g.vmread(F.EXIT_QUALIFICATION)) == IoQualification(
            size=size, is_in=is_in, string=False, rep=False, immediate=imm, port=port)
        g.run(until=ExitKind.CPUID, read=b"\x5a\x5b\x5c\x5d")
        if is_in:
            supplied = int.from_bytes(b"\x5a\x5b\x5c\x5d"[:size], "little")
            assert g.reg("rax") & ((1 << 8 * size) - 1) == supplied
    finally:
        g.close()


def test_rep_outs_is_one_exit_with_every_element() -> None:
    g = Tiny("mov esi, 0x3000\nmov ecx, 3\nmov dx, 0x3f8\nrep outsb\ncpuid")
    g.memory.write(0x3000, b"abc")
    try:
        exits = g.run(until=ExitKind.IO)
        ex = exits[-1]
        assert (ex.port, ex.size, ex.count, ex.data, ex.is_write) == (0x3F8, 1, 3, b"abc", True)
        assert IoQualification.decode(ex.qualification) == IoQualification(1, False, True, True, False, 0x3F8)
        g.run(until=ExitKind.CPUID)
        assert (g.reg("rcx"), g.reg("rsi")) == (0, 0x3003)
    finally:
        g.close()


def test_rep_ins_writes_the_data_the_vmm_supplies() -> None:
    g = Tiny("mov edi, 0x3000\nmov ecx, 2\nmov dx, 0x60\nrep insw\ncpuid")
    try:
        exits = g.run(until=ExitKind.IO)
        assert (exits[-1].count, exits[-1].size, exits[-1].is_write) == (2, 2, False)
        g.run(until=ExitKind.CPUID, read=b"\x11\x22\x33\x44")
        assert g.memory.read(0x3000, 4) == b"\x11\x22\x33\x44"
        assert (g.reg("rcx"), g.reg("rdi")) == (0, 0x3004)
    finally:
        g.close()


def test_io_bitmaps_decide_per_port() -> None:
    g = Tiny("out 0x80, al\nout 0x81, al\nin al, 0x81\ncpuid")
    try:
        bitmaps = IoBitmaps()
        bitmaps.pass_through(0, 0x10000)
        bitmaps.intercept(0x80)
        g.engine.host.write(g.vmread(F.IO_BITMAP_A), bytes(bitmaps.a))
        g.engine.host.write(g.vmread(F.IO_BITMAP_B), bytes(bitmaps.b))
        # SDM 26.1.3: with "use I/O bitmaps" 1, "unconditional I/O exiting" is ignored.
        g.controls(on=P.USE_IO_BITMAPS | P.UNCONDITIONAL_IO_EXITING)
        exits = g.run(until=ExitKind.CPUID)
        assert [(e.kind, e.port) for e in exits[:-1]] == [(ExitKind.IO, 0x80)]
        assert g.reg("rax") & 0xFF == 0xFF  # nothing answers a port that does not exit
    finally:
        g.close()


def test_msr_bitmap_decides_per_msr_and_direction() -> None:
    g = Tiny("mov ecx, 0xC0000100\nrdmsr\nwrmsr\nmov ecx, 0x174\nrdmsr\ncpuid", bits=64)
    try:
        bitmap = MsrBitmap()
        bitmap.pass_through(0xC000_0100)
        bitmap.pass_through(0x174)
        bitmap.intercept(0xC000_0100, read=False, write=True)
        g.engine.host.write(g.vmread(F.MSR_BITMAP), bytes(bitmap.page))
        exits = g.run(until=ExitKind.CPUID)
        assert [(e.kind, e.addr) for e in exits[:-1]] == [(ExitKind.WRMSR, 0xC000_0100)]
        assert g.reasons[0] == X.MSR_WRITE
    finally:
        g.close()


def test_without_msr_bitmaps_every_msr_access_exits() -> None:
    g = Tiny("mov ecx, 0x174\nrdmsr\ncpuid")
    try:
        g.controls(off=P.USE_MSR_BITMAPS)
        exits = g.run(until=ExitKind.CPUID)
        assert [(e.kind, e.addr, e.size) for e in exits[:-1]] == [(ExitKind.RDMSR, 0x174, 8)]
    finally:
        g.close()


def test_descriptor_table_exit_information() -> None:
    g = Tiny("mov ebx, 0x2000\nmov esi, 2\nsidt [ebx + esi*4 + 0x10]\nltr cx\ncpuid")
    try:
        g.controls(on2=P2.DESCRIPTOR_TABLE_EXITING)
        exits = g.run(until=ExitKind.DESCRIPTOR_TABLE)
        assert g.reasons[-1] == X.GDTR_IDTR and exits[-1].qualification == 0x10  # the displacement
        info = GdtrIdtrInfo.decode(g.vmread(F.VMX_INSTRUCTION_INFO))
        assert info.instruction is GdtrIdtrInstruction.SIDT
        assert (info.operand.base, info.operand.index, info.operand.scaling) == (3, 6, 2)
        assert g.vmread(F.GUEST_LINEAR_ADDRESS) == 0x2018
        g.run(until=ExitKind.DESCRIPTOR_TABLE)
        assert g.reasons[-1] == X.LDTR_TR
        ltr = LdtrTrInfo.decode(g.vmread(F.VMX_INSTRUCTION_INFO))
        assert (ltr.instruction, ltr.operand) == (LdtrTrInstruction.LTR, 1)
    finally:
        g.close()


# --- RDTSC, TSC offsetting and scaling -----------------------------------------------------------

def test_rdtsc_without_exiting_applies_the_tsc_offset() -> None:
    g = Tiny("rdtsc\nmov ebx, edx\nmov ecx, 0x10\nrdmsr\ncpuid")
    try:
        g.vmwrite(F.TSC_OFFSET, 1 << 62)
        assert run_to_cpuid(g) == {X.CPUID: 1}
        assert g.reg("rbx") >> 30 == 1  # EDX:EAX >= 2**62 (RDTSC)
        assert g.reg("rdx") >> 30 == 1  # and RDMSR of IA32_TSC (SDM 26.3)
    finally:
        g.close()


def test_tsc_scaling_multiplies_the_host_tsc() -> None:
    g = Tiny("rdtsc\ncpuid")
    try:
        g.controls(on2=P2.USE_TSC_SCALING)
        g.vmwrite(F.TSC_MULTIPLIER, 1 << 44)  # 1/16
        before = host_tsc()
        run_to_cpuid(g)
        guest = g.reg("rdx") << 32 | g.reg("rax") & 0xFFFF_FFFF
        assert before // 16 <= guest <= host_tsc() // 16
    finally:
        g.close()


def test_rdtscp_needs_enable_rdtscp_and_exits_with_rdtsc_exiting() -> None:
    g = Tiny("rdtscp\ncpuid")
    try:
        g.controls(on=P.RDTSC_EXITING)
        run_to_cpuid(g)
        assert g.engine.exit_counts[X.RDTSCP] == 1
    finally:
        g.close()
    g = Tiny("rdtscp\ncpuid")
    try:
        g.controls(off2=P2.ENABLE_RDTSCP)
        g.vmwrite(F.EXCEPTION_BITMAP, 1 << 6)
        g.run(until=ExitKind.EXCEPTION)
        assert InterruptionInfo.decode(g.vmread(F.VM_EXIT_INTR_INFO)).vector == 6  # #UD, no RDTSCP exit
    finally:
        g.close()


# --- CR0/CR4 guest/host masks and read shadows ---------------------------------------------------

def test_cr0_mask_and_shadow() -> None:
    # CR0 is 0x11 (PE|ET); the VMM owns MP and TS and shows the guest MP=1, TS=0.
    g = Tiny("mov eax, cr0\nmov cr0, eax\nor eax, 8\nmov cr0, eax\nmov ebx, cr0\nsmsw dx\ncpuid")
    try:
        g.vmwrite(F.CR0_GUEST_HOST_MASK, 0xA)
        g.vmwrite(F.CR0_READ_SHADOW, 0x2)
        exits = g.run(until=ExitKind.CPUID)
        assert kinds(exits) == ["cr_access", "cpuid"]  # only the write that changes TS
        assert CrQualification.decode(exits[0].qualification) == CrQualification(0, CrAccessType.MOV_TO_CR, 0)
        state = g.engine.get_state()
        assert state.regs["rax"] == 0x1B and state.regs["rbx"] == 0x1B and state.regs["rdx"] & 0xFFFF == 0x1B
        assert state.cr0 & 8  # the hypervisor completed the write
    finally:
        g.close()


def test_clts_and_lmsw_exit_by_mask_and_shadow() -> None:
    g = Tiny("clts\nmov ax, 0x11\nlmsw ax\ncpuid")
    try:
        g.vmwrite(F.CR0_GUEST_HOST_MASK, 0x9)  # TS and PE
        g.vmwrite(F.CR0_READ_SHADOW, 0x8)  # TS=1, PE=0 as the guest believes
        exits = g.run(until=ExitKind.CPUID)
        assert [CrQualification.decode(e.qualification) for e in exits[:-1]] == [
            CrQualification(0, CrAccessType.CLTS),
            CrQualification(0, CrAccessType.LMSW, lmsw_source=0x11),
        ]
    finally:
        g.close()


def test_cr4_mask() -> None:
    g = Tiny("mov eax, cr4\nmov cr4, eax\nor eax, 0x100\nmov cr4, eax\ncpuid")
    try:
        g.vmwrite(F.CR4_GUEST_HOST_MASK, 0x100)
        g.vmwrite(F.CR4_READ_SHADOW, 0)
        exits = g.run(until=ExitKind.CPUID)
        assert kinds(exits) == ["cr_access", "cpuid"]
        assert CrQualification.decode(exits[0].qualification).cr == 4
    finally:
        g.close()


# --- the exception bitmap ------------------------------------------------------------------------

def test_int3_exits_by_the_exception_bitmap_and_is_reflected() -> None:
    g = Tiny("lidt [0x21000]\nint3\ncpuid\n.org 0x100\nmov ebx, 3\niret")
    try:
        base, limit = install_idt(g, {3: gate32(CODE + 0x100)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(4, "little"))
        g.vmwrite(F.EXCEPTION_BITMAP, 1 << 3)
        exits = g.run(until=ExitKind.CPUID)
        assert kinds(exits) == ["exception", "cpuid"]
        assert g.reasons[0] == X.EXCEPTION_NMI
        assert g.reg("rbx") == 3  # delivered through the IDT after the exit
    finally:
        g.close()


def test_exception_exit_information() -> None:
    g = Tiny("int3\ncpuid")
    try:
        g.vmwrite(F.EXCEPTION_BITMAP, 1 << 3)
        g.run(until=ExitKind.EXCEPTION)
        info = InterruptionInfo.decode(g.vmread(F.VM_EXIT_INTR_INFO))
        assert (info.vector, info.error_code_valid) == (3, False)
        assert info.type is InterruptionType.SOFTWARE_EXCEPTION
        assert g.vmread(F.VM_EXIT_INSTRUCTION_LEN) == 1 and g.vmread(F.GUEST_RIP) == CODE
    finally:
        g.close()


def test_exceptions_not_in_the_bitmap_are_delivered_without_exits() -> None:
    g = Tiny("lidt [0x21000]\nud2\nint 0x30\ncpuid\n.org 0x100\nadd dword ptr [esp], 2\nmov ebx, 6\niret\n"
             ".org 0x140\nmov ecx, 0x30\niret")
    try:
        base, limit = install_idt(g, {6: gate32(CODE + 0x100), 0x30: gate32(CODE + 0x140)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(4, "little"))
        assert run_to_cpuid(g) == {X.CPUID: 1}
        assert (g.reg("rbx"), g.reg("rcx")) == (6, 0x30)
    finally:
        g.close()


@pytest.mark.parametrize("mask,match,exits", [(0, 0, True), (1, 1, False), (2, 0, True)])
def test_page_fault_error_code_mask_and_match(mask, match, exits) -> None:
    # A read of a not-present page: #PF error code 0 (SDM 4.7).
    g = Tiny("mov rax, 0x100000000\nmov rbx, [rax]\ncpuid", bits=64)
    try:
        g.vmwrite(F.EXCEPTION_BITMAP, 1 << 14)
        g.vmwrite(F.PAGE_FAULT_ERROR_CODE_MASK, mask)
        g.vmwrite(F.PAGE_FAULT_ERROR_CODE_MATCH, match)
        ex = g.run(until=ExitKind.EXCEPTION if exits else ExitKind.SHUTDOWN)[-1]
        if exits:  # SDM 26.2: bit 14 set and (error code & mask) == match
            assert ex.qualification == 0x1_0000_0000  # the linear address; CR2 is not yet written
            info = InterruptionInfo.decode(g.vmread(F.VM_EXIT_INTR_INFO))
            assert (info.vector, info.error_code_valid) == (14, True)
            assert g.vmread(F.VM_EXIT_INTR_ERROR_CODE) == 0
        else:  # delivered; with no IDT: #PF -> #GP... -> triple fault
            assert ex.kind is ExitKind.SHUTDOWN
    finally:
        g.close()


def test_page_fault_is_delivered_with_cr2_and_error_code_in_long_mode() -> None:
    g = Tiny("lidt [0x21000]\nmov rax, 0x100000000\nmov [rax], ebx\ncpuid\n"
             ".org 0x100\nmov rcx, cr2\npop rdx\nadd qword ptr [rsp], 2\niretq", bits=64)
    try:
        base, limit = install_idt(g, {14: gate64(CODE + 0x100)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(8, "little"))
        assert run_to_cpuid(g) == {X.CPUID: 1}
        assert g.reg("rcx") == 0x1_0000_0000 and g.reg("rdx") == 0x2  # W/R = 1, P = 0
    finally:
        g.close()


def test_real_mode_interrupt_through_the_ivt() -> None:
    g = Tiny("int 0x21\ncpuid\n.org 0x100\nmov bx, 0x21\niret", bits=16)
    try:
        g.memory.write(0x21 * 4, (0x100).to_bytes(2, "little") + (CODE >> 4).to_bytes(2, "little"))
        assert run_to_cpuid(g) == {X.CPUID: 1}
        assert g.reg("rbx") & 0xFFFF == 0x21
    finally:
        g.close()


def test_triple_fault_is_exit_reason_2() -> None:
    g = Tiny("lidt [0x21000]\nint3")
    try:
        g.memory.write(0x21000, bytes(6))  # an IDT with limit 0
        exits = g.run(until=ExitKind.SHUTDOWN)
        assert kinds(exits) == ["shutdown"] and g.reasons == [X.TRIPLE_FAULT]
        assert g.engine.run().kind is ExitKind.SHUTDOWN  # and it stays shut down
    finally:
        g.close()


# --- EPT ----------------------------------------------------------------------------------------

def ept_with(g: Tiny, page: int, perms: EptPerm) -> EptBuilder:
    host = g.engine.host
    ept = EptBuilder(host, pool=host.allocate(8), pool_size=8 * 4096)
    ept.map(0, 0, page)
    ept.map(page, page, 0x1000, perms)
    ept.map(page + 0x1000, page + 0x1000, g.memory.size - page - 0x1000)
    g.vmwrite(F.EPT_POINTER, ept.eptp)
    return ept


def test_ept_violation_exit_and_resume_after_the_vmm_fixes_it() -> None:
    g = Tiny("mov dword ptr [0x30010], 7\nmov eax, [0x30010]\ncpuid")
    try:
        ept = ept_with(g, 0x30000, EptPerm.READ | EptPerm.EXECUTE)
        exits = g.run(until=ExitKind.EPT_VIOLATION)
        assert g.reasons == [X.EPT_VIOLATION] and exits[-1].addr == 0x30010
        assert EptViolationQualification.decode(exits[-1].qualification) == EptViolationQualification(
            read=False, write=True, fetch=False, readable=True, writable=False, executable=True,
            gla_valid=True, linear_translation=True)
        assert (g.vmread(F.GUEST_PHYSICAL_ADDRESS), g.vmread(F.GUEST_LINEAR_ADDRESS)) == (0x30010, 0x30010)
        assert g.vmread(F.GUEST_RIP) == CODE  # the write did not happen
        leaf = ept_translate(g.engine.host, ept.eptp, 0x30000, EptAccess.READ).refs[-1]
        g.engine.host.write_u64(leaf, g.engine.host.read_u64(leaf) | EptPerm.WRITE)
        g.engine.invept()
        assert run_to_cpuid(g) == {X.EPT_VIOLATION: 1, X.CPUID: 1}
        assert g.reg("rax") == 7
    finally:
        g.close()


def test_ept_execute_permission_is_checked_on_fetch() -> None:
    g = Tiny("jmp 0x30000")
    try:
        ept_with(g, 0x30000, EptPerm.READ | EptPerm.WRITE)
        exits = g.run(until=ExitKind.EPT_VIOLATION)
        q = EptViolationQualification.decode(exits[-1].qualification)
        assert (q.fetch, q.readable, q.writable, q.executable) == (True, True, True, False)
        assert exits[-1].addr == 0x30000
    finally:
        g.close()


def test_ept_misconfiguration_exit() -> None:
    g = Tiny("mov eax, [0x30010]\ncpuid")
    try:
        ept_with(g, 0x30000, EptPerm.WRITE)  # write without read: SDM 29.3.3.1
        exits = g.run(until=ExitKind.EPT_MISCONFIG)
        assert g.reasons == [X.EPT_MISCONFIG] and g.vmread(F.GUEST_PHYSICAL_ADDRESS) == 0x30000
        assert "write permission without read permission" in exits[-1].detail
    finally:
        g.close()


def test_guest_paging_walk_goes_through_ept() -> None:
    # The PML4 lives at 0x1000; forbid reading it in EPT: the walk's first access violates.
    g = Tiny("mov rax, 0x200000\nmov rbx, [rax]\ncpuid", bits=64)
    try:
        g.engine.set_state(g.engine.get_state())  # keep the loaded state; flush translations
        ept_with(g, 0x1000, EptPerm.EXECUTE)
        exits = g.run(until=ExitKind.EPT_VIOLATION)
        q = EptViolationQualification.decode(exits[-1].qualification)
        assert q.gla_valid and not q.linear_translation  # an access to a guest paging structure
        assert exits[-1].addr & ~0xFFF == 0x1000
    finally:
        g.close()


# --- MMIO: EPT violations on guest-physical addresses without RAM ---------------------------------

def test_mmio_read_write_and_read_modify_write() -> None:
    g = Tiny("mov eax, [0xFE000000]\nmov [0xFE000004], eax\nadd dword ptr [0xFE000008], 5\n"
             "movzx ebx, word ptr [0xFE00000C]\ncpuid")
    data = {0xFE000000: b"\x78\x56\x34\x12", 0xFE000008: b"\x10\0\0\0", 0xFE00000C: b"\xcd\xab"}
    try:
        seen = []
        while True:
            ex = g.engine.run()
            if ex.kind is ExitKind.CPUID:
                break
            assert ex.kind is ExitKind.MMIO
            seen.append((ex.addr, ex.size, ex.is_write, ex.data))
            if not ex.is_write:
                g.engine.complete_read(data[ex.addr])
        assert seen == [(0xFE000000, 4, False, b""), (0xFE000004, 4, True, b"\x78\x56\x34\x12"),
                        (0xFE000008, 4, False, b""), (0xFE000008, 4, True, b"\x15\0\0\0"),
                        (0xFE00000C, 2, False, b"")]
        assert (g.reg("rax"), g.reg("rbx")) == (0x1234_5678, 0xABCD)
        assert g.engine.exit_counts[X.EPT_VIOLATION] == 5
    finally:
        g.close()


def test_mmio_through_the_machine_bus() -> None:
    from hvm.boot import ImageFormat
    from hvm.vmm.machine import Machine, MachineConfig
    from tests.test_model_engine_support import assemble

    class Register:
        name = "reg"

        def __init__(self) -> None:
            self.written: list[int] = []

        def read(self, offset: int, size: int) -> int:
            return 0x20 + offset

        def write(self, offset: int, size: int, value: int) -> None:
            self.written.append(value)

    device = Register()
    machine = Machine(MachineConfig(engine="model", mem_size=16 << 20, console=lambda b: None))
    try:
        machine.mmio.register(0xFEB0_0000, 0x1000, device)
        machine.load(assemble("mov eax, [0xFEB00004]\nmov [0xFEB00008], eax\nmov dx, 0xf4\nout dx, eax",
                              64, 0x100000), ImageFormat.LONG)
        result = machine.run(timeout=20)
    finally:
        machine.close()
    assert device.written == [0x24]
    assert result.exit_status == (0x24 << 1) | 1
    assert result.exits["mmio"] == 2


# --- interception is complete: instructions the scan could miss ---------------------------------

def test_jump_into_the_middle_of_an_instruction() -> None:
    # B8 90 0F A2 90 is "mov eax, 0x90A20F90"; at +2 the same bytes are CPUID.
    g = Tiny("start:\nmov eax, 0x90A20F90\ncmp esi, 1\nje done\nmov esi, 1\njmp start + 2\ndone:\nhlt")
    try:
        assert kinds(g.run()) == ["cpuid", "hlt"]
    finally:
        g.close()


@pytest.mark.parametrize("bits", [32, 64])
def test_instruction_across_a_page_boundary(bits) -> None:
    g = Tiny("jmp target\n.org 0xfff\ntarget:\ncpuid\nhlt", bits)  # 0F at 0x10FFF, A2 at 0x11000
    try:
        exits = g.run()
        assert kinds(exits) == ["cpuid", "hlt"]
        assert g.reasons[0] == X.CPUID
    finally:
        g.close()


def test_self_modifying_code_adds_an_exit() -> None:
    g = Tiny("mov esi, 2\nagain:\ncall target\nmov word ptr [target], 0xA20F\ndec esi\njnz again\nhlt\n"
             "target:\nnop\nnop\nret")
    try:
        assert kinds(g.run()) == ["cpuid", "hlt"]  # the second call runs the new CPUID
    finally:
        g.close()


def test_self_modifying_code_removes_an_exit() -> None:
    g = Tiny("mov esi, 2\nagain:\ncall target\nmov word ptr [target], 0x9090\ndec esi\njnz again\nhlt\n"
             "target:\ncpuid\nret")
    try:
        assert kinds(g.run()) == ["cpuid", "hlt"]  # only the first call exits
    finally:
        g.close()


def test_code_written_through_a_second_virtual_mapping() -> None:
    # Map the first 2 MiB again at 512 GiB (PML4 entry 1) and patch code through that alias.
    alias = 1 << 39
    g = Tiny(f"mov esi, 2\nagain:\ncall target\nmov rax, {alias}\nmov word ptr [rax + target], 0xA20F\n"
             "dec esi\njnz again\nhlt\ntarget:\nnop\nnop\nret", bits=64)
    try:
        g.memory.write(0x1008, (0x7000 | 3).to_bytes(8, "little"))  # PML4[1] -> PDPT at 0x7000
        g.memory.write(0x7000, (0x8000 | 3).to_bytes(8, "little"))  # PDPT[0] -> PD at 0x8000
        g.memory.write(0x8000, (0 | 0x83).to_bytes(8, "little"))  # PD[0]: 2 MiB at 0
        assert kinds(g.run()) == ["cpuid", "hlt"]
    finally:
        g.close()


@pytest.mark.parametrize("code,bits,reason", [
    (".byte 0xf3, 0x0f, 0xa2", 32, X.CPUID),  # rep cpuid
    (".byte 0x2e, 0x0f, 0xa2", 32, X.CPUID),  # cs cpuid
    ("mov ecx, 0x174\n.byte 0x48, 0x0f, 0x32", 64, X.MSR_READ),  # REX.W RDMSR
    (".byte 0x66, 0xe5, 0x80", 32, X.IO_INSTRUCTION),  # in ax, 0x80
    (".byte 0x66, 0x67, 0xec", 16, X.IO_INSTRUCTION),  # in al, dx with operand/address-size prefixes
])
def test_prefixed_sensitive_instructions(code, bits, reason) -> None:
    g = Tiny(f"{code}\nhlt", bits)
    try:
        g.controls(off=P.USE_MSR_BITMAPS)
        g.run()
        assert g.reasons[0] == reason
    finally:
        g.close()


_SENSITIVE = [bytes.fromhex(h) for h in (
    "0fa2", "f4", "ec", "ee", "e480", "e680", "6c", "6f", "f390", "0f31", "0f32", "0f30", "0f33",
    "0f01f9", "0f0138", "0f22d8", "0f20d8", "0f23f8", "0f21f8", "0f0110", "0f0118", "0f0100", "0f0108",
    "0f00d0", "0f00d8", "0f08", "0f09", "0f01d1", "0f01c1", "0f01c8", "0f01c9", "0f06", "0f01f0",
    "cc", "cd80", "0fc7f0")]
_PREFIX = [b"", b"\x66", b"\x67", b"\xf3", b"\x2e", b"\x48", b"\x66\x67", b"\x41"]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=64, max_size=400), st.lists(st.tuples(st.integers(0, 399),
       st.sampled_from(_SENSITIVE), st.sampled_from(_PREFIX)), min_size=1, max_size=6))
def test_scan_finds_every_offset_where_a_sensitive_instruction_decodes(noise, plants) -> None:
    page = bytearray(noise)
    for offset, opcode, prefix in plants:
        piece = prefix + opcode
        page[offset % len(page) : offset % len(page) + len(piece)] = piece
    page = bytes(page[: len(noise)])
    starts = candidate_starts(page)
    for offset in range(len(page)):
        for bits in (16, 32, 64):
            if decode(page[offset:], offset, bits) is not None:
                assert offset in starts, (offset, bits, page[offset : offset + 15].hex())


def test_scan_of_random_pages_is_a_superset_of_sensitive_decodes() -> None:
    rng = random.Random(1)
    for _ in range(3):
        page = bytes(rng.getrandbits(8) for _ in range(4096)) if _ else os.urandom(4096)
        starts = candidate_starts(page)
        missed = [o for o in range(4096) for bits in (16, 32, 64)
                  if decode(page[o:], o, bits) is not None and o not in starts]
        assert not missed


def test_ept_violation_during_event_delivery_reports_idt_vectoring() -> None:
    # The stack the #UD handler's frame goes to is read-only in EPT: the push violates.
    g = Tiny("lidt [0x21000]\nmov esp, 0x30100\nud2\ncpuid\n.org 0x100\nadd dword ptr [esp], 2\niret")
    try:
        base, limit = install_idt(g, {6: gate32(CODE + 0x100)})
        g.memory.write(0x21000, limit.to_bytes(2, "little") + base.to_bytes(4, "little"))
        ept = ept_with(g, 0x30000, EptPerm.READ | EptPerm.EXECUTE)
        g.run(until=ExitKind.EPT_VIOLATION)
        vectoring = InterruptionInfo.decode(g.vmread(F.IDT_VECTORING_INFO_FIELD))
        assert (vectoring.valid, vectoring.vector, vectoring.type) == (
            True, 6, InterruptionType.HARDWARE_EXCEPTION)
        leaf = ept_translate(g.engine.host, ept.eptp, 0x30000, EptAccess.READ).refs[-1]
        g.engine.host.write_u64(leaf, g.engine.host.read_u64(leaf) | EptPerm.WRITE)
        g.engine.invept()
        assert run_to_cpuid(g) == {X.EPT_VIOLATION: 1, X.CPUID: 1}  # the #UD was delivered again
    finally:
        g.close()


def test_a_completed_exit_does_not_exempt_later_executions() -> None:
    # Each MOV DR exits; the hypervisor completes it by letting it run once natively.
    g = Tiny("mov esi, 3\nagain:\nmov eax, dr7\ndec esi\njnz again\ncpuid")
    try:
        assert run_to_cpuid(g) == {X.DR_ACCESS: 3, X.CPUID: 1}
    finally:
        g.close()


def test_vmm_moving_rip_after_an_exit_cancels_the_completion() -> None:
    g = Tiny("mov eax, dr7\nmov eax, dr7\ncpuid")
    try:
        g.run(until=ExitKind.DR_ACCESS)
        g.vmwrite(F.GUEST_RIP, CODE + 3)  # the VMM emulated the first MOV DR itself
        assert run_to_cpuid(g) == {X.DR_ACCESS: 2, X.CPUID: 1}
    finally:
        g.close()
