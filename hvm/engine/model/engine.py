"""ModelEngine: a software model of an Intel VT-x processor, running the guest on Unicorn.

The guest executes in Unicorn at full JIT speed ("VMX non-root operation"); Python runs only
when the model processor must act:

* a **sensitive instruction** executes: a ``UC_HOOK_CODE`` hook sits at exactly each address
  where one may start (:mod:`~hvm.engine.model.decode`, :mod:`~hvm.engine.model.codepages`),
  and :func:`~hvm.engine.model.instructions.intercept` applies the VMCS controls;
* a **translation misses** Unicorn's TLB: ``UC_TLB_VIRTUAL`` hands every linear address to
  :meth:`ModelEngine._fill`, which walks the guest's page tables and then EPT (the 2-D walk,
  :mod:`hvm.vtx.paging` and :mod:`hvm.vtx.ept`) and decides the permissions Unicorn may cache;
  with ``paging="shadow"`` (EPT off) it walks the VMM's shadow tables instead, and a miss there is
  a #PF VM exit that the shadow MMU handles (:mod:`~hvm.engine.model.shadow_paging`; a write to
  a page table through a self-mapped table runs alone, stopped by the MMIO replays' hook after it);
* the guest raises an **exception** (Unicorn reports, the model delivers it through the IDT
  or exits, :mod:`~hvm.engine.model.events`), or touches **MMIO** (an EPT violation on a
  guest-physical address with no RAM, which reaches the VMM as an ``mmio`` exit).

A walk runs in Python only when Unicorn's TLB misses, and most misses repeat a walk already
made (the engine flushes Unicorn's TLB more often than the SDM does): a successful guest walk is
remembered with the paging-structure entries it read and reused while they hold the same values,
so it is exactly the walk that would be made again (:meth:`ModelEngine._guest_walk`).

An instruction that touches MMIO is replayed: it runs again with the MMIO page mapped to
:data:`MMIO_WINDOW`, whose callbacks record its reads and writes, and a hook at the next
instruction ends the pass (:meth:`ModelEngine._arm_stop`). A first pass finds the first read
without data, which is the exit; once the VMM has supplied it, the last pass runs on into the
guest, and each write is an exit of its own. No TLB entry may reach the window outside a pass.
Where the hook is already in place, the first pass starts at the failed translation itself,
inside the guest's run (:meth:`ModelEngine._mmio_in_run`).

``run()`` is VM entry: it completes the previous exit as a KVM-like hypervisor would (the
data ``complete_read`` supplied, RIP past the instruction), checks and loads what the VMM wrote
into the VMCS (:mod:`~hvm.engine.model.vmcs`), injects pending events, and resumes the guest
until the next VM exit, which it returns as one :class:`~hvm.exits.Exit`. Exits whose reason
has no kind in the shared vocabulary (INVD, XSETBV, GETSEC, the VMX instructions, ...) are
completed inside the engine, as KVM completes them in the kernel, and show in :meth:`counters`.

PCIDs and INVPCID, which Unicorn's CPU lacks, are the engine's (:mod:`~hvm.engine.model.cpuid`,
:func:`~hvm.engine.model.instructions.intercept`): CPUID reports them, MOV to CR0/CR3/CR4 follows
SDM 4.10.1 and 4.10.4.1, INVPCID runs in the hook. Unicorn's TLB is flushed whole on every CR3
load and INVPCID; the modelled TLB (``tlb=``) invalidates exactly what the SDM requires.

A host signal cannot reach Python while Unicorn runs native code: Python's C-level handler only
notes it. The engine therefore registers a pipe as the signal wakeup fd; a watcher thread waits
on it and stops the emulation, the VMM's handler (a timeout or poller tick, which calls
:meth:`kick`) runs, and ``run()`` returns an ``intr`` exit within microseconds.

A local APIC is there on request: ``ModelEngine(memory, apic="legacy")`` injects its interrupts
through VM-entry interruption information with interrupt-window exiting, ``apic="apicv"`` uses
APIC virtualization and posted interrupts (:mod:`~hvm.engine.model.apic`); the default ``"off"``
has none. With a local APIC, device IRQ lines go through the VMM's I/O APIC
(:mod:`hvm.devices.ioapic`, :meth:`ModelEngine.attach_ioapic`); without one they reach nothing.

Not modelled (``capabilities()`` says so): a PIC,
NMI-window exiting, the preemption timer; PAUSE-loop exiting; task switches through task gates;
virtual-8086 mode; SMM. CR0.NE and CR4.VMXE are not fixed to 1 for guests (see :mod:`~hvm.engine.model.vmcs`).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_READ,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as R

from hvm.cpu import CR0_PG, CR4_PAE, EFER_LMA, CpuState
from hvm.engine.base import Engine
from hvm.engine.model.apic import MODES as APIC_MODES
from hvm.engine.model.apic import ApicSupport
from hvm.engine.model.codepages import CodePages
from hvm.engine.model.cost import CostModel
from hvm.engine.model.cpu import UnicornCpu
from hvm.engine.model.cpuid import CpuidPolicy
from hvm.engine.model.decode import MAX_INSN, PAGE, Memory, decode, instruction_summary, memory_operands
from hvm.engine.model.events import (
    ERROR_CODE_VECTORS,
    GP,
    PF,
    UD,
    Delivery,
    Event,
    Fault,
    TripleFault,
    Unsupported,
    describe,
)
from hvm.engine.model.host import HostMemory
from hvm.engine.model.hostcpu import host_tsc
from hvm.engine.model.instructions import GPR_IDS, RFLAGS_IOPL_SHIFT, RFLAGS_VM, Latched, VmExit, intercept
from hvm.engine.model.shadow_paging import SelfMappedWrite, ShadowPaging, ShadowUnsupported
from hvm.engine.model.tlbsim import TranslationAccounting
from hvm.engine.model.tlbsim import check_options as check_tlb_options
from hvm.engine.model.vmcs import (
    HLT_STATE,
    ExitInfo,
    ModelVmcs,
    check_guest_state,
    load_guest_state,
    program_defaults,
    save_guest_state,
    write_guest_state,
)
from hvm.errors import EngineUnavailable
from hvm.exits import Exit, ExitKind
from hvm.kvm.api import KVM_MEM_LOG_DIRTY_PAGES
from hvm.vmm.memory import GuestMemory, Region
from hvm.vtx.bitmaps import IoBitmaps
from hvm.vtx.capabilities import MODEL_CAPS
from hvm.vtx.controls import ProcBased, ProcBased2, check_vm_entry_controls
from hvm.vtx.ept import (
    PAGE_2M,
    EptAccess,
    EptBuilder,
    EptMisconfig,
    Eptp,
    EptPerm,
    EptTranslation,
    ept_translate,
)
from hvm.vtx.errors import VmxInstructionError
from hvm.vtx.exit_reasons import EXIT_REASON_FAILED_VMENTRY, ExitReason
from hvm.vtx.paging import Access, PageFault, PagingRegs, load_pdptes, translate
from hvm.vtx.qualification import EptViolationQualification, InterruptionInfo
from hvm.vtx.tlb import TlbConfig
from hvm.vtx.vmcs import VmcsField

F = VmcsField
WATCH_INTERVAL = 0.02  # without our signal wakeup fd: how long an emulation runs before signals are seen
MMIO_WINDOW = 0x7F_0000_0000  # host-physical page where Unicorn sees the MMIO page being emulated
_PAGE_MASK = ~(PAGE - 1)
_LINEAR_MASK = (1 << 64) - 1
_ACCESS = {UC_MEM_READ: Access.READ, UC_MEM_WRITE: Access.WRITE, UC_MEM_FETCH: Access.FETCH}
# EPT access and permission bits as plain ints: IntFlag arithmetic is slow on the translation path.
_EPT_R, _EPT_W, _EPT_X = int(EptPerm.READ), int(EptPerm.WRITE), int(EptPerm.EXECUTE)
_EPT_RWX = _EPT_R | _EPT_W | _EPT_X
_EPT_ACCESS = {Access.READ: int(EptAccess.READ), Access.WRITE: int(EptAccess.WRITE),
               Access.FETCH: int(EptAccess.FETCH)}
_ENABLE_EPT, _ENABLE_VPID = int(ProcBased2.ENABLE_EPT), int(ProcBased2.ENABLE_VPID)
_WALK_CACHE = 4096  # guest page walks remembered, keyed by (linear page, access, user)
_STOP_HOOKS = 64  # hooks kept at instructions that follow an MMIO access (see _arm_stop)
_STOP_IDLE = 256  # a stop hook that fires this often outside MMIO replays is removed
_STUCK_STEPS = 8  # single steps of one write through a self-mapped table that may fail to complete
_STEP_REGS = (R.UC_X86_REG_RIP, R.UC_X86_REG_RSP, R.UC_X86_REG_RCX, R.UC_X86_REG_RSI, R.UC_X86_REG_RDI,
              R.UC_X86_REG_CS)
_CR_REGS = {0: R.UC_X86_REG_CR0, 3: R.UC_X86_REG_CR3, 4: R.UC_X86_REG_CR4, 8: R.UC_X86_REG_CR8}
_EPT_POOL_PAGES = 64
_DECODE_CACHE = 4096  # decoded sensitive instructions kept, keyed by (address, mode, bytes)
_UNDECODED = object()
_EPT_DIRTY = 1 << 9  # SDM 29.3.5: bit 9 of an EPT leaf entry, the dirty flag
# SDM 28.2.1, table "Exit Qualification for EPT Violations": an MMIO read or write, the guest-physical
# address not readable, writable or executable, the linear address valid and translated.
_MMIO_READ_QUALIFICATION, _MMIO_WRITE_QUALIFICATION = (EptViolationQualification(
    read=not write, write=write, fetch=False, readable=False, writable=False, executable=False,
    gla_valid=True, linear_translation=True).encode() for write in (False, True))


class EptExit(Exception):
    """An EPT violation or misconfiguration met while translating: a VM exit."""

    def __init__(self, vmexit: VmExit) -> None:
        super().__init__(vmexit.reason.name)
        self.vmexit = vmexit


class _NotRam(Exception):
    """A guest-physical address outside RAM that EPT does not map: the VMM's MMIO space."""

    def __init__(self, gpa: int) -> None:
        super().__init__(f"{gpa:#x}")
        self.gpa = gpa


