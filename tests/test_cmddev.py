"""The I/O lab's command device, driven directly through guest memory (no engine)."""

from __future__ import annotations

import struct
import zlib

import pytest

from hvm.devices.cmddev import DESC, DIRTY_GPA, DIRTY_PAGES, RING_GPA, RING_SLOTS, CommandDevice
from hvm.vmm.memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory(8 << 20)
    m.add_region(DIRTY_GPA, DIRTY_PAGES * 4096)
    yield m
    m.close()


def pattern(k: int) -> bytes:
    return bytes((k * 7 + i) & 0xFF for i in range(64))


def put_command(mem: GuestMemory, k: int, desc_gpa: int) -> None:
    buf, result = 0x10000 + (k % 256) * 64, 0x20000 + 4 * k
    mem.write(buf, pattern(k))
    mem.write(desc_gpa, DESC.pack(k, buf, 64, result))


def test_doorbell_computes_zlib_crc32_into_guest_memory(mem: GuestMemory) -> None:
    dev = CommandDevice(mem, record_seqs=True)
    for k in range(5):
        put_command(mem, k, 0x30000)
        dev.write(4, 4, 0x30000)
        assert dev.read(0, 4) == k + 1  # STATUS counts completions
    for k in range(5):
        assert mem.read_u32(0x20000 + 4 * k) == zlib.crc32(pattern(k))
    assert dev.stats.seqs == [0, 1, 2, 3, 4] and dev.stats.out_of_order == 0


def test_bad_guest_addresses_are_counted_not_fatal(mem: GuestMemory) -> None:
    dev = CommandDevice(mem)
    dev.write(4, 4, 0xFFFF_FFF0)  # descriptor outside guest memory
    mem.write(0x30000, DESC.pack(1, 0x7FFF_0000, 64, 0x20000))  # buffer outside guest memory
    dev.write(4, 4, 0x30000)
    assert dev.stats.bad_descriptors == 2
    assert dev.read(0, 4) == 2
    assert dev.read(8, 4) == 0xFFFF_FFFF  # no register there


def publish(mem: GuestMemory, k: int) -> None:
    slot = RING_GPA + (k % RING_SLOTS) * DESC.size
    buf, result = 0x10000 + (k % 256) * 64, 0x20000 + 4 * k
    mem.write(buf, pattern(k))
    mem.write(slot, DESC.pack(k, buf, 64, result))
    mem.write_u32(DIRTY_GPA + 4, k + 1)  # PRODUCER


def test_harvest_takes_every_published_command_once_in_order(mem: GuestMemory) -> None:
    dev = CommandDevice(mem, record_seqs=True)
    sent = 0
    for burst in (1, 3, 0, 256, 17, 255):  # several commands per interval, a full ring, none
        for _ in range(burst):
            publish(mem, sent)
            sent += 1
        dev.harvest([0, 1] if burst else [])
        assert mem.read_u32(DIRTY_GPA) == sent  # STATUS written back to the guest page
    assert dev.stats.seqs == list(range(sent))
    assert dev.stats.empty_harvests == 1
    assert all(mem.read_u32(0x20000 + 4 * k) == zlib.crc32(pattern(k)) for k in range(sent))


def test_a_slot_written_before_producer_waits_for_the_next_harvest(mem: GuestMemory) -> None:
    dev = CommandDevice(mem, record_seqs=True)
    publish(mem, 0)
    # the guest filled slot 1 but was interrupted before it wrote PRODUCER = 2
    mem.write(RING_GPA + DESC.size, DESC.pack(1, 0x10000, 64, 0x20004))
    dev.harvest([1])
    assert dev.stats.seqs == [0]
    mem.write_u32(DIRTY_GPA + 4, 2)
    dev.harvest([0])
    assert dev.stats.seqs == [0, 1]


def test_producer_running_more_than_a_ring_ahead_is_a_protocol_error(mem: GuestMemory) -> None:
    dev = CommandDevice(mem)
    mem.write_u32(DIRTY_GPA + 4, RING_SLOTS + 10)
    assert dev.harvest([0]) == RING_SLOTS
    assert dev.stats.bad_descriptors >= 1
    assert struct.unpack("<I", mem.read(DIRTY_GPA, 4))[0] == RING_SLOTS
