"""The I/O APIC against the Intel 82093AA datasheet (order 290566-001) and SDM Vol. 3A 11.8.5.

Section numbers are the datasheet's: 3.1 the memory-mapped IOREGSEL/IOWIN, 3.2.1-3.2.4 the indirect
registers. The delivery target is a real :class:`hvm.vtx.apic.LocalApic` (software-enabled), so
"delivered" means "its IRR bit is set".
"""

from __future__ import annotations

import threading

import pytest

from hvm.devices.ioapic import IoApic
from hvm.vtx.apic import EOI, SVR, LocalApic

VEC = 0x34
LEVEL = 1 << 15  # 3.2.4 bit 15: trigger mode, 1 = level
MASK = 1 << 16  # 3.2.4 bit 16: interrupt mask
REMOTE_IRR = 1 << 14  # 3.2.4 bit 14 (RO)
DELIVS = 1 << 12  # 3.2.4 bit 12 (RO): delivery status, 1 = send pending


def sel_write(io: IoApic, index: int, value: int) -> None:
    io.write(0x00, 4, index)  # IOREGSEL (3.1.1)
    io.write(0x10, 4, value)  # IOWIN (3.1.2)


def sel_read(io: IoApic, index: int) -> int:
    io.write(0x00, 4, index)
    return io.read(0x10, 4)


def program(io: IoApic, pin: int, low: int, dest: int = 0) -> None:
    sel_write(io, 0x10 + 2 * pin + 1, dest << 24)  # 3.2.4: destination in bits 63:56
    sel_write(io, 0x10 + 2 * pin, low)


@pytest.fixture
def system() -> tuple[IoApic, LocalApic]:
    lapic = LocalApic()
    lapic.write(SVR, 0x1FF)
    io = IoApic()
    io.connect(lapic)
    return io, lapic


def raise_line(io: IoApic, pin: int, level: bool) -> None:
    io.set_irq(pin, level)
    io.service()


def take(lapic: LocalApic) -> int | None:
    """The processor takes the pending interrupt (INTA), or None."""
    return lapic.ack() if lapic.pending() is not None else None


def test_registers_after_reset() -> None:
    io = IoApic()
    assert sel_read(io, 0x00) == 0  # IOAPICID (3.2.1)
    # IOAPICVER (3.2.2): max redirection entry 17h (24 entries) in 23:16, version 11h in 7:0; the same
    # value KVM's in-kernel IOAPIC reports (observed with the uartirq guest under QEMU -accel kvm).
    assert sel_read(io, 0x01) == 0x0017_0011
    assert sel_read(io, 0x02) == 0  # IOAPICARB (3.2.3)
    for pin in range(24):  # 3.2.4 default value xxx1 xxxx xxxx xxxxh: masked
        assert sel_read(io, 0x10 + 2 * pin) & MASK
    io.write(0x00, 4, 0x02)
    assert io.read(0x00, 4) == 0x02  # IOREGSEL reads back the index selected


def test_id_is_bits_27_24_and_ver_arb_are_read_only() -> None:
    io = IoApic()
    sel_write(io, 0x00, 0xFFFF_FFFF)
    assert sel_read(io, 0x00) == 0x0F00_0000  # 3.2.1: only bits 27:24 are the ID
    sel_write(io, 0x01, 0)
    sel_write(io, 0x02, 0x0500_0000)
    assert sel_read(io, 0x01) == 0x0017_0011  # 3.2.2 RO
    # 3.2.3 RO; it reads the ID (0x0f000000 here), as KVM's IOAPIC did for uartirq under QEMU -accel kvm
    assert sel_read(io, 0x02) == 0x0F00_0000
    io.write(0x00, 4, 0x1FF)
    assert io.read(0x00, 4) == 0xFF  # 3.1.1: IOREGSEL bits 7:0


def test_redirection_entry_fields_round_trip_and_ro_bits() -> None:
    io = IoApic()
    # vector 0x41, lowest priority (001), logical, low active, level, unmasked; destination 0xA5
    low = 0x41 | 1 << 8 | 1 << 11 | 1 << 13 | LEVEL
    program(io, 7, low | REMOTE_IRR | DELIVS, dest=0xA5)
    assert sel_read(io, 0x10 + 14) == low  # 3.2.4: delivery status and remote IRR are read-only
    assert sel_read(io, 0x10 + 15) == 0xA5 << 24
    # the other entries are separate registers
    assert sel_read(io, 0x10 + 16) == MASK


def test_edge_one_message_per_rising_edge(system) -> None:
    io, lapic = system
    program(io, 4, VEC)
    raise_line(io, 4, True)
    assert take(lapic) == VEC
    lapic.write(EOI, 0)
    raise_line(io, 4, True)  # still high: no new edge
    assert lapic.pending() is None
    raise_line(io, 4, False)
    raise_line(io, 4, True)
    assert take(lapic) == VEC
    assert not sel_read(io, 0x18) & REMOTE_IRR  # remote IRR is for level interrupts (3.2.4)


