"""The KVM engine: guest code runs on the host CPU through /dev/kvm.

``irqchip="kernel"`` (the default): the in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT are
created as QEMU does by default, so HLT, timer and interrupt exits stay in the kernel.

``irqchip="user"``: no in-kernel irqchip (no KVM_CREATE_IRQCHIP, no PIT), as QEMU with
``kernel-irqchip=off``. The guest's local-APIC page then is unbacked guest-physical memory, so
every access is a KVM_EXIT_MMIO that the VMM serves (the Machine puts a local APIC on its MMIO
bus and hands it to :meth:`KvmEngine.attach_interrupt_controller`); HLT is a KVM_EXIT_HLT in
userspace. Before each KVM_RUN the engine asks that controller for a pending vector and injects
it with KVM_INTERRUPT when the last exit said ``ready_for_interrupt_injection`` with ``if_flag``
set; otherwise it sets ``request_interrupt_window`` and KVM returns with
KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take it (Documentation/virt/kvm/api.rst,
"KVM_INTERRUPT", "kvm_run"). A halted vCPU sleeps in userspace until an interrupt is pending.
CPUID hides x2APIC and the TSC-deadline timer in this mode: the VMM's APIC is reached through
its MMIO page only. ISA interrupt lines (``set_irq``) go to the VMM's I/O APIC
(:mod:`hvm.devices.ioapic`, see :meth:`KvmEngine.attach_ioapic`), which the engine services before each
entry; without one they are counted in ``counters()["isa_irqs_dropped"]``.

The exits that reach userspace are turned into :class:`hvm.exits.Exit` records here. The
kernel's own exit counters come from the vCPU's binary statistics fd.
"""

from __future__ import annotations

import ctypes
import errno
import struct
import time

from hvm.cpu import CpuState, DescriptorTable, Segment
from hvm.engine.base import Engine, InterruptController
from hvm.errors import EngineUnavailable
from hvm.exits import Exit, ExitKind
from hvm.kvm import api as K
from hvm.kvm import structs as S
from hvm.kvm.stats import StatsReader
from hvm.vmm.memory import PAGE_SIZE, GuestMemory, Region

# KVM places the TSS for real-mode emulation here on VMX hosts (as QEMU does: below 4 GiB, above RAM).
TSS_ADDR = 0xFFFB_D000

# kvm_run offsets (checked against <linux/kvm.h> by the layout test through the ctypes mirror)
_OFF_EXIT_REASON = S.kvm_run.exit_reason.offset
_OFF_UNION = S.kvm_run.u.offset
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_MSR = struct.Struct("<B7xIIQ")  # error, reason, index, data
_U32 = struct.Struct("<I")
_RING_HEAD = struct.Struct("<II")  # first, last
_RING_ENTRY = struct.Struct("<QII8s")  # struct kvm_coalesced_mmio: phys_addr, len, pio, data
# KVM_COALESCED_MMIO_MAX: entries that fit in the ring page after its header
_RING_MAX = (PAGE_SIZE - _RING_HEAD.size) // _RING_ENTRY.size

IRQCHIPS = ("kernel", "user")
CPUID_1_ECX_X2APIC = 1 << 21  # CPUID.01H:ECX[21] (SDM Vol. 2A, CPUID)
CPUID_1_ECX_TSC_DEADLINE = 1 << 24  # CPUID.01H:ECX[24]
HALT_SLEEP_MAX_S = 0.0005  # a halted vCPU (userspace irqchip) re-checks its controller at least this often
# kvm_run byte offsets of the interrupt-injection fields (<linux/kvm.h> struct kvm_run)
_OFF_REQ_WINDOW = S.kvm_run.request_interrupt_window.offset
_OFF_READY = S.kvm_run.ready_for_interrupt_injection.offset
_OFF_IF = S.kvm_run.if_flag.offset

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")


def open_system(path: str = "/dev/kvm") -> K.System:
    """/dev/kvm, or EngineUnavailable with what to do about it."""
    try:
        return K.System(path)
    except FileNotFoundError:
        raise EngineUnavailable(
            f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
            "or use --engine model"
        ) from None
    except PermissionError:
        raise EngineUnavailable(
            f"no permission to open {path}: add your user to the 'kvm' group or run as root"
        ) from None
    except OSError as exc:
        raise EngineUnavailable(f"cannot use {path}: {exc.strerror or exc}") from None


def kvm_usable(path: str = "/dev/kvm") -> bool:
    try:
        open_system(path).close()
    except EngineUnavailable:
        return False
    return True


