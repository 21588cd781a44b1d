"""Event delivery: how the model processor vectors an exception or interrupt through the guest's IDT.

Unicorn reports a guest exception or ``INT n`` to a hook and never delivers it (QEMU's
``do_interrupt`` is not reached), and VM entry must be able to *inject* an event (SDM Vol. 3C
28.6). Both need the processor's delivery sequence, which this module performs on a
:class:`~hvm.cpu.CpuState` and guest linear memory:

* real-address mode: the interrupt vector table, 4-byte entries (SDM Vol. 3A 21.1.4);
* protected mode: interrupt and trap gates, a stack switch through the TSS on a privilege
  change, the error code (SDM Vol. 3A 6.12);
* IA-32e mode: 16-byte gates, 64-bit pushes, IST and the aligned stack (SDM Vol. 3A 6.14).

A fault while delivering is combined with the event being delivered by the double-fault rules
(SDM Vol. 3A 6.15, table "Conditions for Generating a Double Fault"); a fault while delivering a
double fault is a triple fault, which in VMX non-root operation is a VM exit (SDM Vol. 3C 26.2).
Task gates and virtual-8086 mode are not modelled: :class:`Unsupported` says so.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from hvm.cpu import CR0_PE, EFER_LMA, CpuState, Segment
from hvm.vtx.qualification import InterruptionType

DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS, GP, PF, MF, AC, MC = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18)
ERROR_CODE_VECTORS = frozenset({DF, TS, NP, SS, GP, PF, AC, 21})
_CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})

RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = (
    1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18)
_SOFTWARE = (InterruptionType.SOFTWARE_INTERRUPT, InterruptionType.SOFTWARE_EXCEPTION,
             InterruptionType.PRIVILEGED_SOFTWARE_EXCEPTION)


@dataclass(frozen=True)
class Event:
    """An event to deliver; for software interrupts RIP already points past the instruction."""

    vector: int
    type: InterruptionType = InterruptionType.HARDWARE_EXCEPTION
    error_code: int | None = None
    cr2: int | None = None  # a page fault's linear address, loaded into CR2 when it is delivered

    @property
    def external(self) -> bool:
        """The EXT bit of error codes raised while delivering this event (SDM Vol. 3A 6.13)."""
        return self.type not in _SOFTWARE


class Fault(Exception):
    """An exception raised while delivering an event (or while the engine reads guest memory)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(f"#{vector}")
        self.event = Event(vector, InterruptionType.HARDWARE_EXCEPTION,
                           error_code if vector in ERROR_CODE_VECTORS else None, cr2)


class TripleFault(Exception):
    """Delivery failed with a double fault pending: the processor shuts down (SDM Vol. 3A 6.15)."""


class Unsupported(Exception):
    """An event-delivery path the model does not implement (task gates, virtual-8086 mode)."""


#: read(linear, length) -> bytes and write(linear, data), raising Fault on a translation failure.
Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], None]


def double_fault_class(vector: int) -> str:
    if vector == PF:
        return "page fault"
    return "contributory" if vector in _CONTRIBUTORY else "benign"


def combine(first: Event, second: Event) -> Event | None:
    """The event the processor delivers after ``second`` interrupted delivery of ``first``.

    None means a triple fault (SDM Vol. 3A 6.15, interrupt 8, table 6-5).
    """
    if first.vector == DF and first.type is InterruptionType.HARDWARE_EXCEPTION:
        return None if double_fault_class(second.vector) != "benign" else second
    a, b = double_fault_class(first.vector), double_fault_class(second.vector)
    if first.type is InterruptionType.HARDWARE_EXCEPTION and (
        (a == "contributory" and b == "contributory") or (a == "page fault" and b != "benign")
    ):
        return Event(DF, InterruptionType.HARDWARE_EXCEPTION, 0)
    return second


def parse_descriptor(raw: int, selector: int) -> Segment:
    """A segment descriptor (SDM Vol. 3A 3.4.5) as the cache a load would fill."""
    limit = raw & 0xFFFF | (raw >> 48 & 0xF) << 16
    g = raw >> 55 & 1
    if g:
        limit = limit << 12 | 0xFFF
    return Segment(
        selector=selector, base=(raw >> 16 & 0xFF_FFFF) | (raw >> 56 & 0xFF) << 24, limit=limit,
        type=raw >> 40 & 0xF, s=raw >> 44 & 1, dpl=raw >> 45 & 3, present=raw >> 47 & 1,
        avl=raw >> 52 & 1, l=raw >> 53 & 1, db=raw >> 54 & 1, g=g,
    )


