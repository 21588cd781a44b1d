"""Shadow paging: the hypervisor's own GVA -> HPA tables in place of the guest's, kept coherent.

Without EPT the processor walks one set of page tables, and they cannot be the guest's: the
guest's tables map guest-linear to *guest*-physical addresses. The hypervisor therefore keeps
**shadow page tables** that map guest-linear pages straight to the host-physical page holding
the guest-physical frame (guest RAM is at host-physical 0 in both engines, so host-physical =
guest-physical) and points the real CR3 at them. This module is that MMU, shared by the model
engine (``ModelEngine(paging="shadow")``, where the VMCS has "enable EPT" off and the exits below
on) and the trap engine (classic trap-and-emulate, where the same events arrive as faults):

* the shadow is **filled lazily**: every page fault on the shadow reaches the hypervisor (on
  VT-x a VM exit for #PF through bit 14 of the exception bitmap, basic reason 0), which walks the
  guest's own tables (:func:`hvm.vtx.paging.translate`, which sets the guest's accessed and dirty
  flags as the processor would) and either installs the translation -- a *hidden* fault the
  guest never sees -- or reflects a #PF to it -- a *true* fault;
* **accessed/dirty propagation**: a shadow entry exists only after a walk that set the guest's
  accessed flags, and is writable only once the guest's dirty flag is set (a read maps the page
  read-only; the first write faults again and the walk for the write sets D), so the guest
  reads back exactly the A/D bits the processor would have set;
* every page the walks read as a paging structure is **write-protected** in every shadow entry
  mapping it (across all cached roots). A guest write to one faults; the hypervisor then either
  lets exactly that instruction write and re-protects (the trap engine single-steps it:
  :meth:`ShadowMmu.unprotect` / :meth:`ShadowMmu.reprotect`; the model engine does so for a write
  through a self-mapped table: :meth:`ShadowMmu.open_leaf` / :meth:`ShadowMmu.reprotect`) or
  *unprotects and resyncs*
  (:meth:`ShadowMmu.write_fault`: every shadow entry whose walk went through the written table is
  zapped and the page is left writable until a walk reads it as a table again). Either way no
  shadow entry outlives the guest entry it was built from;
* **CR3 loads** (CR3-load exiting, reason 28) select the shadow root kept for the new guest CR3
  and paging mode: roots are **cached** (at most ``max_roots``, least recently used evicted), so
  switching back to a known address space reuses its filled shadow -- the guest's writes to any
  cached root's tables were caught by the write protection, so the cache is always in sync;
* **INVLPG** (INVLPG exiting, reason 14) zaps the one shadow entry in the current root.

Two permission policies: ``Policy.GUEST`` (the model engine) gives a shadow entry the rights the
guest's entries grant (U/S, R/W once dirty, XD), as KVM does; ``Policy.VERIFIED`` (the trap engine,
whose guest kernel runs at CPL 3 and whose code-page scanner needs to see the first fetch from a
page) gives only what the walk for the faulting access verified: a fetch maps the page executable
and read-only, a write writable and not executable, a read neither.

The shadow is always 4-level (IA-32e format) whatever the guest's paging mode, and maps 4-KiB
pages only (a guest 2-MiB, 4-MiB or 1-GiB page is shadowed page by page).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from hvm.vtx.paging import Access, PageFault, PagingMode, PagingRegs, Translation, load_pdptes, translate

PAGE = 4096
_P, _RW, _US, _A, _D = 1, 2, 4, 1 << 5, 1 << 6
_XD = 1 << 63
_ADDR = 0x000F_FFFF_FFFF_F000
_CR0_PG, _CR0_WP = 1 << 31, 1 << 16
_CR4_PSE, _CR4_PAE, _CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
_EFER_LMA, _EFER_NXE = 1 << 10, 1 << 11
_U64 = struct.Struct("<Q")
DEFAULT_MAX_ROOTS = 8  # shadow roots kept across CR3 switches (KVM keeps 4 "previous roots" per vCPU)


class TableMemory(Protocol):
    def read_u64(self, hpa: int) -> int: ...
    def write_u64(self, hpa: int, value: int) -> None: ...
    def clear(self, hpa: int, length: int) -> None: ...


class TablePages:
    """Pages of hypervisor memory at host-physical ``base`` that only the hypervisor reads."""

    def __init__(self, base: int, pages: int) -> None:
        self.base = base
        self.buf = bytearray(pages * PAGE)

    def read_u64(self, hpa: int) -> int:
        return _U64.unpack_from(self.buf, hpa - self.base)[0]

    def write_u64(self, hpa: int, value: int) -> None:
        _U64.pack_into(self.buf, hpa - self.base, value)

    def clear(self, hpa: int, length: int) -> None:
        offset = hpa - self.base
        self.buf[offset : offset + length] = bytes(length)


class Policy(Enum):
    GUEST = "guest"  # the guest's own rights (U/S, R/W once dirty, XD)
    VERIFIED = "verified"  # only what the walk for this access verified (see the module docstring)


@dataclass
class ShadowStats:
    fills: int = 0  # hidden faults: a translation installed
    guest_faults: int = 0  # true faults, reflected to the guest
    protected_writes: int = 0  # guest writes to a write-protected paging-structure (or GDT) page
    drops: int = 0  # whole-shadow drops (pool exhaustion; explicit resets)
    invlpg: int = 0
    cr3_switches: int = 0  # CR3 loads (and paging-mode changes) that selected a root
    root_hits: int = 0  # ... whose root was cached (its shadow reused)
    root_misses: int = 0  # ... that started an empty root
    evictions: int = 0  # cached roots freed to stay within the bound or the pool
    zapped: int = 0  # shadow entries removed because the guest table they came from was written


@dataclass
class Fill:
    """The outcome of a shadow fill: installed, or the guest's own #PF, or not RAM."""

    fault: PageFault | None = None
    not_ram: int | None = None  # guest-physical address outside RAM (the caller's MMIO)
    frame: int = 0  # the guest-physical frame now mapped
    entry: int = 0  # the shadow leaf entry installed
    tables: frozenset[int] = frozenset()  # guest frames the walk read as paging structures


