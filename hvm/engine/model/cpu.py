"""The processor under the model: a Unicorn x86-64 CPU, and its architectural state in and out.

Unicorn's register API reaches the general registers, RIP, RFLAGS, CR0-CR4, DR0-DR7 and MSRs,
but not the *hidden* part of the segment registers: in ``UC_MODE_64`` a write of CS, DS, ES or
SS sets only the selector, never the base, limit and attributes that VM entry loads from the
VMCS guest-state area (SDM Vol. 3C 28.3.1.2). Those live in QEMU's ``CPUX86State``, which
``uc_context_save`` copies out and ``uc_context_restore`` copies back. :class:`UnicornCpu`
edits the descriptor caches in that copy and recomputes QEMU's ``hflags`` (the mode bits its
translator keys on: CPL, 16/32/64-bit code and stack, PE, LMA, ...) the way QEMU's own
``cpu_x86_load_seg_cache`` and ``cpu_x86_update_cr0`` do. The offsets of the few fields used
are those of Unicorn 2.1's ``CPUX86State``; :meth:`UnicornCpu._verify_layout` checks them with
sentinel values at start-up and refuses to run on a build where they differ.

One Unicorn mode serves real, protected and long mode: the CPU is created in ``UC_MODE_64``
(QEMU's x86-64 target; the mode only picks register widths for the API) and the segment
caches, CR0 and EFER decide how code is decoded, exactly as on hardware.
"""

from __future__ import annotations

import ctypes
import struct

from unicorn import Uc
from unicorn import x86_const as R

from hvm.cpu import GPRS, CpuState, DescriptorTable, Segment
from hvm.errors import EngineUnavailable

# --- QEMU's CPUX86State (qemu/target/i386/cpu.h in Unicorn 2.1), byte offsets ---
_REGS = 0  # target_ulong regs[16]: RAX RCX RDX RBX RSP RBP RSI RDI R8..R15
_EIP = 128
_EFLAGS = 136  # without the arithmetic flags and DF, which QEMU keeps apart
_HFLAGS = 176
_SEGS = 184  # SegmentCache segs[6]: ES CS SS DS FS GS
_LDT = 328
_TR = 352
_GDT = 376
_IDT = 400
_CR = 424  # target_ulong cr[9]
_SEG = struct.Struct("<I4xQII")  # SegmentCache: selector, base, limit, flags
_SEG_SIZE = _SEG.size
# Order of QEMU's regs[] for the CpuState names
_QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_GPRS = struct.Struct("<16Q")
SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)
_SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# hflags bits (qemu/target/i386/cpu.h, HF_*_SHIFT)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP, HF_EM, HF_TS = 1 << 9, 1 << 10, 1 << 11
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
_HF_RECOMPUTED = (HF_CPL_MASK | HF_INHIBIT_IRQ | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE
                  | HF_MP | HF_EM | HF_TS | HF_LMA | HF_CS64 | HF_OSFXSR)

# Descriptor-cache flags: the high dword of a descriptor (SDM Vol. 3A 3.4.5), as QEMU keeps it.
_F_TYPE, _F_S, _F_DPL, _F_P = 8, 12, 13, 15
_F_AVL, _F_L, _F_DB, _F_G = 20, 21, 22, 23

MSR_EFER = 0xC0000080
RFLAGS_VM = 1 << 17


def seg_flags(seg: Segment) -> int:
    """QEMU descriptor-cache flags for a segment (only the DPL for an unusable one, as QEMU's null loads)."""
    if seg.unusable:
        return seg.dpl << _F_DPL
    return (seg.type << _F_TYPE | seg.s << _F_S | seg.dpl << _F_DPL | seg.present << _F_P
            | seg.avl << _F_AVL | seg.l << _F_L | seg.db << _F_DB | seg.g << _F_G)


