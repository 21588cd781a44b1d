"""ctypes mirrors of the structures in <linux/kvm.h> and <asm/kvm.h> (x86_64).

Field names, order and types follow the kernel headers exactly; the layout is
checked against the installed headers by tests/test_kvm_layout.py, which
compiles a small C program.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64

KVM_NR_INTERRUPTS = 256
KVM_MSR_FILTER_MAX_RANGES = 16


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; the flexible ``entries`` array follows (see cpuid2_buffer)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> ctypes.Structure:
    """A kvm_cpuid2 with room for ``nent`` entries."""

    class _cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    buf = _cpuid2()
    buf.nent = nent
    return buf


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the flexible ``entries`` array follows (see msrs_buffer)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(indices: list[int]) -> ctypes.Structure:
    """A kvm_msrs holding one entry per MSR index."""

    class _msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * len(indices))]

    buf = _msrs()
    buf.nmsrs = len(indices)
    for entry, index in zip(buf.entries, indices, strict=True):
        entry.index = index
    return buf


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_irq_level(ctypes.Structure):
    # union { __u32 irq; __s32 status; }: one 32-bit slot
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_interrupt(ctypes.Structure):
    """KVM_INTERRUPT: the vector to inject (no in-kernel irqchip)."""

    _fields_ = [("irq", u32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_coalesced_mmio_zone(ctypes.Structure):
    # union { __u32 pad; __u32 pio; }
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_coalesced_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("len", u32), ("pio", u32), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(ctypes.Structure):
    """Header only; ``coalesced_mmio[]`` follows."""

    _fields_ = [("first", u32), ("last", u32)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", ctypes.c_int32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_msr_filter_range(ctypes.Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", u64)]


class kvm_msr_filter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_stats_header(ctypes.Structure):
    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """Header only; the name (``name_size`` bytes from the stats header) follows."""

    _fields_ = [
        ("flags", u32),
        ("exponent", ctypes.c_int16),
        ("size", u16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


# --- struct kvm_run and its exit union ------------------------------------------------


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _exit_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class _exit_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _exit_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _exit_hypercall(ctypes.Structure):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),
        ("pad", u32),
    ]


class _exit_tpr_access(ctypes.Structure):
    _fields_ = [("rip", u64), ("is_write", u32), ("pad", u32)]


class _exit_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_msr(ctypes.Structure):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class _exit_union(ctypes.Union):
    _fields_ = [
        ("hw", _exit_hw),
        ("fail_entry", _exit_fail_entry),
        ("ex", _exit_ex),
        ("io", _exit_io),
        ("debug", _exit_debug),
        ("mmio", _exit_mmio),
        ("hypercall", _exit_hypercall),
        ("tpr_access", _exit_tpr_access),
        ("internal", _exit_internal),
        ("system_event", _exit_system_event),
        ("msr", _exit_msr),
        ("padding", c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", _exit_union),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", c_char * 2048),
    ]