@dataclass
class _Root:
    key: tuple[int, int, int, int]
    hpa: int
    pages: list[int] = field(default_factory=list)  # pool indices it holds (its own page first)
    leaves: dict[int, int] = field(default_factory=dict)  # linear page -> address of its shadow leaf


class PoolExhausted(Exception):
    """No free page for a shadow paging structure."""


def root_key(regs: PagingRegs) -> tuple[int, int, int, int]:
    """What selects a shadow root: the guest's CR3 and the register bits that change translation."""
    mode = regs.mode
    if mode is PagingMode.NONE:
        return (0, 0, 0, 0)
    cr3 = regs.cr3 & (0xFFFF_FFE0 if mode is PagingMode.PAE else ~0xFFF & _ADDR)
    return (cr3, regs.cr0 & (_CR0_PG | _CR0_WP), regs.cr4 & (_CR4_PSE | _CR4_PAE | _CR4_LA57),
            regs.efer & (_EFER_LMA | _EFER_NXE))


class ShadowMmu:
    """Lazily filled, write-protection-coherent shadow page tables, cached per guest CR3.

    ``tables`` holds the shadow paging structures at host-physical ``pool_base`` (``pool_pages``
    pages); ``guest`` is guest-physical memory for the guest's walks (its A/D flags are written
    there); ``regs()`` gives the guest's paging registers as the guest sees them; ``flush()``
    empties the real TLB, needed whenever a shadow entry loses a permission or disappears, or the
    root changes. ``root_init(hpa)`` fills in a new root's hypervisor entries (the trap engine's).
    """

    def __init__(self, tables: TableMemory, guest, ram_size: int, regs: Callable[[], PagingRegs],
                 flush: Callable[[], None], *, pool_base: int, pool_pages: int,
                 max_roots: int = DEFAULT_MAX_ROOTS, policy: Policy = Policy.GUEST,
                 root_init: Callable[[int], None] | None = None,
                 is_ram: Callable[[int], bool] | None = None) -> None:
        if max_roots < 1:
            raise ValueError("max_roots must be at least 1")
        self.tables = tables
        self.guest = guest
        self.ram_size = ram_size
        self.regs = regs
        self.flush = flush
        self.pool_base = pool_base
        self.pool_pages = pool_pages
        self.max_roots = max_roots
        self.policy = policy
        self.root_init = root_init
        self.is_ram = is_ram or (lambda gpa: 0 <= gpa < ram_size)
        self.stats = ShadowStats()
        self.logged: list[tuple[int, int]] = []  # guest-physical ranges with dirty logging
        self.dirty: set[int] = set()  # frames of logged ranges written since the last harvest
        self.protected: dict[int, str] = {}  # guest frame -> "page table" or "gdt"
        self.gdt_frames: set[int] = set()
        self._roots: OrderedDict[tuple[int, int, int, int], _Root] = OrderedDict()
        self._current: _Root | None = None
        self._free: list[int] = []
        # leaf -> (root, linear page, frame, tables its walk read)
        self._meta: dict[int, tuple[_Root, int, int, frozenset[int]]] = {}
        self._rmap: dict[int, set[int]] = {}  # guest frame -> leaves mapping it
        self._derived: dict[int, set[int]] = {}  # table frame -> leaves whose walk read it
        self.drop(count=False)

    # --- roots --------------------------------------------------------------------------
    @property
    def root(self) -> int:
        """Host-physical address of the shadow root for the guest's current paging registers."""
        return self._root_for(root_key(self.regs())).hpa

    @property
    def cached_roots(self) -> int:
        return len(self._roots)

    def _root_for(self, key: tuple[int, int, int, int]) -> _Root:
        current = self._current
        if current is not None and current.key == key:
            return current
        root = self._roots.get(key)
        if root is not None:
            self.stats.root_hits += 1
            self._roots.move_to_end(key)
        else:
            self.stats.root_misses += 1
            while len(self._roots) >= self.max_roots:
                self._evict(next(iter(self._roots.values())))
            root = self._new_root(key)
        self._current = root
        self.flush()
        return root

    def switch(self) -> int:
        """A CR3 load or paging-mode change: the root for the new registers (cached or empty).

        The real TLB is flushed, as MOV to CR3 flushes the processor's non-global entries
        (SDM Vol. 3A 4.10.4.1); the shadow itself needs no flush, it is kept in sync."""
        self.stats.cr3_switches += 1
        root = self._root_for(root_key(self.regs()))
        self.flush()
        return root.hpa

    def _new_root(self, key: tuple[int, int, int, int]) -> _Root:
        index = self._take_page()
        hpa = self.pool_base + index * PAGE
        root = _Root(key, hpa, [index])
        if self.root_init is not None:
            self.root_init(hpa)
        self._roots[key] = root
        return root

    def _take_page(self, keep: _Root | None = None) -> int:
        if not self._free:
            for victim in list(self._roots.values()):
                if victim is not self._current and victim is not keep:
                    self._evict(victim)
                    break
            else:
                raise PoolExhausted
        index = self._free.pop()
        self.tables.clear(self.pool_base + index * PAGE, PAGE)
        return index

    def _evict(self, root: _Root) -> None:
        for leaf in list(root.leaves.values()):
            self._unlink(leaf)
        root.leaves.clear()
        self._free.extend(root.pages)
        root.pages.clear()
        del self._roots[root.key]
        if self._current is root:
            self._current = None
        self.stats.evictions += 1

    def drop(self, count: bool = True) -> None:
        """Forget every shadow translation and every cached root."""
        self._roots.clear()
        self._current = None
        self._free = list(range(self.pool_pages - 1, -1, -1))
        self._meta.clear()
        self._rmap.clear()
        self._derived.clear()
        self.protected = {frame: "gdt" for frame in self.gdt_frames}
        if count:
            self.stats.drops += 1
        self.flush()

    # --- the processor's walk of the shadow -----------------------------------------------
    def lookup(self, la: int, access: Access, user: bool) -> int | None:
        """The shadow leaf entry for ``la`` if it permits ``access`` (CR0.WP = 1, EFER.NXE = 1),
        else None: what the processor's walk of the shadow tables finds (the tables above each
        leaf are always present, writable and user)."""
        root = self._root_for(root_key(self.regs()))
        leaf = root.leaves.get(la & ~(PAGE - 1))
        if leaf is None:
            return None
        entry = self.tables.read_u64(leaf)
        if not entry & _P or (user and not entry & _US):
            return None
        if access is Access.WRITE and not entry & _RW or access is Access.FETCH and entry & _XD:
            return None
        return entry

    # --- filling --------------------------------------------------------------------------
    def walk_guest(self, la: int, access: Access, user: bool) -> Translation | PageFault:
        """The guest's own walk (sets its A/D flags); raises ValueError for a non-canonical ``la``
        or a PDPTE with reserved bits."""
        regs = self.regs()
        if regs.mode is PagingMode.PAE and not regs.pdptes:
            regs = PagingRegs(regs.cr0, regs.cr3, regs.cr4, regs.efer, load_pdptes(self.guest, regs.cr3))
        return translate(self.guest, regs, la, access, user=user)

    def fill(self, la: int, access: Access, user: bool = False) -> Fill:
        """Install the translation of ``la`` the guest's tables give for ``access``."""
        regs = self.regs()
        root = self._root_for(root_key(regs))
        result = self.walk_guest(la, access, user)
        if isinstance(result, PageFault):
            self.stats.guest_faults += 1
            return Fill(fault=result)
        frame = result.address & ~(PAGE - 1)
        if not self.is_ram(frame):
            return Fill(not_ram=result.address)
        mode = regs.mode
        tables = frozenset(ref & ~(PAGE - 1) for ref in result.refs)
        if mode is PagingMode.PAE:
            tables |= {regs.cr3 & 0xFFFF_F000}  # the PDPT, which a CR3 load reads
        for table in tables:
            self._protect(table, "page table")
        entry = frame | _P
        if self.policy is Policy.VERIFIED:
            entry |= _US
            if access is Access.WRITE and frame not in self.protected:
                entry |= _RW
            if access is not Access.FETCH:
                entry |= _XD
        else:
            entry |= self._guest_rights(regs, result, access, user, frame)
        if self.logged and self._is_logged(frame):
            if access is Access.WRITE and entry & _RW:
                self.dirty.add(frame)  # the write is about to land: log it
            elif frame not in self.dirty:
                entry &= ~_RW  # clean: the first write must fault, to be logged
        try:
            leaf = self._leaf(root, la)
        except PoolExhausted:
            self.drop()
            return self.fill(la, access, user)
        page = la & ~(PAGE - 1)
        old_entry = self.tables.read_u64(leaf)
        if leaf in self._meta:
            self._unlink(leaf)
        self.tables.write_u64(leaf, entry)
        root.leaves[page] = leaf
        self._meta[leaf] = (root, page, frame, tables)
        self._rmap.setdefault(frame, set()).add(leaf)
        for table in tables:
            self._derived.setdefault(table, set()).add(leaf)
        self.stats.fills += 1
        if old_entry & _P and (old_entry & ~entry & (_RW | _US) or entry & ~old_entry & _XD):
            self.flush()  # the entry lost a permission the TLB may still hold
        return Fill(frame=frame, entry=entry, tables=tables)

    def _guest_rights(self, regs: PagingRegs, result: Translation, access: Access, user: bool,
                      frame: int) -> int:
        """U/S, R/W and XD of a shadow leaf from the guest's entries (SDM Vol. 3A 4.6): rights are
        the AND over the walk's entries, XD the OR; R/W only once the leaf's dirty flag is set."""
        size = 4 if regs.mode is PagingMode.BITS32 else 8
        rights, xd = _RW | _US, 0
        leaf = 0
        for ref in result.refs:
            word = self.guest.read_u64(ref & ~7)
            leaf = word >> (ref & 4) * 8 & 0xFFFF_FFFF if size == 4 else word
            rights &= leaf
            xd |= leaf
        out = rights & _US
        if size == 8 and regs.efer & _EFER_NXE and xd & _XD:
            out |= _XD
        dirty = bool(leaf & _D) or not result.refs  # paging off: no dirty flag to keep
        if frame in self.protected:
            return out
        if rights & _RW and dirty:
            out |= _RW
        elif access is Access.WRITE and not user and not regs.cr0 & _CR0_WP:
            # CR0.WP = 0 lets the guest kernel write a read-only page; the real CR0.WP stays 1 (the
            # write protection above needs it), so the entry is writable but supervisor-only.
            out = out & ~_US | _RW
        return out

    def _leaf(self, root: _Root, la: int) -> int:
        """Address of the shadow PTE for ``la`` in ``root``, creating the tables above it."""
        table = root.hpa
        tables = self.tables
        for shift in (39, 30, 21):
            slot = table + (la >> shift & 0x1FF) * 8
            entry = tables.read_u64(slot)
            if not entry & _P:
                index = self._take_page(keep=root)
                root.pages.append(index)
                entry = self.pool_base + index * PAGE | _P | _RW | _US
                tables.write_u64(slot, entry)
            table = entry & _ADDR
        return table + (la >> 12 & 0x1FF) * 8

    def _protect(self, frame: int, why: str) -> None:
        if frame in self.protected:
            return
        self.protected[frame] = why
        if self._write_protect(frame):
            self.flush()

    def _unlink(self, leaf: int) -> None:
        root, page, frame, tables = self._meta.pop(leaf)
        leaves = self._rmap.get(frame)
        if leaves is not None:
            leaves.discard(leaf)
        for table in tables:
            derived = self._derived.get(table)
            if derived is not None:
                derived.discard(leaf)
        if root.leaves.get(page) == leaf:
            del root.leaves[page]

    def _zap(self, leaf: int) -> None:
        self.tables.write_u64(leaf, 0)
        self._unlink(leaf)
        self.stats.zapped += 1

    def _zap_derived(self, frame: int) -> bool:
        leaves = self._derived.get(frame)
        if not leaves:
            return False
        for leaf in list(leaves):
            self._zap(leaf)
        return True

    # --- dirty logging (what EPT's dirty flags give the VMM, done with write protection) -------
    def log_dirty(self, gpa: int, size: int) -> None:
        """Log writes to [gpa, gpa + size): its pages are mapped read-only until written."""
        self.logged.append((gpa, size))
        for frame in range(gpa, gpa + size, PAGE):
            self._write_protect(frame)
        self.flush()

    def _is_logged(self, frame: int) -> bool:
        return any(base <= frame < base + size for base, size in self.logged)

    def _write_protect(self, frame: int) -> bool:
        downgraded = False
        for leaf in self._rmap.get(frame, ()):
            entry = self.tables.read_u64(leaf)
            if entry & _RW:
                self.tables.write_u64(leaf, entry & ~_RW)
                downgraded = True
        return downgraded

    def harvest_dirty(self, gpa: int, size: int) -> list[int]:
        """Page indices of [gpa, gpa + size) written since the last harvest; they are clean again
        (write-protected) afterwards."""
        pages = sorted((frame - gpa) // PAGE for frame in self.dirty if gpa <= frame < gpa + size)
        downgraded = False
        for index in pages:
            frame = gpa + index * PAGE
            self.dirty.discard(frame)
            downgraded |= self._write_protect(frame)
        if downgraded:
            self.flush()
        return pages

    # --- faults on present entries, INVLPG, the hypervisor's own writes --------------------
    def frame_of(self, la: int) -> int | None:
        root = self._root_for(root_key(self.regs()))
        leaf = root.leaves.get(la & ~(PAGE - 1))
        if leaf is None:
            return None
        entry = self.tables.read_u64(leaf)
        return entry & _ADDR if entry & _P else None

    def write_fault(self, frame: int) -> None:
        """Unprotect and resync: the guest writes page table ``frame``. Every shadow entry walked
        through it is zapped (in every cached root) and the page stays writable until a walk reads
        it as a paging structure again."""
        self.stats.protected_writes += 1
        self._zap_derived(frame)
        if self.protected.get(frame) == "page table":
            del self.protected[frame]
        self.flush()

    def unprotect(self, frame: int) -> None:
        """Let the next instruction write ``frame``: its shadow entries become writable."""
        for leaf in self._rmap.get(frame, ()):
            self.tables.write_u64(leaf, self.tables.read_u64(leaf) | _RW)

    def open_leaf(self, la: int, frame: int) -> int | None:
        """Make the current root's entry for ``la`` (which maps ``frame``) writable for one
        instruction, as :meth:`unprotect` does for every entry mapping a frame: the entry, or None
        when there is no such entry. Only this linear page: another alias of the frame may be
        read-only in the guest's tables."""
        root = self._root_for(root_key(self.regs()))
        leaf = root.leaves.get(la & ~(PAGE - 1))
        if leaf is None or self._meta[leaf][2] != frame:
            return None
        entry = self.tables.read_u64(leaf) | _RW
        self.tables.write_u64(leaf, entry)
        return entry

    def reprotect(self, frame: int) -> None:
        """After the write: read-only again, and every translation walked through it dropped."""
        self.stats.protected_writes += 1
        for leaf in self._rmap.get(frame, ()):
            self.tables.write_u64(leaf, self.tables.read_u64(leaf) & ~_RW)
        if self.protected.get(frame) == "page table":
            self._zap_derived(frame)
        self.flush()

    def invlpg(self, la: int) -> None:
        """INVLPG: the current root's entry for ``la`` goes."""
        self.stats.invlpg += 1
        root = self._root_for(root_key(self.regs()))
        leaf = root.leaves.get(la & ~(PAGE - 1))
        if leaf is not None:
            self._zap(leaf)
        self.flush()

    def guest_wrote(self, gpa: int) -> str | None:
        """The hypervisor itself wrote guest memory at ``gpa``: keep the shadows right."""
        frame = gpa & ~(PAGE - 1)
        why = self.protected.get(frame)
        if why == "page table" and self._zap_derived(frame):
            self.flush()
        return why

    def protect_gdt(self, base_frames: set[int]) -> None:
        """Write-protect the guest GDT's frames (from now on, and in existing entries)."""
        for frame in self.gdt_frames - base_frames:
            if self.protected.get(frame) == "gdt":
                del self.protected[frame]
        self.gdt_frames = set(base_frames)
        for frame in base_frames:
            self._protect(frame, "gdt")
