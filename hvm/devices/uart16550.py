"""16550A UART: the PC's COM port, used as the guest's serial console.

Behaviour follows the National Semiconductor (now TI) PC16550D data sheet, June
1995; section numbers below are that sheet's. The layout follows rust-vmm
vm-superio's ``serial.rs``: register offsets and bits are named constants, and the
register file is a plain dataclass, :class:`UartState`, so a snapshot is
``dataclasses.replace(uart.state)`` (every field is immutable) and a restore is
``uart.state = snapshot`` (which stores a copy and re-drives the IRQ line).

The serial line is infinitely fast: a byte written to THR reaches ``output`` at
once, so THR and the transmitter shift register are always empty (LSR.THRE and
LSR.TEMT stay set) and the transmitter FIFO never holds a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from hvm.devices.base import IrqLine, no_irq

# Register offsets from the base port (Table II, "Summary of Registers").
RBR = 0  # Receiver Buffer Register: read, DLAB = 0
THR = 0  # Transmitter Holding Register: write, DLAB = 0
DLL = 0  # Divisor Latch, least significant byte: DLAB = 1
IER = 1  # Interrupt Enable Register: DLAB = 0
DLM = 1  # Divisor Latch, most significant byte: DLAB = 1
IIR = 2  # Interrupt Identification Register: read
FCR = 2  # FIFO Control Register: write
LCR = 3  # Line Control Register
MCR = 4  # MODEM Control Register
LSR = 5  # Line Status Register
MSR = 6  # MODEM Status Register
SCR = 7  # Scratch Register
UART_SPAN = 8  # ports decoded by A0-A2

# IER, §8.7.
IER_ERBFI = 0x01  # enable Received Data Available interrupt (and FIFO timeout)
IER_ETBEI = 0x02  # enable Transmitter Holding Register Empty interrupt
IER_ELSI = 0x04  # enable Receiver Line Status interrupt
IER_EDSSI = 0x08  # enable MODEM Status interrupt
IER_MASK = 0x0F  # bits 4-7 are always logic 0

# IIR, §8.6 and Table IV ("Interrupt Control Functions").
IIR_NO_INT = 0x01  # bit 0: logic 1 when no interrupt is pending
IIR_RLS = 0x06  # Receiver Line Status: priority 1 (highest)
IIR_RDA = 0x04  # Received Data Available: priority 2
IIR_CTI = 0x0C  # Character Timeout Indication: priority 2, FIFO mode only
IIR_THRE = 0x02  # Transmitter Holding Register Empty: priority 3
IIR_MODEM = 0x00  # MODEM Status: priority 4 (lowest)
IIR_FIFOS = 0xC0  # bits 6-7: set when FCR0 = 1

# FCR, §8.5.
FCR_ENABLE = 0x01  # enable both FIFOs; the other bits are programmed only with it
FCR_RX_RESET = 0x02  # clear the RCVR FIFO (self-clearing)
FCR_TRIGGER = 0xC0  # RCVR FIFO interrupt trigger level
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # bytes, indexed by FCR bits 7-6
FIFO_DEPTH = 16  # bytes in the RCVR FIFO

# LCR, §8.1.
LCR_DLAB = 0x80  # Divisor Latch Access Bit

# MCR, §8.8.
MCR_DTR = 0x01  # Data Terminal Ready
MCR_RTS = 0x02  # Request To Send
MCR_OUT1 = 0x04  # auxiliary output 1
MCR_OUT2 = 0x08  # auxiliary output 2 (gates INTR to the PIC on a PC)
MCR_LOOP = 0x10  # loopback diagnostic mode
MCR_MASK = 0x1F  # bits 5-7 are permanently 0

# LSR, §8.4.
LSR_DR = 0x01  # Data Ready: a character is in RBR or the RCVR FIFO
LSR_OE = 0x02  # Overrun Error
LSR_PE = 0x04  # Parity Error
LSR_FE = 0x08  # Framing Error
LSR_BI = 0x10  # Break Interrupt
LSR_THRE = 0x20  # Transmitter Holding Register Empty
LSR_TEMT = 0x40  # Transmitter Empty: THR and the shift register both empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # raise RLS; cleared by reading LSR

# MSR, §8.9.
MSR_DCTS = 0x01  # Delta Clear To Send
MSR_DDSR = 0x02  # Delta Data Set Ready
MSR_TERI = 0x04  # Trailing Edge Ring Indicator: RI went from 1 to 0
MSR_DDCD = 0x08  # Delta Data Carrier Detect
MSR_CTS = 0x10  # Clear To Send
MSR_DSR = 0x20  # Data Set Ready
MSR_RI = 0x40  # Ring Indicator
MSR_DCD = 0x80  # Data Carrier Detect
MSR_DELTAS = 0x0F  # change bits; cleared by reading MSR
MSR_LINES = 0xF0  # current state of the four MODEM inputs

#: What the host end of the cable drives on the MODEM inputs: a ready terminal
#: with carrier (DCD, DSR and CTS asserted, RI not), as QEMU's serial.c does.
HOST_MODEM_INPUTS = MSR_DCD | MSR_DSR | MSR_CTS

#: §8.8: in loopback each MODEM output drives a MODEM input.
LOOPBACK_WIRING = (
    (MCR_DTR, MSR_DSR),
    (MCR_RTS, MSR_CTS),
    (MCR_OUT1, MSR_RI),
    (MCR_OUT2, MSR_DCD),
)


@dataclass
class UartState:
    """The register file. Reset values are Table I ("UART Reset Configuration")."""

    # The divisor latches are not touched by reset in the data sheet; 0x000C is
    # 9600 baud from the PC's 1.8432 MHz clock, as QEMU starts it.
    dll: int = 0x0C
    dlm: int = 0x00
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = HOST_MODEM_INPUTS
    scr: int = 0  # not in Table I; QEMU resets it to 0
    fcr: int = 0  # the FCR bits that stick: FCR_ENABLE and FCR_TRIGGER
    rx: bytes = b""  # RCVR FIFO (FIFO mode) or RBR (16450 mode), oldest first
    thr_int: bool = False  # THRE interrupt latched; masked by IER.ETBEI


class Uart16550:
    """A PC16550D on the port-I/O bus (COM1: base 0x3F8, 8 ports, IRQ 4).

    ``output`` receives every byte the guest transmits; ``receive`` feeds bytes
    from the host into the receiver; ``irq`` is driven with the "interrupt
    pending" level whenever it changes.
    """

    def __init__(
        self,
        output: Callable[[bytes], None],
        irq: IrqLine = no_irq,
        name: str = "com1",
    ) -> None:
        self.name = name
        self._output = output
        self._irq = irq
        self._irq_level = False
        self._state = UartState()

    @property
    def state(self) -> UartState:
        """The live register file; ``dataclasses.replace`` it to take a snapshot."""
        return self._state

    @state.setter
    def state(self, state: UartState) -> None:
        """Restore a copy of ``state`` and drive the IRQ line to match it."""
        self._state = replace(state)
        self._update_irq()

    # Bus interface.

    def read(self, offset: int, size: int) -> int:
        if size != 1 or not 0 <= offset < UART_SPAN:
            return (1 << (8 * max(size, 0))) - 1
        s = self._state
        dlab = s.lcr & LCR_DLAB
        if offset == RBR:
            return s.dll if dlab else self._read_rbr()
        if offset == IER:
            return s.dlm if dlab else s.ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return s.lcr
        if offset == MCR:
            return s.mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        return s.scr

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or not 0 <= offset < UART_SPAN:
            return
        value &= 0xFF
        s = self._state
        dlab = s.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                s.dll = value
            else:
                self._write_thr(value)
        elif offset == IER:
            if dlab:
                s.dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            s.lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            s.scr = value
        # LSR and MSR are read-only: §8.4 keeps writes to LSR for factory test.

    # Host side.

    def can_receive(self) -> int:
        """How many bytes ``receive`` can take now without an overrun."""
        if self._state.mcr & MCR_LOOP:
            return 0
        return self._rx_capacity() - len(self._state.rx)

    def receive(self, data: bytes) -> int:
        """Feed bytes arriving on SIN; return how many entered the receiver.

        In FIFO mode a byte arriving at a full FIFO is dropped and sets LSR.OE
        (§8.4, bit 1). In 16450 mode the data sheet has the new byte overwrite an
        unread RBR, also setting OE; that byte counts as entered. In loopback
        SIN is disconnected (§8.8) and nothing is taken.
        """
        if self._state.mcr & MCR_LOOP:
            return 0
        accepted = sum(self._rx_push(byte) for byte in data)
        self._update_irq()
        return accepted

    # Registers with side effects.

    def _read_rbr(self) -> int:
        s = self._state
        if not s.rx:
            return 0
        byte = s.rx[0]
        self._set_rx(s.rx[1:])
        self._update_irq()
        return byte

    def _read_iir(self) -> int:
        iid = self._interrupt_id()
        if iid == IIR_THRE:
            # Table IV: reading IIR clears THRE when it is the source reported.
            self._state.thr_int = False
            self._update_irq()
        return iid | (IIR_FIFOS if self._fifo_enabled() else 0)

    def _read_lsr(self) -> int:
        s = self._state
        value = s.lsr
        s.lsr &= ~LSR_ERRORS
        self._update_irq()
        return value

    def _read_msr(self) -> int:
        s = self._state
        value = s.msr
        s.msr &= MSR_LINES
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        s = self._state
        # Table IV: writing THR clears the THRE interrupt ...
        s.thr_int = False
        self._update_irq()
        if s.mcr & MCR_LOOP:
            self._rx_push(value)
        else:
            self._output(bytes((value,)))
        # ... and the infinitely fast line empties THR again at once, which sets
        # it anew. The IRQ drops and rises, so an edge-triggered PIC sees a new
        # edge for each byte, as with QEMU.
        s.thr_int = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        s = self._state
        # THR is always empty here, so turning ETBEI on makes THRE pending.
        if value & ~s.ier & IER_ETBEI:
            s.thr_int = True
        s.ier = value & IER_MASK
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        s = self._state
        # §8.5: switching between FIFO and 16450 mode clears the FIFOs; with FCR0
        # clear the other bits are not programmed. The XMIT FIFO is always empty,
        # so FCR2 (XMIT FIFO reset) has nothing to clear.
        enable = value & FCR_ENABLE
        if (s.fcr ^ value) & FCR_ENABLE or (enable and value & FCR_RX_RESET):
            self._set_rx(b"")
        s.fcr = value & (FCR_ENABLE | FCR_TRIGGER) if enable else 0
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        s = self._state
        s.mcr = value & MCR_MASK
        if s.mcr & MCR_LOOP:
            lines = 0
            for out, line in LOOPBACK_WIRING:
                if s.mcr & out:
                    lines |= line
        else:
            lines = HOST_MODEM_INPUTS
        old = s.msr & MSR_LINES
        # §8.9: each delta bit sits four below its line; TERI only on RI 1 -> 0.
        deltas = ((old ^ lines) >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI
        s.msr = lines | (s.msr & MSR_DELTAS) | deltas
        self._update_irq()

    # Receiver.

    def _fifo_enabled(self) -> bool:
        return bool(self._state.fcr & FCR_ENABLE)

    def _rx_capacity(self) -> int:
        return FIFO_DEPTH if self._fifo_enabled() else 1

    def _rx_trigger(self) -> int:
        if not self._fifo_enabled():
            return 1
        return RX_TRIGGER_LEVELS[self._state.fcr >> 6]

    def _set_rx(self, data: bytes) -> None:
        s = self._state
        s.rx = data
        s.lsr = (s.lsr | LSR_DR) if data else (s.lsr & ~LSR_DR)

    def _rx_push(self, byte: int) -> bool:
        """Move one byte off SIN into the receiver; False if it was lost."""
        s = self._state
        if len(s.rx) < self._rx_capacity():
            self._set_rx(s.rx + bytes((byte,)))
            return True
        s.lsr |= LSR_OE
        if self._fifo_enabled():
            return False
        self._set_rx(bytes((byte,)))
        return True

    # Interrupts.

    def _interrupt_id(self) -> int:
        """IIR bits 0-3: the highest-priority enabled interrupt (Table IV)."""
        s = self._state
        if s.ier & IER_ELSI and s.lsr & LSR_ERRORS:
            return IIR_RLS
        if s.ier & IER_ERBFI and s.rx:
            if len(s.rx) >= self._rx_trigger():
                return IIR_RDA
            # §8.11: the timeout fires when data below the trigger level has sat
            # in the FIFO for four character times with no reads or arrivals.
            # With no bit clock here, those four character times have passed
            # whenever a receive() call has ended, so data below the trigger
            # level always reports a timeout. Reading RBR restarts the timer,
            # which expires at once again while data is left.
            return IIR_CTI
        if s.ier & IER_ETBEI and s.thr_int:
            return IIR_THRE
        if s.ier & IER_EDSSI and s.msr & MSR_DELTAS:
            return IIR_MODEM
        return IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC, MCR.OUT2 gates INTR to the PIC. QEMU's serial.c, our reference
        # peer, does not model that gate and neither do we: the line follows
        # "interrupt pending" whatever OUT2 is.
        level = self._interrupt_id() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)
