"""Shadow structures: what the real CPU uses in place of the guest's GDT and page tables.

The guest's control registers, GDTR and page tables are *virtual*: the real CPU never loads
them. Instead the hypervisor keeps, in memory of its own (:class:`HypervisorMemory`):

* a **shadow GDT** (:func:`shadow_descriptor`): the guest's descriptors with DPL forced to 3,
  so that the guest kernel's own selectors load at CPL 3 (ring deprivileging, or "ring
  compression"); system descriptors (TSS, LDT, gates) are left not present, since the
  hypervisor keeps TR and LDTR itself. It is rebuilt at LGDT and whenever the guest writes its
  GDT (the GDT's pages are write-protected like page tables);
* **shadow page tables** (:class:`hvm.vmm.shadow.ShadowMmu`, shared with the model engine's
  ``paging="shadow"`` mode; :func:`trap_shadow_mmu` adds the hypervisor's region): 4-level
  tables that map guest-linear pages straight to the host-physical page holding the
  guest-physical frame (guest RAM is at host-physical 0, so host-physical = guest-physical).
  They are filled lazily: every #PF the real CPU raises reaches the hypervisor, which walks
  the guest's own tables
  (:func:`hvm.vtx.paging.translate`, setting the guest's accessed/dirty flags as the CPU would)
  and either installs the translation (a *hidden* fault, the guest never sees it) or reflects
  a #PF to the guest (a *true* fault). With guest paging off the shadow is an identity map.

The classic rules, as VMware's and Xen's shadow MMUs follow them:

* pages the walks read as paging structures (and the GDT's pages) are **write-protected** in
  every shadow entry that maps them; a guest write to one faults, the hypervisor lets exactly
  that instruction write (the entry is made writable, the CPU single-steps, the entry is made
  read-only again) and drops every shadow entry whose walk went through the written table;
* a page is mapped writable only after a write access walked to it, so the guest's dirty flag
  is set before any write lands (read accesses map it read-only), and executable only after a
  fetch walked to it (the real EFER.NXE is 1), so the engine scans each code page before its
  code runs;
* a guest MOV to CR3 (or a change of CR0.PG/WP, CR4.PAE/PSE, EFER.NXE) **switches** to the shadow
  root cached for the new registers (an empty one the first time); INVLPG drops the one entry.

The top 4 MiB of the linear address space belong to the hypervisor (:data:`HV_LINEAR`): the
shadow GDT and the (never used) real IDT live there, mapped supervisor-only, so the guest at
CPL 3 cannot touch them -- but SGDT and SIDT, which do not trap, show their addresses.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable

from hvm.vmm.memory import PAGE_SIZE, GuestMemory
from hvm.vmm.shadow import Fill, Policy, ShadowMmu, ShadowStats
from hvm.vtx.paging import PagingRegs

__all__ = ["Fill", "ShadowMmu", "ShadowStats", "trap_shadow_mmu"]

HV_PHYS = 0x40_0000_0000  # host-physical base of the hypervisor's memory (above any guest RAM)
HV_LINEAR = 0xFFFF_FFFF_FFC0_0000  # where the real GDT and IDT are mapped (PML4 511, PDPT 511, PD 510)
GDT_PAGES = 16  # the largest GDT: 8192 descriptors
# Hypervisor pages, by index from HV_PHYS
_HV_PDPT, _HV_PD, _HV_PT = 0, 1, 2
_GDT_PAGE = 3
_IDT_PAGE = _GDT_PAGE + GDT_PAGES
_POOL_PAGE = 32
POOL_PAGES = 512  # shadow paging structures; when they run out, cached roots are evicted
HV_SIZE = (_POOL_PAGE + POOL_PAGES) * PAGE_SIZE
REAL_GDT_BASE = HV_LINEAR
REAL_IDT_BASE = HV_LINEAR + GDT_PAGES * PAGE_SIZE

_P, _RW = 1, 2
_U64 = struct.Struct("<Q")


class HypervisorMemory:
    """The hypervisor's own pages at :data:`HV_PHYS` (mapped into Unicorn, never into the guest)."""

    def __init__(self) -> None:
        self.mem = mmap.mmap(-1, HV_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.mem)

    @property
    def host_addr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    @staticmethod
    def page(index: int) -> int:
        return HV_PHYS + index * PAGE_SIZE

    def read_u64(self, hpa: int) -> int:
        return _U64.unpack_from(self.view, hpa - HV_PHYS)[0]

    def write_u64(self, hpa: int, value: int) -> None:
        _U64.pack_into(self.view, hpa - HV_PHYS, value)

    def write(self, hpa: int, data: bytes) -> None:
        offset = hpa - HV_PHYS
        self.view[offset : offset + len(data)] = data

    def clear(self, hpa: int, length: int) -> None:
        offset = hpa - HV_PHYS
        self.view[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.view.release()
        self.mem.close()


# --- the shadow GDT ---------------------------------------------------------------------------

DESC_S = 1 << 44  # code/data (1) or system (0) descriptor (SDM Vol. 3A 3.4.5)
DESC_DPL_SHIFT = 45
DESC_P = 1 << 47


def shadow_descriptor(raw: int) -> int:
    """The descriptor the real GDT holds for guest descriptor ``raw``: DPL 3, or not present."""
    if not raw & DESC_S:
        return raw & ~DESC_P  # TSS, LDT, gates: the hypervisor keeps TR and LDTR itself
    return raw | 3 << DESC_DPL_SHIFT


def descriptor_dpl(raw: int) -> int:
    return raw >> DESC_DPL_SHIFT & 3


def write_shadow_gdt(hv: HypervisorMemory, guest_gdt: bytes) -> None:
    """Fill the real GDT from the guest's (whole descriptors; the rest of the table is cleared)."""
    count = len(guest_gdt) // 8
    entries = struct.unpack(f"<{count}Q", guest_gdt[: count * 8])
    hv.clear(hv.page(_GDT_PAGE), GDT_PAGES * PAGE_SIZE)
    hv.write(hv.page(_GDT_PAGE), struct.pack(f"<{count}Q", *(shadow_descriptor(e) for e in entries)))


# --- shadow page tables: the shared MMU (hvm.vmm.shadow), with the hypervisor's region ----------


def trap_shadow_mmu(
    hv: HypervisorMemory, guest: GuestMemory, regs: Callable[[], PagingRegs], flush: Callable[[], None]
) -> ShadowMmu:
    """The trap engine's shadow MMU: every root also maps the hypervisor's region (supervisor-only:
    PML4[511] -> PDPT[511] -> PD[510] -> the shadow GDT and IDT), and entries allow only what the
    faulting access verified (:attr:`Policy.VERIFIED`: the code-page scanner sees every first fetch)."""
    hv.write_u64(hv.page(_HV_PDPT) + 511 * 8, hv.page(_HV_PD) | _P | _RW)
    hv.write_u64(hv.page(_HV_PD) + 510 * 8, hv.page(_HV_PT) | _P | _RW)
    for i in range(GDT_PAGES + 1):
        hv.write_u64(hv.page(_HV_PT) + i * 8, hv.page(_GDT_PAGE + i) | _P | _RW)

    def root_init(root: int) -> None:
        hv.write_u64(root + 511 * 8, hv.page(_HV_PDPT) | _P | _RW)

    return ShadowMmu(hv, guest, guest.size, regs, flush, pool_base=hv.page(_POOL_PAGE), pool_pages=POOL_PAGES,
                     policy=Policy.VERIFIED, root_init=root_init)
