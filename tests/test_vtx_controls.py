"""hvm.vtx.controls and hvm.vtx.capabilities: control bits (SDM 25.6-25.8), VM-entry checks (SDM 27.2.1)."""

from dataclasses import replace

import pytest

from hvm.vtx.capabilities import MODEL_CAPS, AllowedSettings, EptVpidCap
from hvm.vtx.controls import (
    ENTRY_CONTROL_RULES,
    Controls,
    EntryControls,
    ExitControls,
    PinBased,
    ProcBased,
    ProcBased2,
    check_vm_entry_controls,
)
from hvm.vtx.errors import VmxInstructionError
from hvm.vtx.vmcs import VMCS, VmcsField

F = VmcsField
P, P1, P2, X, N = PinBased, ProcBased, ProcBased2, ExitControls, EntryControls
CAPS = MODEL_CAPS
EPTP = 0x5000 | 3 << 3 | 6  # PML4 at 0x5000, page-walk length 4 (bits 5:3 = 3), WB (6)
VALID = 1 << 31  # valid bit of the VM-entry interruption-information field


def vmcs_with(pin=0, proc=0, proc2=0, exit=0, entry=0, **fields) -> VMCS:
    """A VMCS with the model's must-be-1 controls plus these (secondary controls activated if any)."""
    vmcs = VMCS()
    vmcs.vmwrite(F.PIN_BASED_VM_EXEC_CONTROL, CAPS.true_pinbased_ctls.allowed0 | pin)
    activate = P1.ACTIVATE_SECONDARY_CONTROLS if proc2 else 0
    vmcs.vmwrite(F.CPU_BASED_VM_EXEC_CONTROL, CAPS.true_procbased_ctls.allowed0 | proc | activate)
    vmcs.vmwrite(F.SECONDARY_VM_EXEC_CONTROL, proc2)
    vmcs.vmwrite(F.VM_EXIT_CONTROLS, CAPS.true_exit_ctls.allowed0 | X.HOST_ADDRESS_SPACE_SIZE | exit)
    vmcs.vmwrite(F.VM_ENTRY_CONTROLS, CAPS.true_entry_ctls.allowed0 | entry)
    for name, value in fields.items():
        vmcs.vmwrite(F[name], value)
    return vmcs


def raw(vmcs: VMCS, field: VmcsField, value: int) -> VMCS:
    vmcs.vmwrite(field, value)
    return vmcs


def broken_rule(vmcs: VMCS, caps=CAPS) -> str:
    with pytest.raises(VmxInstructionError) as e:
        check_vm_entry_controls(vmcs, caps)
    assert e.value.number == 7
    assert e.value.message == "VM entry with invalid control field(s)"
    return e.value.detail


TPR = {"proc": P1.USE_TPR_SHADOW, "VIRTUAL_APIC_PAGE_ADDR": 0x1000}
APICV = {**TPR, "pin": P.EXTERNAL_INTERRUPT_EXITING}
POSTED = {
    **APICV,
    "pin": P.EXTERNAL_INTERRUPT_EXITING | P.POSTED_INTERRUPTS,
    "proc2": P2.VIRTUAL_INTERRUPT_DELIVERY,
    "exit": X.ACK_INTERRUPT_ON_EXIT,
    "POSTED_INTR_NV": 0xF2,
    "POSTED_INTR_DESC_ADDR": 0x2040,
}
NO_AD = replace(CAPS, ept_vpid_cap=CAPS.ept_vpid_cap & ~EptVpidCap.ACCESSED_DIRTY)