class Delivery:
    """Delivers events into ``state`` with guest linear memory through ``read``/``write``."""

    def __init__(self, state: CpuState, read: Reader, write: Writer) -> None:
        self.state = state
        self.read = read
        self.write = write
        self.delivered: Event | None = None  # the event finally delivered (after the #DF rules)

    # --- the double-fault rules around single deliveries --------------------------------
    def deliver(self, event: Event) -> None:
        """Deliver ``event``; raises TripleFault, Unsupported or whatever ``read``/``write`` raise."""
        current = event
        for _ in range(3):
            try:
                self._deliver_one(current)
                self.delivered = current
                return
            except Fault as fault:
                following = combine(current, fault.event)
                if following is None:
                    raise TripleFault(f"{describe(fault.event)} while delivering a double fault") from None
                current = following
        raise TripleFault("exceptions kept recurring while delivering an event")

    def _deliver_one(self, event: Event) -> None:
        state = self.state
        if not state.cr0 & CR0_PE:
            self._real_mode(event)
        elif state.rflags & RFLAGS_VM:
            raise Unsupported("event delivery in virtual-8086 mode is not modelled")
        elif state.efer & EFER_LMA:
            self._long_mode(event)
        else:
            self._protected_mode(event)

    # --- real-address mode (SDM Vol. 3A 21.1.4) -----------------------------------------
    def _real_mode(self, event: Event) -> None:
        state = self.state
        offset = event.vector * 4
        if offset + 3 > state.idt.limit:
            raise Fault(GP, 0)
        ip, cs = struct.unpack("<HH", self.read(state.idt.base + offset, 4))
        sp = state.regs["rsp"] & 0xFFFF
        frame = struct.pack("<HHH", state.rip & 0xFFFF, state.cs.selector, state.rflags & 0xFFFF)
        sp = (sp - 6) & 0xFFFF
        self.write(state.ss.base + sp, frame)
        state.regs["rsp"] = state.regs["rsp"] & ~0xFFFF | sp
        state.rflags &= ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC)
        state.cs = replace(state.cs, selector=cs, base=cs << 4)
        state.rip = ip

    # --- gates and descriptors ----------------------------------------------------------
    def _gate(self, event: Event, entry_size: int) -> tuple[int, int, int, int, int]:
        """(type, dpl, selector, offset, ist) of the IDT gate, with the checks of SDM 6.12.1."""
        state = self.state
        index = event.vector * entry_size
        error = index + 2 + int(event.external)
        if index + entry_size - 1 > state.idt.limit:
            raise Fault(GP, error)
        raw = int.from_bytes(self.read(state.idt.base + index, entry_size), "little")
        gate_type, dpl, present = raw >> 40 & 0xF, raw >> 45 & 3, raw >> 47 & 1
        offset = raw & 0xFFFF | (raw >> 48 & 0xFFFF) << 16
        if entry_size == 16:
            offset |= (raw >> 64 & 0xFFFF_FFFF) << 32
            valid = (14, 15)
        else:
            valid = (6, 7, 14, 15)
        if gate_type == 5 and entry_size == 8:
            raise Unsupported("task gates in the IDT are not modelled")
        if gate_type not in valid:
            raise Fault(GP, error)
        if event.type in _SOFTWARE and dpl < self._cpl():
            raise Fault(GP, index + 2)  # SDM 6.12.1.1: INT n/INT3/INTO to a gate with DPL < CPL
        if not present:
            raise Fault(NP, error)
        return gate_type, dpl, raw >> 16 & 0xFFFF, offset, raw >> 32 & 7

    def _cpl(self) -> int:
        return self.state.ss.dpl if self.state.cr0 & CR0_PE else 0

    def _descriptor(self, selector: int, external: bool) -> Segment:
        state = self.state
        error = selector & 0xFFFC | int(external)
        table = state.ldt if selector & 4 else state.gdt
        index = selector & ~7
        if selector & 0xFFFC == 0 or index + 7 > table.limit:
            raise Fault(GP, error)
        return parse_descriptor(int.from_bytes(self.read(table.base + index, 8), "little"), selector)

    def _code_segment(self, selector: int, event: Event) -> Segment:
        seg = self._descriptor(selector, event.external)
        error = selector & 0xFFFC | int(event.external)
        if not seg.s or not seg.type & 8 or seg.dpl > self._cpl():
            raise Fault(GP, error)
        if not seg.present:
            raise Fault(NP, error)
        return seg

    def _push(self, data: bytes, rsp: int, ss: Segment, width: int) -> int:
        mask = (1 << width) - 1
        new = (rsp - len(data)) & mask
        self.write(ss.base + new, data)
        return new

    # --- protected mode (SDM Vol. 3A 6.12) ----------------------------------------------
    def _protected_mode(self, event: Event) -> None:
        state = self.state
        gate_type, _, selector, offset, _ = self._gate(event, 8)
        cs = self._code_segment(selector, event)
        cpl = self._cpl()
        new_cpl = cpl if cs.type & 4 else cs.dpl  # conforming code keeps the CPL
        gate32 = gate_type in (14, 15)
        size = 4 if gate32 else 2
        fmt = "<I" if gate32 else "<H"
        ss, sp = state.ss, state.regs["rsp"]
        frame: list[int] = []
        if new_cpl < cpl:
            ss, sp = self._tss_stack(new_cpl, event)
            frame += [state.ss.selector, state.regs["rsp"] & 0xFFFF_FFFF]
        frame += [state.rflags & 0xFFFF_FFFF, state.cs.selector, state.rip & 0xFFFF_FFFF]
        if event.error_code is not None:
            frame.append(event.error_code)
        width = 32 if ss.db else 16
        data = b"".join(struct.pack(fmt, value & ((1 << (8 * size)) - 1)) for value in reversed(frame))
        sp = self._push(data, sp, ss, width)
        state.ss = ss
        state.regs["rsp"] = state.regs["rsp"] & ~((1 << width) - 1) | sp
        state.cs = replace(cs, selector=selector & ~3 | new_cpl)
        state.rip = offset if gate32 else offset & 0xFFFF
        self._clear_flags(gate_type)

    def _tss_stack(self, cpl: int, event: Event) -> tuple[Segment, int]:
        """The inner-level stack from a 32-bit or 16-bit TSS (SDM Vol. 3A 7.2.1, 7.6)."""
        state = self.state
        tr = state.tr
        ext = int(event.external)
        if tr.type in (9, 11):
            position, fmt, width = 4 + 8 * cpl, "<IH", 6
        else:
            position, fmt, width = 2 + 4 * cpl, "<HH", 4
        if position + width - 1 > tr.limit:
            raise Fault(TS, tr.selector & 0xFFFC | ext)
        sp, ss_selector = struct.unpack(fmt, self.read(tr.base + position, width))
        ss = self._descriptor(ss_selector, event.external) if ss_selector & 0xFFFC else None
        writable_data = ss is not None and ss.s and not ss.type & 8 and ss.type & 2
        if not writable_data or ss_selector & 3 != cpl or ss.dpl != cpl:
            raise Fault(TS, ss_selector & 0xFFFC | ext)
        if not ss.present:
            raise Fault(SS, ss_selector & 0xFFFC | ext)
        return ss, sp

    def _clear_flags(self, gate_type: int) -> None:
        state = self.state
        state.rflags &= ~(RFLAGS_TF | RFLAGS_VM | RFLAGS_RF | RFLAGS_NT)
        if gate_type in (6, 14):  # interrupt gates also clear IF (SDM Vol. 3A 6.12.1.3)
            state.rflags &= ~RFLAGS_IF

    # --- IA-32e mode (SDM Vol. 3A 6.14) -------------------------------------------------
    def _long_mode(self, event: Event) -> None:
        state = self.state
        gate_type, _, selector, offset, ist = self._gate(event, 16)
        cs = self._code_segment(selector, event)
        if not cs.l or cs.db:
            raise Fault(GP, selector & 0xFFFC | int(event.external))
        cpl = self._cpl()
        new_cpl = cpl if cs.type & 4 else cs.dpl
        rsp = state.regs["rsp"]
        if ist:
            rsp = self._tss64(36 + 8 * (ist - 1), event)
        elif new_cpl < cpl:
            rsp = self._tss64(4 + 8 * new_cpl, event)
        rsp &= ~0xF  # SDM 6.14.2: the stack is aligned to 16 bytes
        frame = [state.ss.selector, state.regs["rsp"], state.rflags, state.cs.selector, state.rip]
        if event.error_code is not None:
            frame.append(event.error_code)
        data = b"".join(struct.pack("<Q", value & (1 << 64) - 1) for value in reversed(frame))
        rsp = (rsp - len(data)) & (1 << 64) - 1
        self.write(rsp, data)
        if new_cpl < cpl:
            # SDM 6.14.4: a privilege change loads SS with a null selector whose RPL is the new CPL.
            state.ss = Segment(selector=new_cpl, base=0, limit=0, type=0, s=0, dpl=new_cpl,
                               present=0, unusable=1)
        state.regs["rsp"] = rsp
        state.cs = replace(cs, selector=selector & ~3 | new_cpl)
        state.rip = offset
        self._clear_flags(gate_type)

    def _tss64(self, position: int, event: Event) -> int:
        tr = self.state.tr
        if position + 7 > tr.limit:
            raise Fault(TS, tr.selector & 0xFFFC | int(event.external))
        return struct.unpack("<Q", self.read(tr.base + position, 8))[0]


_NAMES = {DE: "#DE", DB: "#DB", NMI: "NMI", BP: "#BP", OF: "#OF", BR: "#BR", UD: "#UD", NM: "#NM",
          DF: "#DF", TS: "#TS", NP: "#NP", SS: "#SS", GP: "#GP", PF: "#PF", MF: "#MF", AC: "#AC", MC: "#MC"}


def describe(event: Event) -> str:
    """'#GP(0x10)', '#UD', 'vector 32'."""
    name = _NAMES.get(event.vector, f"vector {event.vector}")
    return f"{name}({event.error_code:#x})" if event.error_code is not None else name
