"""The model engine's local APIC: the apictick guest with apic=off|legacy|apicv, and x2APIC by MSRs.

Expected values come from outside the model: the console lines are what apictick prints on KVM's
in-kernel irqchip and on QEMU (observed: base 0xfee00900, version 0x00050014), and the exit
counts follow from the guest's own APIC accesses and the SDM's rules for them: without APIC
virtualization every access to the (EPT-unmapped) APIC page is an EPT violation (Vol. 3C
29.3.3); with it, reads outside the virtualized registers are APIC-access exits (30.4.2: the
current count 390H is not among them) and writes other than TPR, EOI and a self-IPI through the
ICR are trap-like APIC-write exits (30.4.3.2).
"""

from __future__ import annotations

import subprocess

import pytest

from hvm.boot import ImageFormat
from hvm.cpu import DescriptorTable
from hvm.engine import create_engine
from hvm.engine.model import ModelEngine
from hvm.errors import EXIT_TIMEOUT, EngineUnavailable
from hvm.exits import ExitKind
from hvm.vmm.machine import Machine, MachineConfig
from hvm.vmm.memory import GuestMemory
from tests.conftest import QEMU, needs_kvm, needs_qemu
from tests.test_model_engine_support import CODE, Tiny, assemble, entry_state, gate64, install_idt, needs_as

N_TICKS, N_IPIS = 8, 6


def run_apictick(guest, mode: str, append: str = "") -> tuple[str, int, dict[str, int]]:
    options = {} if mode == "default" else {"apic": mode}
    machine = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None,
                                    engine_options=options))
    try:
        machine.load(guest("apictick"), append=f"n={N_TICKS} ipis={N_IPIS} {append}")
        result = machine.run(timeout=60)
    finally:
        machine.close()
    counters = result.engine_counters
    reasons = {k.removeprefix("exit_reason."): v for k, v in counters.items() if k.startswith("exit_reason.")}
    return result.console.decode(), result.exit_status, reasons


def expected_console() -> str:
    return ("apictick: apic base 0xfee00900 version 0x00050014\n"
            "apictick: tpr 0x50 holds vector 0x40, tpr 0 lets it in: ok\n"
            f"apictick: ticks {N_TICKS} ipis {N_IPIS} spurious 0\n"
            "apictick: done\n")


# The guest's APIC page accesses (see hvm/guests/src/apictick.s): version read, SVR, LINT0, TPR,
# divide config; the TPR check (TPR, ICR, IRR read, TPR, EOI); per IPI an ICR write and an EOI;
# LVT timer, initial count, current-count read; per tick an EOI; the mask at the last tick; count 0.
APIC_ACCESSES = 5 + 5 + 2 * N_IPIS + 3 + N_TICKS + 1 + 1


@pytest.mark.parametrize("mode", ["off", "default"])
def test_without_an_apic_the_guest_says_so(guest, mode):
    console, status, reasons = run_apictick(guest, mode)
    assert "the APIC is not at 0xfee00000" in console
    assert status == 3  # isa-debug-exit value 1: (1 << 1) | 1
    assert "EXTERNAL_INTERRUPT" not in reasons


@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_apictick_runs(guest, mode):
    console, status, _ = run_apictick(guest, mode)
    assert console == expected_console()
    assert status == 1


@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_hlt_wakes_on_the_timer(guest, mode):
    console, status, reasons = run_apictick(guest, mode, "hlt")
    assert console == expected_console()
    assert reasons.get("HLT", 0) >= 1


def test_legacy_exits(guest):
    _, _, reasons = run_apictick(guest, "legacy")
    # Every APIC page access exits; a tick already pending when the last one masks the timer adds
    # one more EOI (the guest acknowledges it without counting it).
    assert APIC_ACCESSES <= reasons["EPT_VIOLATION"] <= APIC_ACCESSES + 1
    assert reasons["MSR_READ"] == 1  # RDMSR IA32_APIC_BASE
    # The odd IPIs are sent with IF = 0: each waits for the window STI opens (SDM 26.7.5).
    assert reasons["INTERRUPT_WINDOW"] >= N_IPIS // 2
    assert "APIC_ACCESS" not in reasons and "APIC_WRITE" not in reasons


def test_apicv_takes_fewer_exits_than_legacy(guest):
    _, _, legacy = run_apictick(guest, "legacy")
    _, _, apicv = run_apictick(guest, "apicv")
    # SDM 30.4.3.2: SVR, LINT0, divide config, LVT timer (twice) and initial count (twice) are
    # APIC-write exits; 30.4.2: the current-count read is an APIC-access exit; nothing else exits.
    assert apicv.get("APIC_WRITE") == 7
    assert apicv.get("APIC_ACCESS") == 1
    for reason in ("EPT_VIOLATION", "INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT", "EOI_INDUCED"):
        assert reason not in apicv, reason
    apic_exits = ("EPT_VIOLATION", "INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT", "APIC_ACCESS", "APIC_WRITE")
    assert sum(apicv.get(r, 0) for r in apic_exits) * 3 < sum(legacy.get(r, 0) for r in apic_exits)
    assert apicv["IO_INSTRUCTION"] == legacy["IO_INSTRUCTION"]  # the same console output


