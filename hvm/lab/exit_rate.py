"""Experiment `exit-rate`: the exit rate as a CPU part plus an I/O part, with and without the features.

The chapter ("微调的艺术", last paragraph) models the VM-exit rate as a base rate of the CPU-bound
work plus an additional rate of the I/O-bound work, λ = λ_cpu + λ_io, and says the hardware
features cut the I/O part "by 60% or more in typical scenarios".

The guest ``exitmix`` (hvm/guests/src/exitmix.c) runs ``units`` units of a mixed workload; each
unit is CPU-bound work (``work`` xorshift rounds), ``sys`` "system calls" that write
IA32_TSC_AUX, and ``io`` = x commands to the command device (hvm.devices.cmddev); the local APIC
timer ticks periodically throughout (initial count ``tick`` on a 1 GHz APIC bus; on both engines
the timer runs on host time, so a configuration whose exits cost host time also takes more ticks
per unit of work). x, the I/O
intensity in commands per unit, is the experiment's variable. Exits are counted over the work
alone: the guest writes port 510H before its first unit and after its last (boot, console output
and the final checks stay outside), where the VMM snapshots the engine's counters and its ledger.
Exits of the host's timer signals (``intr`` in the ledger, e.g. the dirty-page poll timer) are
VM exits on KVM (the kernel's ``signal_exits``) but not on the model, whose VMCS never sees them;
the rows keep them apart as ``host_kicks``. For each configuration the exits
per unit of work, λ(x), are fitted by least squares to λ(x) = λ_cpu + λ_io·x (standard errors
from the residuals); the reduction of the I/O component is 1 − λ_io(features)/λ_io(baseline),
its uncertainty propagated from the two slopes' standard errors (independent fits).

Configurations per engine (what each engine can do here is recorded in the rows):

* model (the VT-x model): baseline = MSR bitmap trapping every MSR (each WRMSR of IA32_TSC_AUX is
  a VM exit the VMM emulates; IA32_EFER, written once at boot, passes), the model's legacy local
  APIC (``apic="legacy"``), port I/O (every
  doorbell an I/O-instruction exit); features = MSR bitmap passing IA32_TSC_AUX through,
  ``apic="apicv"`` (virtual-APIC page, virtual-interrupt delivery), the dirty-page doorbell polled
  every ``poll_ms``. Exits are the engine's own count of VM exits (every basic exit reason).
* kvm: baseline = KVM_X86_SET_MSR_FILTER sending IA32_TSC_AUX accesses to userspace,
  ``irqchip="user"`` (the VMM's local APIC, KVM_INTERRUPT), port I/O; features = the kernel's MSR
  handling where KVM_GET_SUPPORTED_CPUID offers RDTSCP (otherwise the filter stays: the kernel
  refuses the guest's WRMSR, see hvm/lab/msr_bitmap.py), the in-kernel irqchip, the dirty-page
  doorbell. Exits are the kernel's count (binary stats fd ``exits``: every exit, in-kernel ones
  included).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

from hvm.devices.cmddev import DIRTY_GPA, DIRTY_PAGES, PIO_BASE, REG_SPAN, CommandDevice
from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure
from hvm.lab.msr_bitmap import MSR_TSC_AUX

SECTION = "原理与机制 › 微调的艺术"
QUOTE = (
    "虚拟机退出的速率可以看作是 CPU 密集型工作的基准速率和 I/O 密集型工作的附加速率之和。"
    "现代硬件特性对这两个部分都有所改善，但它们在削减与 I/O 相关的开销方面尤其有效，"
    "在典型场景中可将该部分的退出率降低 60% 或更多"
)
FIGURES = [
    ChapterFigure(
        "io_component_reduction",
        "reduction of the I/O component λ_io of the exit rate by the hardware features (at least)",
        60,
        "%",
        SECTION,
        QUOTE,
    ),
]
CONFIGS = ("baseline", "features")
MEM = 32 << 20
SUMMARY = re.compile(rb"^exitmix (.*)$", re.MULTILINE)
KERNEL_KEYS = ("exits", "io_exits", "mmio_exits", "signal_exits", "irq_exits", "irq_window_exits",
               "halt_exits", "irq_injections", "request_irq_exits", "pf_taken", "pf_fixed")


def _model_apic_modes() -> bool:
    """Whether this tree's model engine takes ``apic=`` (legacy / apicv)."""
    from hvm.engine.model import ModelEngine

    return "apic" in inspect.signature(ModelEngine).parameters


