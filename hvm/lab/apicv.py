"""Experiment `apicv`: interrupts with and without APIC virtualization, exits per kind.

The chapter ("微调的艺术"): features such as APICv and AVIC virtualize hardware interrupts too,
in many cases delivering them straight to the guest without an exit.

The guest ``apictick`` (hvm/guests/src/apictick.s) drives the xAPIC page like a kernel: a TPR
check with one self-IPI, M self-IPIs (every other one sent between CLI and STI, so it waits for
the interrupt window), then N periodic 1-ms timer ticks, waiting with HLT (``hlt``) or PAUSE; each
handler writes EOI. The experiment counts the exits each delivered interrupt costs (all exits of
the run but the console's port I/O, over the N + M + 1 interrupts):

* model (the VT-x model): ``apic="legacy"`` — the APIC page is trapped: every access to it is a
  VM exit (APIC access, SDM basic reason 44) the VMM emulates, and the VMM injects each interrupt
  itself on VM entry (waiting for an interrupt window when the guest cannot take it) — against
  ``apic="apicv"``: virtual-APIC page, APIC-register virtualization and virtual-interrupt delivery
  (SDM Vol. 3C chapter 30), where EOI and self-IPI writes are virtualized and pending interrupts
  are delivered by the CPU at entry or on an RVI update. Rows carry exits by SDM basic reason and
  the modelled cycles.
* kvm: ``irqchip="user"`` — no in-kernel irqchip; the VMM's local APIC on its MMIO bus, every
  APIC access a KVM_EXIT_MMIO, each interrupt a KVM_INTERRUPT (or an interrupt window first) —
  against ``irqchip="kernel"``, KVM's in-kernel local APIC as QEMU uses it. Rows carry the exits
  that reached the VMM by kind (its ledger) and the kernel's own counters from the binary stats
  fd (exits, irq_exits, irq_window_exits, halt_exits, irq_injections, mmio_exits, signal_exits,
  ...). On this host KVM runs on PVM: there is no APICv hardware under it, so "kernel" measures
  what an in-kernel APIC saves (the trips to userspace), not hardware interrupt virtualization.

x2APIC rows (``apic_modes`` has ``x2apic``; rows carry ``apic_mode``): apictick with ``x2apic`` sets
IA32_APIC_BASE.EXTD and reaches the APIC through its MSRs (SDM Vol. 3A 11.12). On the model, ``legacy``
takes an RDMSR/WRMSR exit (31/32) per access; ``apicv`` sets "virtualize x2APIC mode" at the switch, as
KVM does, and the MSR bitmap lets reads and TPR/EOI/SELF IPI writes through to the processor's
virtualization (SDM Vol. 3C 30.5). On KVM only ``irqchip="kernel"`` runs it: without an in-kernel
irqchip the VMM hides x2APIC from CPUID, and apictick refuses x2APIC mode there.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure

SECTION = "原理与机制 › 微调的艺术"
QUOTE = ("像 APICv 和 AVIC 这样的高级特性对硬件中断也做同样的处理，"
         "在许多情况下将它们直接传递给客户机而无需退出")
FIGURES = [
    ChapterFigure(
        "exits_per_interrupt",
        "VM exits per delivered interrupt with APIC virtualization ('without an exit')",
        0,
        "exits",
        SECTION,
        QUOTE,
    ),
]
GUEST = "apictick"
MEM = 32 << 20
CASES = {"model": ("legacy", "apicv"), "kvm": ("user", "kernel")}
APIC_MODES = ("xapic", "x2apic")
#: Cases that cannot run in x2APIC mode: KVM's userspace APIC is xAPIC only (CPUID hides x2APIC).
NO_X2APIC = {("kvm", "user")}
KERNEL_KEYS = ("exits", "irq_exits", "irq_window_exits", "request_irq_exits", "halt_exits", "halt_wakeup",
               "irq_injections", "mmio_exits", "io_exits", "signal_exits", "insn_emulation")


def _model_has_apic() -> bool:
    from hvm.engine.model import ModelEngine

    return "apic" in inspect.signature(ModelEngine).parameters


APICTICK = re.compile(rb"apictick: ticks (\d+) ipis (\d+) spurious (\d+)")


def run_case(engine: str, case: str, params: dict[str, Any], wait: str = "pause",
             apic_mode: str = "xapic") -> Row:
    from hvm import guests
    from hvm.vmm.machine import Machine, MachineConfig

    options = {"irqchip": case} if engine == "kvm" else {"apic": case}
    machine = Machine(MachineConfig(engine=engine, mem_size=MEM, console=lambda b: None,
                                    engine_options=options))
    try:
        args = (f"n={params['ticks']} ipis={params['ipis']}" + (" hlt" if wait == "hlt" else "")
                + (" x2apic" if apic_mode == "x2apic" else ""))
        machine.load(guests.image_path(GUEST), append=args)
        before = machine.engine.counters()
        result = machine.run(timeout=params.get("timeout", 300))
        lapic = machine.lapic.counters() if machine.lapic is not None else None
    finally:
        machine.close()
    m = APICTICK.search(result.console)
    ok = result.reason == "guest wrote 0x0 to isa-debug-exit" and m is not None
    ticks, ipis, spurious = (int(g) for g in m.groups()) if m else (0, 0, 0)
    interrupts = ticks + ipis + 1  # and the one self-IPI of the TPR check
    counters = {k: v - before.get(k, 0) for k, v in result.engine_counters.items()}
    ledger = dict(result.exits)
    console = ledger.get("io", 0)  # apictick's only port I/O: its console output and the exit port
    exits = counters.get("exits", 0)
    row: Row = {
        "engine": engine,
        "case": case,
        "ok": ok,
        "ticks": ticks,
        "ipis": ipis,
        "spurious": spurious,
        "interrupts": interrupts,
        "wait": wait,
        "apic_mode": apic_mode,
        "wall_s": round(result.wall_s, 4),
        "exits_total": exits,
        "console_exits": console,
        "exits_per_interrupt": round((exits - console) / interrupts, 3) if ok else None,
        "exits_by_kind": ledger,
        "host_kicks": ledger.get("intr", 0),
    }
    if engine == "kvm":
        userspace = sum(n for k, n in ledger.items() if k not in ("intr", "io"))
        row.update(
            exits_userspace=userspace,
            userspace_exits_per_interrupt=round(userspace / interrupts, 3) if ok else None,
            kernel={k: counters[k] for k in KERNEL_KEYS if k in counters},
            injected_by_vmm=counters.get("user_irqchip.injected", 0),
            vmm_lapic=lapic,
        )
    else:
        row.update(
            engine_exit_reasons={k.split(".", 1)[1]: v for k, v in counters.items()
                                 if k.startswith("exit_reason.") and v},
            modelled_overhead_cycles=counters.get("modelled_overhead_cycles", 0),
        )
    row["note"] = "" if ok else f"guest did not finish cleanly: {result.reason}"
    if ok and apic_mode == "x2apic" and engine == "kvm":
        row["note"] = ("irqchip=user is left out in x2APIC mode: without an in-kernel irqchip the VMM hides "
                       "x2APIC from CPUID (CPUID.01H:ECX[21])")
    return row


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    cases = CASES[engine]
    if engine == "model" and not _model_has_apic():
        note = "not available: this tree's model engine has no apic= option (legacy/apicv)"
        return [{"engine": engine, "case": c, "wait": w, "ok": False, "interrupts": 0, "exits_by_kind": {},
                 "note": note} for w in params["waits"] for c in cases]
    waits = list(params["waits"])
    bad = [w for w in waits if w not in ("pause", "hlt")]
    if bad:
        raise ValueError(f"apicv: unknown wait {bad[0]!r} (pause, hlt)")
    modes = list(params.get("apic_modes", ["xapic"]))
    bad = [m for m in modes if m not in APIC_MODES]
    if bad:
        raise ValueError(f"apicv: unknown apic mode {bad[0]!r} ({', '.join(APIC_MODES)})")
    runs = [(wait, mode, case) for wait in waits for mode in modes for case in cases
            if mode == "xapic" or (engine, case) not in NO_X2APIC]
    rows = []
    for i, (wait, mode, case) in enumerate(runs):
        progress(i, len(runs), f"{engine}: {case}, {mode}, waiting with {wait}")
        rows.append(run_case(engine, case, params, wait, mode))
    progress(len(runs), len(runs), f"{engine}: done")
    return rows


def _top_kinds(row: Row) -> str:
    kinds = row.get("engine_exit_reasons") or row["exits_by_kind"]
    kinds = {k: v for k, v in kinds.items() if k not in ("io", "IO_INSTRUCTION")}  # the console's
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]) or "none"


def _mode(row: Row) -> str:
    return row.get("apic_mode", "xapic")


def _compare_x2apic(rows: list[Row], engine: str, wait: str) -> Comparison:
    """The x2APIC rows of one engine and wait: model legacy vs apicv, KVM's in-kernel APIC alone."""
    by = {(r["case"], _mode(r)): r for r in rows if r["engine"] == engine and r.get("wait") == wait}
    label = f"{engine}, x2apic, {wait} wait"
    slow, fast = CASES[engine]
    b = by.get((fast, "x2apic"))
    a = by.get((slow, "x2apic")) if engine == "model" else None
    needed = (a, b) if engine == "model" else (b,)
    if not all(r and r["ok"] for r in needed):
        bad = next((r for r in needed if r and not r["ok"]), None)
        return Comparison(FIGURES[0], label, None,
                          f"not measured: {bad['note'] if bad else 'a case is missing'}")
    if engine == "model":
        assert a is not None and b is not None
        why = (f"x2APIC mode through MSRs. {slow}: {a['exits_per_interrupt']} exits per interrupt "
               f"({_top_kinds(a)}); {fast}: {b['exits_per_interrupt']} ({_top_kinds(b)}); modelled overhead "
               f"{a['modelled_overhead_cycles']:,} vs {b['modelled_overhead_cycles']:,} cycles. With "
               "\"virtualize x2APIC mode\" (SDM Vol. 3C 30.5) RDMSR of the APIC registers reads the "
               "virtual-APIC page and WRMSR of TPR, EOI and SELF IPI is virtualized; the other writes (timer "
               "setup, the ICR) still exit as WRMSR (32), the current-count read as RDMSR (31).")
    else:
        xapic = by.get((fast, "xapic"))
        than = (f" (xAPIC page: {xapic['exits_per_interrupt']})" if xapic and xapic["ok"] else "")
        kernel = b["kernel"]
        why = (f"kernel, x2APIC mode: {b['exits_per_interrupt']} kernel-counted exits per interrupt{than}, "
               f"{b['userspace_exits_per_interrupt']} to userspace; kernel counters: irq_injections "
               f"{kernel.get('irq_injections')}, irq_window_exits {kernel.get('irq_window_exits')}. "
               "irqchip=user has no x2APIC row: without an in-kernel irqchip the VMM hides x2APIC from "
               "CPUID.")
    return Comparison(FIGURES[0], label, b["exits_per_interrupt"], why)


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    for engine in sorted({r["engine"] for r in rows}):
        slow, fast = CASES[engine]
        for wait in [w for w in ("pause", "hlt") if any(r.get("wait") == w for r in rows)]:
            by = {r["case"]: r for r in rows
                  if r["engine"] == engine and r.get("wait") == wait and _mode(r) == "xapic"}
            a, b = by.get(slow), by.get(fast)
            label = f"{engine}, {wait} wait"
            if not by:
                continue
            if not a or not b or not a["ok"] or not b["ok"]:
                bad = next((r for r in (a, b) if r and not r["ok"]), None)
                out.append(Comparison(FIGURES[0], label, None,
                                      f"not measured: {bad['note'] if bad else 'a case is missing'}"))
                continue
            idle = (" With HLT waits the idle HLTs themselves exit (reason 12) in every configuration: "
                    "that is idling, not interrupt delivery." if wait == "hlt" else "")
            if engine == "model":
                why = (f"{slow}: {a['exits_per_interrupt']} exits per interrupt (all but the console's; "
                       f"{_top_kinds(a)}); {fast}: {b['exits_per_interrupt']} ({_top_kinds(b)}), over "
                       f"{a['interrupts']}/{b['interrupts']} interrupts; modelled overhead "
                       f"{a['modelled_overhead_cycles']:,} vs {b['modelled_overhead_cycles']:,} cycles. With "
                       "APICv the EOIs and self-IPIs are virtualized and timer interrupts posted; what still "
                       "exits are writes to registers APICv does not virtualize (timer setup: APIC-write) "
                       "and the guest's RDMSR of IA32_APIC_BASE." + idle)
            else:
                ka, kb = a["kernel"], b["kernel"]
                why = (f"user: {a['exits_per_interrupt']} kernel-counted exits per interrupt, "
                       f"{a['userspace_exits_per_interrupt']} of them to userspace ({_top_kinds(a)}); "
                       f"kernel: {b['exits_per_interrupt']} per interrupt, "
                       f"{b['userspace_exits_per_interrupt']} to userspace. Kernel counters (user / kernel): "
                       f"irq_window_exits "
                       f"{ka.get('irq_window_exits')} / {kb.get('irq_window_exits')}, irq_injections "
                       f"{ka.get('irq_injections')} / {kb.get('irq_injections')}, mmio_exits "
                       f"{ka.get('mmio_exits')} / {kb.get('mmio_exits')}, signal_exits "
                       f"{ka.get('signal_exits')} / {kb.get('signal_exits')}. This host's KVM runs on PVM "
                       "without APICv: the in-kernel APIC removes the trips to userspace, the exits that "
                       "remain are the kernel's own." + idle)
            out.append(Comparison(FIGURES[0], label, b["exits_per_interrupt"], why))
    for engine in sorted({r["engine"] for r in rows}):
        for wait in ("pause", "hlt"):
            if any(_mode(r) == "x2apic" for r in rows if r["engine"] == engine and r.get("wait") == wait):
                out.append(_compare_x2apic(rows, engine, wait))
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({r["engine"] for r in rows})
    fig, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4), squeeze=False)
    for ax, engine in zip(axes[0], engines, strict=True):
        sub = [r for r in rows if r["engine"] == engine and r["ok"]]
        if not sub:
            note = next((r["note"] for r in rows if r["engine"] == engine), "")
            ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        kinds: list[str] = []
        per: list[dict[str, float]] = []
        for r in sub:
            if engine == "model":
                src = {k: v for k, v in (r.get("engine_exit_reasons") or {}).items()
                       if k != "IO_INSTRUCTION"}  # the console's port I/O
            else:  # the kernel's count, split: exits to the VMM by kind, host-signal kicks, in-kernel rest
                signals = r["kernel"].get("signal_exits", 0)
                rest = r["exits_total"] - r["console_exits"] - r["exits_userspace"] - signals
                vmm = {f"to VMM: {k}": v for k, v in r["exits_by_kind"].items() if k not in ("intr", "io")}
                src = {**vmm,
                       "host timer signal": signals, "in kernel": max(rest, 0)}
            per.append({k: v / r["interrupts"] for k, v in src.items() if v > 0})
            kinds += [k for k in per[-1] if k not in kinds]
        bottoms = [0.0] * len(sub)
        cmap = plt.get_cmap("tab10")
        for i, kind in enumerate(kinds):
            vals = [p.get(kind, 0.0) for p in per]
            ax.bar([f"{r['case']}\n{r['wait']}" + ("\nx2apic" if _mode(r) == "x2apic" else "") for r in sub],
                   vals, bottom=bottoms, label=kind,
                   color=cmap(i % 10))
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        ax.axhline(0, color="#228833", ls=":", label="chapter: no exit")
        ax.set_title(f"{engine}: exits per delivered interrupt, by kind (console I/O left out)", fontsize=9)
        ax.set_ylabel("exits / interrupt")
        ax.legend(fontsize=6)
    return [save_figure(fig, out_dir, "apicv-exits.png")]


EXPERIMENT = Experiment(
    name="apicv",
    title="APIC virtualization: interrupts without exits",
    claim=(
        "With APIC virtualization (APICv/AVIC) timer interrupts and IPIs reach the guest, and its EOIs "
        "complete, without the VM exits a trapped APIC and hypervisor-injected interrupts cost."
    ),
    figures=FIGURES,
    engines=("kvm", "model"),
    run=run,
    compare=compare,
    plot=plot,
    defaults={"ticks": 1000, "ipis": 1000, "waits": ["pause", "hlt"], "apic_modes": ["xapic", "x2apic"]},
    quick={"ticks": 100, "ipis": 100, "waits": ["pause", "hlt"], "apic_modes": ["xapic", "x2apic"]},
)
