"""The trap engine: classic trap-and-emulate, the guest kernel deprivileged to ring 3, no VT-x.

Read top to bottom: :mod:`.engine` (the run loop, one trap, event delivery through the guest's
IDT, virtual versus real state), :mod:`.emulate` (each privileged instruction against the
virtual CPU), :mod:`.shadow` (the shadow GDT and shadow page tables), :mod:`.decode`
(capstone at the faulting RIP), :mod:`.cpu` (the real CPU: Unicorn in IA-32e mode at CPL 3)
and :mod:`.cost` (the modelled cycles of each step of a trap, measured on this host).
"""

from hvm.engine.trap.cost import TrapCostModel
from hvm.engine.trap.engine import TrapEngine

__all__ = ["TrapCostModel", "TrapEngine"]
