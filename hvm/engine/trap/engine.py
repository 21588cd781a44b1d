"""TrapEngine: classic trap-and-emulate on a CPU without VT-x (Unicorn), as the chapter opens.

The guest kernel believes it runs at ring 0; the real CPU runs it at **CPL 3** (ring
deprivileging): every code and data descriptor of the guest's GDT appears in the real (shadow)
GDT with DPL 3 and CS/SS carry RPL 3 (:mod:`.shadow`). What the guest considers its machine
state -- CR0, CR2, CR3, CR4, EFER, GDTR, IDTR, LDTR, TR, IF and IOPL, the MSRs -- is a
:class:`VirtualCpu` that only the hypervisor reads and writes. The real CPU runs the guest's
instructions at full speed and stops only when the hardware refuses one:

* a **privileged instruction** faults (#GP at CPL 3: CLI/STI with IOPL 0, HLT, IN/OUT, MOV
  to/from CRn, LGDT/LIDT/LTR/LLDT, RDMSR/WRMSR, INVLPG, IRET to ring 0, MOV to SS, ...). The
  hypervisor decodes it (:mod:`.decode`, capstone) and emulates it against the virtual CPU
  (:mod:`.emulate`), advances RIP and resumes the guest;
* a **page fault** on the shadow page tables: a hidden fault the hypervisor fills, a write to
  a write-protected guest page table, or the guest's own #PF, reflected to it;
* an **exception or INT n** of the guest: delivered through the guest's own IDT, by the same
  procedure the model engine uses (:class:`hvm.engine.model.events.Delivery`), with the
  frame the guest expects (its ring-0 CS and SS) -- so its IRET faults in turn and is emulated.

What does *not* fault is the chapter's point: SGDT, SIDT, SLDT, STR, SMSW, PUSHF, POPF, LAR,
LSL, VERR, VERW, PUSH/POP and MOV of segment registers, far CALL/JMP/RET run natively at CPL 3
and show, or silently keep, the real state (see :mod:`hvm.lab.popek_goldberg` and the
``redpill`` guest). The hypervisor mirrors the virtual IF into the real EFLAGS.IF so that
PUSHF shows the guest its own IF (the emulated CPU takes no host interrupts, so the real IF is
the guest's to use; on real hardware the host needs IF = 1 and PUSHF would leak that too); POPF
at CPL 3 still cannot change it.

Where Unicorn differs from a real x86 and the engine compensates, it says so:

* Unicorn reports INT n to the interrupt hook *before* the gate's DPL check (QEMU's
  ``do_interrupt_all`` never runs), so a guest INT n arrives as its vector, not as the #GP a
  real CPU at CPL 3 raises for a DPL-0 gate; the engine delivers it as the guest's ring 0
  would take it;
* ``old_exception`` is never reset by Unicorn (:meth:`TrapCpu.end_exception`);
* CPUID does not fault at CPL 3 on x86 (it is unprivileged); the engine models Intel's CPUID
  faulting (IA32_MISC_FEATURES_ENABLES bit 0, Ivy Bridge and later), which Unicorn lacks, by
  intercepting CPUID with a Unicorn instruction hook and answering as the model engine does
  (:class:`hvm.engine.model.cpuid.CpuidPolicy`); counted as a trap;
* the single step of a write to a protected page uses a code hook of the engine's own (the
  instruction's cached translation is dropped first, since translated code calls only the hooks
  added before it was translated), removed right after the step: Unicorn's ``count=1`` removes
  its counting hook only at the next ``emu_start``, and the removal looks the stepped code up
  through the shadow tables, whose entry for it the re-protect may just have dropped; the #PF
  that lookup raises is swallowed but leaves QEMU's ``old_exception`` set, so the guest's next
  #PF would arrive as a #DF;
* ``ud2`` ends Unicorn's emulation with UC_ERR_INSN_INVALID instead of raising #UD through the
  hook; the engine turns it into the #UD at that instruction.

* Unicorn performs no I/O-permission check at all (its ``gen_check_io`` returns at once:
  "Unicorn: allow all I/O instructions"), so IN/OUT at CPL 3 would simply run. Each code page
  is scanned when the guest first executes from it (the model engine's scanner,
  :class:`hvm.engine.model.codepages.CodePages`; shadow entries are non-executable until a fetch
  faults, so no code runs unscanned), and a code hook at every IN/OUT/INS/OUTS raises the #GP
  the SDM requires before the instruction executes.

Not modelled: a guest ring 3 (IRET/RETF to an outer level), real mode and virtual-8086 mode,
task switches, LDT segments, string I/O (INS/OUTS), MMIO, interrupt controllers (``set_irq``
records the line only), SYSENTER/SYSEXIT/SYSCALL/SYSRET; each ends the run with an internal
error that names it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as R

from hvm.cpu import CR0_PE, CR0_PG, RFLAGS_IF, RFLAGS_RESERVED, CpuState, DescriptorTable, Segment
from hvm.engine.base import Engine
from hvm.engine.model.codepages import CodePages
from hvm.engine.model.cpuid import CpuidPolicy
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
    parse_descriptor,
)
from hvm.engine.trap import emulate
from hvm.engine.trap.cost import TrapCostModel, format_walk, walk
from hvm.engine.trap.cpu import CR0_MIRRORED, CR4_MIRRORED, REAL_CR0, REAL_CR4, REAL_EFER, TrapCpu
from hvm.engine.trap.decode import MAX_INSN, Insn, MemOperand, decode, unicorn_reg
from hvm.engine.trap.shadow import (
    HV_LINEAR,
    HV_PHYS,
    HV_SIZE,
    REAL_GDT_BASE,
    REAL_IDT_BASE,
    HypervisorMemory,
    descriptor_dpl,
    trap_shadow_mmu,
    write_shadow_gdt,
)
from hvm.errors import EngineUnavailable
from hvm.exits import Exit, ExitKind
from hvm.vmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, Region
from hvm.vtx.paging import Access, PageFault, PagingRegs, PfError, translate
from hvm.vtx.qualification import InterruptionType

WATCH_INTERVAL = 0.02  # seconds an emulation may run before host signals are looked at
RFLAGS_IOPL = 3 << 12
RFLAGS_VM = 1 << 17
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
_INT_NAMES = {3: "int3", 4: "into"}
# INT3 and INTO are software exceptions, INT n a software interrupt (SDM Vol. 3C 25.8.3).
_SOFTWARE_TYPE = {3: InterruptionType.SOFTWARE_EXCEPTION, 4: InterruptionType.SOFTWARE_EXCEPTION}
_IO_OPCODES = frozenset(b"\xe4\xe5\xe6\xe7\xec\xed\xee\xef\x6c\x6d\x6e\x6f")  # IN, OUT, INS, OUTS
_PREFIX_BYTES = b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67"


@dataclass
class VirtualCpu:
    """The machine state the guest believes it has; the real CPU never holds it."""

    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=0, present=0, unusable=1))
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=0))
    if_flag: bool = False
    iopl: int = 0
    cpl: int = 0  # the guest kernel's ring; only ring 0 is modelled
    msrs: dict[int, int] = field(default_factory=dict)
    dr: list[int] = field(default_factory=lambda: [0] * 8)


@dataclass(frozen=True)
class Trap:
    """What the real CPU reported: an exception vector at RIP (past the instruction for INT n)."""

    vector: int
    rip: int
    error_code: int | None = None
    cr2: int = 0
    software: bool = False


class TrapEngine(Engine):
    """The trap-and-emulate engine (see the module docstring)."""

    name = "trap"

    def __init__(self, memory: GuestMemory, *, cost: TrapCostModel | None = None) -> None:
        if len(memory.regions) != 1 or memory.regions[0].gpa != 0:
            raise EngineUnavailable("the trap engine supports guest RAM as one region at address 0")
        self.memory = memory
        self.cost = cost or TrapCostModel()
        self.v = VirtualCpu()
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.regions[0].host_addr)
        self.hv = HypervisorMemory()
        uc.mem_map_ptr(HV_PHYS, HV_SIZE, UC_PROT_ALL, self.hv.host_addr)
        self.cpu = TrapCpu(uc)
        self.mmu = trap_shadow_mmu(self.hv, memory, self._paging_regs, self._flush_tlb)
        self.cpuid = CpuidPolicy()
        self.code = CodePages(self._frame_bytes, self._add_io_hook, uc.hook_del)
        self.trace: Callable[[str], None] | None = None
        self.traps: Counter[str] = Counter()
        self.overhead_cycles = 0
        self._guest_dpl: dict[int, int] = {}
        self._trap: Trap | None = None
        self._complete: Callable[[bytes], None] | None = None
        self._read_size = 0
        self._read_data = b""
        self._reprotect: int | None = None  # a protected frame the next single step may write
        self._stepped = 0  # instructions the single step's code hook has seen
        self._halted = False
        self._shutdown: Exit | None = None
        self._hook_error: BaseException | None = None
        self._irq_lines: dict[int, bool] = {}
        self._kicked = False
        self._running = False
        self._entries = 0
        self._closed = False
        self._watcher: threading.Thread | None = None
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, R.UC_X86_INS_CPUID)

    # --- the Engine interface --------------------------------------------------------------
    def set_state(self, state: CpuState) -> None:
        if not state.cr0 & CR0_PE or state.rflags & RFLAGS_VM:
            raise EngineUnavailable(
                "the trap engine deprivileges protected-mode guests only "
                "(real and virtual-8086 mode are not modelled)"
            )
        v = self.v
        v.cr0, v.cr3, v.cr4, v.efer = state.cr0, state.cr3, state.cr4, state.efer
        v.gdt, v.idt = replace(state.gdt), replace(state.idt)
        v.ldt, v.tr = replace(state.ldt), replace(state.tr)
        v.cpl = 0
        self._complete, self._halted, self._shutdown, self._reprotect = None, False, None, None
        self.mmu.drop(count=False)
        self.rebuild_gdt()
        self.load_virtual(state)

    def get_state(self) -> CpuState:
        """The state the guest believes it is in (virtual CRs, its own selectors and tables)."""
        real = self.cpu.store()
        v = self.v
        state = CpuState(regs=real.regs, rip=real.rip)
        state.rflags = (
            real.rflags & ~(RFLAGS_IF | RFLAGS_IOPL) | (RFLAGS_IF if v.if_flag else 0) | v.iopl << 12
        )
        for name in _SEGMENTS:
            setattr(state, name, self._virtual_segment(getattr(real, name), name))
        state.gdt, state.idt = replace(v.gdt), replace(v.idt)
        state.ldt, state.tr = replace(v.ldt), replace(v.tr)
        state.cr0, state.cr3, state.cr4, state.efer = v.cr0, v.cr3, v.cr4, v.efer
        return state

    def run(self) -> Exit:
        if self._kicked:
            self._kicked = False
            return Exit(ExitKind.INTR)
        if self._shutdown is not None:
            return self._shutdown
        complete, self._complete = self._complete, None
        if complete is not None:
            data, self._read_data = self._read_data, b""
            complete(data if len(data) == self._read_size else b"\xff" * self._read_size)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="hvm-trap-watch", daemon=True)
            self._watcher.start()
        while True:
            if self._halted:
                while not self._kicked:  # no interrupt controller: only the host ends a halt
                    time.sleep(0.02)
                self._kicked = False
                return Exit(ExitKind.INTR)
            trap, error = self._execute()
            if self._hook_error is not None:
                exc, self._hook_error = self._hook_error, None
                raise exc
            if error is not None:
                if error.errno != UC_ERR_INSN_INVALID:
                    rip = self.uc.reg_read(R.UC_X86_REG_RIP)
                    return Exit(
                        ExitKind.INTERNAL_ERROR,
                        qualification=error.errno,
                        detail=f"trap engine: emulator stopped at RIP {rip:#x}: {error}",
                    )
                trap = Trap(UD, self.uc.reg_read(R.UC_X86_REG_RIP))  # QEMU's #UD, at the instruction
            if trap is not None:
                self.cpu.end_exception()
                exit_ = self._handle(trap)
                if exit_ is not None:
                    return exit_
                continue
            if self._kicked:
                self._kicked = False
                return Exit(ExitKind.INTR)

    def complete_read(self, data: bytes) -> None:
        if self._complete is None or not self._read_size:
            raise ValueError("complete_read without a pending read exit")
        if len(data) != self._read_size:
            raise ValueError(f"read completion of {len(data)} bytes, exit wants {self._read_size}")
        self._read_data = bytes(data)

    def set_irq(self, line: int, level: bool) -> None:
        self._irq_lines[line] = level  # no interrupt controller is modelled: recorded only

    def kick(self) -> None:
        # Called from a signal handler: nothing here may take a lock the interrupted code holds.
        self._kicked = True
        try:
            self.uc.emu_stop()
        except UcError:
            pass

    def map_region(self, region: Region) -> None:
        raise EngineUnavailable("the trap engine supports guest RAM only (no further memory regions)")

    def harvest_dirty(self, region: Region) -> list[int]:
        raise EngineUnavailable("the trap engine does not log dirty pages")

    def capabilities(self) -> dict[str, bool]:
        return {
            "vtx": False,
            "ring_deprivileging": True,
            "shadow_paging": True,
            "cpuid_faulting": True,
            "guest_ring3": False,
            "mmio": False,
            "irqchip": False,
            "interrupt_injection": False,
        }

    def counters(self) -> dict[str, int]:
        out = {
            "traps": sum(self.traps.values()),
            "modelled_overhead_cycles": self.overhead_cycles,
            "modelled_cycles_per_trap": self.cost.per_trap,
        }
        out.update({f"trap.{what}": n for what, n in sorted(self.traps.items())})
        stats = self.mmu.stats
        out.update(
            {
                "shadow_fills": stats.fills,
                "shadow_guest_faults": stats.guest_faults,
                "shadow_protected_writes": stats.protected_writes,
                "shadow_drops": stats.drops,
                "shadow_invlpg": stats.invlpg,
                "shadow_cr3_switches": stats.cr3_switches,
                "shadow_root_hits": stats.root_hits,
                "shadow_root_misses": stats.root_misses,
                "shadow_zapped": stats.zapped,
            }
        )
        return out

    def close(self) -> None:
        self._closed = True
        if getattr(self, "uc", None) is not None:
            self.uc.emu_stop()
            for base, size in ((0, self.memory.size), (HV_PHYS, HV_SIZE)):
                try:
                    self.uc.mem_unmap(base, size)
                except UcError:
                    pass
        self.hv.close()

    # --- running ------------------------------------------------------------------------------
    def _execute(self) -> tuple[Trap | None, UcError | None]:
        """Run the guest until the real CPU traps (or the watcher stops it)."""
        uc = self.uc
        self._trap = None
        step, self._reprotect = self._reprotect, None
        self._entries += 1
        self._running = True
        error = None
        step_hook = None
        try:
            if self._kicked:
                return None, None
            rip = uc.reg_read(R.UC_X86_REG_RIP)
            if step is not None:
                self._stepped = 0
                step_hook = uc.hook_add(UC_HOOK_CODE, self._on_step, None, 1, 0)
                # Translated code calls a hook only if it was translated after the hook was added:
                # drop what is cached from this instruction on, or the step runs a whole block.
                # (The lookup of this instruction goes through the shadow, which maps it.)
                uc.ctl_remove_cache(rip, rip + 1)
            uc.emu_start(rip, 0, 0, 0)
        except UcError as exc:
            error = exc
        finally:
            self._running = False
            if step_hook is not None:
                # Removed here, while the shadow still maps the stepped code: Unicorn invalidates
                # the code translated under a hook by looking its linear address up through the
                # (shadow) page tables (uc_invalidate_tb), and a #PF there is swallowed but leaves
                # QEMU's old_exception at 14, so the guest's next #PF would be raised as a #DF.
                # That is why the step is not emu_start's count=1: Unicorn removes its counting
                # hook only at the next emu_start, after the re-protect below has dropped the
                # code page's shadow entry (a write to the top-level table drops every entry).
                uc.hook_del(step_hook)
                if self._trap is None:  # no exception is in flight (a trap's is ended by run())
                    self.cpu.end_exception()
            if step is not None:
                self._after_protected_write(step)
        return self._trap, error

    def _on_step(self, uc: Uc, address: int, size: int, _: object) -> None:
        """The single step: stop before the instruction after the one that writes a protected page."""
        self._stepped += 1
        if self._stepped > 1:
            uc.emu_stop()

    def _watch(self) -> None:
        """Stop an emulation that has run for WATCH_INTERVAL, so host signals (the VMM's timer,
        which calls kick()) reach Python: they cannot while Unicorn runs native code."""
        seen = -1
        while not self._closed:
            time.sleep(WATCH_INTERVAL)
            entries = self._entries
            if self._running and (self._kicked or entries == seen):
                try:
                    self.uc.emu_stop()
                except UcError:
                    pass
            seen = entries

    def _on_interrupt(self, uc: Uc, intno: int, _: object) -> None:
        """The real CPU raised an exception (or executed INT n): the trap to the hypervisor."""
        try:
            cpu = self.cpu
            cpu.sync()
            software = cpu.exception_is_int
            code = cpu.error_code if intno in ERROR_CODE_VECTORS and not software else None
            cr2 = uc.reg_read(R.UC_X86_REG_CR2) if intno == PF and not software else 0
            self._trap = Trap(intno, uc.reg_read(R.UC_X86_REG_RIP), code, cr2, software)
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self._hook_error = exc
        uc.emu_stop()

    def _on_cpuid(self, uc: Uc, _: object) -> int:
        """CPUID faulting, modelled (see the module docstring): answered here, then skipped."""
        try:
            rip = uc.reg_read(R.UC_X86_REG_RIP)
            leaf, subleaf = (
                uc.reg_read(R.UC_X86_REG_EAX) & 0xFFFF_FFFF,
                uc.reg_read(R.UC_X86_REG_ECX) & 0xFFFF_FFFF,
            )
            values = self.cpuid(leaf, subleaf)
            for reg, value in zip(
                (R.UC_X86_REG_RAX, R.UC_X86_REG_RBX, R.UC_X86_REG_RCX, R.UC_X86_REG_RDX), values, strict=True
            ):
                uc.reg_write(reg, value)
            self._account(
                "cpuid",
                guest=f"executes cpuid at {rip:#x}",
                fault="#GP(0): CPUID faulting at CPL 3",
                decoded="cpuid (2 bytes)",
                effect=f"leaf {leaf:#x}: EAX={values[0]:#x} (the model's CPUID policy)",
                resume=f"RIP {rip:#x} -> {rip + 2:#x}; guest resumes",
            )
        except BaseException as exc:  # noqa: BLE001
            self._hook_error = exc
            uc.emu_stop()
        return 1

    # --- one trap -----------------------------------------------------------------------------
    def _handle(self, trap: Trap) -> Exit | None:
        try:
            if trap.vector == PF and not trap.software:
                return self._page_fault(trap)
            if trap.software:
                name = _INT_NAMES.get(trap.vector, f"int {trap.vector:#x}")
                return self._reflect(
                    trap,
                    Event(trap.vector, _SOFTWARE_TYPE.get(trap.vector, InterruptionType.SOFTWARE_INTERRUPT)),
                    name,
                    guest=f"executes {name} at CPL 3",
                    fault=f"software interrupt {trap.vector:#x} (Unicorn reports it before the "
                    "gate's DPL check)",
                )
            if trap.vector in (GP, UD):
                return emulate.privileged(self, trap)
            return self._reflect(
                trap,
                Event(trap.vector, error_code=trap.error_code),
                describe(Event(trap.vector)),
                guest="raises an exception",
            )
        except Fault as fault:  # an emulation step faulted as the guest's own access would
            return self.deliver_exit(fault.event, trap.rip, describe(fault.event))
        except GuestMemoryError as error:  # the guest's tables point outside its RAM
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"trap engine: {error} (trap at {trap.rip:#x})")

    def _page_fault(self, trap: Trap) -> Exit | None:
        la, code = trap.cr2, trap.error_code or 0
        if la >= HV_LINEAR:
            return Exit(
                ExitKind.INTERNAL_ERROR,
                addr=la,
                detail=f"trap engine: the guest touched {la:#x}, in the hypervisor's linear region",
            )
        write, fetch = bool(code & PfError.WRITE), bool(code & PfError.FETCH)
        vpage = la & ~(PAGE_SIZE - 1)
        if code & PfError.PRESENT and write:
            frame = self.mmu.frame_of(la)
            why = self.mmu.protected.get(frame) if frame is not None else None
            if why is not None:
                # A write to a write-protected page table (or GDT) page: let exactly this instruction
                # write it, then re-protect and drop what was derived from it.
                self.mmu.unprotect(frame)
                self._flush_tlb()
                self._reprotect = frame
                self._account(
                    "#PF(write-protected)",
                    guest=f"writes {la:#x}, a {why} page",
                    fault=f"#PF({code:#x}): the shadow entry is read-only",
                    decoded="shadow walk",
                    effect=f"single-step the write, then re-protect frame {frame:#x} and drop "
                    "the shadow entries walked through it",
                    resume=f"RIP {trap.rip:#x} (re-executed)",
                )
                return None
            if frame is not None and self.code.is_clean(frame) and self.code.write(vpage, frame):
                self._flush_tlb()  # other linear pages may still execute it unchecked
        access = Access.FETCH if fetch else Access.WRITE if write else Access.READ
        result = self.mmu.fill(la, access)
        if result.not_ram is not None:
            return Exit(
                ExitKind.INTERNAL_ERROR,
                addr=result.not_ram,
                detail=f"trap engine: guest-physical {result.not_ram:#x} is not RAM (MMIO is not supported)",
            )
        if result.fault is None:
            if fetch:
                self.code.fetch(vpage, result.frame)  # scan the code page: hooks at its I/O instructions
            verb = "fetches from" if fetch else "writes" if write else "reads"
            self._account(
                "#PF(hidden)",
                guest=f"{verb} {la:#x}",
                fault=f"#PF({code:#x}) on the shadow page tables",
                decoded="walk the guest's page tables",
                effect="shadow entry installed" + (", code page scanned" if fetch else ""),
                resume=f"RIP {trap.rip:#x} (re-executed)",
            )
            return None
        event = Event(PF, error_code=int(result.fault.error_code), cr2=la)
        return self._reflect(
            trap,
            event,
            "#PF(guest)",
            guest=f"{'writes' if write else 'touches'} {la:#x}",
            fault=f"#PF({code:#x}); the guest's own tables do not map it",
        )

    # --- I/O: Unicorn does not check I/O permission, so the engine does ---------------------
    def _add_io_hook(self, address: int) -> int:
        return self.uc.hook_add(UC_HOOK_CODE, self._on_candidate, None, address, address)

    def _on_candidate(self, uc: Uc, address: int, size: int, _: object) -> None:
        """A possible IN/OUT/INS/OUTS is about to execute. On x86 it #GPs at CPL 3 > IOPL with no
        I/O permission bitmap (the real TR is null); Unicorn would run it, so raise it here."""
        try:
            frame = self.mmu.frame_of(address)
            if frame is None:
                return
            offset = address & (PAGE_SIZE - 1)
            code = self.memory.read(frame + offset, min(MAX_INSN, PAGE_SIZE - offset))
            opcode = code.lstrip(_PREFIX_BYTES)[:1]
            if not opcode or opcode[0] not in _IO_OPCODES:
                return
            self.cpu.sync()
            insn = (
                decode(code, address, self.cpu.code_bits)
                if len(code) == MAX_INSN
                else self.fetch(address - self.cpu.segment_base(1))
            )
            if insn is not None and insn.mnemonic.rstrip("bwd") in ("in", "out", "ins", "outs"):
                self._trap = Trap(GP, address - self.cpu.segment_base(1), 0)
                uc.emu_stop()
        except BaseException as exc:  # noqa: BLE001 - re-raised after emu_start returns
            self._hook_error = exc
            uc.emu_stop()

    def _reflect(
        self, trap: Trap, event: Event, what: str, *, guest: str, fault: str | None = None
    ) -> Exit | None:
        """A guest exception or INT n: through the guest's own IDT, as its ring 0 would take it."""
        self._account(
            what,
            guest=guest,
            fault=fault or describe(event),
            decoded=f"vector {event.vector}",
            effect="delivered through the guest's IDT (frame with its ring-0 CS and SS)",
            resume="RIP <- the guest's handler",
        )
        return self.deliver_exit(event, trap.rip, what)

    def deliver_exit(self, event: Event, rip: int, what: str) -> Exit | None:
        exit_ = self.deliver(event)
        if exit_ is not None:
            return exit_
        return Exit(ExitKind.EXCEPTION, qualification=event.vector, detail=f"{what} at {rip:#x}")

    def _after_protected_write(self, frame: int) -> None:
        self.mmu.reprotect(frame)
        if frame in self.mmu.gdt_frames:
            self.rebuild_gdt()

    # --- accounting and the trace ----------------------------------------------------------------
    def _account(self, what: str, **walk_text: str) -> None:
        self.traps[what] += 1
        self.overhead_cycles += self.cost.per_trap
        if self.trace is not None:
            n = sum(self.traps.values())
            self.trace(format_walk(f"trap {n}: {what}", walk(self.cost, **walk_text)))

    def account(self, what: str, insn: Insn, rip: int, fault: str, effect: str, resume: str) -> None:
        """Used by :mod:`.emulate` for every privileged instruction it emulates."""
        self._account(
            what,
            guest=f"executes {insn.text} at {rip:#x} (CPL 3)",
            fault=fault,
            decoded=f"capstone: {insn.text} ({insn.length} byte{'s' if insn.length > 1 else ''})",
            effect=effect,
            resume=resume,
        )

    # --- event delivery -------------------------------------------------------------------------
    def deliver(self, event: Event) -> Exit | None:
        """Deliver ``event`` to the guest through its IDT; an Exit if that ends the guest."""
        state = self.get_state()
        delivery = Delivery(state, self.read_linear, self.write_linear)
        try:
            delivery.deliver(event)
        except TripleFault as fault:
            self._shutdown = Exit(ExitKind.SHUTDOWN, detail=f"triple fault ({fault})")
            return self._shutdown
        except Unsupported as reason:
            return Exit(ExitKind.INTERNAL_ERROR, detail=f"trap engine: {reason}")
        delivered = delivery.delivered
        if delivered is not None and delivered.vector == PF and delivered.cr2 is not None:
            self.v.cr2 = delivered.cr2
        self.load_virtual(state)
        self._halted = False
        return None

    # --- guest memory through the guest's own paging ------------------------------------------
    def _paging_regs(self) -> PagingRegs:
        v = self.v
        return PagingRegs(v.cr0, v.cr3, v.cr4, v.efer)

    def translate_linear(self, la: int, access: Access) -> int:
        """Guest-physical address of guest-linear ``la`` (supervisor access); raises Fault(#PF)."""
        result = translate(self.memory, self._paging_regs(), la, access, user=False)
        if isinstance(result, PageFault):
            raise Fault(PF, int(result.error_code), cr2=la)
        return result.address

    def read_linear(self, la: int, length: int) -> bytes:
        out = b""
        while length:
            chunk = min(length, PAGE_SIZE - (la & (PAGE_SIZE - 1)))
            try:
                out += self.memory.read(self.translate_linear(la, Access.READ), chunk)
            except GuestMemoryError:
                raise Fault(GP, 0) from None
            la, length = la + chunk, length - chunk
        return out

    def write_linear(self, la: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), PAGE_SIZE - (la & (PAGE_SIZE - 1)))
            gpa = self.translate_linear(la, Access.WRITE)
            if gpa + chunk > self.memory.size:
                raise Fault(GP, 0)
            self.uc.mem_write(gpa, data[:chunk])  # through QEMU: translated code it overwrites goes
            if self.mmu.guest_wrote(gpa) == "gdt":
                self.rebuild_gdt()
            la, data = la + chunk, data[chunk:]

    def fetch(self, rip: int) -> Insn:
        """Decode the guest instruction at ``rip`` (CS-relative), in the CPU's current code size."""
        self.cpu.sync()
        linear = self.cpu.segment_base(1) + rip
        code = b""
        for length in (MAX_INSN, PAGE_SIZE - (linear & (PAGE_SIZE - 1))):  # the 2nd: stop at a page end
            try:
                code = self.read_linear(linear, min(length, MAX_INSN))
                break
            except Fault:
                continue
        insn = decode(code, linear, self.cpu.code_bits)
        if insn is None:
            raise Fault(UD)
        return insn

    def effective_address(self, mem: MemOperand, insn: Insn, rip: int) -> int:
        """The linear address of a memory operand (SDM Vol. 1 3.7.5)."""
        uc = self.uc
        address = mem.disp + (rip + insn.length if mem.rip_relative else 0)
        if mem.base is not None:
            address += uc.reg_read(unicorn_reg(mem.base))
        if mem.index is not None:
            address += uc.reg_read(unicorn_reg(mem.index)) * mem.scale
        address &= (1 << insn.address_bits) - 1
        bits = self.cpu.code_bits
        base = 0 if bits == 64 and mem.segment < 4 else self.cpu.segment_base(mem.segment)
        return (base + address) & ((1 << 64) - 1 if bits == 64 else 0xFFFF_FFFF)

    # --- virtual <-> real ----------------------------------------------------------------------
    def rebuild_gdt(self) -> None:
        """The shadow GDT from the guest's GDT (at LGDT, and after the guest writes its GDT)."""
        gdt = self.v.gdt
        raw = self.read_linear(gdt.base, gdt.limit + 1) if gdt.limit else b""
        write_shadow_gdt(self.hv, raw)
        self._guest_dpl = {
            i: descriptor_dpl(int.from_bytes(raw[8 * i : 8 * i + 8], "little")) for i in range(len(raw) // 8)
        }
        frames = set()
        for offset in range(0, len(raw), PAGE_SIZE):
            frames.add(self.translate_linear(gdt.base + offset, Access.READ) & ~(PAGE_SIZE - 1))
        if raw:
            frames.add(self.translate_linear(gdt.base + len(raw) - 1, Access.READ) & ~(PAGE_SIZE - 1))
        self.mmu.protect_gdt(frames)

    def guest_descriptor(self, selector: int) -> Segment:
        """The guest's GDT descriptor for ``selector`` as a segment cache; raises Fault(#GP(sel))."""
        index = selector & ~7
        if selector & 4 or not selector & 0xFFFC or index + 7 > self.v.gdt.limit:
            raise Fault(GP, selector & 0xFFFC)
        raw = int.from_bytes(self.read_linear(self.v.gdt.base + index, 8), "little")
        return parse_descriptor(raw, selector)

    def real_segment(self, seg: Segment, name: str) -> Segment:
        """What the real CPU holds for a guest segment: DPL 3, and RPL 3 in CS and SS."""
        real = replace(seg, dpl=3 if (seg.s or seg.unusable or name == "ss") else seg.dpl)
        if name in ("cs", "ss"):
            real.selector = seg.selector | 3
        return real

    def _virtual_segment(self, seg: Segment, name: str) -> Segment:
        cpl = self.v.cpl
        if name in ("cs", "ss"):
            return replace(
                seg, selector=seg.selector & ~3 | cpl if seg.selector & ~3 else seg.selector, dpl=cpl
            )
        if seg.unusable:
            return replace(seg)
        return replace(seg, dpl=self._guest_dpl.get(seg.selector >> 3, seg.dpl))

    def real_rflags(self, rflags: int) -> int:
        """The real EFLAGS: the guest's, with IOPL 0 and IF = the virtual IF (mirrored)."""
        value = rflags & ~(RFLAGS_IOPL | RFLAGS_IF | RFLAGS_VM) | RFLAGS_RESERVED
        return value | (RFLAGS_IF if self.v.if_flag else 0)

    def set_if(self, enabled: bool) -> None:
        self.v.if_flag = enabled
        uc = self.uc
        uc.reg_write(R.UC_X86_REG_RFLAGS, self.real_rflags(uc.reg_read(R.UC_X86_REG_RFLAGS)))

    def load_virtual(self, state: CpuState) -> None:
        """Make the real CPU run the guest in ``state`` (a guest view, e.g. after IRET or delivery)."""
        v = self.v
        v.if_flag = bool(state.rflags & RFLAGS_IF)
        v.iopl = state.rflags >> 12 & 3
        real = CpuState(regs=dict(state.regs), rip=state.rip, rflags=self.real_rflags(state.rflags))
        for name in _SEGMENTS:
            setattr(real, name, self.real_segment(getattr(state, name), name))
        real.gdt = DescriptorTable(REAL_GDT_BASE, v.gdt.limit)
        real.idt = DescriptorTable(REAL_IDT_BASE, PAGE_SIZE - 1)
        real.tr = Segment(selector=0, base=0, limit=0, type=11, s=0, present=0, unusable=1)
        real.ldt = Segment(selector=0, base=0, limit=0, type=2, s=0, present=0, unusable=1)
        real.cr0 = REAL_CR0 | v.cr0 & CR0_MIRRORED
        real.cr4 = REAL_CR4 | v.cr4 & CR4_MIRRORED
        real.cr3 = self.mmu.root
        real.efer = REAL_EFER
        self.cpu.load(real)

    def load_segment(self, name: str, seg: Segment) -> None:
        """Load one guest segment register (MOV SS, IRET) through the real CPU's caches."""
        state = self.get_state()
        setattr(state, name, seg)
        self.load_virtual(state)

    def update_real_control(self) -> None:
        """The real CR0/CR4 bits that mirror the guest's, and CR3 = the current shadow root."""
        uc, v = self.uc, self.v
        cr0 = REAL_CR0 | v.cr0 & CR0_MIRRORED
        if uc.reg_read(R.UC_X86_REG_CR0) != cr0:
            uc.reg_write(R.UC_X86_REG_CR0, cr0)
        cr4 = REAL_CR4 | v.cr4 & CR4_MIRRORED
        if uc.reg_read(R.UC_X86_REG_CR4) != cr4:
            uc.reg_write(R.UC_X86_REG_CR4, cr4)
        if uc.reg_read(R.UC_X86_REG_CR3) != self.mmu.root:
            uc.reg_write(R.UC_X86_REG_CR3, self.mmu.root)

    def switch_shadow(self) -> None:
        """CR3 load or paging-mode change: the shadow root cached for the new registers."""
        self.mmu.switch()
        self.update_real_control()

    def _frame_bytes(self, frame: int) -> bytes:
        return self.memory.read(frame, PAGE_SIZE)

    def _flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # --- services for emulate.py ----------------------------------------------------------------
    def pend(self, complete: Callable[[bytes], None], read_size: int = 0) -> None:
        """Finish the current exit at the next run(), with the VMM's read data if any."""
        self._complete, self._read_size = complete, read_size

    def halt(self) -> None:
        self._halted = True

    @property
    def paging(self) -> bool:
        return bool(self.v.cr0 & CR0_PG)
