"""Experiment `tsc`: the guest-visible TSC against the SDM formula, and the chapter's nested sum.

Intel SDM Vol. 3C 26.3: with "use TSC offsetting" (and "use TSC scaling") RDTSC in a guest
returns ``((host TSC * multiplier) >> 48) + offset`` (mod 2**64). The guest ``tscread`` executes
RDTSC (and RDTSCP) a few times and writes each 64-bit value to port 0x530 (0x538 for RDTSCP).

* Model engine: each case programs offset/multiplier into the engine's VMCS before the run. The
  model derives every guest TSC from a host TSC read (``host_tsc`` in hvm.engine.model.engine);
  the experiment records that raw host value per guest read, so each value is checked exactly.
  Should the engine stop routing reads through ``guest_tsc``, the check falls back to a bracket
  of host readings around the run (and the row says so).
* Nested: ``hvm.vtx.tsc.compose`` turns L0->L1 (d1, m1) and L1->L2 (d2, m2) into the one level
  that the hardware applies while L2 runs, and the experiment checks T_L2 = T_H + d1 + d2.
* KVM engine: the KVM_VCPU_TSC_OFFSET vCPU attribute. Where it has no effect (PVM: accepted, reads
  back 0, RDTSC returns the host TSC, since natively run guest code has no hardware offsetting)
  the row says "not available on this host" and carries no measured value.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure
from hvm.vtx.tsc import TSC_MULTIPLIER_ONE, TscLevel, compose

SECTION = "原理与机制 › 微调的艺术"
FIGURES = [
    ChapterFigure(
        "nested_tsc",
        "nested guest TSC minus (T_H + δ1 + δ2)",
        0,
        "cycles",
        SECTION,
        "T_{L2} = T_H + δ1 + δ2",
    ),
]

TSCREAD_PORT = 0x530  # +0/+4: RDTSC low/high, +8/+12: RDTSCP low/high (hvm/guests/src/tscread.s)
MEM = 16 << 20
MASK64 = (1 << 64) - 1
ONE = TSC_MULTIPLIER_ONE


def _mult(ratio: float) -> int:
    return int(ratio * ONE)


# (case, offset, multiplier or None for "use TSC scaling" 0, RDTSC exiting)
MODEL_CASES: tuple[tuple[str, int, int | None, bool], ...] = (
    ("offset_0", 0, None, False),
    ("offset_plus_2^40", 1 << 40, None, False),
    ("offset_minus_2^30", -(1 << 30), None, False),
    ("offset_wraps_below_0", -(1 << 62), None, False),  # host + offset < 0: wraps to near 2**64
    ("scale_0.5_offset_12345", 12345, _mult(0.5), False),
    ("scale_3.25_offset_-7", -7, _mult(3.25), False),
    # the largest multiplier (just under 65536.0) with an offset larger than the scaled host: wraps
    ("scale_max_offset_-2^62_wraps", -(1 << 62), MASK64, False),
    ("rdtsc_exiting_offset_2^40", 1 << 40, None, True),  # the alternative: every RDTSC exits
)

# Nested: (case, (d1, m1) of L0 for L1, (d2, m2) of L1 for L2)
NESTED_CASES: tuple[tuple[str, tuple[int, float], tuple[int, float]], ...] = (
    ("nested_d1_5e9_d2_-2e9", (5_000_000_000, 1.0), (-2_000_000_000, 1.0)),
    ("nested_d1_-2^62_d2_2^61", (-(1 << 62), 1.0), (1 << 61, 1.0)),
    ("nested_m1_2_m2_3", (1_000_000, 2.0), (-5_000, 3.0)),
    ("nested_m1_1.5_m2_0.75", (777, 1.5), (-333, 0.75)),
)


class TscPort:
    """The VMM side of port 0x530: collects the 64-bit values the guest reports."""

    name = "tscread"

    def __init__(self) -> None:
        self.values: list[tuple[str, int]] = []  # ("rdtsc"|"rdtscp", value)
        self._low = {0: 0, 8: 0}

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset in (0, 8):
            self._low[offset] = value & 0xFFFF_FFFF
        elif offset in (4, 12):
            base = offset - 4
            kind = "rdtsc" if base == 0 else "rdtscp"
            self.values.append((kind, (value & 0xFFFF_FFFF) << 32 | self._low[base]))


@contextmanager
def _record_host_tsc(engine: Any):
    """Record the raw host TSC behind every guest TSC the model computes: [(host, guest), ...]."""
    import hvm.engine.model.engine as model_engine

    real = model_engine.host_tsc
    seen: list[int] = []
    pairs: list[tuple[int, int]] = []
    original = engine.guest_tsc

    def recording_host_tsc() -> int:
        value = real()
        seen.append(value)
        return value

    def traced_guest_tsc() -> int:
        seen.clear()
        value = original()
        if len(seen) == 1:  # exactly one host read behind this guest value: it is the one used
            pairs.append((seen[0], value))
        return value

    model_engine.host_tsc = recording_host_tsc
    engine.guest_tsc = traced_guest_tsc
    try:
        yield pairs
    finally:
        model_engine.host_tsc = real
        del engine.guest_tsc


def _run_guest(engine_name: str, n: int, setup) -> tuple[Any, TscPort, list[tuple[int, int]], int, int, Any]:
    """Boot tscread once; ``setup(machine)`` programs the engine first. Returns what was seen."""
    from hvm import guests
    from hvm.engine.model.hostcpu import host_tsc
    from hvm.vmm.machine import Machine, MachineConfig

    machine = Machine(MachineConfig(engine=engine_name, mem_size=MEM, console=lambda b: None))
    try:
        port = TscPort()
        machine.pio.register(TSCREAD_PORT, 16, port)
        machine.load(guests.image_path("tscread"), append=f"n={n}")
        extra = setup(machine)
        if engine_name == "model":
            with _record_host_tsc(machine.engine) as pairs:
                before = host_tsc()
                result = machine.run(timeout=120)
                after = host_tsc()
        else:
            pairs = []
            before = host_tsc()
            result = machine.run(timeout=120)
            after = host_tsc()
    finally:
        machine.close()
    if b"tscread done" not in result.console:
        tail = result.console[-200:]
        raise RuntimeError(f"tscread did not finish on {engine_name}: {result.reason} {tail!r}")
    return result, port, pairs, before, after, extra


def _program(vmcs: Any, offset: int, multiplier: int | None, exiting: bool) -> None:
    """TSC controls and fields in the model's VMCS, as a hypervisor would before VM entry."""
    from hvm.vtx.capabilities import MODEL_CAPS
    from hvm.vtx.controls import ProcBased, ProcBased2
    from hvm.vtx.vmcs import VmcsField as F

    proc = vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL) | ProcBased.USE_TSC_OFFSETTING
    proc = proc | ProcBased.RDTSC_EXITING if exiting else proc & ~ProcBased.RDTSC_EXITING
    proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
    scaling = ProcBased2.USE_TSC_SCALING
    proc2 = proc2 | scaling if multiplier is not None else proc2 & ~scaling
    proc |= ProcBased.ACTIVATE_SECONDARY_CONTROLS
    vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, MODEL_CAPS.true_procbased_ctls.adjust(proc))
    vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, MODEL_CAPS.procbased_ctls2.adjust(proc2))
    vmcs.vmwrite(F.TSC_OFFSET, offset & MASK64)
    vmcs.vmwrite(F.TSC_MULTIPLIER, ONE if multiplier is None else multiplier)