def seg_from_cache(selector: int, base: int, limit: int, flags: int) -> Segment:
    present = flags >> _F_P & 1
    return Segment(
        selector=selector & 0xFFFF, base=base, limit=limit,
        type=flags >> _F_TYPE & 0xF, s=flags >> _F_S & 1, dpl=flags >> _F_DPL & 3,
        present=present, db=flags >> _F_DB & 1, l=flags >> _F_L & 1, g=flags >> _F_G & 1,
        avl=flags >> _F_AVL & 1, unusable=int(not present),
    )


def hflags_for(state: CpuState, old: int) -> int:
    """QEMU's hflags for ``state``: what cpu_x86_load_seg_cache/update_cr0/load_efer would compute."""
    pe = state.cr0 & 1
    lma = bool(state.efer & (1 << 10))
    hf = old & ~_HF_RECOMPUTED
    hf |= pe * HF_PE | (state.cr0 << 8) & (HF_MP | HF_EM | HF_TS)
    if state.cr4 & (1 << 9):
        hf |= HF_OSFXSR
    if lma:
        hf |= HF_LMA
    vm86 = bool(state.rflags & RFLAGS_VM)
    if lma and state.cs.l:
        hf |= HF_CS32 | HF_SS32 | HF_CS64
    else:
        hf |= state.cs.db * HF_CS32 | state.ss.db * HF_SS32
        if not pe or vm86 or not state.cs.db:
            hf |= HF_ADDSEG
        elif state.ds.base | state.es.base | state.ss.base:
            hf |= HF_ADDSEG
    # SDM 28.3.1.2 / QEMU: the CPL is SS.DPL in protected mode, 0 in real mode, 3 in virtual-8086 mode.
    hf |= (3 if vm86 else state.ss.dpl) if pe else 0
    return hf


