"""hvm.devices.uart16550 against the PC16550D data sheet (National Semiconductor,
June 1995).

Expected values are written out from the data sheet, not taken from the module's
constants: register offsets from Table II ("Summary of Registers"), reset values
from Table I ("UART Reset Configuration"), IIR codes and their priorities from
Table IV ("Interrupt Control Functions"), and bits from the register sections
(§8.1 LCR, §8.4 LSR, §8.5 FCR, §8.6 IIR, §8.7 IER, §8.8 MCR, §8.9 MSR, §8.10 SCR,
§8.11 FIFO interrupt mode).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvm.devices.uart16550 import Uart16550

# Table II: offsets (A2-A0).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# Table IV: IIR bits 3-0.
IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_CTI = 0x0C
IIR_THRE = 0x02
IIR_MODEM = 0x00
IIR_FIFO_BITS = 0xC0  # §8.6: bits 6-7 set when FCR0 = 1

# §8.7 IER bits.
ERBFI, ETBEI, ELSI, EDSSI = 0x01, 0x02, 0x04, 0x08

# §8.4 LSR bits.
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40

# §8.8 MCR bits.
DTR, RTS, OUT1, OUT2, LOOP = 0x01, 0x02, 0x04, 0x08, 0x10

# §8.9 MSR bits.
DCTS, DDSR, TERI, DDCD = 0x01, 0x02, 0x04, 0x08
CTS, DSR, RI, DCD = 0x10, 0x20, 0x40, 0x80


class Rig:
    """A UART with its output and IRQ line recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.irq_levels: list[bool] = []
        self.uart = Uart16550(output=self.out.extend, irq=self.irq_levels.append)

    def rd(self, offset: int) -> int:
        return self.uart.read(offset, 1)

    def wr(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)

    @property
    def irq(self) -> bool:
        return self.irq_levels[-1] if self.irq_levels else False


@pytest.fixture
def rig() -> Rig:
    return Rig()


def fifo_rig(fcr: int = 0x01, ier: int = 0) -> Rig:
    r = Rig()
    r.wr(FCR, fcr)
    r.wr(IER, ier)
    return r


# Reset (Table I).


def test_reset_values_table_i(rig: Rig) -> None:
    assert rig.rd(IER) == 0x00  # all bits low
    assert rig.rd(IIR) == 0x01  # bit 0 high, bits 1-7 low
    assert rig.rd(LCR) == 0x00  # all bits low
    assert rig.rd(MCR) == 0x00  # all bits low
    assert rig.rd(LSR) == 0x60  # all bits low except THRE (5) and TEMT (6)
    # Bits 0-3 low; bits 4-7 follow the MODEM inputs, which this model drives
    # with a ready terminal: DCD, DSR, CTS asserted, RI not.
    assert rig.rd(MSR) == DCD | DSR | CTS
    assert rig.rd(SCR) == 0x00  # not in Table I; QEMU resets it to 0
    assert rig.irq_levels == []  # INTR low after reset


# DLAB (§8.1 LCR bit 7, Table II).


def test_dlab_selects_divisor_latches_over_rbr_thr_and_ier(rig: Rig) -> None:
    rig.wr(IER, 0x05)
    rig.wr(LCR, 0x83)  # DLAB = 1, 8 data bits
    rig.wr(DLL, 0x01)  # 115200 baud
    rig.wr(DLM, 0x02)
    assert (rig.rd(DLL), rig.rd(DLM)) == (0x01, 0x02)
    assert rig.out == b""  # the DLL write did not reach THR
    rig.wr(LCR, 0x03)  # DLAB = 0
    assert rig.rd(IER) == 0x05  # IER untouched by the DLM write
    assert rig.rd(RBR) == 0x00  # nothing received
    rig.wr(THR, 0x41)
    assert rig.out == b"A"
    rig.wr(LCR, 0x83)
    assert (rig.rd(DLL), rig.rd(DLM)) == (0x01, 0x02)  # latches kept


def test_lcr_is_read_write_all_bits(rig: Rig) -> None:
    # §8.1: every LCR bit is programmable and readable.
    rig.wr(LCR, 0x7F)
    assert rig.rd(LCR) == 0x7F