MSR_EFER = 0xC000_0080
PHASE_PORT = 0x510  # exitmix: OUT 1 starts the measured phase, OUT 2 ends it


class PhaseMarker:
    """Port 510H: snapshots the engine's counters and the VMM's ledger at exitmix's phase marks."""

    name = "phase-marker"

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.marks: dict[int, tuple[dict[str, int], dict[str, int], float]] = {}

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        import time

        if value in (1, 2) and value not in self.marks:
            m = self.machine
            self.marks[value] = (m.engine.counters(), m.ledger.counts(), time.perf_counter())

    def delta(self) -> tuple[dict[str, int], dict[str, int], float] | None:
        """(engine counters, ledger counts, seconds) between the marks; None if the guest set no pair."""
        if 1 not in self.marks or 2 not in self.marks:
            return None
        (c1, l1, t1), (c2, l2, t2) = self.marks[1], self.marks[2]
        ledger = {k: n - l1.get(k, 0) for k, n in l2.items() if n - l1.get(k, 0)}
        return {k: c2[k] - c1.get(k, 0) for k in c2}, ledger, t2 - t1


def _program_model_bitmap(engine: Any, pass_tsc_aux: bool) -> None:
    """Every MSR intercepted except IA32_EFER (the guest's switch to long mode, before the work starts)
    and, with ``pass_tsc_aux``, IA32_TSC_AUX (SDM Vol. 3C 25.6.9: a clear bit lets the access through)."""
    from hvm.vtx.bitmaps import MsrBitmap
    from hvm.vtx.capabilities import MODEL_CAPS
    from hvm.vtx.controls import ProcBased
    from hvm.vtx.vmcs import VmcsField as F

    bitmap = MsrBitmap()
    bitmap.pass_through(MSR_EFER)
    if pass_tsc_aux:
        bitmap.pass_through(MSR_TSC_AUX)
    engine.host.write(engine.msr_bitmap, bytes(bitmap.page))
    vmcs = engine.vmcs
    proc = vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL) | ProcBased.USE_MSR_BITMAPS
    vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, MODEL_CAPS.true_procbased_ctls.adjust(proc))
    vmcs.vmwrite(F.MSR_BITMAP, engine.msr_bitmap)