def test_engine_option_and_capabilities():
    memory = GuestMemory(2 << 20)
    try:
        with pytest.raises(EngineUnavailable, match="apic option is one of off, legacy, apicv"):
            create_engine("model", memory, {"apic": "x2"})
        for mode, injection, apicv in (("off", False, False), ("legacy", True, False), ("apicv", True, True)):
            engine = create_engine("model", memory, {"apic": mode})
            caps = engine.capabilities()
            engine.close()
            assert (caps["interrupt_injection"], caps["apicv"]) == (injection, apicv)
    finally:
        memory.close()


# --- x2APIC through MSRs (SDM 11.12) on a tiny 64-bit guest ----------------------------------------

X2APIC_SOURCE = """
        mov ecx, 0x1B
        rdmsr
        or eax, 0xC00               # EN | EXTD: x2APIC mode (SDM 11.12.1)
        wrmsr
        mov ecx, 0x803              # version
        rdmsr
        mov r8, rax
        mov ecx, 0x80F              # SVR: software enable, spurious vector 0xFF
        mov eax, 0x1FF
        xor edx, edx
        wrmsr
        sti
        mov ecx, 0x83F              # SELF IPI, vector 0x40 (SDM 11.12.11)
        mov eax, 0x40
        wrmsr
        nop
        mov ecx, 0x80B              # EOI with a non-zero value: #GP (Table 11-6)
        mov eax, 1
        wrmsr
        mov ecx, 0x802              # x2APIC ID
        rdmsr
        mov r11, rax
        hlt
ipi:
        inc r9
        mov ecx, 0x80B
        xor eax, eax
        xor edx, edx
        wrmsr
        iretq
gp:
        add rsp, 8                  # the error code
        add qword ptr [rsp], 2      # past the 2-byte WRMSR
        inc r10
        iretq
"""


@needs_as
@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_x2apic_msrs(mode):
    tiny = Tiny(X2APIC_SOURCE, bits=64)
    tiny.engine.close()
    tiny.engine = ModelEngine(tiny.memory, apic=mode)
    code = tiny.code
    ipi = CODE + code.index(bytes.fromhex("49ffc1"))  # inc r9
    gp = CODE + code.index(bytes.fromhex("4883c408"))  # add rsp, 8
    base, limit = install_idt(tiny, {0x40: gate64(ipi), 13: gate64(gp)})
    state = entry_state(64)
    state.idt = DescriptorTable(base, limit)
    tiny.engine.set_state(state)
    try:
        exits = tiny.run(ExitKind.HLT)
        assert exits[-1].kind is ExitKind.HLT
        regs = tiny.engine.get_state().regs
        assert regs["r8"] == 0x0005_0014  # the version, as KVM reports it
        assert regs["r9"] == 1  # the self-IPI arrived once
        assert regs["r10"] == 1  # one #GP
        assert regs["r11"] == 0  # x2APIC ID of the only vCPU
        counts = tiny.engine.counters()
        if mode == "legacy":
            # Every x2APIC MSR access exits: RDMSR 1BH, 803H, 802H; WRMSR 1BH, 80FH, 83FH, 80BH (#GP),
            # 80BH in the handler.
            assert counts["exit_reason.MSR_READ"] == 3
            assert counts["exit_reason.MSR_WRITE"] == 5
        else:
            # "virtualize x2APIC mode" after the switch (SDM Vol. 3C 30.5): RDMSR 803H and 802H read the
            # virtual-APIC page (APIC-register virtualization); WRMSR 83FH is self-IPI virtualization,
            # 80BH EOI virtualization, and 80BH with a non-zero value a #GP without an exit. What exits:
            # RDMSR and WRMSR of IA32_APIC_BASE, WRMSR 80FH (SVR is not virtualized).
            assert counts["exit_reason.MSR_READ"] == 1
            assert counts["exit_reason.MSR_WRITE"] == 2
            assert counts["apic.x2apic_virtualized_reads"] == 2
            assert counts["apic.x2apic_virtualized_writes"] == 2
    finally:
        tiny.close()


# --- CR8, the TPR in 64-bit mode (SDM Vol. 3A 11.8.6; Vol. 3C 30.3) ---------------------------------

CR8_SOURCE = """
        mov ebx, 0xFEE00000
        mov dword ptr [rbx + 0xF0], 0x1FF   # SVR: software enable
        sti
        mov eax, 5
        mov cr8, rax                        # TPR = 0x50
        mov rsi, cr8
        mov r12d, [rbx + 0x80]              # the TPR as the APIC page shows it
        mov dword ptr [rbx + 0x300], 0x40040    # self-IPI 0x40: class 4, held by TPR class 5
        nop
        mov r13, r9                         # 0: not delivered yet
        xor eax, eax
        mov cr8, rax                        # TPR = 0: now it is
        nop
        hlt
ipi:
        inc r9
        mov dword ptr [rbx + 0xB0], 0
        iretq
"""


