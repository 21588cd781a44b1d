"""Shadow structures: what the real CPU uses in place of the guest's GDT and page tables.

The guest's control registers, GDTR and page tables are *virtual*: the real CPU never loads
them. Instead the hypervisor keeps, in memory of its own (:class:`HypervisorMemory`):

* a **shadow GDT** (:func:`shadow_descriptor`): the guest's descriptors with DPL forced to 3,
  so that the guest kernel's own selectors load at CPL 3 (ring deprivileging, or "ring
  compression"); system descriptors (TSS, LDT, gates) are left not present, since the
  hypervisor keeps TR and LDTR itself. It is rebuilt at LGDT and whenever the guest writes its
  GDT (the GDT's pages are write-protected like page tables);
* **shadow page tables** (:class:`ShadowMmu`): 4-level tables that map guest-linear pages
  straight to the host-physical page holding the guest-physical frame (guest RAM is at
  host-physical 0, so host-physical = guest-physical). They are filled lazily: every #PF the
  real CPU raises reaches the hypervisor, which walks the guest's own tables
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
* a guest MOV to CR3 (or a change of CR0.PG/WP, CR4.PAE/PSE/PGE, EFER.NXE) **drops** the whole
  shadow; INVLPG drops the one entry.

The top 4 MiB of the linear address space belong to the hypervisor (:data:`HV_LINEAR`): the
shadow GDT and the (never used) real IDT live there, mapped supervisor-only, so the guest at
CPL 3 cannot touch them -- but SGDT and SIDT, which do not trap, show their addresses.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from hvm.vmm.memory import PAGE_SIZE, GuestMemory
from hvm.vtx.paging import Access, PageFault, PagingMode, PagingRegs, Translation, load_pdptes, translate

HV_PHYS = 0x40_0000_0000  # host-physical base of the hypervisor's memory (above any guest RAM)
HV_LINEAR = 0xFFFF_FFFF_FFC0_0000  # where the real GDT and IDT are mapped (PML4 511, PDPT 511, PD 510)
GDT_PAGES = 16  # the largest GDT: 8192 descriptors
# Hypervisor pages, by index from HV_PHYS
_HV_PDPT, _HV_PD, _HV_PT = 0, 1, 2
_GDT_PAGE = 3
_IDT_PAGE = _GDT_PAGE + GDT_PAGES
_POOL_PAGE = 32
POOL_PAGES = 512  # shadow paging structures; when they run out the whole shadow is dropped
HV_SIZE = (_POOL_PAGE + POOL_PAGES) * PAGE_SIZE
REAL_GDT_BASE = HV_LINEAR
REAL_IDT_BASE = HV_LINEAR + GDT_PAGES * PAGE_SIZE

_P, _RW, _US = 1, 2, 4
_XD = 1 << 63  # execute-disable (the real EFER.NXE is 1)
_ADDR = 0x000F_FFFF_FFFF_F000
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


# --- shadow page tables ---------------------------------------------------------------------


@dataclass
class ShadowStats:
    fills: int = 0  # hidden faults: a translation installed
    guest_faults: int = 0  # true faults, reflected to the guest
    protected_writes: int = 0  # guest writes to a write-protected paging-structure or GDT page
    drops: int = 0  # whole-shadow drops (CR3 loads, paging-mode changes, pool exhaustion)
    invlpg: int = 0


@dataclass
class Fill:
    """The outcome of a shadow fill: installed, or the guest's own #PF, or not RAM."""

    fault: PageFault | None = None
    not_ram: int | None = None  # guest-physical address outside RAM (MMIO: not supported)
    frame: int = 0  # the guest-physical frame now mapped