def _model_row(case: str, level: TscLevel, exiting: bool, n: int, expect=None, note: str = "") -> Row:
    """Run tscread under ``level`` on the model; ``expect(host)`` is the formula checked (default: level)."""
    expect = expect or level.apply
    scaled = level.multiplier != ONE
    multiplier = level.multiplier if scaled else None
    result, port, pairs, before, after, _ = _run_guest(
        "model", n, lambda m: _program(m.engine.vmcs, level.offset, multiplier, exiting)
    )
    values = [v for _, v in port.values]
    row: Row = {
        "engine": "model",
        "case": case,
        "offset": level.offset,
        "multiplier": level.multiplier / ONE,
        "multiplier_raw": level.multiplier,
        "rdtsc_exiting": exiting,
        "reads": len(values),
        "rdtscp_reads": sum(1 for kind, _ in port.values if kind == "rdtscp"),
        "rdtsc_exits": sum(c for k, c in result.exits.items() if "rdtsc" in k.lower()),
        "available": True,
    }
    if len(pairs) == len(values) and [g for _, g in pairs] == values:
        hosts = [h for h, _ in pairs]
        mismatches = [(h, g) for h, g in pairs if expect(h) != g]
        host, guest = pairs[0]
        row.update(host_tsc=host, expected=expect(host), measured=guest, host_source="recorded per read",
                   exact=not mismatches and bool(values), mismatches=len(mismatches),
                   host_first=hosts[0], host_last=hosts[-1])
    else:
        # the host value per read is unknown: every guest value must lie between the formula at the
        # host readings taken before and after the run (the formula is monotonic until it wraps)
        lo, hi = expect(before), expect(after)
        inside = all((lo <= v <= hi) if lo <= hi else (v >= lo or v <= hi) for v in values)
        row.update(host_tsc=None, expected=lo, measured=values[0] if values else None,
                   host_source="bracket of host readings around the run", exact=False,
                   within_bracket=inside and bool(values), bracket=[lo, hi], mismatches=None)
        note = (note + "; " if note else "") + "host TSC per read not observable: checked within the bracket"
    row["note"] = note or "guest TSC == ((host TSC × multiplier) >> 48) + offset mod 2^64 for every read"
    return row