@needs_as
@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_cr8_is_the_tpr(mode):
    tiny = Tiny(CR8_SOURCE, bits=64)
    tiny.engine.close()
    tiny.engine = ModelEngine(tiny.memory, apic=mode)
    ipi = CODE + tiny.code.index(bytes.fromhex("49ffc1"))  # inc r9
    base, limit = install_idt(tiny, {0x40: gate64(ipi)})
    state = entry_state(64)
    state.idt = DescriptorTable(base, limit)
    tiny.engine.set_state(state)
    try:
        assert tiny.run(ExitKind.HLT)[-1].kind is ExitKind.HLT
        regs = tiny.engine.get_state().regs
        assert regs["rsi"] == 5  # MOV from CR8 reads TPR[7:4]
        assert regs["r12"] == 0x50  # MOV to CR8 sets TPR[7:4], TPR[3:0] = 0
        assert regs["r13"] == 0  # held while TPR class 5 >= vector class 4 (SDM 11.8.3.1)
        assert regs["r9"] == 1  # let in by the second MOV to CR8
        cr_exits = tiny.engine.counters().get("exit_reason.CR_ACCESS", 0)
        # legacy: CR8-load/-store exiting; apicv: virtualized through VTPR, no exit
        assert cr_exits == (3 if mode == "legacy" else 0)
    finally:
        tiny.close()


# --- a misbehaving guest: an interrupt storm -------------------------------------------------------

STORM_SOURCE = """
        lea rax, [rip + handler]
        lea rdi, [rip + idt]
        mov [rdi + 0x20 * 16], ax
        mov word ptr [rdi + 0x20 * 16 + 2], 0x18
        mov word ptr [rdi + 0x20 * 16 + 4], 0x8E00
        shr rax, 16
        mov [rdi + 0x20 * 16 + 6], ax
        lidt [rip + idtr]
        mov ebx, 0xFEE00000
        mov dword ptr [rbx + 0xF0], 0x1FF
        mov dword ptr [rbx + 0x3E0], 0xB        # divide by 1
        mov dword ptr [rbx + 0x320], 0x20020    # periodic, vector 0x20
        mov dword ptr [rbx + 0x380], 1          # one bus cycle: 1 ns
        sti
1:      jmp 1b
handler:
        mov dword ptr [rbx + 0xB0], 0
        iretq
        .balign 16
idtr:   .word 4095
        .quad idt
        .balign 16
idt:    .fill 4096, 1, 0
"""


@needs_as
@pytest.mark.parametrize("mode", ["legacy", "apicv"])
def test_a_timer_storm_is_survived(mode):
    # A 1-ns periodic timer: the guest never gets past its handler, the VMM still ends the run.
    machine = Machine(MachineConfig(engine="model", mem_size=16 << 20, console=lambda b: None,
                                    engine_options={"apic": mode}))
    try:
        machine.load(assemble(STORM_SOURCE, 64, 0x100000), ImageFormat.LONG)
        result = machine.run(timeout=1)
    finally:
        machine.close()
    assert (result.exit_status, result.reason) == (EXIT_TIMEOUT, "timeout")
    assert result.engine_counters["apic.lapic_timer"] > 1000


# --- the same guest on KVM's in-kernel irqchip and on QEMU -----------------------------------------


@needs_kvm
def test_apictick_on_kvm_prints_the_same(guest):
    machine = Machine(MachineConfig(engine="kvm", mem_size=64 << 20, console=lambda b: None))
    try:
        machine.load(guest("apictick"), append=f"n={N_TICKS} ipis={N_IPIS}")
        result = machine.run(timeout=60)
    finally:
        machine.close()
    assert result.console.decode() == expected_console()
    assert result.exit_status == 1


@needs_kvm
@needs_qemu
def test_apictick_on_qemu_prints_the_same(guest):
    proc = subprocess.run(
        [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64",
         "-kernel", str(guest("apictick")), "-append", f"n={N_TICKS} ipis={N_IPIS}",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot"],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.stdout.decode().replace("\r", "").endswith(expected_console())
    assert proc.returncode == 1


def test_cli_engine_option():
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    hvm = [sys.executable, "-m", "hvm", "run", "--engine", "model", "--guest", "apictick",
           "--append", f"n={N_TICKS} ipis={N_IPIS}"]
    proc = subprocess.run([*hvm, "--engine-option", "apic=apicv", "--json", "-"], capture_output=True,
                          cwd=root, timeout=120, stdin=subprocess.DEVNULL)
    result = json.loads(proc.stdout)
    assert result["console"] == expected_console()
    assert result["engine_counters"]["exit_reason.APIC_WRITE"] == 7
    bad = subprocess.run([*hvm, "--engine-option", "apic=x2"], capture_output=True, cwd=root, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        "hvm: the model engine's apic option is one of off, legacy, apicv, not 'x2'"]
