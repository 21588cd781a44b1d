"""Experiment `page-walk`: the two-body problem of memory, every walk reference counted.

The chapter ("内存的双体问题"): without hardware help each guest page-table read needs its own
host walk, so a w_g-level guest under a w_h-level host costs up to w_g x w_h memory lookups;
EPT/NPT lets the MMU do both walks.

The exact count (:mod:`hvm.vtx.walk`): every guest paging-structure entry *and* the final
guest-physical address need an h-level EPT walk, so a TLB miss under a g-level guest costs
``(g+1)h + g = (g+1)(h+1) - 1`` references before the data access: 24 for 4/4, 35 for 5/5. The
chapter's w_g x w_h (16 for 4/4) is the part of it spent locating the guest's own tables.

The guest (``pwalk32``/``pwalk64``) reads N pseudo-random pages of a region; this module is its
loader: it builds the guest's page tables of the depth and page size under test (32-bit, PAE,
4-level, 5-level; 4 KiB, 4 MiB/2 MiB, 1 GiB pages) and, for EPT rows, an EPT of 4 or 5 levels
with 4-KiB, 2-MiB or 1-GiB pages, and enters the guest with paging on.

Modes (rows ``{"mode", "guest_levels", "ept_levels", "page_size", "worst_case_refs",
"measured_refs_per_miss", "tlb_misses", "modelled_cycles", ...}``):

* ``native`` -- the model engine with EPT off in the secondary controls: the guest's walk alone
  (g references per miss), what the same guest costs on bare hardware;
* ``ept`` -- the model engine with the experiment's EPT: the 2-D walk;
* ``shadow`` -- the model engine with ``paging="shadow"`` (EPT off, the VMM's shadow MMU,
  :mod:`hvm.engine.model.shadow_paging`): a TLB miss walks the shadow tables, which are 4-level
  with 4-KiB pages whatever the guest's mode (:mod:`hvm.vmm.shadow`), and every first touch of a
  page is a hidden #PF VM exit while the shadow fills. No 5-level shadow rows: a 4-level shadow
  cannot map a 57-bit address space faithfully.

The model engine runs in its ``detailed`` TLB mode (:mod:`hvm.engine.model.tlbsim`): every
guest access goes through the modelled TLB (Skylake geometry), so the TLB misses and the
references per miss are exact for the model; by default the paging-structure caches are off
(``caches`` 0), so each miss makes the SDM's full walk, and ``caches`` N turns on N-entry
paging-structure caches, guest-physical mappings and EPT paging-structure caches. ``tlb`` fast
counts only the misses of Unicorn's own TLB instead (a lower bound; see the engine module).

Modelled cycles = walk references x :attr:`CostModel.walk_ref` (4, a Skylake L1 hit: a lower
bound, see :mod:`hvm.engine.model.cost`) + VM exits x the cost model's 2,000-cycle transition.

On KVM (item 6) the same 64-bit guest runs at CPL 3 under 4-level paging (the only mode that
runs natively on this PVM host), and the kernel's MMU counters are read before and after from
the binary statistics fd: pf_taken, pf_fixed, pf_emulate, pf_spurious, mmu_shadow_zapped,
mmu_pte_write, mmu_pde_zapped, mmu_flooded, mmu_recycled, mmu_cache_miss, mmu_unsync, tlb_flush,
invlpg, ... Under PVM there is no EPT: KVM's MMU is a *shadow* MMU, so every first touch of a
guest page is a page fault KVM handles (pf_taken / pf_fixed) while it builds shadow entries --
the shadow column of the comparison, counted by the kernel, not the 2-D walk of the model's EPT.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PagingMode
from hvm.vtx.walk import ept_levels_walked, guest_levels_walked, memory_levels, worst_case_refs

SECTION = "原理与机制 › 攻克内存和 I/O › 内存的双体问题"
QUOTE = (
    "如果客户机有一个 $w_g$ 级页表，而主机有一个 $w_h$ 级页表，那么在最坏的情况下，一次客户机内存访问"
    "可能需要 $w_g \\times w_h$ 次内存查找才能完成页表导航"
)
FIGURES = [
    ChapterFigure("lookups_4x4", "worst-case lookups per guest access, 4-level guest and host", 16,
                  "memory references", SECTION, QUOTE),
    ChapterFigure("lookups_5x5", "worst-case lookups per guest access, 5-level guest and host", 25,
                  "memory references", SECTION, QUOTE),
]

MODES = {"32": PagingMode.BITS32, "pae": PagingMode.PAE, "4": PagingMode.LEVEL4, "5": PagingMode.LEVEL5}
CODE = 0x10_0000  # the flat guest's load address
LOW = 2 << 20  # identity-mapped with 4-KiB pages: the code, the GDT
TABLES, TABLES_SIZE = 0x20_0000, 0x40_0000  # guest page tables (guest-physical)
REGION_GPA = 8 << 20
LA_BASE = {PagingMode.BITS32: 0x8000_0000, PagingMode.PAE: 0x8000_0000,
           PagingMode.LEVEL4: 0x7F_8000_0000, PagingMode.LEVEL5: 0xF0_0000_4000_0000}
SEED = 0x2545F4914F6CDD1D
SHADOW_LEVELS = 4  # hvm.vmm.shadow: the shadow is always 4-level with 4-KiB pages


class _Ram:
    """Guest RAM as 8-byte entries (guest-physical = host-physical here, before EPT is considered)."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.memory.read(addr, 8))[0]

    def write_u64(self, addr: int, value: int) -> None:
        self.memory.write(addr, struct.pack("<Q", value))


