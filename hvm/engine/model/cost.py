"""The cost model: how many processor cycles the modelled VM exits would have cost on hardware.

The model counts exits exactly; what they cost is a property of a real processor, so it is
modelled from a published measurement:

    A. Landau, M. Ben-Yehuda, A. Gordon, "SplitX: Split Guest/Hypervisor Execution on
    Multi-Core", USENIX WIOV 2011, section 1 and Table 1: on an Intel Xeon X5570 (Nehalem,
    2.93 GHz) with the KVM of Linux 2.6.34, guest with EPT and VPID, "the direct cost on its
    own is high: 2,000 cycles" -- the *direct* cost being the processor's world switch, VM exit
    plus the VM entry back to the guest, the same for every exit reason.

That is the default: 2,000 cycles per VM exit of any reason. The same paper shows that an
exit's *synchronous* cost (the hypervisor's handling) and *indirect* cost (cache and TLB
pollution) depend on the exit reason and can be an order of magnitude larger; their per-reason
values are not reproduced here. Give them per exit kind through ``handling`` (for instance from
kvm-unit-tests' ``vmexit`` test run on the machine you want to model), and the report carries
both parts. Events that are not VM exits (the host interrupting a run, an engine failure) cost 0.

Page walks: each memory reference a walk makes on a TLB miss (a guest paging-structure read or
an EPT read) is charged ``walk_ref`` cycles, by default :data:`WALK_REF_CYCLES` (4, an L1 hit:
a lower bound). The page walker's loads go through the data caches of the same Skylake
generation the TLB model's geometry comes from (Intel 64 and IA-32 Architectures Optimization
Reference Manual 248966-045, Table 2-14 "Cache Parameters of the Skylake Microarchitecture":
L1D 4, L2 12, L3 44 cycles); the leaves of a cold random walk often miss to L3 or DRAM, so
``CostModel(walk_ref=12)`` or 44 gives the figure for a walk served by L2 or L3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hvm.exits import ExitKind

SPLITX_DIRECT_CYCLES = 2000  # SplitX (WIOV 2011), Xeon X5570 + KVM 2.6.34: VM exit + VM entry
NOT_VM_EXITS = frozenset({ExitKind.INTR, ExitKind.INTERNAL_ERROR, ExitKind.SYSTEM_EVENT})

# --- address translation (the context-switch and page-walk experiments) ---------------------

#: Memory references of one TLB-miss walk. Shadow paging: the processor walks the 4-level shadow
#: tables (SDM Vol. 3A 4.5), 4 references. EPT: each of the guest's 4 paging-structure references
#: and the final guest-physical address go through a 4-level EPT walk: (4 + 1) * (4 + 1) - 1 = 24
#: references, the worst case of a two-dimensional walk, n*m + n + m for n guest and m nested
#: levels (Bhargava, Serebrin, Spadini, Manne, "Accelerating Two-Dimensional Page Walks for
#: Virtualized Systems", ASPLOS 2008). The chapter's w_g * w_h counts only the nested part.
WALK_REFS_SHADOW = 4
WALK_REFS_EPT_4_ON_4 = 24
#: Cycles per walk reference, a lower bound: every reference hits the L1 data cache, whose
#: load-to-use latency is 4 cycles on Skylake-class cores (Intel 64 and IA-32 Architectures
#: Optimization Reference Manual, Skylake microarchitecture, L1 data cache latency). References
#: that miss cost more; paging-structure caches, which skip references, are off by default in the
#: TLB model (hvm.vtx.tlb) and absent from walk_cycles.
WALK_REF_CYCLES = 4


@dataclass(frozen=True)
class CostModel:
    """Cycles charged per VM exit: a transition cost for every exit, plus handling per kind."""

    transition: int = SPLITX_DIRECT_CYCLES
    handling: Mapping[ExitKind, int] = field(default_factory=dict)
    walk_ref: int = WALK_REF_CYCLES  # per page-walk memory reference
    source: str = "SplitX (Landau et al., USENIX WIOV 2011): direct cost 2,000 cycles, Xeon X5570 + KVM"

    def cycles(self, kind: ExitKind | None) -> int:
        """Cycles for one exit of ``kind`` (None: a VM exit the engine completes itself)."""
        if kind in NOT_VM_EXITS:
            return 0
        return self.transition + (self.handling.get(kind, 0) if kind is not None else 0)


def walk_cycles(fills: int, refs_per_walk: int, cycles_per_ref: int = WALK_REF_CYCLES) -> int:
    """Modelled cycles of ``fills`` TLB-miss walks of ``refs_per_walk`` references each."""
    return fills * refs_per_walk * cycles_per_ref
