"""Experiment `apicv`: exits per interrupt, userspace vs in-kernel APIC (KVM), legacy vs APICv (model).

Exact counts follow from apictick's source (hvm/guests/src/apictick.s) and the documented KVM
semantics (api.rst: without an in-kernel irqchip the APIC page is unbacked, so each access is a
KVM_EXIT_MMIO; an interrupt the guest cannot take yet waits for KVM_EXIT_IRQ_WINDOW_OPEN).
"""

from __future__ import annotations

import json

import pytest

from hvm.engine import available_engines
from hvm.lab import EXPERIMENTS, apicv

N, M = 40, 40  # timer ticks, self-IPIs (M even: M/2 of them are sent between CLI and STI)
PARAMS = {"ticks": N, "ipis": M, "waits": ["pause", "hlt"]}


def test_registered_with_the_chapter_quote() -> None:
    exp = EXPERIMENTS["apicv"]
    assert exp.engines == ("kvm", "model") and apicv.GUEST == "apictick"
    (fig,) = exp.figures
    assert fig.value == 0 and "APICv" in fig.quote and "AVIC" in fig.quote and "无需退出" in fig.quote


@pytest.fixture(scope="module")
def kvm_rows() -> dict[str, dict]:
    if "kvm" not in available_engines():
        pytest.skip("no usable /dev/kvm")
    rows = apicv.run("kvm", PARAMS, lambda *a: None)
    json.dumps(rows)
    return {(r["case"], r["wait"]): r for r in rows}


@pytest.mark.parametrize("wait", ["pause", "hlt"])
def test_kvm_user_irqchip_exits_per_apic_access(kvm_rows, wait: str) -> None:
    r = kvm_rows[("user", wait)]
    # a tick may fall due just before the N-th tick's handler masks the timer: apictick then takes it
    # with an EOI but does not count it ("late"), so the VMM injected N + M + 1 + late interrupts
    assert r["ok"] and r["ticks"] == N and r["ipis"] == M and r["spurious"] == 0
    assert r["interrupts"] == N + M + 1
    late = r["injected_by_vmm"] - r["interrupts"]
    assert late in (0, 1) and r["vmm_lapic"]["acks"] == r["injected_by_vmm"]
    # apictick touches the APIC page: VERSION read; SVR, LINT0, TPR, DCR; TPR=0x50, ICR, IRR read, TPR=0;
    # M ICR writes; LVT timer, initial count, CCR read; the N-th tick's LVT mask; initial count 0; one
    # EOI per interrupt taken: 2M + N + 15 + late accesses, each one KVM_EXIT_MMIO.
    assert r["exits_by_kind"]["mmio"] == 2 * M + N + 15 + late == r["kernel"]["mmio_exits"]
    # the M/2 IPIs sent with IF = 0 each wait for an interrupt window (a tick that falls due while a
    # handler runs with IF = 0, e.g. when the host was slow to run the vCPU, waits for one too)
    assert r["exits_by_kind"]["interrupt_window"] >= M // 2
    assert r["kernel"]["irq_window_exits"] >= r["exits_by_kind"]["interrupt_window"]
    assert r["kernel"]["irq_injections"] >= r["injected_by_vmm"]  # the kernel counts a re-injection again
    if wait == "hlt":  # HLT without an in-kernel APIC is a userspace exit; each ends with a tick
        assert 0 < r["exits_by_kind"]["hlt"] <= N and r["exits_by_kind"]["hlt"] == r["kernel"]["halt_exits"]
    else:
        assert "hlt" not in r["exits_by_kind"] and r["kernel"]["halt_exits"] == 0


@pytest.mark.parametrize("wait", ["pause", "hlt"])
def test_kvm_kernel_irqchip_keeps_interrupts_out_of_userspace(kvm_rows, wait: str) -> None:
    r = kvm_rows[("kernel", wait)]
    assert r["ok"] and r["ticks"] == N and r["ipis"] == M
    assert set(r["exits_by_kind"]) == {"io"} and r["userspace_exits_per_interrupt"] == 0
    assert r["kernel"]["irq_injections"] >= r["interrupts"] and r["kernel"]["mmio_exits"] == 0
    assert r["exits_per_interrupt"] < kvm_rows[("user", wait)]["exits_per_interrupt"]


