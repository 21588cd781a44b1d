"""Shadow paging on the model engine (``paging="shadow"``) against EPT, and on the trap engine.

Differential: the same guests run with EPT and with shadow paging and must print the same, exit
the same, show the VMM the same exits and end in the same register state. The exits shadow
paging adds are checked against what the guest's program does (its MOV to CR3 / INVLPG count)
and the VMCS controls the SDM prescribes for a VMM without EPT (Vol. 3C 25.6: CR3-load exiting,
INVLPG exiting, exception bitmap bit 14).
"""

from __future__ import annotations

import pytest

from hvm import guests
from hvm.boot import ImageFormat
from hvm.engine.model import ModelEngine
from hvm.errors import EngineUnavailable
from hvm.vmm.machine import Machine, MachineConfig
from hvm.vtx.controls import ProcBased, ProcBased2
from hvm.vtx.vmcs import VmcsField as F
from tests.conftest import QEMU, needs_kvm, needs_qemu

FORMATS = {"flat64": ImageFormat.LONG, "multiboot": ImageFormat.MULTIBOOT}


def run(name: str, append: str = "", engine: str = "model", paging: str | None = None, vpid: bool = True):
    options = {"paging": paging} if paging else {}
    m = Machine(MachineConfig(engine=engine, mem_size=64 << 20, console=lambda b: None,
                              engine_options=options))
    try:
        m.load(guests.image_path(name), FORMATS[guests.GUEST_FORMAT[name]], append=append)
        if not vpid:
            proc2 = m.engine.vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
            m.engine.vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, proc2 & ~int(ProcBased2.ENABLE_VPID))
        result = m.run(timeout=60)
        return result, m.engine.get_state()
    finally:
        m.close()


GUESTS = [
    ("hello", "n=5"),
    ("longmode", ""),
    ("trapkern", ""),
    ("syscalls", "n=500"),
    ("outloop", "n=300"),
    ("ctxsw", "check"),
    ("ctxsw", "p=3 n=40 k=4"),
    ("ctxsw", "p=3 n=40 k=4 ring=3"),
]


@pytest.mark.parametrize(("name", "append"), GUESTS)
def test_ept_and_shadow_paging_run_guests_identically(name: str, append: str) -> None:
    ept, ept_state = run(name, append, paging="ept")
    shadow, shadow_state = run(name, append, paging="shadow")
    assert ept.exit_status == 1, ept.console  # the guests' success value (0 << 1 | 1)
    assert shadow.console == ept.console
    assert shadow.exit_status == ept.exit_status
    assert shadow.exits == ept.exits  # shadow paging's own exits never reach the VMM's loop
    for what in ("rip", "rflags", "cr0", "cr3", "cr4", "efer"):
        assert getattr(shadow_state, what) == getattr(ept_state, what), what
    assert shadow_state.regs == ept_state.regs
    assert shadow.engine_counters["shadow_fills"] > 0
    assert "shadow_fills" not in ept.engine_counters


def test_a_triple_fault_is_the_same_crash() -> None:
    ept, _ = run("triple", paging="ept")
    shadow, _ = run("triple", paging="shadow")
    assert shadow.exit_status == ept.exit_status == 3
    assert shadow.console == ept.console


def test_the_vmcs_is_set_as_without_ept() -> None:
    m = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None,
                              engine_options={"paging": "shadow"}))
    try:
        vmcs = m.engine.vmcs
        proc = vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL)
        proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
        assert not proc2 & ProcBased2.ENABLE_EPT and not proc2 & ProcBased2.UNRESTRICTED_GUEST
        for control in (ProcBased.CR3_LOAD_EXITING, ProcBased.CR3_STORE_EXITING, ProcBased.INVLPG_EXITING):
            assert proc & control, control.name
        assert vmcs.vmread(F.EXCEPTION_BITMAP) >> 14 & 1  # #PF
        # SDM 26.2: with mask = match = 0 every #PF exits when bit 14 is 1
        assert vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MASK) == vmcs.vmread(F.PAGE_FAULT_ERROR_CODE_MATCH) == 0
        assert m.engine.capabilities()["shadow_paging"] and not m.engine.capabilities()["ept"]
    finally:
        m.close()


def test_shadow_exits_match_what_the_guest_does() -> None:
    n = 40
    result, _ = run("ctxsw", f"p=3 n={n} k=4 x=0", paging="shadow")
    c = result.engine_counters
    # ctxsw.s loads CR3 once and sets CR0.PG once; ctxsw.c loads CR3 n times and once more at the end.
    assert c["exit_reason.CR_ACCESS"] == (n + 2) + 1
    assert c.get("exit_reason.INVLPG", 0) == 0
    check, _ = run("ctxsw", "check", paging="shadow")
    c = check.engine_counters
    assert c["exit_reason.INVLPG"] == 9  # ctxsw.c's check() executes INVLPG 9 times
    assert c["shadow_true_faults"] == 2  # its two expected #PFs, reflected to the guest
    assert c["exit_reason.EXCEPTION_NMI"] == c["shadow_hidden_faults"] + c["shadow_true_faults"]
    assert c["shadow_protected_writes"] >= 1  # it writes its own page tables


def test_cached_roots_make_faults_independent_of_the_switch_count() -> None:
    short, _ = run("ctxsw", "p=3 n=30 k=4", paging="shadow")
    long, _ = run("ctxsw", "p=3 n=90 k=4", paging="shadow")
    assert long.engine_counters["shadow_root_hits"] > short.engine_counters["shadow_root_hits"]
    faults = "exit_reason.EXCEPTION_NMI"
    assert long.engine_counters[faults] == short.engine_counters[faults]


