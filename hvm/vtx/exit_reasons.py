"""Basic VM-exit reasons: Intel SDM Vol. 3C, Appendix C "VMX Basic Exit Reasons".

Names follow Linux's arch/x86/include/uapi/asm/vmx.h without the EXIT_REASON_ prefix.
"""

from __future__ import annotations

from enum import IntEnum


class ExitReason(IntEnum):
    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    SIPI_SIGNAL = 4
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26
    VMON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33
    MSR_LOAD_FAIL = 34
    MWAIT_INSTRUCTION = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR_INSTRUCTION = 39
    PAUSE_INSTRUCTION = 40
    MCE_DURING_VMENTRY = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    GDTR_IDTR = 46
    LDTR_TR = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64
    UMWAIT = 67
    TPAUSE = 68
    BUS_LOCK = 74
    NOTIFY = 75


#: Bit 31 of the exit-reason field: VM-entry failure (SDM 24.9.1).
EXIT_REASON_FAILED_VMENTRY = 1 << 31