@dataclass
class ShadowMmu:
    """Lazily filled 4-level shadow page tables over the guest's paging (see the module docstring).

    ``regs()`` gives the guest's *virtual* paging registers; ``flush()`` empties the real TLB
    (Unicorn's softmmu TLB), needed whenever an entry loses permissions or disappears.
    """

    hv: HypervisorMemory
    guest: GuestMemory
    regs: Callable[[], PagingRegs]
    flush: Callable[[], None]
    root: int = 0
    stats: ShadowStats = field(default_factory=ShadowStats)
    _next: int = 0
    _leaves: dict[int, int] = field(default_factory=dict)  # linear page -> address of its shadow leaf
    _rmap: dict[int, set[int]] = field(default_factory=dict)  # guest frame -> leaves mapping it
    _derived: dict[int, set[int]] = field(default_factory=dict)  # table frame -> leaves walked through it
    protected: dict[int, str] = field(default_factory=dict)  # frame -> "page table" or "gdt"
    gdt_frames: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        hv = self.hv
        # The hypervisor's own region: PML4[511] -> PDPT[511] -> PD[510] -> PT, supervisor-only.
        hv.write_u64(hv.page(_HV_PDPT) + 511 * 8, hv.page(_HV_PD) | _P | _RW)
        hv.write_u64(hv.page(_HV_PD) + 510 * 8, hv.page(_HV_PT) | _P | _RW)
        for i in range(GDT_PAGES + 1):
            hv.write_u64(hv.page(_HV_PT) + i * 8, hv.page(_GDT_PAGE + i) | _P | _RW)
        self.drop(count=False)

    # --- life cycle -------------------------------------------------------------------------
    def drop(self, count: bool = True) -> None:
        """Forget every shadow translation (a new, empty root)."""
        self._next = 0
        self.root = self._allocate()
        self.hv.write_u64(self.root + 511 * 8, self.hv.page(_HV_PDPT) | _P | _RW)
        self._leaves.clear()
        self._rmap.clear()
        self._derived.clear()
        self.protected = {frame: "gdt" for frame in self.gdt_frames}
        if count:
            self.stats.drops += 1
        self.flush()

    def _allocate(self) -> int:
        if self._next >= POOL_PAGES:
            raise _PoolExhausted
        page = self.hv.page(_POOL_PAGE + self._next)
        self._next += 1
        self.hv.clear(page, PAGE_SIZE)
        return page

    def protect_gdt(self, base_frames: set[int]) -> None:
        """Write-protect the guest GDT's frames (from now on, and in existing entries)."""
        for frame in self.gdt_frames - base_frames:
            if self.protected.get(frame) == "gdt":
                del self.protected[frame]
        self.gdt_frames = set(base_frames)
        for frame in base_frames:
            self._protect(frame, "gdt")

    # --- filling ----------------------------------------------------------------------------
    def fill(self, la: int, access: Access) -> Fill:
        """Install the translation of ``la`` the guest's tables give for ``access`` (supervisor).

        The entry allows what the walk verified and no more: a fetch maps the page executable
        and read-only, a write writable (unless the frame is protected) and not executable, a
        read neither. So the first write after a fetch, and the first fetch after a write, fault
        again: the engine's code-page scanner (:class:`hvm.engine.model.codepages.CodePages`)
        sees every page before its code runs.
        """
        regs = self.regs()
        if regs.mode is PagingMode.PAE and not regs.pdptes:
            regs = PagingRegs(regs.cr0, regs.cr3, regs.cr4, regs.efer, load_pdptes(self.guest, regs.cr3))
        result = translate(self.guest, regs, la, access, user=False)
        if isinstance(result, PageFault):
            self.stats.guest_faults += 1
            return Fill(fault=result)
        assert isinstance(result, Translation)
        frame = result.address & ~(PAGE_SIZE - 1)
        if frame + PAGE_SIZE > self.guest.size:
            return Fill(not_ram=result.address)
        tables = {ref & ~(PAGE_SIZE - 1) for ref in result.refs}
        for table in tables:
            self._protect(table, "page table")
        try:
            leaf = self._leaf(la)
        except _PoolExhausted:
            self.drop()
            return self.fill(la, access)
        entry = frame | _P | _US
        if access is Access.WRITE and frame not in self.protected:
            entry |= _RW
        if access is not Access.FETCH:
            entry |= _XD
        old_entry = self.hv.read_u64(leaf)
        self.hv.write_u64(leaf, entry)
        page = la & ~(PAGE_SIZE - 1)
        old = self._leaves.get(page)
        if old is not None and old != leaf:
            self._forget(old)
        self._leaves[page] = leaf
        self._rmap.setdefault(frame, set()).add(leaf)
        for table in tables:
            self._derived.setdefault(table, set()).add(leaf)
        self.stats.fills += 1
        if old_entry & _P and (old_entry & ~entry & _RW or entry & ~old_entry & _XD):
            self.flush()  # the entry lost a permission the TLB may still hold
        return Fill(frame=frame)

    def _leaf(self, la: int) -> int:
        """Address of the shadow PTE for ``la``, creating the tables above it."""
        table = self.root
        for shift in (39, 30, 21):
            slot = table + (la >> shift & 0x1FF) * 8
            entry = self.hv.read_u64(slot)
            if not entry & _P:
                entry = self._allocate() | _P | _RW | _US
                self.hv.write_u64(slot, entry)
            table = entry & _ADDR
        return table + (la >> 12 & 0x1FF) * 8

    def _protect(self, frame: int, why: str) -> None:
        if frame in self.protected:
            return
        self.protected[frame] = why
        downgraded = False
        for leaf in self._rmap.get(frame, ()):
            entry = self.hv.read_u64(leaf)
            if entry & _RW:
                self.hv.write_u64(leaf, entry & ~_RW)
                downgraded = True
        if downgraded:
            self.flush()

    def _forget(self, leaf: int) -> None:
        self.hv.write_u64(leaf, 0)
        for leaves in self._rmap.values():
            leaves.discard(leaf)
        for leaves in self._derived.values():
            leaves.discard(leaf)

    # --- faults on present entries ----------------------------------------------------------
    def frame_of(self, la: int) -> int | None:
        leaf = self._leaves.get(la & ~(PAGE_SIZE - 1))
        if leaf is None:
            return None
        entry = self.hv.read_u64(leaf)
        return entry & _ADDR if entry & _P else None

    def unprotect(self, frame: int) -> None:
        """Let the next instruction write ``frame``: its shadow entries become writable."""
        for leaf in self._rmap.get(frame, ()):
            self.hv.write_u64(leaf, self.hv.read_u64(leaf) | _RW)

    def reprotect(self, frame: int) -> None:
        """After the write: read-only again, and every translation walked through it dropped."""
        self.stats.protected_writes += 1
        for leaf in self._rmap.get(frame, ()):
            self.hv.write_u64(leaf, self.hv.read_u64(leaf) & ~_RW)
        if self.protected.get(frame) == "page table":
            for leaf in list(self._derived.get(frame, ())):
                self._forget(leaf)
            self._leaves = {page: leaf for page, leaf in self._leaves.items() if self.hv.read_u64(leaf)}
        self.flush()

    def invlpg(self, la: int) -> None:
        self.stats.invlpg += 1
        leaf = self._leaves.pop(la & ~(PAGE_SIZE - 1), None)
        if leaf is not None:
            self._forget(leaf)
        self.flush()

    def guest_wrote(self, gpa: int) -> str | None:
        """The hypervisor itself wrote guest memory at ``gpa``: keep the shadows right."""
        frame = gpa & ~(PAGE_SIZE - 1)
        why = self.protected.get(frame)
        if why == "page table":
            for leaf in list(self._derived.get(frame, ())):
                self._forget(leaf)
            self._leaves = {page: leaf for page, leaf in self._leaves.items() if self.hv.read_u64(leaf)}
            self.flush()
        return why


class _PoolExhausted(Exception):
    """No free page for a shadow paging structure: drop everything and start again."""