def test_kvm_compare_and_plot(kvm_rows, tmp_path) -> None:
    rows = list(kvm_rows.values())
    pause, hlt = apicv.compare(rows)
    assert pause.engine == "kvm, pause wait"
    assert pause.measured == kvm_rows[("kernel", "pause")]["exits_per_interrupt"]
    assert hlt.engine == "kvm, hlt wait" and "idle HLTs" in hlt.why
    assert "irq_window_exits" in pause.why and "PVM" in pause.why
    (path,) = apicv.plot(rows, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_rows() -> None:
    rows = apicv.run("model", PARAMS, lambda *a: None)
    json.dumps(rows)
    if not apicv._model_has_apic():
        assert not any(r["ok"] for r in rows) and all("apic=" in r["note"] for r in rows)
        assert all(c.measured is None and "not available" in c.why for c in apicv.compare(rows))
        return
    by = {(r["case"], r["wait"]): r for r in rows}
    legacy, virt = by[("legacy", "pause")], by[("apicv", "pause")]
    assert legacy["ok"] and virt["ok"] and legacy["ticks"] == virt["ticks"] == N
    reasons = virt["engine_exit_reasons"]
    # SDM Vol. 3C 30.1-30.6: with virtual-interrupt delivery and APIC-register virtualization, EOI and
    # self-IPI writes and interrupt delivery cause no exit: no interrupt-window, external-interrupt or
    # EPT-violation exits at all; legacy takes at least one exit per EOI (the trapped APIC page).
    assert not {"INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT", "EPT_VIOLATION"} & set(reasons)
    assert legacy["exits_total"] - legacy["console_exits"] >= legacy["interrupts"]
    assert virt["exits_per_interrupt"] < 0.1 * legacy["exits_per_interrupt"]


def test_x2apic_rows() -> None:
    # apictick x2apic (hvm/guests/src/apictick.s): legacy exits on every x2APIC MSR access - RDMSR of
    # IA32_APIC_BASE twice, version, IRR, current count; WRMSR of IA32_APIC_BASE, 4 setup writes, the TPR
    # check's 3 writes and its IPI's EOI, per IPI a SELF IPI and an EOI, timer setup (2), per tick an EOI,
    # the mask and the stop (+1 for a late tick's EOI). With APICv (SDM Vol. 3C 30.5, KVM's MSR bitmap)
    # only 3 reads and 9 writes exit: none per interrupt; with the CPUID feature check, 13 exits in all.
    params = {"ticks": N, "ipis": M, "waits": ["pause"], "apic_modes": ["x2apic"]}
    rows = apicv.run("model", params, lambda *a: None)
    by = {r["case"]: r for r in rows}
    assert set(by) == {"legacy", "apicv"} and all(r["apic_mode"] == "x2apic" and r["ok"] for r in rows)
    legacy, virt = by["legacy"]["engine_exit_reasons"], by["apicv"]["engine_exit_reasons"]
    assert legacy["MSR_READ"] == 5 and 2 * M + N + 13 <= legacy["MSR_WRITE"] <= 2 * M + N + 14
    assert (virt["MSR_READ"], virt["MSR_WRITE"]) == (3, 9)
    assert not {"INTERRUPT_WINDOW", "EXTERNAL_INTERRUPT", "EPT_VIOLATION", "APIC_WRITE"} & set(virt)
    (comparison,) = apicv.compare(rows)
    assert comparison.engine == "model, x2apic, pause wait"
    assert comparison.measured == by["apicv"]["exits_per_interrupt"] == round(13 / (N + M + 1), 3)
    with pytest.raises(ValueError, match="unknown apic mode 'x3apic'"):
        apicv.run("model", {**params, "apic_modes": ["x3apic"]}, lambda *a: None)


def test_kvm_x2apic_rows_kernel_only() -> None:
    if "kvm" not in available_engines():
        pytest.skip("no usable /dev/kvm")
    params = {"ticks": N, "ipis": M, "waits": ["pause"], "apic_modes": ["xapic", "x2apic"]}
    rows = [r for r in apicv.run("kvm", params, lambda *a: None) if r["apic_mode"] == "x2apic"]
    (row,) = rows  # irqchip=user hides x2APIC from CPUID: no row for it
    assert row["case"] == "kernel" and row["ok"] and row["ticks"] == N and row["ipis"] == M
    assert set(row["exits_by_kind"]) == {"io"} and row["kernel"]["mmio_exits"] == 0
    assert "irqchip=user" in row["note"]
