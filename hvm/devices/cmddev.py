"""The I/O lab's command device: one command set, four ways for the guest to reach it.

A command is a 16-byte descriptor in guest RAM (little-endian u32s)::

    seq        0, 1, 2, ... in the order the guest sends them
    buf_gpa    guest-physical address of the data
    len        bytes of data
    result_gpa where the device writes the CRC-32 of the data (zlib's CRC-32)

The device does the work (a CRC-32 over guest memory, written back to the guest)
and counts completions; a guest reads that count as STATUS. Front-ends:

- ``pio``:  STATUS = 32-bit IN from port 0x520, DOORBELL = 32-bit OUT of the descriptor's address to 0x524
- ``mmio``: the same two registers at guest-physical 0xD000_0000 / 0xD000_0004, every access exits
- ``coalesced``: the same MMIO registers, with DOORBELL in a KVM coalesced-MMIO zone (writes do not exit)
- ``dirty``: the chapter's design: two pages of ordinary guest memory at 0xD010_0000 — page 0 holds
  STATUS (+0, written by the device) and PRODUCER (+4, written by the guest), page 1 a ring of 256
  descriptor slots; the VMM harvests dirty pages every poll interval and processes what was published.

Guest addresses are bounds-checked through GuestMemory: a bad descriptor is counted, never a crash.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from hvm.vmm.memory import GuestMemory, GuestMemoryError

PIO_BASE = 0x520
MMIO_BASE = 0xD000_0000
REG_STATUS = 0x0
REG_DOORBELL = 0x4
REG_SPAN = 8
DIRTY_GPA = 0xD010_0000
DIRTY_PAGES = 2
RING_GPA = DIRTY_GPA + 0x1000
RING_SLOTS = 256
DESC = struct.Struct("<IIII")  # seq, buf_gpa, len, result_gpa
MAX_LEN = 1 << 20  # a command's data is at most 1 MiB

DESIGNS = ("pio", "mmio", "coalesced", "dirty")


@dataclass
class CommandStats:
    completed: int = 0
    out_of_order: int = 0  # seq differed from the next expected one
    bad_descriptors: int = 0  # addresses outside guest memory or an oversized length
    harvests: int = 0  # dirty-page harvests that found the page written
    empty_harvests: int = 0
    doorbells: int = 0  # DOORBELL writes (pio/mmio/coalesced)
    status_reads: int = 0
    seqs: list[int] = field(default_factory=list)  # processed sequence numbers, in order


class CommandDevice:
    """Registers for the pio/mmio/coalesced front-ends; ``harvest()`` for the dirty-page one."""

    name = "cmddev"

    def __init__(self, memory: GuestMemory, record_seqs: bool = False) -> None:
        self.memory = memory
        self.stats = CommandStats()
        self.record_seqs = record_seqs
        self.consumed = 0  # dirty ring: commands taken from the ring so far

    # --- the work ------------------------------------------------------------------------
    def execute(self, desc: bytes) -> None:
        seq, buf, length, result = DESC.unpack(desc)
        stats = self.stats
        if seq != stats.completed:
            stats.out_of_order += 1
        try:
            if length > MAX_LEN:
                raise GuestMemoryError("length")
            crc = zlib.crc32(self.memory.read(buf, length))
            self.memory.write_u32(result, crc)
        except GuestMemoryError:
            stats.bad_descriptors += 1
        stats.completed += 1
        if self.record_seqs:
            stats.seqs.append(seq)

    # --- register front-end (pio, mmio, coalesced) ----------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == REG_STATUS and size == 4:
            self.stats.status_reads += 1
            return self.stats.completed & 0xFFFF_FFFF
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == REG_DOORBELL and size == 4:
            self.stats.doorbells += 1
            try:
                desc = self.memory.read(value, DESC.size)
            except GuestMemoryError:
                self.stats.bad_descriptors += 1
                self.stats.completed += 1
                return
            self.execute(desc)

    # --- dirty-page front-end ----------------------------------------------------------------
    def harvest(self, dirty_pages: list[int]) -> int:
        """Process what the guest published since the last harvest; returns the number of commands.

        Reads PRODUCER once and takes the slots up to it; a write racing this harvest lands in a
        page that the harvest just re-armed, so the next harvest sees it (nothing is lost).
        """
        if not dirty_pages:
            self.stats.empty_harvests += 1
            return 0
        self.stats.harvests += 1
        producer = self.memory.read_u32(DIRTY_GPA + 4)
        pending = (producer - self.consumed) & 0xFFFF_FFFF
        if pending > RING_SLOTS:  # the guest broke the protocol; take what a ring can hold
            self.stats.bad_descriptors += 1
            pending = RING_SLOTS
        ring = self.memory.read(RING_GPA, RING_SLOTS * DESC.size)
        for _ in range(pending):
            slot = self.consumed % RING_SLOTS
            self.execute(ring[slot * DESC.size : (slot + 1) * DESC.size])
            self.consumed += 1
        self.memory.write_u32(DIRTY_GPA, self.stats.completed & 0xFFFF_FFFF)
        return pending
