"""VMX controls and the VM-entry checks on them: Intel SDM Vol. 3C, 25.6-25.8 and 27.2.1.

The five 32-bit control vectors are :class:`IntFlag` types; :class:`Controls`
reads them from a VMCS. VM entry (VMLAUNCH/VMRESUME) first checks the control
fields; :func:`check_vm_entry_controls` runs those checks::

    check_vm_entry_controls(vmcs)   # raises VmxInstructionError(7, "<SDM section>: <rule>")

Each check is a :class:`Rule` in :data:`ENTRY_CONTROL_RULES`: data, with the
SDM subsection that states it. Allowed control settings come from the model's
capability MSRs (:data:`hvm.vtx.capabilities.MODEL_CAPS`).

Section numbers are those of the current SDM (VM entries are chapter 27; in
editions before 2023 they are one lower, e.g. 26.2.1 for 27.2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag

from hvm.vtx.capabilities import MODEL_CAPS, EptVpidCap, VmxCapabilities
from hvm.vtx.errors import VmInstructionErrorNumber, VmxInstructionError
from hvm.vtx.regs import Cr0
from hvm.vtx.vmcs import VMCS, VmcsField


class PinBased(IntFlag):
    """Pin-based VM-execution controls (SDM 25.6.1, table "Definitions of Pin-Based ... Controls")."""

    EXTERNAL_INTERRUPT_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    PREEMPTION_TIMER = 1 << 6  # "activate VMX-preemption timer"
    POSTED_INTERRUPTS = 1 << 7  # "process posted interrupts"


class ProcBased(IntFlag):
    """Primary processor-based VM-execution controls (SDM 25.6.2, table "... Primary ...")."""

    INTERRUPT_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    USE_TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCONDITIONAL_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class ProcBased2(IntFlag):
    """Secondary processor-based VM-execution controls (SDM 25.6.2, table "... Secondary ...")."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESCRIPTOR_TABLE_EXITING = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC_MODE = 1 << 4
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRTUALIZATION = 1 << 8
    VIRTUAL_INTERRUPT_DELIVERY = 1 << 9
    PAUSE_LOOP_EXITING = 1 << 10
    RDRAND_EXITING = 1 << 11
    ENABLE_INVPCID = 1 << 12
    ENABLE_VM_FUNCTIONS = 1 << 13
    VMCS_SHADOWING = 1 << 14
    RDSEED_EXITING = 1 << 16
    ENABLE_PML = 1 << 17
    EPT_VIOLATION_VE = 1 << 18
    ENABLE_XSAVES = 1 << 20
    MODE_BASED_EPT_EXECUTE = 1 << 22
    USE_TSC_SCALING = 1 << 25


class ExitControls(IntFlag):
    """Primary VM-exit controls (SDM 25.7.1, table "Definitions of Primary VM-Exit Controls")."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDRESS_SPACE_SIZE = 1 << 9
    LOAD_PERF_GLOBAL_CTRL = 1 << 12
    ACK_INTERRUPT_ON_EXIT = 1 << 15
    SAVE_PAT = 1 << 18
    LOAD_PAT = 1 << 19
    SAVE_EFER = 1 << 20
    LOAD_EFER = 1 << 21
    SAVE_PREEMPTION_TIMER = 1 << 22


class EntryControls(IntFlag):
    """VM-entry controls (SDM 25.8.1, table "Definitions of VM-Entry Controls")."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE_GUEST = 1 << 9
    ENTRY_TO_SMM = 1 << 10
    DEACTIVATE_DUAL_MONITOR = 1 << 11
    LOAD_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_PAT = 1 << 14
    LOAD_EFER = 1 << 15


class VmFunction(IntFlag):
    """VM-function controls (SDM 25.6.14)."""

    EPTP_SWITCHING = 1 << 0


F = VmcsField
P, P1, P2, X, N = PinBased, ProcBased, ProcBased2, ExitControls, EntryControls