def _summary(console: bytes) -> dict[str, Any]:
    m = SUMMARY.search(console)
    if not m:
        tail = console[-200:].decode(errors="replace")
        raise RuntimeError(f"exitmix printed no summary line: {tail!r}")
    out: dict[str, Any] = {}
    for word in m.group(1).decode().split():
        key, _, value = word.partition("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def run_point(engine: str, config: str, x: int, params: dict[str, Any]) -> Row:
    """One exitmix run at I/O intensity ``x`` under ``config``; one row."""
    from hvm import guests
    from hvm.lab import msr_bitmap
    from hvm.vmm.machine import Machine, MachineConfig

    features = config == "features"
    tick = params["tick"]
    notes: list[str] = []
    options: dict[str, Any] = {}
    if engine == "kvm":
        options["irqchip"] = "kernel" if features else "user"
    elif _model_apic_modes():
        options["apic"] = "apicv" if features else "legacy"
    else:
        tick = 0
        notes.append("this model engine has no local APIC: no timer ticks")
    machine = Machine(MachineConfig(engine=engine, mem_size=MEM, console=lambda b: None,
                                    engine_options=options))
    try:
        dev = CommandDevice(machine.memory)
        marker = PhaseMarker(machine)
        machine.pio.register(PHASE_PORT, 1, marker)
        design = "dirty" if features else "pio"
        if features:
            region = machine.add_ram_region(DIRTY_GPA, DIRTY_PAGES * 4096, log_dirty=True)
            machine.add_poller(params["poll_ms"] / 1000.0,
                               lambda: dev.harvest(machine.engine.harvest_dirty(region)))
        else:
            machine.pio.register(PIO_BASE, REG_SPAN, dev)
        msr_pass = False
        if engine == "model":
            _program_model_bitmap(machine.engine, pass_tsc_aux=features)
            machine.msr_handler = lambda ex: msr_bitmap._model_handle(machine, ex)
            msr_pass = features
        else:
            msr_pass = features and msr_bitmap._kvm_rdtscp(machine.engine)
            if not msr_pass:
                if not machine.engine.filter_msr_writes([MSR_TSC_AUX], reads=True):
                    raise RuntimeError("KVM refused the MSR filter for IA32_TSC_AUX")
                if features:
                    notes.append("IA32_TSC_AUX stays filtered: KVM_GET_SUPPORTED_CPUID has no RDTSCP here, "
                                 "so the kernel would refuse the guest's WRMSR")
            reasons: list[tuple[bool, int]] = []
            machine.msr_handler = lambda ex: msr_bitmap._kvm_handle(machine, ex, reasons)
        units = params["units"]
        args = (f"design={design} units={units} work={params['work']} io={x} sys={params['sys']} "
                f"ipi=0 tick={tick} halt=0")
        machine.load(guests.image_path("exitmix"), append=args)
        result = machine.run(timeout=params.get("timeout", 600))
    finally:
        machine.close()
    guest = _summary(result.console)
    phase = marker.delta()
    ok = result.reason == "guest wrote 0x0 to isa-debug-exit" and phase is not None
    counters, ledger, seconds = phase if phase else ({}, {}, 0.0)
    # The ledger's count includes the OUT that ends the phase (recorded when its handler returns):
    # the exit of the start mark is before the first snapshot, that of the end mark inside.
    kernel = {k: counters[k] for k in KERNEL_KEYS if k in counters}
    exits = counters.get("exits", 0)
    row: Row = {
        "engine": engine,
        "config": config,
        "intensity": x,
        "units": units,
        "work": params["work"],
        "sys": params["sys"],
        "tick": tick,
        "ok": ok,
        "exits_total": exits,
        "exits_per_unit": exits / units,
        "exits_userspace": sum(n for k, n in ledger.items() if k != "intr"),
        "host_kicks": ledger.get("intr", 0),  # host timer signals that took the vCPU out (not VM exits)
        "phase_s": round(seconds, 4),
        "exits_per_s": round(exits / seconds, 1) if seconds else None,
        "ticks": guest.get("ticks", 0),
        "commands": guest.get("completed", 0),
        "tsc_aux": guest.get("tsc_aux"),
        "msr_pass_through": msr_pass,
        "apic": options.get("apic") or options.get("irqchip") or "none",
        "io_design": design,
        "exits_by_kind": ledger,
        "note": "; ".join(notes),
    }
    if engine == "kvm":
        row["kernel"] = kernel
    else:
        row["engine_exit_reasons"] = {k.split(".", 1)[1]: v for k, v in counters.items()
                                      if k.startswith("exit_reason.") and v}
        row["modelled_overhead_cycles"] = counters.get("modelled_overhead_cycles", 0)
    if not ok:
        row["note"] = "; ".join([*notes, f"guest did not finish cleanly: {result.reason}"])
    return row


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    intensities = list(params["intensities"])
    total = len(CONFIGS) * len(intensities)
    rows = []
    i = 0
    for x in intensities:  # interleaved, so a host slowdown hits both configurations alike
        for config in CONFIGS:
            progress(i, total, f"{engine}: {config}, {x} I/O commands per unit")
            rows.append(run_point(engine, config, x, params))
            i += 1
    progress(total, total, f"{engine}: done")
    return rows


# --- the fit -----------------------------------------------------------------------------------

def fit(points: list[tuple[float, float]]) -> dict[str, Any]:
    """Least squares λ = λ_cpu + λ_io·x: estimates, standard errors (from the residuals), residuals."""
    import numpy as np

    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    n = len(xs)
    if n < 2 or len(set(xs.tolist())) < 2:
        raise ValueError("a line needs at least two distinct intensities")
    design = np.column_stack([np.ones(n), xs])
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    residuals = ys - design @ coef
    dof = n - 2
    sigma2 = float(residuals @ residuals) / dof if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.inv(design.T @ design) if dof > 0 else np.full((2, 2), float("nan"))
    return {
        "lambda_cpu": float(coef[0]),
        "lambda_io": float(coef[1]),
        "se_cpu": float(math.sqrt(cov[0, 0])) if dof > 0 else None,
        "se_io": float(math.sqrt(cov[1, 1])) if dof > 0 else None,
        "residuals": [float(r) for r in residuals],
        "n": n,
    }


def reduction(base: dict[str, Any], on: dict[str, Any]) -> tuple[float, float | None]:
    """(1 − slope_on/slope_base, its standard error by first-order error propagation)."""
    b, f = base["lambda_io"], on["lambda_io"]
    r = 1.0 - f / b
    if base["se_io"] is None or on["se_io"] is None:
        return r, None
    se = math.sqrt((on["se_io"] / b) ** 2 + (f * base["se_io"] / b**2) ** 2)
    return r, se


def fits(rows: list[Row]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for engine in sorted({r["engine"] for r in rows}):
        for config in CONFIGS:
            pts = [(r["intensity"], r["exits_per_unit"]) for r in rows
                   if r["engine"] == engine and r["config"] == config and r["ok"]]
            if len({p[0] for p in pts}) >= 2:
                out[(engine, config)] = fit(pts)
    return out


def _doorbell_slope(rows: list[Row], engine: str) -> float | None:
    """Slope of the baseline's I/O-instruction exits per unit against x (the doorbells alone)."""
    pts = []
    for r in rows:
        if r["engine"] == engine and r["config"] == "baseline" and r["ok"]:
            io = (r.get("engine_exit_reasons") or {}).get("IO_INSTRUCTION") if engine == "model" else \
                r["exits_by_kind"].get("io")
            pts.append((r["intensity"], (io or 0) / r["units"]))
    if len({p[0] for p in pts}) < 2:
        return None
    return fit(pts)["lambda_io"]


def _fmt_fit(f: dict[str, Any]) -> str:
    se_c = f"±{f['se_cpu']:.3g}" if f["se_cpu"] is not None else ""
    se_i = f"±{f['se_io']:.3g}" if f["se_io"] is not None else ""
    res = max((abs(r) for r in f["residuals"]), default=0.0)
    return (f"λ_cpu={f['lambda_cpu']:.3g}{se_c}, λ_io={f['lambda_io']:.3g}{se_i} exits/unit "
            f"(max |residual| {res:.3g})")


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    fitted = fits(rows)
    for engine in sorted({r["engine"] for r in rows}):
        base, on = fitted.get((engine, "baseline")), fitted.get((engine, "features")),
        if base is None or on is None:
            out.append(Comparison(FIGURES[0], engine, None, "not measurable: fewer than two intensities "
                                  "finished in one of the configurations"))
            continue
        r, se = reduction(base, on)
        sub = [x for x in rows if x["engine"] == engine]
        notes = sorted({x["note"] for x in sub if x["note"]})
        unc = f" ± {100 * se:.2f} %" if se is not None else ""
        verdict = ("at or above the chapter's 60 %" if r >= 0.60 else "BELOW the chapter's 60 %")
        why = (f"reduction {100 * r:.2f}{unc} ({verdict}); baseline {_fmt_fit(base)}; "
               f"features {_fmt_fit(on)}. ")
        doorbell = _doorbell_slope(rows, engine)
        if doorbell is not None:
            rest = base["lambda_io"] - doorbell
            noise = " (below zero: within the fit's noise)" if rest < 0 else ""
            why += (f"Of the baseline's λ_io, {doorbell:.3g} exits per command are the doorbell's own "
                    f"I/O exits and {rest:.3g} other exits{noise} (timer interrupts, host kicks) that the "
                    "I/O's host time draws into the run. ")
        if engine == "model":
            why += ("Baseline: each port-I/O doorbell is an I/O-instruction exit; with the dirty-page "
                    "doorbell a command costs no exit, and the poll timer's host signals (host_kicks) are "
                    "not VM exits in the model, so λ_io vanishes")
        else:
            why += ("Baseline: each doorbell is an exit to userspace, and its time lets more ticks and host "
                    "kicks land in the run; dirty-page doorbell: write-protection faults after each harvest "
                    "and the ticks of a longer run remain")
        if notes:
            why += "; " + "; ".join(notes)
        out.append(Comparison(FIGURES[0], engine, round(100 * r, 3), why))
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({r["engine"] for r in rows})
    fitted = fits(rows)
    fig, axes = plt.subplots(1, len(engines), figsize=(5.5 * len(engines), 4), squeeze=False)
    colors = {"baseline": "#cc6677", "features": "#228833"}
    for ax, engine in zip(axes[0], engines, strict=True):
        for config in CONFIGS:
            sub = [r for r in rows if r["engine"] == engine and r["config"] == config and r["ok"]]
            xs = [r["intensity"] for r in sub]
            ax.plot(xs, [r["exits_per_unit"] for r in sub], "o", color=colors[config], label=config)
            f = fitted.get((engine, config))
            if f and xs:
                lo, hi = min(xs), max(xs)
                line = [f["lambda_cpu"] + f["lambda_io"] * lo, f["lambda_cpu"] + f["lambda_io"] * hi]
                ax.plot([lo, hi], line, "-", color=colors[config],
                        label=f"fit: {f['lambda_cpu']:.3f} + {f['lambda_io']:.3f}·x")
        base, on = fitted.get((engine, "baseline")), fitted.get((engine, "features"))
        if base and on:
            r, se = reduction(base, on)
            unc = f" ± {100 * se:.1f}" if se is not None else ""
            ax.set_title(f"{engine}: λ_io reduced {100 * r:.1f}{unc} % (chapter: ≥ 60 %)", fontsize=9)
        else:
            ax.set_title(engine)
        ax.set_xlabel("I/O intensity x (commands per unit of work)")
        ax.set_ylabel("VM exits per unit of work (λ)")
        ax.legend(fontsize=7)
    return [save_figure(fig, out_dir, "exit-rate-fit.png")]


EXPERIMENT = Experiment(
    name="exit-rate",
    title="Exit rate = CPU part + I/O part: what the features remove",
    claim=(
        "The exit rate of a mixed workload is a CPU-bound base rate plus an I/O rate growing with the I/O "
        "intensity; MSR pass-through, APIC virtualization and dirty-page polled I/O cut the I/O part by "
        "60 % or more."
    ),
    figures=FIGURES,
    engines=("kvm", "model"),
    run=run,
    compare=compare,
    plot=plot,
    # tick 4,000,000 on the 1 GHz APIC bus: a 4 ms period (a HZ=250 kernel); work 200 rounds keeps a unit
    # short against it even at CPL0 on KVM-on-PVM (emulated, ~2 M instructions/s)
    defaults={"intensities": [0, 4, 8, 16, 32], "units": 200, "work": 200, "sys": 1, "tick": 4_000_000,
              "poll_ms": 1.0},
    quick={"intensities": [0, 8, 16, 32], "units": 50, "work": 200, "sys": 1, "tick": 4_000_000,
           "poll_ms": 1.0},
)