class UnicornCpu:
    """Architectural state of one Unicorn x86 CPU, through the register API and the saved context."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self._ctx = uc.context_save()
        header = ctypes.c_size_t.from_address(ctypes.cast(self._ctx.context, ctypes.c_void_p).value).value
        # uc_context: size_t context_size; ...; char data[] (the CPUX86State copy) at its end.
        self._base = ctypes.cast(self._ctx.context, ctypes.c_void_p).value + (self._ctx.size - header)
        self._env = (ctypes.c_char * header).from_address(self._base)
        self._view = memoryview(self._env).cast("B")
        self._hflags = ctypes.c_uint32.from_address(self._base + _HFLAGS)
        self._dr, efer = self._verify_layout(header)
        # QEMU keeps error_code, exception_is_int and exception_next_eip just before dr[] (cpu.h)
        self._error_code = ctypes.c_int32.from_address(self._base + self._dr - 16)
        self._efer = ctypes.c_uint64.from_address(self._base + efer)
        self._eflags = ctypes.c_uint64.from_address(self._base + _EFLAGS)
        self._crs = (ctypes.c_uint64 * 9).from_address(self._base + _CR)
        self._gprs = (ctypes.c_uint64 * 16).from_address(self._base + _REGS)
        self._rip = ctypes.c_uint64.from_address(self._base + _EIP)
        self._tables_raw = b""
        self._table_spans: tuple[tuple[int, int], ...] = ()

    def _verify_layout(self, size: int) -> tuple[int, int]:
        """Check the CPUX86State offsets with sentinels; returns the offsets of dr[0] and efer."""
        uc = self.uc
        uc.reg_write(R.UC_X86_REG_RAX, 0x1122_3344_5566_7788)
        uc.reg_write(R.UC_X86_REG_R15, 0x0F0F_0F0F_0F0F_0F0F)
        uc.reg_write(R.UC_X86_REG_RIP, 0xA5A5_5A5A)
        uc.reg_write(R.UC_X86_REG_CS, 0x1234)
        uc.reg_write(R.UC_X86_REG_GDTR, (0, 0x0DEA_D000, 0x27, 0))
        uc.reg_write(R.UC_X86_REG_IDTR, (0, 0x0BEE_F000, 0x3F, 0))
        uc.reg_write(R.UC_X86_REG_CR3, 0x0CAF_E000)
        uc.reg_write(R.UC_X86_REG_DR0, 0xD0D0_D0D0_D0D0)
        uc.msr_write(MSR_EFER, 0xD01)  # SCE | LME | LMA | NXE
        uc.context_update(self._ctx)
        env = bytes(self._view)
        efer = env.find((0xD01).to_bytes(8, "little"), _CR + 9 * 8, _CR + 512)
        ok = (struct.unpack_from("<Q", env, _REGS)[0] == 0x1122_3344_5566_7788
              and struct.unpack_from("<Q", env, _REGS + 15 * 8)[0] == 0x0F0F_0F0F_0F0F_0F0F
              and struct.unpack_from("<Q", env, _EIP)[0] == 0xA5A5_5A5A
              and _SEG.unpack_from(env, _SEGS + SEG_CS * _SEG_SIZE)[0] == 0x1234
              and _SEG.unpack_from(env, _GDT)[1:3] == (0x0DEA_D000, 0x27)
              and _SEG.unpack_from(env, _IDT)[1:3] == (0x0BEE_F000, 0x3F)
              and struct.unpack_from("<Q", env, _CR + 3 * 8)[0] == 0x0CAF_E000)
        dr = env.find((0xD0D0_D0D0_D0D0).to_bytes(8, "little"))
        if not ok or dr < _CR or dr + 64 > size or efer < 0:
            raise EngineUnavailable(
                "this Unicorn build's CPU context layout is not the one the model engine knows "
                "(written for Unicorn 2.1); install unicorn 2.1.x"
            )
        for reg in (R.UC_X86_REG_RAX, R.UC_X86_REG_R15, R.UC_X86_REG_RIP, R.UC_X86_REG_CR3, R.UC_X86_REG_DR0):
            uc.reg_write(reg, 0)
        uc.msr_write(MSR_EFER, 0)
        return dr, efer

    # --- the saved copy: sync() once, then read fields from it --------------------------
    def sync(self) -> None:
        """Refresh the context copy from the live CPU (a 5.5-KiB memcpy, ~0.3 us)."""
        self.uc.context_update(self._ctx)

    @property
    def hflags(self) -> int:
        """QEMU hflags (mode bits) as of the last :meth:`sync`."""
        return self._hflags.value

    @property
    def cpl(self) -> int:
        return self._hflags.value & HF_CPL_MASK

    @property
    def code_bits(self) -> int:
        """Default operand size of the code being executed: 16, 32 or 64."""
        hf = self._hflags.value
        return 64 if hf & HF_CS64 else 32 if hf & HF_CS32 else 16

    def cr(self, number: int) -> int:
        return self._crs[number]

    def gpr(self, number: int) -> int:
        """General register ``number`` (0 = RAX ... 15 = R15, SDM order). In a hook QEMU has
        written its registers back to the CPU state before calling out, so the copy is exact."""
        return self._gprs[number]

    @property
    def rip(self) -> int:
        return self._rip.value

    @property
    def efer(self) -> int:
        return self._efer.value

    @property
    def system_flags(self) -> int:
        """RFLAGS without the arithmetic flags and DF (IF, IOPL, VM, ... are exact)."""
        return self._eflags.value

    @property
    def error_code(self) -> int:
        """The error code QEMU recorded with the exception it raised last (env->error_code)."""
        return self._error_code.value & 0xFFFF_FFFF

    def segment(self, index: int) -> Segment:
        """A segment register's cache (ES CS SS DS FS GS = 0..5)."""
        return seg_from_cache(*_SEG.unpack_from(self._view, _SEGS + index * _SEG_SIZE))

    def segment_base(self, index: int) -> int:
        return _SEG.unpack_from(self._view, _SEGS + index * _SEG_SIZE)[1]

    def tables(self) -> tuple[tuple[int, int], tuple[int, int], Segment, Segment]:
        """(GDTR base, limit), (IDTR base, limit), LDTR and TR."""
        _, gbase, glimit, _ = _SEG.unpack_from(self._view, _GDT)
        _, ibase, ilimit, _ = _SEG.unpack_from(self._view, _IDT)
        return ((gbase, glimit), (ibase, ilimit), seg_from_cache(*_SEG.unpack_from(self._view, _LDT)),
                seg_from_cache(*_SEG.unpack_from(self._view, _TR)))

    def table_spans(self) -> tuple[tuple[int, int], ...]:
        """(first, last) byte of the GDT, IDT, LDT and TSS (base and base + limit of GDTR, IDTR,
        LDTR and TR) as of the last :meth:`sync`: :meth:`tables` without building segments."""
        raw = self._view[_LDT:_IDT + _SEG_SIZE].tobytes()  # LDTR, TR, GDTR, IDTR lie side by side
        if raw != self._tables_raw:
            bounds = (_SEG.unpack_from(raw, offset - _LDT)[1:3] for offset in (_GDT, _IDT, _LDT, _TR))
            self._table_spans = tuple((base, base + limit) for base, limit in bounds)
            self._tables_raw = raw
        return self._table_spans

    # --- whole state -------------------------------------------------------------------
    def load(self, state: CpuState) -> None:
        """Make ``state`` the CPU's architectural state (what VM entry does with the guest-state area)."""
        uc = self.uc
        uc.reg_write(R.UC_X86_REG_CR4, state.cr4)
        uc.reg_write(R.UC_X86_REG_CR3, state.cr3)
        uc.reg_write(R.UC_X86_REG_CR0, state.cr0)
        uc.reg_write(R.UC_X86_REG_RFLAGS, state.rflags)  # cpu_load_eflags splits out CC and DF
        uc.context_update(self._ctx)
        view = self._view
        _GPRS.pack_into(view, _REGS, *(state.regs[name] & 0xFFFF_FFFF_FFFF_FFFF for name in _QEMU_GPR_ORDER))
        struct.pack_into("<Q", view, _EIP, state.rip)
        # EFER goes in directly: WRMSR cannot change LMA, which VM entry loads (SDM 28.3.2.1).
        self._efer.value = state.efer
        for index, name in enumerate(_SEG_NAMES):
            seg: Segment = getattr(state, name)
            _SEG.pack_into(view, _SEGS + index * _SEG_SIZE, seg.selector, seg.base, seg.limit, seg_flags(seg))
        for offset, seg in ((_LDT, state.ldt), (_TR, state.tr)):
            _SEG.pack_into(view, offset, seg.selector, seg.base, seg.limit, seg_flags(seg))
        _SEG.pack_into(view, _GDT, 0, state.gdt.base, state.gdt.limit, 0)
        _SEG.pack_into(view, _IDT, 0, state.idt.base, state.idt.limit, 0)
        self._hflags.value = hflags_for(state, self._hflags.value)
        uc.context_restore(self._ctx)

    def store(self) -> CpuState:
        """The CPU's architectural state (what a VM exit saves into the guest-state area)."""
        uc = self.uc
        state = CpuState()
        cr0, cr3, cr4 = (uc.reg_read(r) for r in (R.UC_X86_REG_CR0, R.UC_X86_REG_CR3, R.UC_X86_REG_CR4))
        efer = uc.msr_read(MSR_EFER)
        rflags = uc.reg_read(R.UC_X86_REG_RFLAGS)
        uc.context_update(self._ctx)
        view = self._view
        values = dict(zip(_QEMU_GPR_ORDER, _GPRS.unpack_from(view, _REGS), strict=True))
        state.regs = {name: values[name] for name in GPRS}
        state.rip = struct.unpack_from("<Q", view, _EIP)[0]
        state.rflags = rflags
        for index, name in enumerate(_SEG_NAMES):
            setattr(state, name, self.segment(index))
        state.ldt = seg_from_cache(*_SEG.unpack_from(view, _LDT))
        state.tr = seg_from_cache(*_SEG.unpack_from(view, _TR))
        _, base, limit, _ = _SEG.unpack_from(view, _GDT)
        state.gdt = DescriptorTable(base, limit)
        _, base, limit, _ = _SEG.unpack_from(view, _IDT)
        state.idt = DescriptorTable(base, limit)
        state.cr0, state.cr3, state.cr4, state.efer = cr0, cr3, cr4, efer
        return state

