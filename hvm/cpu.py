"""Engine-neutral architectural CPU state: what a boot loader hands to an engine.

Segment fields follow the x86 descriptor (and KVM's kvm_segment): ``type`` is the
4-bit descriptor type, ``s`` the code/data bit, ``db`` the default size, ``l``
64-bit code, ``g`` 4-KiB granularity (``limit`` is always the byte limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CR0 bits (SDM Vol. 3A 2.5)
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
# CR4 bits
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
# EFER bits (SDM Vol. 3A 2.2.1)
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9

GPRS = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)


@dataclass
class Segment:
    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3  # read/write data, accessed
    s: int = 1
    dpl: int = 0
    present: int = 1
    db: int = 0
    l: int = 0  # noqa: E741 - the architectural name
    g: int = 0
    avl: int = 0
    unusable: int = 0


def real_mode_segment(selector: int, code: bool = False) -> Segment:
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF, type=0xB if code else 0x3)


def flat_segment(selector: int, code: bool, long_mode: bool = False, dpl: int = 0) -> Segment:
    """A flat 4-GiB segment as a GDT descriptor with base 0, limit 0xFFFFF, G=1 describes."""
    return Segment(
        selector=selector,
        base=0,
        limit=0xFFFF_FFFF,
        type=0xB if code else 0x3,
        s=1,
        dpl=dpl,
        present=1,
        db=0 if (code and long_mode) else 1,
        l=1 if (code and long_mode) else 0,
        g=1,
    )


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class CpuState:
    regs: dict[str, int] = field(default_factory=lambda: {name: 0 for name in GPRS})
    rip: int = 0
    rflags: int = RFLAGS_RESERVED
    cs: Segment = field(default_factory=lambda: real_mode_segment(0, code=True))
    ds: Segment = field(default_factory=lambda: real_mode_segment(0))
    es: Segment = field(default_factory=lambda: real_mode_segment(0))
    fs: Segment = field(default_factory=lambda: real_mode_segment(0))
    gs: Segment = field(default_factory=lambda: real_mode_segment(0))
    ss: Segment = field(default_factory=lambda: real_mode_segment(0))
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = CR0_ET
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    def describe(self) -> str:
        """The registers an operator needs first when a guest dies."""
        return (
            f"RIP={self.rip:#x} CS={self.cs.selector:#06x} CR0={self.cr0:#x} "
            f"CR3={self.cr3:#x} CR4={self.cr4:#x} EFER={self.efer:#x}"
        )
