"""hvm.vtx.apic: the local APIC, rule by rule from Intel SDM Vol. 3A chapter 11."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx import apic as A
from hvm.vtx.apic import ApicGP, LocalApic, timer_divisor

EN, EXTD = A.APIC_BASE_EN, A.APIC_BASE_EXTD
vectors = st.integers(16, 255)


def enabled(**kw) -> LocalApic:
    apic = LocalApic(**kw)
    apic.write(A.SVR, A.SVR_ENABLE | 0xFF)
    return apic


def x2(**kw) -> LocalApic:
    apic = enabled(**kw)
    apic.wrmsr(A.MSR_APIC_BASE, A.APIC_MMIO_BASE | EN | EXTD)
    return apic


def test_reset_state():
    # SDM 11.4.7.1: after reset DFR all ones, SVR 0xFF, LVT entries masked, the rest 0.
    apic = LocalApic(apic_id=3)
    assert apic.read(A.ID) == 3 << 24  # xAPIC ID in bits 31:24 (SDM 11.4.6)
    assert apic.read(A.DFR) == 0xFFFF_FFFF
    assert apic.read(A.SVR) == 0xFF
    for lvt in (A.LVT_TIMER, A.LVT_LINT0, A.LVT_LINT1, A.LVT_ERROR, A.LVT_PERF, A.LVT_THERMAL):
        assert apic.read(lvt) == 0x1_0000
    assert apic.read(A.TPR) == apic.read(A.PPR) == apic.read(A.TIMER_ICR) == 0
    # SDM 11.4.4: IA32_APIC_BASE after reset: base 0xFEE00000, enabled, BSP flag set on the BSP.
    assert apic.rdmsr(A.MSR_APIC_BASE) == 0xFEE0_0900
    # Version register: KVM and QEMU both report 0x00050014 (version 0x14, six LVT entries).
    assert apic.read(A.VERSION) == 0x0005_0014


def test_ppr_rule():
    # SDM 11.8.3.1: PPR = TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4]:0.
    apic = enabled()
    apic.write(A.TPR, 0x35)
    assert apic.read(A.PPR) == 0x35
    apic.set_irr(0x51)
    apic.write(A.TPR, 0)
    assert apic.ack() == 0x51
    apic.write(A.TPR, 0x35)
    assert apic.read(A.PPR) == 0x50  # ISRV class 5 > TPR class 3
    apic.write(A.TPR, 0x5A)
    assert apic.read(A.PPR) == 0x5A  # equal classes: the TPR


@given(tpr=st.integers(0, 255), classes=st.sets(st.integers(1, 15), max_size=4), low=st.integers(0, 15))
def test_ppr_matches_formula(tpr, classes, low):
    # Vectors of distinct classes, acknowledged lowest class first, so that each one nests.
    isr = {c << 4 | low for c in classes}
    apic = enabled()
    for v in sorted(isr):
        apic.set_irr(v)
        assert apic.ack() == v  # ascending vectors: each one outranks the ISR so far
    apic.write(A.TPR, tpr)
    isrv = max(isr, default=0)
    expected = tpr if tpr >> 4 >= isrv >> 4 else isrv & 0xF0
    assert apic.read(A.PPR) == expected


@given(irr=st.sets(vectors, min_size=1, max_size=6), tpr=st.integers(0, 255))
def test_pending_is_highest_irr_above_ppr_class(irr, tpr):
    # SDM 11.8.4: the highest-priority IRR vector is dispatched if its class is above PPR[7:4].
    apic = enabled()
    for v in irr:
        apic.set_irr(v)
    apic.write(A.TPR, tpr)
    top = max(irr)
    assert apic.pending() == (top if top >> 4 > tpr >> 4 else None)


def test_ack_and_eoi_nest():
    apic = enabled()
    apic.set_irr(0x30)
    assert apic.ack() == 0x30
    apic.set_irr(0x31)  # same class as the one in service: blocked (SDM 11.8.3.1)
    assert apic.pending() is None
    apic.set_irr(0x41)
    assert apic.ack() == 0x41  # higher class nests
    assert apic.isr(0x30) and apic.isr(0x41)
    apic.write(A.EOI, 0)  # SDM 11.8.5: EOI clears the highest ISR bit
    assert not apic.isr(0x41) and apic.isr(0x30)
    apic.write(A.EOI, 0)
    assert apic.pending() == 0x31


def test_ack_with_nothing_deliverable_is_spurious():
    # SDM 11.9: the spurious vector, with no ISR bit set.
    apic = LocalApic()
    apic.write(A.SVR, A.SVR_ENABLE | 0xEF)
    assert apic.ack() == 0xEF
    assert apic.highest_isr() is None


def test_coalescing_and_illegal_vectors():
    apic = enabled()
    assert apic.set_irr(0x40)
    assert not apic.set_irr(0x40)  # SDM 11.8.4: one IRR bit per vector
    # SDM 11.5.2: vectors 0-15 are illegal; ESR bit 6 "receive illegal vector", visible after a write.
    assert not apic.set_irr(5)
    assert not apic.irr(5)
    assert apic.read(A.ESR) == 0
    apic.write(A.ESR, 0)
    assert apic.read(A.ESR) == A.ESR_RECEIVE_ILLEGAL_VECTOR
    apic.write(A.ESR, 0)
    assert apic.read(A.ESR) == 0


def test_level_triggered_sets_tmr():
    apic = enabled()
    apic.set_irr(0x50, level=True)
    apic.set_irr(0x60)
    assert apic.tmr(0x50) and not apic.tmr(0x60)  # SDM 11.8.4


def test_software_disable_masks_lvts():
    # SDM 11.4.7.2: clearing SVR bit 8 sets the LVT masks; they cannot be cleared until re-enabled.
    apic = enabled()
    apic.write(A.LVT_TIMER, 0x20)
    assert apic.read(A.LVT_TIMER) == 0x20
    apic.write(A.SVR, 0xFF)
    assert apic.read(A.LVT_TIMER) == 0x1_0020
    apic.write(A.LVT_TIMER, 0x21)
    assert apic.read(A.LVT_TIMER) == 0x1_0021


def test_read_only_registers_and_reserved_bits():
    apic = enabled()
    for reg in (A.VERSION, A.PPR, A.ISR, A.IRR + 0x70, A.TMR, A.TIMER_CCR):
        before = apic.read(reg)
        apic.write(reg, 0xFFFF_FFFF)
        assert apic.read(reg) == before
    apic.write(A.TPR, 0xFFFF_FFFF)
    assert apic.read(A.TPR) == 0xFF  # bits 31:8 reserved
    apic.write(A.TIMER_DCR, 0xFF)
    assert apic.read(A.TIMER_DCR) == 0xB  # bits 0, 1, 3 (SDM Figure 11-10)


def test_divide_configuration():
    # SDM 11.5.4, Figure 11-10.
    table = {0b0000: 2, 0b0001: 4, 0b0010: 8, 0b0011: 16, 0b1000: 32, 0b1001: 64, 0b1010: 128, 0b1011: 1}
    assert {code: timer_divisor(code) for code in table} == table


def test_one_shot_timer():
    # 1 GHz TSC and bus: one TSC tick per bus cycle. Divide by 2, count 1000 -> 2000 ticks.
    apic = enabled()
    apic.write(A.LVT_TIMER, 0x30, now=100)
    apic.write(A.TIMER_DCR, 0)
    apic.write(A.TIMER_ICR, 1000)
    assert apic.next_deadline() == 2100
    apic.tick(1100)
    assert apic.read(A.TIMER_CCR) == 500
    assert apic.tick(2099) == 0 and not apic.irr(0x30)
    assert apic.tick(2100) == 1 and apic.irr(0x30)
    assert apic.read(A.TIMER_CCR) == 0  # a one-shot stops at 0 (SDM 11.5.4)
    assert apic.tick(10_000) == 0
    assert apic.next_deadline() is None


def test_periodic_timer_reloads_and_coalesces():
    apic = enabled(tsc_hz=2_000_000_000)  # two TSC ticks per bus cycle
    apic.write(A.LVT_TIMER, 0x31 | A.TIMER_PERIODIC)
    apic.write(A.TIMER_DCR, 0b1011)  # divide by 1
    apic.write(A.TIMER_ICR, 100)  # period 200 TSC ticks
    assert apic.tick(200) == 1
    assert apic.ack() == 0x31
    assert apic.read(A.TIMER_CCR) == 100
    assert apic.tick(650) == 2  # 400 and 600: two expirations, one IRR bit
    assert apic.irr(0x31)
    assert apic.next_deadline() == 800
    assert apic.read(A.TIMER_CCR) == 100 - 25
    apic.write(A.TIMER_ICR, 0)  # SDM 11.5.4: a zero initial count stops the timer
    assert apic.next_deadline() is None


def test_masked_timer_counts_without_interrupt():
    apic = enabled()
    apic.write(A.LVT_TIMER, 0x32 | A.LVT_MASKED)
    apic.write(A.TIMER_ICR, 10)
    assert apic.tick(100) == 1
    assert not apic.irr(0x32)


def test_tsc_deadline_mode():
    apic = enabled()
    # SDM 11.5.4.1: outside TSC-deadline mode IA32_TSC_DEADLINE reads 0 and writes are ignored.
    apic.wrmsr(A.MSR_TSC_DEADLINE, 500)
    assert apic.rdmsr(A.MSR_TSC_DEADLINE) == 0
    apic.write(A.LVT_TIMER, 0x33 | A.TIMER_TSC_DEADLINE)
    apic.write(A.TIMER_ICR, 5)  # ignored in TSC-deadline mode
    assert apic.read(A.TIMER_ICR) == 0 and apic.read(A.TIMER_CCR) == 0
    apic.wrmsr(A.MSR_TSC_DEADLINE, 500)
    assert apic.rdmsr(A.MSR_TSC_DEADLINE) == 500
    assert apic.tick(499) == 0
    assert apic.tick(500) == 1 and apic.irr(0x33)
    assert apic.rdmsr(A.MSR_TSC_DEADLINE) == 0  # reset to 0 after the timer fires
    apic.wrmsr(A.MSR_TSC_DEADLINE, 900)
    apic.wrmsr(A.MSR_TSC_DEADLINE, 0)  # zero disarms
    assert apic.tick(1000) == 0
    apic.wrmsr(A.MSR_TSC_DEADLINE, 1200)
    apic.write(A.LVT_TIMER, 0x33)  # leaving TSC-deadline mode disarms
    assert apic.tick(2000) == 0


def test_mode_change_disarms():
    # SDM 11.5.4.1: a write to the LVT timer register that changes the timer mode disarms the timer.
    apic = enabled()
    apic.write(A.LVT_TIMER, 0x34)
    apic.write(A.TIMER_ICR, 100)
    apic.write(A.LVT_TIMER, 0x34 | A.TIMER_PERIODIC)
    assert apic.next_deadline() is None and apic.tick(1000) == 0
    apic.write(A.LVT_TIMER, 0x35 | A.TIMER_PERIODIC)  # same mode, new vector: no effect on the count
    apic.write(A.TIMER_ICR, 100, now=1000)
    apic.write(A.LVT_TIMER, 0x36 | A.TIMER_PERIODIC)
    assert apic.next_deadline() == 1200


def test_self_ipis_xapic():
    apic = enabled(apic_id=2)
    apic.write(A.ICR_LOW, A.SHORTHAND_SELF | 0x40)  # SDM 11.6.1: shorthand 01 = self
    assert apic.irr(0x40)
    apic.write(A.ICR_HIGH, 2 << 24)
    apic.write(A.ICR_LOW, 0x41)  # physical destination = own APIC ID
    assert apic.irr(0x41)
    assert not apic.sent
    apic.write(A.ICR_LOW, A.SHORTHAND_ALL | 0x42)  # all including self: delivered here and recorded
    assert apic.irr(0x42)
    apic.write(A.ICR_LOW, A.SHORTHAND_OTHERS | 0x43)
    assert not apic.irr(0x43)
    apic.write(A.ICR_HIGH, 7 << 24)
    apic.write(A.ICR_LOW, 0x44)  # another processor
    assert not apic.irr(0x44)
    assert [ipi.vector for ipi in apic.sent] == [0x42, 0x43, 0x44]
    assert apic.read(A.ICR_LOW) & A.ICR_DELIVERY_STATUS == 0  # sent at once: idle
    apic.write(A.ICR_LOW, A.SHORTHAND_SELF | 3)  # SDM 11.5.2: send illegal vector
    apic.write(A.ESR, 0)
    assert apic.read(A.ESR) == A.ESR_SEND_ILLEGAL_VECTOR


def test_logical_flat_destination():
    apic = enabled()
    apic.write(A.LDR, 0x04 << 24)
    apic.write(A.ICR_HIGH, 0x0C << 24)
    apic.write(A.ICR_LOW, A.ICR_DEST_LOGICAL | 0x50)  # SDM 11.6.2.2 flat: bit mask
    assert apic.irr(0x50)
    apic.write(A.ICR_HIGH, 0x03 << 24)
    apic.write(A.ICR_LOW, A.ICR_DEST_LOGICAL | 0x51)
    assert not apic.irr(0x51)


def test_apic_base_transitions():
    # SDM 11.12.5, Figure 11-27.
    apic = enabled()
    base = A.APIC_MMIO_BASE
    with pytest.raises(ApicGP):
        apic.wrmsr(A.MSR_APIC_BASE, base | EXTD)  # EXTD without EN: invalid
    with pytest.raises(ApicGP):
        apic.wrmsr(A.MSR_APIC_BASE, base | EN | 1 << 9)  # reserved bit
    apic.wrmsr(A.MSR_APIC_BASE, base | EN | EXTD)  # xAPIC -> x2APIC
    assert apic.x2apic
    with pytest.raises(ApicGP):
        apic.wrmsr(A.MSR_APIC_BASE, base | EN)  # x2APIC -> xAPIC directly
    apic.wrmsr(A.MSR_APIC_BASE, base)  # -> disabled: reset state (SDM 11.4.3)
    assert not apic.hw_enabled
    with pytest.raises(ApicGP):
        apic.wrmsr(A.MSR_APIC_BASE, base | EN | EXTD)  # disabled -> x2APIC directly
    apic.wrmsr(A.MSR_APIC_BASE, base | EN)
    assert apic.read(A.SVR) == 0xFF  # reset by the disable
    assert apic.rdmsr(A.MSR_APIC_BASE) & A.APIC_BASE_BSP  # BSP flag kept


def test_disabled_apic_accepts_nothing():
    apic = enabled()
    apic.wrmsr(A.MSR_APIC_BASE, A.APIC_MMIO_BASE)
    assert not apic.set_irr(0x40)
    assert apic.pending() is None


def test_x2apic_msrs_need_x2apic_mode():
    apic = enabled()
    with pytest.raises(ApicGP):
        apic.rdmsr(0x808)  # SDM 11.12.1.2: #GP in xAPIC mode


def test_x2apic_register_map():
    apic = x2(apic_id=5)
    # SDM 11.12.1.2, Table 11-6: MSR = 0x800 + offset >> 4; 32-bit ID; LDR derived (11.12.10.2).
    assert apic.rdmsr(0x802) == 5
    assert apic.rdmsr(0x803) == 0x0005_0014
    assert apic.rdmsr(0x80D) == 1 << 5
    apic.wrmsr(0x808, 0x20)
    assert apic.rdmsr(0x808) == 0x20 and apic.rdmsr(0x80A) == 0x20
    # Not present in x2APIC mode: APR 0x809, RRD 0x80C, DFR 0x80E, ICR high 0x831, and gaps.
    for msr in (0x809, 0x80C, 0x80E, 0x831, 0x801, 0x8FF):
        with pytest.raises(ApicGP):
            apic.rdmsr(msr)
    # Read-only: ID, version, LDR, PPR, ISR, TMR, IRR, current count.
    for msr in (0x802, 0x803, 0x80D, 0x80A, 0x810, 0x818, 0x820, 0x839):
        with pytest.raises(ApicGP):
            apic.wrmsr(msr, 0)
    # Write-only: EOI and SELF IPI.
    for msr in (0x80B, 0x83F):
        with pytest.raises(ApicGP):
            apic.rdmsr(msr)
    # EOI and ESR: a non-zero write #GPs; bits 63:32 of 32-bit registers are reserved.
    with pytest.raises(ApicGP):
        apic.wrmsr(0x80B, 1)
    with pytest.raises(ApicGP):
        apic.wrmsr(0x828, 1)
    with pytest.raises(ApicGP):
        apic.wrmsr(0x808, 1 << 32)
    # The xAPIC page is not decoded in x2APIC mode.
    assert apic.read(A.TPR) == 0


def test_x2apic_icr_and_self_ipi():
    apic = x2(apic_id=1)
    apic.wrmsr(A.MSR_X2APIC_ICR, 1 << 32 | 0x60)  # 64-bit ICR, destination in bits 63:32
    assert apic.irr(0x60)
    assert apic.rdmsr(A.MSR_X2APIC_ICR) == 1 << 32 | 0x60
    apic.wrmsr(A.MSR_X2APIC_SELF_IPI, 0x61)  # SDM 11.12.11
    assert apic.irr(0x61)
    assert apic.pending() == 0x61
    with pytest.raises(ApicGP):
        apic.wrmsr(A.MSR_X2APIC_ICR, 1 << 12 | 0x62)  # delivery status bit is reserved in x2APIC mode
    apic.wrmsr(A.MSR_X2APIC_ICR, 9 << 32 | 0x63)
    assert not apic.irr(0x63) and apic.sent[-1].destination == 9


def test_x2apic_eoi_and_timer():
    apic = x2()
    apic.wrmsr(0x832, 0x70 | A.TIMER_PERIODIC)
    apic.wrmsr(0x83E, 0b1011)
    apic.wrmsr(0x838, 50)
    apic.tick(50)
    assert apic.ack() == 0x70
    apic.wrmsr(0x80B, 0)
    assert apic.highest_isr() is None
    assert apic.rdmsr(0x839) == 50


def test_mmio_byte_reads():
    apic = enabled(apic_id=0x12)
    assert apic.mmio_read(A.ID + 3, 1) == 0x12
    assert apic.mmio_read(A.VERSION, 2) == 0x0014
    assert apic.mmio_read(A.VERSION + 4, 4) == 0


def test_accept_hook_receives_local_interrupts():
    # A VMM that posts interrupts takes the APIC's own sources (timer, self-IPIs) instead of its IRR.
    apic = enabled()
    got = []
    apic.accept = lambda vector, level: got.append(vector) or True
    apic.write(A.LVT_TIMER, 0x21)
    apic.write(A.TIMER_ICR, 1)
    apic.tick(100)
    apic.write(A.ICR_LOW, A.SHORTHAND_SELF | 0x41)
    assert got == [0x21, 0x41]
    assert apic.highest_irr() is None


def test_trap_like_writes_find_the_value_already_on_the_page():
    # With APICv the processor writes the page first and the VMM hears of it after (an APIC-write VM
    # exit, SDM Vol. 3C 30.4.3.3): the timer must still see the mode change and the new count.
    apic = enabled()
    apic.write(A.LVT_TIMER, 0x30)
    apic.write(A.TIMER_ICR, 100)
    apic.page[A.LVT_TIMER : A.LVT_TIMER + 4] = (0x30 | A.TIMER_PERIODIC).to_bytes(4, "little")
    apic.write(A.LVT_TIMER, 0x30 | A.TIMER_PERIODIC)
    assert apic.next_deadline() is None  # SDM 11.5.4.1: the mode changed, the timer is disarmed
    apic.write(A.TIMER_ICR, 100)
    apic.page[A.TIMER_ICR : A.TIMER_ICR + 4] = bytes(4)
    apic.write(A.TIMER_ICR, 0, now=50)  # stops it (no division by a zero period on the way)
    assert apic.next_deadline() is None and apic.tick(1000) == 0


def test_ipis_elsewhere_are_counted_and_bounded():
    apic = enabled()
    for _ in range(A.SENT_KEPT + 10):
        apic.write(A.ICR_LOW, A.SHORTHAND_OTHERS | 0x50)
    assert len(apic.sent) == A.SENT_KEPT
    assert apic.stats["ipi_elsewhere"] == A.SENT_KEPT + 10


@given(count=st.integers(1, 5000), dcr=st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11]),
       tsc_hz=st.integers(10**8, 5 * 10**9), cuts=st.lists(st.integers(0, 10**7), max_size=8))
def test_periodic_expirations_do_not_depend_on_when_time_is_observed(count, dcr, tsc_hz, cuts):
    # The count runs at bus/divisor (SDM 11.5.4) whatever the caller's polling: ticking at any
    # intermediate times fires as often in total as one tick at the end.
    end = 10**7

    def armed() -> LocalApic:
        apic = enabled(tsc_hz=tsc_hz)
        apic.write(A.LVT_TIMER, 0x30 | A.TIMER_PERIODIC)
        apic.write(A.TIMER_DCR, dcr)
        apic.write(A.TIMER_ICR, count)
        return apic

    polled = armed()
    total = sum(polled.tick(t) for t in sorted(cuts)) + polled.tick(end)
    once = armed()
    assert total == once.tick(end) == once.stats["timer"]
    # Each period is count * divisor bus cycles of 1 ns at 1 GHz, i.e. that many ns of TSC time.
    period_ns = count * timer_divisor(dcr)
    assert total == end * 10**9 // tsc_hz // period_ns


def test_x2apic_registers_on_the_page_for_a_virtual_apic_page() -> None:
    # The register page doubles as a virtual-APIC page, which SDM Vol. 3C 30.5 reads 8 bytes at a time
    # at (MSR & FFH) << 4. Entering x2APIC mode puts the 32-bit x2APIC ID in the ID register and the
    # logical x2APIC ID in the LDR (SDM 11.12.5.1, 11.12.10.2: (ID[19:4] << 16) | 1 << ID[3:0]); the
    # 64-bit ICR (11.12.9) reads back whole from offset 300H.
    apic = LocalApic(apic_id=0x23)
    apic.wrmsr(A.MSR_APIC_BASE, apic.base | A.APIC_BASE_EXTD)
    page = bytes(apic.page)
    assert int.from_bytes(page[0x20:0x24], "little") == 0x23 == apic.rdmsr(0x802)
    assert int.from_bytes(page[0xD0:0xD4], "little") == 0x2_0008 == apic.rdmsr(0x80D)
    apic.wrmsr(0x830, 7 << 32 | 0x50)  # fixed IPI, vector 0x50, to x2APIC ID 7 (not this one)
    assert int.from_bytes(bytes(apic.page)[0x300:0x308], "little") == 7 << 32 | 0x50 == apic.rdmsr(0x830)
