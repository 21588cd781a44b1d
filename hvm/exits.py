"""One exit vocabulary for every engine.

An engine turns "run the vCPU" into one :class:`Exit`. Its ``kind`` comes from
:class:`ExitKind`; each kind names the Intel SDM basic exit reason that a VT-x
processor reports for the same event (``None`` where the event is not a VM exit
at all, e.g. a host signal or an emulator failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hvm.vtx.exit_reasons import ExitReason


class ExitKind(StrEnum):
    IO = "io"
    MMIO = "mmio"
    HLT = "hlt"
    CPUID = "cpuid"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    RDTSC = "rdtsc"
    RDTSCP = "rdtscp"
    INVLPG = "invlpg"
    CR_ACCESS = "cr_access"
    DR_ACCESS = "dr_access"
    PAUSE = "pause"
    MWAIT = "mwait"
    MONITOR = "monitor"
    RDPMC = "rdpmc"
    VMCALL = "vmcall"
    EXCEPTION = "exception"
    EXTERNAL_INTERRUPT = "external_interrupt"
    INTERRUPT_WINDOW = "interrupt_window"
    PREEMPTION_TIMER = "preemption_timer"
    DESCRIPTOR_TABLE = "descriptor_table"
    EPT_VIOLATION = "ept_violation"
    EPT_MISCONFIG = "ept_misconfig"
    APIC_ACCESS = "apic_access"
    SHUTDOWN = "shutdown"  # triple fault
    FAIL_ENTRY = "fail_entry"
    INTERNAL_ERROR = "internal_error"
    SYSTEM_EVENT = "system_event"
    DEBUG = "debug"
    INTR = "intr"  # the host interrupted the run (signal, timeout); not a VM exit

    @property
    def sdm_reason(self) -> ExitReason | None:
        return SDM_REASON[self]


SDM_REASON: dict[ExitKind, ExitReason | None] = {
    ExitKind.IO: ExitReason.IO_INSTRUCTION,
    # MMIO reaches a VT-x hypervisor as an EPT violation or (KVM's MMIO SPTEs) misconfiguration.
    ExitKind.MMIO: ExitReason.EPT_VIOLATION,
    ExitKind.HLT: ExitReason.HLT,
    ExitKind.CPUID: ExitReason.CPUID,
    ExitKind.RDMSR: ExitReason.MSR_READ,
    ExitKind.WRMSR: ExitReason.MSR_WRITE,
    ExitKind.RDTSC: ExitReason.RDTSC,
    ExitKind.RDTSCP: ExitReason.RDTSCP,
    ExitKind.INVLPG: ExitReason.INVLPG,
    ExitKind.CR_ACCESS: ExitReason.CR_ACCESS,
    ExitKind.DR_ACCESS: ExitReason.DR_ACCESS,
    ExitKind.PAUSE: ExitReason.PAUSE_INSTRUCTION,
    ExitKind.MWAIT: ExitReason.MWAIT_INSTRUCTION,
    ExitKind.MONITOR: ExitReason.MONITOR_INSTRUCTION,
    ExitKind.RDPMC: ExitReason.RDPMC,
    ExitKind.VMCALL: ExitReason.VMCALL,
    ExitKind.EXCEPTION: ExitReason.EXCEPTION_NMI,
    ExitKind.EXTERNAL_INTERRUPT: ExitReason.EXTERNAL_INTERRUPT,
    ExitKind.INTERRUPT_WINDOW: ExitReason.INTERRUPT_WINDOW,
    ExitKind.PREEMPTION_TIMER: ExitReason.PREEMPTION_TIMER,
    ExitKind.DESCRIPTOR_TABLE: ExitReason.GDTR_IDTR,
    ExitKind.EPT_VIOLATION: ExitReason.EPT_VIOLATION,
    ExitKind.EPT_MISCONFIG: ExitReason.EPT_MISCONFIG,
    ExitKind.APIC_ACCESS: ExitReason.APIC_ACCESS,
    ExitKind.SHUTDOWN: ExitReason.TRIPLE_FAULT,
    ExitKind.FAIL_ENTRY: ExitReason.INVALID_STATE,
    ExitKind.INTERNAL_ERROR: None,
    ExitKind.SYSTEM_EVENT: None,
    ExitKind.DEBUG: ExitReason.EXCEPTION_NMI,
    ExitKind.INTR: None,
}


@dataclass(slots=True)
class Exit:
    """One exit from guest execution, as every engine reports it.

    I/O: ``port``, ``size`` (bytes per element), ``count`` (elements, >1 for REP
    string I/O), ``is_write``; ``data`` holds the bytes written (``size*count``).
    MMIO: ``addr`` (guest-physical), ``size``, ``is_write``, ``data``.
    RDMSR/WRMSR: ``addr`` is the MSR index, ``data`` the 8-byte value written.
    ``qualification`` is the SDM exit qualification where the engine knows it;
    ``detail`` a human-readable note (internal errors, fail-entry reasons).
    """

    kind: ExitKind
    port: int = 0
    addr: int = 0
    size: int = 0
    count: int = 1
    is_write: bool = False
    data: bytes = b""
    qualification: int = 0
    detail: str = ""

    @property
    def sdm_reason(self) -> ExitReason | None:
        return SDM_REASON[self.kind]