@dataclass(frozen=True)
class Controls:
    """The control vectors of one VMCS, as the processor interprets them."""

    pin: PinBased
    proc: ProcBased
    proc2: ProcBased2  # 0 unless "activate secondary controls" is 1
    exit: ExitControls
    entry: EntryControls

    @classmethod
    def read(cls, vmcs: VMCS) -> Controls:
        """The controls of ``vmcs`` (no checks: see :func:`check_vm_entry_controls`)."""
        proc = ProcBased(vmcs.vmread(VmcsField.CPU_BASED_VM_EXEC_CONTROL))
        # SDM 27.2.1.1: with "activate secondary controls" 0, the processor acts as if
        # all secondary processor-based controls were 0.
        proc2 = 0
        if proc & ProcBased.ACTIVATE_SECONDARY_CONTROLS:
            proc2 = vmcs.vmread(VmcsField.SECONDARY_VM_EXEC_CONTROL)
        return cls(
            pin=PinBased(vmcs.vmread(VmcsField.PIN_BASED_VM_EXEC_CONTROL)),
            proc=proc,
            proc2=ProcBased2(proc2),
            exit=ExitControls(vmcs.vmread(VmcsField.VM_EXIT_CONTROLS)),
            entry=EntryControls(vmcs.vmread(VmcsField.VM_ENTRY_CONTROLS)),
        )


@dataclass(frozen=True)
class EntryCheckState:
    """What a :class:`Rule` looks at: the VMCS, its controls, and the capabilities."""

    vmcs: VMCS
    caps: VmxCapabilities
    c: Controls

    def f(self, field: VmcsField) -> int:
        """VMREAD of ``field``."""
        return self.vmcs.vmread(field)

    def address_ok(self, field: VmcsField, alignment: int = 4096) -> bool:
        """Aligned, and no bit set beyond the physical-address width (the SDM's usual address rule)."""
        address = self.f(field)
        return address % alignment == 0 and address >> self.caps.phys_addr_width == 0

    @property
    def eptp(self) -> int:
        return self.f(F.EPT_POINTER)

    @property
    def injecting(self) -> bool:
        """Valid bit (31) of the VM-entry interruption-information field (SDM 25.8.3)."""
        return bool(self.f(F.VM_ENTRY_INTR_INFO_FIELD) >> 31)

    @property
    def injected_type(self) -> int:
        """Interruption type, bits 10:8 of the VM-entry interruption-information field."""
        return self.f(F.VM_ENTRY_INTR_INFO_FIELD) >> 8 & 7

    @property
    def injected_vector(self) -> int:
        """Vector, bits 7:0 of the VM-entry interruption-information field."""
        return self.f(F.VM_ENTRY_INTR_INFO_FIELD) & 0xFF

    def msr_area_ok(self, count: VmcsField, address: VmcsField) -> bool:
        """SDM 27.2.1.2-3: a non-empty MSR area is 16-byte aligned and ends within the address width."""
        n = self.f(count)
        last = self.f(address) + n * 16 - 1
        return n == 0 or (self.address_ok(address, 16) and last >> self.caps.phys_addr_width == 0)


@dataclass(frozen=True)
class Rule:
    """One VM-entry check: ``holds`` is True when the VMCS satisfies it."""

    name: str
    section: str  # SDM Vol. 3C subsection stating the rule
    text: str
    holds: Callable[[EntryCheckState], bool]


def _implies(condition: int | bool, consequence: int | bool) -> bool:
    return not condition or bool(consequence)


# SDM 27.2.1.1: EPTP memory types the capability MSR may allow (bit 8: UC = 0, bit 14: WB = 6).
_EPTP_MEMTYPE_CAP = {0: EptVpidCap.MEMTYPE_UC, 6: EptVpidCap.MEMTYPE_WB}
# SDM 27.2.1.1: EPTP bits 5:3 hold the page-walk length minus 1 (3: four levels, 4: five levels).
_EPTP_WALK_CAP = {3: EptVpidCap.PAGE_WALK_4, 4: EptVpidCap.PAGE_WALK_5}
# SDM 27.2.1.3: hardware exceptions that deliver an error code (#DF #TS #NP #SS #GP #PF #AC #CP).
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


