"""x2APIC mode on the model engine: which x2APIC MSR accesses exit, and apictick through MSRs.

Expected values come from outside the model:

* which accesses the processor virtualizes and how: Intel SDM Vol. 3C 30.5 ("virtualize x2APIC
  mode": RDMSR of 800H-8FFH with "APIC-register virtualization" reads the 8 bytes at offset
  (ECX & FFH) << 4 of the virtual-APIC page; WRMSR of 808H is TPR virtualization, of 80BH EOI
  virtualization and of 83FH self-IPI virtualization with "virtual-interrupt delivery"; a non-zero
  EOI value or bits 63:8 set in TPR/SELF IPI is #GP; a SELF IPI with vector bits 7:4 = 0 is an
  APIC-write VM exit as for page offset 3F0H); what the VMM lets through the MSR bitmap is KVM's
  choice (arch/x86/kvm/vmx/vmx.c, vmx_update_msr_bitmap_x2apic: reads of the readable registers but
  the current count, writes of TPR, EOI and SELF IPI); everything else is an MSR exit, basic reason
  31 (RDMSR) or 32 (WRMSR) (SDM Vol. 3C Appendix C);
* the VM-entry check that "virtualize x2APIC mode" needs "virtualize APIC accesses" 0 (SDM 27.2.1.1):
  the controls the VMM switches to must pass it;
* the x2APIC registers themselves: SDM Vol. 3A 11.12 (CPUID.01H:ECX[21], IA32_APIC_BASE.EXTD, the
  64-bit ICR, Table 11-6);
* apictick's console: what it prints on KVM's in-kernel irqchip and on QEMU (observed, and checked
  against both below); its exit counts follow from its source (hvm/guests/src/apictick.s).
"""

from __future__ import annotations

import subprocess

import pytest

from hvm import guests
from hvm.cpu import DescriptorTable
from hvm.engine.model import ModelEngine
from hvm.exits import ExitKind
from hvm.vmm.machine import Machine, MachineConfig
from hvm.vtx.controls import ProcBased2, check_vm_entry_controls
from hvm.vtx.vmcs import VmcsField as F
from tests.conftest import QEMU, needs_kvm, needs_qemu
from tests.test_model_engine_support import CODE, Tiny, entry_state, gate64, install_idt, needs_as

# Into x2APIC mode (SDM 11.12.1: EN and EXTD), software-enable it (SVR, MSR 80FH), IF = 1.
PRELUDE = """
        mov ecx, 0x1B
        rdmsr
        or eax, 0xC00
        wrmsr
        mov ecx, 0x80F
        mov eax, 0x1FF
        xor edx, edx
        wrmsr
        sti
"""
HANDLERS = """
        hlt
ipi:
        inc r9
        push rax
        push rcx
        push rdx
        mov ecx, 0x80B
        xor eax, eax
        xor edx, edx
        wrmsr
        pop rdx
        pop rcx
        pop rax
        iretq
gp:
        add rsp, 8                  # the error code
        add qword ptr [rsp], 2      # past the 2-byte RDMSR/WRMSR
        inc r10
        iretq
"""
PRELUDE_READS, PRELUDE_WRITES = 1, 2  # RDMSR 1BH; WRMSR 1BH and 80FH: exits in both modes


def run_tiny(mode: str, body: str) -> tuple[dict[str, int], dict[str, int], ModelEngine]:
    """Runs PRELUDE + body + HANDLERS on ModelEngine(apic=mode); returns registers, exit counts by reason
    name and the engine (for its VMCS)."""
    tiny = Tiny(PRELUDE + body + HANDLERS, bits=64)
    tiny.engine.close()
    tiny.engine = ModelEngine(tiny.memory, apic=mode)
    ipi = CODE + tiny.code.index(bytes.fromhex("49ffc1"))  # inc r9
    gp = CODE + tiny.code.index(bytes.fromhex("4883c408"))  # add rsp, 8
    base, limit = install_idt(tiny, {0x40: gate64(ipi), 13: gate64(gp)})
    state = entry_state(64)
    state.idt = DescriptorTable(base, limit)
    tiny.engine.set_state(state)
    try:
        assert tiny.run(ExitKind.HLT)[-1].kind is ExitKind.HLT
        regs = tiny.engine.get_state().regs
        counts = tiny.engine.counters()
        proc2 = tiny.engine.vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
        check_vm_entry_controls(tiny.engine.vmcs)  # SDM 27.2.1.1 holds for what the VMM set
    finally:
        tiny.close()
    reasons = {k.removeprefix("exit_reason."): v for k, v in counts.items() if k.startswith("exit_reason.")}
    reasons["MSR_READ"] = reasons.get("MSR_READ", 0) - PRELUDE_READS
    reasons["MSR_WRITE"] = reasons.get("MSR_WRITE", 0) - PRELUDE_WRITES
    regs["proc2"] = proc2
    return regs, {k: v for k, v in reasons.items() if v and k != "HLT"}, tiny.engine