# One VMCS per rule, breaking that rule and no earlier one: (rule name, SDM subsection, VMCS, capabilities).
CASES = [
    # 27.2.1.1: default1 pin-based bits 1, 2, 4 cleared.
    ("pin-reserved", "27.2.1.1", raw(vmcs_with(), F.PIN_BASED_VM_EXEC_CONTROL, 0), CAPS),
    # 27.2.1.1: "activate tertiary controls" is not an allowed 1-setting of the model.
    ("proc-reserved", "27.2.1.1", vmcs_with(proc=P1.ACTIVATE_TERTIARY_CONTROLS), CAPS),
    # 27.2.1.1: secondary bit 15 (ENCLS exiting) is reserved in the model.
    ("proc2-reserved", "27.2.1.1", vmcs_with(proc2=1 << 15), CAPS),
    # 27.2.1.1: five CR3-target values, four supported.
    ("cr3-target-count", "27.2.1.1", vmcs_with(CR3_TARGET_COUNT=5), CAPS),
    # 27.2.1.1: I/O bitmap B at 0x2800 is not 4-KiB aligned.
    (
        "io-bitmap-addresses",
        "27.2.1.1",
        vmcs_with(proc=P1.USE_IO_BITMAPS, IO_BITMAP_A=0x1000, IO_BITMAP_B=0x2800),
        CAPS,
    ),
    # 27.2.1.1: MSR bitmap at 2^46, beyond the model's 46-bit physical addresses.
    ("msr-bitmap-address", "27.2.1.1", vmcs_with(proc=P1.USE_MSR_BITMAPS, MSR_BITMAP=1 << 46), CAPS),
    (
        "virtual-apic-address",
        "27.2.1.1",
        vmcs_with(proc=P1.USE_TPR_SHADOW, VIRTUAL_APIC_PAGE_ADDR=0x1004),
        CAPS,
    ),
    # 27.2.1.1: TPR threshold 10H sets bit 4.
    ("tpr-threshold", "27.2.1.1", vmcs_with(**TPR, TPR_THRESHOLD=0x10), CAPS),
    ("apicv-requires-tpr-shadow", "27.2.1.1", vmcs_with(proc2=P2.VIRTUALIZE_X2APIC_MODE), CAPS),
    ("virtual-nmis-require-nmi-exiting", "27.2.1.1", vmcs_with(pin=P.VIRTUAL_NMIS), CAPS),
    ("nmi-window-requires-virtual-nmis", "27.2.1.1", vmcs_with(proc=P1.NMI_WINDOW_EXITING), CAPS),
    (
        "apic-access-address",
        "27.2.1.1",
        vmcs_with(proc2=P2.VIRTUALIZE_APIC_ACCESSES, APIC_ACCESS_ADDR=0xFEE0_0800),
        CAPS,
    ),
    (
        "x2apic-excludes-apic-accesses",
        "27.2.1.1",
        vmcs_with(
            **TPR, proc2=P2.VIRTUALIZE_X2APIC_MODE | P2.VIRTUALIZE_APIC_ACCESSES, APIC_ACCESS_ADDR=0x2000
        ),
        CAPS,
    ),
    (
        "vid-requires-external-interrupt-exiting",
        "27.2.1.1",
        vmcs_with(**TPR, proc2=P2.VIRTUAL_INTERRUPT_DELIVERY),
        CAPS,
    ),
    ("posted-interrupts-require-vid", "27.2.1.1", vmcs_with(**{**POSTED, "proc2": 0}), CAPS),
    ("posted-interrupts-require-ack", "27.2.1.1", vmcs_with(**{**POSTED, "exit": 0}), CAPS),
    # 27.2.1.1: notification vector 100H sets bit 8.
    ("posted-interrupt-vector", "27.2.1.1", vmcs_with(**{**POSTED, "POSTED_INTR_NV": 0x100}), CAPS),
    # 27.2.1.1: descriptor at 0x2020 is not 64-byte aligned.
    (
        "posted-interrupt-descriptor",
        "27.2.1.1",
        vmcs_with(**{**POSTED, "POSTED_INTR_DESC_ADDR": 0x2020}),
        CAPS,
    ),
    ("vpid-nonzero", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_VPID, VIRTUAL_PROCESSOR_ID=0), CAPS),
    # 27.2.1.1: EPTP memory type 1 (WC) is neither UC nor WB.
    ("eptp-memory-type", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=EPTP & ~7 | 1), CAPS),
    # 27.2.1.1: bits 5:3 = 2 asks for a 3-level walk.
    ("eptp-walk-length", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=0x5000 | 2 << 3 | 6), CAPS),
    # 27.2.1.1: bit 6 set on a processor without EPT A/D flags.
    ("eptp-accessed-dirty", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=EPTP | 1 << 6), NO_AD),
    # 27.2.1.1: bit 8 is in the reserved range 11:7.
    ("eptp-reserved", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=EPTP | 1 << 8), CAPS),
    ("pml-requires-ept", "27.2.1.1", vmcs_with(proc2=P2.ENABLE_PML, PML_ADDRESS=0x3000), CAPS),
    (
        "pml-address",
        "27.2.1.1",
        vmcs_with(proc2=P2.ENABLE_EPT | P2.ENABLE_PML, EPT_POINTER=EPTP, PML_ADDRESS=0x3008),
        CAPS,
    ),
    ("unrestricted-guest-requires-ept", "27.2.1.1", vmcs_with(proc2=P2.UNRESTRICTED_GUEST), CAPS),
    ("mode-based-execute-requires-ept", "27.2.1.1", vmcs_with(proc2=P2.MODE_BASED_EPT_EXECUTE), CAPS),
    (
        "ve-information-address",
        "27.2.1.1",
        vmcs_with(proc2=P2.ENABLE_EPT | P2.EPT_VIOLATION_VE, EPT_POINTER=EPTP, VE_INFORMATION_ADDRESS=0x10),
        CAPS,
    ),
    # 27.2.1.1: VM function 1 is not supported (IA32_VMX_VMFUNC = 1: EPTP switching only).
    (
        "vm-function-reserved",
        "27.2.1.1",
        vmcs_with(proc2=P2.ENABLE_VM_FUNCTIONS, VM_FUNCTION_CONTROL=0b10),
        CAPS,
    ),
    (
        "eptp-switching-requires-ept",
        "27.2.1.1",
        vmcs_with(proc2=P2.ENABLE_VM_FUNCTIONS, VM_FUNCTION_CONTROL=1, EPTP_LIST_ADDRESS=0x3000),
        CAPS,
    ),
    (
        "eptp-list-address",
        "27.2.1.1",
        vmcs_with(
            proc2=P2.ENABLE_EPT | P2.ENABLE_VM_FUNCTIONS,
            EPT_POINTER=EPTP,
            VM_FUNCTION_CONTROL=1,
            EPTP_LIST_ADDRESS=0x3001,
        ),
        CAPS,
    ),
    (
        "vmcs-shadowing-bitmaps",
        "27.2.1.1",
        vmcs_with(proc2=P2.VMCS_SHADOWING, VMREAD_BITMAP=0x1000, VMWRITE_BITMAP=0x1800),
        CAPS,
    ),
    ("tsc-multiplier-nonzero", "27.2.1.1", vmcs_with(proc2=P2.USE_TSC_SCALING, TSC_MULTIPLIER=0), CAPS),
    # 27.2.1.2: exit control 23 ("clear IA32_BNDCFGS") is reserved in the model.
    ("exit-reserved", "27.2.1.2", vmcs_with(exit=1 << 23), CAPS),
    (
        "save-preemption-timer-requires-timer",
        "27.2.1.2",
        vmcs_with(exit=X.SAVE_PREEMPTION_TIMER),
        CAPS,
    ),
    # 27.2.1.2: 0x1008 is not 16-byte aligned.
    (
        "exit-msr-store-area",
        "27.2.1.2",
        vmcs_with(VM_EXIT_MSR_STORE_COUNT=1, VM_EXIT_MSR_STORE_ADDR=0x1008),
        CAPS,
    ),
    # 27.2.1.2: two 16-byte entries from 2^46 - 16: the last byte, 2^46 + 15, is beyond 46 bits.
    (
        "exit-msr-load-area",
        "27.2.1.2",
        vmcs_with(VM_EXIT_MSR_LOAD_COUNT=2, VM_EXIT_MSR_LOAD_ADDR=(1 << 46) - 16),
        CAPS,
    ),
    # 27.2.1.3: "entry to SMM" is not an allowed 1-setting of the model (no SMM).
    ("entry-reserved", "27.2.1.3", vmcs_with(entry=N.ENTRY_TO_SMM), CAPS),
    # 27.2.1.3: interruption type 1 is reserved.
    ("injection-type", "27.2.1.3", vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 1 << 8), CAPS),
    # 27.2.1.3: an NMI (type 2) must have vector 2, not 3.
    ("injection-vector", "27.2.1.3", vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 2 << 8 | 3), CAPS),
    # 27.2.1.3: #GP (13), a hardware exception (3), in protected mode must deliver its error code.
    ("injection-error-code-valid", "27.2.1.3", vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 3 << 8 | 13), CAPS),
    # 27.2.1.3: #UD (6) with bit 12 set.
    (
        "injection-reserved",
        "27.2.1.3",
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 1 << 12 | 3 << 8 | 6),
        CAPS,
    ),
    # 27.2.1.3: #GP with error code 10000H (bit 16 set).
    (
        "injection-error-code",
        "27.2.1.3",
        vmcs_with(
            VM_ENTRY_INTR_INFO_FIELD=VALID | 1 << 11 | 3 << 8 | 13, VM_ENTRY_EXCEPTION_ERROR_CODE=0x1_0000
        ),
        CAPS,
    ),
    # 27.2.1.3: INT 80H (software interrupt, type 4) with instruction length 0.
    (
        "injection-instruction-length",
        "27.2.1.3",
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 4 << 8 | 0x80, VM_ENTRY_INSTRUCTION_LEN=0),
        CAPS,
    ),
    (
        "entry-msr-load-area",
        "27.2.1.3",
        vmcs_with(VM_ENTRY_MSR_LOAD_COUNT=1, VM_ENTRY_MSR_LOAD_ADDR=0x1004),
        CAPS,
    ),
]