def _error_code_expected(s: EntryCheckState) -> bool:
    protected = not s.c.proc2 & P2.UNRESTRICTED_GUEST or s.f(F.GUEST_CR0) & Cr0.PE
    return bool(protected) and s.injected_type == 3 and s.injected_vector in _ERROR_CODE_VECTORS


ENTRY_CONTROL_RULES: tuple[Rule, ...] = (
    # --- SDM 27.2.1.1 "VM-Execution Control Fields" ---
    Rule("pin-reserved", "27.2.1.1",
         "reserved bits in the pin-based VM-execution controls must be set properly "
         "(IA32_VMX_TRUE_PINBASED_CTLS)",
         lambda s: s.caps.true_pinbased_ctls.permits(s.c.pin)),
    Rule("proc-reserved", "27.2.1.1",
         "reserved bits in the primary processor-based VM-execution controls must be set properly "
         "(IA32_VMX_TRUE_PROCBASED_CTLS)",
         lambda s: s.caps.true_procbased_ctls.permits(s.c.proc)),
    Rule("proc2-reserved", "27.2.1.1",
         "with \"activate secondary controls\" 1, reserved secondary processor-based controls must be 0 "
         "(IA32_VMX_PROCBASED_CTLS2)",
         lambda s: s.caps.procbased_ctls2.permits(s.c.proc2)),
    Rule("cr3-target-count", "27.2.1.1",
         "the CR3-target count must not be greater than 4 (IA32_VMX_MISC[24:16])",
         lambda s: s.f(F.CR3_TARGET_COUNT) <= s.caps.cr3_target_count),
    Rule("io-bitmap-addresses", "27.2.1.1",
         "with \"use I/O bitmaps\" 1, each I/O-bitmap address must be 4-KByte aligned and within the "
         "physical-address width",
         lambda s: _implies(s.c.proc & P1.USE_IO_BITMAPS,
                            s.address_ok(F.IO_BITMAP_A) and s.address_ok(F.IO_BITMAP_B))),
    Rule("msr-bitmap-address", "27.2.1.1",
         "with \"use MSR bitmaps\" 1, the MSR-bitmap address must be 4-KByte aligned and within the "
         "physical-address width",
         lambda s: _implies(s.c.proc & P1.USE_MSR_BITMAPS, s.address_ok(F.MSR_BITMAP))),
    Rule("virtual-apic-address", "27.2.1.1",
         "with \"use TPR shadow\" 1, the virtual-APIC address must be 4-KByte aligned and within the "
         "physical-address width",
         lambda s: _implies(s.c.proc & P1.USE_TPR_SHADOW, s.address_ok(F.VIRTUAL_APIC_PAGE_ADDR))),
    Rule("tpr-threshold", "27.2.1.1",
         "with \"use TPR shadow\" 1 and \"virtual-interrupt delivery\" 0, bits 31:4 of the TPR threshold "
         "must be 0",
         lambda s: _implies(s.c.proc & P1.USE_TPR_SHADOW and not s.c.proc2 & P2.VIRTUAL_INTERRUPT_DELIVERY,
                            s.f(F.TPR_THRESHOLD) >> 4 == 0)),
    Rule("apicv-requires-tpr-shadow", "27.2.1.1",
         "with \"use TPR shadow\" 0, \"virtualize x2APIC mode\", \"APIC-register virtualization\" and "
         "\"virtual-interrupt delivery\" must be 0",
         lambda s: _implies(not s.c.proc & P1.USE_TPR_SHADOW,
                            not s.c.proc2 & (P2.VIRTUALIZE_X2APIC_MODE | P2.APIC_REGISTER_VIRTUALIZATION
                                             | P2.VIRTUAL_INTERRUPT_DELIVERY))),
    Rule("virtual-nmis-require-nmi-exiting", "27.2.1.1",
         "with \"NMI exiting\" 0, \"virtual NMIs\" must be 0",
         lambda s: _implies(s.c.pin & P.VIRTUAL_NMIS, s.c.pin & P.NMI_EXITING)),
    Rule("nmi-window-requires-virtual-nmis", "27.2.1.1",
         "with \"virtual NMIs\" 0, \"NMI-window exiting\" must be 0",
         lambda s: _implies(s.c.proc & P1.NMI_WINDOW_EXITING, s.c.pin & P.VIRTUAL_NMIS)),
    Rule("apic-access-address", "27.2.1.1",
         "with \"virtualize APIC accesses\" 1, the APIC-access address must be 4-KByte aligned and within "
         "the physical-address width",
         lambda s: _implies(s.c.proc2 & P2.VIRTUALIZE_APIC_ACCESSES, s.address_ok(F.APIC_ACCESS_ADDR))),
    Rule("x2apic-excludes-apic-accesses", "27.2.1.1",
         "with \"virtualize x2APIC mode\" 1, \"virtualize APIC accesses\" must be 0",
         lambda s: _implies(s.c.proc2 & P2.VIRTUALIZE_X2APIC_MODE,
                            not s.c.proc2 & P2.VIRTUALIZE_APIC_ACCESSES)),
    Rule("vid-requires-external-interrupt-exiting", "27.2.1.1",
         "with \"virtual-interrupt delivery\" 1, \"external-interrupt exiting\" must be 1",
         lambda s: _implies(s.c.proc2 & P2.VIRTUAL_INTERRUPT_DELIVERY,
                            s.c.pin & P.EXTERNAL_INTERRUPT_EXITING)),
    Rule("posted-interrupts-require-vid", "27.2.1.1",
         "with \"process posted interrupts\" 1, \"virtual-interrupt delivery\" must be 1",
         lambda s: _implies(s.c.pin & P.POSTED_INTERRUPTS, s.c.proc2 & P2.VIRTUAL_INTERRUPT_DELIVERY)),
    Rule("posted-interrupts-require-ack", "27.2.1.1",
         "with \"process posted interrupts\" 1, the \"acknowledge interrupt on exit\" VM-exit control "
         "must be 1",
         lambda s: _implies(s.c.pin & P.POSTED_INTERRUPTS, s.c.exit & X.ACK_INTERRUPT_ON_EXIT)),
    Rule("posted-interrupt-vector", "27.2.1.1",
         "with \"process posted interrupts\" 1, bits 15:8 of the posted-interrupt notification vector "
         "must be 0",
         lambda s: _implies(s.c.pin & P.POSTED_INTERRUPTS, s.f(F.POSTED_INTR_NV) >> 8 == 0)),
    Rule("posted-interrupt-descriptor", "27.2.1.1",
         "with \"process posted interrupts\" 1, the posted-interrupt descriptor address must be 64-byte "
         "aligned and within the physical-address width",
         lambda s: _implies(s.c.pin & P.POSTED_INTERRUPTS, s.address_ok(F.POSTED_INTR_DESC_ADDR, 64))),
    Rule("vpid-nonzero", "27.2.1.1",
         "with \"enable VPID\" 1, the VPID must not be 0000H",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_VPID, s.f(F.VIRTUAL_PROCESSOR_ID) != 0)),
    Rule("eptp-memory-type", "27.2.1.1",
         "with \"enable EPT\" 1, the EPTP memory type (bits 2:0) must be one IA32_VMX_EPT_VPID_CAP allows "
         "(UC or WB)",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_EPT,
                            s.caps.ept_vpid_cap & _EPTP_MEMTYPE_CAP.get(s.eptp & 7, 0))),
    Rule("eptp-walk-length", "27.2.1.1",
         "with \"enable EPT\" 1, EPTP bits 5:3 (page-walk length - 1) must be 3, or 4 if 5-level EPT is "
         "supported",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_EPT,
                            s.caps.ept_vpid_cap & _EPTP_WALK_CAP.get(s.eptp >> 3 & 7, 0))),
    Rule("eptp-accessed-dirty", "27.2.1.1",
         "with \"enable EPT\" 1, EPTP bit 6 (accessed and dirty flags) must be 0 unless "
         "IA32_VMX_EPT_VPID_CAP[21] is 1",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_EPT and s.eptp & 1 << 6,
                            s.caps.ept_vpid_cap & EptVpidCap.ACCESSED_DIRTY)),
    Rule("eptp-reserved", "27.2.1.1",
         "with \"enable EPT\" 1, EPTP bits 11:7 and bits 63:N (N = physical-address width) must be 0",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_EPT,
                            s.eptp & 0xF80 == 0 and s.eptp >> s.caps.phys_addr_width == 0)),
    Rule("pml-requires-ept", "27.2.1.1",
         "with \"enable PML\" 1, \"enable EPT\" must be 1",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_PML, s.c.proc2 & P2.ENABLE_EPT)),
    Rule("pml-address", "27.2.1.1",
         "with \"enable PML\" 1, the PML address must be 4-KByte aligned and within the "
         "physical-address width",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_PML, s.address_ok(F.PML_ADDRESS))),
    Rule("unrestricted-guest-requires-ept", "27.2.1.1",
         "with \"unrestricted guest\" 1, \"enable EPT\" must be 1",
         lambda s: _implies(s.c.proc2 & P2.UNRESTRICTED_GUEST, s.c.proc2 & P2.ENABLE_EPT)),
    Rule("mode-based-execute-requires-ept", "27.2.1.1",
         "with \"mode-based execute control for EPT\" 1, \"enable EPT\" must be 1",
         lambda s: _implies(s.c.proc2 & P2.MODE_BASED_EPT_EXECUTE, s.c.proc2 & P2.ENABLE_EPT)),
    Rule("ve-information-address", "27.2.1.1",
         "with \"EPT-violation #VE\" 1, the virtualization-exception information address must be 4-KByte "
         "aligned and within the physical-address width",
         lambda s: _implies(s.c.proc2 & P2.EPT_VIOLATION_VE, s.address_ok(F.VE_INFORMATION_ADDRESS))),
    Rule("vm-function-reserved", "27.2.1.1",
         "with \"enable VM functions\" 1, reserved VM-function controls must be 0 (IA32_VMX_VMFUNC)",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_VM_FUNCTIONS,
                            s.f(F.VM_FUNCTION_CONTROL) & ~s.caps.vmfunc == 0)),
    Rule("eptp-switching-requires-ept", "27.2.1.1",
         "with the \"EPTP switching\" VM function enabled, \"enable EPT\" must be 1",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_VM_FUNCTIONS
                            and s.f(F.VM_FUNCTION_CONTROL) & VmFunction.EPTP_SWITCHING,
                            s.c.proc2 & P2.ENABLE_EPT)),
    Rule("eptp-list-address", "27.2.1.1",
         "with the \"EPTP switching\" VM function enabled, the EPTP-list address must be 4-KByte aligned "
         "and within the physical-address width",
         lambda s: _implies(s.c.proc2 & P2.ENABLE_VM_FUNCTIONS
                            and s.f(F.VM_FUNCTION_CONTROL) & VmFunction.EPTP_SWITCHING,
                            s.address_ok(F.EPTP_LIST_ADDRESS))),
    Rule("vmcs-shadowing-bitmaps", "27.2.1.1",
         "with \"VMCS shadowing\" 1, the VMREAD-bitmap and VMWRITE-bitmap addresses must be 4-KByte "
         "aligned and within the physical-address width",
         lambda s: _implies(s.c.proc2 & P2.VMCS_SHADOWING,
                            s.address_ok(F.VMREAD_BITMAP) and s.address_ok(F.VMWRITE_BITMAP))),
    Rule("tsc-multiplier-nonzero", "27.2.1.1",
         "with \"use TSC scaling\" 1, the TSC multiplier must not be zero",
         lambda s: _implies(s.c.proc2 & P2.USE_TSC_SCALING, s.f(F.TSC_MULTIPLIER) != 0)),
    # --- SDM 27.2.1.2 "VM-Exit Control Fields" ---
    Rule("exit-reserved", "27.2.1.2",
         "reserved bits in the VM-exit controls must be set properly (IA32_VMX_TRUE_EXIT_CTLS)",
         lambda s: s.caps.true_exit_ctls.permits(s.c.exit)),
    Rule("save-preemption-timer-requires-timer", "27.2.1.2",
         "with \"activate VMX-preemption timer\" 0, \"save VMX-preemption timer value\" must be 0",
         lambda s: _implies(s.c.exit & X.SAVE_PREEMPTION_TIMER, s.c.pin & P.PREEMPTION_TIMER)),
    Rule("exit-msr-store-area", "27.2.1.2",
         "with a non-zero VM-exit MSR-store count, the VM-exit MSR-store address must be 16-byte aligned "
         "and the area must lie within the physical-address width",
         lambda s: s.msr_area_ok(F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR)),
    Rule("exit-msr-load-area", "27.2.1.2",
         "with a non-zero VM-exit MSR-load count, the VM-exit MSR-load address must be 16-byte aligned "
         "and the area must lie within the physical-address width",
         lambda s: s.msr_area_ok(F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR)),
    # --- SDM 27.2.1.3 "VM-Entry Control Fields" ---
    Rule("entry-reserved", "27.2.1.3",
         "reserved bits in the VM-entry controls must be set properly (IA32_VMX_TRUE_ENTRY_CTLS)",
         lambda s: s.caps.true_entry_ctls.permits(s.c.entry)),
    Rule("injection-type", "27.2.1.3",
         "an injected event's interruption type must not be 1 (reserved), nor 7 (other event) without "
         "support for \"monitor trap flag\"",
         lambda s: _implies(s.injecting,
                            s.injected_type != 1
                            and (s.injected_type != 7
                                 or s.caps.true_procbased_ctls.allowed1 & P1.MONITOR_TRAP_FLAG))),
    Rule("injection-vector", "27.2.1.3",
         "an injected event's vector must match its type: NMI is 2, a hardware exception is at most 31, "
         "other event is 0",
         lambda s: _implies(s.injecting,
                            {2: s.injected_vector == 2, 3: s.injected_vector <= 31,
                             7: s.injected_vector == 0}.get(s.injected_type, True))),
    Rule("injection-error-code-valid", "27.2.1.3",
         "deliver-error-code (bit 11) must be 1 exactly for a hardware exception that pushes an error code, "
         "in protected mode (CR0.PE=1 or \"unrestricted guest\" 0)",
         lambda s: _implies(s.injecting,
                            bool(s.f(F.VM_ENTRY_INTR_INFO_FIELD) & 1 << 11) == _error_code_expected(s))),
    Rule("injection-reserved", "27.2.1.3",
         "bits 30:12 of the VM-entry interruption-information field must be 0",
         lambda s: _implies(s.injecting, s.f(F.VM_ENTRY_INTR_INFO_FIELD) & 0x7FFF_F000 == 0)),
    Rule("injection-error-code", "27.2.1.3",
         "when delivering an error code, bits 31:16 of the VM-entry exception error code must be 0",
         lambda s: _implies(s.injecting and s.f(F.VM_ENTRY_INTR_INFO_FIELD) & 1 << 11,
                            s.f(F.VM_ENTRY_EXCEPTION_ERROR_CODE) >> 16 == 0)),
    Rule("injection-instruction-length", "27.2.1.3",
         "for a software interrupt, software exception or privileged software exception, the VM-entry "
         "instruction length must be 1-15 (IA32_VMX_MISC[30] = 0)",
         lambda s: _implies(s.injecting and s.injected_type in (4, 5, 6),
                            1 <= s.f(F.VM_ENTRY_INSTRUCTION_LEN) <= 15)),
    Rule("entry-msr-load-area", "27.2.1.3",
         "with a non-zero VM-entry MSR-load count, the VM-entry MSR-load address must be 16-byte aligned "
         "and the area must lie within the physical-address width",
         lambda s: s.msr_area_ok(F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR)),
)  # fmt: skip


def check_vm_entry_controls(vmcs: VMCS, caps: VmxCapabilities = MODEL_CAPS) -> None:
    """SDM 27.2.1: raise VmxInstructionError(7) naming the first rule the VMCS's controls break."""
    state = EntryCheckState(vmcs=vmcs, caps=caps, c=Controls.read(vmcs))
    for rule in ENTRY_CONTROL_RULES:
        if not rule.holds(state):
            raise VmxInstructionError(
                VmInstructionErrorNumber.ENTRY_INVALID_CONTROL_FIELD, f"SDM {rule.section}: {rule.text}"
            )
