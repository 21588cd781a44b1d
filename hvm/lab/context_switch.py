"""Experiment `context-switch`: a guest switching address spaces, with shadow paging or EPT, VPID off or on.

The chapter ("内存的双体问题"): without hardware support the hypervisor must step in for the guest's
address translation; EPT gives the MMU a second walker and "eliminated one of the largest sources
of virtualization overhead". And ("微调的艺术"): switching between hypervisor and guest used to flush
the TLB; VPID tags TLB entries so that the translations of the hypervisor and of each guest coexist.

The guest ``ctxsw`` (hvm/guests/src/ctxsw.c) runs p processes, each with its own page-table tree
mapping k pages of its own at the same linear addresses, and switches CR3 n times; each time slice
makes x + 1 passes over the process's k pages with a port write (a VM exit) between passes, as a
device access in a time slice would. Its one output line carries a checksum and whether every
process saw only its own pages.

* Model engine, four configurations: ``paging`` shadow (the VMM's shadow page tables, EPT off; a
  MOV to CR3 is a CR-access VM exit, reason 28; a #PF on the shadow is an exception VM exit,
  reason 0; INVLPG exits, reason 14; see :mod:`hvm.engine.model.shadow_paging`) or ept (the
  guest's CR3 loads and faults never exit); ``vpid`` on (TLB entries tagged, kept across VM
  transitions) or off (the model's TLB, Unicorn's, is flushed at every VM exit and VM entry, SDM
  Vol. 3C 29.4.3.3, and refilled by walks). Each configuration also runs with n = 0 (the same
  guest without switches); the difference divided by n is the cost of one switch. Modelled
  cycles: exits x the cost model's transition cost (SplitX) plus TLB-miss walks x references per
  walk (4 on the shadow, 24 for a 4-level guest on 4-level EPT) x a lower-bound cycles per
  reference (:mod:`hvm.engine.model.cost`).
* KVM engine: the same guest (64-bit) with its slices at ring 3 and at ring 0, and the kernel's
  binary statistics, read before and after each run, for n = 0 and n. On this host KVM runs on
  PVM, without VMX or EPT: it virtualizes the guest's memory with *shadow paging* (the kernel's
  shadow MMU), so there is no EPT row to compare with; guest ring-0 code -- the guest's kernel,
  which loads CR3 -- runs in KVM's instruction emulator, which walks the guest's tables in
  software. So the CR3 loads are emulated instructions, not VM exits; faults on the shadow
  (pf_taken, pf_fixed) come only from natively run ring-3 code, and the emulator's writes to
  memory that the shadow MMU tracks show as mmu_pte_write. The counters are this host's.
* The ``ring`` parameter (default 3) puts the model's slices at ring 3 too, entered with
  SYSEXIT/IRETQ and left through an exception, as a process would be.
* PCID rows (model engine, EPT with VPID on, the detailed TLB model ``tlb="detailed"`` of
  :mod:`hvm.engine.model.tlbsim`): the guest without PCIDs (each MOV to CR3 invalidates every
  non-global entry, SDM Vol. 3A 4.10.4.1) against the guest with ``pcid=1`` (process q has PCID
  q + 1, each CR3 load sets bit 63 and invalidates nothing; entries of other PCIDs are not used
  but stay). Counted: the modelled TLB's misses (walks) and their references; modelled cycles =
  exits x the transition cost + walk references x the cost per reference. Per switch here is
  (run with n switches - run with p switches) / (n - p): the first round, where each PCID's
  entries are filled for the first time, is the baseline, so the figures are the steady state.
  The modelled TLB alone decides these counts: Unicorn's own TLB is flushed on every CR3 load
  whatever the PCID (more than the SDM requires) and only costs host time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure

MEM = 64 << 20
MEMORY_SECTION = "原理与机制 › 攻克内存和 I/O › 内存的双体问题"
TUNING_SECTION = "原理与机制 › 微调的艺术"
FIGURES = [
    ChapterFigure(
        "ept_paging_exits_per_switch",
        "VM exits for address translation per guest CR3 switch, with EPT",
        0,
        "exits",
        MEMORY_SECTION,
        "处理器的内存管理单元 (MMU) 基本上被赋予了第二个专用的硬件页表遍历器。它使用客户机的页表执行 "
        "GVA → GPA 的转换，然后自动使用主机的 EPT/NPT 表执行 GPA → HPA 的转换……这一特性消除了虚拟化"
        "开销最大的来源之一。",
    ),
    ChapterFigure(
        "tlb_flushes_per_transition_without_vpid",
        "TLB flushes per VM exit (hypervisor-guest round trip) without VPID",
        1,
        "flushes",
        TUNING_SECTION,
        "在 hypervisor 和客户机之间切换过去需要刷新转译后备缓冲器 (TLB)……虚拟处理器标识符 (VPID) 和"
        "地址空间标识符 (ASID) 通过标记 TLB 条目来解决这个问题，允许 hypervisor 和多个客户机的转换在"
        "缓存中和平共存",
    ),
]
PCID_FIGURE = ChapterFigure(
    "tlb_misses_per_switch_with_pcids",
    "TLB misses per guest CR3 switch when the guest tags its entries with PCIDs",
    0,
    "misses",
    TUNING_SECTION,
    "虚拟处理器标识符 (VPID) 和地址空间标识符 (ASID) 通过标记 TLB 条目来解决这个问题，允许 hypervisor 和"
    "多个客户机的转换在缓存中和平共存",
)
FIGURES.append(PCID_FIGURE)
LINE = re.compile(r"ctxsw p=(\d+) n=(\d+) k=(\d+) x=(\d+) ring=(\d) sum=(0x[0-9a-f]+) isolation=(ok|bad)")
PAGING_REASONS = ("EXCEPTION_NMI", "CR_ACCESS", "INVLPG")
KVM_MMU_STATS = ("exits", "insn_emulation", "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious",
                 "pf_fast", "pf_mmio_spte_created", "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped",
                 "mmu_flooded", "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "remote_tlb_flush",
                 "tlb_flush", "invlpg", "pages_4k", "pages_2m", "pages_1g")


def _append(p: int, n: int, k: int, x: int, ring: int, pcid: bool = False) -> str:
    return f"p={p} n={n} k={k} x={x} ring={ring}" + (" pcid=1" if pcid else "")


def _guest_result(console: bytes) -> dict[str, Any]:
    m = LINE.search(console.decode(errors="replace"))
    if m is None:
        return {"finished": False, "isolation_ok": False, "checksum": None}
    return {"finished": True, "isolation_ok": m.group(7) == "ok", "checksum": m.group(6)}


# --- model ------------------------------------------------------------------------------------

def _model_run(paging: str, vpid: bool, p: int, n: int, k: int, x: int, ring: int,
               pcid: bool | None = None) -> dict[str, Any]:
    """One run; ``pcid`` not None: with the detailed TLB model, the guest's PCIDs on or off."""
    from hvm import guests
    from hvm.engine.model.cost import WALK_REFS_EPT_4_ON_4, WALK_REFS_SHADOW, walk_cycles
    from hvm.vmm.machine import Machine, MachineConfig
    from hvm.vtx.controls import ProcBased2
    from hvm.vtx.vmcs import VmcsField as F

    options: dict[str, Any] = {"paging": paging}
    if pcid is not None:
        options["tlb"] = "detailed"
    machine = Machine(MachineConfig(engine="model", mem_size=MEM, console=lambda b: None,
                                    engine_options=options))
    try:
        machine.load(guests.image_path("ctxsw"), append=_append(p, n, k, x, ring, bool(pcid)))
        if not vpid:
            vmcs = machine.engine.vmcs
            vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL,
                         vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL) & ~int(ProcBased2.ENABLE_VPID))
        result = machine.run(timeout=600)
    finally:
        machine.close()
    c = result.engine_counters
    reasons = {key.split(".", 1)[1]: v for key, v in c.items() if key.startswith("exit_reason.")}
    refs = WALK_REFS_SHADOW if paging == "shadow" else WALK_REFS_EPT_4_ON_4
    exit_cycles = c.get("modelled_overhead_cycles", 0)
    walks = walk_cycles(c.get("tlb_fills", 0), refs)
    detailed = {}
    if pcid is not None:  # the modelled TLB's own walks replace the emulator's fills
        walks = c["tlb.modelled_walk_cycles"]
        detailed = {name: c.get(f"tlb.{key}", 0) for name, key in (
            ("tlb_misses", "tlb_misses"), ("data_misses", "data_misses"), ("walk_refs", "walk_refs"),
            ("tlb_accesses", "accesses"), ("mov_cr3", "invalidations.mov_cr3"),
            ("mov_cr3_entries", "invalidations.mov_cr3.entries"), ("walk_mismatches", "walk_mismatches"),
            ("alias_fills", "alias_fills"), ("unattributed", "unattributed"))}
    return {
        **detailed,
        **_guest_result(result.console),
        "reason": result.reason,
        "exits": c.get("exits", 0),
        "exits_by_reason": reasons,
        "paging_exits": sum(reasons.get(r, 0) for r in PAGING_REASONS),
        "vmm_exits": dict(result.exits),
        "tlb_fills": c.get("tlb_fills", 0),
        "vpid_flushes": c.get("vpid_flushes", 0),
        "shadow": {key: v for key, v in c.items() if key.startswith("shadow_")},
        "walk_refs_per_fill": refs,
        "modelled_exit_cycles": exit_cycles,
        "modelled_walk_cycles": walks,
        "modelled_cycles": exit_cycles + walks,
        "wall_s": result.wall_s,
    }


