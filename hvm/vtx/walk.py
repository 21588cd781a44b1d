"""The two-dimensional page walk, every memory reference counted (SDM Vol. 3A 4.3-4.5, Vol. 3C 29.3).

A guest linear address becomes a guest-physical address through the guest's paging structures,
and every guest-physical address the processor uses -- the address of each guest
paging-structure entry *and* the final data address -- becomes a host-physical address through
EPT. :func:`walk_2d` performs that walk and returns every memory reference in the order a
processor with no translation caches makes them::

    w = walk_2d(mem, PagingRegs(cr0, cr3, cr4, efer), la, eptp=eptp)
    w.hpa, w.guest_refs, w.ept_refs          # (kind, level, address) of each reference in w.refs

The worst case (no TLB, no paging-structure caches) for a g-level guest walk under an h-level
EPT: each of the g guest entries is read after an h-level EPT walk of its GPA, and the final GPA
needs one more EPT walk, so a TLB miss costs ``(g+1)h + g = (g+1)(h+1) - 1`` references before
the data access itself (:func:`worst_case_refs`: 24 for 4/4, 35 for 5/5). The ``g x h`` product
(16 for 4/4) counts only the EPT reads made for the guest's own tables
(:func:`ept_refs_for_guest_tables`); the final GPA's h reads and the g guest reads come on top.

Large pages end a walk early at either level: a 2-MiB guest page removes the guest's PT read and
the EPT walk of its address; a 2-MiB EPT page shortens each EPT walk by one read.

PAE paging has three levels, but its four PDPTEs are loaded into registers by MOV to CR3 (or
from the VMCS at VM entry with EPT, SDM 4.4.1 and 28.3.2.4), so a PAE walk reads two levels from
memory (``memory_levels``). 32-bit paging reads two levels, 4-level four, 5-level (LA57) five.

``caches`` (optional, see :class:`WalkCaches`; :class:`hvm.vtx.tlb.TlbModel` implements it)
supplies the translation caches of SDM 4.10.3 and 29.4: paging-structure caches that skip the
upper guest levels (combined paging-structure caches under EPT, which hold host-physical
addresses of guest tables), guest-physical mappings that answer an EPT walk at once, and EPT
paging-structure caches that skip upper EPT levels.

This walker assumes well-formed structures and checks only presence: it is the accounting twin
of :func:`hvm.vtx.paging.translate` and :func:`hvm.vtx.ept.ept_translate`, which decide
permissions, reserved bits and accessed/dirty flags; it has no side effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from hvm.vtx.memory import PhysicalMemory
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PagingMode, PagingRegs, paging_mode
from hvm.vtx.regs import Cr4

_ADDRESS = 0x000F_FFFF_FFFF_F000  # bits 51:12 of an entry: the next table or page frame
_P = 1
_PS = 1 << 7


class RefKind(StrEnum):
    GUEST = "guest"  # a read of a guest paging-structure entry (its host-physical address)
    EPT = "ept"  # a read of an EPT paging-structure entry
    DATA = "data"  # the access itself


@dataclass(frozen=True)
class Ref:
    kind: RefKind
    level: int  # guest level k or EPT level j (1 = the page table, 5 = PML5); 0 for data
    address: int  # host-physical address read
    gpa: int | None = None  # guest refs: the entry's GPA; EPT refs: the GPA being translated
    serves: int = 0  # EPT refs: guest level whose entry GPA this walk translates (0: the final GPA)


@dataclass(frozen=True)
class Walk:
    refs: tuple[Ref, ...]  # in order, the data access last
    gpa: int
    hpa: int
    guest_page_size: int
    ept_page_size: int | None  # None without EPT

    @property
    def page_size(self) -> int:
        """Size of the page a TLB entry for this translation can cover (SDM 29.4.2: the smaller)."""
        return min(self.guest_page_size, self.ept_page_size or self.guest_page_size)

    @property
    def guest_refs(self) -> int:
        return sum(1 for r in self.refs if r.kind is RefKind.GUEST)

    @property
    def ept_refs(self) -> int:
        return sum(1 for r in self.refs if r.kind is RefKind.EPT)

    @property
    def walk_refs(self) -> int:
        """References made to translate, the data access excluded."""
        return sum(1 for r in self.refs if r.kind is not RefKind.DATA)


class WalkFault(Exception):
    """A not-present entry: the engine's own walk reports the fault; this walker only counts."""