def rdmsr(msr: int) -> str:
    return f"mov ecx, {msr:#x}\n rdmsr\n mov r8, rax\n mov r11, rdx\n"


def wrmsr(msr: int, value: int) -> str:
    low, high = value & 0xFFFF_FFFF, value >> 32
    return f"mov ecx, {msr:#x}\n mov eax, {low:#x}\n mov edx, {high:#x}\n wrmsr\n nop\n"


# (access, exits with apic="apicv", r9 IPIs taken, r10 #GPs (legacy, apicv), r8 read value or None).
# Legacy #GPs are the VMM's x2APIC emulation's (as KVM's kvm_x2apic_msr_write: bits 63:32 set outside the
# ICR, a non-zero EOI); with APICv the virtualized writes #GP as SDM 30.5 says (bits 63:8 of TPR and SELF
# IPI too).
CASES = {
    # Reads: SDM 30.5 with APIC-register virtualization: from the virtual-APIC page, no exit.
    "read version 803H": (rdmsr(0x803), {}, 0, (0, 0), 0x0005_0014),  # KVM's version value
    "read TPR 808H": (wrmsr(0x808, 0x30) + rdmsr(0x808), {}, 0, (0, 0), 0x30),
    "read SVR 80FH": (rdmsr(0x80F), {}, 0, (0, 0), 0x1FF),
    "read LDR 80DH": (rdmsr(0x80D), {}, 0, (0, 0), 1),  # SDM 11.12.10.2: ID 0 -> 1 << 0
    # The current count is not on the page: KVM intercepts its read.
    "read current count 839H": (rdmsr(0x839), {"MSR_READ": 1}, 0, (0, 0), 0),
    # Not an x2APIC register: intercepted, the VMM's APIC answers #GP (SDM 11.12.1.2).
    "read 840H": (rdmsr(0x840), {"MSR_READ": 1}, 0, (1, 1), None),
    # Writes: TPR, EOI, SELF IPI virtualized (30.5); anything else an MSR-write exit.
    "write TPR 808H": (wrmsr(0x808, 0x20), {}, 0, (0, 0), None),
    "write EOI 80BH": (wrmsr(0x80B, 0), {}, 0, (0, 0), None),
    "self IPI 83FH": (wrmsr(0x83F, 0x40), {}, 1, (0, 0), None),
    "self IPI through ICR 830H": (wrmsr(0x830, 0x4_0040), {"MSR_WRITE": 1}, 1, (0, 0), None),
    "write initial count 838H": (wrmsr(0x838, 0), {"MSR_WRITE": 1}, 0, (0, 0), None),
    "write LVT timer 832H": (wrmsr(0x832, 0x1_0020), {"MSR_WRITE": 1}, 0, (0, 0), None),
    # 30.5: #GP without a VM exit.
    "TPR with bits 63:8": (wrmsr(0x808, 0x100), {}, 0, (0, 1), None),
    "EOI with a non-zero value": (wrmsr(0x80B, 1), {}, 0, (1, 1), None),
    "SELF IPI with bits 63:8": (wrmsr(0x83F, 0x1_0000_0040), {}, 0, (1, 1), None),
    # 30.5: vector bits 7:4 = 0: APIC-write VM exit (basic reason 56) as for offset 3F0H, trap-like.
    "SELF IPI with an illegal vector": (wrmsr(0x83F, 0x05), {"APIC_WRITE": 1}, 0, (0, 0), None),
}