def model_row(paging: str, vpid: bool, p: int, n: int, k: int, x: int, ring: int) -> Row:
    base = _model_run(paging, vpid, p, 0, k, x, ring)
    full = _model_run(paging, vpid, p, n, k, x, ring)

    def per_switch(key: str) -> float | None:
        return (full[key] - base[key]) / n if n else None

    return {
        "engine": "model",
        "case": f"{paging}, vpid {'on' if vpid else 'off'}",
        "paging": paging,
        "vpid": "on" if vpid else "off",
        "p": p, "n": n, "k": k, "x": x, "ring": ring,
        **full,
        "baseline": {key: base[key] for key in ("exits", "paging_exits", "tlb_fills", "vpid_flushes",
                                                 "modelled_cycles", "exits_by_reason")},
        "exits_per_switch": per_switch("exits"),
        "paging_exits_per_switch": per_switch("paging_exits"),
        "tlb_fills_per_switch": per_switch("tlb_fills"),
        "modelled_cycles_per_switch": per_switch("modelled_cycles"),
        "available": full["finished"] and full["isolation_ok"],
    }


def pcid_row(pcid: bool, p: int, n: int, k: int, x: int, ring: int) -> Row:
    """EPT, VPID on, the detailed TLB model: the guest's CR3 switches with PCIDs (no-flush) or without."""
    base = _model_run("ept", True, p, p, k, x, ring, pcid)  # one round: every PCID's first fill
    full = _model_run("ept", True, p, n, k, x, ring, pcid)
    switches = n - p

    def per_switch(key: str) -> float | None:
        return (full[key] - base[key]) / switches if switches > 0 else None

    return {
        "engine": "model",
        "case": f"ept, vpid on, pcid {'on' if pcid else 'off'} (detailed TLB)",
        "paging": "ept",
        "vpid": "on",
        "pcid": "on" if pcid else "off",
        "p": p, "n": n, "k": k, "x": x, "ring": ring,
        **full,
        "baseline_switches": p,
        "baseline": {key: base[key] for key in ("exits", "tlb_misses", "data_misses", "walk_refs",
                                                 "modelled_cycles", "mov_cr3")},
        "exits_per_switch": per_switch("exits"),
        "tlb_misses_per_switch": per_switch("tlb_misses"),
        "data_misses_per_switch": per_switch("data_misses"),
        "walk_refs_per_switch": per_switch("walk_refs"),
        "cr3_invalidations_per_switch": per_switch("mov_cr3"),
        "modelled_cycles_per_switch": per_switch("modelled_cycles"),
        "available": full["finished"] and full["isolation_ok"] and base["finished"],
    }