class KvmEngine(Engine):
    name = "kvm"

    def __init__(self, memory: GuestMemory, path: str = "/dev/kvm", irqchip: str = "kernel") -> None:
        if irqchip not in IRQCHIPS:
            raise EngineUnavailable(f"unknown irqchip {irqchip!r} for the kvm engine (choose: kernel, user)")
        self.memory = memory
        self.irqchip = irqchip
        self.userspace_lapic = irqchip == "user"
        self._controller: InterruptController | None = None
        self._ioapic = None
        self._halted = False
        self.irq_stats = {"injected": 0, "window_requests": 0, "halt_sleeps": 0, "isa_irqs_dropped": 0}
        self.system = open_system(path)
        try:
            self.vm = self.system.create_vm()
            try:
                self.vm.set_tss_addr(TSS_ADDR)
            except K.KvmError as exc:  # not needed (and refused) on some hosts, e.g. PVM
                if exc.errno not in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
                    raise
            if irqchip == "kernel":
                self.vm.create_irqchip()
                self.vm.create_pit2()
            for region in memory.regions:
                self.vm.set_user_memory_region(
                    K.MemorySlot(region.slot, region.gpa, region.size, region.host_addr, region.flags)
                )
            self.vcpu = self.vm.create_vcpu(0)
            cpuid = self.system.supported_cpuid()
            if irqchip == "user":
                for entry in list(cpuid.entries)[: cpuid.nent]:
                    if entry.function == 1:
                        entry.ecx &= ~(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE)
            self.vcpu.set_cpuid2(cpuid)
        except K.KvmError as exc:
            self.close()
            raise EngineUnavailable(f"KVM refused to set up the VM: {exc}") from None
        self.mm = self.vcpu.mmap
        self._ring_off: int | None = None
        self._read_offset = 0
        self._read_len = 0
        self.stats = (
            StatsReader(self.vcpu.stats_fd())
            if self._has(K.CAPABILITIES["KVM_CAP_BINARY_STATS_FD"])
            else None
        )
        self.vm_stats = StatsReader(self.vm.stats_fd()) if self.stats else None

    def _has(self, cap: int) -> bool:
        return self.system.check_extension(cap) > 0

    # --- state ------------------------------------------------------------------------
    def set_state(self, state: CpuState) -> None:
        regs = S.kvm_regs()
        for name, value in state.regs.items():
            setattr(regs, name, value)
        regs.rip = state.rip
        regs.rflags = state.rflags
        self.vcpu.set_regs(regs)
        sregs = self.vcpu.get_sregs()
        for name in _SEGMENTS:
            seg: Segment = getattr(state, name)
            kseg = getattr(sregs, name)
            for f in _SEG_FIELDS:
                setattr(kseg, f, getattr(seg, f))
        sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
        sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
        self.vcpu.set_sregs(sregs)

    def get_state(self) -> CpuState:
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        state = CpuState()
        state.regs = {name: getattr(regs, name) for name in state.regs}
        state.rip, state.rflags = regs.rip, regs.rflags
        for name in _SEGMENTS:
            kseg = getattr(sregs, name)
            setattr(state, name, Segment(**{f: getattr(kseg, f) for f in _SEG_FIELDS}))
        state.gdt = DescriptorTable(sregs.gdt.base, sregs.gdt.limit)
        state.idt = DescriptorTable(sregs.idt.base, sregs.idt.limit)
        state.cr0, state.cr3, state.cr4, state.efer = sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        return state

    # --- interrupts (irqchip="user") ----------------------------------------------------
    def attach_interrupt_controller(self, controller: InterruptController) -> None:
        if not self.userspace_lapic:
            raise NotImplementedError("the kvm engine with irqchip='kernel' has the kernel's local APIC")
        self._controller = controller

    def attach_ioapic(self, ioapic) -> bool:
        if not self.userspace_lapic or self._controller is None:
            return False
        ioapic.connect(self._controller.apic)
        self._ioapic = ioapic
        return True

    def _before_entry(self, ctrl: InterruptController) -> Exit | None:
        """Inject what the controller has pending, or ask KVM for an interrupt window; sleep while halted."""
        mm = self.mm
        ioapic = self._ioapic
        if ioapic is not None:
            ioapic.service()
        ctrl.tick()
        if self._halted:
            # HLT with IF set (the Machine stops the run on HLT with IF clear): the vCPU sleeps until
            # its controller has an interrupt; a kick (timer signal, timeout) ends the sleep.
            while ctrl.pending() is None:
                if mm[1]:
                    mm[1] = 0
                    return Exit(ExitKind.INTR)
                wait = ctrl.seconds_to_next()
                self.irq_stats["halt_sleeps"] += 1
                time.sleep(HALT_SLEEP_MAX_S if wait is None else min(max(wait, 0.0), HALT_SLEEP_MAX_S))
                if ioapic is not None:
                    ioapic.service()  # a line the input thread raised meanwhile
                ctrl.tick()
            self._halted = False
        if ctrl.pending() is None:
            mm[_OFF_REQ_WINDOW] = 0
            return None
        if mm[_OFF_READY] and mm[_OFF_IF]:
            vector = ctrl.ack()
            self.vcpu.interrupt(vector)
            self.irq_stats["injected"] += 1
            # KVM holds one queued external interrupt per entry (a second KVM_INTERRUPT before the
            # entry would replace it): ask for a window to deliver the next one
            mm[_OFF_REQ_WINDOW] = 1 if ctrl.pending() is not None else 0
        else:
            mm[_OFF_REQ_WINDOW] = 1
            self.irq_stats["window_requests"] += 1
        return None

    # --- running ----------------------------------------------------------------------
    def run(self) -> Exit:
        ctrl = self._controller
        if ctrl is not None:
            early = self._before_entry(ctrl)
            if early is not None:
                return early
        reason = self.vcpu.run()
        mm = self.mm
        if reason == K.KVM_EXIT_IO:
            direction, size, port, count, data_offset = _IO.unpack_from(mm, _OFF_UNION)
            length = size * count
            if direction == K.KVM_EXIT_IO_OUT:
                return Exit(
                    ExitKind.IO,
                    port=port,
                    size=size,
                    count=count,
                    is_write=True,
                    data=mm[data_offset : data_offset + length],
                )
            self._read_offset, self._read_len = data_offset, length
            return Exit(ExitKind.IO, port=port, size=size, count=count)
        if reason == K.KVM_EXIT_MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(mm, _OFF_UNION)
            if is_write:
                return Exit(ExitKind.MMIO, addr=addr, size=length, is_write=True, data=data[:length])
            self._read_offset, self._read_len = _OFF_UNION + 8, length
            return Exit(ExitKind.MMIO, addr=addr, size=length)
        return self._slow_exit(reason)

    def _slow_exit(self, reason: int) -> Exit:
        run = self.vcpu.run_struct
        if reason == K.KVM_EXIT_INTR:
            self.mm[1] = 0  # kvm_run.immediate_exit: consumed; a later kick() sets it again
            return Exit(ExitKind.INTR)
        if reason == K.KVM_EXIT_HLT:
            self._halted = self._controller is not None
            return Exit(ExitKind.HLT)
        if reason == K.KVM_EXIT_SHUTDOWN:
            return Exit(ExitKind.SHUTDOWN, detail="triple fault")
        if reason in (K.KVM_EXIT_X86_RDMSR, K.KVM_EXIT_X86_WRMSR):
            _, why, index, data = _MSR.unpack_from(self.mm, _OFF_UNION)
            if reason == K.KVM_EXIT_X86_WRMSR:
                return Exit(
                    ExitKind.WRMSR,
                    addr=index,
                    size=8,
                    is_write=True,
                    data=data.to_bytes(8, "little"),
                    qualification=why,
                )
            self._read_offset, self._read_len = _OFF_UNION + 16, 8
            return Exit(ExitKind.RDMSR, addr=index, size=8, qualification=why)
        if reason == K.KVM_EXIT_FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            return Exit(
                ExitKind.FAIL_ENTRY, qualification=code, detail=f"VM entry failed, hardware reason {code:#x}"
            )
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            sub = run.internal.suberror
            names = {
                K.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
                K.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
                K.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit during event delivery",
                K.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
            }
            return Exit(
                ExitKind.INTERNAL_ERROR,
                qualification=sub,
                detail=f"KVM internal error: {names.get(sub, f'suberror {sub}')}",
            )
        if reason == K.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            names = {
                K.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
                K.KVM_SYSTEM_EVENT_RESET: "reset",
                K.KVM_SYSTEM_EVENT_CRASH: "crash",
            }
            return Exit(
                ExitKind.SYSTEM_EVENT, qualification=kind, detail=f"system event: {names.get(kind, kind)}"
            )
        if reason == K.KVM_EXIT_DEBUG:
            return Exit(ExitKind.DEBUG, addr=run.debug.arch.pc)
        if reason == K.KVM_EXIT_EXCEPTION:
            return Exit(ExitKind.EXCEPTION, qualification=run.ex.exception)
        if reason == K.KVM_EXIT_IRQ_WINDOW_OPEN:
            return Exit(ExitKind.INTERRUPT_WINDOW)
        if reason == K.KVM_EXIT_HYPERCALL:
            return Exit(ExitKind.VMCALL, qualification=run.hypercall.nr)
        return Exit(
            ExitKind.INTERNAL_ERROR, qualification=reason, detail=f"unexpected KVM exit reason {reason}"
        )

    def complete_read(self, data: bytes) -> None:
        if len(data) != self._read_len:
            raise ValueError(f"read completion of {len(data)} bytes, exit wants {self._read_len}")
        off = self._read_offset
        self.mm[off : off + len(data)] = data

    # --- memory ------------------------------------------------------------------------
    def map_region(self, region: Region) -> None:
        self.vm.set_user_memory_region(
            K.MemorySlot(region.slot, region.gpa, region.size, region.host_addr, region.flags)
        )

    def harvest_dirty(self, region: Region) -> list[int]:
        if not region.flags & K.KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"slot {region.slot} does not log dirty pages")
        pages = region.size // PAGE_SIZE
        bitmap = (ctypes.c_uint64 * ((pages + 63) // 64))()
        self.vm.get_dirty_log(region.slot, bitmap)
        return [i for i in range(pages) if bitmap[i // 64] >> (i % 64) & 1]

    def register_coalesced_mmio(self, addr: int, size: int) -> bool:
        page = self.system.check_extension(K.CAPABILITIES["KVM_CAP_COALESCED_MMIO"])
        if page <= 0:
            return False
        self.vm.register_coalesced_mmio(addr, size)
        self._ring_off = page * PAGE_SIZE
        return True

    def drain_coalesced(self) -> list[tuple[int, bytes]]:
        """Entries of the coalesced-MMIO ring (<linux/kvm.h> struct kvm_coalesced_mmio_ring)."""
        off = self._ring_off
        if off is None:
            return []
        mm = self.mm
        first, last = _RING_HEAD.unpack_from(mm, off)
        out = []
        while first != last:
            addr, length, _pio, data = _RING_ENTRY.unpack_from(mm, off + 8 + first * _RING_ENTRY.size)
            out.append((addr, data[:length]))
            first = (first + 1) % _RING_MAX
        _U32.pack_into(mm, off, first)  # userspace consumes at 'first'; the kernel produces at 'last'
        return out

    def filter_msr_writes(self, msrs: list[int], reads: bool = False) -> bool:
        """Send the guest's WRMSR (and with ``reads`` RDMSR) of ``msrs`` to userspace.

        Enables KVM_CAP_X86_USER_SPACE_MSR with KVM_MSR_EXIT_REASON_FILTER and installs a
        KVM_X86_SET_MSR_FILTER (default allow) whose ranges deny exactly these MSRs: such an
        access becomes KVM_EXIT_X86_WRMSR/RDMSR with reason FILTER. False if KVM refuses either.
        """
        if len(msrs) > S.KVM_MSR_FILTER_MAX_RANGES or not self._has(
            K.CAPABILITIES["KVM_CAP_X86_USER_SPACE_MSR"]
        ) or not self._has(K.CAPABILITIES["KVM_CAP_X86_MSR_FILTER"]):
            return False
        deny = (ctypes.c_uint8 * 1)(0)  # one MSR per range, its bit 0 clear: denied
        flt = S.kvm_msr_filter(flags=K.KVM_MSR_FILTER_DEFAULT_ALLOW)
        for rng, msr in zip(flt.ranges, msrs, strict=False):
            rng.flags = K.KVM_MSR_FILTER_WRITE | (K.KVM_MSR_FILTER_READ if reads else 0)
            rng.nmsrs, rng.base, rng.bitmap = 1, msr, ctypes.addressof(deny)
        try:
            self.vm.enable_cap(K.CAPABILITIES["KVM_CAP_X86_USER_SPACE_MSR"], K.KVM_MSR_EXIT_REASON_FILTER)
            self.vm.set_msr_filter(flt)
        except K.KvmError:
            return False
        return True

    def set_irq(self, line: int, level: bool) -> None:
        if self.irqchip == "user":
            if self._ioapic is not None:
                self._ioapic.set_irq(line, level)
            else:
                self.irq_stats["isa_irqs_dropped"] += 1  # no PIC or IOAPIC: the line reaches nothing
            return
        self.vm.irq_line(line, int(level))

    def kick(self) -> None:
        self.mm[1] = 1  # kvm_run.immediate_exit: the next KVM_RUN returns -EINTR at once

    def tsc_hz(self) -> float | None:
        try:
            return self.vcpu.get_tsc_khz() * 1000.0
        except K.KvmError:
            return None

    def capabilities(self) -> dict[str, bool]:
        return {name: value > 0 for name, value in self.system.capabilities().items()}

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.stats:
            out.update(self.stats.read())
        if self.vm_stats:
            out.update(self.vm_stats.read())
        if self.irqchip == "user":
            out.update({f"user_irqchip.{k}": v for k, v in self.irq_stats.items()})
        return out

    def close(self) -> None:
        for reader in (getattr(self, "stats", None), getattr(self, "vm_stats", None)):
            if reader:
                reader.close()
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        self.system.close()
