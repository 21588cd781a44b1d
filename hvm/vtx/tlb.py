"""A TLB model: the translation caches of Intel SDM Vol. 3A 4.10 and Vol. 3C 29.4, with statistics.

What is cached (SDM 4.10.2, 4.10.3, 29.4.1):

* **linear mappings** (EPT off) and **combined mappings** (EPT on): linear page -> host-physical
  frame, tagged with the VPID, the PCID (or *global*, G = 1 with CR4.PGE, SDM 4.10.2.4) and, for
  combined mappings, the EP4TA (EPTP bits 51:12). They live in set-associative arrays organised
  as a processor's: first-level instruction and data TLBs per page size, backed by a shared
  second-level TLB (:class:`TlbConfig`);
* **paging-structure caches** (SDM 4.10.3.1): for the upper bits of a linear address, the table
  of the next guest level (PML5E, PML4E, PDPTE and PDE caches); under EPT these are *combined*
  paging-structure caches holding the host-physical address of that table (SDM 29.4.1);
* **guest-physical mappings** (SDM 29.4.1): guest-physical page -> host-physical frame from EPT
  alone, tagged with the EP4TA, and **EPT paging-structure caches** for the upper GPA bits.

:meth:`TlbModel.translate` looks an access up and, on a miss, walks with :func:`hvm.vtx.walk.walk_2d`
using these caches (the model implements :class:`hvm.vtx.walk.WalkCaches`), counting every reference.

Invalidation follows the SDM: :meth:`invlpg` and :meth:`invpcid` (SDM 4.10.4.1 and Vol. 2
INVPCID), MOV to CR3 / CR0 / CR4 (:meth:`mov_to_cr3`, :meth:`flush_vpid`, SDM 4.10.4.1),
:meth:`invvpid` (types 0-3, SDM 29.4.3.1 and Vol. 2 INVVPID), :meth:`invept` (types 1-2, SDM
29.4.3.1 and Vol. 2 INVEPT) and VM entry/exit without VPIDs (:meth:`vm_transition`, SDM
29.4.3.3). Where the SDM lets a processor invalidate more, this model invalidates exactly what
the SDM requires, except that INVLPG and INVVPID type 0 drop the paging-structure caches for the
context (as INVLPG must, SDM 4.10.4.1).

Default geometry: Intel Skylake client (also Skylake-SP), from the Intel 64 and IA-32
Architectures Optimization Reference Manual (248966-045, February 2022), Table 2-15 "TLB
Parameters of the Skylake Microarchitecture": ITLB 4 KiB 128 entries 8-way, ITLB 2/4 MiB 8
entries per thread (fully associative); DTLB 4 KiB 64 entries 4-way, 2/4 MiB 32 entries 4-way,
1 GiB 4 entries 4-way; STLB 4 KiB + 2 MiB 1536 entries 12-way, 1 GiB 16 entries 4-way.
Intel publishes no sizes for paging-structure caches or guest-physical mappings (SDM 4.10.3.1:
"a processor may or may not implement any of the paging-structure caches"), so they are off
(0 entries) by default and a :class:`TlbConfig` turns them on; LRU replacement within a set is
the model's choice (Intel does not document the policy).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from enum import IntEnum

from hvm.vtx.memory import PhysicalMemory
from hvm.vtx.paging import PAGE_1G, PAGE_2M, PAGE_4K, PAGE_4M, PagingMode, PagingRegs, paging_mode
from hvm.vtx.walk import RefKind, Walk, walk_2d

GLOBAL = -1  # the PCID slot of a global entry: it matches every PCID (SDM 4.10.2.4)
_ADDRESS = 0x000F_FFFF_FFFF_F000


@dataclass(frozen=True)
class ArrayConfig:
    name: str
    entries: int
    ways: int  # == entries: fully associative
    page_sizes: tuple[int, ...]

    @property
    def sets(self) -> int:
        return max(1, self.entries // self.ways)


@dataclass(frozen=True)
class TlbConfig:
    itlb: tuple[ArrayConfig, ...]
    dtlb: tuple[ArrayConfig, ...]
    stlb: tuple[ArrayConfig, ...]
    psc_entries: int = 0  # per paging-structure cache (PML5E, PML4E, PDPTE, PDE), fully associative
    gpa_entries: int = 0  # guest-physical mappings
    ept_psc_entries: int = 0  # per EPT paging-structure cache level
    source: str = ""


SKYLAKE = TlbConfig(
    itlb=(ArrayConfig("itlb_4k", 128, 8, (PAGE_4K,)), ArrayConfig("itlb_2m", 8, 8, (PAGE_2M, PAGE_4M))),
    dtlb=(ArrayConfig("dtlb_4k", 64, 4, (PAGE_4K,)), ArrayConfig("dtlb_2m", 32, 4, (PAGE_2M, PAGE_4M)),
          ArrayConfig("dtlb_1g", 4, 4, (PAGE_1G,))),
    stlb=(ArrayConfig("stlb", 1536, 12, (PAGE_4K, PAGE_2M, PAGE_4M)),
          ArrayConfig("stlb_1g", 16, 4, (PAGE_1G,))),
    source="Intel Optimization Reference Manual 248966-045, Table 2-15 (Skylake TLB parameters)",
)


def with_caches(config: TlbConfig, entries: int) -> TlbConfig:
    """``config`` with paging-structure caches, guest-physical mappings and EPT PSCs of ``entries`` each."""
    return replace(config, psc_entries=entries, gpa_entries=entries, ept_psc_entries=entries)


class SetAssociative:
    """``entries`` in sets of ``ways``, least recently used replaced first."""

    def __init__(self, entries: int, ways: int) -> None:
        self.ways = max(1, ways)
        self.sets: list[OrderedDict] = [OrderedDict() for _ in range(max(1, entries // self.ways))]
        self.enabled = entries > 0

    def _set(self, index: int) -> OrderedDict:
        return self.sets[index % len(self.sets)]

    def lookup(self, index: int, key: tuple) -> object | None:
        if not self.enabled:
            return None
        s = self._set(index)
        value = s.get(key)
        if value is not None:
            s.move_to_end(key)
        return value

    def insert(self, index: int, key: tuple, value: object) -> None:
        if not self.enabled:
            return
        s = self._set(index)
        s[key] = value
        s.move_to_end(key)
        while len(s) > self.ways:
            s.popitem(last=False)

    def drop(self, keep) -> int:
        """Remove every entry for which ``keep(key)`` is false; how many went."""
        gone = 0
        for s in self.sets:
            for key in [k for k in s if not keep(k)]:
                del s[key]
                gone += 1
        return gone

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)


class InvpcidType(IntEnum):
    """SDM Vol. 2 INVPCID: the INVPCID types."""

    INDIVIDUAL_ADDRESS = 0
    SINGLE_CONTEXT = 1
    ALL_CONTEXTS_INCL_GLOBAL = 2
    ALL_CONTEXTS = 3


class InvvpidType(IntEnum):
    """SDM Vol. 2 INVVPID: the INVVPID types."""

    INDIVIDUAL_ADDRESS = 0
    SINGLE_CONTEXT = 1
    ALL_CONTEXTS = 2
    SINGLE_CONTEXT_RETAINING_GLOBALS = 3


class InveptType(IntEnum):
    """SDM Vol. 2 INVEPT: the INVEPT types."""

    SINGLE_CONTEXT = 1
    ALL_CONTEXTS = 2


@dataclass(frozen=True)
class Context:
    """What tags the current translations: VPID (0 outside VMX non-root or without VPIDs), PCID,
    EP4TA (None: EPT off, linear mappings), and the paging registers."""

    regs: PagingRegs
    vpid: int = 0
    ep4ta: int | None = None
    eptp: int | None = None

    @property
    def pcid(self) -> int:
        # SDM 4.10.1: the current PCID is CR3 bits 11:0 when CR4.PCIDE = 1, else 000H.
        return self.regs.cr3 & 0xFFF if self.regs.cr4 & (1 << 17) else 0


@dataclass
class Stats:
    lookups: Counter = field(default_factory=Counter)  # array name -> lookups
    hits: Counter = field(default_factory=Counter)  # array name -> hits
    misses: int = 0  # translations that missed every TLB level and walked
    walk_refs: Counter = field(default_factory=Counter)  # "guest.L4", "ept.L2", ... -> references
    ept_refs_for_tables: int = 0  # EPT references made to locate guest paging structures
    invalidations: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        out = {"tlb_misses": self.misses, "walk_refs": sum(self.walk_refs.values()),
               "ept_refs_for_tables": self.ept_refs_for_tables}
        out.update({f"tlb_lookups.{k}": v for k, v in sorted(self.lookups.items())})
        out.update({f"tlb_hits.{k}": v for k, v in sorted(self.hits.items())})
        out.update({f"walk_refs.{k}": v for k, v in sorted(self.walk_refs.items())})
        out.update({f"invalidations.{k}": v for k, v in sorted(self.invalidations.items())})
        return out


def _page_key(la: int, size: int) -> int:
    return la & ~(size - 1)


# Guest PSC levels per paging mode: level of the table a PSC entry locates and the shift of the
# linear-address bits that reference it (SDM 4.10.3.1: PDE cache bits 47:21 locate a PT, ...).
_PSC_LEVELS = {
    PagingMode.BITS32: ((1, 22),),
    PagingMode.PAE: ((1, 21),),
    PagingMode.LEVEL4: ((1, 21), (2, 30), (3, 39)),
    PagingMode.LEVEL5: ((1, 21), (2, 30), (3, 39), (4, 48)),
}


class TlbModel:
    """TLBs, paging-structure caches and guest-physical mappings (see the module docstring)."""

    def __init__(self, mem: PhysicalMemory, config: TlbConfig = SKYLAKE) -> None:
        self.mem = mem
        self.config = config
        every = (*config.itlb, *config.dtlb, *config.stlb)
        self.arrays: dict[str, tuple[ArrayConfig, SetAssociative]] = {
            a.name: (a, SetAssociative(a.entries, a.ways)) for a in every}
        self.psc = {level: SetAssociative(config.psc_entries, config.psc_entries) for level in (1, 2, 3, 4)}
        self.gpa = SetAssociative(config.gpa_entries, config.gpa_entries)
        self.ept_psc = {level: SetAssociative(config.ept_psc_entries, config.ept_psc_entries)
                        for level in (1, 2, 3, 4)}
        self.stats = Stats()
        self.context: Context | None = None

    # --- lookups ------------------------------------------------------------------------------
    def _lookup_in(self, names: tuple[ArrayConfig, ...], ctx: Context, la: int) -> tuple[int, int] | None:
        for cfg in names:
            array = self.arrays[cfg.name][1]
            if not array.enabled:
                continue
            self.stats.lookups[cfg.name] += 1
            for size in cfg.page_sizes:
                base = _page_key(la, size)
                index = base // size
                for pcid in (ctx.pcid, GLOBAL):
                    hit = array.lookup(index, (ctx.vpid, ctx.ep4ta, pcid, base, size))
                    if hit is not None:
                        self.stats.hits[cfg.name] += 1
                        return hit  # (host frame, size)
        return None

    def _fill_in(self, names: tuple[ArrayConfig, ...], ctx: Context, la: int, frame: int, size: int,
                 glob: bool) -> None:
        for cfg in names:
            if size in cfg.page_sizes:
                base = _page_key(la, size)
                key = (ctx.vpid, ctx.ep4ta, GLOBAL if glob else ctx.pcid, base, size)
                self.arrays[cfg.name][1].insert(base // size, key, (frame, size))
                return

    def translate(self, ctx: Context, la: int, fetch: bool = False) -> tuple[int, Walk | None]:
        """HPA of ``la``: from the first-level TLB, the STLB (which refills the first level), or a walk.

        Returns (hpa, the walk made or None on a hit)."""
        self.context = ctx
        first = self.config.itlb if fetch else self.config.dtlb
        hit = self._lookup_in(first, ctx, la)
        if hit is None:
            hit = self._lookup_in(self.config.stlb, ctx, la)
            if hit is not None:
                self._fill_in(first, ctx, la, hit[0], hit[1], False)
        if hit is not None:
            frame, size = hit
            return frame | la & (size - 1), None
        self.stats.misses += 1
        walk = walk_2d(self.mem, ctx.regs, la, ctx.eptp, self)
        for ref in walk.refs:
            if ref.kind is not RefKind.DATA:
                self.stats.walk_refs[f"{ref.kind.value}.L{ref.level}"] += 1
                if ref.kind is RefKind.EPT and ref.serves:
                    self.stats.ept_refs_for_tables += 1
        size = walk.page_size
        frame = walk.hpa & ~(size - 1)
        glob = self._global(ctx, la, walk)
        self._fill_in(self.config.stlb, ctx, la, frame, size, glob)
        self._fill_in(first, ctx, la, frame, size, glob)
        return walk.hpa, walk

    def _global(self, ctx: Context, la: int, walk: Walk) -> bool:
        """SDM 4.10.2.4: a translation is global if CR4.PGE = 1 and the leaf's G flag (bit 8) is 1."""
        if not ctx.regs.cr4 & (1 << 7):
            return False
        leaf = next(r for r in reversed(walk.refs) if r.kind is RefKind.GUEST) if walk.guest_refs else None
        if leaf is None:
            return False
        size = 4 if paging_mode(ctx.regs.cr0, ctx.regs.cr4, ctx.regs.efer) is PagingMode.BITS32 else 8
        value = self.mem.read_u64(leaf.address & ~7) >> (leaf.address & 4) * 8 if size == 4 else \
            self.mem.read_u64(leaf.address)
        return bool(value & 1 << 8)

    # --- WalkCaches ------------------------------------------------------------------------
    def psc_lookup(self, la: int, mode: PagingMode) -> tuple[int, int, int] | None:
        ctx = self.context
        assert ctx is not None
        for level, shift in _PSC_LEVELS.get(mode, ()):
            hit = self.psc[level].lookup(0, (ctx.vpid, ctx.ep4ta, ctx.pcid, la >> shift))
            if hit is not None:
                return (level, *hit)  # type: ignore[return-value]
        return None

    def psc_fill(self, la: int, mode: PagingMode, level: int, table_gpa: int, table_hpa: int) -> None:
        ctx = self.context
        assert ctx is not None
        shift = dict(_PSC_LEVELS.get(mode, ())).get(level)
        if shift is not None:
            self.psc[level].insert(0, (ctx.vpid, ctx.ep4ta, ctx.pcid, la >> shift), (table_gpa, table_hpa))

    def gpa_lookup(self, gpa: int) -> tuple[int, int] | None:
        ctx = self.context
        assert ctx is not None
        for size in (PAGE_4K, PAGE_2M, PAGE_1G):
            hit = self.gpa.lookup(0, (ctx.ep4ta, _page_key(gpa, size), size))
            if hit is not None:
                return hit  # type: ignore[return-value]
        return None

    def gpa_fill(self, gpa: int, hpa_base: int, page_size: int) -> None:
        ctx = self.context
        assert ctx is not None
        self.gpa.insert(0, (ctx.ep4ta, _page_key(gpa, page_size), page_size), (hpa_base, page_size))

    def ept_psc_lookup(self, gpa: int, levels: int) -> tuple[int, int] | None:
        ctx = self.context
        assert ctx is not None
        for level in (1, 2, 3, 4):
            if level >= levels:
                break
            hit = self.ept_psc[level].lookup(0, (ctx.ep4ta, gpa >> (12 + 9 * level)))
            if hit is not None:
                return level, hit  # type: ignore[return-value]
        return None

    def ept_psc_fill(self, gpa: int, level: int, table_hpa: int) -> None:
        ctx = self.context
        assert ctx is not None
        if level in self.ept_psc:
            self.ept_psc[level].insert(0, (ctx.ep4ta, gpa >> (12 + 9 * level)), table_hpa)

    # --- invalidation ---------------------------------------------------------------------
    def _drop_tlb(self, keep, what: str) -> None:
        gone = sum(array.drop(keep) for _, array in self.arrays.values())
        self.stats.invalidations[what] += 1
        self.stats.invalidations[f"{what}.entries"] += gone

    def _drop_psc(self, keep) -> None:
        for cache in self.psc.values():
            cache.drop(keep)

    def invlpg(self, ctx: Context, la: int) -> None:
        """SDM 4.10.4.1, INVLPG: the TLB entries for the page of ``la`` (global ones too) for the
        current VPID -- under EPT the combined mappings for every EP4TA (SDM 29.4.3.1) -- and all
        paging-structure-cache entries for the current PCID."""
        def keep(key: tuple) -> bool:
            vpid, ep4ta, pcid, base, size = key
            return not (vpid == ctx.vpid and pcid in (ctx.pcid, GLOBAL) and base <= la < base + size)
        self._drop_tlb(keep, "invlpg")
        self._drop_psc(lambda k: not (k[0] == ctx.vpid and k[2] == ctx.pcid))

    def invpcid(self, ctx: Context, kind: InvpcidType, pcid: int = 0, la: int = 0) -> None:
        """SDM Vol. 2 INVPCID (and 4.10.4.1), for the current VPID."""
        vpid = ctx.vpid
        if kind is InvpcidType.INDIVIDUAL_ADDRESS:
            # Mappings for ``la`` tagged ``pcid`` except global ones; PSC entries for ``pcid``.
            self._drop_tlb(lambda k: not (k[0] == vpid and k[2] == pcid and k[3] <= la < k[3] + k[4]),
                           "invpcid0")
            self._drop_psc(lambda k: not (k[0] == vpid and k[2] == pcid))
        elif kind is InvpcidType.SINGLE_CONTEXT:
            self._drop_tlb(lambda k: not (k[0] == vpid and k[2] == pcid), "invpcid1")
            self._drop_psc(lambda k: not (k[0] == vpid and k[2] == pcid))
        elif kind is InvpcidType.ALL_CONTEXTS_INCL_GLOBAL:
            self._drop_tlb(lambda k: k[0] != vpid, "invpcid2")
            self._drop_psc(lambda k: k[0] != vpid)
        else:
            self._drop_tlb(lambda k: not (k[0] == vpid and k[2] != GLOBAL), "invpcid3")
            self._drop_psc(lambda k: k[0] != vpid)

    def mov_to_cr3(self, ctx: Context, new_cr3: int, *, pcide: bool) -> None:
        """SDM 4.10.4.1, MOV to CR3: with CR4.PCIDE = 0 all non-global mappings and PSC entries of
        PCID 000H; with PCIDE = 1 those of the new PCID, unless bit 63 of the source is set."""
        if pcide and new_cr3 >> 63 & 1:
            return
        pcid = new_cr3 & 0xFFF if pcide else 0
        self._drop_tlb(lambda k: not (k[0] == ctx.vpid and k[2] == pcid), "mov_cr3")
        self._drop_psc(lambda k: not (k[0] == ctx.vpid and k[2] == pcid))

    def flush_vpid(self, vpid: int, *, keep_global: bool = False, what: str = "flush") -> None:
        """All mappings and PSC entries of ``vpid`` (MOV to CR0/CR4 changing PG, PGE, PCIDE, PAE, ...:
        SDM 4.10.4.1; ``keep_global`` for INVVPID type 3)."""
        self._drop_tlb(lambda k: not (k[0] == vpid and not (keep_global and k[2] == GLOBAL)), what)
        self._drop_psc(lambda k: k[0] != vpid)

    def invvpid(self, kind: InvvpidType, vpid: int = 0, la: int = 0) -> None:
        """SDM 29.4.3.1 / Vol. 2 INVVPID: linear and combined mappings (every EP4TA, every PCID)."""
        if kind is InvvpidType.INDIVIDUAL_ADDRESS:
            self._drop_tlb(lambda k: not (k[0] == vpid and k[3] <= la < k[3] + k[4]), "invvpid0")
            self._drop_psc(lambda k: k[0] != vpid)
        elif kind is InvvpidType.SINGLE_CONTEXT:
            self.flush_vpid(vpid, what="invvpid1")
        elif kind is InvvpidType.ALL_CONTEXTS:
            # "all mappings tagged with all VPIDs except VPID 0000H"
            self._drop_tlb(lambda k: k[0] == 0, "invvpid2")
            self._drop_psc(lambda k: k[0] == 0)
        else:
            self.flush_vpid(vpid, keep_global=True, what="invvpid3")

    def invept(self, kind: InveptType, eptp: int = 0) -> None:
        """SDM 29.4.3.1 / Vol. 2 INVEPT: guest-physical and combined mappings (and their PSCs) for the
        EP4TA of ``eptp`` (single-context) or for all EP4TAs; linear mappings stay."""
        ep4ta = eptp & _ADDRESS
        if kind is InveptType.SINGLE_CONTEXT:
            def gone(e: int | None) -> bool:
                return e == ep4ta
        else:
            def gone(e: int | None) -> bool:
                return e is not None
        self._drop_tlb(lambda k: not gone(k[1]), f"invept{int(kind)}")
        self._drop_psc(lambda k: not gone(k[1]))
        self.gpa.drop(lambda k: not gone(k[0]))
        for cache in self.ept_psc.values():
            cache.drop(lambda k: not gone(k[0]))

    def vm_transition(self, vpid_enabled: bool) -> None:
        """SDM 29.4.3.3: without VPIDs, VM entry and VM exit invalidate linear and combined mappings
        (and PSC entries) of VPID 0000H."""
        if not vpid_enabled:
            self.flush_vpid(0, what="vm_transition")

    def entries(self) -> int:
        return sum(len(a) for _, a in self.arrays.values())