class _GuestPhysical:
    """Guest-physical memory for the guest's page walk: each entry access goes through EPT.

    ``read`` lists the host-physical addresses of the entries the walk read, in order.
    """

    def __init__(self, engine: ModelEngine, la: int) -> None:
        self.engine = engine
        self.la = la
        self.read: list[int] = []

    def read_u64(self, gpa: int) -> int:
        hpa = self._hpa(gpa, _EPT_R)
        self.read.append(hpa)
        return self.engine.host.read_u64(hpa)

    def write_u64(self, gpa: int, value: int) -> None:
        self.engine.host.write_u64(self._hpa(gpa, _EPT_W), value)

    def _hpa(self, gpa: int, access: int) -> int:
        try:
            return self.engine._ept(gpa, access, la=self.la, paging_structure=True)[0]
        except _NotRam:
            raise EptExit(VmExit(ExitReason.EPT_VIOLATION, ExitInfo(int(ExitReason.EPT_VIOLATION)), Exit(
                ExitKind.INTERNAL_ERROR, addr=gpa,
                detail=f"guest page tables at guest-physical {gpa:#x}, where there is no RAM"))) from None


@dataclass
class _MmioStep:
    """One instruction touching MMIO, re-executed until every read it makes has its data."""

    gpage: int
    linear: int  # linear address of the access's page
    rip: int
    length: int = 0  # of the instruction
    reads: list[bytes] = field(default_factory=list)
    seen: int = 0  # reads answered in the current pass
    missing: tuple[int, int] | None = None  # (gpa, size) of the first read without data
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (gpa, size, value)
    # An access that crosses into a second MMIO page: (guest-physical page, linear page) of that
    # page, which Unicorn reaches through the window's second page.
    second: tuple[int, int] | None = None
    # linear [start, end) of an access that crosses a page boundary, to clip reads to it; None: not
    # looked for yet; (0, 0): the instruction has no such access
    split: tuple[int, int] | None = None

    def gpa(self, offset: int) -> int:
        """Guest-physical address of ``offset`` in the MMIO window."""
        if offset >= PAGE and self.second is not None:
            return self.second[0] + offset - PAGE
        return self.gpage + offset

    def linear_of(self, gpa: int) -> int:
        if self.second is not None and gpa & _PAGE_MASK == self.second[0] != self.gpage:
            return self.second[1] | gpa & (PAGE - 1)
        return self.linear | gpa & (PAGE - 1)