@pytest.mark.parametrize("name, section, vmcs, caps", CASES, ids=[case[0] for case in CASES])
def test_rule_violation_fails_vm_entry_with_error_7(name, section, vmcs, caps):
    rule = next(rule for rule in ENTRY_CONTROL_RULES if rule.name == name)
    assert rule.section == section
    assert broken_rule(vmcs, caps) == f"SDM {section}: {rule.text}"


def test_every_rule_has_a_case():
    assert [case[0] for case in CASES] == [rule.name for rule in ENTRY_CONTROL_RULES]


@pytest.mark.parametrize(
    "vmcs",
    [
        vmcs_with(),
        # 27.2.1.1: secondary controls are not checked (and act as 0) without "activate secondary controls".
        raw(vmcs_with(), F.SECONDARY_VM_EXEC_CONTROL, 0xFFFF_FFFF),
        vmcs_with(proc=P1.USE_IO_BITMAPS | P1.USE_MSR_BITMAPS, IO_BITMAP_A=0x1000, IO_BITMAP_B=0x2000),
        vmcs_with(pin=P.NMI_EXITING | P.VIRTUAL_NMIS, proc=P1.NMI_WINDOW_EXITING),
        # 27.2.1.1: with virtual-interrupt delivery, TPR threshold bits 31:4 are not checked.
        vmcs_with(**POSTED, TPR_THRESHOLD=0xFFFF_FFF0),
        vmcs_with(proc2=P2.ENABLE_EPT | P2.UNRESTRICTED_GUEST, EPT_POINTER=EPTP | 1 << 6),  # A/D supported
        vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=0x5000 | 4 << 3),  # 5-level walk, UC
        vmcs_with(proc2=P2.ENABLE_VPID, VIRTUAL_PROCESSOR_ID=1),
        vmcs_with(pin=P.PREEMPTION_TIMER, exit=X.SAVE_PREEMPTION_TIMER),
        vmcs_with(proc2=P2.USE_TSC_SCALING, TSC_MULTIPLIER=1 << 48),
        vmcs_with(VM_EXIT_MSR_STORE_COUNT=0, VM_EXIT_MSR_STORE_ADDR=0x1234_5677),  # empty list: not checked
        vmcs_with(VM_ENTRY_MSR_LOAD_COUNT=4, VM_ENTRY_MSR_LOAD_ADDR=(1 << 46) - 64),  # ends at 2^46 - 1
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=3 << 8 | 13),  # not valid: nothing else checked
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 2 << 8 | 2),  # NMI
        vmcs_with(
            VM_ENTRY_INTR_INFO_FIELD=VALID | 1 << 11 | 3 << 8 | 14, VM_ENTRY_EXCEPTION_ERROR_CODE=0xFFFF
        ),
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 7 << 8),  # pending MTF VM exit
        vmcs_with(VM_ENTRY_INTR_INFO_FIELD=VALID | 6 << 8 | 3, VM_ENTRY_INSTRUCTION_LEN=1),  # INT3
        # 27.2.1.3: unrestricted guest in real mode (CR0.PE = 0): #GP is injected without an error code.
        vmcs_with(
            proc2=P2.ENABLE_EPT | P2.UNRESTRICTED_GUEST,
            EPT_POINTER=EPTP,
            GUEST_CR0=0,
            VM_ENTRY_INTR_INFO_FIELD=VALID | 3 << 8 | 13,
        ),
    ],
)
def test_valid_controls_pass(vmcs):
    check_vm_entry_controls(vmcs)


