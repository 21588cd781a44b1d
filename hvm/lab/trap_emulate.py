"""Experiment `trap-and-emulate`: one interrupt-toggling kernel on the classic design and on VT-x.

The guest `trapkern` (hvm/guests/src/trapkern.s) does once each what a kernel does and a
hypervisor must intercept: CLI/STI, CR0/CR3/CR4, RDMSR/WRMSR, paging and long mode, INVLPG,
exceptions through its own IDT and IRETQ. It runs unchanged on

* **trap**: the classic design, the kernel deprivileged to ring 3, every privileged instruction a
  trap that the hypervisor decodes and emulates, shadow page tables (hvm.engine.trap);
* **model**: the VT-x model, the kernel at its own ring 0 in VMX non-root operation, exits
  decided by the VMCS (hvm.engine.model);
* **kvm**: this host's KVM.

For each: the console output (which must be the same), traps or exits per kind, wall time, and
the modelled overhead: traps x the trap cost measured on this host (hvm.engine.trap.cost), VM
exits x the 2,000-cycle round trip the model charges (SplitX, hvm.engine.model.cost; KVM's
own exit count from its statistics, charged the same).

The `redpill` guest runs beside it: under the trap engine its four unprivileged probes (SGDT,
SIDT, SMSW against MOV from CR0, POPF) give it away; on the model engine, with descriptor-table
exiting and a CR0 read shadow over the host-forced CR0.NE, they do not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure

SECTION = "原理与机制 › 经典构想及其缺陷"
FIGURES = [
    ChapterFigure(
        "cli_steps",
        "steps from a guest CLI back to the guest, trap-and-emulate",
        6,
        "steps",
        SECTION,
        "1. ……执行客户机的 `cli` 指令。2. CPU ……产生一个通用保护故障（#GP）……"
        "5. ……（$IF_{virt} \\leftarrow 0$）。6. ……调整客户机的虚拟程序计数器，并恢复客户机的执行。",
    ),
    ChapterFigure(
        "redpill",
        "a guest can tell it is virtualized, classic design (1 = yes)",
        1,
        "verdict",
        SECTION,
        "客户机要么能看到它不该看到的东西，要么其代码行为会与在真实硬件上不同，从而打破了虚拟化的幻象。",
    ),
]
MEM = 64 << 20
SPLITX_CYCLES = 2000  # as the model engine's cost model (hvm.engine.model.cost)


def _machine(engine: str):
    from hvm.vmm.machine import Machine, MachineConfig

    return Machine(MachineConfig(engine=engine, mem_size=MEM, console=lambda b: None))


def _model_controls(machine) -> str:
    """The VMCS a hypervisor uses to hide itself: descriptor-table exiting, CR0 read shadow."""
    from hvm.vtx.capabilities import MODEL_CAPS
    from hvm.vtx.controls import ProcBased2
    from hvm.vtx.vmcs import VmcsField as F

    vmcs = machine.engine.vmcs
    proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL) | ProcBased2.DESCRIPTOR_TABLE_EXITING
    vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, MODEL_CAPS.procbased_ctls2.adjust(proc2))
    cr0 = vmcs.vmread(F.GUEST_CR0)
    ne = 1 << 5  # forced to 1 in VMX operation (IA32_VMX_CR0_FIXED0), hidden by the shadow
    vmcs.vmwrite(F.GUEST_CR0, cr0 | ne)
    vmcs.vmwrite(F.CR0_GUEST_HOST_MASK, ne)
    vmcs.vmwrite(F.CR0_READ_SHADOW, cr0)
    return "descriptor-table exiting; CR0.NE forced, guest/host mask NE, read shadow = the guest's CR0"


def run_guest(engine: str, guest: str, append: str = "", timeout: float = 120.0) -> Row:
    """Run a bundled guest once on ``engine``; the row of traps/exits, time and cost."""
    from hvm import guests

    machine = _machine(engine)
    try:
        machine.load(guests.image_path(guest), append=append)
        controls = _model_controls(machine) if engine == "model" and guest == "redpill" else ""
        before = machine.engine.counters()
        result = machine.run(timeout=timeout)
        after = result.engine_counters
    finally:
        machine.close()
    console = result.console.decode("utf-8", "replace")
    counters = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}
    if engine == "trap":
        by_kind = {k.removeprefix("trap."): v for k, v in counters.items() if k.startswith("trap.")}
        events = counters.get("traps", 0)
        cycles = counters.get("modelled_overhead_cycles", 0)
        per_event = after.get("modelled_cycles_per_trap", 0)
        cost = "traps x the trap measured on this host (CLI -> #GP -> SIGSEGV -> sigreturn)"
    elif engine == "model":
        by_kind = {
            k.removeprefix("exit_reason."): v for k, v in counters.items() if k.startswith("exit_reason.")
        }
        events = counters.get("exits", 0)
        cycles = counters.get("modelled_overhead_cycles", 0)
        per_event = after.get("modelled_cycles_per_exit", SPLITX_CYCLES)
        cost = "VM exits x 2,000 cycles (SplitX, WIOV 2011)"
    else:
        kernel = (
            "io_exits",
            "mmio_exits",
            "halt_exits",
            "irq_exits",
            "signal_exits",
            "insn_emulation",
            "pf_taken",
        )
        by_kind = {k: counters[k] for k in kernel if counters.get(k)}
        events = counters.get("exits", machine.ledger.total)
        cycles = events * SPLITX_CYCLES
        per_event = SPLITX_CYCLES
        cost = "KVM's own exit count x 2,000 cycles (SplitX, as the model); this host is KVM on PVM"
    row: Row = {
        "engine": engine,
        "workload": guest if not append else f"{guest} {append}",
        "exit_status": result.exit_status,
        "console_sha1": hashlib.sha1(result.console).hexdigest()[:12],
        "events": events,
        "vmm_exits": machine.ledger.total,
        "wall_s": round(result.wall_s, 4),
        "modelled_overhead_cycles": cycles,
        "cycles_per_event": per_event,
        "by_kind": by_kind,
        "exits_by_kind": result.exits,
        "cost": cost,
        "detected": None,
        "evidence": "",
        "controls": controls,
    }
    if guest == "redpill":
        lines = [ln.removeprefix("redpill: ") for ln in console.splitlines() if ln.startswith("redpill:")]
        row["detected"] = any(ln.startswith("virtualized") for ln in lines)
        row["evidence"] = " / ".join(lines)
    return row


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    progress(0, 2, f"{engine}: trapkern")
    rows = [run_guest(engine, "trapkern")]
    progress(1, 2, f"{engine}: redpill")
    rows.append(run_guest(engine, "redpill"))
    progress(2, 2, f"{engine}: done")
    return rows


def compare(rows: list[Row]) -> list[Comparison]:
    from hvm.engine.trap.cost import TrapCostModel, walk

    out = []
    kernel = {r["engine"]: r for r in rows if r["workload"] == "trapkern"}
    reference = kernel.get("kvm") or kernel.get("model")
    for engine, row in kernel.items():
        same = reference is None or row["console_sha1"] == reference["console_sha1"]
        against = reference["engine"] if reference else engine
        console = f"console {'the same as' if same else 'DIFFERS from'} {against}"
        others = ", ".join(f"{k} {v:,}" for k, v in sorted(row["by_kind"].items(), key=lambda kv: -kv[1])[:6])
        if engine == "trap":
            steps = len(walk(TrapCostModel(), guest="", fault="", decoded="", effect="", resume=""))
            why = (
                f"each of the kernel's {row['by_kind'].get('cli', 0)} CLIs is a trap of six steps "
                f"(`hvm run --engine trap --trace`), {row['cycles_per_event']:,} modelled cycles each; "
                "in all "
                f"{row['events']:,} traps ({others}), {row['modelled_overhead_cycles']:,} cycles; {console}"
            )
        else:
            steps = 0
            how = (
                "the CLI changes the guest's own IF in VMX non-root operation"
                if engine == "model"
                else "no CLI reaches the VMM (on this KVM-on-PVM host the kernel emulates CPL-0 code itself)"
            )
            counted = "VM exits" if engine == "model" else "exits in KVM's statistics"
            why = (
                f"{how}; {row['events']:,} {counted} ({others}), modelled at {row['cycles_per_event']:,} "
                f"cycles each, {row['modelled_overhead_cycles']:,} in all; {console}"
            )
        out.append(Comparison(FIGURES[0], engine, steps, why))
    for row in rows:
        if row["workload"] == "redpill":
            verdict = "detects" if row["detected"] else "does not detect"
            controls = f" (VMCS: {row['controls']})" if row["controls"] else ""
            out.append(
                Comparison(
                    FIGURES[1],
                    row["engine"],
                    float(row["detected"]),
                    f"redpill {verdict} virtualization{controls}: {row['evidence']}",
                )
            )
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernel = [r for r in rows if r["workload"] == "trapkern"]
    if not kernel:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [r["engine"] for r in kernel]
    axes[0].bar(names, [r["events"] for r in kernel], color="#4477aa")
    axes[0].set_title("traps (trap) / VM exits (model, kvm)")
    axes[1].bar(names, [r["modelled_overhead_cycles"] for r in kernel], color="#cc6677")
    axes[1].set_title("modelled overhead (cycles)")
    axes[2].bar(names, [r["wall_s"] for r in kernel], color="#228833")
    axes[2].set_title("wall time (s)")
    for ax in axes:
        ax.tick_params(labelsize=8)
    fig.suptitle("trapkern on three engines", fontsize=10)
    paths = [save_figure(fig, out_dir, "trap-and-emulate.png")]
    trap = next((r for r in kernel if r["engine"] == "trap"), None)
    if trap and trap["by_kind"]:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        kinds = sorted(trap["by_kind"], key=lambda k: -trap["by_kind"][k])
        ax.bar(kinds, [trap["by_kind"][k] for k in kinds], color="#4477aa")
        ax.set_yscale("log")
        ax.set_title("trap engine: traps by instruction (trapkern)")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        paths.append(save_figure(fig, out_dir, "trap-and-emulate-kinds.png"))
    return paths


EXPERIMENT = Experiment(
    name="trap-and-emulate",
    title="Trap-and-emulate versus VT-x: the same kernel on trap, model and kvm",
    claim=(
        "Classic trap-and-emulate runs an unmodified kernel deprivileged, but every CLI, STI, IRET and "
        "port access is a trap through the host; VT-x runs it at its own ring 0 and exits only where the "
        "VMCS says -- and the unprivileged sensitive instructions that betray the classic design (red "
        "pill) no longer do."
    ),
    figures=FIGURES,
    engines=("trap", "model", "kvm"),
    run=run,
    compare=compare,
    plot=plot,
)
