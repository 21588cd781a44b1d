"""Writes through a self-mapped (recursive) page table under shadow paging, against EPT, KVM and QEMU.

The guest ``selfmap`` (hvm/guests/src/selfmap.s) points PML4[510] at the PML4 itself and edits
its paging structures through that window: it maps a page, remaps it with INVLPG, unmaps it and
takes the #PF, stores to the PML4 through its own window page (once with a store split across two
window pages that both map the PML4, once from a stub that runs on the PML4's page). Every store
to the live PML4 is a write to a page table through a mapping whose own walk reads that table; the
model engine's shadow MMU single-steps each with the page writable and then write-protects it
again (hvm.engine.model.shadow_paging), and so does the trap engine (guest kernel at CPL 3, the
same shadow MMU, hvm.engine.trap), whose re-protect after such a store drops the shadow entry of
the very code page the step ran on.

Expected values come from the SDM and from QEMU: a PTE the processor used for a read has the
accessed flag (bit 5) set, for a write also the dirty flag (bit 6) (Vol. 3A 4.8); the #PF of a read
at CPL 0 through a not-present entry has error code 0 and CR2 = the address (Vol. 3A 4.7, 6.15);
and the whole console must be what QEMU prints.
"""

from __future__ import annotations

import subprocess

import pytest

from hvm import guests
from hvm.boot import ImageFormat
from hvm.vmm.machine import Machine, MachineConfig
from tests.conftest import QEMU, needs_kvm, needs_qemu

# Instructions of selfmap.s that store to the live PML4, each single-stepped: PML4[510] and
# PML4[511] through the identity map; through the window PML4[1] (set, cleared), PML4[2] (set,
# cleared), the split store, PML4[511] cleared, the stub's bytes, the stub's own store, PML4[2]
# and the stub cleared (see the comment at the top of selfmap.s).
PML4_STORES = 12
# Stores to a page table that is not read by their own walk, made after a walk read it: the PT
# entry for 0x8000005000 pointed at page B, then cleared (unprotect and resync, once each).
OTHER_PROTECTED_STORES = 2


def run(engine: str, paging: str | None = None):
    options = {"paging": paging} if paging else {}
    m = Machine(MachineConfig(engine=engine, mem_size=128 << 20, console=lambda b: None,
                              engine_options=options))
    try:
        m.load(guests.image_path("selfmap"), ImageFormat.MULTIBOOT)
        result = m.run(timeout=60)
        return result, m.engine.get_state()
    finally:
        m.close()


@pytest.fixture(scope="module")
def ept():
    return run("model", "ept")


@pytest.fixture(scope="module")
def shadow():
    return run("model", "shadow")


def test_the_guest_reads_what_the_sdm_specifies(ept) -> None:
    result, _ = ept
    lines = result.console.decode().splitlines()
    assert result.exit_status == 1, result.console  # isa-debug-exit value 0: (0 << 1) | 1
    assert lines[-1] == "selfmap: done"
    assert "selfmap: PTE flags after read 0x00000023" in lines  # P, R/W, A (SDM 4.8)
    assert "selfmap: PTE flags after write 0x00000063" in lines  # ... and D
    assert lines.count("selfmap: #PF CR2>>12 0x08000005") == 2
    assert lines.count("selfmap: #PF error code 0x00000000") == 2  # not present, read, CPL 0 (SDM 4.7)
    assert "selfmap: read 0x8000005000 = 0x000000a1" in lines
    assert "selfmap: read 0x8000005000 = 0x000000b2" in lines  # the remap took effect after INVLPG
    assert "selfmap: PML4[510] flags 0x00000063" in lines  # the PTE of the written window page


def test_shadow_paging_runs_it_as_ept_does(ept, shadow) -> None:
    (e, e_state), (s, s_state) = ept, shadow
    assert s.console == e.console
    assert s.exit_status == e.exit_status
    assert s.exits == e.exits  # the single steps are completed inside the engine
    for what in ("rip", "rflags", "cr0", "cr3", "cr4", "efer"):
        assert getattr(s_state, what) == getattr(e_state, what), what
    assert s_state.regs == e_state.regs


def test_each_store_to_the_live_pml4_is_one_single_step(shadow) -> None:
    counters = shadow[0].engine_counters
    assert counters["shadow_stepped_writes"] == PML4_STORES
    assert counters["shadow_protected_writes"] == PML4_STORES + OTHER_PROTECTED_STORES
    # each step began with a #PF VM exit (the split store with one per page)
    assert counters["exit_reason.EXCEPTION_NMI"] >= PML4_STORES + 1


