"""Extended page tables (EPT): Intel SDM Vol. 3C, 29.3 (28.2 in editions before 2023).

EPT translates guest-physical addresses (GPAs) to host-physical addresses
(HPAs) through 4 or 5 levels of 8-byte entries in host memory::

    ept = EptBuilder(mem, pool=0x100000, pool_size=0x40000)   # tables live in mem
    ept.map(gpa=0, hpa=0x4000_0000, size=2 << 20, page_size=PAGE_2M)
    result = ept_translate(mem, ept.eptp, gpa=0x1234, access=EptAccess.READ)
    match result:
        case EptTranslation(hpa=hpa): ...            # go ahead
        case EptViolation() as v: ...               # VM exit 48, v.qualification(...)
        case EptMisconfig(): ...                     # VM exit 49

``mem`` is any :class:`hvm.vtx.memory.PhysicalMemory`. The walker reads each
entry it uses (``refs`` lists their HPAs, the walk's memory references) and,
when the EPTP enables accessed/dirty flags, writes the flags back.

Not modelled: mode-based execute control's user/supervisor split (bit 10 is only
reported), sub-page permissions, the suppress-#VE bit, advanced VM-exit information.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from hvm.vtx.capabilities import MODEL_CAPS, EptVpidCap, VmxCapabilities
from hvm.vtx.memory import PhysicalMemory
from hvm.vtx.qualification import EptViolationQualification

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30


class MemoryType(IntEnum):
    """EPT memory types (SDM 29.3, "EPT and Memory Typing"; 2, 3 and 7 are reserved)."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


class EptAccess(IntFlag):
    """The kind of access being translated; same bits as exit-qualification bits 2:0."""

    READ = 1
    WRITE = 2
    FETCH = 4