class ModelEngine(Engine):
    """The VT-x model engine (see the module docstring)."""

    name = "model"

    def __init__(self, memory: GuestMemory, *, cost: CostModel | None = None, paging: str = "ept",
                 tlb: str | None = None, tlb_caches: int = 0, tlb_config: TlbConfig | None = None,
                 apic: str = "off") -> None:
        if len(memory.regions) != 1 or memory.regions[0].gpa != 0:
            raise EngineUnavailable("the model engine supports guest RAM as one region at address 0")
        if paging not in ("ept", "shadow"):
            raise EngineUnavailable(f"the model engine's paging is 'ept' or 'shadow', not {paging!r}")
        if apic not in APIC_MODES:
            raise EngineUnavailable(f"the model engine's apic option is one of {', '.join(APIC_MODES)}, "
                                    f"not {apic!r}")
        check_tlb_options(tlb, tlb_caches)
        self.memory = memory
        self.host = HostMemory(memory)
        self.cost = cost or CostModel()
        self.cpuid = CpuidPolicy(pcid=True)  # PCIDs and INVPCID: implemented in instructions.py
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.regions[0].host_addr)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self.cpu = UnicornCpu(uc)
        self.code = CodePages(self._page_bytes, self._add_sensitive_hook, uc.hook_del)
        # The hypervisor's structures in host memory: an identity EPT for RAM, bitmaps.
        pool = self.host.allocate(_EPT_POOL_PAGES)
        self.ept = EptBuilder(self.host, pool=pool, pool_size=_EPT_POOL_PAGES * PAGE)
        big = memory.size & ~(PAGE_2M - 1)
        if big:
            self.ept.map(0, 0, big, page_size=PAGE_2M)
        if memory.size > big:
            self.ept.map(big, big, memory.size - big)
        io = IoBitmaps()
        self.io_bitmap_a, self.io_bitmap_b = self.host.allocate(), self.host.allocate()
        self.host.write(self.io_bitmap_a, bytes(io.a))
        self.host.write(self.io_bitmap_b, bytes(io.b))
        self.msr_bitmap = self.host.allocate()  # all zero: MSR accesses do not exit
        self.vmcs = ModelVmcs()
        program_defaults(self.vmcs, eptp=self.ept.eptp, msr_bitmap=self.msr_bitmap,
                         io_bitmap_a=self.io_bitmap_a, io_bitmap_b=self.io_bitmap_b)
        # paging="shadow": EPT off, the VMM's shadow page tables (hvm.engine.model.shadow_paging)
        self.shadow: ShadowPaging | None = ShadowPaging(self) if paging == "shadow" else None
        self.latched: Latched = Latched.read(self.vmcs, self.host.view)
        # run state
        self._pending: VmExit | None = None  # the exit the next entry completes
        self._read_data = b""
        self._exit: VmExit | None = None
        self._event: Event | None = None
        self.invpcid_pass: int | None = None  # an INVPCID whose exit the VMM completed executes
        self._mmio: _MmioStep | None = None
        self._mmio_hit: tuple[int, int] | None = None
        self._queued: list[tuple[VmExit, Exit]] = []
        self._inject: list[Event] = []
        self._halted = False
        self._shutdown: Exit | None = None
        self._pass_once: int | None = None
        self._entry_regs: dict[str, int] | None = None
        self._hook_error: BaseException | None = None
        self._ept_cache: dict[int, tuple[int, int]] = {}  # guest-physical page -> (host page, EPT perms)
        # Guest-physical pages outside RAM that EPT leaves unmapped (MMIO), with the EPT entries
        # ((hpa, value), ...) whose values decided it.
        self._ept_absent: dict[int, tuple[tuple[int, int], ...]] = {}
        # Guest page walks: (linear page, access, user) -> (guest-physical page, ((hpa, entry), ...)),
        # valid while paging registers are _walk_regs and each entry read still holds its value.
        self._walks: dict[tuple[int, Access, bool], tuple[int, tuple[tuple[int, int], ...]]] = {}
        self._walk_regs: tuple[int, int, int, int] | None = None
        # MMIO replays: the step whose page Unicorn's TLB maps to the MMIO window, the hooks that stop
        # a replay after its instruction (linear address -> [handle, firings outside replays]), the
        # (stop address, host page of the instruction) pairs whose translated code carries the hook.
        self._window_step: _MmioStep | None = None
        self._stops: dict[int, list[int]] = {}
        self._armed: set[tuple[int, int]] = set()
        self._stop_at: int | None = None
        self._resume: _MmioStep | None = None  # the step whose pass starts the coming run of the guest
        self._in_run: _MmioStep | None = None  # the step whose first pass started in the guest's run
        self._idle_stops: list[int] = []
        self._replay_ctx = None  # a CPU context, reused for each replay
        self._summaries: dict[tuple[int, int, bytes], tuple[int, bool, str] | None] = {}
        self._decoded: dict[tuple[int, int, bytes], object] = {}
        self._irq_lines: dict[int, bool] = {}
        # shadow paging: the next run is one instruction, a write through a self-mapped table
        # (hvm.engine.model.shadow_paging); how many such steps in a row made no progress
        self._write_step = False
        self._stuck_steps = 0
        # statistics
        self.exit_counts: Counter[ExitReason] = Counter()
        self.overhead_cycles = 0
        self.tlb_fills = 0
        self.vpid_flushes = 0  # TLB flushes at VM exits and entries because "enable VPID" is 0
        self.last_exit: VmExit | None = None
        # host side
        self._kicked = False
        self._running = False
        self._entries = 0
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._wakeup: tuple[int, int] | None = None  # pipe the C signal handler writes to
        self._views: list[memoryview] = []
        self._coalesced: list[tuple[int, int]] = []
        self._coalesced_writes: list[tuple[int, bytes]] = []
        self._tsc_hz: float | None = None
        uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_platform_in, None, 1, 0, R.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_platform_out, None, 1, 0, R.UC_X86_INS_OUT)
        uc.mmio_map(MMIO_WINDOW, 2 * PAGE, self._on_mmio_read, None, self._on_mmio_write, None)
        # Walk accounting through a modelled TLB (tlbsim): off unless asked for ("fast" or "detailed").
        self.walks = TranslationAccounting(self, tlb, tlb_caches, tlb_config) if tlb else None
        self.apic: ApicSupport | None = None if apic == "off" else ApicSupport(self, apic)

    # --- the Engine interface --------------------------------------------------------------
    def set_state(self, state: CpuState) -> None:
        """The VMM writes the guest-state area (and the GPRs it keeps itself)."""
        self.vmcs.writeback()
        self._pending = self._mmio = self._resume = self._in_run = self._pass_once = None
        self._queued.clear()
        self._inject.clear()
        self._halted = False
        self._shutdown = None
        self._entry_regs = dict(state.regs)
        write_guest_state(self.vmcs, state)
        if self.shadow is not None:
            self.shadow.set_state(state)

    def get_state(self) -> CpuState:
        if self.vmcs.guest_written:
            state = load_guest_state(self.vmcs, self._entry_regs or self.cpu.store().regs)
            if self.shadow is not None:
                state.cr0 = self.vmcs.peek(F.CR0_READ_SHADOW)
            return state
        state = self.cpu.store()
        return state if self.shadow is None else self.shadow.view(state)

    def run(self) -> Exit:
        if self._kicked:
            self._kicked = False
            return Exit(ExitKind.INTR)
        if self._shutdown is not None:
            return self._shutdown
        exit_ = self._vm_entry()
        if exit_ is not None:
            return exit_
        if self.walks is not None:
            self.walks.entered()
        return self._execute()

    def complete_read(self, data: bytes) -> None:
        pending = self._pending
        if pending is None or not pending.read_size:
            raise ValueError("complete_read without a pending read exit")
        if len(data) != pending.read_size:
            raise ValueError(f"read completion of {len(data)} bytes, exit wants {pending.read_size}")
        self._read_data = bytes(data)

    @property
    def pending_read_size(self) -> int:
        """Bytes ``complete_read`` should supply for the exit just returned (0: none, or supplied)."""
        pending = self._pending
        return 0 if pending is None or self._read_data else pending.read_size

    def set_irq(self, line: int, level: bool) -> None:
        # No PIC in the model: with a local APIC the VMM's I/O APIC (attach_ioapic) routes the line,
        # otherwise it is recorded, not delivered.
        self._irq_lines[line] = level
        if self.apic is not None and self.apic.ioapic is not None:
            self.apic.ioapic.set_irq(line, level)

    def attach_ioapic(self, ioapic) -> bool:
        if self.apic is None:
            return False
        self.apic.attach_ioapic(ioapic)
        return True

    def kick(self) -> None:
        # Called from signal handlers too: it must take no lock (a handler that waits for a lock
        # the interrupted main thread holds deadlocks), so it only sets a flag and stops Unicorn.
        self._kicked = True
        try:
            self.uc.emu_stop()
        except UcError:
            pass

    def map_region(self, region: Region) -> None:
        """A further memory slot: host-physical = guest-physical, mapped by 4-KiB pages of the
        engine's own EPT (a VMM that installed its own EPTP maps the region itself)."""
        view = memoryview(region.mem)
        self._views.append(view)
        self.host.add(region.gpa, view)
        self.uc.mem_map_ptr(region.gpa, region.size, UC_PROT_ALL, region.host_addr)
        self.ept.map(region.gpa, region.gpa, region.size)
        if region.flags & KVM_MEM_LOG_DIRTY_PAGES and self.shadow is not None:
            self.shadow.mmu.log_dirty(region.gpa, region.size)  # no EPT: write protection logs
        elif region.flags & KVM_MEM_LOG_DIRTY_PAGES:
            # Dirty logging is EPT's accessed and dirty flags (SDM 29.3.5): turn them on in the EPTP.
            pointer = Eptp.decode(self.vmcs.vmread(F.EPT_POINTER))
            if not pointer.accessed_dirty:
                self.vmcs.vmwrite(F.EPT_POINTER, Eptp(pointer.root, pointer.levels, pointer.memory_type,
                                                      True).encode())
        self.invept()

    def harvest_dirty(self, region: Region) -> list[int]:
        """Pages of ``region`` whose EPT dirty flag is set; the flags are cleared and INVEPT done."""
        if not region.flags & KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"slot {region.slot} does not log dirty pages")
        if self.shadow is not None:
            return self.shadow.mmu.harvest_dirty(region.gpa, region.size)
        dirty = []
        for index in range(region.size // PAGE):
            entry = self._ept_leaf(region.gpa + index * PAGE)
            if entry is not None and self.host.read_u64(entry) & _EPT_DIRTY:
                self.host.write_u64(entry, self.host.read_u64(entry) & ~_EPT_DIRTY)
                dirty.append(index)
        if dirty:
            self.invept()  # the next write walks EPT again and sets the flag
        return dirty

    def _ept_leaf(self, gpa: int) -> int | None:
        """Host-physical address of the EPT entry mapping ``gpa`` (a walk without side effects)."""
        pointer = Eptp.decode(self.vmcs.peek(F.EPT_POINTER))
        table = pointer.root
        for level in range(pointer.levels, 0, -1):
            address = table + (gpa >> (12 + 9 * (level - 1)) & 0x1FF) * 8
            entry = self.host.read_u64(address)
            if not entry & 7:
                return None
            if level == 1 or entry & 1 << 7:
                return address
            table = entry & 0x000F_FFFF_FFFF_F000
        return None

    def register_coalesced_mmio(self, addr: int, size: int) -> bool:
        """Writes there still cause EPT-violation VM exits, completed in-engine and buffered (as KVM does)."""
        self._coalesced.append((addr, size))
        return True

    def drain_coalesced(self) -> list[tuple[int, bytes]]:
        out, self._coalesced_writes = self._coalesced_writes, []
        return out

    def tsc_hz(self) -> float | None:
        """The guest TSC rate: the host's (measured once) times the VMCS TSC multiplier."""
        if self._tsc_hz is None:
            t0, c0 = time.perf_counter_ns(), host_tsc()
            time.sleep(0.05)
            t1, c1 = time.perf_counter_ns(), host_tsc()
            self._tsc_hz = (c1 - c0) * 1e9 / (t1 - t0)
        return self._tsc_hz * self.latched.tsc.multiplier / (1 << 48)

    def capabilities(self) -> dict[str, bool]:
        return {"ept": self.shadow is None, "shadow_paging": self.shadow is not None, "vpid": True,
                "unrestricted_guest": self.shadow is None, "tsc_offsetting": True,
                "tsc_scaling": True, "io_bitmaps": True, "msr_bitmaps": True, "exception_bitmap": True,
                "mmio": True, "coalesced_mmio": True, "dirty_log": True, "irqchip": False,
                "interrupt_injection": self.apic is not None, "local_apic": self.apic is not None,
                "apicv": self.apic is not None and self.apic.mode == "apicv", "nested": False}

    def counters(self) -> dict[str, int]:
        out = {"exits": sum(self.exit_counts.values()), "modelled_overhead_cycles": self.overhead_cycles,
               "modelled_cycles_per_exit": self.cost.transition}
        out.update({f"exit_reason.{reason.name}": n for reason, n in sorted(self.exit_counts.items())})
        out.update({"tlb_fills": self.tlb_fills, "code_pages_scanned": self.code.scans,
                    "sensitive_hooks": self.code.hook_count, "vpid_flushes": self.vpid_flushes})
        if self.shadow is not None:
            out.update(self.shadow.counters())
        if self.walks is not None:
            out.update(self.walks.counters())
        if self.apic is not None:
            out.update(self.apic.counters())
        return out

    def close(self) -> None:
        self._closed = True
        if self.apic is not None:
            self.apic.close()
        if self._wakeup is not None:
            try:
                current = signal.set_wakeup_fd(-1)
                if current != self._wakeup[1]:
                    signal.set_wakeup_fd(current)  # not ours any more: leave it as it was
            except ValueError:
                pass  # closed from another thread; the handler keeps writing to a closed pipe
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        if getattr(self, "uc", None) is not None:
            self.uc.emu_stop()
            for region in self.memory.regions:
                try:
                    self.uc.mem_unmap(region.gpa, region.size)
                except UcError:
                    pass
        self.latched = None  # type: ignore[assignment]  # drops views of host memory
        self.host.close()
        for view in self._views:
            view.release()
        self._views.clear()

    # --- services for the VMM (tests, the lab) ----------------------------------------------
    def invept(self) -> None:
        """INVEPT (all contexts): forget cached EPT translations (SDM Vol. 3C 29.4.3.1)."""
        self._forget_ept()
        self._flush_tlb()
        if self.walks is not None:
            self.walks.invept()

    def _forget_ept(self) -> None:
        """EPT may have changed: drop the EPT cache and the guest walks made through it."""
        self._ept_cache.clear()
        self._ept_absent.clear()
        self._walks.clear()

    # --- VM entry ---------------------------------------------------------------------------
    def _vm_entry(self) -> Exit | None:
        if self._queued:
            vmexit, exit_ = self._queued.pop(0)
            return self._record(vmexit, exit_)
        self._complete_pending()
        vmcs = self.vmcs
        self._resume = self._in_run = None
        if self._mmio is not None:
            if not (vmcs.controls_written or vmcs.guest_written or vmcs.injection_written or self._inject
                    or not self.latched.proc2 & _ENABLE_VPID):
                # Nothing else to do at this entry: the step's pass starts the guest's run, and the
                # guest goes on from the instruction's end without stopping (see _mmio_stop).
                exit_ = self._mmio_arm()
                if exit_ is not None:
                    return exit_
                self._resume = self._mmio
                return None
            exit_ = self._mmio_execute()
            if exit_ is not None:
                return exit_
        if vmcs.controls_written:
            exit_ = self._latch_controls()
            if exit_ is not None:
                return exit_
        if vmcs.guest_written:
            regs = self._entry_regs or self.cpu.store().regs
            state = load_guest_state(vmcs, regs)
            problem = check_guest_state(state, vmcs, self.latched.controls)
            if problem is not None:
                reason = EXIT_REASON_FAILED_VMENTRY | ExitReason.INVALID_STATE
                return self._vm_exit(VmExit(ExitReason.INVALID_STATE, ExitInfo(reason), Exit(
                    ExitKind.FAIL_ENTRY, qualification=reason,
                    detail=f"VM entry failed: invalid guest state ({problem})")))
            self.cpu.load(state)
            self._flush_tlb()
            self._pass_once = None  # the VMM rewrote the guest state: no completion is pending
            self._halted = vmcs.peek(F.GUEST_ACTIVITY_STATE) == HLT_STATE
            self._entry_regs = None
            vmcs.guest_written = False
        self._entry_injection()
        while self._inject:
            exit_ = self._deliver(self._inject.pop(0))
            if exit_ is not None:
                return exit_
        self._vpid_flush()
        return None

    def _vpid_flush(self) -> None:
        """SDM 29.4.3.3: without VPIDs, VM entries and VM exits invalidate linear mappings."""
        if not self.latched.proc2 & _ENABLE_VPID:
            self._flush_tlb()
            self.vpid_flushes += 1

    def _latch_controls(self) -> Exit | None:
        """VM entry's checks of the control fields, then the processor latches them."""
        vmcs = self.vmcs
        try:
            check_vm_entry_controls(vmcs)  # SDM 28.2.1: VMfailValid(7) on a bad control field
        except VmxInstructionError as error:
            return Exit(ExitKind.FAIL_ENTRY, qualification=error.number,
                        detail=f"VM entry failed: {error}")
        self.latched = Latched.read(vmcs, self.host.view)
        vmcs.controls_written = False
        self._forget_ept()
        self._flush_tlb()
        return None

    def set_exiting_control(self, control: ProcBased, on: bool) -> None:
        """The in-engine hypervisor sets or clears one primary exiting control (e.g. "interrupt-window
        exiting") for its next re-entry: the field and the latched copy change together, and as no
        other control or translation changed, nothing else is checked or flushed."""
        if not MODEL_CAPS.true_procbased_ctls.allowed1 & control:
            raise ValueError(f"{control!r} is not an allowed primary control")
        proc = self.vmcs.peek(F.CPU_BASED_VM_EXEC_CONTROL)
        proc = proc | control if on else proc & ~control
        self.vmcs.store(F.CPU_BASED_VM_EXEC_CONTROL, proc)
        latched = self.latched
        latched.controls = replace(latched.controls, proc=ProcBased(proc))
        latched.proc = proc

    def _entry_injection(self) -> None:
        """SDM 28.6: event injection from the VM-entry interruption-information field."""
        vmcs = self.vmcs
        info = vmcs.peek(F.VM_ENTRY_INTR_INFO_FIELD) if vmcs.injection_written else 0
        vmcs.injection_written = False
        if info >> 31:  # the valid bit is cleared on the next exit
            vmcs.store(F.VM_ENTRY_INTR_INFO_FIELD, info & ~(1 << 31))
            decoded = InterruptionInfo.decode(info)
            code = vmcs.peek(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if decoded.error_code_valid else None
            if decoded.type in (4, 5, 6):  # software events resume past the instruction
                rip = self.uc.reg_read(R.UC_X86_REG_RIP)
                self.uc.reg_write(R.UC_X86_REG_RIP, rip + vmcs.peek(F.VM_ENTRY_INSTRUCTION_LEN))
            self._inject.append(Event(decoded.vector, decoded.type, code))

    def _complete_pending(self) -> None:
        pending, self._pending = self._pending, None
        data, self._read_data = self._read_data, b""
        if pending is not None and pending.complete is not None:
            if len(data) != pending.read_size:
                data = b"\xff" * pending.read_size  # the VMM left the read unanswered: all ones
            pending.complete(data)

    # --- running the guest ------------------------------------------------------------------
    def _execute(self) -> Exit:
        uc = self.uc
        if self._watcher is None:
            self._start_watcher()
        while True:
            if self.apic is not None:
                self.apic.boundary()  # the local APIC's timer and interrupts at this instruction boundary
            while self._inject:  # events an in-engine completion queued
                exit_ = self._deliver(self._inject.pop(0))
                if exit_ is not None:
                    return exit_
            if self._halted:
                if not self._wait_for_event():
                    self._kicked = False
                    return Exit(ExitKind.INTR)
                continue  # an interrupt wakes the processor: deliver it first
            self._exit = self._event = self._mmio_hit = None
            error = None
            self._entries += 1
            self._running = True
            if self._kicked:  # a kick between the last check and here would find nothing to stop
                self._running = False
                self._kicked = False
                return Exit(ExitKind.INTR)
            resume = self._resume
            if resume is None or self._window_step is not resume:
                self._unmap_window()
            self.cpu.sync()
            step = self._write_step  # one instruction alone: a write through a self-mapped table
            if step:
                exit_ = self._arm_write_step()
                if exit_ is not None:
                    self._running = False
                    return exit_
                before = self._step_regs()
            try:
                uc.emu_start(self.cpu.rip, 0)
            except UcError as exc:
                error = exc
            finally:
                self._running = False
                if step:
                    self._write_step = False
                    self._stop_at = None
                    self.shadow.close_writes()
            if step:
                exit_ = self._after_write_step(before)
                if exit_ is not None:
                    return exit_
            while self._idle_stops:
                linear = self._idle_stops.pop()
                if linear in self._stops:
                    self._drop_stop(linear)
            if self._in_run is not None:  # an MMIO step's first pass ended the run
                self._in_run = None
                exit_ = self._mmio_finish()
                if exit_ is not None:
                    return exit_
                continue
            if self._resume is not None:  # the step's pass ended the run: as after _mmio_execute
                self._resume = None
                exit_ = self._mmio_finish(resumed=error is None)
                if exit_ is not None:
                    return exit_
                if self._mmio is not None:  # still to run: again, at once unless kicked
                    exit_ = self._mmio_arm()
                    if exit_ is not None:
                        return exit_
                    self._resume = self._mmio
                continue
            if self._hook_error is not None:
                exc, self._hook_error = self._hook_error, None
                raise exc
            if self._write_step:
                if self._exit is None and self._event is None:
                    continue  # the shadow opened a self-mapped table page: run the instruction alone
                self._write_step = False
                self.shadow.close_writes(stepped=False)
            if self._exit is not None:
                exit_ = self._vm_exit(self._exit)
                if exit_ is not None:
                    return exit_
                continue
            if self._event is not None:
                exit_ = self._handle_event(self._event)
                if exit_ is not None:
                    return exit_
                continue
            if self._mmio_hit is not None:
                gpage, linear = self._mmio_hit
                self.cpu.sync()
                self._mmio = _MmioStep(gpage, linear, self.cpu.rip)
                exit_ = self._mmio_execute()
                if exit_ is not None:
                    return exit_
                continue
            if error is not None:
                exit_ = self._emulation_error(error)
                if exit_ is not None:
                    return exit_
                continue
            if self._kicked:
                self._kicked = False
                return Exit(ExitKind.INTR)

    def _arm_write_step(self) -> Exit | None:
        """Make the coming run stop after the instruction at RIP (a hook at the next one, as for an
        MMIO replay: :meth:`_arm_stop`), which writes a page table through a self-mapped table.
        A stop hook, not an instruction count: a write to the page the instruction runs from makes
        QEMU retranslate and re-execute it, which Unicorn's instruction count does not survive."""
        self.cpu.sync()
        rip = self.cpu.rip
        linear_rip = self.segment_base(1) + rip
        try:
            insn = self._summary(linear_rip)
        except (Fault, EptExit, _NotRam):
            insn = None
        if insn is None or insn[1]:
            self._write_step = False
            self.shadow.close_writes(stepped=False)
            what = "cannot decode it" if insn is None else f"a control transfer ({insn[2]})"
            return Exit(ExitKind.INTERNAL_ERROR, addr=rip, detail=(
                f"model engine (shadow paging): the write at RIP {rip:#x} through a self-mapped page "
                f"table cannot be single-stepped: {what}"))
        self.shadow.stepping = True
        self._stop_at = linear_rip + insn[0]
        self._arm_stop(linear_rip, self._stop_at)
        return None

    def _step_regs(self) -> tuple[int, ...]:
        uc = self.uc
        return tuple(uc.reg_read(reg) for reg in _STEP_REGS)

    def _after_write_step(self, before: tuple[int, ...]) -> Exit | None:
        """After a single-stepped write through a self-mapped table: count steps that did not get
        past the instruction (its registers unchanged, no exit or event), and stop a guest whose
        write never completes there with a one-line error instead of looping."""
        if self._exit is not None or self._event is not None or self._kicked or self._step_regs() != before:
            self._stuck_steps = 0
            return None
        self._stuck_steps += 1
        if self._stuck_steps < _STUCK_STEPS:
            return None
        self._stuck_steps = 0
        rip = self.uc.reg_read(R.UC_X86_REG_RIP)
        return Exit(ExitKind.INTERNAL_ERROR, addr=rip, detail=(
            f"model engine (shadow paging): the write at RIP {rip:#x} through a self-mapped page table "
            f"did not complete in {_STUCK_STEPS} single steps"))

    def _wait_for_event(self) -> bool:
        """The HLT activity state: wait for an event; False when the host kicked instead."""
        # Without a local APIC nothing delivers interrupts, so only the host ends it.
        apic = self.apic
        while not self._kicked:  # a host signal's handler sets the flag; no lock is shared with it
            if apic is None:
                time.sleep(0.002)
            elif apic.wake():
                return True
            else:
                apic.idle()
        return False

    def _start_watcher(self) -> None:
        """Make host signals reach the VMM while Unicorn runs (see the module docstring).

        Python's C-level signal handler writes each signal's number to the wakeup fd at once;
        the watcher thread waits on it and stops emulation, so the Python-level handler (the
        VMM's timer or poller, which calls :meth:`kick`) runs within microseconds. Where the
        wakeup fd is taken (or this is not the main thread), emulation is stopped every
        :data:`WATCH_INTERVAL` instead.
        """
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            try:
                previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except ValueError:
                previous = None
            if previous == -1:
                self._wakeup = (r, w)
            else:
                if previous is not None:
                    signal.set_wakeup_fd(previous)
                os.close(r)
                os.close(w)
        self._watcher = threading.Thread(target=self._watch, name="hvm-model-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        seen = -1
        fd = self._wakeup[0] if self._wakeup is not None else None
        while not self._closed:
            signalled = False
            if fd is not None:
                try:
                    ready, _, _ = select.select([fd], [], [], WATCH_INTERVAL)
                except (OSError, ValueError):
                    return
                if ready:
                    try:
                        signalled = bool(os.read(fd, 512))
                    except OSError:
                        return
            else:
                time.sleep(WATCH_INTERVAL)
            entries = self._entries
            if self._running and (signalled or self._kicked or (fd is None and entries == seen)):
                try:
                    self.uc.emu_stop()
                except UcError:
                    pass
            seen = entries

    def _emulation_error(self, error: UcError) -> Exit | None:
        if error.errno == UC_ERR_INSN_INVALID:
            return self._handle_event(Event(UD))  # QEMU's #UD, raised at the instruction
        rip = self.uc.reg_read(R.UC_X86_REG_RIP)
        return Exit(ExitKind.INTERNAL_ERROR, qualification=error.errno,
                    detail=f"model engine: emulator stopped at RIP {rip:#x}: {error}")

    # --- VM exits ---------------------------------------------------------------------------
    def take_exit(self, vmexit: VmExit) -> None:
        """Hook side: this instruction causes ``vmexit``; stop before it executes."""
        self._exit = vmexit
        self.uc.emu_stop()

    def _vm_exit(self, vmexit: VmExit) -> Exit | None:
        """Record a VM exit; returns what run() reports, or None for an exit finished in-engine."""
        if self.shadow is not None and vmexit.exit is not None:
            vmexit = self.shadow.complete_in_engine(vmexit) or vmexit  # the shadow MMU's exits
        if self.apic is not None:
            if self.apic.claims_msr(vmexit):
                self.apic.msr_exit(vmexit)  # the hypervisor's local APIC, as KVM's in-kernel one
                return None
            if self.apic.claims_cr8(vmexit):
                self.apic.cr8_exit(vmexit)
                return None
        if vmexit.exit is None:
            self._record(vmexit, None)
            self._pending = vmexit
            self._complete_pending()
            return None
        return self._record(vmexit, vmexit.exit)

    def _record(self, vmexit: VmExit, exit_: Exit | None) -> Exit | None:
        self.exit_counts[vmexit.reason] += 1
        self.overhead_cycles += self.cost.cycles(exit_.kind if exit_ is not None else None)
        self.last_exit = vmexit
        info = vmexit.info
        halted = self._halted
        self.vmcs.hold(lambda: self._writeback(info, halted))
        self._vpid_flush()
        if self.walks is not None:
            self.walks.exited()
        self._pending = vmexit
        if vmexit.reason is ExitReason.TRIPLE_FAULT:
            self._shutdown = exit_
        return exit_

    def _writeback(self, info: ExitInfo, halted: bool) -> None:
        self.vmcs.record_exit(info)
        save_guest_state(self.vmcs, self.cpu.store(), HLT_STATE if halted else 0)

    # --- events -------------------------------------------------------------------------------
    def raise_event(self, event: Event) -> None:
        """Hook side: ``event`` happens at the current instruction; stop and deliver it."""
        self._event = event
        self.uc.emu_stop()

    def queue_event(self, event: Event) -> None:
        """Completion side: deliver ``event`` at the coming VM entry (as VMCS event injection)."""
        self._inject.append(event)

    def exception_exit(self, event: Event, length: int, rip: int) -> None:
        """The exception bitmap intercepts ``event`` (SDM Vol. 3C 26.2): VM exit, reason 0."""
        info = InterruptionInfo(event.vector, event.type, error_code_valid=event.error_code is not None)
        qualification = event.cr2 or 0 if event.vector == PF else 0

        def reinject(_: bytes) -> None:  # a KVM-like hypervisor reflects it to the guest
            if length:
                self.uc.reg_write(R.UC_X86_REG_RIP, rip + length)
            self.queue_event(event)
        self.take_exit(VmExit(ExitReason.EXCEPTION_NMI, ExitInfo(
            int(ExitReason.EXCEPTION_NMI), qualification, instruction_length=length,
            interruption_info=info.encode(), interruption_error_code=event.error_code or 0),
            Exit(ExitKind.EXCEPTION, qualification=qualification, detail=describe(event)), reinject))

    def _handle_event(self, event: Event) -> Exit | None:
        if self.shadow is not None and self.shadow.reflected(event):
            return self._deliver(event)  # a true #PF: its VM exit was taken, the hypervisor injects it
        if self.latched.exception_exits(event):
            self.exception_exit(event, 0, self.uc.reg_read(R.UC_X86_REG_RIP))
            vmexit, self._exit = self._exit, None
            return self._vm_exit(vmexit)
        return self._deliver(event)

    def _deliver(self, event: Event) -> Exit | None:
        state = self.cpu.store()
        delivery = Delivery(state, self.read_linear, self.write_linear)
        try:
            delivery.deliver(event)
        except TripleFault as fault:
            return self._vm_exit(VmExit(ExitReason.TRIPLE_FAULT, ExitInfo(int(ExitReason.TRIPLE_FAULT)),
                                        Exit(ExitKind.SHUTDOWN, detail=f"triple fault ({fault})")))
        except Unsupported as reason:
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"model engine: {reason}")
        except EptExit as exit_:
            # SDM 28.2.4: an exit during event delivery reports the event as IDT-vectoring
            # information; the hypervisor (here, the next VM entry) delivers it again.
            info = exit_.vmexit.info
            vectoring = InterruptionInfo(event.vector, event.type,
                                         error_code_valid=event.error_code is not None).encode()
            return self._vm_exit(VmExit(exit_.vmexit.reason, replace(
                info, idt_vectoring_info=vectoring, idt_vectoring_error_code=event.error_code or 0),
                exit_.vmexit.exit, lambda _: self.queue_event(event)))
        except _NotRam as where:
            return Exit(ExitKind.INTERNAL_ERROR,
                        detail=f"model engine: event delivery touches {where.gpa:#x}, which is not RAM")
        delivered = delivery.delivered
        if delivered is not None and delivered.vector == PF and delivered.cr2 is not None:
            self.uc.reg_write(R.UC_X86_REG_CR2, delivered.cr2)
        self.cpu.load(state)
        self._pass_once = None
        self._halted = False
        return None

    def _on_interrupt(self, uc: Uc, intno: int, _: object) -> None:
        """Unicorn raised an exception in the guest (a fault of the instruction at RIP)."""
        try:
            self.cpu.sync()
            code = self.cpu.error_code if intno in ERROR_CODE_VECTORS else None
            self.raise_event(Event(intno, error_code=code))
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self._fail(exc)

    # --- sensitive instructions ---------------------------------------------------------------
    def _add_sensitive_hook(self, address: int) -> int:
        return self.uc.hook_add(UC_HOOK_CODE, self._on_sensitive, None, address, address)

    def _on_sensitive(self, uc: Uc, address: int, size: int, _: object) -> None:
        try:
            if self._pass_once is not None:
                # The pass is for the first sensitive instruction after VM entry, the one at RIP.
                passing, self._pass_once = address == self._pass_once, None
                if passing:
                    return
            cpu = self.cpu
            cpu.sync()
            code = self._instruction_bytes(address)
            key = (address, cpu.code_bits, code)
            insn = self._decoded.get(key, _UNDECODED)
            if insn is _UNDECODED:
                if len(self._decoded) >= _DECODE_CACHE:
                    self._decoded.clear()
                insn = self._decoded[key] = decode(code, address, cpu.code_bits)
            if insn is not None:
                intercept(self, insn, address, cpu.rip)
                if self.walks is not None and self._event is None:  # a faulting one invalidates nothing
                    self.walks.sensitive(insn, cpu.rip)
        except EptExit as exit_:
            self.take_exit(exit_.vmexit)
        except Fault as fault:
            self.raise_event(fault.event)
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self._fail(exc)

    def _instruction_bytes(self, linear: int) -> bytes:
        vpage, offset = linear & _PAGE_MASK, linear & (PAGE - 1)
        hpage = self.code.host_page(vpage)
        if hpage is None:
            hpage = self._translate(vpage, Access.FETCH)
        code = self.host.read(hpage + offset, min(MAX_INSN, PAGE - offset))
        if offset > PAGE - MAX_INSN:
            try:
                code += self.host.read(self._translate(vpage + PAGE, Access.FETCH), offset + MAX_INSN - PAGE)
            except (Fault, EptExit, _NotRam):
                pass  # the fetch of the next page faults first
        return code

    def pass_once(self, linear: int) -> None:
        """Completion side: the instruction at ``linear`` executes natively on the next entry."""
        self._pass_once = linear

    def halt(self) -> None:
        self._halted = True

    def _fail(self, exc: BaseException) -> None:
        if self._hook_error is None:
            self._hook_error = exc
        self.uc.emu_stop()

    def _on_platform_in(self, uc: Uc, port: int, size: int, _: object) -> int:
        # An IN that does not exit reaches the "platform" behind the model: nothing answers.
        return (1 << (8 * size)) - 1

    def _on_platform_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        return None

    # --- guest state helpers for instructions.py ---------------------------------------------
    def cpl(self) -> int:
        return self.cpu.cpl

    def cr4(self) -> int:
        return self.cpu.cr(4)

    def protected_mode(self) -> bool:
        return bool(self.cpu.cr(0) & 1)

    def iopl(self) -> int:
        return self.cpu.system_flags >> RFLAGS_IOPL_SHIFT & 3

    def vm86(self) -> bool:
        return bool(self.cpu.system_flags & RFLAGS_VM)

    def segment_base(self, index: int) -> int:
        if self.cpu.code_bits == 64 and index < 4:
            return 0  # SDM Vol. 3A 3.4.4: ES, CS, SS, DS bases are 0 in 64-bit mode
        return self.cpu.segment_base(index)

    def effective_linear(self, mem: Memory, next_rip: int) -> int:
        """The linear address of a memory operand (SDM Vol. 1 3.7.5), segment base included."""
        uc = self.uc
        address = mem.disp
        if mem.rip_relative:
            address += next_rip
        if mem.base is not None:
            address += uc.reg_read(GPR_IDS[mem.base])
        if mem.index is not None:
            address += uc.reg_read(GPR_IDS[mem.index]) * mem.scale
        address &= (1 << mem.address_size) - 1
        linear = self.segment_base(mem.segment) + address
        return linear & (0xFFFF_FFFF_FFFF_FFFF if self.cpu.code_bits == 64 else 0xFFFF_FFFF)

    def tss_io_allowed(self, port: int, size: int) -> bool:
        """The I/O permission bit map of the TSS allows ``size`` ports from ``port`` (SDM Vol. 1 19.5.2)."""
        _, _, _, tr = self.cpu.tables()
        if tr.type not in (9, 11) or tr.limit < 0x67:
            return False
        try:
            base = int.from_bytes(self.read_linear(tr.base + 0x66, 2), "little")
            last = base + (port + size - 1) // 8
            if last + 1 > tr.limit:
                return False
            first = base + port // 8
            bits = int.from_bytes(self.read_linear(tr.base + first, last - first + 1), "little")
        except (Fault, EptExit, _NotRam):
            return False
        return not bits >> (port % 8) & ((1 << size) - 1)

    def guest_tsc(self) -> int:
        """The TSC the guest reads: the host's through the VMCS offset and multiplier (SDM 26.3)."""
        return self.latched.tsc.apply(host_tsc())

    def write_cr(self, cr: int, value: int) -> None:
        """A hypervisor completing a guest's MOV to CR: the register, and its read shadow."""
        uc = self.uc
        if cr == 0 and self.shadow is not None:
            self.shadow.write_cr0(value)
            return
        if cr == 0:
            self.vmcs.store(F.CR0_READ_SHADOW, value)
            self.latched.cr0_shadow = value
        elif cr == 4:
            self.vmcs.store(F.CR4_READ_SHADOW, value)
            self.latched.cr4_shadow = value
        elif cr == 3 and self.cpu.cr(4) & (1 << 17):
            value &= ~(1 << 63)  # SDM 4.10.4.1: with CR4.PCIDE = 1 bit 63 is "no flush", not stored
        uc.reg_write(_CR_REGS[cr], value)
        if cr in (0, 4):
            self._flush_tlb()

    # --- translation: guest paging, then EPT ------------------------------------------------
    def _ept(self, gpa: int, access: int, *, la: int | None,
             paging_structure: bool = False) -> tuple[int, int]:
        """HPA of ``gpa`` and the page's EPT permissions (EptPerm bits as an int) for ``access``
        (EptAccess bits as an int); raises EptExit or _NotRam."""
        if not self.latched.proc2 & _ENABLE_EPT:
            if not self.host.is_ram(gpa):
                raise _NotRam(gpa)
            return gpa, _EPT_RWX
        page = gpa & _PAGE_MASK
        hit = self._ept_cache.get(page)
        if hit is not None and not access & ~hit[1]:
            return hit[0] | gpa & (PAGE - 1), hit[1]
        absent = self._ept_absent.get(page)
        if absent is not None:
            read = self.host.read_u64
            for hpa, value in absent:
                if read(hpa) != value:
                    del self._ept_absent[page]
                    break
            else:
                raise _NotRam(gpa)
        eptp = self.latched.eptp
        try:
            result = ept_translate(self.host, eptp, gpa, access, paging_structure=paging_structure)
        except (ValueError, IndexError) as error:
            raise EptExit(self._ept_misconfig(gpa, f"EPT walk failed: {error}")) from None
        if isinstance(result, EptTranslation):
            permissions = int(result.permissions)
            if not eptp >> 6 & 1:  # with EPT A/D flags every access must walk to set them
                self._ept_cache[page] = (result.hpa & _PAGE_MASK, permissions)
            return result.hpa, permissions
        if isinstance(result, EptMisconfig):
            raise EptExit(self._ept_misconfig(gpa, result.reason))
        if not self.host.is_ram(gpa) and not result.permissions & _EPT_RWX:
            # The same entries lead any later walk here to the same end (a violation sets no flags).
            if len(self._ept_absent) >= _WALK_CACHE:
                self._ept_absent.clear()
            read = self.host.read_u64
            self._ept_absent[page] = tuple((hpa, read(hpa)) for hpa in result.refs)
            raise _NotRam(gpa)
        qualification = result.qualification(gla_valid=la is not None,
                                              linear_translation=la is not None and not paging_structure)
        value = qualification.encode()
        raise EptExit(VmExit(ExitReason.EPT_VIOLATION, ExitInfo(
            int(ExitReason.EPT_VIOLATION), value, guest_linear_address=la or 0, guest_physical_address=gpa),
            Exit(ExitKind.EPT_VIOLATION, addr=gpa, qualification=value)))

    def _ept_misconfig(self, gpa: int, reason: str) -> VmExit:
        info = ExitInfo(int(ExitReason.EPT_MISCONFIG), guest_physical_address=gpa)
        detail = f"EPT misconfiguration at GPA {gpa:#x}: {reason}"
        return VmExit(ExitReason.EPT_MISCONFIG, info, Exit(ExitKind.EPT_MISCONFIG, addr=gpa, detail=detail))

    def _guest_walk(self, la: int, access: Access, user: bool) -> int:
        """Linear -> guest-physical through the guest's page tables (call after cpu.sync()).

        A successful walk is remembered with the host-physical address and value of every
        paging-structure entry it read. The same walk (linear page, access, CPL 3 or not) under the
        same CR0, CR3, CR4 and EFER, over entries that still hold those values, reads the same
        entries, reaches the same guest-physical page and changes nothing (its accessed and dirty
        flags are already set), so the result is reused after re-reading the entries. EPT, which
        placed the entries in host memory, is the same until an INVEPT or a new EPTP or control
        (:meth:`_forget_ept`). With EPT accessed and dirty flags on, each walk also sets flags in EPT
        entries, so every walk is done in full.
        """
        if self.shadow is not None:
            return self.shadow.guest_walk(la, access, user)
        cpu = self.cpu
        cr0 = cpu.cr(0)
        efer = cpu.efer
        if not cr0 & CR0_PG:
            return la if efer & EFER_LMA else la & 0xFFFF_FFFF
        cr3, cr4 = cpu.cr(3), cpu.cr(4)
        walks = self._walks
        regs = (cr0, cr3, cr4, efer)
        if regs != self._walk_regs:
            walks.clear()
            self._walk_regs = regs
        key = (la >> 12, access, user)
        hit = walks.get(key)
        if hit is not None:
            read = self.host.read_u64
            for hpa, value in hit[1]:
                if read(hpa) != value:
                    del walks[key]
                    break
            else:
                return hit[0] | la & (PAGE - 1)
        mem = _GuestPhysical(self, la)
        pdptes: tuple[int, ...] = ()
        if cr4 & CR4_PAE and not efer & EFER_LMA:
            # The model reads the PDPTEs at each walk; hardware loads them on MOV to CR3 (SDM 4.4.1).
            try:
                pdptes = load_pdptes(mem, cr3)
            except ValueError:
                raise Fault(GP, 0) from None
        try:
            result = translate(mem, PagingRegs(cr0, cr3, cr4, efer, pdptes), la, access, user=user)
        except ValueError:
            raise Fault(GP, 0) from None  # a non-canonical address
        if isinstance(result, PageFault):
            raise Fault(PF, int(result.error_code), cr2=la)
        if not (self.latched.proc2 & _ENABLE_EPT and self.latched.eptp >> 6 & 1):
            if len(walks) >= _WALK_CACHE:
                walks.clear()
            read = self.host.read_u64
            walks[key] = (result.address & _PAGE_MASK, tuple((hpa, read(hpa)) for hpa in mem.read))
        return result.address

    def _translate(self, la: int, access: Access) -> int:
        """HPA for the engine's own access to guest linear memory (supervisor unless CPL 3)."""
        self.cpu.sync()
        gpa = self._guest_walk(la, access, user=self.cpu.cpl == 3 and not self._implicit_supervisor(la))
        return self._ept(gpa, _EPT_ACCESS[access], la=la)[0]

    def read_linear(self, la: int, length: int) -> bytes:
        out = b""
        while length:
            chunk = min(length, PAGE - (la & (PAGE - 1)))
            out += self.host.read(self._translate(la, Access.READ), chunk)
            la, length = la + chunk, length - chunk
        return out

    def write_linear(self, la: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), PAGE - (la & (PAGE - 1)))
            hpa = self._translate(la, Access.WRITE)
            self.uc.mem_write(hpa, data[:chunk])  # through QEMU, so translated code it overwrites goes
            self.code.forget(hpa & _PAGE_MASK)
            if self.shadow is not None:
                self.shadow.guest_wrote(hpa)
            la, data = la + chunk, data[chunk:]

    def _implicit_supervisor(self, la: int) -> bool:
        """Accesses to the GDT, LDT, IDT and TSS are supervisor accesses at any CPL (SDM Vol. 3A 4.6)."""
        page = la & _PAGE_MASK
        last = page + PAGE - 1
        for first, end in self.cpu.table_spans():
            if first <= last and page <= end:
                return True
        return False

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry, _: object) -> bool:
        try:
            return self._fill(vaddr, access, entry)
        except SelfMappedWrite:
            self._write_step = True  # the run stops here; the next runs the instruction alone
        except ShadowUnsupported as why:
            reason = ExitReason.EXCEPTION_NMI
            self._exit = VmExit(reason, ExitInfo(int(reason), vaddr), Exit(
                ExitKind.INTERNAL_ERROR, addr=vaddr, detail=f"model engine (shadow paging): {why}"))
        except EptExit as exit_:
            self._exit = self._exact(exit_.vmexit, vaddr, access)
        except Fault as fault:
            self._event = fault.event
        except _NotRam as where:
            if access == UC_MEM_FETCH:
                self._exit = VmExit(ExitReason.EPT_VIOLATION, ExitInfo(int(ExitReason.EPT_VIOLATION)), Exit(
                    ExitKind.INTERNAL_ERROR, addr=where.gpa,
                    detail=f"instruction fetch from guest-physical {where.gpa:#x}, where there is no RAM"))
            elif self._mmio_second(where.gpa & _PAGE_MASK, vaddr & _PAGE_MASK):
                entry.paddr, entry.perms = MMIO_WINDOW + PAGE, UC_PROT_READ | UC_PROT_WRITE
                return True
            elif self._mmio_in_run(where.gpa & _PAGE_MASK, vaddr):
                entry.paddr, entry.perms = MMIO_WINDOW, UC_PROT_READ | UC_PROT_WRITE
                return True
            else:
                self._mmio_hit = (where.gpa & _PAGE_MASK, vaddr)
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self._fail(exc)
        return False

    def _mmio_second(self, gpage: int, vpage: int) -> bool:
        """The MMIO step's access crosses into the linear page beside its own, which is MMIO too:
        that page is reached through the window's second page (True)."""
        step = self._mmio
        beside = ((step.linear + PAGE) & _LINEAR_MASK, (step.linear - PAGE) & _LINEAR_MASK) if step else ()
        if vpage not in beside:
            return False
        if step.second is not None and step.second != (gpage, vpage):
            return False
        step.second = (gpage, vpage)
        return True

    def _look_for_split(self, step: _MmioStep, offset: int, size: int) -> None:
        """Only an access at either end of a page can be a piece of one that crosses it: find that."""
        if step.split is None and (offset % PAGE == 0 or offset % PAGE + size == PAGE):
            linear = step.linear_of(step.gpa(offset))
            step.split = self._split_operand(step, linear if offset % PAGE == 0 else linear + size)

    def _split_operand(self, step: _MmioStep, boundary: int) -> tuple[int, int]:
        """Linear range of the instruction's memory operand that crosses ``boundary``, or (0, 0)."""
        start = self.segment_base(1) + step.rip
        try:
            code = self._instruction_bytes(start)
            operands = memory_operands(code, start, self.cpu.code_bits)
            length = (instruction_summary(code, start, self.cpu.code_bits) or (0,))[0]
        except (Fault, EptExit, _NotRam):
            return 0, 0
        for mem, size in operands:
            la = self.effective_linear(mem, step.rip + length)
            if la < boundary < la + size:
                return la, la + size
        return 0, 0

    def _mmio_in_run(self, gpage: int, vpage: int) -> bool:
        """MMIO met by an instruction whose replays are armed (:meth:`_arm_stop`): its first pass
        runs at once, in this run; True if the caller is to map the page to the window.

        The fill comes before the instruction's first access to the page, with the CPU state
        restored to the instruction's start (what the failed translation would leave for a
        replay), so the pass is the replay the failed translation would lead to.
        """
        if self._mmio is not None or self._window_step is not None:
            return False
        cpu = self.cpu  # synced by the fill
        rip = cpu.rip
        linear_rip = self.segment_base(1) + rip
        try:
            insn = self._summary(linear_rip)
        except (Fault, EptExit, _NotRam):
            return False
        if insn is None or insn[1]:
            return False
        next_linear = linear_rip + insn[0]
        stop = self._stops.get(next_linear)
        if stop is None or (next_linear, self.code.host_page(linear_rip & _PAGE_MASK)) not in self._armed:
            return False
        self.uc.context_update(self._replay_ctx)
        stop[1] = 0
        self._mmio = self._in_run = self._window_step = _MmioStep(gpage, vpage, rip, insn[0])
        self._stop_at = next_linear
        return True

    def _exact(self, vmexit: VmExit, vpage: int, access: int) -> VmExit:
        """Unicorn reports only the page of a missing translation; an EPT violation reports the
        exact linear and guest-physical address, which the faulting instruction's operand gives."""
        info = vmexit.info
        if vmexit.reason is not ExitReason.EPT_VIOLATION or not info.qualification >> 8 & 1:
            return vmexit  # not the access's own translation (a guest paging-structure access)
        linear = vpage
        rip = self.uc.reg_read(R.UC_X86_REG_RIP)
        if access == UC_MEM_FETCH:
            linear = max(vpage, self.segment_base(1) + rip)
        else:
            start = self.segment_base(1) + rip
            try:
                operands = memory_operands(self._instruction_bytes(start), start, self.cpu.code_bits)
            except (Fault, EptExit, _NotRam):
                operands = []
            for mem, size in operands:
                la = self.effective_linear(mem, rip + (instruction_summary(
                    self._instruction_bytes(start), start, self.cpu.code_bits) or (0,))[0])
                if la <= vpage + PAGE - 1 and vpage <= la + max(size, 1) - 1:
                    linear = max(la, vpage)
                    break
        if linear == vpage:
            return vmexit
        offset = linear & (PAGE - 1)
        gpa = info.guest_physical_address | offset
        exit_ = vmexit.exit
        if exit_ is not None:
            exit_ = Exit(exit_.kind, addr=gpa, qualification=exit_.qualification, detail=exit_.detail)
        return VmExit(vmexit.reason, ExitInfo(info.reason, info.qualification, guest_linear_address=linear,
                                              guest_physical_address=gpa), exit_, vmexit.complete)

    def _fill(self, vaddr: int, access: int, entry) -> bool:
        """A Unicorn TLB miss: translate ``vaddr`` and choose what the TLB entry may allow."""
        self.tlb_fills += 1
        cpu = self.cpu
        cpu.sync()
        kind = _ACCESS[access]
        step = self._mmio
        shadow = self.shadow
        if shadow is not None:  # the processor walks the shadow tables
            paging = True
            user = cpu.cpl == 3 and not self._implicit_supervisor(vaddr)
            gpa, leaf = shadow.translate(vaddr, kind, user, step is not None)
        else:
            paging = bool(cpu.cr(0) & CR0_PG)
            user = paging and cpu.cpl == 3 and not self._implicit_supervisor(vaddr)
            gpa = self._guest_walk(vaddr, kind, user)
        if step is not None and gpa & _PAGE_MASK == step.gpage:
            entry.paddr, entry.perms = MMIO_WINDOW, UC_PROT_READ | UC_PROT_WRITE
            self._window_step = step
            return True
        if shadow is None:
            hpa, allowed = self._ept(gpa, _EPT_ACCESS[kind], la=vaddr)
        elif leaf is None:
            raise _NotRam(gpa)
        else:
            hpa = gpa
            allowed = _EPT_R | (_EPT_W if leaf & 2 else 0) | (0 if leaf >> 63 else _EPT_X)
        hpage = hpa & _PAGE_MASK
        if not self.host.is_ram(hpage):
            raise EptExit(self._ept_misconfig(gpa, f"maps to host-physical {hpage:#x}, outside host RAM"))
        perms = UC_PROT_READ if allowed & _EPT_R else 0
        # Only what the walks verified: without paging every access is allowed by the guest, and
        # with EPT dirty flags on, write permission only comes from a write (which set the flag).
        ad = bool(self.latched.eptp >> 6 & 1)
        if allowed & _EPT_W and (kind is Access.WRITE or not (paging or ad)):
            perms |= UC_PROT_WRITE
        if allowed & _EPT_X and (kind is Access.FETCH or not paging):
            perms |= UC_PROT_EXEC
        vpage = vaddr & _PAGE_MASK
        if kind is Access.FETCH:
            self.code.fetch(vpage, hpage)
            perms &= ~UC_PROT_WRITE  # the first write after a scan must come back here
        elif self.code.is_clean(hpage):
            if kind is Access.WRITE:
                if self.code.write(vpage, hpage):
                    self._flush_tlb()  # other virtual pages may still execute it unchecked
                perms &= ~UC_PROT_EXEC
            else:
                perms &= ~UC_PROT_WRITE
        else:
            perms &= ~UC_PROT_EXEC  # not scanned (or written since): a fetch must come back here
        # The access itself is allowed: the guest walk and the EPT walk checked exactly it.
        entry.paddr = hpage
        entry.perms = perms
        if self.walks is not None:
            self.walks.filled(vaddr, kind, hpage)
        return True

    def invalidate_tlb(self) -> None:
        """The guest invalidated translations (INVPCID): Unicorn's TLB goes whole, which is more
        than the SDM requires; the modelled TLB (tlb=...) invalidates exactly what it requires."""
        self._flush_tlb()

    def _flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self._window_step = None

    def _unmap_window(self) -> None:
        """Before the guest runs outside an MMIO replay: no TLB entry may reach the MMIO window."""
        if self._window_step is not None:
            self._flush_tlb()

    def _page_bytes(self, hpage: int) -> bytes:
        return self.host.read(hpage, PAGE)

    # --- MMIO: an EPT violation on a GPA without RAM, emulated instruction by instruction ------
    def _mmio_execute(self) -> Exit | None:
        """Run the instruction that touched MMIO once more; exit for its first unanswered read,
        or, once it completes, for each of its writes (SDM: each is an EPT-violation VM exit)."""
        exit_ = self._mmio_arm()
        if exit_ is not None:
            return exit_
        try:
            self.uc.emu_start(self._mmio.rip, 0)
        except UcError:
            pass
        return self._mmio_finish()

    def _mmio_arm(self) -> Exit | None:
        """Prepare a pass of the MMIO step: note the CPU state to undo it, stop after the instruction."""
        step = self._mmio
        uc = self.uc
        self.cpu.sync()
        linear_rip = self.segment_base(1) + step.rip
        insn = self._summary(linear_rip)
        if insn is None:
            self._mmio = None
            return Exit(ExitKind.INTERNAL_ERROR,
                        detail=f"model engine: cannot decode the MMIO access at {step.rip:#x}")
        if insn[1]:
            self._mmio = None
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"model engine: MMIO through a control transfer "
                                                        f"({insn[2]}) is not supported")
        if self._replay_ctx is None:
            self._replay_ctx = uc.context_save()
        else:
            uc.context_update(self._replay_ctx)
        step.length = insn[0]
        next_linear = linear_rip + step.length
        self._arm_stop(linear_rip, next_linear)
        if self._window_step is not step:
            self._unmap_window()  # the window shows this step's page only
        step.seen, step.missing, step.writes = 0, None, []
        self._exit = self._event = self._mmio_hit = None
        self._stop_at = next_linear
        return None

    def _mmio_finish(self, resumed: bool = False) -> Exit | None:
        """After a pass of the MMIO step: its exits, or None when the guest may go on.

        ``resumed``: the pass ran as the start of the guest's run (see :meth:`_vm_entry`) and stopped
        before the instruction for a host reason (a kick); the step then stays, to be run again.
        """
        self._stop_at = None
        if self._hook_error is not None:
            exc, self._hook_error = self._hook_error, None
            raise exc
        step = self._mmio
        uc = self.uc
        saved = self._replay_ctx
        # Done when the next instruction was reached (a hook there may have stopped first: it
        # fires again when the guest resumes, so what it recorded is dropped).
        self.cpu.sync()
        done = self.cpu.rip == step.rip + step.length and self._event is None
        if step.missing is not None:
            uc.context_restore(saved)  # undo the pass: the read had no data yet
            self._exit = self._event = None
            gpa, size = step.missing
            if self.apic is not None and self.apic.claims(gpa):
                step.reads.append(self.apic.mmio_read(step, gpa, size))  # answered in-engine
                return self._mmio_execute()
            return self._record(*self._mmio_exit(step, gpa, size, None))
        if not done:
            uc.context_restore(saved)
            if resumed and self._exit is None and self._event is None and self._mmio_hit is None:
                return None  # stopped before the instruction: the step stays
            self._mmio = None
            if self._exit is not None:
                return self._vm_exit(self._exit)
            if self._event is not None:
                return self._handle_event(self._event)
            return None  # stopped before the instruction (a kick): it runs again normally
        self._exit = None
        self._mmio = None
        writes = []
        for gpa, size, value in step.writes:
            if self.apic is not None and self.apic.claims(gpa):
                self.apic.mmio_write(step, gpa, size, value)  # finished in-engine (or virtualized)
                continue
            vmexit, exit_ = self._mmio_exit(step, gpa, size, value)
            if any(base <= gpa and gpa + size <= base + length for base, length in self._coalesced):
                self._record(vmexit, None)  # a VM exit all the same, finished in-engine
                self._pending = None
                self._coalesced_writes.append((gpa, exit_.data))
            else:
                writes.append((vmexit, exit_))
        if not writes:
            return None
        self._queued.extend(writes[1:])
        first_vmexit, first_exit = writes[0]
        return self._record(first_vmexit, first_exit)

    def _mmio_exit(self, step: _MmioStep, gpa: int, size: int, value: int | None) -> tuple[VmExit, Exit]:
        write = value is not None
        qualification = _MMIO_WRITE_QUALIFICATION if write else _MMIO_READ_QUALIFICATION
        linear = step.linear_of(gpa)
        reason = ExitReason.EPT_VIOLATION
        if self.shadow is not None:  # no EPT: the VMM met the MMIO page at a #PF VM exit (SDM 26.2)
            reason, qualification = ExitReason.EXCEPTION_NMI, linear
        info = ExitInfo(int(reason), qualification, guest_linear_address=linear,
                        guest_physical_address=gpa)
        if write:
            exit_ = Exit(ExitKind.MMIO, addr=gpa, size=size, is_write=True,
                         data=value.to_bytes(size, "little"), qualification=qualification)
            vmexit = VmExit(reason, info, exit_)
        else:
            exit_ = Exit(ExitKind.MMIO, addr=gpa, size=size, qualification=qualification)
            vmexit = VmExit(reason, info, exit_, complete=step.reads.append, read_size=size)
        return vmexit, exit_

    def _summary(self, linear: int) -> tuple[int, bool, str] | None:
        """:func:`instruction_summary` of the instruction at ``linear``, remembered by its bytes."""
        code = self._instruction_bytes(linear)
        key = (linear, self.cpu.code_bits, code)
        summary = self._summaries.get(key, _UNDECODED)
        if summary is _UNDECODED:
            if len(self._summaries) >= _DECODE_CACHE:
                self._summaries.clear()
            summary = self._summaries[key] = instruction_summary(code, linear, self.cpu.code_bits)
        return summary  # type: ignore[return-value]

    def _arm_stop(self, linear_rip: int, next_linear: int) -> None:
        """Make the replay of the instruction at ``linear_rip`` stop at ``next_linear``.

        A ``UC_HOOK_CODE`` hook takes effect in code translated after it was added, so the hook's
        first use under a mapping of the instruction retranslates it (``ctl_remove_cache``). The
        hook then stays, and so does the translated code that calls it: the next replay there
        starts at once. Outside replays the hook returns at once; one that keeps firing there
        (the instruction after an MMIO access also runs on RAM) is removed after the run.
        """
        uc = self.uc
        stop = self._stops.get(next_linear)
        if stop is None:
            if len(self._stops) >= _STOP_HOOKS:
                self._drop_stop(next(iter(self._stops)))
            handle = uc.hook_add(UC_HOOK_CODE, self._mmio_stop, None, next_linear, next_linear)
            stop = self._stops[next_linear] = [handle, 0]
        stop[1] = 0
        vpage = linear_rip & _PAGE_MASK
        hpage = self.code.host_page(vpage)
        if hpage is None:
            hpage = self._translate(vpage, Access.FETCH)
        armed = (next_linear, hpage)
        if armed not in self._armed:
            uc.ctl_remove_cache(linear_rip, next_linear + 1)
            self._armed.add(armed)

    def _drop_stop(self, linear: int) -> None:
        """Remove the stop hook at ``linear`` (never from inside a hook: Unicorn may still call it)."""
        handle, _ = self._stops.pop(linear)
        self.uc.hook_del(handle)
        self._armed = {armed for armed in self._armed if armed[0] != linear}

    def _mmio_stop(self, uc: Uc, address: int, size: int, _: object) -> None:
        if address == self._stop_at:
            step = self._resume
            if (step is not None and step.missing is None and not step.writes and self._event is None
                    and self._exit is None and self._hook_error is None):
                # The step's last pass completed the instruction with every read answered and
                # nothing written: the guest runs on, once no TLB entry reaches the window.
                self._stop_at = self._resume = self._mmio = None
                self._flush_tlb()
                return
            uc.emu_stop()
            return
        stop = self._stops.get(address)
        if stop is not None:
            stop[1] += 1
            if stop[1] == _STOP_IDLE:
                self._idle_stops.append(address)

    def _on_mmio_read(self, uc: Uc, offset: int, size: int, _: object) -> int:
        step = self._mmio
        gpa, shift = step.gpa(offset), 0
        self._look_for_split(step, offset, size)
        if step.split is not None and step.split[1]:
            # Unicorn reads a split access as aligned words; the device sees only the bytes the
            # instruction reads from each page, as on KVM.
            linear = step.linear_of(gpa)
            first, end = max(linear, step.split[0]), min(linear + size, step.split[1])
            if first < end:
                shift, size = first - linear, end - first
                gpa += shift
        if step.seen < len(step.reads):
            data = step.reads[step.seen]
            step.seen += 1
            return int.from_bytes(data, "little") << 8 * shift
        if step.missing is None:
            step.missing = (gpa, size)
        return 0

    def _on_mmio_write(self, uc: Uc, offset: int, size: int, value: int, _: object) -> None:
        step = self._mmio
        gpa, value = step.gpa(offset), value & ((1 << (8 * size)) - 1)
        last = step.writes[-1] if step.writes else None
        self._look_for_split(step, offset, size)
        if (step.split is not None and step.split[1] and last is not None and last[0] + last[1] == gpa
                and gpa & (PAGE - 1) and last[1] + size <= 8):
            # A split access arrives in pieces; like KVM's MMIO fragments, one exit per page.
            step.writes[-1] = (last[0], last[1] + size, last[2] | value << (8 * last[1]))
            return
        step.writes.append((gpa, size, value))