def page_sizes(mode: PagingMode) -> tuple[int, ...]:
    if mode is PagingMode.BITS32:
        return (PAGE_4K, PAGE_4M)
    if mode is PagingMode.PAE:
        return (PAGE_4K, PAGE_2M)
    return (PAGE_4K, PAGE_2M, PAGE_1G)


def build_guest(memory: Any, mode: PagingMode, page_size: int, region_pages: int):
    """The guest's page tables: low 2 MiB identity (4-KiB pages), the region at LA_BASE; returns
    (PagingRegs, linear base of the region)."""
    from hvm.vtx.pagetables import GuestTables

    tables = GuestTables(_Ram(memory), TABLES, TABLES_SIZE, mode)
    tables.map(0, 0, LOW)
    region = region_pages * PAGE_4K
    if page_size == PAGE_1G:  # a 1-GiB page must map a 1-GiB-aligned GPA: map GPA 0, use its RAM
        tables.map(LA_BASE[mode], 0, PAGE_1G, page_size=PAGE_1G)
        return tables.regs(), LA_BASE[mode] + REGION_GPA
    span = -(-region // page_size) * page_size
    tables.map(LA_BASE[mode], REGION_GPA, span, page_size=page_size)
    return tables.regs(), LA_BASE[mode]


def _entry_state(regs: Any, mode: PagingMode, base: int, pages: int, n: int, cpl: int = 0) -> Any:
    from hvm.boot import layout as L
    from hvm.boot.gdt import GDT_LIMIT
    from hvm.cpu import CpuState, DescriptorTable, flat_segment

    state = CpuState()
    state.gdt = DescriptorTable(L.GDT_ADDR, GDT_LIMIT)
    state.idt = DescriptorTable(0, 0)
    state.cr0 = regs.cr0 | (1 << 5) | (1 << 4)  # NE, ET
    state.cr3, state.cr4, state.efer = regs.cr3, regs.cr4, regs.efer
    long_mode = mode in (PagingMode.LEVEL4, PagingMode.LEVEL5)
    state.cs = flat_segment(L.SEL_CODE64 if long_mode else L.SEL_CODE32, code=True, long_mode=long_mode)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, flat_segment(L.SEL_DATA, code=False))
    state.rip = CODE
    state.regs.update(rdi=base, rsi=pages - 1, rcx=n, rbx=SEED)
    return state