def memory_levels(mode: PagingMode) -> int:
    """Guest paging-structure levels a walk reads from memory (PAE's PDPTEs are registers)."""
    return {PagingMode.NONE: 0, PagingMode.BITS32: 2, PagingMode.PAE: 2,
            PagingMode.LEVEL4: 4, PagingMode.LEVEL5: 5}[mode]


def architectural_levels(mode: PagingMode) -> int:
    """Levels of the paging mode as the SDM names them (PAE: 3, counting the PDPT)."""
    return {PagingMode.NONE: 0, PagingMode.BITS32: 2, PagingMode.PAE: 3,
            PagingMode.LEVEL4: 4, PagingMode.LEVEL5: 5}[mode]


def worst_case_refs(g: int, h: int | None) -> int:
    """References of one TLB miss with no caches, data access excluded: (g+1)h + g = (g+1)(h+1) - 1.

    ``h`` None (or 0): no EPT, the guest walk alone (g). ``g`` is the number of levels read from
    memory (:func:`memory_levels`)."""
    if not h:
        return g
    return (g + 1) * (h + 1) - 1


def ept_refs_for_guest_tables(g: int, h: int) -> int:
    """The chapter's w_g x w_h: EPT reads made to locate the guest's own g tables."""
    return g * h


def ept_levels_walked(h: int, page_size: int) -> int:
    """Reads of one EPT walk of an h-level EPT ending in a page of ``page_size``."""
    return h - {PAGE_4K: 0, PAGE_2M: 1, PAGE_1G: 2}[page_size]


def guest_levels_walked(mode: PagingMode, page_size: int) -> int:
    """Reads of one guest walk ending in a page of ``page_size``."""
    g = memory_levels(mode)
    return g - {PAGE_4K: 0, PAGE_2M: 1, PAGE_4M: 1, PAGE_1G: 2}[page_size]


class WalkCaches(Protocol):
    """Translation caches a walk may use (SDM 4.10.3, 29.4); every method may find nothing."""

    def psc_lookup(self, la: int, mode: PagingMode) -> tuple[int, int, int] | None:
        """Deepest paging-structure-cache entry for ``la``: (level it locates, table GPA, table HPA)."""

    def psc_fill(self, la: int, mode: PagingMode, level: int, table_gpa: int, table_hpa: int) -> None:
        """The table of guest ``level`` (``level`` < the top) found for ``la``."""

    def gpa_lookup(self, gpa: int) -> tuple[int, int] | None:
        """A guest-physical mapping: (host-physical page base, page size)."""

    def gpa_fill(self, gpa: int, hpa_base: int, page_size: int) -> None: ...

    def ept_psc_lookup(self, gpa: int, levels: int) -> tuple[int, int] | None:
        """Deepest EPT paging-structure-cache entry: (EPT level it locates, table HPA)."""

    def ept_psc_fill(self, gpa: int, level: int, table_hpa: int) -> None: ...


# One guest level: (level number, index shift, index mask, entry size, page size of a PS=1 entry or 0).
_GuestLevel = tuple[int, int, int, int, int]


def _plan(mode: PagingMode, pse: bool) -> tuple[_GuestLevel, ...]:
    if mode is PagingMode.BITS32:  # SDM 4.3
        return ((2, 22, 0x3FF, 4, PAGE_4M if pse else 0), (1, 12, 0x3FF, 4, 0))
    if mode is PagingMode.PAE:  # SDM 4.4.2: the PD and the PT; the PDPTE is a register
        return ((2, 21, 0x1FF, 8, PAGE_2M), (1, 12, 0x1FF, 8, 0))
    levels: tuple[_GuestLevel, ...] = ((3, 30, 0x1FF, 8, PAGE_1G), (2, 21, 0x1FF, 8, PAGE_2M),
                                       (1, 12, 0x1FF, 8, 0))
    levels = ((4, 39, 0x1FF, 8, 0), *levels)  # SDM 4.5
    if mode is PagingMode.LEVEL5:
        levels = ((5, 48, 0x1FF, 8, 0), *levels)
    return levels


def _read(mem: PhysicalMemory, address: int, size: int) -> int:
    if size == 8:
        return mem.read_u64(address)
    return mem.read_u64(address & ~7) >> (address & 4) * 8 & 0xFFFF_FFFF


