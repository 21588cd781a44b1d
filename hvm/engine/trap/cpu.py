"""The real processor under the trap engine: a Unicorn x86-64 CPU in IA-32e mode at CPL 3.

The state load/save of the model engine (:class:`hvm.engine.model.cpu.UnicornCpu`: segment
descriptor caches and QEMU's ``hflags`` written through a saved context) serves here too. Two
more fields of QEMU's ``CPUX86State`` are needed, because Unicorn hands every exception to a hook
and never runs QEMU's own delivery (``do_interrupt_all``):

* ``exception_is_int``: set for INT n, INT3 and INTO (software interrupts report their vector,
  with EIP already past the instruction), clear for faults (EIP at the faulting instruction);
* ``old_exception``: the "exception in flight" that QEMU's double-fault logic consults
  (``check_exception``). ``do_interrupt_all`` resets it to -1 once an exception is delivered;
  Unicorn never does, so after a #PF the next #GP would be raised as a #DF. The hypervisor
  finishes each trap with :meth:`TrapCpu.end_exception`, which resets it as delivery would.

Both sit beside fields the model engine already locates with sentinels (``error_code`` is at
``dr[0]`` - 16): ``int error_code; int exception_is_int; target_ulong exception_next_eip;
target_ulong dr[8]; union { void *bp[4]; }; int old_exception;`` (Unicorn 2.1's
``qemu/target/i386/cpu.h``).
"""

from __future__ import annotations

import ctypes

from hvm.cpu import CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE
from hvm.engine.model.cpu import UnicornCpu

# What the hypervisor runs the real CPU with, whatever the guest believes (its CR0/CR3/CR4/EFER
# are virtual): protected mode with paging through the shadow tables, in IA-32e mode so that one
# shadow format (4-level) serves every guest paging mode; 32-bit guest code runs in
# compatibility mode. NE and MP are set as a host kernel sets them; SMSW shows these bits.
# NXE lets shadow entries be non-executable, so #PF reports instruction fetches (I/D).
REAL_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
REAL_CR4 = CR4_PAE
REAL_EFER = EFER_LME | EFER_LMA | EFER_NXE
CR0_EM, CR0_TS = 1 << 2, 1 << 3
CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 9, 1 << 10
#: guest CR0/CR4 bits the real registers carry too (FPU/SSE behaviour the guest's code relies on)
CR0_MIRRORED = CR0_MP | CR0_EM | CR0_TS
CR4_MIRRORED = CR4_OSFXSR | CR4_OSXMMEXCPT

_IS_INT = -12  # offsets from dr[0], see the module docstring
_OLD_EXCEPTION = 8 * 8 + 4 * 8


class TrapCpu(UnicornCpu):
    """:class:`UnicornCpu` plus the two exception fields the trap path needs."""

    @property
    def exception_is_int(self) -> bool:
        """Was the last event INT n/INT3/INTO (as of the last :meth:`sync`)?"""
        return bool(ctypes.c_int32.from_address(self._base + self._dr + _IS_INT).value)

    def end_exception(self) -> None:
        """The hypervisor has handled the trap: no exception is in flight any more."""
        self.sync()
        ctypes.c_int32.from_address(self._base + self._dr + _OLD_EXCEPTION).value = -1
        self.uc.context_restore(self._ctx)