def test_vpid_off_flushes_the_tlb_at_every_exit_and_entry() -> None:
    on, _ = run("ctxsw", "p=3 n=30 k=4 x=1", paging="shadow")
    off, _ = run("ctxsw", "p=3 n=30 k=4 x=1", paging="shadow", vpid=False)
    assert off.console == on.console
    assert on.engine_counters["vpid_flushes"] == 0
    assert off.engine_counters["vpid_flushes"] >= off.engine_counters["exits"]
    assert off.engine_counters["tlb_fills"] > on.engine_counters["tlb_fills"]


def test_trap_engine_runs_the_paging_guest_with_the_same_shadow_mmu() -> None:
    model, _ = run("ctxsw", "check", paging="shadow")
    trap, _ = run("ctxsw", "check", engine="trap")
    assert trap.console == model.console and trap.exit_status == model.exit_status
    assert trap.engine_counters["shadow_invlpg"] == 9


def test_bad_paging_option_is_one_line() -> None:
    with pytest.raises(EngineUnavailable, match="'ept' or 'shadow'"):
        Machine(MachineConfig(engine="model", engine_options={"paging": "nested"}))
    assert ModelEngine.__init__.__kwdefaults__["paging"] == "ept"


@needs_kvm
@needs_qemu
@pytest.mark.parametrize("append", ["check", "p=3 n=40 k=4", "p=3 n=40 k=4 ring=3"])
def test_the_paging_guest_prints_what_qemu_prints(append: str) -> None:
    import subprocess

    cmd = [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "64", "-kernel",
           str(guests.image_path("ctxsw")), "-append", append,
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot"]
    qemu = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    shadow, _ = run("ctxsw", append, paging="shadow")
    assert shadow.console == qemu.stdout
    assert shadow.exit_status == qemu.returncode == 1


def expected_ctxsw_line(p: int, n: int, k: int, x: int, ring: int = 0) -> str:
    """ctxsw's result line from its specification (src/ctxsw.c's header), computed here."""
    words = {(q, i): q << 16 | i for q in range(p) for i in range(k)}
    total = 0
    for s in range(n):
        for _ in range(x + 1):
            for i in range(k):
                total += words[s % p, i]
                words[s % p, i] += 1
    return f"ctxsw p={p} n={n} k={k} x={x} ring={ring} sum={total & 0xFFFFFFFF:#x} isolation=ok\n"


@pytest.mark.parametrize("ring", [0, 3])
@pytest.mark.parametrize("paging", ["ept", "shadow"])
def test_ctxsw_result_is_the_specified_one(paging: str, ring: int) -> None:
    result, _ = run("ctxsw", f"p=5 n=23 k=3 x=2 ring={ring}", paging=paging)
    assert result.console.decode() == expected_ctxsw_line(5, 23, 3, 2, ring)


@pytest.mark.parametrize("design", ["pio", "mmio", "dirty_poll"])
def test_iobench_devices_work_under_shadow_paging(design: str) -> None:
    """Port I/O, MMIO (met at a #PF exit: no EPT violation without EPT) and the dirty-page doorbell
    (dirty logging by write protection instead of EPT dirty flags) on the I/O experiment's guest."""
    from hvm.devices.cmddev import CommandDevice
    from hvm.lab.io_exits import DESIGNS, DIRTY_GPA, DIRTY_PAGES, MMIO_BASE, PIO_BASE, REG_SPAN

    results = {}
    for paging in ("ept", "shadow"):
        m = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None,
                                  engine_options={"paging": paging}))
        try:
            dev = CommandDevice(m.memory, record_seqs=True)
            if design == "pio":
                m.pio.register(PIO_BASE, REG_SPAN, dev)
            elif design == "mmio":
                m.mmio.register(MMIO_BASE, 0x1000, dev)
            else:
                region = m.add_ram_region(DIRTY_GPA, DIRTY_PAGES * 4096, log_dirty=True)
                engine = m.engine
                m.add_poller(0.001, lambda e=engine, d=dev, r=region: d.harvest(e.harvest_dirty(r)))
            m.load(guests.image_path("iobench"), append=f"design={DESIGNS[design]} r=300 w=30 cpl=3")
            result = m.run(timeout=60)
        finally:
            m.close()
        line = result.console.decode()
        assert result.exit_status == 1, line
        assert "sent=30 completed=30" in line and "bad_results=0" in line
        assert dev.stats.seqs == list(range(30))
        results[paging] = result
    shadow = results["shadow"].engine_counters
    assert "exit_reason.EPT_VIOLATION" not in shadow
    if design == "mmio":
        assert results["shadow"].exits["mmio"] == results["ept"].exits["mmio"]
        assert shadow["exit_reason.EXCEPTION_NMI"] >= results["shadow"].exits["mmio"]
    if design == "dirty_poll":
        assert dev.stats.harvests >= 1


@needs_kvm
def test_kvm_runs_the_paging_check_as_the_model_does() -> None:
    """On this host KVM virtualizes memory with its shadow MMU (PVM, no EPT); the guest cannot tell."""
    model, _ = run("ctxsw", "check", paging="shadow")
    kvm, _ = run("ctxsw", "check", engine="kvm")
    assert kvm.console == model.console and kvm.exit_status == model.exit_status == 1
    assert "tlb_flush" in kvm.engine_counters and "mmu_pte_write" in kvm.engine_counters
