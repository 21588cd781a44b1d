"""The model engine: Intel VT-x as a software model over the Unicorn CPU emulator.

Read top to bottom: :mod:`.engine` (VM entry, the run loop, VM exits, the TLB fill with the
guest-paging and EPT walks, MMIO), :mod:`.instructions` (which sensitive instruction exits
under which VMCS control, with what qualification), :mod:`.decode` and :mod:`.codepages` (how
every sensitive instruction is intercepted without a hook on all code), :mod:`.vmcs` (the
current VMCS, guest-state checks, KVM-like defaults), :mod:`.events` (exception delivery,
double and triple faults), :mod:`.cpu` (state in and out of Unicorn), :mod:`.cost` (the cycle
cost model) and :mod:`.cpuid` (the CPUID policy).
"""

from hvm.engine.model.cost import CostModel
from hvm.engine.model.engine import ModelEngine

__all__ = ["CostModel", "ModelEngine"]