def run_model(n: int) -> list[Row]:
    rows = []
    for case, offset, multiplier, exiting in MODEL_CASES:
        level = TscLevel(offset, ONE if multiplier is None else multiplier)
        note = ""
        if exiting:
            note = "RDTSC exiting: every read is a VM exit, the value is the exit handler's, same formula"
        rows.append(_model_row(case, level, exiting, n, note=note))
    for case, (d1, m1), (d2, m2) in NESTED_CASES:
        l1, l2 = TscLevel(d1, _mult(m1)), TscLevel(d2, _mult(m2))
        # A nested hypervisor (L1) writes d2/m2 into its VMCS12 for L2; L0 already runs L1 with
        # d1/m1 in VMCS01. Hardware has one TSC level, so when L2 runs, L0 merges both into VMCS02:
        # offset = (d1 * m2 >> 48) + d2, multiplier = m1 * m2 >> 48 (hvm.vtx.tsc.compose, as KVM's
        # nested VMX does). We program that merged level into the model's single VMCS.
        merged = compose([l1, l2])
        if m1 == m2 == 1.0:
            def chapter(host: int, d1: int = d1, d2: int = d2) -> int:
                return (host + d1 + d2) & MASK64  # T_L2 = T_H + δ1 + δ2
            note = "T_L2 = T_H + δ1 + δ2 (the chapter's sum) for every read"
            row = _model_row(case, merged, False, n, expect=chapter, note=note)
        else:
            def stepwise(host: int, l1: TscLevel = l1, l2: TscLevel = l2) -> int:
                # T_L2 = ((T_L1 * m2) >> 48) + d2 with T_L1 = ((T_H * m1) >> 48) + d1
                return l2.apply(l1.apply(host))
            exact_in_steps = float(m1).is_integer() and float(m2).is_integer()
            if exact_in_steps:
                note = "general form, whole multipliers: merged level == L1 then L2 applied in turn"
                row = _model_row(case, merged, False, n, expect=stepwise, note=note)
            else:
                note = "general form, fractional multipliers: checked against the merged level (compose)"
                row = _model_row(case, merged, False, n, note=note)
                if row.get("host_tsc") is not None:
                    diff = _signed(row["measured"] - stepwise(row["host_tsc"]))
                    row["stepwise_minus_merged"] = -diff
                    row["note"] += f"; applying L1 then L2 in turn differs by {-diff} (48-bit rounding)"
        row.update(d1=d1, m1=m1, d2=d2, m2=m2, nested=True)
        rows.append(row)
    return rows


