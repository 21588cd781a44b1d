"""Experiment `popek-goldberg`: is every sensitive instruction privileged? Decided by running them.

Popek and Goldberg (CACM 1974): a machine can be virtualized by trap-and-emulate if its
*sensitive* instructions (those that change privileged state -- control-sensitive -- or whose
results depend on it or on the mode -- behaviour-sensitive) are a subset of its *privileged*
instructions (those that trap in user mode and not in supervisor mode). Robin and Irvine
(USENIX Security 2000) listed 17 x86 instructions that break this; the chapter names SGDT,
SIDT, SMSW and POPF.

Nothing here is a table of answers. Each catalogue entry is a few lines of assembly (one or
more *variants* of the instruction under test); the harness executes every variant on the
emulated CPU (Unicorn) at CPL 0 and at CPL 3 of 32-bit protected mode with paging, each in two
machine states S and S' that differ only in privileged state (GDTR/IDTR bases, LDTR, TR,
CR0.MP/TS, IF, an MSR), and observes:

* **fault**: the exception the CPU raised, if any;
* **result**: general registers, arithmetic flags, EIP, the data and stack bytes it wrote;
* **privileged state**: CR0/CR3/CR4, GDTR, IDTR, LDTR, TR, IF, IOPL, CPL, IA32_SYSENTER_ESP,
  a halted CPU, port I/O done, and a stale-TLB probe (a page whose PTE was changed without
  invalidation: only a TLB flush makes the new mapping visible).

Then: *privileged* = every variant runs at CPL 0 and faults at CPL 3; *control-sensitive* =
some run that does not fault changes privileged state; *behaviour-sensitive* = the result (or
whether it faults) differs between CPL 0 and CPL 3 -- not counting the trap of a privileged
instruction -- or between S and S' at the same CPL.

Three machines get the verdict "sensitive is a subset of privileged":

* **legacy x86**: the runs above;
* **x86 with CR4.UMIP** (SDM Vol. 3A 2.5): the same runs with CR4.UMIP = 1, where SGDT, SIDT,
  SLDT, SMSW and STR fault at CPL > 0;
* **x86 under VT-x**: each sensitive instruction runs in the VT-x model engine at the guest's
  own ring 0 (VMX non-root) with a VMCS that makes the hypervisor-owned state exit or read
  from shadows: descriptor-table, HLT, unconditional I/O, INVLPG and CR3 exiting, an all-ones
  MSR bitmap, CR0/CR4 guest/host masks with read shadows over a CR0 whose NE bit the host
  forces (IA32_VMX_CR0_FIXED0). It passes if it exits (traps to the VMM) or gives exactly the
  result of bare-metal CPL 0 in the same state.

Where Unicorn 2.1.4 does not behave as the SDM says, the harness compensates and the row says
so (``compensated``): it performs no I/O-permission check (``gen_check_io`` returns at once:
"Unicorn: allow all I/O instructions"), so IN/OUT at CPL 3 > IOPL get their #GP from a code
hook; it has no UMIP check at all, so SGDT/SIDT/SLDT/SMSW/STR at CPL 3 with CR4.UMIP get theirs
the same way; and it reports INT n to the interrupt hook before the gate checks, so the harness
performs the delivery (the SDM procedure of :class:`hvm.engine.model.events.Delivery`).
A far CALL through a call gate from CPL 3 to ring 0 aborts the whole process inside Unicorn
2.1.4 (SIGABRT, observed), so CALL is probed as a far call to a conforming segment, which pushes
the caller's CS -- with the caller's CPL in its RPL.
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvm.lab.base import ChapterFigure, Comparison, Experiment, Progress, Row, save_figure

SECTION = "原理与机制 › 经典构想及其缺陷"
FIGURES = [
    ChapterFigure(
        "legacy_subset",
        "sensitive ⊆ privileged on x86 (1 = holds)",
        0,
        "verdict",
        SECTION,
        "x86 架构有一个致命缺陷：它违反了这一条件。它拥有一类既敏感*又非*特权的指令",
    ),
    ChapterFigure(
        "named_unprivileged",
        "the chapter's sensitive-but-unprivileged examples (SGDT, SIDT, SMSW, POPF) found so",
        4,
        "instructions",
        SECTION,
        "`SGDT`/`SIDT`……`SMSW`……`POPF`：该指令试图更改系统标志。在用户模式下，它不会触发陷阱，而只是静默地无法修改特权标志",
    ),
    ChapterFigure(
        "vtx_subset",
        "sensitive ⊆ privileged (trapping) under VT-x (1 = holds)",
        1,
        "verdict",
        "原理与机制 › 一种新的虚拟化架构",
        "至关重要的是，这个列表可以包括所有那些讨厌的敏感但非特权的指令……"
        "Popek 和 Goldberg 提出的要求最终通过硬件指令得以满足",
    ),
]

# --- the machine the catalogue runs on -------------------------------------------------------
MEM = 4 << 20
GDT0, GDT1 = 0x1000, 0x2000  # S and S': same descriptors, different GDTR base
IDT0, IDT1 = 0x3000, 0x3800
TSS0, TSS1, TSS2 = 0x4000, 0x4100, 0x4200
LDT_BASE = 0x5000
PD, PT = 0x8000, 0x9000
CODE = 0x10000
HANDLER = CODE + 0x800  # INT 0x80 lands here
DATA = 0x20000  # the data area a snippet may read and write (compared)
DATA_SIZE = 64
TLB_SLOT = 0x20100  # where the post-probe stores what the stale-TLB page reads
SAVE_SLOT = 0x20104  # where the probes keep EAX
STACK_TOP = 0x2F000
STACK_SEEN = 64  # bytes below the initial ESP that are compared
RING0_STACK = 0x28000  # TSS.ESP0
PROBE = 0x300000  # the stale-TLB page: mapped to A, remapped to B without invalidation
PAGE_A, PAGE_B = 0x300000, 0x301000
PROBE_PTE = PT + (PROBE >> 12) * 4
SYSENTER_ESP = 0x175
SYSENTER_VALUES = (0x1111, 0x2222)  # S, S'

SEL_CODE0, SEL_DATA0, SEL_CODE3, SEL_DATA3 = 0x08, 0x10, 0x18, 0x20
SEL_TSS0, SEL_LDT0, SEL_CONF = 0x28, 0x30, 0x40
SEL_TSS1, SEL_LDT1, SEL_TSS_FREE = 0x48, 0x50, 0x58

CR0_PE, CR0_MP, CR0_TS, CR0_ET, CR0_NE, CR0_PG = 1, 2, 8, 0x10, 0x20, 1 << 31
CR4_UMIP = 1 << 11
EFLAGS_IF, EFLAGS_IOPL = 1 << 9, 3 << 12
CR0_S = CR0_PE | CR0_ET | CR0_PG
CR0_S1 = CR0_S | CR0_MP | CR0_TS
GP, UD, PF = 13, 6, 14
UMIP_MNEMONICS = ("sgdt", "sidt", "sldt", "smsw", "str")
IO_MNEMONICS = ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd")
_ARITH = 0x8D5  # CF PF AF ZF SF OF, and DF (0x400)
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")


@dataclass(frozen=True)
class Entry:
    """One catalogue entry: the instruction under test, in one or more variants."""

    mnemonic: str
    variants: tuple[str, ...]
    robin_irvine: bool = False  # one of the 17 of Robin and Irvine (USENIX Security 2000)
    named: bool = False  # named by the chapter


# Each variant: lines of Intel-syntax assembly; the instruction under test is the one that matters,
# the others set it up (constants only, nothing sensitive before it).
CATALOGUE: tuple[Entry, ...] = (
    Entry("SGDT", ("sgdt [0x20000]",), True, True),
    Entry("SIDT", ("sidt [0x20000]",), True, True),
    Entry("SLDT", ("sldt eax",), True),
    Entry("SMSW", ("smsw ax",), True, True),  # r16: SMSW r32 leaves bits 31:16 undefined (SDM Vol. 2)
    Entry("STR", ("str eax",), True),
    Entry("PUSHF", ("pushfd\npop eax",), True),
    Entry("POPF", ("pushfd\nxor dword ptr [esp], 0x200\npopfd",), True, True),
    Entry("LAR", ("mov ebx, 0x10\nlar eax, ebx",), True),
    Entry("LSL", ("mov ebx, 0x10\nlsl eax, ebx",), True),
    Entry("VERR", ("mov ebx, 0x10\nverr bx",), True),
    Entry("VERW", ("mov ebx, 0x10\nverw bx",), True),
    Entry("POP", ("push 0x10\npop ds", "push 0x23\npop ds"), True),
    Entry("PUSH", ("push cs\npop eax",), True),
    Entry("CALL", ("lcall 0x40, OFFSET 1f\n1:",), True),
    Entry("JMP", ("ljmp 0x08, OFFSET 1f\n1:", "ljmp 0x1b, OFFSET 1f\n1:"), True),
    Entry("INT n", ("int 0x80",), True),
    Entry("RET", ("push 0x23\npush esp\npush 0x1b\npush OFFSET 1f\nretf\n1:",), True),
    Entry("MOV from Sreg", ("mov eax, cs",), True),
    Entry("MOV to Sreg", ("mov eax, 0x10\nmov ds, eax", "mov eax, 0x23\nmov ds, eax"), True),
    Entry("CLI", ("cli",)),
    Entry("STI", ("sti",)),
    Entry("HLT", ("hlt",)),
    Entry("IN", ("in al, 0x71",)),
    Entry("OUT", ("mov al, 0x5a\nout 0x70, al",)),
    Entry("MOV to CR0", (f"mov eax, {CR0_S ^ CR0_MP:#x}\nmov cr0, eax",)),
    Entry("MOV from CR0", ("mov eax, cr0",)),
    Entry("MOV to CR3", (f"mov eax, {PD:#x}\nmov cr3, eax",)),
    Entry("LGDT", ("lgdt [0x20020]",)),
    Entry("LIDT", ("lidt [0x20028]",)),
    Entry("LLDT", ("mov eax, 0x30\nlldt ax",)),
    Entry("LTR", ("mov eax, 0x58\nltr ax",)),
    Entry("LMSW", (f"mov eax, {(CR0_S ^ CR0_MP) & 0xFFFF:#x}\nlmsw ax",)),
    Entry("CLTS", ("clts",)),
    Entry("RDMSR", (f"mov ecx, {SYSENTER_ESP:#x}\nrdmsr",)),
    Entry("WRMSR", (f"mov ecx, {SYSENTER_ESP:#x}\nmov eax, 0x5555\nxor edx, edx\nwrmsr",)),
    Entry("INVLPG", (f"invlpg [{PROBE:#x}]",)),
    Entry("NOP", ("nop",)),
    Entry("ADD", ("mov eax, 2\nadd eax, 3",)),
    Entry("MOV", ("mov eax, [0x20000]\nmov [0x20004], eax",)),
    Entry("CPUID", ("xor eax, eax\ncpuid",)),
)

# The snippet around each variant: a warm-up fills the TLB for PROBE and rewrites its PTE to page B
# without invalidation; the post-probe stores what PROBE then reads (A if the TLB entry survived).
_PROLOGUE = f"""
        mov [{SAVE_SLOT:#x}], eax
        mov eax, [{PROBE:#x}]
        mov dword ptr [{PROBE_PTE:#x}], {PAGE_B | 7:#x}
        mov eax, [{SAVE_SLOT:#x}]
"""
_EPILOGUE = f"""
post:
        mov [{SAVE_SLOT:#x}], eax
        mov eax, [{PROBE:#x}]
        mov [{TLB_SLOT:#x}], eax
        mov eax, [{SAVE_SLOT:#x}]
end:
        vmcall
        .org {HANDLER - CODE:#x}
handler:
        vmcall
"""


def assembler_available() -> bool:
    return shutil.which("as") is not None and shutil.which("ld") is not None


@functools.cache
def assemble(variant: str) -> tuple[bytes, int, int, int]:
    """The variant inside the snippet frame, linked at CODE: (code, start of the variant, post, end)."""
    source = (
        ".intel_syntax noprefix\n.code32\n.globl _start\n_start:\n"
        + _PROLOGUE
        + "variant:\n"
        + variant
        + "\n"
        + _EPILOGUE
    )
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = Path(tmp, "p.s"), Path(tmp, "p.o"), Path(tmp, "p.bin")
        src.write_text(source)
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True)
        symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
        subprocess.run(
            ["ld", "-m", "elf_i386", "-Ttext", hex(CODE), "--oformat", "binary", "-o", str(out), str(obj)],
            check=True,
            capture_output=True,
        )
        code = out.read_bytes()
    offsets = {
        parts[2]: int(parts[0], 16)
        for parts in (line.split() for line in symbols.splitlines())
        if len(parts) == 3
    }
    return code, CODE + offsets["variant"], CODE + offsets["post"], CODE + offsets["end"]


# --- the machine image -------------------------------------------------------------------------


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16 & 0xF) << 48
        | flags << 52
        | (base >> 24 & 0xFF) << 56
    )


def _gate(selector: int, offset: int, access: int) -> int:
    return offset & 0xFFFF | selector << 16 | access << 40 | (offset >> 16) << 48


GDT_ENTRIES = (
    0,
    _descriptor(0, 0xFFFFF, 0x9A, 0xC),  # 0x08 code, DPL 0
    _descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x10 data, DPL 0
    _descriptor(0, 0xFFFFF, 0xFA, 0xC),  # 0x18 code, DPL 3
    _descriptor(0, 0xFFFFF, 0xF2, 0xC),  # 0x20 data, DPL 3
    _descriptor(TSS0, 0x67, 0x8B, 0x0),  # 0x28 32-bit TSS, busy (S's TR)
    _descriptor(LDT_BASE, 0xF, 0x82, 0x0),  # 0x30 LDT (S's LDTR)
    0,  # 0x38 unused (a call gate to ring 0 from CPL 3 aborts Unicorn 2.1.4: see the docstring)
    _descriptor(0, 0xFFFFF, 0x9E, 0xC),  # 0x40 conforming code, DPL 0
    _descriptor(TSS1, 0x67, 0x8B, 0x0),  # 0x48 TSS, busy (S''s TR)
    _descriptor(LDT_BASE + 0x10, 0xF, 0x82, 0x0),  # 0x50 LDT (S''s LDTR)
    _descriptor(TSS2, 0x67, 0x89, 0x0),  # 0x58 TSS, available (for LTR)
)


def _image(state1: bool) -> list[tuple[int, bytes]]:
    """(address, bytes) to write for state S (False) or S' (True)."""
    gdt = struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)
    idt = bytearray(0x800)
    struct.pack_into("<Q", idt, 0x80 * 8, _gate(SEL_CODE0, HANDLER, 0xEE))  # interrupt gate, DPL 3
    tss = bytearray(0x68)
    struct.pack_into("<IIH", tss, 4, RING0_STACK, SEL_DATA0, 0)  # ESP0, SS0
    struct.pack_into("<H", tss, 0x66, 0x68)  # I/O map base past the limit: no bitmap
    pd = struct.pack("<I", PT | 7) + bytes(4092)
    pt = struct.pack("<1024I", *((i << 12) | 7 for i in range(1024)))
    data = bytearray(DATA_SIZE)
    struct.pack_into("<HI", data, 0x20, len(gdt) - 1, GDT0)  # LGDT's operand
    struct.pack_into("<HI", data, 0x28, 0x7FF, IDT0)  # LIDT's operand
    return [
        (GDT0, gdt),
        (GDT1, gdt),
        (IDT0, bytes(idt)),
        (IDT1, bytes(idt)),
        (TSS0, bytes(tss)),
        (TSS1, bytes(tss)),
        (TSS2, bytes(tss)),
        (PD, pd),
        (PT, pt),
        (DATA, bytes(data)),
        (PAGE_A, b"\xaa" * 4),
        (PAGE_B, b"\xbb" * 4),
    ]


def _state(cpl: int, state1: bool, umip: bool):
    from hvm.cpu import CpuState, DescriptorTable, Segment, flat_segment

    state = CpuState()
    code_sel, data_sel = (SEL_CODE3 | 3, SEL_DATA3 | 3) if cpl else (SEL_CODE0, SEL_DATA0)
    state.cs = flat_segment(code_sel, code=True, dpl=cpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, flat_segment(data_sel, code=False, dpl=cpl))
    tss, ldt = (TSS1, LDT_BASE + 0x10) if state1 else (TSS0, LDT_BASE)
    state.tr = Segment(
        selector=SEL_TSS1 if state1 else SEL_TSS0, base=tss, limit=0x67, type=11, s=0, present=1
    )
    state.ldt = Segment(
        selector=SEL_LDT1 if state1 else SEL_LDT0, base=ldt, limit=0xF, type=2, s=0, present=1
    )
    state.gdt = DescriptorTable(GDT1 if state1 else GDT0, 8 * len(GDT_ENTRIES) - 1)
    state.idt = DescriptorTable(IDT1 if state1 else IDT0, 0x7FF)
    state.cr0 = CR0_S1 if state1 else CR0_S
    state.cr3 = PD
    state.cr4 = CR4_UMIP if umip else 0
    state.rflags = 2 | (0 if state1 else EFLAGS_IF)
    state.rip = CODE
    state.regs["rsp"] = STACK_TOP
    return state


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    fault: int | None
    result: dict[str, Any]
    privileged: dict[str, Any]
    compensated: str = ""


def run_bare(variant: str, cpl: int, state1: bool, umip: bool = False) -> Outcome:
    """Execute the variant on the emulated CPU at ``cpl`` in state S or S' (see the module docstring)."""
    from unicorn import (
        UC_ARCH_X86,
        UC_HOOK_CODE,
        UC_HOOK_INSN,
        UC_HOOK_INTR,
        UC_MODE_64,
        UC_PROT_ALL,
        Uc,
        UcError,
    )
    from unicorn import x86_const as R

    from hvm.engine.model.cpu import UnicornCpu
    from hvm.engine.model.events import Delivery, Event
    from hvm.engine.trap.decode import decode
    from hvm.vtx.qualification import InterruptionType

    code, start, post, end = assemble(variant)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, MEM, UC_PROT_ALL)
    for address, data in _image(state1):
        uc.mem_write(address, data)
    uc.mem_write(CODE, code)
    cpu = UnicornCpu(uc)
    state = _state(cpl, state1, umip)
    cpu.load(state)
    uc.msr_write(SYSENTER_ESP, SYSENTER_VALUES[state1])
    seen: dict[str, Any] = {"fault": None, "io": [], "compensated": "", "delivered": None}

    def on_intr(uc: Uc, intno: int, _: object) -> None:
        seen["fault"] = intno
        uc.emu_stop()

    def on_io(uc: Uc, port: int, size: int, *rest: object) -> int:
        seen["io"].append(port)
        return 0x42

    def on_code(uc: Uc, address: int, size: int, _: object) -> None:
        if address == HANDLER:
            uc.emu_stop()
            return
        cpu.sync()
        insn = decode(bytes(uc.mem_read(address, 15)), address, 32)
        if insn is None or cpu.cpl == 0:
            return
        iopl = uc.reg_read(R.UC_X86_REG_EFLAGS) >> 12 & 3
        if insn.mnemonic in IO_MNEMONICS and cpu.cpl > iopl:
            seen["compensated"] = "I/O permission: Unicorn skips it; #GP raised by the harness"
        elif insn.mnemonic in UMIP_MNEMONICS and cpu.cr(4) & CR4_UMIP:
            seen["compensated"] = "UMIP: Unicorn has no UMIP check; #GP raised by the harness"
        else:
            return
        seen["fault"] = GP
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.hook_add(UC_HOOK_INSN, on_io, None, 1, 0, R.UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, on_io, None, 1, 0, R.UC_X86_INS_OUT)
    uc.hook_add(UC_HOOK_CODE, on_code, None, start, post - 1)
    uc.hook_add(UC_HOOK_CODE, on_code, None, HANDLER, HANDLER)
    halted = False
    try:
        uc.emu_start(CODE, end)
    except UcError:
        seen["fault"] = UD  # UC_ERR_INSN_INVALID: QEMU's #UD
    rip = uc.reg_read(R.UC_X86_REG_RIP)
    final = cpu.store()
    if seen["fault"] == 0x80 and not seen["compensated"]:
        # INT n: Unicorn stops before the gate checks; deliver as the SDM says (SDM Vol. 3A 6.12).
        seen["fault"] = None
        final.rip = rip

        def read(la: int, n: int) -> bytes:
            return bytes(uc.mem_read(la, n))

        def write(la: int, data: bytes) -> None:
            uc.mem_write(la, data)

        try:
            Delivery(final, read, write).deliver(Event(0x80, InterruptionType.SOFTWARE_INTERRUPT))
        except Exception:  # noqa: BLE001 - a fault while delivering is the instruction's fault
            seen["fault"] = GP
        rip = final.rip
    elif seen["fault"] is None and rip not in (end, HANDLER):
        halted = True  # HLT stops Unicorn with RIP past it
    memory = bytes(uc.mem_read(DATA, DATA_SIZE))
    stack = bytes(uc.mem_read(STACK_TOP - STACK_SEEN, STACK_SEEN))
    # The probe only means "the TLB was flushed" if it ran at the CPL of the warm-up: QEMU keeps
    # separate TLBs per privilege level (its MMU index), a real x86 does not.
    same_cpl = final.ss.dpl == cpl
    tlb = int.from_bytes(uc.mem_read(TLB_SLOT, 4), "little") if rip == end and same_cpl else None
    result = {name: final.regs[name] & 0xFFFF_FFFF for name in _GPRS}
    result.update(rip=rip, flags=final.rflags & _ARITH, data=memory.hex(), stack=stack.hex())
    privileged = {
        "cr0": final.cr0 & 0xFFFF_FFFF,
        "cr3": final.cr3,
        "cr4": final.cr4,
        "gdtr": (final.gdt.base, final.gdt.limit),
        "idtr": (final.idt.base, final.idt.limit),
        "ldtr": final.ldt.selector,
        "tr": final.tr.selector,
        "if": bool(final.rflags & EFLAGS_IF),
        "iopl": final.rflags >> 12 & 3,
        "cpl": final.ss.dpl,
        "sysenter_esp": uc.msr_read(SYSENTER_ESP),
        "halted": halted,
        "io": tuple(seen["io"]),
        "tlb": tlb,
    }
    uc.mem_unmap(0, MEM)
    return Outcome(seen["fault"], result, privileged, seen["compensated"])


# --- classification ---------------------------------------------------------------------------

_FAULT_NAMES = {GP: "#GP", UD: "#UD", PF: "#PF", 11: "#NP", 12: "#SS", 10: "#TS"}


def _fault_name(vector: int | None) -> str:
    return "runs" if vector is None else _FAULT_NAMES.get(vector, f"vector {vector}")


@dataclass
class Classification:
    mnemonic: str
    privileged: bool
    sensitive: bool
    control: list[str] = field(default_factory=list)  # privileged state it changes
    mode: list[str] = field(default_factory=list)  # results that differ between CPL 0 and 3
    reveals: list[str] = field(default_factory=list)  # results that differ between S and S'
    cpl3_behaviour: str = ""
    compensated: str = ""


@functools.cache
def _baseline(cpl: int, s: int, umip: bool) -> dict[str, Any]:
    """The privileged state after a NOP: what "unchanged" means for a run."""
    return run_bare("nop", cpl, bool(s), umip).privileged


def classify(entry: Entry, umip: bool = False) -> Classification:
    runs = {
        (cpl, s, v): run_bare(variant, cpl, bool(s), umip)
        for cpl in (0, 3)
        for s in (0, 1)
        for v, variant in enumerate(entry.variants)
    }
    baseline = {(cpl, s): _baseline(cpl, s, umip) for cpl in (0, 3) for s in (0, 1)}
    variants = range(len(entry.variants))
    privileged = all(
        runs[0, s, v].fault is None and runs[3, s, v].fault is not None for s in (0, 1) for v in variants
    )
    control: set[str] = set()
    mode: set[str] = set()
    reveals: set[str] = set()
    for (cpl, s, v), out in runs.items():
        if out.fault is None:
            control |= {
                k
                for k, value in out.privileged.items()
                if value != baseline[cpl, s][k] and not (k == "tlb" and value is None)
            }
            other = runs[cpl, 1 - s, v]
            if other.fault is None:
                reveals |= {k for k in out.result if out.result[k] != other.result[k]}
    if not privileged:
        for s in (0, 1):
            for v in variants:
                low, high = runs[0, s, v], runs[3, s, v]
                if (low.fault is None) != (high.fault is None):
                    mode.add(f"{_fault_name(low.fault)} at CPL 0, {_fault_name(high.fault)} at CPL 3")
                elif low.fault is None:
                    mode |= {k for k in low.result if low.result[k] != high.result[k]}
    sensitive = bool(control or mode or reveals)
    high = [runs[3, s, v] for s in (0, 1) for v in variants]
    low = [runs[0, s, v] for s in (0, 1) for v in variants]
    if all(o.fault is not None for o in high):
        behaviour = f"{_fault_name(high[0].fault)} (faults)"
    else:
        parts = []
        quiet = {
            k
            for o, z in zip(low, high, strict=True)
            if o.fault is None and z.fault is None
            for k, value in o.privileged.items()
            if value != z.privileged[k] and k != "cpl" and None not in (value, z.privileged[k])
        }
        if quiet:
            parts.append(
                "no fault, but leaves " + ", ".join(sorted(quiet)) + " unchanged where CPL 0 changes it"
            )
        if reveals:
            parts.append("shows privileged state (" + ", ".join(sorted(reveals)) + ")")
        if mode:
            parts.append("differs from CPL 0 (" + "; ".join(sorted(mode)) + ")")
        behaviour = "runs" + (": " + "; ".join(parts) if parts else ", as at CPL 0")
    compensated = next((o.compensated for o in runs.values() if o.compensated), "")
    return Classification(
        entry.mnemonic,
        privileged,
        sensitive,
        sorted(control),
        sorted(mode),
        sorted(reveals),
        behaviour,
        compensated,
    )


def subset_verdict(rows: list[Classification]) -> bool:
    """Popek-Goldberg: every sensitive instruction is privileged."""
    return all(r.privileged for r in rows if r.sensitive)


# --- VT-x: the model engine at the guest's ring 0 -------------------------------------------


def model_available() -> str | None:
    """None if the VT-x model engine can run here, else why not."""
    try:
        from hvm.engine.model import ModelEngine  # noqa: F401
    except ImportError as exc:
        return f"the VT-x model engine is not available ({exc})"
    return None


def run_vtx(variant: str, read_shadows: bool = True) -> tuple[str, dict[str, Any]]:
    """Run the variant in VMX non-root operation at guest CPL 0 in state S: ('exit', what) or
    ('runs', result). ``read_shadows=False`` leaves out the CR0/CR4 guest/host masks (the host's
    forced CR0.NE then shows), to see that the verdict depends on them."""
    from hvm.engine.model import ModelEngine
    from hvm.exits import ExitKind
    from hvm.vmm.memory import GuestMemory
    from hvm.vtx.capabilities import MODEL_CAPS
    from hvm.vtx.controls import ProcBased, ProcBased2
    from hvm.vtx.vmcs import VmcsField as F

    code, start, post, end = assemble(variant)
    memory = GuestMemory(MEM)
    engine = ModelEngine(memory)
    try:
        for address, data in _image(False):
            memory.write(address, data)
        memory.write(CODE, code)
        state = _state(0, False, False)
        engine.set_state(state)
        vmcs = engine.vmcs
        proc = (
            vmcs.vmread(F.CPU_BASED_VM_EXEC_CONTROL)
            | ProcBased.HLT_EXITING
            | ProcBased.UNCONDITIONAL_IO_EXITING
            | ProcBased.INVLPG_EXITING
            | ProcBased.CR3_LOAD_EXITING
            | ProcBased.CR3_STORE_EXITING
            | ProcBased.USE_MSR_BITMAPS
            | ProcBased.MOV_DR_EXITING
        )
        vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, MODEL_CAPS.true_procbased_ctls.adjust(proc))
        proc2 = vmcs.vmread(F.SECONDARY_VM_EXEC_CONTROL) | ProcBased2.DESCRIPTOR_TABLE_EXITING
        vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, MODEL_CAPS.procbased_ctls2.adjust(proc2))
        engine.host.write(vmcs.vmread(F.MSR_BITMAP), b"\xff" * 4096)  # every MSR access exits
        # The host forces CR0.NE (IA32_VMX_CR0_FIXED0); masks and read shadows show the guest its own.
        vmcs.vmwrite(F.GUEST_CR0, state.cr0 | CR0_NE)
        if read_shadows:
            vmcs.vmwrite(F.CR0_GUEST_HOST_MASK, 0xFFFF_FFFF)
            vmcs.vmwrite(F.CR0_READ_SHADOW, state.cr0)
            vmcs.vmwrite(F.CR4_GUEST_HOST_MASK, 0xFFFF_FFFF)
            vmcs.vmwrite(F.CR4_READ_SHADOW, state.cr4)
        engine.uc.msr_write(SYSENTER_ESP, SYSENTER_VALUES[0])
        for _ in range(8):
            ex = engine.run()
            rip = engine.get_state().rip
            if ex.kind is ExitKind.VMCALL and rip in (end, HANDLER):
                final = engine.get_state()
                result = {name: final.regs[name] & 0xFFFF_FFFF for name in _GPRS}
                result.update(
                    rip=final.rip,
                    flags=final.rflags & _ARITH,
                    data=memory.read(DATA, DATA_SIZE).hex(),
                    stack=memory.read(STACK_TOP - STACK_SEEN, STACK_SEEN).hex(),
                )
                return "runs", result
            if ex.kind is ExitKind.INTR:
                continue
            return "exit", {"kind": ex.kind.value, "detail": ex.detail}
        return "exit", {"kind": "none", "detail": "no end"}
    finally:
        engine.close()
        memory.close()


def vtx_handles(entry: Entry, read_shadows: bool = True) -> tuple[bool, str]:
    """(handled, how): every variant exits to the VMM, or does in the VM exactly what it does on
    bare metal at CPL 0 in the same state (the same result, or the same fault)."""
    hows = []
    for variant in entry.variants:
        bare = run_bare(variant, 0, False)
        kind, detail = run_vtx(variant, read_shadows)
        if kind == "exit" and detail["kind"] in ("shutdown", "exception"):
            # The guest faulted (its IDT has no handler, so it shuts down): did bare metal fault too?
            if bare.fault is None:
                return False, f"faults in the VM ({detail['kind']}), where bare metal runs it"
            hows.append(f"faults as on bare metal ({_fault_name(bare.fault)})")
        elif kind == "exit":
            hows.append(f"exits ({detail['kind']})")
        elif bare.fault is not None:
            return False, f"runs, where bare metal raises {_fault_name(bare.fault)}"
        else:
            differs = sorted(k for k in detail if detail[k] != bare.result[k])
            if differs:
                return False, "runs with a result bare metal does not give (" + ", ".join(differs) + ")"
            hows.append("runs as on bare metal")
    return True, "; ".join(dict.fromkeys(hows))


# --- the experiment ----------------------------------------------------------------------------


def analyze(progress: Progress | None = None) -> dict[str, Any]:
    """The whole analysis as the `--json` document describes it."""
    if not assembler_available():
        raise RuntimeError("the Popek-Goldberg catalogue needs GNU as and ld (binutils)")
    total = len(CATALOGUE)
    legacy, umip = [], []
    for i, entry in enumerate(CATALOGUE):
        if progress:
            progress(i, total, f"popek-goldberg: {entry.mnemonic}")
        legacy.append(classify(entry))
        umip.append(classify(entry, umip=True))
    why_not = model_available()
    vtx: dict[str, tuple[bool, str]] = {}
    if why_not is None:
        for entry, row in zip(CATALOGUE, legacy, strict=True):
            if row.sensitive:
                vtx[entry.mnemonic] = vtx_handles(entry)
    instructions = []
    for entry, row, urow in zip(CATALOGUE, legacy, umip, strict=True):
        item = {
            "mnemonic": row.mnemonic,
            "privileged": row.privileged,
            "sensitive": row.sensitive,
            "cpl3_behaviour": row.cpl3_behaviour,
            "changes": row.control,
            "differs_by_mode": row.mode,
            "shows": row.reveals,
            "robin_irvine": entry.robin_irvine,
            "named_by_chapter": entry.named,
            "umip_privileged": urow.privileged,
            "umip_cpl3_behaviour": urow.cpl3_behaviour,
            "compensated": "; ".join(x for x in dict.fromkeys((row.compensated, urow.compensated)) if x),
        }
        if entry.mnemonic in vtx:
            item["vtx"] = vtx[entry.mnemonic][1]
            item["vtx_handled"] = vtx[entry.mnemonic][0]
        instructions.append(item)
    verdicts = {
        "legacy_x86": subset_verdict(legacy),
        "x86_umip": subset_verdict(umip),
        "vtx": all(ok for ok, _ in vtx.values()) if why_not is None else None,
    }
    if progress:
        progress(total, total, "popek-goldberg: done")
    doc: dict[str, Any] = {"instructions": instructions, "verdicts": verdicts}
    if why_not is not None:
        doc["vtx_skipped"] = why_not
    return doc


def run(engine: str, params: dict[str, Any], progress: Progress) -> list[Row]:
    """The analysis as one row.

    It executes on the emulated CPU (Unicorn) and, for the VT-x verdict, the model engine, so the
    experiment is registered for the model engine alone: `--engine both` yields one row.
    """
    return [{"engine": engine, "machine": "x86 (Unicorn) + VT-x model", **analyze(progress)}]


def compare(rows: list[Row]) -> list[Comparison]:
    out = []
    for row in rows:
        items = row["instructions"]
        leaks = [i["mnemonic"] for i in items if i["sensitive"] and not i["privileged"]]
        umip_leaks = [i["mnemonic"] for i in items if i["sensitive"] and not i["umip_privileged"]]
        verdicts = row["verdicts"]
        out.append(
            Comparison(
                FIGURES[0],
                row["engine"],
                float(verdicts["legacy_x86"]),
                f"{len(leaks)} instructions run at CPL 3 without a trap yet are sensitive: "
                f"{', '.join(leaks)}; with CR4.UMIP {len(umip_leaks)} remain "
                f"({', '.join(umip_leaks)}), so UMIP does not fix it either",
            )
        )
        named = [
            i["mnemonic"] for i in items if i["named_by_chapter"] and i["sensitive"] and not i["privileged"]
        ]
        out.append(
            Comparison(
                FIGURES[1],
                row["engine"],
                float(len(named)),
                f"found sensitive and unprivileged by execution: {', '.join(named)}",
            )
        )
        if verdicts["vtx"] is not None:
            out.append(
                Comparison(
                    FIGURES[2],
                    row["engine"],
                    float(verdicts["vtx"]),
                    "every sensitive instruction either exits under the VMCS (descriptor-table, "
                    "HLT, I/O, INVLPG, CR3 exiting, MSR bitmap) or, at the guest's own ring 0 with "
                    "CR0/CR4 read shadows, gives exactly bare metal's result",
                )
            )
    return out


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    items = rows[0]["instructions"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    colour = {
        (True, True): "#4477aa",
        (True, False): "#88ccee",
        (False, True): "#cc6677",
        (False, False): "#dddddd",
    }
    for x, item in enumerate(items):
        c = colour[item["privileged"], item["sensitive"]]
        ax.bar(x, 1, color=c)
        if item["sensitive"] and not item["umip_privileged"] and item["privileged"] is False:
            ax.text(x, 0.5, "✗", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(items)), [i["mnemonic"] for i in items], rotation=75, fontsize=7)
    ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colour.values()]
    ax.legend(
        handles,
        ["privileged and sensitive", "privileged only", "sensitive, NOT privileged", "neither"],
        fontsize=7,
        loc="upper right",
        ncol=4,
    )
    v = rows[0]["verdicts"]
    ax.set_title(
        f"Popek-Goldberg by execution: legacy x86 {v['legacy_x86']}, CR4.UMIP {v['x86_umip']}, "
        f"VT-x {v['vtx']}  (✗: still unprivileged with UMIP)",
        fontsize=9,
    )
    return [save_figure(fig, out_dir, "popek-goldberg.png")]


EXPERIMENT = Experiment(
    name="popek-goldberg",
    title="Popek-Goldberg on x86: sensitive ⊄ privileged, by execution",
    claim=(
        "x86 has sensitive instructions that do not trap at CPL 3 (SGDT, SIDT, SMSW, POPF, ...), so "
        "classic trap-and-emulate cannot virtualize it; CR4.UMIP closes only the table and MSW reads; "
        "VT-x closes all."
    ),
    figures=FIGURES,
    engines=("model",),
    run=run,
    compare=compare,
    plot=plot,
)
