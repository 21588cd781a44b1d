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
PARAMS = {"ticks": N, "ipis": M, "hlt": True}


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
    return {r["case"]: r for r in rows}


def test_kvm_user_irqchip_exits_per_apic_access(kvm_rows) -> None:
    r = kvm_rows["user"]
    # a tick may fire just before the N-th tick's handler masks the timer: then it is taken too
    t = r["ticks"]
    assert r["ok"] and t in (N, N + 1) and r["ipis"] == M and r["spurious"] == 0
    assert r["interrupts"] == t + M + 1
    # apictick touches the APIC page: VERSION read; SVR, LINT0, TPR, DCR; TPR=0x50, ICR, IRR read, TPR=0;
    # M ICR writes; LVT timer, initial count, CCR read; an LVT mask in each handler from the N-th tick
    # on; initial count 0; one EOI per interrupt: 2M + 2t - N + 15 accesses, each one KVM_EXIT_MMIO.
    assert r["exits_by_kind"]["mmio"] == 2 * M + 2 * t - N + 15 == r["kernel"]["mmio_exits"]
    assert r["vmm_lapic"]["mmio_reads"] == 3
    # the M/2 IPIs sent with IF = 0 each wait for an interrupt window; the others go in at once
    assert r["exits_by_kind"]["interrupt_window"] == M // 2 == r["kernel"]["irq_window_exits"]
    assert r["injected_by_vmm"] == r["interrupts"] == r["vmm_lapic"]["acks"] == r["kernel"]["irq_injections"]
    # HLT without an in-kernel APIC is a userspace exit; each ends with a tick
    assert 0 < r["exits_by_kind"]["hlt"] <= t and r["exits_by_kind"]["hlt"] == r["kernel"]["halt_exits"]


def test_kvm_kernel_irqchip_keeps_interrupts_out_of_userspace(kvm_rows) -> None:
    r = kvm_rows["kernel"]
    assert r["ok"] and r["ticks"] in (N, N + 1) and r["ipis"] == M
    assert set(r["exits_by_kind"]) == {"io"} and r["userspace_exits_per_interrupt"] == 0
    assert r["kernel"]["irq_injections"] == r["interrupts"] and r["kernel"]["mmio_exits"] == 0
    assert r["exits_per_interrupt"] < kvm_rows["user"]["exits_per_interrupt"]


def test_kvm_compare_and_plot(kvm_rows, tmp_path) -> None:
    rows = list(kvm_rows.values())
    (cmp,) = apicv.compare(rows)
    assert cmp.engine == "kvm" and cmp.measured == kvm_rows["kernel"]["exits_per_interrupt"]
    assert "irq_window_exits" in cmp.why and "PVM" in cmp.why
    (path,) = apicv.plot(rows, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_rows() -> None:
    rows = apicv.run("model", PARAMS, lambda *a: None)
    json.dumps(rows)
    if not apicv._model_has_apic():
        assert [r["ok"] for r in rows] == [False, False] and all("apic=" in r["note"] for r in rows)
        (cmp,) = apicv.compare(rows)
        assert cmp.measured is None and "not available" in cmp.why
        return
    legacy, virt = rows
    assert legacy["ok"] and virt["ok"] and legacy["ticks"] >= N and virt["ticks"] >= N
    assert virt["exits_total"] < legacy["exits_total"]