@needs_as
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_which_x2apic_accesses_exit(mode: str, name: str) -> None:
    body, apicv_exits, ipis, (gp_legacy, gp_apicv), value = CASES[name]
    regs, exits, _ = run_tiny(mode, body)
    if mode == "legacy":
        # No APIC virtualization: every x2APIC MSR access after the prelude is an MSR exit, the IPI
        # handler's EOI too.
        expected = {"MSR_READ": body.count("rdmsr"), "MSR_WRITE": body.count("wrmsr") + ipis}
        expected = {k: v for k, v in expected.items() if v}
        gps = gp_legacy
    else:
        expected, gps = apicv_exits, gp_apicv
    assert exits == expected
    assert (regs["r9"], regs["r10"]) == (ipis, gps)
    if value is not None:
        assert regs["r8"] == value
    proc2 = regs["proc2"]
    if mode == "apicv":  # KVM's vmx_set_virtual_apic_mode on the switch to x2APIC
        assert proc2 & ProcBased2.VIRTUALIZE_X2APIC_MODE and not proc2 & ProcBased2.VIRTUALIZE_APIC_ACCESSES
    else:
        assert not proc2 & (ProcBased2.VIRTUALIZE_X2APIC_MODE | ProcBased2.VIRTUALIZE_APIC_ACCESSES)


@needs_as
@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_icr_reads_back_as_one_64_bit_register(mode: str) -> None:
    # SDM 11.12.9: the x2APIC ICR is one 64-bit MSR, destination in bits 63:32. A fixed IPI to APIC 5
    # (not this one): the write exits in both modes; the read is virtualized with APICv (30.5: the 8
    # bytes at offset 300H) and must show the destination there too.
    regs, exits, _ = run_tiny(mode, wrmsr(0x830, 5 << 32 | 0x50) + rdmsr(0x830))
    assert (regs["r11"], regs["r8"]) == (5, 0x50)
    assert regs["r9"] == 0
    assert exits == ({"MSR_READ": 1, "MSR_WRITE": 1} if mode == "legacy" else {"MSR_WRITE": 1})


@needs_as
def test_back_to_xapic_restores_the_apic_access_page() -> None:
    # x2APIC -> disabled -> xAPIC (SDM 11.12.5, Figure 11-27): "virtualize APIC accesses" again, every
    # x2APIC MSR intercepted. Through the page then: the version read is virtualized (30.4.2), the SVR
    # write an APIC-write exit (30.4.3.2); an x2APIC MSR read exits and #GPs (not in x2APIC mode).
    body = """
        mov ecx, 0x1B
        rdmsr
        and eax, 0xFFFFF3FF         # EN = 0, EXTD = 0: disabled
        wrmsr
        or eax, 0x800               # EN = 1: xAPIC
        wrmsr
        mov ebx, 0xFEE00000
        mov dword ptr [rbx + 0xF0], 0x1FF
        mov r8d, [rbx + 0x30]
        mov ecx, 0x803
        rdmsr
"""
    regs, exits, _ = run_tiny("apicv", body)
    assert regs["r8"] == 0x0005_0014 and regs["r10"] == 1
    assert exits == {"MSR_READ": 2, "MSR_WRITE": 2, "APIC_WRITE": 1}
    assert regs["proc2"] & ProcBased2.VIRTUALIZE_APIC_ACCESSES
    assert not regs["proc2"] & ProcBased2.VIRTUALIZE_X2APIC_MODE


def test_cpuid_reports_x2apic_with_the_apic_on() -> None:
    from hvm.vmm.memory import GuestMemory

    memory = GuestMemory(2 << 20)
    try:
        for mode, x2apic in (("off", False), ("legacy", True), ("apicv", True)):
            engine = ModelEngine(memory, apic=mode)
            try:
                assert bool(engine.cpuid(1)[2] >> 21 & 1) is x2apic  # CPUID.01H:ECX[21]
            finally:
                engine.close()
    finally:
        memory.close()


# --- apictick x2apic ----------------------------------------------------------------------------------

N_TICKS, N_IPIS = 8, 6


def expected_console() -> str:
    # IA32_APIC_BASE after the switch: base 0xFEE00000, EN (bit 11), EXTD (bit 10), BSP (bit 8).
    return ("apictick: apic base 0xfee00d00 version 0x00050014\n"
            "apictick: tpr 0x50 holds vector 0x40, tpr 0 lets it in: ok\n"
            f"apictick: ticks {N_TICKS} ipis {N_IPIS} spurious 0\n"
            "apictick: done\n")