# IER (§8.7).


def test_ier_only_low_four_bits_writable(rig: Rig) -> None:
    # §8.7: IER bits 4-7 are always logic 0.
    rig.wr(IER, 0xF0)
    assert rig.rd(IER) == 0x00
    rig.wr(IER, 0xFF)
    assert rig.rd(IER) == 0x0F


def test_mcr_only_low_five_bits_writable(rig: Rig) -> None:
    # §8.8: MCR bits 5-7 are permanently 0.
    rig.wr(MCR, 0xEF)
    assert rig.rd(MCR) == 0x0F


# Transmit.


def test_thr_byte_goes_to_output_and_lsr_stays_empty(rig: Rig) -> None:
    rig.wr(THR, 0x68)
    rig.wr(THR, 0x69)
    assert rig.out == b"hi"
    # §8.4: THRE (bit 5) and TEMT (bit 6) are set once the byte has left; the
    # line here is infinitely fast.
    assert rig.rd(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


@given(st.binary(max_size=64))
def test_property_thr_bytes_arrive_in_order_unchanged(data: bytes) -> None:
    r = Rig()
    for byte in data:
        r.wr(THR, byte)
    assert bytes(r.out) == data


# THRE interrupt (Table IV, priority 3; §8.7).


def test_thre_interrupt_when_etbei_turned_on_with_thr_empty(rig: Rig) -> None:
    assert rig.rd(IIR) == IIR_NONE  # THR empty but ETBEI off
    rig.wr(IER, ETBEI)
    assert rig.irq is True
    assert rig.rd(IIR) == IIR_THRE


def test_thre_interrupt_cleared_by_reading_iir_when_it_is_the_source(rig: Rig) -> None:
    rig.wr(IER, ETBEI)
    assert rig.rd(IIR) == IIR_THRE  # this read clears it (Table IV, reset control)
    assert rig.irq is False
    assert rig.rd(IIR) == IIR_NONE


def test_thre_interrupt_not_cleared_by_iir_read_reporting_another_source() -> None:
    r = fifo_rig(fcr=0x00, ier=ELSI | ETBEI)
    r.uart.receive(b"ab")  # 16450 mode: second byte overruns (§8.4 bit 1)
    assert r.rd(IIR) == IIR_RLS  # higher priority, so THRE is not cleared
    r.rd(LSR)  # clears the line status interrupt
    assert r.rd(IIR) == IIR_THRE  # still pending


def test_thre_interrupt_cleared_by_writing_thr_then_set_as_thr_empties(rig: Rig) -> None:
    rig.wr(IER, ETBEI)
    rig.rd(IIR)  # clear it
    assert rig.irq_levels == [True, False]
    rig.wr(THR, 0x21)
    # Writing THR clears the THRE interrupt (Table IV); the THR then empties at
    # once (infinitely fast line) and THRE becomes pending again: a fresh edge.
    assert rig.irq_levels == [True, False, True]
    assert rig.rd(IIR) == IIR_THRE
    assert rig.irq_levels == [True, False, True, False]
    rig.wr(IER, ETBEI)  # ETBEI already on: not "turned on", nothing new
    assert rig.rd(IIR) == IIR_NONE


def test_thr_write_while_thre_pending_pulses_irq(rig: Rig) -> None:
    rig.wr(IER, ETBEI)
    rig.wr(THR, 0x21)
    assert rig.irq_levels == [True, False, True]


# Receive FIFO (§8.5, §8.11).


def test_rx_fifo_reads_back_in_order_and_dr_tracks_data() -> None:
    r = fifo_rig()
    assert r.uart.receive(b"xyz") == 3
    got = []
    while r.rd(LSR) & LSR_DR:  # §8.4 bit 0: set while the FIFO holds data
        got.append(r.rd(RBR))
    assert bytes(got) == b"xyz"
    assert r.rd(LSR) & LSR_DR == 0


@given(st.binary(max_size=16))
def test_property_rx_fifo_up_to_16_bytes_reads_back_in_order(data: bytes) -> None:
    r = fifo_rig()
    assert r.uart.receive(data) == len(data)
    assert bytes(r.rd(RBR) for _ in data) == data
    assert r.rd(LSR) & (LSR_DR | LSR_OE) == 0


@pytest.mark.parametrize(
    ("fcr", "trigger"),
    [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)],  # §8.5: FCR bits 7-6
)
def test_rx_data_available_fires_at_trigger_level(fcr: int, trigger: int) -> None:
    r = fifo_rig(fcr=fcr, ier=ERBFI)
    r.uart.receive(b"a" * (trigger - 1))
    below = r.rd(IIR)
    # §8.11: below the trigger level only the character timeout can report
    # (this model's timeout has elapsed once receive() returns).
    assert below == (IIR_FIFO_BITS | IIR_CTI if trigger > 1 else IIR_FIFO_BITS | IIR_NONE)
    r.uart.receive(b"b")
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_RDA  # §8.11: at the trigger level
    assert r.irq is True
    r.rd(RBR)  # below trigger again: RDA clears (§8.11)
    if trigger > 1:
        assert r.rd(IIR) == IIR_FIFO_BITS | IIR_CTI
    else:
        assert r.rd(IIR) == IIR_FIFO_BITS | IIR_NONE
        assert r.irq is False