def test_five_level_eptp_follows_capabilities():
    no_5level = replace(CAPS, ept_vpid_cap=CAPS.ept_vpid_cap & ~EptVpidCap.PAGE_WALK_5)
    vmcs = vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=0x5000 | 4 << 3 | 6)
    check_vm_entry_controls(vmcs)
    assert "page-walk length" in broken_rule(vmcs, no_5level)


@pytest.mark.parametrize(
    "flag, bit",
    [
        (P.EXTERNAL_INTERRUPT_EXITING, 0),
        (P.NMI_EXITING, 3),
        (P.VIRTUAL_NMIS, 5),
        (P.PREEMPTION_TIMER, 6),
        (P.POSTED_INTERRUPTS, 7),
        (P1.INTERRUPT_WINDOW_EXITING, 2),
        (P1.USE_TSC_OFFSETTING, 3),
        (P1.HLT_EXITING, 7),
        (P1.INVLPG_EXITING, 9),
        (P1.MWAIT_EXITING, 10),
        (P1.RDPMC_EXITING, 11),
        (P1.RDTSC_EXITING, 12),
        (P1.CR3_LOAD_EXITING, 15),
        (P1.CR3_STORE_EXITING, 16),
        (P1.ACTIVATE_TERTIARY_CONTROLS, 17),
        (P1.CR8_LOAD_EXITING, 19),
        (P1.CR8_STORE_EXITING, 20),
        (P1.USE_TPR_SHADOW, 21),
        (P1.NMI_WINDOW_EXITING, 22),
        (P1.MOV_DR_EXITING, 23),
        (P1.UNCONDITIONAL_IO_EXITING, 24),
        (P1.USE_IO_BITMAPS, 25),
        (P1.MONITOR_TRAP_FLAG, 27),
        (P1.USE_MSR_BITMAPS, 28),
        (P1.MONITOR_EXITING, 29),
        (P1.PAUSE_EXITING, 30),
        (P1.ACTIVATE_SECONDARY_CONTROLS, 31),
        (P2.VIRTUALIZE_APIC_ACCESSES, 0),
        (P2.ENABLE_EPT, 1),
        (P2.DESCRIPTOR_TABLE_EXITING, 2),
        (P2.ENABLE_RDTSCP, 3),
        (P2.VIRTUALIZE_X2APIC_MODE, 4),
        (P2.ENABLE_VPID, 5),
        (P2.WBINVD_EXITING, 6),
        (P2.UNRESTRICTED_GUEST, 7),
        (P2.APIC_REGISTER_VIRTUALIZATION, 8),
        (P2.VIRTUAL_INTERRUPT_DELIVERY, 9),
        (P2.PAUSE_LOOP_EXITING, 10),
        (P2.RDRAND_EXITING, 11),
        (P2.ENABLE_INVPCID, 12),
        (P2.ENABLE_VM_FUNCTIONS, 13),
        (P2.VMCS_SHADOWING, 14),
        (P2.RDSEED_EXITING, 16),
        (P2.ENABLE_PML, 17),
        (P2.EPT_VIOLATION_VE, 18),
        (P2.ENABLE_XSAVES, 20),
        (P2.MODE_BASED_EPT_EXECUTE, 22),
        (P2.USE_TSC_SCALING, 25),
        (X.SAVE_DEBUG_CONTROLS, 2),
        (X.HOST_ADDRESS_SPACE_SIZE, 9),
        (X.ACK_INTERRUPT_ON_EXIT, 15),
        (X.SAVE_PAT, 18),
        (X.LOAD_PAT, 19),
        (X.SAVE_EFER, 20),
        (X.LOAD_EFER, 21),
        (X.SAVE_PREEMPTION_TIMER, 22),
        (N.LOAD_DEBUG_CONTROLS, 2),
        (N.IA32E_MODE_GUEST, 9),
        (N.LOAD_PAT, 14),
        (N.LOAD_EFER, 15),
    ],
)
def test_control_bit_positions(flag, bit):
    # SDM 25.6.1, 25.6.2, 25.7.1, 25.8.1 tables of control definitions.
    assert flag == 1 << bit


