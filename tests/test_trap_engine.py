"""The trap engine: bundled guests run to the same console as on KVM (and the VT-x model), traps are
what the SDM says they are, and the shadow structures behave as the classic design requires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as R

from hvm.cpu import CR0_PG, EFER_LMA, EFER_LME
from hvm.engine.trap import TrapCostModel, TrapEngine
from hvm.engine.trap.cost import walk
from hvm.engine.trap.shadow import REAL_GDT_BASE, REAL_IDT_BASE, shadow_descriptor
from hvm.errors import EXIT_GUEST_CRASH, EXIT_TIMEOUT
from hvm.vmm.machine import Machine, MachineConfig
from tests.conftest import needs_kvm

ROOT = Path(__file__).resolve().parent.parent
MEM = 64 << 20


def run(engine: str, guest_path, append: str = "", timeout: float = 60):
    machine = Machine(MachineConfig(engine=engine, mem_size=MEM, console=lambda b: None))
    try:
        machine.load(guest_path, append=append)
        result = machine.run(timeout=timeout)
        state = machine.engine.get_state()
    finally:
        machine.close()
    return result, state


def model_engine_missing() -> str | None:
    try:
        from hvm.engine.model import ModelEngine  # noqa: F401
    except ImportError as exc:
        return f"the VT-x model engine is not importable here: {exc}"
    return None


needs_model = pytest.mark.skipif(model_engine_missing() is not None, reason=str(model_engine_missing()))


# --- guests run as on the other engines ------------------------------------------------------------


@needs_kvm
@pytest.mark.parametrize("name", ["trapkern", "hello"])
def test_guest_console_is_the_same_as_on_kvm(guest, name) -> None:
    trap, _ = run("trap", guest(name))
    kvm, _ = run("kvm", guest(name))
    assert trap.exit_status == kvm.exit_status == 1  # isa-debug-exit value 0
    assert trap.console == kvm.console


@needs_model
def test_trapkern_with_a_software_interrupt_is_the_same_as_on_the_model(guest) -> None:
    # `swint` adds int 0x30 + IRETQ, which KVM's emulator cannot run at CPL 0 on a KVM-on-PVM host.
    trap, _ = run("trap", guest("trapkern"), "swint")
    model, _ = run("model", guest("trapkern"), "swint")
    assert trap.console == model.console
    assert b"int 0x30: handled\niretq from int 0x30\n" in trap.console


def test_trapkern_output_and_what_trapped(guest) -> None:
    result, state = run("trap", guest("trapkern"))
    out = result.console.decode()
    assert result.exit_status == 1, out
    # values read back through privileged instructions, all emulated against the virtual CPU
    assert "trapkern: protected mode, CR0=0x00000011\n" in out
    assert "cli: IF=0, sti: IF=1\n" in out  # PUSHF shows the virtual IF
    assert "long mode: EFER=0x00000500 CR0=0x80000011\n" in out  # LME|LMA, activated by MOV to CR0.PG
    assert "wrmsr/rdmsr: SYSENTER_ESP=0x00c0ffee\n" in out
    assert "remapped, invlpg: 0x22222222, after CR3 reload: 0x22222222\n" in out
    assert "#UD: IF in handler=0, IF in frame=1\niretq: IF=1\n" in out
    assert out.endswith("trapkern: done\n")
    counters = result.engine_counters
    for what in ("cli", "sti", "mov to cr0", "mov to cr3", "mov to cr4", "rdmsr", "wrmsr", "lgdt", "lidt",
                 "invlpg", "iretq", "mov ss", "in", "out", "#UD(guest)", "#DE"):
        assert counters.get(f"trap.{what}", 0) >= 1, what
    assert counters["trap.iretq"] == 2  # one per exception
    # shadow paging: pages filled on demand, the PTE write caught, CR3 loads select a shadow root
    assert counters["shadow_fills"] > 0
    assert counters["shadow_protected_writes"] >= 1
    assert counters["shadow_invlpg"] == 1
    assert counters["shadow_cr3_switches"] >= 2  # trapkern loads CR3 twice (and turns paging on)
    assert counters["modelled_overhead_cycles"] == counters["traps"] * TrapCostModel().per_trap
    # the ledger sees the shared exit vocabulary
    for kind in ("io", "cr_access", "descriptor_table", "invlpg", "exception"):
        assert result.exits.get(kind, 0) >= 1, kind
    # get_state() is the guest's view: virtual control registers, its own selectors
    assert state.cr0 & CR0_PG and state.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert state.cs.selector == 0x18 and state.cs.dpl == 0


def test_triple_fault_ends_the_run(guest) -> None:
    result, _ = run("trap", guest("triple"))
    assert result.exit_status == EXIT_GUEST_CRASH
    assert "triple fault" in result.reason


def test_timeout_stops_a_guest_that_never_traps(guest) -> None:
    result, _ = run("trap", guest("forever"), timeout=0.5)
    assert result.exit_status == EXIT_TIMEOUT
    assert result.console == b"looping\n"


def test_a_tight_loop_runs_without_traps(guest) -> None:
    result, _ = run("trap", guest("spin"), "n=2000000")
    assert result.console.endswith(b"spin done\n")
    assert result.engine_counters["trap.in"] + result.engine_counters["trap.out"] < 100  # only the console


# --- the real machine under the guest --------------------------------------------------------------


def test_the_guest_kernel_runs_at_cpl3_with_its_tables_relocated(guest) -> None:
    machine = Machine(MachineConfig(engine="trap", mem_size=MEM, console=lambda b: None))
    try:
        machine.load(guest("redpill"))
        engine: TrapEngine = machine.engine
        real = engine.cpu.store()
        virtual = engine.get_state()
    finally:
        machine.close()
    assert real.ss.dpl == 3 and real.cs.selector & 3 == 3  # ring deprivileging
    assert virtual.cs.selector & 3 == 0 and virtual.cs.dpl == 0
    assert real.gdt.base == REAL_GDT_BASE and real.idt.base == REAL_IDT_BASE
    assert virtual.gdt.base != REAL_GDT_BASE  # the guest's own GDTR is virtual


def test_shadow_descriptors_are_dpl3_and_system_ones_absent() -> None:
    code0 = 0x00CF9A000000FFFF
    assert shadow_descriptor(code0) >> 45 & 3 == 3
    assert shadow_descriptor(code0) & ~(3 << 45) == code0
    tss = 0x00008B000000FFFF  # a busy TSS (S = 0)
    assert not shadow_descriptor(tss) >> 47 & 1


def test_unicorn_performs_no_io_permission_check() -> None:
    """Why the engine hooks IN/OUT: SDM Vol. 1 19.5 says OUT at CPL 3 > IOPL with no I/O bitmap is a
    #GP; Unicorn 2.1.4 runs it (gen_check_io: 'allow all I/O instructions')."""
    from hvm.cpu import CpuState, Segment
    from hvm.engine.model.cpu import UnicornCpu

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\xee")  # out dx, al
    cpu = UnicornCpu(uc)
    state = CpuState()
    flat = {"base": 0, "limit": 0xFFFF_FFFF, "s": 1, "dpl": 3, "present": 1, "db": 1, "g": 1}
    state.cs = Segment(selector=0x1B, type=0xB, **flat)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment(selector=0x23, type=0x3, **flat))
    state.cr0, state.rip, state.rflags = 0x11, 0x1000, 2
    cpu.load(state)
    seen: list = []
    uc.hook_add(UC_HOOK_INTR, lambda uc, n, _: (seen.append(n), uc.emu_stop()))
    on_out = lambda uc, port, size, value, _: seen.append("out")  # noqa: E731
    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, R.UC_X86_INS_OUT)
    uc.emu_start(0x1000, 0x1001)
    assert seen == ["out"]  # no #GP (vector 13) from the emulated CPU


