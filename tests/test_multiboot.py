"""The multiboot v1 loader against the Multiboot Specification 0.6.96 (sections cited)."""

from __future__ import annotations

import struct

import pytest

from hvm.boot import ImageFormat, load, multiboot
from hvm.cpu import CR0_PE, CR0_PG, RFLAGS_IF
from hvm.errors import ImageError
from hvm.vmm.memory import GuestMemory

MIB = 1 << 20


def aout_image(load_addr: int = 0x100000, entry_off: int = 0x40, bss: int = 0x100, flags: int = 0) -> bytes:
    """An a.out-kludge image (spec 3.1.3): header at file offset 0 = load_addr."""
    hflags = (1 << 16) | flags
    header = struct.pack(
        "<8I",
        0x1BADB002,
        hflags,
        (-(0x1BADB002 + hflags)) & 0xFFFFFFFF,
        load_addr,  # header_addr
        load_addr,  # load_addr
        0,  # load_end_addr: whole file
        load_addr + 0x80 + bss,  # bss_end_addr
        load_addr + entry_off,  # entry_addr
    )
    return header + b"\x90" * (0x80 - len(header))


@pytest.fixture
def mem():
    m = GuestMemory(64 * MIB)
    yield m
    m.close()


def test_header_search_needs_magic_and_checksum() -> None:
    # 3.1.1/3.1.2: magic + flags + checksum must be 0 mod 2^32
    good = struct.pack("<III", 0x1BADB002, 3, (-(0x1BADB002 + 3)) & 0xFFFFFFFF)
    assert multiboot.find_header(b"\0" * 8 + good + b"\0" * 16).offset == 8
    bad = struct.pack("<III", 0x1BADB002, 3, 0)
    assert multiboot.find_header(bad + b"\0" * 16) is None
    # not 4-byte aligned: not a header
    assert multiboot.find_header(b"\0\0" + good + b"\0" * 16) is None
    # beyond the first 8192 bytes: not searched
    assert multiboot.find_header(b"\0" * 8192 + good + b"\0" * 16) is None


def test_entry_state_per_spec_3_2(mem: GuestMemory) -> None:
    fmt, st = load(mem, aout_image(), ImageFormat.AUTO, b"kernel n=5")
    assert fmt is ImageFormat.MULTIBOOT
    assert st.regs["rax"] == 0x2BADB002  # 3.2: EAX magic
    assert st.rip == 0x100040
    assert st.cr0 & CR0_PE and not st.cr0 & CR0_PG  # PE set, PG clear
    assert not st.rflags & RFLAGS_IF  # IF clear
    for seg in (st.cs, st.ds, st.es, st.fs, st.gs, st.ss):  # flat 4 GiB, 32-bit
        assert seg.base == 0 and seg.limit == 0xFFFFFFFF and seg.db == 1
    assert st.cs.type & 0x8  # code segment: execute/read
    # the image is at load_addr and the bss (3.1.3: bss_end_addr) is zeroed
    assert mem.read(0x100000, 4) == struct.pack("<I", 0x1BADB002)
    assert mem.read(0x100080, 0x100) == bytes(0x100)


def test_boot_information_layout_3_3(mem: GuestMemory) -> None:
    _, st = load(mem, aout_image(), ImageFormat.AUTO, b"/img n=42")
    mbi = st.regs["rbx"]
    flags, mem_lower, mem_upper = struct.unpack("<III", mem.read(mbi, 12))
    # flags bit 0 (mem_*), bit 2 (cmdline), bit 6 (mmap_*), bit 9 (boot_loader_name)
    for bit in (0, 2, 6, 9):
        assert flags & (1 << bit)
    assert mem_lower <= 640  # 3.3: "maximum possible value for lower memory is 640 kilobytes"
    assert mem_upper == (64 * MIB - MIB) // 1024  # KiB starting at 1 MiB
    cmdline = struct.unpack("<I", mem.read(mbi + 16, 4))[0]
    assert mem.read_cstring(cmdline) == b"/img n=42"
    mmap_length, mmap_addr = struct.unpack("<II", mem.read(mbi + 44, 8))
    entries = []
    off = 0
    while off < mmap_length:
        size = struct.unpack("<I", mem.read(mmap_addr + off, 4))[0]
        base, length, typ = struct.unpack("<QQI", mem.read(mmap_addr + off + 4, 20))
        entries.append((base, length, typ))
        off += size + 4  # 3.3: "size" does not count itself
    available = [(b, n) for b, n, t in entries if t == 1]
    assert (0x100000, 64 * MIB - 0x100000) in available
    assert sum(n for b, n in available if b < 0x100000) == mem_lower * 1024
    name = struct.unpack("<I", mem.read(mbi + 64, 4))[0]
    assert mem.read_cstring(name) == b"hvm"


def test_unsupported_required_flag_is_refused(mem: GuestMemory) -> None:
    # 3.1.2: bits 0-15 the loader does not understand -> must not load the image
    with pytest.raises(ImageError, match="unsupported"):
        load(mem, aout_image(flags=1 << 5), ImageFormat.AUTO, b"")


def test_image_larger_than_memory_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(ImageError, match="does not fit"):
        load(mem, aout_image(load_addr=63 * MIB, bss=4 * MIB), ImageFormat.AUTO, b"")


def test_no_header_gives_a_clear_error(mem: GuestMemory) -> None:
    with pytest.raises(ImageError, match="--format real"):
        load(mem, b"\x90" * 100, ImageFormat.AUTO, b"")


def test_malformed_elf_is_an_image_error(mem: GuestMemory) -> None:
    good = struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    with pytest.raises(ImageError):
        load(mem, b"\x7fELF" + b"\x01" * 12 + good, ImageFormat.AUTO, b"")