def test_capabilities_allow_every_named_control_but_tertiary_and_smm():
    assert CAPS.true_pinbased_ctls.permits(CAPS.true_pinbased_ctls.allowed0 | sum(P))
    supported = sum(P1) & ~P1.ACTIVATE_TERTIARY_CONTROLS
    assert CAPS.true_procbased_ctls.permits(CAPS.true_procbased_ctls.allowed0 | supported)
    assert CAPS.procbased_ctls2.permits(sum(P2))
    exit_supported = sum(X) & ~X.LOAD_PERF_GLOBAL_CTRL
    assert CAPS.true_exit_ctls.permits(CAPS.true_exit_ctls.allowed0 | exit_supported)
    no_smm = sum(N) & ~(N.ENTRY_TO_SMM | N.DEACTIVATE_DUAL_MONITOR | N.LOAD_PERF_GLOBAL_CTRL)
    assert CAPS.true_entry_ctls.permits(CAPS.true_entry_ctls.allowed0 | no_smm)


def test_allowed_settings():
    # SDM A.3.1: bits 31:0 = allowed 0-settings (1 = must be 1), bits 63:32 = allowed 1-settings.
    caps = AllowedSettings(allowed0=0b0110, allowed1=0b1111)
    assert caps.msr == 0xF_0000_0006
    assert caps.permits(0b0110) and caps.permits(0b1111)
    assert not caps.permits(0b0100)  # bit 1 must be 1
    assert not caps.permits(0b1_0110)  # bit 4 must be 0
    assert caps.adjust(0b1_0001) == 0b0111
    # The model's TRUE_PINBASED value, as RDMSR would return it: default1 bits 1, 2, 4; allowed 0-7.
    assert CAPS.true_pinbased_ctls.msr == 0xFF_0000_0016


def test_controls_read_treats_inactive_secondary_as_zero():
    vmcs = raw(vmcs_with(), F.SECONDARY_VM_EXEC_CONTROL, P2.ENABLE_EPT)
    assert Controls.read(vmcs).proc2 == 0
    vmcs = vmcs_with(proc2=P2.ENABLE_EPT, EPT_POINTER=EPTP)
    assert Controls.read(vmcs).proc2 == P2.ENABLE_EPT