class EptPerm(IntFlag):
    """Permission bits of an EPT entry (SDM 29.3.2)."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXECUTE = 1 << 2  # supervisor-mode execute under mode-based execute control
    USER_EXECUTE = 1 << 10  # user-mode execute (mode-based execute control only)
    RWX = READ | WRITE | EXECUTE


# SDM 29.3.2 EPT entry bits.
_PRESENT = 0b111  # bits 2:0; an entry is present if any is set
_MEMTYPE_SHIFT = 3  # bits 5:3 of a leaf: memory type
_IGNORE_PAT = 1 << 6  # bit 6 of a leaf
_LARGE = 1 << 7  # bit 7 of a PDPTE (1-GByte page) or PDE (2-MByte page)
_ACCESSED = 1 << 8
_DIRTY = 1 << 9  # leaves only
_ADDRESS_51_12 = ((1 << 52) - 1) & ~0xFFF
_PAGE_SIZE = {1: PAGE_4K, 2: PAGE_2M, 3: PAGE_1G}  # page size of a leaf at each level
# Permission bits as plain ints (IntFlag arithmetic is slow on the translation path).
_R, _W, _X, _USER_X = int(EptPerm.READ), int(EptPerm.WRITE), int(EptPerm.EXECUTE), int(EptPerm.USER_EXECUTE)


def _index(gpa: int, level: int) -> int:
    # SDM 29.3.2: level L (1 = PT ... 5 = PML5) is indexed by GPA bits 12+9L-1 : 12+9(L-1).
    return gpa >> (12 + 9 * (level - 1)) & 0x1FF


@dataclass(frozen=True)
class Eptp:
    """The extended-page-table pointer (SDM 25.6.11, table "Format of Extended-Page-Table Pointer")."""

    root: int  # bits N-1:12: address of the PML4 (or PML5) table
    levels: int = 4  # page-walk length; bits 5:3 hold levels - 1
    memory_type: MemoryType = MemoryType.WB  # bits 2:0: for accesses to the EPT structures
    accessed_dirty: bool = False  # bit 6: enable accessed and dirty flags

    def encode(self) -> int:
        if self.levels not in (4, 5) or self.root & 0xFFF:
            raise ValueError(f"bad EPTP: {self}")
        return self.memory_type | (self.levels - 1) << 3 | self.accessed_dirty << 6 | self.root

    @classmethod
    def decode(cls, value: int) -> Eptp:
        levels = (value >> 3 & 7) + 1
        if levels not in (4, 5):
            raise ValueError(f"EPTP {value:#x}: page-walk length {levels} is neither 4 nor 5")
        return cls(
            root=value & _ADDRESS_51_12,
            levels=levels,
            memory_type=MemoryType(value & 7),
            accessed_dirty=bool(value >> 6 & 1),
        )


@dataclass(frozen=True)
class EptTranslation:
    hpa: int
    page_size: int
    permissions: EptPerm  # what the translation allows: AND of the entries' bits along the walk
    memory_type: MemoryType  # the leaf's EPT memory type
    ignore_pat: bool  # the leaf's bit 6
    refs: tuple[int, ...]  # HPAs of the entries read, outermost first


@dataclass(frozen=True)
class EptViolation:
    gpa: int
    access: EptAccess  # the access as the exit qualification reports it (bits 2:0)
    permissions: EptPerm  # AND of the entries' bits along the walk (qualification bits 6:3)
    refs: tuple[int, ...]

    def qualification(
        self, *, gla_valid: bool = False, linear_translation: bool = False, nmi_unblocking: bool = False
    ) -> EptViolationQualification:
        """The exit qualification for this violation; the engine supplies what the walk cannot know."""
        return EptViolationQualification(
            read=EptAccess.READ in self.access,
            write=EptAccess.WRITE in self.access,
            fetch=EptAccess.FETCH in self.access,
            readable=EptPerm.READ in self.permissions,
            writable=EptPerm.WRITE in self.permissions,
            executable=EptPerm.EXECUTE in self.permissions,
            user_executable=EptPerm.USER_EXECUTE in self.permissions,
            gla_valid=gla_valid,
            linear_translation=linear_translation,
            nmi_unblocking=nmi_unblocking,
        )


@dataclass(frozen=True)
class EptMisconfig:
    gpa: int
    entry_address: int  # HPA of the misconfigured entry
    entry: int
    reason: str
    refs: tuple[int, ...]


EptResult = EptTranslation | EptViolation | EptMisconfig


def _misconfiguration(entry: int, level: int, caps: VmxCapabilities) -> str | None:
    """Why a present entry is an EPT misconfiguration, or None (SDM 29.3.3.1)."""
    execute_only_ok, reserved_by_level = _caps_rules(caps)
    rwx = entry & _PRESENT
    # SDM 29.3.3.1: bits 2:0 = 010b or 110b (writable but not readable).
    if rwx & _W and not rwx & _R:
        return "write permission without read permission"
    # SDM 29.3.3.1: bits 2:0 = 100b (execute-only) where IA32_VMX_EPT_VPID_CAP[0] = 0.
    if rwx == _X and not execute_only_ok:
        return "execute-only entry, which this processor does not support"
    large = entry & _LARGE
    reserved = reserved_by_level[min(level, 4)][1 if large else 0]
    if entry & reserved:
        return f"reserved bits {entry & reserved:#x} set"
    # SDM 29.3.3.1: a leaf's memory type (bits 5:3) must not be 2, 3 or 7.
    if (level == 1 or large) and entry >> _MEMTYPE_SHIFT & 7 in (2, 3, 7):
        return f"reserved memory type {entry >> _MEMTYPE_SHIFT & 7}"
    return None


_CAPS_RULES: dict[int, tuple[VmxCapabilities, tuple[bool, tuple[tuple[int, int], ...]]]] = {}


def _caps_rules(caps: VmxCapabilities) -> tuple[bool, tuple[tuple[int, int], ...]]:
    """Execute-only allowed, and per level (index 1-4; 5 reads as 4) the reserved bits of an entry
    with bit 7 clear and with bit 7 set (SDM 29.3.2), for ``caps``; computed once per caps object."""
    cached = _CAPS_RULES.get(id(caps))
    if cached is not None and cached[0] is caps:
        return cached[1]
    cap = caps.ept_vpid_cap
    high = _ADDRESS_51_12 & ~((1 << caps.phys_addr_width) - 1)  # SDM 29.3.2: bits 51:N
    table = high | 0xF8  # SDM 29.3.2: PML5E/PML4E bits 7:3; non-leaf PDPTE/PDE bits 6:3 (and 7)
    pdpte_1g = high | ((PAGE_1G - 1) & ~0xFFF) if cap & EptVpidCap.PDPTE_1G else table  # 1-GByte: 29:12
    pde_2m = high | ((PAGE_2M - 1) & ~0xFFF) if cap & EptVpidCap.PDE_2M else table  # 2-MByte: 20:12
    # Level 1 (a PTE): only bits 51:N; its bit 7 is ignored.
    rules = (bool(cap & EptVpidCap.EXECUTE_ONLY),
             ((0, 0), (high, high), (table, pde_2m), (table, pdpte_1g), (table, table)))
    if len(_CAPS_RULES) > 16:
        _CAPS_RULES.clear()
    _CAPS_RULES[id(caps)] = (caps, rules)
    return rules


_EPTPS: dict[int, tuple[int, int, bool]] = {}


def _eptp_fields(eptp: int) -> tuple[int, int, bool]:
    """(root, levels, accessed/dirty enabled) of an EPTP, checked as :meth:`Eptp.decode` checks it."""
    fields = _EPTPS.get(eptp)
    if fields is None:
        pointer = Eptp.decode(eptp)
        if len(_EPTPS) > 64:
            _EPTPS.clear()
        fields = _EPTPS[eptp] = (pointer.root, pointer.levels, pointer.accessed_dirty)
    return fields


def ept_translate(
    mem: PhysicalMemory,
    eptp: int,
    gpa: int,
    access: EptAccess,
    *,
    paging_structure: bool = False,
    caps: VmxCapabilities = MODEL_CAPS,
) -> EptResult:
    """Translate ``gpa`` for ``access`` through the EPT that ``eptp`` names (SDM 29.3.2-29.3.5).

    ``paging_structure`` marks the processor's own accesses to guest
    paging-structure entries (the inner steps of a 2-D walk).
    """
    width = caps.phys_addr_width
    if gpa < 0 or gpa >> width:
        raise ValueError(f"GPA {gpa:#x} beyond the physical-address width")
    table, levels, accessed_dirty = _eptp_fields(eptp)
    wanted = int(access)
    if paging_structure and accessed_dirty:
        # SDM 29.3.3.2 / 28.2.1: with EPT A/D flags on, guest paging-structure accesses count as writes
        # (an EPT violation then reports both bit 0 and bit 1).
        wanted = _R | _W
    address_mask = _ADDRESS_51_12 & ((1 << width) - 1)
    permissions = _PRESENT | _USER_X
    addresses: list[int] = []
    entries: list[int] = []
    for level in range(levels, 0, -1):
        address = table + (gpa >> (3 + 9 * level) & 0x1FF) * 8  # _index(gpa, level)
        entry = mem.read_u64(address)
        addresses.append(address)
        entries.append(entry)
        # SDM 29.3.3.2: qualification bits 3-6 are the AND of each entry's bits along the walk.
        permissions &= entry
        # SDM 29.3.2: an entry with bits 2:0 = 000b is not present: EPT violation.
        if not entry & _PRESENT:
            return EptViolation(gpa, EptAccess(wanted), EptPerm(permissions), tuple(addresses))
        reason = _misconfiguration(entry, level, caps)
        if reason is not None:
            return EptMisconfig(gpa, address, entry, reason, tuple(addresses))
        if level == 1 or entry & _LARGE:
            break
        table = entry & address_mask
    # SDM 29.3.3.2: the access violates EPT if some entry along the walk withholds the permission it needs.
    # (EptAccess READ/WRITE/FETCH have the values of EptPerm READ/WRITE/EXECUTE.)
    if wanted & ~permissions & _PRESENT:
        return EptViolation(gpa, EptAccess(wanted), EptPerm(permissions), tuple(addresses))
    if accessed_dirty:
        _set_accessed_dirty(mem, list(zip(addresses, entries, strict=True)), write=bool(wanted & _W))
    page_size = _PAGE_SIZE[level]
    return EptTranslation(
        hpa=entry & address_mask & ~(page_size - 1) | gpa & (page_size - 1),
        page_size=page_size,
        permissions=EptPerm(permissions),
        memory_type=MemoryType(entry >> _MEMTYPE_SHIFT & 7),
        ignore_pat=bool(entry & _IGNORE_PAT),
        refs=tuple(addresses),
    )


def _set_accessed_dirty(mem: PhysicalMemory, used: list[tuple[int, int]], write: bool) -> None:
    # SDM 29.3.5: set the accessed flag of every entry used, and for a write the dirty flag of the leaf.
    for i, (address, entry) in enumerate(used):
        updated = entry | _ACCESSED
        if write and i == len(used) - 1:
            updated |= _DIRTY
        if updated != entry:
            mem.write_u64(address, updated)


class EptBuilder:
    """Builds EPT paging structures in ``mem``, taking zeroed 4-KiB tables from a pool of host memory."""

    def __init__(
        self,
        mem: PhysicalMemory,
        pool: int,
        pool_size: int,
        *,
        levels: int = 4,
        memory_type: MemoryType = MemoryType.WB,
        accessed_dirty: bool = False,
    ) -> None:
        if pool % PAGE_4K:
            raise ValueError(f"table pool {pool:#x} is not 4-KiB aligned")
        self.mem = mem
        self._next = pool
        self._end = pool + pool_size
        self.levels = levels
        self.root = self._allocate()
        self.eptp = Eptp(self.root, levels, memory_type, accessed_dirty).encode()

    def map(
        self,
        gpa: int,
        hpa: int,
        size: int,
        permissions: EptPerm = EptPerm.RWX,
        *,
        page_size: int = PAGE_4K,
        memory_type: MemoryType = MemoryType.WB,
        ignore_pat: bool = False,
    ) -> None:
        """Map ``[gpa, gpa+size)`` to ``[hpa, hpa+size)`` with pages of ``page_size``."""
        if page_size not in (PAGE_4K, PAGE_2M, PAGE_1G):
            raise ValueError(f"page size {page_size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        if (gpa | hpa | size) % page_size:
            raise ValueError(f"gpa, hpa and size must be multiples of the page size {page_size:#x}")
        leaf = permissions | memory_type << _MEMTYPE_SHIFT | (_IGNORE_PAT if ignore_pat else 0)
        for offset in range(0, size, page_size):
            self._map_page(gpa + offset, hpa + offset, page_size, leaf)

    def _map_page(self, gpa: int, hpa: int, page_size: int, leaf: int) -> None:
        leaf_level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}[page_size]
        table = self.root
        for level in range(self.levels, leaf_level, -1):
            address = table + _index(gpa, level) * 8
            entry = self.mem.read_u64(address)
            if not entry & _PRESENT:
                entry = self._allocate() | EptPerm.RWX  # non-leaf entries allow all; the leaf decides
                self.mem.write_u64(address, entry)
            elif entry & _LARGE:
                raise ValueError(f"GPA {gpa:#x} is already mapped by a larger page")
            table = entry & _ADDRESS_51_12
        address = table + _index(gpa, leaf_level) * 8
        existing = self.mem.read_u64(address)
        if leaf_level > 1 and existing & _PRESENT and not existing & _LARGE:
            raise ValueError(f"GPA {gpa:#x} is already mapped by smaller pages")
        self.mem.write_u64(address, hpa | leaf | (_LARGE if leaf_level > 1 else 0))

    def _allocate(self) -> int:
        table = self._next
        if table + PAGE_4K > self._end:
            raise ValueError("EPT table pool exhausted")
        self._next += PAGE_4K
        for offset in range(0, PAGE_4K, 8):
            self.mem.write_u64(table + offset, 0)
        return table
