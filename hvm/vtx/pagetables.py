"""Build guest paging structures of any mode (SDM Vol. 3A 4.3-4.5), as a guest kernel or loader would.

::

    tables = GuestTables(mem, pool=0x20_0000, pool_size=0x10_0000, mode=PagingMode.LEVEL4)
    tables.map(la=0x4000_0000, gpa=0x100_0000, size=16 << 20, page_size=PAGE_2M)
    regs = tables.regs()          # CR0/CR3/CR4/EFER (and PAE's PDPTEs) that turn this paging on

``mem`` is guest-physical memory (:class:`hvm.vtx.memory.PhysicalMemory`); the tables come from
a pool of zeroed 4-KiB pages in it. Entries are present, writable and user-accessible (the
accessed flags set, as a kernel that pre-faults would leave them); leaves may be global.
"""

from __future__ import annotations

from hvm.vtx.memory import PhysicalMemory
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PagingMode, PagingRegs
from hvm.vtx.regs import Cr0, Cr4, Efer

_P, _RW, _US, _A, _PS, _G = 1, 2, 4, 1 << 5, 1 << 7, 1 << 8
_TABLE = _P | _RW | _US | _A
_PAE_PDPTE = _P  # SDM 4.4.1: in a PAE PDPTE, bits 2:1 and 8:5 are reserved


class GuestTables:
    def __init__(self, mem: PhysicalMemory, pool: int, pool_size: int, mode: PagingMode) -> None:
        if mode is PagingMode.NONE:
            raise ValueError("no paging structures without paging")
        if pool % PAGE_4K:
            raise ValueError(f"table pool {pool:#x} is not 4-KiB aligned")
        self.mem, self.mode = mem, mode
        self._next, self._end = pool, pool + pool_size
        self.root = self._allocate()
        if mode is PagingMode.PAE:  # SDM 4.4.1: the PDPT is 32 bytes, four PDPTEs, each to a PD
            for i in range(4):
                self._write(self.root + 8 * i, self._allocate() | _PAE_PDPTE, 8)

    def _levels(self) -> list[tuple[int, int, int]]:
        """(level, index shift, index bits) from the root table down."""
        if self.mode is PagingMode.BITS32:
            return [(2, 22, 10), (1, 12, 10)]
        if self.mode is PagingMode.PAE:
            return [(3, 30, 2), (2, 21, 9), (1, 12, 9)]
        top = 5 if self.mode is PagingMode.LEVEL5 else 4
        return [(lv, 12 + 9 * (lv - 1), 9) for lv in range(top, 0, -1)]

    def map(self, la: int, gpa: int, size: int, page_size: int = PAGE_4K, *, glob: bool = False) -> None:
        """Map ``[la, la+size)`` to ``[gpa, gpa+size)`` with pages of ``page_size``."""
        allowed = {PagingMode.BITS32: (PAGE_4K, PAGE_4M), PagingMode.PAE: (PAGE_4K, PAGE_2M)}.get(
            self.mode, (PAGE_4K, PAGE_2M, PAGE_1G))
        if page_size not in allowed:
            raise ValueError(f"{self.mode.name} paging has no {page_size:#x}-byte pages")
        if (la | gpa | size) % page_size:
            raise ValueError(f"la, gpa and size must be multiples of the page size {page_size:#x}")
        for offset in range(0, size, page_size):
            self._map_page(la + offset, gpa + offset, page_size, glob)

    def _map_page(self, la: int, gpa: int, page_size: int, glob: bool) -> None:
        entry_size = 4 if self.mode is PagingMode.BITS32 else 8
        leaf_level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_4M: 2, PAGE_1G: 3}[page_size]
        table = self.root
        for level, shift, bits in self._levels():
            address = table + (la >> shift & ((1 << bits) - 1)) * entry_size
            if level == leaf_level:
                leaf = _TABLE | (_G if glob else 0) | (_PS if level > 1 else 0)
                if page_size == PAGE_4M:  # SDM 4.3: PSE-36, address bits 39:32 in entry bits 20:13
                    frame = gpa & 0xFFC0_0000 | (gpa >> 32 & 0xFF) << 13
                else:
                    frame = gpa
                self._write(address, frame | leaf, entry_size)
                return
            entry = self._read(address, entry_size)
            if not entry & _P:
                pae_pdpte = self.mode is PagingMode.PAE and level == 3
                entry = self._allocate() | (_PAE_PDPTE if pae_pdpte else _TABLE)
                self._write(address, entry, entry_size)
            elif entry & _PS and level in (2, 3):
                raise ValueError(f"{la:#x} is already mapped by a larger page")
            table = entry & 0x000F_FFFF_FFFF_F000

    def regs(self, *, nxe: bool = False, pge: bool = False) -> PagingRegs:
        """Control registers for this paging mode with CR3 at the root table."""
        cr0 = int(Cr0.PE | Cr0.PG | Cr0.WP)
        cr4 = int(Cr4.PGE) if pge else 0
        efer = int(Efer.NXE) if nxe else 0
        pdptes: tuple[int, ...] = ()
        if self.mode is PagingMode.BITS32:
            cr4 |= int(Cr4.PSE)
        elif self.mode is PagingMode.PAE:
            cr4 |= int(Cr4.PAE)
            pdptes = tuple(self.mem.read_u64(self.root + 8 * i) for i in range(4))
        else:
            cr4 |= int(Cr4.PAE) | (int(Cr4.LA57) if self.mode is PagingMode.LEVEL5 else 0)
            efer |= int(Efer.LME | Efer.LMA)
        return PagingRegs(cr0, self.root, cr4, efer, pdptes)

    def _read(self, address: int, size: int) -> int:
        if size == 8:
            return self.mem.read_u64(address)
        return self.mem.read_u64(address & ~7) >> (address & 4) * 8 & 0xFFFF_FFFF

    def _write(self, address: int, value: int, size: int) -> None:
        if size == 8:
            self.mem.write_u64(address, value)
            return
        shift = (address & 4) * 8
        word = self.mem.read_u64(address & ~7) & ~(0xFFFF_FFFF << shift)
        self.mem.write_u64(address & ~7, word | value << shift)

    def _allocate(self) -> int:
        table = self._next
        if table + PAGE_4K > self._end:
            raise ValueError("guest page-table pool exhausted")
        self._next += PAGE_4K
        for offset in range(0, PAGE_4K, 8):
            self.mem.write_u64(table + offset, 0)
        return table

    @property
    def used(self) -> int:
        """Bytes of the pool handed out so far."""
        return self._next - self.root
