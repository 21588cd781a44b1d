"""System -> VM -> vCPU objects over /dev/kvm: one method per ioctl, no policy.

Each object owns its file descriptor and closes it (``close()`` or a ``with``
block). Request numbers come from ``hvm.kvm.ioctl``; structures from
``hvm.kvm.structs``. Compare rust-vmm's kvm-ioctls: a binding that knows
nothing of devices.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass

from hvm.kvm import structs as S
from hvm.kvm.ioctl import _IO, _IOR, _IOW, _IOWR, KVMIO

# --- request numbers (<linux/kvm.h>) ----------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, S.kvm_cpuid2)

KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, S.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, S.kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, S.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, S.kvm_coalesced_mmio_zone)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, S.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, S.kvm_ioeventfd)

KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, S.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, S.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, S.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, S.kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, S.kvm_translation)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, S.kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, S.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, S.kvm_msrs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, S.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, S.kvm_cpuid2)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, S.kvm_guest_debug)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, S.kvm_enable_cap)
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, S.kvm_msr_filter)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
KVM_SET_DEVICE_ATTR = _IOW(KVMIO, 0xE1, S.kvm_device_attr)
KVM_GET_DEVICE_ATTR = _IOW(KVMIO, 0xE2, S.kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _IOW(KVMIO, 0xE3, S.kvm_device_attr)

# --- constants (<linux/kvm.h>) -------------------------------------------------------------
KVM_API_VERSION = 12

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1

KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1

# Capabilities probed by hvm (KVM_CAP_* in <linux/kvm.h>).
CAPABILITIES: dict[str, int] = {
    "KVM_CAP_IRQCHIP": 0,
    "KVM_CAP_HLT": 1,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_PIT": 11,
    "KVM_CAP_NOP_IO_DELAY": 12,
    "KVM_CAP_COALESCED_MMIO": 15,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_IOMMU": 18,
    "KVM_CAP_SET_GUEST_DEBUG": 23,
    "KVM_CAP_IRQ_ROUTING": 25,
    "KVM_CAP_PIT2": 33,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": 37,
    "KVM_CAP_IOEVENTFD": 36,
    "KVM_CAP_ADJUST_CLOCK": 39,
    "KVM_CAP_XSAVE": 55,
    "KVM_CAP_TSC_CONTROL": 60,
    "KVM_CAP_TSC_DEADLINE_TIMER": 72,
    "KVM_CAP_IRQFD": 32,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_COALESCED_PIO": 162,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_X86_USER_SPACE_MSR": 188,
    "KVM_CAP_X86_MSR_FILTER": 189,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_BINARY_STATS_FD": 203,
    "KVM_CAP_VCPU_ATTRIBUTES": 127,
}


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed; ``errno`` says why."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


def _ioctl(fd: int, request: int, arg: object = 0, name: str = "") -> int:
    if isinstance(arg, int) and arg > 0x7FFF_FFFF:
        # fcntl.ioctl passes integer arguments as a C int; wider values go through libc.
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            err = ctypes.get_errno()
            raise KvmError(err, f"{name or hex(request)}: {os.strerror(err)}")
        return ret
    try:
        return fcntl.ioctl(fd, request, arg)  # type: ignore[arg-type]
    except OSError as exc:
        raise KvmError(exc.errno, f"{name or hex(request)}: {os.strerror(exc.errno)}") from None


class _Fd:
    """Owns one file descriptor."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def stats_fd(self) -> int:
        """A new binary statistics fd (KVM_CAP_BINARY_STATS_FD); the caller owns it."""
        return _ioctl(self.fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def capabilities(self) -> dict[str, int]:
        """Every capability hvm knows by name, with the value KVM reports (0 = absent)."""
        return {name: self.check_extension(number) for name, number in CAPABILITIES.items()}


class System(_Fd):
    """/dev/kvm itself."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = -1
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = _ioctl(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(errno.EINVAL, f"KVM API version {version}, expected {KVM_API_VERSION}")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> ctypes.Structure:
        buf = S.cpuid2_buffer(max_entries)
        _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        return buf

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM"))


@dataclass
class MemorySlot:
    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int = 0


class Vm(_Fd):
    def __init__(self, system: System, fd: int) -> None:
        self.system = system
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()

    def set_user_memory_region(self, slot: MemorySlot) -> None:
        region = S.kvm_userspace_memory_region(
            slot.slot, slot.flags, slot.guest_phys_addr, slot.memory_size, slot.userspace_addr
        )
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, S.kvm_pit_config(flags), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, KVM_IRQ_LINE, S.kvm_irq_level(irq, level), "KVM_IRQ_LINE")

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        log = S.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        zone = S.kvm_coalesced_mmio_zone(addr, size, int(pio))
        _ioctl(self.fd, KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def enable_cap(self, cap: int, *args: int) -> None:
        req = S.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            req.args[i] = value
        _ioctl(self.fd, KVM_ENABLE_CAP, req, "KVM_ENABLE_CAP")

    def set_msr_filter(self, msr_filter: S.kvm_msr_filter) -> None:
        _ioctl(self.fd, KVM_X86_SET_MSR_FILTER, msr_filter, "KVM_X86_SET_MSR_FILTER")

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, fd, self.system.vcpu_mmap_size())
        self.vcpus.append(vcpu)
        return vcpu


class Vcpu(_Fd):
    def __init__(self, vm: Vm, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The shared kvm_run page: read exit information without copying.
        self.run_struct = S.kvm_run.from_buffer(self.mmap)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            self.mmap.close()
        super().close()

    def run(self) -> int:
        """KVM_RUN; returns the exit reason (KVM_EXIT_*). EINTR surfaces as KVM_EXIT_INTR."""
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return KVM_EXIT_INTR
            raise KvmError(exc.errno, f"KVM_RUN: {os.strerror(exc.errno)}") from None
        return self.run_struct.exit_reason

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue external interrupt ``vector`` for the next entry (userspace irqchip only).

        api.rst: EEXIST if one is already queued, ENXIO with an in-kernel PIC, EINVAL for a vector > 255.
        """
        _ioctl(self.fd, KVM_INTERRUPT, S.kvm_interrupt(vector), "KVM_INTERRUPT")

    def get_regs(self) -> S.kvm_regs:
        regs = S.kvm_regs()
        _ioctl(self.fd, KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: S.kvm_regs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> S.kvm_sregs:
        sregs = S.kvm_sregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        _ioctl(self.fd, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = S.msrs_buffer(indices)
        n = _ioctl(self.fd, KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        buf = S.msrs_buffer(list(values))
        for entry in buf.entries:
            entry.data = values[entry.index]
        return _ioctl(self.fd, KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def translate(self, linear: int) -> S.kvm_translation:
        tr = S.kvm_translation(linear_address=linear)
        _ioctl(self.fd, KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr

    def set_guest_debug(self, control: int) -> None:
        _ioctl(self.fd, KVM_SET_GUEST_DEBUG, S.kvm_guest_debug(control=control), "KVM_SET_GUEST_DEBUG")

    def _device_attr(self, request: int, name: str, group: int, attr: int, value: ctypes.c_uint64):
        req = S.kvm_device_attr(0, group, attr, ctypes.addressof(value))
        return _ioctl(self.fd, request, req, name)

    def has_device_attr(self, group: int, attr: int) -> bool:
        try:
            self._device_attr(KVM_HAS_DEVICE_ATTR, "KVM_HAS_DEVICE_ATTR", group, attr, ctypes.c_uint64())
        except KvmError:
            return False
        return True

    def get_device_attr(self, group: int, attr: int) -> int:
        value = ctypes.c_uint64()
        self._device_attr(KVM_GET_DEVICE_ATTR, "KVM_GET_DEVICE_ATTR", group, attr, value)
        return value.value

    def set_device_attr(self, group: int, attr: int, data: int) -> None:
        value = ctypes.c_uint64(data)
        self._device_attr(KVM_SET_DEVICE_ATTR, "KVM_SET_DEVICE_ATTR", group, attr, value)