def test_level_remote_irr_set_on_acceptance_cleared_by_eoi(system) -> None:
    io, lapic = system
    program(io, 4, VEC | LEVEL)
    raise_line(io, 4, True)
    assert sel_read(io, 0x18) & REMOTE_IRR  # 3.2.4: set when the local APIC accepts it
    assert lapic.tmr(VEC)  # SDM 11.8.4: TMR set for a level-triggered interrupt
    assert take(lapic) == VEC
    raise_line(io, 4, False)
    lapic.write(EOI, 0)  # SDM 11.8.5: TMR set, so an EOI message goes to the I/O APIC
    assert not sel_read(io, 0x18) & REMOTE_IRR
    assert lapic.pending() is None  # deasserted before the EOI: nothing again


def test_level_still_asserted_at_eoi_is_delivered_again(system) -> None:
    io, lapic = system
    program(io, 4, VEC | LEVEL)
    raise_line(io, 4, True)
    assert take(lapic) == VEC
    raise_line(io, 4, True)  # remote IRR 1: no second message
    assert lapic.pending() is None
    lapic.write(EOI, 0)
    assert sel_read(io, 0x18) & REMOTE_IRR  # delivered again and accepted
    assert take(lapic) == VEC


def test_eoi_of_another_vector_or_an_edge_vector_leaves_remote_irr(system) -> None:
    io, lapic = system
    program(io, 4, VEC | LEVEL)
    program(io, 5, 0x50)  # edge, higher priority class
    raise_line(io, 4, True)
    assert take(lapic) == VEC
    raise_line(io, 5, True)
    assert take(lapic) == 0x50
    lapic.write(EOI, 0)  # retires 0x50: edge (TMR 0), no EOI message
    assert sel_read(io, 0x18) & REMOTE_IRR
    io.eoi(0x35)  # an EOI message whose vector matches no entry
    assert sel_read(io, 0x18) & REMOTE_IRR


def test_masked_edge_is_ignored_not_held(system) -> None:
    io, lapic = system
    program(io, 4, VEC | MASK)
    raise_line(io, 4, True)  # 3.2.4 mask: an edge on a masked pin is not delivered or held pending
    program(io, 4, VEC)
    io.service()
    assert lapic.pending() is None


def test_masked_level_delivered_when_unmasked_while_asserted(system) -> None:
    io, lapic = system
    program(io, 4, VEC | LEVEL | MASK)
    raise_line(io, 4, True)
    assert lapic.pending() is None and not sel_read(io, 0x18) & REMOTE_IRR  # no side effect
    program(io, 4, VEC | LEVEL)  # the pin still sees the level
    io.service()
    assert take(lapic) == VEC
    # masked and deasserted meanwhile: nothing when unmasked
    raise_line(io, 4, False)
    lapic.write(EOI, 0)
    program(io, 4, VEC | LEVEL | MASK)
    raise_line(io, 4, True)
    raise_line(io, 4, False)
    program(io, 4, VEC | LEVEL)
    io.service()
    assert lapic.pending() is None


def test_delivery_status_while_send_pending(system) -> None:
    io, lapic = system
    program(io, 4, VEC)
    io.set_irq(4, True)  # from another thread: recorded, sent by the vCPU thread's service()
    assert sel_read(io, 0x18) & DELIVS
    io.service()
    assert not sel_read(io, 0x18) & DELIVS and lapic.irr(VEC)


def test_destination_must_name_the_local_apic(system) -> None:
    io, lapic = system
    program(io, 4, VEC, dest=3)  # physical APIC ID 3; this APIC's ID is 0 (SDM 11.6.2.1)
    raise_line(io, 4, True)
    assert lapic.pending() is None and io.stats["undeliverable"] == 1
    raise_line(io, 4, False)
    program(io, 4, VEC, dest=0xFF)  # physical 0xFF: broadcast
    raise_line(io, 4, True)
    assert take(lapic) == VEC


def test_lines_from_another_thread(system) -> None:
    io, lapic = system
    program(io, 4, VEC)
    t = threading.Thread(target=io.set_irq, args=(4, True))
    t.start()
    t.join()
    io.service()
    assert take(lapic) == VEC


def test_bad_pins_and_offsets_are_harmless() -> None:
    io = IoApic()
    io.set_irq(99, True)
    io.set_irq(-1, True)
    assert io.read(0x20, 4) == 0
    io.write(0x40, 4, 0x34)  # no EOI register on a version 11h IOAPIC
    # no register at these indexes: all ones, as KVM's IOAPIC answers (uartirq under QEMU -accel kvm)
    assert sel_read(io, 0x03) == sel_read(io, 0x40) == sel_read(io, 0xFF) == 0xFFFF_FFFF