def test_the_trap_engine_runs_it_as_ept_does(ept) -> None:
    # Each store to the live PML4 is single-stepped, and its re-protect drops every shadow entry
    # (all of them were walked through the PML4), the code page's included: the next fetch is a
    # hidden #PF, which must stay one (it was raised as a #DF, and the guest triple-faulted).
    (e, e_state), (t, t_state) = ept, run("trap")
    assert t.console == e.console
    assert t.exit_status == e.exit_status
    assert t.engine_counters["trap.#PF(write-protected)"] >= PML4_STORES
    assert t_state.rip == e_state.rip
    assert t_state.regs == e_state.regs


@needs_kvm
def test_kvm_prints_the_same(ept) -> None:
    kvm, _ = run("kvm")
    assert kvm.console == ept[0].console
    assert kvm.exit_status == ept[0].exit_status


@needs_kvm
@needs_qemu
def test_qemu_prints_the_same(ept) -> None:
    cmd = [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "128",
           "-kernel", str(guests.image_path("selfmap")), "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot"]
    ref = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert ref.returncode == ept[0].exit_status == 1, ref.stderr
    assert ref.stdout == ept[0].console


# A flat 64-bit guest (ImageFormat.LONG: entered at 1 MiB in long mode, CR3 = its PML4, identity
# mapped): RSP = CR3 + 16, then CALL, whose push stores to PML4[1] -- a write to the live PML4 by
# a control transfer -- then HLT.
CALL_INTO_PML4 = bytes.fromhex("0f20d8" "4889c4" "4883c410" "e800000000" "f4")  # mov rax, cr3; mov rsp, rax;
# add rsp, 16; call $+5; hlt


def run_flat(tmp_path, code: bytes, paging: str, patch=None):
    image = tmp_path / "guest.bin"
    image.write_bytes(code)
    m = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None,
                              engine_options={"paging": paging}))
    try:
        if patch is not None:
            patch(m.engine)
        m.load(image, ImageFormat.LONG)
        return m.run(timeout=30)
    finally:
        m.close()


def test_a_control_transfer_writing_the_pml4_stops_with_one_line(tmp_path) -> None:
    ept = run_flat(tmp_path, CALL_INTO_PML4, "ept")
    assert ept.exit_status == 0 and "halted" in ept.reason  # the push lands, the guest halts
    shadow = run_flat(tmp_path, CALL_INTO_PML4, "shadow")
    assert shadow.exit_status == 3
    assert "through a self-mapped page table cannot be single-stepped: a control transfer" in shadow.reason
    assert "\n" not in shadow.reason


def test_a_write_step_that_never_completes_stops_instead_of_looping(tmp_path) -> None:
    # Make every step stop before its instruction (as a step that never gets past it would): the
    # engine must give up with one line, not retry forever.
    def patch(engine) -> None:
        summary = engine._summary
        engine._summary = lambda linear: (0, False, "") if engine._write_step else summary(linear)

    code = bytes.fromhex("0f20d8" "48c7400800000000" "f4")  # mov rax, cr3; mov qword [rax+8], 0; hlt
    assert run_flat(tmp_path, code, "ept").exit_status == 0
    plain = run_flat(tmp_path, code, "shadow")
    assert plain.exit_status == 0 and plain.engine_counters["shadow_stepped_writes"] == 1
    shadow = run_flat(tmp_path, code, "shadow", patch)
    assert shadow.exit_status == 3
    assert "did not complete in 8 single steps" in shadow.reason
    assert "\n" not in shadow.reason


def test_the_trap_engine_steps_one_store_at_a_time(tmp_path) -> None:
    # Two stores to the live PML4 in a row: with the PML4 write-protected in the shadow, each is a
    # write to a read-only page and must fault on its own (SDM Vol. 3A 4.6.1), so the step that lets
    # the first through must end before the second -- also when the first store's code was already
    # translated (its hidden #PF ran it once), which is what made the step run the whole block.
    code = bytes.fromhex("0f20d8" "48c7400800000000" "48c7401000000000" "f4")
    # mov rax, cr3; mov qword [rax+8], 0; mov qword [rax+16], 0; hlt
    image = tmp_path / "guest.bin"
    image.write_bytes(code)
    m = Machine(MachineConfig(engine="trap", mem_size=64 << 20, console=lambda b: None))
    try:
        m.load(image, ImageFormat.LONG)
        result = m.run(timeout=30)
    finally:
        m.close()
    assert result.exit_status == 0 and "halted" in result.reason
    assert result.engine_counters["trap.#PF(write-protected)"] == 2
    assert run_flat(tmp_path, code, "shadow").engine_counters["shadow_stepped_writes"] == 2