# --- KVM --------------------------------------------------------------------------------------

def _kvm_run(p: int, n: int, k: int, x: int, ring: int) -> dict[str, Any]:
    from hvm import guests
    from hvm.vmm.machine import Machine, MachineConfig

    machine = Machine(MachineConfig(engine="kvm", mem_size=MEM, console=lambda b: None))
    try:
        machine.load(guests.image_path("ctxsw"), append=_append(p, n, k, x, ring))
        before = machine.engine.counters()
        result = machine.run(timeout=600)
        after = dict(result.engine_counters)
    finally:
        machine.close()
    names = [s for s in KVM_MMU_STATS if s in after]
    return {
        **_guest_result(result.console),
        "reason": result.reason,
        "stats_before": {s: before.get(s, 0) for s in names},
        "stats_after": {s: after[s] for s in names},
        "stats_delta": {s: after[s] - before.get(s, 0) for s in names},
        "vmm_exits": dict(result.exits),
        "wall_s": result.wall_s,
    }


def kvm_row(p: int, n: int, k: int, x: int, ring: int) -> Row:
    base = _kvm_run(p, 0, k, x, ring)
    half = _kvm_run(p, n // 2, k, x, ring)
    full = _kvm_run(p, n, k, x, ring)
    per_switch = {s: (full["stats_delta"][s] - base["stats_delta"].get(s, 0)) / n if n else None
                  for s in full["stats_delta"]}
    return {
        "engine": "kvm",
        "case": f"KVM (shadow MMU under PVM), slices at ring {ring}",
        "paging": "kvm",
        "vpid": "host",
        "p": p, "n": n, "k": k, "x": x, "ring": ring,
        **full,
        "baseline_stats_delta": base["stats_delta"],
        "half_stats_delta": half["stats_delta"],  # n // 2 switches: what grows with n and what does not
        "growth_second_half": {s: full["stats_delta"][s] - half["stats_delta"].get(s, 0)
                               for s in full["stats_delta"]},
        "stats_per_switch": per_switch,
        "exits_per_switch": per_switch.get("exits"),
        "available": full["finished"] and full["isolation_ok"],
        "note": ("KVM on PVM: no EPT, the kernel's shadow MMU. The guest kernel (ring 0) runs in KVM's "
                 "instruction emulator, so its CR3 loads are emulated instructions (insn_emulation), not VM "
                 "exits; " + ("the ring-3 slices run natively on the shadow tables, whose misses are the "
                              "pf_taken/pf_fixed faults" if ring == 3 else
                              "with the slices at ring 0 too, every access is emulated and the shadow MMU "
                              "takes no page faults (pf_taken 0)")),
    }


# --- the experiment ---------------------------------------------------------------------------

CONFIGS = (("shadow", False), ("shadow", True), ("ept", False), ("ept", True))


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    p, n, k, x, ring = params["p"], params["n"], params["k"], params["x"], params["ring"]
    if engine == "kvm":  # the slices at ring 3 (run natively here) and at ring 0 (emulated here)
        rows = []
        for i, r in enumerate(dict.fromkeys((ring, 3 - ring))):
            progress(i, 2, f"kvm: ring {r}, {n} CR3 switches")
            rows.append(kvm_row(p, n, k, x, r))
        progress(2, 2, "kvm: done")
        return rows
    rows = []
    for i, (paging, vpid) in enumerate(CONFIGS):
        progress(i, len(CONFIGS), f"model: {paging}, vpid {'on' if vpid else 'off'}, {n} CR3 switches")
        rows.append(model_row(paging, vpid, p, n, k, x, ring))
    total = len(CONFIGS) + 2
    for i, pcid in enumerate((False, True), len(CONFIGS)):
        progress(i, total, f"model: ept, vpid on, pcid {'on' if pcid else 'off'}, detailed TLB")
        rows.append(pcid_row(pcid, p, n, k, x, ring))
    progress(total, total, "model: done")
    return rows


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    model = {(r["paging"], r["vpid"]): r for r in rows if r["engine"] == "model" and "pcid" not in r}
    pcid = {r["pcid"]: r for r in rows if "pcid" in r}
    ept, shadow = model.get(("ept", "on")), model.get(("shadow", "on"))
    if ept and shadow:
        out.append(Comparison(FIGURES[0], "model", ept["paging_exits_per_switch"], (
            f"with EPT the guest's CR3 loads and page faults never exit "
            f"({ept['paging_exits_per_switch']:.2f} translation exits per switch); with shadow paging each "
            f"switch costs {shadow['paging_exits_per_switch']:.2f} (the CR3-load exit; the #PF exits "
            f"that fill a new address space's shadow happen once, since roots are cached), so the "
            f"chapter's claim holds; "
            f"modelled cycles per switch: {shadow['modelled_cycles_per_switch']:,.0f} shadow vs "
            f"{ept['modelled_cycles_per_switch']:,.0f} EPT")))
    off, on = model.get(("shadow", "off")), model.get(("shadow", "on"))
    if off and on:
        measured = off["vpid_flushes"] / off["exits"] if off["exits"] else None
        out.append(Comparison(FIGURES[1], "model", measured, (
            f"without VPID the model flushes its TLB at each VM exit and again at each entry from the VMM "
            f"({off['vpid_flushes']} flushes for {off['exits']} exits; an exit completed in the engine "
            f"resumes with the exit's flush), so after the port write in each slice the guest refills its "
            f"pages: {off['tlb_fills_per_switch']:.1f} TLB fills per switch against "
            f"{on['tlb_fills_per_switch']:.1f} with VPID on, where only the CR3 load itself flushes "
            f"(no PCIDs)")))
    if "on" in pcid and "off" in pcid:
        on, off = pcid["on"], pcid["off"]
        out.append(Comparison(PCID_FIGURE, "model", on["tlb_misses_per_switch"], (
            f"the chapter's tagging argument holds inside the guest too: with PCIDs and the no-flush bit the "
            f"modelled TLB (Skylake geometry) keeps every process's translations, "
            f"{on['tlb_misses_per_switch']:.2f} misses and {on['modelled_cycles_per_switch']:,.0f} modelled "
            f"cycles per switch in the steady state, against {off['tlb_misses_per_switch']:.2f} misses "
            f"({off['walk_refs_per_switch']:.0f} walk references under EPT) and "
            f"{off['modelled_cycles_per_switch']:,.0f} cycles without PCIDs, where each CR3 load invalidates "
            f"every non-global entry (SDM 4.10.4.1); the exits per switch are the same "
            f"({on['exits_per_switch']:.2f} vs {off['exits_per_switch']:.2f})")))
    for r in rows:
        if r["engine"] == "kvm":
            ps = r["stats_per_switch"]
            run_total = r["stats_delta"]
            grown = r["growth_second_half"]
            out.append(Comparison(FIGURES[0], "kvm", None, (
                f"not measurable here: this host's KVM (PVM) has no EPT, it always uses its shadow MMU. With "
                f"the slices at ring {r['ring']}: per switch {r['exits_per_switch'] or 0:.2f} kernel exits "
                f"({r['x']} the guest's port writes), {ps.get('insn_emulation', 0):.0f} emulated "
                f"instructions, tlb_flush {ps.get('tlb_flush', 0):.2f}, mmu_pte_write "
                f"{ps.get('mmu_pte_write', 0):.1f}; over the run pf_fixed {run_total.get('pf_fixed', 0)} and "
                f"mmu_cache_miss {run_total.get('mmu_cache_miss', 0)} (shadow pages made), of which the "
                f"second half of the switches added {grown.get('pf_fixed', 0)} and "
                f"{grown.get('mmu_cache_miss', 0)}: "
                + ("KVM too keeps the shadows of the processes' address spaces across CR3 loads"
                   if not grown.get("pf_fixed", 0) and not grown.get("mmu_cache_miss", 0) else
                   "KVM rebuilt shadow state as the switches went on")
                + " (this host's figures)")))
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = _plot_pcid([r for r in rows if "pcid" in r], out_dir)
    model = [r for r in rows if r["engine"] == "model" and "pcid" not in r]
    if not model:
        return paths
    labels = [r["case"] for r in model]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = (("paging_exits_per_switch", "translation VM exits / switch"),
              ("tlb_fills_per_switch", "TLB fills / switch"),
              ("modelled_cycles_per_switch", "modelled cycles / switch"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r[key] or 0 for r in model]
        colors = ["#cc6677" if r["paging"] == "shadow" else "#4477aa" for r in model]
        ax.barh(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="both", labelsize=7)
    r0 = model[0]
    fig.suptitle(f"ctxsw: p={r0['p']} processes, n={r0['n']} CR3 switches, k={r0['k']} pages, "
                 f"x={r0['x']} port writes per slice", fontsize=9)
    return [save_figure(fig, out_dir, "context-switch.png"), *paths]


def _plot_pcid(rows: list[Row], out_dir: Path) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"pcid {r['pcid']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.4))
    for ax, (key, title) in zip(axes, (("tlb_misses_per_switch", "modelled TLB misses / switch"),
                                       ("modelled_cycles_per_switch", "modelled cycles / switch")),
                                strict=True):
        values = [r[key] or 0 for r in rows]
        ax.barh(labels, values, color=["#4477aa" if r["pcid"] == "on" else "#cc6677" for r in rows])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="both", labelsize=7)
    r0 = rows[0]
    fig.suptitle(f"ctxsw under EPT, VPID on, detailed TLB: p={r0['p']}, k={r0['k']}, steady state over "
                 f"{r0['n'] - r0['p']} switches", fontsize=9)
    return [save_figure(fig, out_dir, "context-switch-pcid.png")]


EXPERIMENT = Experiment(
    name="context-switch",
    title="Context switches: shadow paging versus EPT, VPID off versus on, PCIDs off versus on",
    claim=(
        "With EPT a guest switches address spaces without VM exits, while shadow paging exits at every "
        "CR3 load (and on the faults that fill a new shadow); without VPID every VM transition flushes "
        "the TLB, so the guest refills its translations after each exit; with PCIDs and the no-flush bit "
        "the guest's own CR3 loads keep its processes' translations as well."
    ),
    figures=FIGURES,
    engines=("kvm", "model"),
    run=run,
    compare=compare,
    plot=plot,
    defaults={"p": 4, "n": 2000, "k": 8, "x": 1, "ring": 3},
    quick={"p": 4, "n": 100, "k": 8, "x": 1, "ring": 3},
)