def run_apictick(mode: str) -> tuple[str, int, dict[str, int]]:
    machine = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None,
                                    engine_options={"apic": mode}))
    try:
        machine.load(guests.image_path("apictick"), append=f"n={N_TICKS} ipis={N_IPIS} x2apic")
        result = machine.run(timeout=60)
    finally:
        machine.close()
    counters = result.engine_counters
    reasons = {k.removeprefix("exit_reason."): v for k, v in counters.items() if k.startswith("exit_reason.")}
    reasons.update({k: v for k, v in counters.items() if k.startswith("apic.x2apic")})
    return result.console.decode(), result.exit_status, reasons


# apictick x2apic's APIC accesses (hvm/guests/src/apictick.s): RDMSR 1BH twice (before and after the
# switch), WRMSR 1BH; RDMSR 803H (version); WRMSR SVR, LINT0, TPR, divide config; the TPR check: WRMSR
# TPR 0x50, ICR (830H), RDMSR IRR (822H), WRMSR TPR 0, the IPI's EOI; per IPI a SELF IPI (83FH) and an
# EOI; WRMSR LVT timer, initial count, RDMSR current count (839H); per tick an EOI, the N-th tick's LVT
# mask, initial count 0. A tick already pending when the N-th masks the timer adds one EOI ("late").
READS = 2 + 1 + 1 + 1
WRITES = 1 + 4 + 3 + 1 + 2 * N_IPIS + 2 + N_TICKS + 1 + 1


def test_apictick_x2apic_legacy_exits_on_every_msr_access() -> None:
    console, status, reasons = run_apictick("legacy")
    assert console == expected_console() and status == 1
    assert reasons["MSR_READ"] == READS
    assert WRITES <= reasons["MSR_WRITE"] <= WRITES + 1
    assert reasons["CPUID"] == 1  # the x2APIC feature check
    assert "EPT_VIOLATION" not in reasons  # the xAPIC page is never touched
    assert reasons["INTERRUPT_WINDOW"] >= N_IPIS // 2  # the odd IPIs are sent with IF = 0


def test_apictick_x2apic_apicv_virtualizes_reads_tpr_eoi_and_self_ipis() -> None:
    console, status, reasons = run_apictick("apicv")
    assert console == expected_console() and status == 1
    # Exit: RDMSR 1BH twice and the current count; WRMSR 1BH, SVR, LINT0, divide config, the ICR, LVT
    # timer, initial count, the LVT mask and initial count 0 - nothing per interrupt.
    assert reasons["MSR_READ"] == 3
    assert reasons["MSR_WRITE"] == 9
    for reason in ("EPT_VIOLATION", "APIC_ACCESS", "APIC_WRITE", "INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT",
                   "EOI_INDUCED"):
        assert reason not in reasons, reason
    # Virtualized: RDMSR 803H, 822H; WRMSR TPR x3, M SELF IPIs, the EOIs (1 + M + N, + a late tick's).
    assert reasons["apic.x2apic_virtualized_reads"] == 2
    virtualized = 3 + N_IPIS + 1 + N_IPIS + N_TICKS
    assert virtualized <= reasons["apic.x2apic_virtualized_writes"] <= virtualized + 1


@needs_kvm
def test_apictick_x2apic_on_kvm_prints_the_same() -> None:
    outputs = {}
    for irqchip in ("kernel", "user"):
        machine = Machine(MachineConfig(engine="kvm", mem_size=64 << 20, console=lambda b: None,
                                        engine_options={"irqchip": irqchip}))
        try:
            machine.load(guests.image_path("apictick"), append=f"n={N_TICKS} ipis={N_IPIS} x2apic")
            result = machine.run(timeout=60)
        finally:
            machine.close()
        outputs[irqchip] = (result.console.decode(), result.exit_status)
    assert outputs["kernel"] == (expected_console(), 1)
    # Without an in-kernel irqchip CPUID has no x2APIC, and apictick says so (isa-debug-exit value 1).
    assert outputs["user"] == ("apictick: no x2APIC (CPUID.01H:ECX[21] is 0)\n", 3)


@needs_kvm
@needs_qemu
def test_apictick_x2apic_on_qemu_prints_the_same() -> None:
    proc = subprocess.run(
        [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64",
         "-kernel", str(guests.image_path("apictick")), "-append", f"n={N_TICKS} ipis={N_IPIS} x2apic",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot"],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.stdout.decode().replace("\r", "").endswith(expected_console())
    assert proc.returncode == 1
