"""hvm.vtx.apicv: APIC virtualization, rule by rule from Intel SDM Vol. 3C chapter 30."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx import apic as A
from hvm.vtx.apicv import (
    ApicvControls,
    ApicvExit,
    ApicvGP,
    PostedInterruptDescriptor,
    VirtualApic,
    VirtualApicPage,
)
from hvm.vtx.controls import PinBased, ProcBased, ProcBased2
from hvm.vtx.exit_reasons import ExitReason
from hvm.vtx.qualification import ApicAccessQualification, ApicAccessType
from hvm.vtx.vmcs import VMCS, VmcsField

FULL = ApicvControls(use_tpr_shadow=True, virtualize_apic_accesses=True, apic_register_virtualization=True,
                     virtual_interrupt_delivery=True, posted_interrupts=True)


def vapic(controls: ApicvControls = FULL, **kw) -> VirtualApic:
    v = VirtualApic(VirtualApicPage(), controls, **kw)
    v.vm_entry()
    return v


def test_page_layout():
    # SDM 30.1.1: bit x of VIRR is bit (x & 1FH) at offset 200H | ((x & E0H) >> 1).
    page = VirtualApicPage()
    page.set_virr(0x45)
    assert page.read32(0x220) == 1 << 5
    page.set_visr(0xFF)
    assert page.read32(0x170) == 1 << 31
    assert page.highest_virr() == 0x45 and page.highest_visr() == 0xFF


def test_ppr_virtualization():
    # SDM 30.1.3.
    v = vapic(svi=0x52)
    v.page.vtpr = 0x31
    v.ppr_virtualization()
    assert v.page.vppr == 0x50
    v.page.vtpr = 0x61
    v.ppr_virtualization()
    assert v.page.vppr == 0x61


@given(rvi=st.integers(0, 255), vtpr=st.integers(0, 255), svi=st.integers(0, 255))
def test_evaluation_rule(rvi, vtpr, svi):
    # SDM 30.2.1: recognized iff RVI[7:4] > VPPR[7:4] (with interrupt-window exiting 0).
    v = VirtualApic(VirtualApicPage(), FULL, rvi=rvi, svi=svi)
    v.page.vtpr = vtpr
    v.vm_entry()
    vppr = vtpr if vtpr >> 4 >= svi >> 4 else svi & 0xF0
    assert v.recognized == (rvi >> 4 > vppr >> 4)
    windowed = VirtualApic(VirtualApicPage(), ApicvControls(virtual_interrupt_delivery=True,
                                                            interrupt_window_exiting=True), rvi=rvi)
    windowed.vm_entry()
    assert not windowed.recognized


def test_delivery_then_eoi():
    v = vapic()
    v.self_ipi_virtualization(0x40)
    v.self_ipi_virtualization(0x30)
    assert v.rvi == 0x40 and v.recognized
    assert not v.can_deliver(rflags_if=False)
    assert not v.can_deliver(rflags_if=True, sti_blocking=True)
    assert v.deliver() == 0x40  # SDM 30.2.2
    assert v.svi == 0x40 and v.page.visr(0x40) and not v.page.virr(0x40)
    assert v.page.vppr == 0x40 and v.rvi == 0x30
    assert not v.evaluate()  # 0x30's class is below VPPR
    v.write(A.EOI, 4, 0)  # SDM 30.1.4 EOI virtualization: no exit without the bitmap bit
    assert v.svi == 0 and not v.page.visr(0x40) and v.page.vppr == 0
    assert v.recognized and v.deliver() == 0x30


def test_eoi_exit_bitmap():
    v = vapic(FULL.__class__(**{**FULL.__dict__, "eoi_exit_bitmap": 1 << 0x41}))
    v.self_ipi_virtualization(0x41)
    v.deliver()
    with pytest.raises(ApicvExit) as e:
        v.write(A.EOI, 4, 0)
    assert e.value.reason == ExitReason.EOI_INDUCED == 45
    assert e.value.qualification == 0x41  # SDM 30.1.4: the vector
    assert not v.page.visr(0x41)  # trap-like: the EOI was virtualized first


def test_apic_access_reads():
    # SDM 30.4.2: APIC-register virtualization 1 -> virtualized reads except e.g. PPR and current count.
    v = vapic()
    v.page.write32(A.VERSION, 0x50014)
    assert v.read(A.VERSION, 4) == 0x50014
    assert v.read(A.VERSION + 2, 2) == 5
    for offset, size in ((A.PPR, 4), (A.TIMER_CCR, 4), (A.APR, 4), (A.VERSION + 4, 4), (A.VERSION + 2, 4)):
        with pytest.raises(ApicvExit) as e:
            v.read(offset, size)
        assert e.value.reason == ExitReason.APIC_ACCESS == 44
        assert ApicAccessQualification.decode(e.value.qualification) == ApicAccessQualification(
            offset, ApicAccessType.LINEAR_READ)
    # Without APIC-register virtualization only the TPR is virtualized.
    tpr_only = vapic(ApicvControls(use_tpr_shadow=True, virtualize_apic_accesses=True))
    tpr_only.page.vtpr = 0x20
    assert tpr_only.read(A.TPR, 4) == 0x20
    with pytest.raises(ApicvExit):
        tpr_only.read(A.VERSION, 4)


def test_apic_access_writes_by_controls():
    # SDM 30.4.3.1.
    tpr_only = vapic(ApicvControls(use_tpr_shadow=True, virtualize_apic_accesses=True))
    tpr_only.write(A.TPR, 4, 0x1234_5620)
    assert tpr_only.page.vtpr == 0x20  # 30.4.3.2: bytes 3:1 cleared
    for reg in (A.EOI, A.ICR_LOW, A.LVT_TIMER):
        with pytest.raises(ApicvExit) as e:
            tpr_only.write(reg, 4, 0)
        assert e.value.reason == ExitReason.APIC_ACCESS
    vid = vapic(ApicvControls(use_tpr_shadow=True, virtualize_apic_accesses=True,
                              virtual_interrupt_delivery=True))
    vid.write(A.ICR_LOW, 4, A.SHORTHAND_SELF | 0x50)
    assert vid.page.virr(0x50) and vid.rvi == 0x50
    with pytest.raises(ApicvExit) as e:
        vid.write(A.LVT_TIMER, 4, 0x20)  # not virtualized without APIC-register virtualization
    assert e.value.reason == ExitReason.APIC_ACCESS
    # APIC-register virtualization: the LVT write lands on the page, then a trap-like APIC-write exit.
    full = vapic()
    with pytest.raises(ApicvExit) as e:
        full.write(A.LVT_TIMER, 4, 0x20)
    assert e.value.reason == ExitReason.APIC_WRITE == 56 and e.value.qualification == A.LVT_TIMER
    assert full.page.read32(A.LVT_TIMER) == 0x20
    full.write(A.ICR_HIGH, 4, 0xFFFF_FFFF)
    assert full.page.vicr_hi == 0xFF00_0000  # bytes 2:0 cleared, no exit


@pytest.mark.parametrize("icr", [
    A.SHORTHAND_ALL | 0x50,  # not self
    A.SHORTHAND_SELF | A.DM_NMI << 8 | 0x50,  # not fixed
    A.SHORTHAND_SELF | A.ICR_TRIGGER_LEVEL | 0x50,  # level
    A.SHORTHAND_SELF | 0x0F,  # vector bits 7:4 = 0
    A.SHORTHAND_SELF | 1 << 13 | 0x50,  # reserved bit
    0x50,  # no shorthand (a destination in ICR high)
])
def test_icr_writes_that_need_the_vmm(icr):
    # SDM 30.4.3.2: ICR-low writes other than a fixed, edge self-IPI with a legal vector exit (56).
    v = vapic()
    with pytest.raises(ApicvExit) as e:
        v.write(A.ICR_LOW, 4, icr)
    assert e.value.reason == ExitReason.APIC_WRITE and e.value.qualification == A.ICR_LOW
    assert not v.page.virr(0x50)


def test_tpr_below_threshold():
    # SDM 30.1.2: without virtual-interrupt delivery, VTPR[7:4] < threshold -> exit 43.
    v = vapic(ApicvControls(use_tpr_shadow=True, virtualize_apic_accesses=True, tpr_threshold=3))
    v.write(A.TPR, 4, 0x30)
    with pytest.raises(ApicvExit) as e:
        v.write(A.TPR, 4, 0x20)
    assert e.value.reason == ExitReason.TPR_BELOW_THRESHOLD == 43


def test_tpr_write_unmasks_a_pending_interrupt():
    v = vapic()
    v.write(A.TPR, 4, 0xF0)
    v.self_ipi_virtualization(0x80)
    assert not v.recognized
    v.write(A.TPR, 4, 0x00)  # TPR virtualization -> PPR virtualization + evaluation
    assert v.recognized


def test_cr8():
    # SDM 30.3.
    v = vapic()
    v.mov_to_cr8(0x1F)
    assert v.page.vtpr == 0xF0 and v.mov_from_cr8() == 0xF


def test_x2apic_virtualization():
    c = ApicvControls(use_tpr_shadow=True, virtualize_x2apic_mode=True, virtual_interrupt_delivery=True)
    v = vapic(c)
    v.page.vtpr = 0x40
    assert v.rdmsr(0x808) == 0x40
    assert v.rdmsr(0x803) is None  # needs APIC-register virtualization
    assert v.wrmsr(0x83F, 0x66) and v.page.virr(0x66)  # SDM 30.5: self-IPI virtualization
    with pytest.raises(ApicvGP):
        v.wrmsr(0x80B, 1)
    v.deliver()
    assert v.wrmsr(0x80B, 0) and v.svi == 0
    assert not v.wrmsr(0x838, 5)  # not virtualized: the VMM's
    # SDM 30.5: with APIC-register virtualization every RDMSR of 800H-8FFH reads the 8 bytes at
    # offset (ECX & FFH) << 4, e.g. 830H: VICR_LO and the 4 bytes after it.
    arv = vapic(ApicvControls(use_tpr_shadow=True, virtualize_x2apic_mode=True,
                              apic_register_virtualization=True))
    arv.page.vicr_lo, arv.page.vicr_hi = 0x4040, 0x0300_0000
    assert arv.rdmsr(0x830) == 0x4040
    arv.page.write32(0x394, 7)
    assert arv.rdmsr(0x839) == 7 << 32


def test_posted_interrupts():
    # SDM 30.6.
    desc = PostedInterruptDescriptor()
    assert desc.post(0x30) is True  # ON was 0: send a notification
    assert desc.post(0x90) is False  # ON already 1
    assert desc.on and desc.pir == 1 << 0x30 | 1 << 0x90
    assert desc.data[32] & 1 and desc.data[0x90 // 8] == 1 << (0x90 % 8)  # PIR bits 255:0, ON bit 256
    v = vapic(rvi=0x40)
    v.page.set_virr(0x40)
    assert v.process_posted_interrupts(desc) == 1 << 0x30 | 1 << 0x90
    assert not desc.on and desc.pir == 0
    assert v.page.virr(0x30) and v.page.virr(0x90) and v.rvi == 0x90 and v.recognized
    assert v.deliver() == 0x90 and v.rvi == 0x40


def test_controls_and_status_from_vmcs():
    vmcs = VMCS()
    vmcs.vmwrite(VmcsField.PIN_BASED_VM_EXEC_CONTROL, PinBased.POSTED_INTERRUPTS)
    vmcs.vmwrite(VmcsField.CPU_BASED_VM_EXEC_CONTROL,
                 ProcBased.USE_TPR_SHADOW | ProcBased.ACTIVATE_SECONDARY_CONTROLS)
    vmcs.vmwrite(VmcsField.SECONDARY_VM_EXEC_CONTROL,
                 ProcBased2.VIRTUALIZE_APIC_ACCESSES | ProcBased2.VIRTUAL_INTERRUPT_DELIVERY)
    vmcs.vmwrite(VmcsField.EOI_EXIT_BITMAP1, 1 << 3)  # vector 64 + 3
    vmcs.vmwrite(VmcsField.POSTED_INTR_NV, 0xF2)
    vmcs.vmwrite(VmcsField.GUEST_INTR_STATUS, 0x3142)  # SVI 0x31, RVI 0x42
    c = ApicvControls.from_vmcs(vmcs)
    assert c.use_tpr_shadow and c.virtualize_apic_accesses and c.virtual_interrupt_delivery
    assert c.posted_interrupts and not c.apic_register_virtualization
    assert c.eoi_exit_bitmap == 1 << 67 and c.notification_vector == 0xF2
    v = VirtualApic(VirtualApicPage(), c, vmcs=vmcs)
    assert (v.rvi, v.svi) == (0x42, 0x31)
    v.rvi = 0x50
    v.save()
    assert vmcs.vmread(VmcsField.GUEST_INTR_STATUS) == 0x3150