def _signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def run_kvm(n: int, offset: int) -> list[Row]:
    from hvm.kvm import api as K

    def setup(machine: Any) -> dict[str, Any]:
        vcpu = machine.engine.vcpu
        has = vcpu.has_device_attr(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET)
        out: dict[str, Any] = {"has_attr": has, "set_ok": False, "readback": None}
        if has:
            try:
                vcpu.set_device_attr(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET, offset & MASK64)
                out["set_ok"] = True
            except K.KvmError as exc:
                out["error"] = str(exc)
            out["readback"] = _signed(vcpu.get_device_attr(K.KVM_VCPU_TSC_CTRL, K.KVM_VCPU_TSC_OFFSET))
        return out

    _, port, _, before, after, attr = _run_guest("kvm", n, setup)
    values = [v for _, v in port.values]
    # KVM's offset is relative to the host TSC at the read, which userspace cannot see per read:
    # a guest value is right when it lies in [before + offset, after + offset].
    shifted = bool(values) and all(before + offset <= v <= after + offset for v in values)
    host_equal = bool(values) and all(before <= v <= after for v in values)
    row: Row = {
        "engine": "kvm",
        "case": "kvm_vcpu_tsc_offset",
        "offset": offset,
        "multiplier": 1.0,
        "multiplier_raw": ONE,
        "reads": len(values),
        "attr": attr,
        "host_source": "bracket of host readings around the run",
    }
    if attr["set_ok"] and attr["readback"] == offset and shifted:
        row.update(available=True, expected=before + offset, measured=values[0], exact=True,
                   note=f"KVM_VCPU_TSC_OFFSET {offset} read back; all {len(values)} guest reads lie in "
                   "[host before + offset, host after + offset]")
        return [row]
    if not attr["has_attr"]:
        why = "KVM_VCPU_TSC_OFFSET not offered by this kernel"
    elif not attr["set_ok"]:
        why = f"KVM_VCPU_TSC_OFFSET refused: {attr.get('error')}"
    elif host_equal:
        why = f"PVM: offset accepted, reads back {attr['readback']}, guest TSC = host TSC"
    else:
        why = (f"offset accepted, reads back {attr['readback']}, "
               "guest TSC is neither host TSC nor host + offset")
    row.update(available=False, expected=None, measured=None, exact=False,
               note=f"not available on this host ({why}); no measured value is reported")
    return [row]


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    n = params["n"]
    if engine == "model":
        progress(0, 1, "model: TSC offsetting, scaling and nesting")
        rows = run_model(n)
    else:
        progress(0, 1, "kvm: KVM_VCPU_TSC_OFFSET")
        rows = run_kvm(n, params["kvm_offset"])
    progress(1, 1, f"{engine}: done")
    return rows


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    for engine in sorted({r["engine"] for r in rows}):
        sub = [r for r in rows if r["engine"] == engine]
        if engine == "model":
            chapter = [r for r in sub if r.get("nested") and r.get("m1") == r.get("m2") == 1.0]
            exact = [r for r in chapter if r["exact"]]
            measured = (max(abs(_signed(r["measured"] - r["expected"])) for r in chapter)
                        if chapter and all(r.get("measured") is not None and r.get("expected") is not None
                                           for r in chapter) else None)
            why = (
                f"{len(exact)} of {len(chapter)} nested cases give exactly T_H + δ1 + δ2 for every read: the "
                "model applies the one merged VMCS02 level (offset δ1 + δ2) to the host TSC it reads, as "
                "hardware does for L2, so the chapter's sum holds to the cycle"
            )
            out.append(Comparison(FIGURES[0], engine, measured, why))
        else:
            row = sub[0]
            if row["available"]:
                why = "KVM applied the vCPU's TSC offset; per-read host values are unknown, so bracketed"
                out.append(Comparison(FIGURES[0], engine, 0, why))
            else:
                why = (
                    f"{row['note']}: without hardware TSC offsetting for natively run guest code there is "
                    "no δ to add, so the chapter's sum cannot be observed here"
                )
                out.append(Comparison(FIGURES[0], engine, None, why))
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, diffs, colors = [], [], []
    for r in rows:
        labels.append(f"{r['engine']}: {r['case']}")
        if r.get("available") and r.get("expected") is not None and r.get("measured") is not None:
            diffs.append(_signed(r["measured"] - r["expected"]))
            colors.append("#228833" if r["exact"] else "#cc6677")
        else:
            diffs.append(0)
            colors.append("#bbbbbb")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    ax.barh(labels, diffs, color=colors)
    for i, r in enumerate(rows):
        text = "exact" if r.get("exact") else "bracket" if r.get("available") else "not available here"
        ax.text(0, i, f"  {text}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("guest TSC − formula (cycles, first read)")
    ax.set_title("Guest-visible TSC vs ((host × mult) >> 48) + offset")
    ax.tick_params(axis="y", labelsize=7)
    return [save_figure(fig, out_dir, "tsc-formula.png")]


EXPERIMENT = Experiment(
    name="tsc",
    title="The guest TSC: ((host × multiplier) >> 48) + offset, and T_L2 = T_H + δ1 + δ2",
    claim=(
        "With TSC offsetting and scaling the guest reads ((host TSC × multiplier) >> 48) + offset; "
        "a nested guest reads T_H + δ1 + δ2 through the one merged VMCS02 level."
    ),
    figures=FIGURES,
    engines=("kvm", "model"),
    run=run,
    compare=compare,
    plot=plot,
    defaults={"n": 4, "kvm_offset": 1 << 40},
    quick={"n": 2, "kvm_offset": 1 << 40},
)
