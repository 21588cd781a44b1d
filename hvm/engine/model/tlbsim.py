"""Walk accounting and the modelled TLB on the model engine: ``ModelEngine(memory, tlb="fast"|"detailed")``.

``tlb_caches=N`` adds N-entry paging-structure caches, guest-physical mappings and EPT
paging-structure caches; ``tlb_config`` (a :class:`hvm.vtx.tlb.TlbConfig`) replaces the default
Skylake geometry (levels, entries and ways per page size).

Every GVA -> HPA translation the modelled processor makes on a TLB miss is walked again by
:func:`hvm.vtx.walk.walk_2d` (no side effects) through a :class:`hvm.vtx.tlb.TlbModel`, and its
memory references are counted by kind: guest paging-structure reads per level, EPT reads per
level, the data access. The engine's own walk (:meth:`ModelEngine._guest_walk` and
:meth:`ModelEngine._ept`) still decides the translation, permissions and faults; the accounting
walk must reach the same host-physical address (``walk_mismatches`` counts when it does not).

Two fidelity modes:

``fast``
    Only the emulator's TLB misses reach Python: each Unicorn TLB fill is looked up in the
    modelled TLB and walked on a miss. Unicorn's TLB (QEMU's soft TLB) is flushed by the engine
    and by QEMU more often than the SDM requires and holds other entries than the modelled one,
    so the modelled TLB sees a subset of the accesses: its miss count is a lower bound of the
    detailed one, and the references per miss are exact for the misses it sees. The engine's walk
    cache (:meth:`ModelEngine._guest_walk` reuses a walk whose entries still hold their values)
    saves host time only; it never removes a counted walk, because the count comes from the
    accounting walk, made in full for every miss.
``detailed``
    Every guest memory access goes through the modelled TLB: a ``UC_HOOK_CODE`` hook for each
    instruction (one instruction-TLB lookup per instruction) and ``UC_HOOK_MEM_READ`` /
    ``UC_HOOK_MEM_WRITE`` hooks for each data access (the page of its first byte). With
    ``UC_TLB_VIRTUAL`` Unicorn hands those hooks the *host-physical* address; the linear page is
    the one the engine's last TLB fill mapped to that host page. Where two linear pages map one
    host page (an alias) that is ambiguous: ``tlb.alias_fills`` counts fills that re-point a host
    page to another linear page, ``tlb.unattributed`` accesses with no fill to go by. Counts are
    exact for the model when both are 0; the guest runs one to two orders of magnitude slower.

With ``paging="shadow"`` the processor walks the hypervisor's shadow tables (4-level, 4-KiB
pages, :mod:`hvm.vmm.shadow`) with EPT off, and so does the accounting walk.

Invalidations reach the modelled TLB as the SDM defines them: the guest's INVLPG and MOV to
CR0/CR3/CR4 (seen by the engine's sensitive-instruction hooks; one that faults invalidates
nothing), INVPCID once it executes (the engine implements it, also when a VMM completes its
exit), VM entry without VPIDs (SDM 29.4.3.3), VM exits without VPIDs -- those completed inside
the engine too -- and the VMM's INVEPT. Not counted: the four PDPTE loads of PAE paging on MOV to
CR3 (registers afterwards, SDM 4.4.1), walks that end in a fault, the engine's own accesses to
guest memory (instruction decode, I/O emulation), and a data access's second page when it
crosses a page boundary.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE

from hvm.engine.model.decode import Insn, Op
from hvm.errors import EngineUnavailable
from hvm.vtx.controls import ProcBased2
from hvm.vtx.paging import Access, PagingRegs
from hvm.vtx.tlb import SKYLAKE, Context, InveptType, InvpcidType, TlbConfig, TlbModel, with_caches
from hvm.vtx.vmcs import VmcsField
from hvm.vtx.walk import RefKind, WalkFault

if TYPE_CHECKING:
    from hvm.engine.model.engine import ModelEngine

MODES = ("fast", "detailed")
_CR0_PG, _CR0_WP = 1 << 31, 1 << 16
_CR4_PSE, _CR4_PAE, _CR4_PGE, _CR4_PCIDE, _CR4_LA57 = 1 << 4, 1 << 5, 1 << 7, 1 << 17, 1 << 12
_CR4_FLUSH = _CR4_PSE | _CR4_PAE | _CR4_PGE | _CR4_LA57  # SDM 4.10.4.1: changing these flushes all
_ENABLE_EPT, _ENABLE_VPID = int(ProcBased2.ENABLE_EPT), int(ProcBased2.ENABLE_VPID)


def check_options(mode: str | None, caches: int) -> None:
    """The engine options ``tlb`` and ``tlb_caches``, refused in one line when wrong."""
    if mode is not None and mode not in MODES:
        raise EngineUnavailable(f"the model engine's tlb option is 'fast' or 'detailed', not {mode!r}")
    if not isinstance(caches, int) or caches < 0:
        raise EngineUnavailable(f"the model engine's tlb_caches must be an integer >= 0: {caches!r}")


class _WithShadow:
    """Host memory with the shadow page tables, which live outside it (hvm.vmm.shadow.TablePages)."""

    def __init__(self, host, tables) -> None:
        self.host, self.tables = host, tables
        self.end = tables.base + len(tables.buf)

    def read_u64(self, addr: int) -> int:
        if self.tables.base <= addr < self.end:
            return self.tables.read_u64(addr)
        return self.host.read_u64(addr)

    def write_u64(self, addr: int, value: int) -> None:
        raise AssertionError("the accounting walk writes nothing")


class TranslationAccounting:
    def __init__(self, engine: ModelEngine, mode: str, caches: int = 0,
                 config: TlbConfig | None = None) -> None:
        check_options(mode, caches)
        self.engine = engine
        self.mode = mode
        config = config or SKYLAKE  # the geometry: TLB levels, entries and ways per page size
        if caches:
            config = with_caches(config, caches)
        shadow = engine.shadow
        memory = engine.host if shadow is None else _WithShadow(engine.host, shadow.tables)
        self.model = TlbModel(memory, config)
        self.walk_mismatches = 0
        self.walk_faults = 0
        self.accesses = 0  # translations looked up (instruction fetches and data accesses)
        self.data_accesses = 0
        self.data_misses = 0  # misses of data accesses (instruction fetches excluded) ...
        self.data_walk_refs = 0  # ... and the references their walks made
        self.data_ept_refs_for_tables = 0  # ... of which EPT reads locating guest tables
        self.by_page_size: Counter[int] = Counter()
        self._ctx: Context | None = None
        self._stale = True  # the context must be read again from the CPU before the next lookup
        self._linear: dict[int, int] = {}  # host page -> the linear page last filled to it
        self.alias_fills = 0
        self.unattributed = 0
        if mode == "detailed":
            uc = engine.uc
            uc.hook_add(UC_HOOK_CODE, self._on_code, None, 1, 0)
            uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._on_data)

    # --- context ------------------------------------------------------------------------
    def context(self) -> Context:
        if self._ctx is not None and not self._stale:
            return self._ctx
        eng = self.engine
        eng.cpu.sync()
        cpu = eng.cpu
        cr0, cr3, cr4, efer = cpu.cr(0), cpu.cr(3), cpu.cr(4), cpu.efer
        latched = eng.latched
        ept = bool(latched.proc2 & _ENABLE_EPT)
        vpid = eng.vmcs.peek(VmcsField.VIRTUAL_PROCESSOR_ID) if latched.proc2 & _ENABLE_VPID else 0
        pdptes: tuple[int, ...] = ()
        if eng.shadow is None and cr0 & _CR0_PG and cr4 & _CR4_PAE and not efer & (1 << 10):
            try:
                pdptes = tuple(eng.host.read_u64(self._hpa((cr3 & 0xFFFF_FFE0) + 8 * i)) for i in range(4))
            except Exception:  # noqa: BLE001 - the engine's walk reports a bad CR3; these walks fault
                pdptes = (0, 0, 0, 0)
        eptp = latched.eptp if ept else None
        regs = PagingRegs(cr0, cr3, cr4, efer, pdptes)
        if eng.shadow is not None:
            # Shadow paging: the processor walks the hypervisor's shadow tables, 4-level whatever the
            # guest's mode (hvm.vmm.shadow), rooted where the real CR3 would point.
            regs = PagingRegs(_CR0_PG | 1, eng.shadow.mmu.root, _CR4_PAE, (1 << 8) | (1 << 10))
        self._ctx = Context(regs, vpid=vpid,
                            ep4ta=eptp & 0x000F_FFFF_FFFF_F000 if eptp is not None else None, eptp=eptp)
        self._stale = False
        return self._ctx

    def _hpa(self, gpa: int) -> int:
        return self.engine._ept(gpa, 1, la=None, paging_structure=True)[0]

    # --- translations -------------------------------------------------------------------
    def _translate(self, la: int, fetch: bool, expected_hpa: int | None = None) -> None:
        ctx = self.context()
        try:
            hpa, walk = self.model.translate(ctx, la, fetch)
        except (WalkFault, IndexError, ValueError):
            # Not present, or tables outside memory: the engine's own walk reports what the guest
            # did wrong (a #PF, an EPT violation); the accounting walk only counts it.
            self.walk_faults += 1
            return
        if walk is not None:
            self.by_page_size[walk.page_size] += 1
            if not fetch:
                self.data_misses += 1
                self.data_walk_refs += walk.walk_refs
                self.data_ept_refs_for_tables += sum(
                    1 for r in walk.refs if r.kind is RefKind.EPT and r.serves)
        self.accesses += 1
        if not fetch:
            self.data_accesses += 1
        if expected_hpa is not None and hpa != expected_hpa:
            self.walk_mismatches += 1

    def filled(self, vaddr: int, kind: Access, hpage: int) -> None:
        """A Unicorn TLB fill that succeeded: ``vaddr``'s page is at host page ``hpage``."""
        self._stale = True  # fills follow any change of paging state
        vpage = vaddr & ~0xFFF
        if self._linear.setdefault(hpage, vpage) != vpage:
            self.alias_fills += 1
            self._linear[hpage] = vpage
        if self.mode == "fast":
            self._translate(vaddr, kind is Access.FETCH, hpage | vaddr & 0xFFF)

    def _on_code(self, uc, address: int, size: int, _: object) -> None:
        try:
            self._translate(address, True)
        except Exception as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self.engine._fail(exc)

    def _on_data(self, uc, access: int, address: int, size: int, value: int, _: object) -> None:
        try:
            vpage = self._linear.get(address & ~0xFFF)
            if vpage is None:
                self.unattributed += 1
                return
            self._translate(vpage | address & 0xFFF, False)
        except Exception as exc:  # noqa: BLE001
            self.engine._fail(exc)

    # --- invalidations ------------------------------------------------------------------
    def sensitive(self, insn: Insn, rip: int) -> None:
        """The guest executes ``insn`` (its hook runs before it does)."""
        op = insn.op
        if op not in (Op.INVLPG, Op.MOV_TO_CR, Op.CLTS, Op.LMSW):
            return
        eng = self.engine
        ctx = self.context()
        model = self.model
        if op is Op.INVLPG and insn.mem is not None:
            model.invlpg(ctx, eng.effective_linear(insn.mem, rip + insn.length))
        elif op is Op.MOV_TO_CR and insn.reg is not None:
            value = eng.cpu.gpr(insn.reg) & ((1 << (8 * insn.reg_width)) - 1)
            regs = ctx.regs
            if insn.control == 3:
                model.mov_to_cr3(ctx, value, pcide=bool(regs.cr4 & _CR4_PCIDE))
            elif insn.control == 0 and (value ^ regs.cr0) & (_CR0_PG | _CR0_WP):
                model.flush_vpid(ctx.vpid, what="mov_cr0")  # SDM 4.10.4.1: CR0.PG or CR0.WP changes
            elif insn.control == 4 and ((value ^ regs.cr4) & _CR4_FLUSH
                                        or regs.cr4 & _CR4_PCIDE and not value & _CR4_PCIDE):
                model.flush_vpid(ctx.vpid, what="mov_cr4")  # SDM 4.10.4.1: PGE, PAE, PSE, PCIDE 1 -> 0
        self._stale = True  # the instruction may change paging registers

    def invpcid(self, kind: int, pcid: int, la: int) -> None:
        """The guest executed INVPCID (its checks passed, :func:`hvm.engine.model.instructions._invpcid`)."""
        self.model.invpcid(self.context(), InvpcidType(kind), pcid=pcid, la=la)

    def entered(self) -> None:
        """VM entry: SDM 29.4.3.3 (no VPIDs: linear and combined mappings of VPID 0 go)."""
        self._stale = True
        self.model.vm_transition(bool(self.engine.latched.proc2 & _ENABLE_VPID))

    def exited(self) -> None:
        """A VM exit, also one completed inside the engine: SDM 29.4.3.3 as at VM entry."""
        self._stale = True
        self.model.vm_transition(bool(self.engine.latched.proc2 & _ENABLE_VPID))

    def invept(self) -> None:
        self.model.invept(InveptType.ALL_CONTEXTS)

    # --- statistics ---------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        stats = self.model.stats
        out = {f"tlb.{k}": v for k, v in stats.as_dict().items()}
        walk_refs = sum(stats.walk_refs.values())
        out.update({
            "tlb.mode_detailed": int(self.mode == "detailed"),
            "tlb.accesses": self.accesses,
            "tlb.data_accesses": self.data_accesses,
            "tlb.data_misses": self.data_misses,
            "tlb.data_walk_refs": self.data_walk_refs,
            "tlb.data_ept_refs_for_tables": self.data_ept_refs_for_tables,
            "tlb.walk_mismatches": self.walk_mismatches,
            "tlb.walk_faults": self.walk_faults,
            "tlb.alias_fills": self.alias_fills,
            "tlb.unattributed": self.unattributed,
            "tlb.modelled_walk_cycles": walk_refs * self.engine.cost.walk_ref,
        })
        out.update({f"tlb.misses_by_page_size.{size >> 10}k": n
                    for size, n in sorted(self.by_page_size.items())})
        return out