def test_character_timeout_clears_when_fifo_is_read_empty() -> None:
    r = fifo_rig(fcr=0xC1, ier=ERBFI)  # trigger 14
    r.uart.receive(b"hi")
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_CTI  # Table IV: 1100
    assert r.irq is True
    assert (r.rd(RBR), r.rd(RBR)) == (ord("h"), ord("i"))
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_NONE
    assert r.irq is False


def test_rx_data_available_in_16450_mode_cleared_by_reading_rbr(rig: Rig) -> None:
    rig.wr(IER, ERBFI)
    assert rig.uart.receive(b"q") == 1
    assert rig.rd(IIR) == IIR_RDA  # no FIFO bits, never a timeout in 16450 mode
    assert rig.rd(RBR) == ord("q")
    assert rig.rd(IIR) == IIR_NONE
    assert rig.irq_levels == [True, False]


def test_fcr_rx_reset_clears_fifo_and_data_ready() -> None:
    r = fifo_rig()
    r.uart.receive(b"abc")
    r.wr(FCR, 0x03)  # §8.5 bit 1: clear the RCVR FIFO
    assert r.rd(LSR) & LSR_DR == 0
    assert r.uart.can_receive() == 16


def test_leaving_fifo_mode_clears_fifo() -> None:
    r = fifo_rig()
    r.uart.receive(b"abc")
    r.wr(FCR, 0x00)  # §8.5 bit 0: changing mode clears the FIFOs
    assert r.rd(LSR) & LSR_DR == 0


def test_can_receive_is_free_space(rig: Rig) -> None:
    assert rig.uart.can_receive() == 1  # 16450 mode: one holding register
    rig.uart.receive(b"a")
    assert rig.uart.can_receive() == 0
    rig.wr(FCR, 0x01)
    assert rig.uart.can_receive() == 16  # §8.5: 16-byte RCVR FIFO
    rig.uart.receive(b"abcde")
    assert rig.uart.can_receive() == 11


# Overrun (§8.4 bit 1).


def test_fifo_overrun_sets_oe_and_drops_the_new_byte() -> None:
    r = fifo_rig()
    data = bytes(range(0x40, 0x51))  # 17 bytes
    assert r.uart.receive(data) == 16
    assert r.rd(LSR) & LSR_OE
    # FIFO mode: the character in the shift register is overwritten, not moved
    # into the FIFO, so the first 16 are intact.
    assert bytes(r.rd(RBR) for _ in range(16)) == data[:16]
    assert r.rd(LSR) & LSR_DR == 0


