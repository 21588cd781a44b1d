"""Guest paging (linear -> guest-physical): Intel SDM Vol. 3A, chapter 4.

One walker for the four paging modes (SDM 4.1.1): 32-bit (4.3), PAE (4.4),
4-level and 5-level (4.5), with permission checks (4.6), page-fault error
codes (4.7) and accessed/dirty updates (4.8)::

    regs = PagingRegs(cr0=Cr0.PE | Cr0.PG, cr3=0x1000, cr4=Cr4.PAE, efer=Efer.LME | Efer.LMA)
    match translate(mem, regs, la=0x40_1000, access=Access.WRITE, user=True):
        case Translation(address=gpa, refs=refs): ...    # refs: GPAs of the entries read
        case PageFault(error_code=code): ...             # inject #PF(code), CR2 = la

Every paging-structure entry is read and updated through ``mem``
(:class:`hvm.vtx.memory.PhysicalMemory` over *guest-physical* addresses), so
the model engine can put an EPT walk under each access: the 2-D walk.
32-bit paging's 4-byte entries are accessed as part of their aligned 8 bytes.

PAE paging takes its four PDPTEs from ``PagingRegs.pdptes``: the processor
loads them on MOV to CR3 (:func:`load_pdptes`), or VM entry loads them from
the VMCS when EPT is on; they are not re-read on each walk.

Not modelled: SMEP, SMAP, protection keys, shadow stacks, HLAT. Accessed and
dirty flags are written only when the translation succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from hvm.vtx.capabilities import MODEL_CAPS
from hvm.vtx.memory import PhysicalMemory
from hvm.vtx.regs import Cr0, Cr4, Efer

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_4M = 1 << 22
PAGE_1G = 1 << 30

# SDM 4.2, tables "Format of ... Entry": bits shared by every paging-structure entry.
_P = 1 << 0  # present
_RW = 1 << 1  # read/write
_US = 1 << 2  # user/supervisor
_A = 1 << 5  # accessed
_D = 1 << 6  # dirty (leaves)
_PS = 1 << 7  # page size (PDE, PDPTE)
_XD = 1 << 63  # execute-disable (PAE, 4-level, 5-level)
# Register bits and error-code bits as plain ints: IntFlag arithmetic is slow on this hot path.
_CR0_PG, _CR0_WP = int(Cr0.PG), int(Cr0.WP)
_CR4_PSE, _CR4_PAE, _CR4_LA57 = int(Cr4.PSE), int(Cr4.PAE), int(Cr4.LA57)
_EFER_LMA, _EFER_NXE = int(Efer.LMA), int(Efer.NXE)


class PagingMode(IntEnum):
    NONE = 0  # CR0.PG = 0: linear address = physical address
    BITS32 = 1
    PAE = 2
    LEVEL4 = 3
    LEVEL5 = 4


class Access(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


class PfError(IntFlag):
    """Page-fault error code (SDM 4.7, figure "Page-Fault Error Code")."""

    PRESENT = 1 << 0  # P: 0 = non-present page, 1 = protection (or reserved-bit) violation
    WRITE = 1 << 1  # W/R: the access was a write
    USER = 1 << 2  # U/S: a user-mode access
    RSVD = 1 << 3  # a reserved bit was set in some paging-structure entry
    FETCH = 1 << 4  # I/D: an instruction fetch (with PAE-based paging and IA32_EFER.NXE = 1)


_PF_PRESENT, _PF_WRITE, _PF_USER = int(PfError.PRESENT), int(PfError.WRITE), int(PfError.USER)
_PF_RSVD, _PF_FETCH = int(PfError.RSVD), int(PfError.FETCH)


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """SDM 4.1.1, table "Paging Modes"."""
    if not cr0 & _CR0_PG:
        return PagingMode.NONE
    if not cr4 & _CR4_PAE:
        return PagingMode.BITS32
    if not efer & _EFER_LMA:
        return PagingMode.PAE
    return PagingMode.LEVEL5 if cr4 & _CR4_LA57 else PagingMode.LEVEL4


@dataclass(frozen=True)
class PagingRegs:
    """The guest state that controls paging."""

    cr0: int
    cr3: int
    cr4: int = 0
    efer: int = 0
    pdptes: tuple[int, ...] = ()  # PAE paging only: PDPTE0-3

    @property
    def mode(self) -> PagingMode:
        return paging_mode(self.cr0, self.cr4, self.efer)


@dataclass(frozen=True)
class Translation:
    address: int  # the guest-physical address
    page_size: int
    refs: tuple[int, ...]  # GPAs of the paging-structure entries read, outermost first


@dataclass(frozen=True)
class PageFault:
    error_code: PfError
    refs: tuple[int, ...]


@dataclass(frozen=True)
class _Level:
    shift: int  # lowest linear-address bit of this level's index
    large_page: int  # page size a PS=1 entry maps here (0: PS is reserved or ignored)


def _read_entry(mem: PhysicalMemory, address: int, size: int) -> int:
    if size == 8:
        return mem.read_u64(address)
    return mem.read_u64(address & ~7) >> (address & 4) * 8 & 0xFFFF_FFFF


def _write_entry(mem: PhysicalMemory, address: int, size: int, value: int) -> None:
    if size == 8:
        mem.write_u64(address, value)
        return
    shift = (address & 4) * 8
    word = mem.read_u64(address & ~7) & ~(0xFFFF_FFFF << shift)
    mem.write_u64(address & ~7, word | value << shift)


def _mask(high: int, low: int) -> int:
    """Bits high:low set."""
    return ((1 << (high + 1)) - 1) & ~((1 << low) - 1)


def load_pdptes(
    mem: PhysicalMemory, cr3: int, maxphyaddr: int = MODEL_CAPS.phys_addr_width
) -> tuple[int, ...]:
    """Load the four PDPTEs for PAE paging, as MOV to CR3 does (SDM 4.4.1).

    Raises ValueError (the #GP(0) of the MOV) if a present PDPTE sets a reserved bit.
    """
    pdpt = cr3 & _mask(31, 5)  # SDM 4.4.1: CR3 bits 31:5 locate the 32-byte-aligned PDPT
    pdptes = tuple(mem.read_u64(pdpt + 8 * i) for i in range(4))
    # SDM 4.4.1, table "Format of a PAE Page-Directory-Pointer-Table Entry": bits 2:1, 8:5, 63:M reserved.
    reserved = _mask(2, 1) | _mask(8, 5) | _mask(63, maxphyaddr)
    for i, pdpte in enumerate(pdptes):
        if pdpte & _P and pdpte & reserved:
            raise ValueError(f"PDPTE{i} {pdpte:#x} sets reserved bits (#GP)")
    return pdptes


def translate(
    mem: PhysicalMemory,
    regs: PagingRegs,
    la: int,
    access: Access,
    *,
    user: bool = False,
    maxphyaddr: int = MODEL_CAPS.phys_addr_width,
) -> Translation | PageFault:
    """Translate linear address ``la`` for ``access`` at CPL 3 (``user``) or below.

    The caller has already done segmentation and the canonical-address check;
    a non-canonical ``la`` raises ValueError.
    """
    cr0, cr4, efer = regs.cr0, regs.cr4, regs.efer
    mode = paging_mode(cr0, cr4, efer)
    if mode is PagingMode.NONE:
        return Translation(la, PAGE_4K, ())
    nxe = mode is not PagingMode.BITS32 and bool(efer & _EFER_NXE)
    write, fetch = access is Access.WRITE, access is Access.FETCH
    # SDM 4.7: W/R, U/S and I/D describe the access (I/D only when execute-disable is enabled).
    base_error = (_PF_WRITE if write else 0) | (_PF_USER if user else 0) | (_PF_FETCH if fetch and nxe else 0)
    if mode is PagingMode.BITS32:
        # SDM 4.3: CR3 bits 31:12 locate the page directory; 4-byte entries; 4-MByte pages if CR4.PSE.
        if la >> 32:
            raise ValueError(f"linear address {la:#x} wider than 32 bits")
        table = regs.cr3 & _mask(31, 12)
    elif mode is PagingMode.PAE:
        # SDM 4.4.2: PDPTE register i (i = linear-address bits 31:30) locates the page directory.
        if la >> 32:
            raise ValueError(f"linear address {la:#x} wider than 32 bits")
        if len(regs.pdptes) != 4:
            raise ValueError("PAE paging needs the four PDPTEs (PagingRegs.pdptes)")
        pdpte = regs.pdptes[la >> 30 & 3]
        if not pdpte & _P:
            return PageFault(PfError(base_error), ())
        table = pdpte & _mask(maxphyaddr - 1, 12)
    else:
        # SDM 4.5: canonical = bits 63:48 (63:57 with 5-level paging) copy the top translated bit.
        width = 57 if mode is PagingMode.LEVEL5 else 48
        top = la >> (width - 1)
        if top not in (0, (1 << (65 - width)) - 1):
            raise ValueError(f"linear address {la:#x} is not canonical")
        table = regs.cr3 & _mask(maxphyaddr - 1, 12)
    levels, size, index_mask, address_mask = _walk_plan(mode, bool(cr4 & _CR4_PSE), nxe, maxphyaddr)

    addresses: list[int] = []
    entries: list[int] = []
    rights = _RW | _US  # SDM 4.6: access rights are the AND over all entries ...
    any_xd = 0  # ... and execute-disable the OR
    last = len(levels) - 1
    for depth, (shift, large_page, reserved, reserved_large) in enumerate(levels):
        address = table + (la >> shift & index_mask) * size
        entry = _read_entry(mem, address, size)
        addresses.append(address)
        entries.append(entry)
        if not entry & _P:
            return PageFault(PfError(base_error), tuple(addresses))  # SDM 4.7: P = 0, a non-present page
        large = large_page and entry & _PS
        if entry & (reserved_large if large else reserved):
            return PageFault(PfError(base_error | _PF_PRESENT | _PF_RSVD), tuple(addresses))  # SDM 4.7: RSVD
        rights &= entry
        any_xd |= entry
        if large or depth == last:
            page_size = large_page if large else PAGE_4K
            break
        table = entry & address_mask
    refs = tuple(addresses)

    # SDM 4.6: user-mode accesses need U/S = 1 everywhere; writes need R/W = 1 everywhere for user
    # mode, and for supervisor mode when CR0.WP = 1; fetches need XD = 0 everywhere (when NXE = 1).
    if (
        (user and not rights & _US)
        or (write and not rights & _RW and (user or cr0 & _CR0_WP))
        or (fetch and nxe and any_xd & _XD)
    ):
        return PageFault(PfError(base_error | _PF_PRESENT), refs)

    # SDM 4.8: set the accessed flag of every entry used, and the dirty flag of the leaf for a write.
    leaf_index = len(entries) - 1
    for i, entry in enumerate(entries):
        updated = entry | _A | (_D if write and i == leaf_index else 0)
        if updated != entry:
            _write_entry(mem, addresses[i], size, updated)

    leaf = entries[leaf_index]
    if mode is PagingMode.BITS32 and page_size == PAGE_4M:
        # SDM 4.3, table "Format of a 32-Bit Page-Directory Entry that Maps a 4-MByte Page":
        # bits 31:22 are address bits 31:22, bits 20:13 address bits 39:32 (PSE-36).
        frame = leaf & _mask(31, 22) | (leaf >> 13 & 0xFF) << 32
    else:
        frame = leaf & address_mask & ~(page_size - 1)
    return Translation(frame | la & (page_size - 1), page_size, refs)


# One level of a walk: (shift of its index, page size a PS=1 entry maps there or 0, reserved bits
# of an entry that points to a table or maps a 4-KiB page, reserved bits of a PS=1 entry).
_Plan = tuple[tuple[tuple[int, int, int, int], ...], int, int, int]
_PLANS: dict[tuple[PagingMode, bool, bool, int], _Plan] = {}


def _walk_plan(mode: PagingMode, pse: bool, nxe: bool, maxphyaddr: int) -> _Plan:
    """The levels of a walk in ``mode`` (SDM 4.3-4.5), entry size, index mask, table-address mask."""
    key = (mode, pse and mode is PagingMode.BITS32, nxe, maxphyaddr)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if mode is PagingMode.BITS32:
        shape = [_Level(22, PAGE_4M if pse else 0), _Level(12, 0)]
        size, index_mask, address_mask = 4, 0x3FF, _mask(31, 12)
    else:
        size, index_mask, address_mask = 8, 0x1FF, _mask(maxphyaddr - 1, 12)
        if mode is PagingMode.PAE:
            shape = [_Level(21, PAGE_2M), _Level(12, 0)]
        else:
            shape = [_Level(30, PAGE_1G), _Level(21, PAGE_2M), _Level(12, 0)]
            shape[:0] = [_Level(39, 0)] if mode is PagingMode.LEVEL4 else [_Level(48, 0), _Level(39, 0)]
    levels = tuple(
        (level.shift, level.large_page,
         _reserved_bits(mode, depth, len(shape), False, nxe, maxphyaddr),
         _reserved_bits(mode, depth, len(shape), True, nxe, maxphyaddr) if level.large_page else 0)
        for depth, level in enumerate(shape)
    )
    plan = _PLANS[key] = (levels, size, index_mask, address_mask)
    return plan


def _reserved_bits(mode: PagingMode, depth: int, levels: int, large: bool, nxe: bool, maxphyaddr: int) -> int:
    """Bits that must be 0 in a present entry at ``depth`` (0 = the walk's first table)."""
    if mode is PagingMode.BITS32:
        # SDM 4.3: only a 4-MByte PDE has reserved bits: 21 and (M-19):13 beyond a 40-bit PSE-36 address.
        return _mask(21, min(maxphyaddr, 40) - 19) if large else 0
    # SDM 4.4.2: PAE entries reserve bits 62:M; SDM 4.5: 4/5-level entries reserve bits 51:M.
    reserved = _mask(62 if mode is PagingMode.PAE else 51, maxphyaddr)
    if not nxe:
        reserved |= _XD  # SDM 4.6: bit 63 is reserved while IA32_EFER.NXE = 0
    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5) and depth < levels - 3:
        reserved |= _PS  # SDM 4.5: PS is reserved in PML5Es and PML4Es
    if large:
        # SDM 4.4.2 / 4.5: a 2-MByte PDE reserves bits 20:13, a 1-GByte PDPTE bits 29:13.
        reserved |= _mask(20, 13) if depth == levels - 2 else _mask(29, 13)
    return reserved