def ept_walk(mem: PhysicalMemory, eptp: int, gpa: int, refs: list[Ref], serves: int,
             caches: WalkCaches | None = None) -> tuple[int, int]:
    """GPA -> (HPA, page size) through EPT, appending each EPT read to ``refs`` (SDM 29.3.2)."""
    if caches is not None:
        hit = caches.gpa_lookup(gpa)
        if hit is not None:
            base, size = hit
            return base | gpa & (size - 1), size
    levels = (eptp >> 3 & 7) + 1
    table = eptp & _ADDRESS
    level = levels
    if caches is not None:
        cached = caches.ept_psc_lookup(gpa, levels)
        if cached is not None:
            level, table = cached
    while True:
        address = table + (gpa >> (3 + 9 * level) & 0x1FF) * 8
        refs.append(Ref(RefKind.EPT, level, address, gpa, serves))
        entry = mem.read_u64(address)
        if not entry & 7:
            raise WalkFault(f"EPT entry at {address:#x} (level {level}) for GPA {gpa:#x} not present")
        if level == 1 or (level in (2, 3) and entry & _PS):
            size = {1: PAGE_4K, 2: PAGE_2M, 3: PAGE_1G}[level]
            base = entry & _ADDRESS & ~(size - 1)
            if caches is not None:
                caches.gpa_fill(gpa, base, size)
            return base | gpa & (size - 1), size
        table = entry & _ADDRESS
        level -= 1
        if caches is not None:
            caches.ept_psc_fill(gpa, level, table)


def walk_2d(mem: PhysicalMemory, regs: PagingRegs, la: int, eptp: int | None = None,
            caches: WalkCaches | None = None) -> Walk:
    """Translate ``la`` through guest paging and (``eptp`` not None) EPT; every reference listed.

    ``mem`` is host-physical memory (with EPT off, guest-physical = host-physical).
    """
    refs: list[Ref] = []
    mode = paging_mode(regs.cr0, regs.cr4, regs.efer)

    def host(gpa: int, serves: int) -> tuple[int, int | None]:
        if eptp is None:
            return gpa, None
        return ept_walk(mem, eptp, gpa, refs, serves, caches)

    if mode is PagingMode.NONE:
        gpa, page = la, PAGE_4K
    else:
        plan = _plan(mode, bool(regs.cr4 & Cr4.PSE))
        if mode is PagingMode.BITS32:
            table_gpa = regs.cr3 & 0xFFFF_F000
        elif mode is PagingMode.PAE:
            pdpte = regs.pdptes[la >> 30 & 3]
            if not pdpte & _P:
                raise WalkFault(f"PDPTE{la >> 30 & 3} not present")
            table_gpa = pdpte & _ADDRESS
        else:
            table_gpa = regs.cr3 & _ADDRESS
        table_hpa: int | None = None if eptp is not None else table_gpa
        start = 0
        if caches is not None:
            cached = caches.psc_lookup(la, mode)
            if cached is not None:
                level, table_gpa, table_hpa = cached
                start = next(i for i, lv in enumerate(plan) if lv[0] == level)
        parent: int | None = None  # level whose entry located the current table (for the PSC fill)
        for level, shift, mask, size, large_page in plan[start:]:
            entry_gpa = table_gpa + (la >> shift & mask) * size
            if table_hpa is None:
                entry_hpa = host(entry_gpa, level)[0]
                table_hpa = entry_hpa & ~0xFFF
                if caches is not None and parent is not None:
                    caches.psc_fill(la, mode, level, table_gpa, table_hpa)
            else:
                entry_hpa = table_hpa + (entry_gpa - table_gpa)
                if caches is not None and parent is not None and eptp is None:
                    caches.psc_fill(la, mode, level, table_gpa, table_hpa)
            refs.append(Ref(RefKind.GUEST, level, entry_hpa, entry_gpa))
            entry = _read(mem, entry_hpa, size)
            if not entry & _P:
                raise WalkFault(f"guest level-{level} entry at GPA {entry_gpa:#x} for {la:#x} not present")
            if large_page and entry & _PS:
                page = large_page
                if page == PAGE_4M:  # SDM 4.3: PSE-36, bits 20:13 are address bits 39:32
                    frame = entry & 0xFFC0_0000 | (entry >> 13 & 0xFF) << 32
                else:
                    frame = entry & _ADDRESS & ~(page - 1)
                break
            if level == 1:
                page = PAGE_4K
                frame = entry & (0xFFFF_F000 if size == 4 else _ADDRESS)
                break
            table_gpa = entry & (0xFFFF_F000 if size == 4 else _ADDRESS)
            table_hpa = None if eptp is not None else table_gpa
            parent = level
        gpa = frame | la & (page - 1)
    hpa, ept_page = host(gpa, 0)
    refs.append(Ref(RefKind.DATA, 0, hpa, gpa))
    return Walk(tuple(refs), gpa, hpa, page, ept_page)