def test_16450_overrun_sets_oe_and_new_byte_destroys_unread_one(rig: Rig) -> None:
    assert rig.uart.receive(b"a") == 1
    rig.uart.receive(b"b")
    # 16450 mode: the next character was transferred into RBR before the CPU
    # read it, "thereby destroying the previous character".
    assert rig.rd(LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert rig.rd(RBR) == ord("b")


# IIR (§8.6, Table IV).


def test_iir_priority_line_status_over_rx_over_thre() -> None:
    r = fifo_rig(ier=ERBFI | ETBEI | ELSI | EDSSI)
    r.uart.receive(bytes(17))  # data at trigger level 1, plus an overrun
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_RLS  # priority 1
    r.rd(LSR)  # clears it
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_RDA  # priority 2
    for _ in range(16):
        r.rd(RBR)
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_THRE  # priority 3; this read clears it
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_NONE
    assert r.irq is False


def test_iir_character_timeout_over_thre() -> None:
    r = fifo_rig(fcr=0x41, ier=ERBFI | ETBEI)  # trigger 4
    r.uart.receive(b"a")
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_CTI  # priority 2 beats 3
    r.rd(RBR)
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_THRE


def test_iir_modem_status_is_lowest_and_cleared_by_reading_msr(rig: Rig) -> None:
    rig.wr(IER, EDSSI | ETBEI)
    rig.wr(MCR, LOOP)  # DCD, DSR, CTS drop: delta bits set
    assert rig.rd(IIR) == IIR_THRE  # priority 3 first
    assert rig.rd(IIR) == IIR_MODEM  # priority 4: 0000, bit 0 low = pending
    assert rig.irq is True
    rig.rd(MSR)
    assert rig.rd(IIR) == IIR_NONE
    assert rig.irq is False


def test_iir_fifo_bits_follow_fcr0(rig: Rig) -> None:
    rig.wr(FCR, 0x01)
    assert rig.rd(IIR) == 0xC1  # §8.6: bits 6-7 set when FCR0 = 1
    rig.wr(FCR, 0x00)
    assert rig.rd(IIR) == 0x01


def test_fcr_bits_other_than_fcr0_not_programmed_without_it(rig: Rig) -> None:
    # §8.5: FCR0 must be 1 when other FCR bits are written or they are ignored.
    rig.wr(FCR, 0xC0)
    assert rig.rd(IIR) == 0x01
    assert rig.uart.can_receive() == 1


def test_disabled_interrupts_are_not_reported(rig: Rig) -> None:
    rig.uart.receive(b"ab")  # data plus overrun, but IER = 0
    assert rig.rd(IIR) == IIR_NONE
    assert rig.irq_levels == []


# LSR (§8.4).


def test_lsr_read_clears_error_bits_and_line_status_interrupt(rig: Rig) -> None:
    rig.wr(IER, ELSI)
    rig.uart.receive(b"ab")  # overrun
    assert rig.irq is True
    assert rig.rd(LSR) == LSR_THRE | LSR_TEMT | LSR_OE | LSR_DR
    assert rig.irq is False
    assert rig.rd(LSR) == LSR_THRE | LSR_TEMT | LSR_DR  # OE reset by the read


def test_lsr_and_msr_writes_are_ignored(rig: Rig) -> None:
    rig.wr(LSR, 0x1F)
    rig.wr(MSR, 0x0F)
    assert rig.rd(LSR) == 0x60
    assert rig.rd(MSR) == DCD | DSR | CTS


# Loopback (§8.8 bit 4) and MSR (§8.9).


def test_loopback_thr_returns_to_receiver_not_output() -> None:
    r = fifo_rig(ier=ERBFI)
    r.wr(MCR, LOOP)
    r.wr(THR, 0x55)
    assert r.out == b""  # SOUT held marking
    assert r.rd(LSR) & LSR_DR
    assert r.rd(IIR) == IIR_FIFO_BITS | IIR_RDA
    assert r.rd(RBR) == 0x55


def test_loopback_disconnects_sin(rig: Rig) -> None:
    rig.wr(MCR, LOOP)
    assert rig.uart.can_receive() == 0
    assert rig.uart.receive(b"x") == 0
    assert rig.rd(LSR) & LSR_DR == 0


@pytest.mark.parametrize(
    ("mcr_out", "msr_in"),
    [(DTR, DSR), (RTS, CTS), (OUT1, RI), (OUT2, DCD)],  # §8.8 loopback wiring
)
def test_loopback_msr_mirrors_mcr(rig: Rig, mcr_out: int, msr_in: int) -> None:
    rig.wr(MCR, LOOP)
    rig.rd(MSR)  # drop the deltas from entering loopback
    rig.wr(MCR, LOOP | mcr_out)
    assert rig.rd(MSR) & 0xF0 == msr_in


def test_loopback_all_outputs(rig: Rig) -> None:
    rig.wr(MCR, LOOP | DTR | RTS | OUT1 | OUT2)
    assert rig.rd(MSR) & 0xF0 == 0xF0


def test_msr_delta_bits_set_on_change_and_cleared_by_read(rig: Rig) -> None:
    rig.wr(MCR, LOOP)
    # DCD, DSR, CTS go from asserted to not: their delta bits set; RI was and
    # stays 0.
    assert rig.rd(MSR) == DDCD | DDSR | DCTS
    assert rig.rd(MSR) == 0x00  # §8.9: reading MSR resets bits 0-3
    rig.wr(MCR, LOOP | RTS)
    assert rig.rd(MSR) == CTS | DCTS


def test_msr_teri_only_on_ring_trailing_edge(rig: Rig) -> None:
    rig.wr(MCR, LOOP)
    rig.rd(MSR)
    rig.wr(MCR, LOOP | OUT1)  # RI 0 -> 1: leading edge, no TERI
    assert rig.rd(MSR) == RI
    rig.wr(MCR, LOOP)  # RI 1 -> 0: trailing edge
    assert rig.rd(MSR) == TERI


def test_leaving_loopback_reconnects_modem_inputs(rig: Rig) -> None:
    rig.wr(MCR, LOOP)
    rig.rd(MSR)
    rig.wr(MCR, 0x00)
    assert rig.rd(MSR) == DCD | DSR | CTS | DDCD | DDSR | DCTS


# SCR (§8.10).


@given(st.integers(0, 255))
def test_scratch_register_holds_any_byte(value: int) -> None:
    r = Rig()
    r.wr(SCR, value)
    assert r.rd(SCR) == value
    assert r.irq_levels == []  # no side effects


# IRQ line.


def test_irq_level_transitions_are_reported_once_each(rig: Rig) -> None:
    rig.wr(IER, ERBFI)
    rig.uart.receive(b"a")
    rig.rd(LSR)  # nothing to clear: no transition
    rig.rd(RBR)
    rig.uart.receive(b"b")
    rig.wr(IER, 0x00)  # masking the source lowers INTR
    assert rig.irq_levels == [True, False, True, False]


def test_irq_raised_regardless_of_out2(rig: Rig) -> None:
    # A PC gates INTR with OUT2; QEMU does not, and this model follows QEMU.
    rig.wr(MCR, 0x00)
    rig.wr(IER, ETBEI)
    assert rig.irq is True


# Bus edge cases.


@pytest.mark.parametrize(("offset", "size"), [(8, 1), (100, 1), (-1, 1), (0, 2), (5, 4)])
def test_bad_offset_or_size_reads_ones_and_ignores_writes(rig: Rig, offset: int, size: int) -> None:
    assert rig.uart.read(offset, size) == (1 << (8 * size)) - 1
    rig.uart.write(offset, size, 0x41)
    rig.uart.write(offset, size, 0x0101)
    assert rig.out == b""
    assert [rig.rd(i) for i in range(8)] == [0, 0, 1, 0, 0, 0x60, 0xB0, 0]


# Snapshot and restore.


def test_state_snapshot_and_restore_redrives_irq(rig: Rig) -> None:
    rig.wr(FCR, 0x01)
    rig.wr(IER, ERBFI)
    rig.uart.receive(b"hey")
    snapshot = dataclasses.replace(rig.uart.state)
    assert rig.rd(RBR) == ord("h")

    other = Rig()
    other.uart.state = snapshot
    assert other.irq_levels == [True]
    assert bytes(other.rd(RBR) for _ in range(3)) == b"hey"
    # The snapshot is independent of both devices.
    assert snapshot.rx == b"hey"