# --- the walk-through and its costs ----------------------------------------------------------------


def test_a_trap_is_six_steps_whose_cycles_add_up() -> None:
    cost = TrapCostModel()
    steps = walk(cost, guest="g", fault="#GP(0): x", decoded="d", effect="e", resume="r")
    assert [s.number for s in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[1].name == "#GP"
    assert sum(s.cycles for s in steps) == cost.per_trap == cost.fault_to_handler + cost.handler + cost.resume


def hvm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvm", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_trace_shows_the_chapters_cli_walk_through() -> None:
    proc = hvm_cli("run", "--engine", "trap", "--guest", "trapkern", "--trace")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trap ") and line.endswith(": cli"))
    block = lines[start + 1 : start + 8]
    expected = [
        ("1. guest", "executes cli at 0x"),
        ("2. #GP", "#GP(0): CPL 3 > IOPL 0"),
        ("3. hypervisor", "trap handler entered"),
        ("4. decode", "capstone: cli (1 byte)"),
        ("5. emulate", "IF_virt <- 0"),
        ("6. resume", "RIP 0x"),
    ]
    for line, (step, text) in zip(block, expected, strict=False):
        assert line.split()[0] + " " + line.split()[1] == step, line
        assert text in line and "cycles" in line, line
    assert "guest resumes" in block[5]
    assert block[6].split()[0] == "total" and f"{TrapCostModel().per_trap:,} cycles" in block[6]
    assert proc.stdout.endswith("trapkern: done\n")  # the trace goes to stderr, the console to stdout


def test_trace_needs_the_trap_engine() -> None:
    proc = hvm_cli("run", "--engine", "model", "--guest", "hello", "--trace")
    assert proc.returncode == 2
    assert "--engine trap" in proc.stderr


# --- 32-bit paging (non-PAE, 4-KiB and 4-MiB pages), INT n and IRET in 32-bit protected mode -------

_PAGING32 = r"""
        .include "lib.inc"
        .text
main:
        call    serial_init
        mov     eax, OFFSET handler             # IDT[0x30] and IDT[6]: 32-bit interrupt gates, DPL 0
        mov     edi, OFFSET idt + 0x30 * 8
        call    gate
        mov     edi, OFFSET idt + 6 * 8
        call    gate
        lidt    [idtr]
        {tables}
        mov     eax, OFFSET pd
        mov     cr3, eax
        mov     eax, cr0
        or      eax, 0x80000000
        mov     cr0, eax
        int     0x30
        nop
        ud2
        mov     esi, OFFSET done
        call    puts
        xor     eax, eax
        ret
gate:
        mov     [edi], ax
        mov     word ptr [edi + 2], CODE_SEL
        mov     word ptr [edi + 4], 0x8E00
        push    eax
        shr     eax, 16
        mov     [edi + 6], ax
        pop     eax
        ret
handler:                                        # int 0x30 returns past itself; #UD past the ud2
        mov     esi, OFFSET hit
        call    puts
        mov     ebx, [esp]
        cmp     word ptr [ebx], 0x0B0F
        jne     1f
        add     dword ptr [esp], 2
1:
        iret
        .section .rodata
hit:    .asciz "handler\n"
done:   .asciz "paging32 done\n"
        .data
        .balign 8
idt:    .skip 256 * 8
idtr:   .word 256 * 8 - 1
        .long idt
        .bss
        .balign 4096
pd:     .skip 4096
pt:     .skip 4096
"""
_PT_4K = """mov     edi, OFFSET pt
        mov     eax, 3
        mov     ecx, 1024
9:      mov     [edi], eax
        add     eax, 0x1000
        add     edi, 4
        dec     ecx
        jnz     9b
        mov     dword ptr [pd], OFFSET pt + 3"""
_PD_4M = """mov     dword ptr [pd], 0x83
        mov     eax, cr4
        or      eax, 0x10
        mov     cr4, eax"""


@pytest.mark.parametrize("tables", [_PT_4K, _PD_4M], ids=["4k-pages", "4m-pages"])
def test_32bit_paging_int_and_iret(tmp_path, tables) -> None:
    import shutil

    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (binutils) not installed")
    from hvm.guests import SRC_DIR

    src, obj, elf = tmp_path / "p.s", tmp_path / "p.o", tmp_path / "p.elf"
    src.write_text(_PAGING32.replace("{tables}", tables))
    subprocess.run(["as", "--32", "-I", str(SRC_DIR), "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-n", "-z", "noexecstack", "-T", str(SRC_DIR / "multiboot.ld"),
                    "-o", str(elf), str(obj)], check=True)
    result, state = run("trap", elf)
    assert result.console == b"handler\nhandler\npaging32 done\n"
    assert result.engine_counters["trap.iretd"] == 2 and result.engine_counters["trap.int 0x30"] == 1
    assert result.engine_counters["shadow_fills"] > 0
    assert state.cr0 & CR0_PG and not state.efer & EFER_LMA  # 32-bit paging, legacy mode for the guest
