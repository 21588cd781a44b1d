"""The model engine end to end: bundled guests as on KVM, errors, timeouts, engine selection, costs."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hvm.boot import ImageFormat
from hvm.engine import create_engine, resolve_engine_name
from hvm.engine.kvm import kvm_usable
from hvm.engine.model import CostModel, ModelEngine
from hvm.engine.model.cost import SPLITX_DIRECT_CYCLES
from hvm.exits import ExitKind
from hvm.vmm.machine import Machine, MachineConfig
from hvm.vmm.memory import GuestMemory
from hvm.vtx.exit_reasons import EXIT_REASON_FAILED_VMENTRY, ExitReason
from tests.conftest import needs_kvm
from tests.test_model_engine_support import F, Tiny, assemble, kinds, needs_as

ROOT = Path(__file__).resolve().parent.parent

# name -> (image format, command-line extra); what every bundled guest is run with
GUESTS = {
    "hello": (ImageFormat.AUTO, ""),
    "outloop": (ImageFormat.AUTO, "n=300"),
    "spin": (ImageFormat.AUTO, "n=200000"),
    "triple": (ImageFormat.AUTO, ""),
    "realmode": (ImageFormat.REAL, ""),
    "longmode": (ImageFormat.LONG, ""),
}


def hvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvm", *args], capture_output=True, cwd=ROOT,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_guest(engine: str, name: str, guest) -> tuple[bytes, int, dict[str, int]]:
    fmt, append = GUESTS[name]
    machine = Machine(MachineConfig(engine=engine, mem_size=64 << 20, console=lambda b: None))
    try:
        machine.load(guest(name), fmt, append)
        result = machine.run(timeout=60)
    finally:
        machine.close()
    return result.console, result.exit_status, result.exits


# --- the bundled guests ----------------------------------------------------------------------

EXPECTED = {
    "hello": (b"bye\n", 1),
    "outloop": (b"outloop done 300\n", 1),
    "spin": (b"spin done\n", 1),
    "triple": (b"triple fault next\n", 3),
    "realmode": (b"real mode ok\n", 1),
    "longmode": (b"long mode ok\n", 1),
}


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_bundled_guest_runs_on_the_model(name: str, guest) -> None:
    console, status, _ = run_guest("model", name, guest)
    tail, expected_status = EXPECTED[name]
    assert console.endswith(tail)
    assert status == expected_status


@needs_kvm
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_bundled_guest_output_and_status_match_kvm(name: str, guest) -> None:
    model = run_guest("model", name, guest)
    kvm = run_guest("kvm", name, guest)
    assert model[0] == kvm[0]  # console text, byte for byte (CPUID identity included)
    assert model[1] == kvm[1]
    # The VMM sees the same I/O: exits whose handling produces the console agree in number.
    assert model[2].get("io") == kvm[2].get("io")


@needs_kvm
@pytest.mark.parametrize("name", ["hello", "triple"])
def test_cli_run_matches_kvm(name: str, guest) -> None:
    model = hvm("run", "--guest", name, "--engine", "model")
    kvm = hvm("run", "--guest", name, "--engine", "kvm")
    assert (model.returncode, model.stdout) == (kvm.returncode, kvm.stdout)
    assert model.stderr == kvm.stderr  # the crash line names the same state


def test_cli_model_engine_runs_hello() -> None:
    proc = hvm("run", "--engine", "model")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(b"Hello from hvm guest!\n") and proc.stdout.endswith(b"bye\n")
    assert proc.stderr == b""


# --- bad guest behaviour: one line, status 3, never a traceback --------------------------------

def test_triple_fault_is_a_shutdown_exit_and_status_3() -> None:
    proc = hvm("run", "--guest", "triple", "--engine", "model")
    assert proc.returncode == 3
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvm: guest crashed: triple fault (")
    assert "exit kind shutdown" in lines[0]


@needs_as
def test_jump_into_unmapped_memory_is_an_internal_error(tmp_path: Path) -> None:
    image = tmp_path / "jump.bin"
    image.write_bytes(assemble("mov rax, 0x80000000\njmp rax", 64, 0x100000))
    proc = hvm("run", str(image), "--format", "long", "--engine", "model", "--mem", "64M")
    assert proc.returncode == 3
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and "no RAM" in lines[0] and "exit kind internal_error" in lines[0]
    assert "Traceback" not in proc.stderr.decode()


@needs_as
def test_jump_into_unmapped_memory_exit() -> None:
    g = Tiny("mov eax, 0x3000000\njmp eax")  # 48 MiB, past the 4-MiB guest's RAM
    try:
        exits = g.run()
        assert kinds(exits) == ["internal_error"]
        assert exits[-1].addr == 0x300_0000
        assert g.reasons == [ExitReason.EPT_VIOLATION]  # on VT-x: an EPT violation on the fetch
    finally:
        g.close()


@needs_as
def test_invalid_guest_state_fails_vm_entry() -> None:
    g = Tiny("hlt")
    try:
        g.vmwrite(F.GUEST_RFLAGS, 0x2 | 1 << 15)  # a reserved RFLAGS bit
        exits = g.run()
        assert kinds(exits) == ["fail_entry"]
        assert exits[0].qualification == EXIT_REASON_FAILED_VMENTRY | ExitReason.INVALID_STATE
        assert "27.3.1.4" in exits[0].detail
        assert g.vmread(F.VM_EXIT_REASON) == EXIT_REASON_FAILED_VMENTRY | ExitReason.INVALID_STATE
    finally:
        g.close()


@needs_as
def test_invalid_guest_state_from_the_vmm_is_status_3() -> None:
    from hvm.cpu import CpuState

    machine = Machine(MachineConfig(engine="model", mem_size=4 << 20, console=lambda b: None))
    try:
        machine.load(assemble("hlt", 32, 0x7C00), ImageFormat.REAL)
        state: CpuState = machine.engine.get_state()
        state.cr0 |= 1 << 31  # paging without protection: SDM 27.3.1.1 rejects it
        machine.engine.set_state(state)
        result = machine.run(timeout=10)
    finally:
        machine.close()
    assert result.exit_status == 3
    assert "VM entry failed: invalid guest state" in result.reason


@needs_as
def test_invalid_control_field_fails_vm_entry() -> None:
    g = Tiny("hlt")
    try:
        g.vmwrite(F.CR3_TARGET_COUNT, 5)  # more than IA32_VMX_MISC allows
        exits = g.run()
        assert kinds(exits) == ["fail_entry"]
        assert exits[0].qualification == 7  # VM-instruction error 7: invalid control field(s)
    finally:
        g.close()


# --- the host interrupting a run --------------------------------------------------------------

def test_timeout_on_forever_is_status_124() -> None:
    proc = hvm("run", "--guest", "forever", "--engine", "model", "--timeout", "0.5", timeout=30)
    assert proc.returncode == 124
    assert proc.stdout == b"looping\n"
    assert proc.stderr.decode().strip() == "hvm: timeout after 0.5 s"


@needs_as
def test_kick_from_another_thread_returns_intr() -> None:
    g = Tiny("jmp .")
    try:
        threading.Timer(0.2, g.engine.kick).start()
        assert g.engine.run().kind is ExitKind.INTR
    finally:
        g.close()


@needs_as
def test_kick_while_halted_returns_intr() -> None:
    from hvm.vtx.controls import ProcBased

    g = Tiny("sti\nhlt\nhlt")
    try:
        g.controls(off=ProcBased.HLT_EXITING)
        threading.Timer(0.2, g.engine.kick).start()
        assert g.engine.run().kind is ExitKind.INTR
        assert g.engine.get_state().rip == 0x10002  # halted after the first HLT, no VM exit
        assert not g.engine.exit_counts
    finally:
        g.close()


# --- engine selection ---------------------------------------------------------------------------

def test_auto_picks_kvm_when_usable_else_model(monkeypatch) -> None:
    assert resolve_engine_name("auto") == ("kvm" if kvm_usable() else "model")
    monkeypatch.setattr("hvm.engine.kvm.kvm_usable", lambda path="/dev/kvm": False)
    assert resolve_engine_name("auto") == "model"
    assert resolve_engine_name("model") == "model"


def test_create_engine_model() -> None:
    memory = GuestMemory(4 << 20)
    engine = create_engine("model", memory)
    try:
        assert isinstance(engine, ModelEngine) and engine.name == "model"
    finally:
        engine.close()
        memory.close()


# --- the cost model -----------------------------------------------------------------------------

def test_counters_report_exits_by_sdm_name_and_modelled_cycles(guest) -> None:
    machine = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None))
    try:
        machine.load(guest("hello"))
        result = machine.run(timeout=60)
    finally:
        machine.close()
    counters = result.engine_counters
    assert counters["exit_reason.CPUID"] == 2  # hello runs CPUID twice
    io = counters["exit_reason.IO_INSTRUCTION"]
    assert io == result.exits["io"]  # the ledger counts every exit, the final isa-debug-exit write too
    assert counters["exits"] == io + 2
    assert counters["modelled_overhead_cycles"] == counters["exits"] * SPLITX_DIRECT_CYCLES


def test_cost_model_adds_handling_per_kind() -> None:
    model = CostModel(handling={ExitKind.IO: 8000})
    assert model.cycles(ExitKind.IO) == SPLITX_DIRECT_CYCLES + 8000
    assert model.cycles(ExitKind.CPUID) == SPLITX_DIRECT_CYCLES
    assert model.cycles(None) == SPLITX_DIRECT_CYCLES  # a VM exit the engine finishes itself
    assert model.cycles(ExitKind.INTR) == 0  # the host's signal is not a VM exit


# --- speed: the model keeps raw Unicorn's speed on a CPU-bound loop ---------------------------

def _spin_counters(image: Path, n: int) -> dict[str, int]:
    machine = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None))
    try:
        machine.load(image, append=f"n={n}")
        result = machine.run(timeout=60)
    finally:
        machine.close()
    assert result.console.endswith(b"spin done\n")
    return result.engine_counters


def test_spin_loop_runs_without_python(guest) -> None:
    """The CPU-bound loop never calls back into Python: no exit, TLB fill, scan or hook grows with
    the iteration count. (How fast that makes it beside raw Unicorn and QEMU TCG is measured side by
    side by benchmarks/model_speed.py, not by a timed test.)"""
    image = Path(guest("spin"))
    assert _spin_counters(image, 1_000) == _spin_counters(image, 3_000_000)


# --- accesses that cross a page boundary into MMIO ----------------------------------------------

SPLIT_GUEST = """
mov eax, 0x11223344
mov [0xFEFFFFFE], eax
mov eax, [0xFEFFFFFD]
mov [0x3FFFFE], eax
mov ebx, [0x3FFFFE]
hlt
"""
# KVM splits an MMIO access that crosses a page into one exit per page (its "MMIO fragments");
# observed on this host's KVM with the guest above, each read answered with bytes 0xa0 + its index.
SPLIT_EXITS = [
    (0xFEFFFFFE, 2, True, "4433"), (0xFF000000, 2, True, "2211"),
    (0xFEFFFFFD, 3, False, ""), (0xFF000000, 1, False, ""),
    (0x400000, 2, True, "a2a3"), (0x400000, 2, False, ""),
]


def _split_run(engine, count: int) -> list[tuple[int, int, bool, str]]:
    seen = []
    for i in range(count):
        ex = engine.run()
        assert ex.kind is ExitKind.MMIO, ex
        seen.append((ex.addr, ex.size, ex.is_write, ex.data.hex()))
        if not ex.is_write:
            engine.complete_read(bytes([0xA0 + i]) * ex.size)
    return seen


@needs_as
def test_access_across_two_mmio_pages_exits_once_per_page_like_kvm() -> None:
    tiny = Tiny(SPLIT_GUEST, mem=4 << 20)
    try:
        assert _split_run(tiny.engine, len(SPLIT_EXITS)) == SPLIT_EXITS
        assert tiny.engine.run().kind is ExitKind.HLT
        regs = tiny.engine.get_state().regs
        assert regs["rax"] & 0xFFFF_FFFF == 0xA3A2A2A2  # 3 bytes from the first read, 1 from the second
        assert regs["rbx"] & 0xFFFF_FFFF == 0xA5A5A2A2  # RAM below 4 MiB, MMIO above
    finally:
        tiny.close()


@needs_kvm
@needs_as
def test_split_mmio_exits_match_kvm() -> None:
    from hvm.boot.gdt import write_gdt
    from hvm.engine.kvm import KvmEngine
    from tests.test_model_engine_support import CODE, entry_state

    memory = GuestMemory(4 << 20)
    write_gdt(memory)
    memory.write(CODE, assemble(SPLIT_GUEST))
    engine = KvmEngine(memory)
    try:
        engine.set_state(entry_state(32))
        # The last read's completion is not run: this host's KVM (PVM) hangs after it.
        assert _split_run(engine, len(SPLIT_EXITS)) == SPLIT_EXITS
    finally:
        engine.close()
        memory.close()