def model_row(mode_name: str, guest: str, page_size: int, ept_levels: int | None, ept_page: int,
              n: int, pages: int, caches: int = 0, tlb: str = "detailed") -> Row:
    """One run of the cold random-access guest on the model engine.

    ``mode_name`` native (EPT off), ept (the experiment's EPT of ``ept_levels`` levels and
    ``ept_page`` pages) or shadow (``paging="shadow"``)."""
    from hvm import guests
    from hvm.boot.gdt import write_gdt
    from hvm.vmm.machine import Machine, MachineConfig
    from hvm.vtx.capabilities import MODEL_CAPS
    from hvm.vtx.controls import ProcBased2
    from hvm.vtx.ept import EptBuilder
    from hvm.vtx.vmcs import VmcsField as F

    mode = MODES[guest]
    mem = REGION_GPA + pages * PAGE_4K + (2 << 20)
    config = MachineConfig(engine="model", mem_size=mem, console=lambda b: None,
                           engine_options={"tlb": tlb, "tlb_caches": caches,
                                           "paging": "shadow" if mode_name == "shadow" else "ept"})
    machine = Machine(config)
    try:
        engine = machine.engine
        image = guests.image_path("pwalk64" if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5) else "pwalk32")
        machine.memory.write(CODE, image.read_bytes())
        write_gdt(machine.memory)
        regs, base = build_guest(machine.memory, mode, page_size, pages)
        vmcs = engine.vmcs
        proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL)
        if mode_name == "shadow":
            pass  # the engine's shadow paging programs the VMCS (hvm.engine.model.shadow_paging)
        elif ept_levels is None:
            proc2 &= ~int(ProcBased2.ENABLE_EPT | ProcBased2.UNRESTRICTED_GUEST)
        else:
            table_pages = 8 + (mem // PAGE_2M + 2 if ept_page == PAGE_4K else 0)
            pool = engine.host.allocate(table_pages)
            ept = EptBuilder(engine.host, pool, table_pages * PAGE_4K, levels=ept_levels)
            if ept_page == PAGE_1G:
                ept.map(0, 0, PAGE_1G, page_size=PAGE_1G)
            else:
                ept.map(0, 0, -(-mem // ept_page) * ept_page, page_size=ept_page)
            vmcs.vmwrite(F.EPT_POINTER, ept.eptp)
        vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, MODEL_CAPS.procbased_ctls2.adjust(proc2))
        state = _entry_state(regs, mode, base, pages, n)
        machine.entry_state = state
        engine.set_state(state)
        result = machine.run(timeout=600)
    finally:
        machine.close()
    counters = result.engine_counters
    misses = counters.get("tlb.tlb_misses", 0)
    data_misses, data_refs = counters.get("tlb.data_misses", 0), counters.get("tlb.data_walk_refs", 0)
    refs = counters.get("tlb.walk_refs", 0)
    exits = counters.get("exits", 0)
    g = memory_levels(mode)
    cost_walk = counters.get("tlb.modelled_walk_cycles", 0)
    cost_exits = counters.get("modelled_overhead_cycles", 0)
    effective = PAGE_4K if mode_name == "shadow" else min(page_size, ept_page) if ept_levels else page_size
    return {
        "engine": "model",
        "mode": mode_name,
        "guest": guest,
        "guest_levels": {PagingMode.BITS32: 2, PagingMode.PAE: 3}.get(mode, g),
        "guest_levels_read": g,
        "ept_levels": ept_levels,
        "page_size": page_size,
        "ept_page_size": ept_page if ept_levels else None,
        # shadow: the processor walks the shadow tables, 4-level (IA-32e) whatever the guest's mode
        "worst_case_refs": SHADOW_LEVELS if mode_name == "shadow" else worst_case_refs(g, ept_levels),
        "refs_per_miss_at_page_size": (SHADOW_LEVELS if mode_name == "shadow"
                                       else _refs(mode, page_size, ept_levels, ept_page)),
        # per TLB miss of the guest's random data accesses (instruction fetches excluded)
        "measured_refs_per_miss": data_refs / data_misses if data_misses else None,
        "measured_ept_refs_for_tables_per_miss": (
            counters.get("tlb.data_ept_refs_for_tables", 0) / data_misses
            if data_misses and ept_levels else None),
        "tlb_misses": misses,
        "data_tlb_misses": data_misses,
        "walk_refs": refs,
        "walk_refs_by_kind": {k.split(".", 2)[2]: v for k, v in counters.items()
                              if k.startswith("tlb.walk_refs.")},
        "misses_by_page_size": {k.rsplit(".", 1)[1]: v for k, v in counters.items()
                                if k.startswith("tlb.misses_by_page_size.")},
        "tlb_page_size": effective,
        "vm_exits": exits,
        "shadow_hidden_faults": counters.get("shadow_hidden_faults"),  # #PF exits that filled the shadow
        "modelled_cycles": cost_walk + cost_exits,
        "modelled_walk_cycles": cost_walk,
        "walk_mismatches": counters.get("tlb.walk_mismatches", 0),
        "caches": caches,
        "tlb_mode": tlb,
        "n": n,
        "region_pages": pages,
        "finished": result.exit_status == 1,
        "reason": result.reason,
        "wall_s": result.wall_s,
    }


def _refs(mode: PagingMode, page_size: int, ept_levels: int | None, ept_page: int) -> int:
    """References of one miss with no caches, from the walk's structure (large pages shorten it)."""
    g = guest_levels_walked(mode, page_size)
    if not ept_levels:
        return g
    h = ept_levels_walked(ept_levels, ept_page)
    return (g + 1) * (h + 1) - 1


# --- KVM (item 6): the kernel's MMU counters beside the model's ---------------------------------

MMU_STATS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created",
             "pf_guest", "tlb_flush", "invlpg", "exits", "mmu_shadow_zapped", "mmu_pte_write",
             "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss", "mmu_unsync",
             "pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush", "remote_tlb_flush_requests")
SEL_USER_DATA, SEL_USER_CODE64 = 0x23, 0x2B  # GDT entries 4 and 5, RPL 3


def _user_gdt(memory: Any) -> int:
    """The loader's flat GDT plus ring-3 data and 64-bit code descriptors; returns its limit."""
    from hvm.boot import layout as L
    from hvm.boot.gdt import GDT_ENTRIES

    # SDM Vol. 3A 3.4.5: DPL 3 (bits 46:45), present, S = 1; data type 2 (read/write), code type 0xA, L = 1
    user_data, user_code64 = 0x00CF_F200_0000_FFFF, 0x00AF_FA00_0000_FFFF
    entries = [*GDT_ENTRIES, user_data, user_code64]
    memory.write(L.GDT_ADDR, struct.pack(f"<{len(entries)}Q", *entries))
    return 8 * len(entries) - 1


def _kvm_note(result: Any, page_size: int, delta: dict[str, int], pdpe1gb: bool) -> str:
    if result.exit_status != 1:
        why = (" -- KVM_GET_SUPPORTED_CPUID here lacks PDPE1GB (CPUID.80000001H:EDX[26]), so the PS bit of "
               "the guest's PDPTE is reserved and the access faults (SDM 4.5)"
               if page_size == PAGE_1G and not pdpe1gb else "")
        return f"not available on this host: {result.reason}{why}"
    return (f"KVM's shadow MMU (PVM, no EPT): {delta.get('pf_fixed', 0)} guest page faults fixed by the "
            f"kernel, {delta.get('pages_4k', 0)} 4-KiB / {delta.get('pages_2m', 0)} 2-MiB shadow pages")


def kvm_row(page_size: int, n: int, pages: int) -> Row:
    """The 64-bit guest at CPL 3 under 4-level paging on KVM; the kernel's MMU counters, before and after."""
    from hvm import guests
    from hvm.boot import layout as L
    from hvm.cpu import CpuState, DescriptorTable, flat_segment
    from hvm.vmm.machine import Machine, MachineConfig

    mode = PagingMode.LEVEL4
    mem = REGION_GPA + pages * PAGE_4K + (2 << 20)
    machine = Machine(MachineConfig(engine="kvm", mem_size=mem, console=lambda b: None))
    try:
        machine.memory.write(CODE, guests.image_path("pwalk64").read_bytes())
        limit = _user_gdt(machine.memory)
        regs, base = build_guest(machine.memory, mode, page_size, pages)
        state = CpuState()
        state.gdt, state.idt = DescriptorTable(L.GDT_ADDR, limit), DescriptorTable(0, 0)
        state.cr0 = regs.cr0 | (1 << 5) | (1 << 4)  # NE, ET
        state.cr3, state.cr4, state.efer = regs.cr3, regs.cr4, regs.efer
        state.cs = flat_segment(SEL_USER_CODE64, code=True, long_mode=True, dpl=3)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(state, name, flat_segment(SEL_USER_DATA, code=False, dpl=3))
        state.rflags = 0x3002  # IOPL 3: the guest's OUT to isa-debug-exit runs at CPL 3
        state.rip = CODE
        state.regs.update(rdi=base, rsi=pages - 1, rcx=n, rbx=SEED)
        machine.entry_state = state
        machine.engine.set_state(state)
        cpuid = machine.engine.system.supported_cpuid()
        entries = list(cpuid.entries)[: cpuid.nent]
        pdpe1gb = any(e.function == 0x8000_0001 and e.edx >> 26 & 1 for e in entries)
        before = machine.engine.counters()
        result = machine.run(timeout=300)
    finally:
        machine.close()
    after = result.engine_counters
    delta = {k: after[k] - before.get(k, 0) for k in MMU_STATS if k in after}
    return {
        "engine": "kvm",
        "mode": "shadow",  # KVM on PVM: no EPT, the kernel's shadow MMU
        "guest": "4",
        "guest_levels": 4,
        "guest_levels_read": 4,
        "ept_levels": None,
        "page_size": page_size,
        "worst_case_refs": worst_case_refs(4, None),
        "measured_refs_per_miss": None,  # no way to count the hardware walker's reads from here
        "tlb_misses": None,
        "modelled_cycles": None,
        "kvm_mmu_stats": delta,
        "available": result.exit_status == 1,
        "note": _kvm_note(result, page_size, delta, pdpe1gb),
        "n": n,
        "region_pages": pages,
        "finished": result.exit_status == 1,
        "reason": result.reason,
        "wall_s": result.wall_s,
    }


# --- the experiment ------------------------------------------------------------------------------

def _plan(params: dict[str, Any]) -> list[tuple]:
    """(mode, guest, page size, EPT levels, EPT page size, caches) of each model run."""
    runs = []
    for guest in params["guests"]:
        mode = MODES[guest]
        for size in page_sizes(mode):
            runs.append(("native", guest, size, None, PAGE_4K, 0))
            for levels, ept_page in params["ept"]:
                runs.append(("ept", guest, size, levels, ept_page, 0))
            if mode is not PagingMode.LEVEL5:  # the shadow MMU is 4-level: no faithful LA57 shadow
                runs.append(("shadow", guest, size, None, PAGE_4K, 0))
    for caches in params["caches"]:
        if caches:
            for guest, levels in (("4", 4), ("5", 5)):
                if guest in params["guests"]:
                    runs.append(("native", guest, PAGE_4K, None, PAGE_4K, caches))
                    runs.append(("ept", guest, PAGE_4K, levels, PAGE_4K, caches))
    return runs


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    n, pages = params["n"], params["pages"]
    if not isinstance(pages, int) or pages < 1 or pages & (pages - 1) or pages > 1 << 18:
        raise ValueError(f"pages={pages}: the guest needs a power of two up to {1 << 18} (1 GiB)")
    if not isinstance(n, int) or not 1 <= n < 1 << 32:
        raise ValueError(f"n={n}: the guest needs 1 <= n < 2**32 reads")
    params = {**params, "guests": [str(g) for g in params["guests"]]}
    unknown = sorted(set(params["guests"]) - set(MODES))
    if unknown:
        raise ValueError(f"guests {unknown}: choose from {sorted(MODES)}")
    if engine == "kvm":
        sizes = (PAGE_4K, PAGE_2M, PAGE_1G)
        rows = []
        for i, size in enumerate(sizes):
            progress(i, len(sizes), f"kvm: 4-level guest at CPL 3, {size >> 10} KiB pages")
            rows.append(kvm_row(size, n, pages))
        progress(len(sizes), len(sizes), "kvm: done")
        return rows
    plan = _plan(params)
    rows = []
    for i, (mode, guest, size, levels, ept_page, caches) in enumerate(plan):
        what = f"model: {mode} guest {guest} {size >> 10} KiB"
        what += f" EPT {levels}-level {ept_page >> 10} KiB" if levels else ""
        progress(i, len(plan), what + (f" caches {caches}" if caches else ""))
        rows.append(model_row(mode, guest, size, levels, ept_page, n, pages, caches,
                              params.get("tlb", "detailed")))
    progress(len(plan), len(plan), "model: done")
    return rows


def _find(rows: list[Row], **match: Any) -> Row | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    model = [r for r in rows if r["engine"] == "model"]
    if model:
        for figure, guest, h in ((FIGURES[0], "4", 4), (FIGURES[1], "5", 5)):
            ept = _find(model, mode="ept", guest=guest, ept_levels=h, page_size=PAGE_4K,
                        ept_page_size=PAGE_4K, caches=0)
            if ept is None or ept["measured_refs_per_miss"] is None:
                out.append(Comparison(figure, "model", None,
                                      f"no row for a {guest}-level guest under a {h}-level EPT"))
                continue
            native = _find(model, mode="native", guest=guest, page_size=PAGE_4K, caches=0)
            shadow = _find(model, mode="shadow", guest=guest, page_size=PAGE_4K, caches=0)
            cached = next((r for r in model if r["mode"] == "ept" and r["guest"] == guest and r["caches"]
                           and r["ept_levels"] == h and r["page_size"] == PAGE_4K), None)
            parts = [f"per TLB miss of the cold random guest the model counted "
                     f"{ept['measured_refs_per_miss']:g} references "
                     f"(worst case (g+1)(h+1)-1 = {ept['worst_case_refs']}): "
                     f"{ept['measured_ept_refs_for_tables_per_miss']:g} EPT reads locating the guest's "
                     f"{guest} tables -- the chapter's w_g x w_h -- plus {h} EPT reads for the final GPA and "
                     f"{guest} guest reads, which the chapter's product leaves out"]
            if native:
                parts.append(f"native: {native['measured_refs_per_miss']:g}")
            if shadow:
                parts.append(f"shadow: {shadow['measured_refs_per_miss']:g} per miss but "
                             f"{shadow['vm_exits']} VM exits ({shadow['modelled_cycles']:,} vs EPT "
                             f"{ept['modelled_cycles']:,} modelled cycles)")
            if cached is not None and cached["measured_refs_per_miss"] is not None:
                parts.append(f"with {cached['caches']}-entry paging-structure caches: "
                             f"{cached['measured_refs_per_miss']:.1f}")
            out.append(Comparison(figure, "model", ept["measured_ept_refs_for_tables_per_miss"],
                                  "; ".join(parts)))
    kvm = [r for r in rows if r["engine"] == "kvm"]
    if kvm:
        r = _find(kvm, page_size=PAGE_4K) or kvm[0]
        stats = r["kvm_mmu_stats"]
        shown = ", ".join(f"{k}={v}" for k, v in stats.items() if v)
        twin = _find(model, mode="shadow", guest="4", page_size=PAGE_4K, n=r["n"],
                     region_pages=r["region_pages"])
        if twin is not None:
            shown += (f" (the model's shadow paging took {twin['shadow_hidden_faults']} hidden-#PF exits "
                      "on the same guest)")
        out.append(Comparison(FIGURES[0], "kvm", None, (
            f"not measurable here: KVM on PVM has no EPT, its MMU shadows the guest's tables, so there is no "
            f"2-D walk to count; for {r['n']} random reads of {r['region_pages']} pages the kernel counted "
            f"{shown or 'no MMU events'} -- page faults taken and fixed while it builds shadow entries, the "
            f"cost shadow paging pays instead of longer walks")))
    return out


def _size(size: int) -> str:
    """4K, 2M, 4M, 1G."""
    for unit, shift in (("G", 30), ("M", 20)):
        if size >= 1 << shift:
            return f"{size >> shift}{unit}"
    return f"{size >> 10}K"


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    from hvm.engine.model.cost import CostModel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = [r for r in rows if r["engine"] == "model" and not r["caches"] and r["measured_refs_per_miss"]]
    if not model:
        return []
    labels = [f"{r['guest']} {_size(r['page_size'])} {r['mode']}"
              + (f" {r['ept_levels']}L/{_size(r['ept_page_size'])}" if r["ept_levels"] else "")
              for r in model]
    colors = {"native": "#228833", "ept": "#4477aa", "shadow": "#cc6677"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.22 * len(model) + 2), sharey=True)
    y = range(len(model))
    a.barh(y, [r["measured_refs_per_miss"] for r in model], color=[colors[r["mode"]] for r in model])
    a.scatter([r["worst_case_refs"] for r in model], y, marker="|", color="black", s=80, label="worst case")
    a.set_yticks(list(y), labels, fontsize=6)
    a.invert_yaxis()
    a.set_xlabel("memory references per data TLB miss (measured)")
    a.legend(fontsize=7)
    b.barh(y, [r["modelled_cycles"] for r in model], color=[colors[r["mode"]] for r in model])
    b.set_xscale("log")
    cost = CostModel()
    b.set_xlabel(f"modelled cycles (walk refs x {cost.walk_ref} + VM exits x {cost.transition:,})")
    fig.suptitle("Page walks: native vs EPT vs shadow (model engine, detailed TLB)")
    return [save_figure(fig, out_dir, "page-walk.png")]


EXPERIMENT = Experiment(
    name="page-walk",
    title="The two-body problem of memory: nested versus shadow paging, every walk counted",
    claim=("A TLB miss under a g-level guest and an h-level EPT costs (g+1)(h+1)-1 memory references "
           "(24 for 4/4, 35 for 5/5), of which the chapter's w_g x w_h are the EPT reads that locate the "
           "guest's tables; large pages shorten both walks; shadow paging walks g levels but pays VM exits."),
    figures=FIGURES,
    engines=("kvm", "model"),
    run=run,
    compare=compare,
    plot=plot,
    defaults={"n": 4000, "pages": 4096, "guests": ["32", "pae", "4", "5"],
              "ept": [[4, PAGE_4K], [5, PAGE_4K], [4, PAGE_2M], [4, PAGE_1G]], "caches": [0, 32],
              "tlb": "detailed"},
    quick={"n": 150, "pages": 512, "guests": ["32", "4", "5"],
           "ept": [[4, PAGE_4K], [5, PAGE_4K], [4, PAGE_2M]], "caches": [0, 32], "tlb": "detailed"},
)
