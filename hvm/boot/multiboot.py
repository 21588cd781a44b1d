"""Multiboot v1 loader (the Multiboot Specification 0.6.96), compatible with QEMU's ``-kernel``.

It only writes guest memory and returns the entry CPU state (spec 3.2): EAX holds
the magic 0x2BADB002, EBX the physical address of the multiboot information
structure, CS/DS/ES/FS/GS/SS are flat 32-bit segments, CR0.PE=1, CR0.PG=0, IF=0.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hvm.boot import layout as L
from hvm.boot.gdt import GDT_LIMIT, write_gdt
from hvm.cpu import CR0_ET, CR0_PE, CpuState, DescriptorTable, flat_segment
from hvm.errors import ImageError
from hvm.vmm.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002  # spec 3.1.2
BOOTLOADER_MAGIC = 0x2BADB002  # spec 3.2, in EAX at entry
SEARCH_LIMIT = 8192  # the header lies within the first 8192 bytes, 32-bit aligned (3.1.1)

# Header flags (3.1.2)
HF_PAGE_ALIGN = 1 << 0
HF_MEMORY_INFO = 1 << 1
HF_VIDEO_MODE = 1 << 2
HF_AOUT_KLUDGE = 1 << 16
HF_SUPPORTED_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# Information-structure flags (3.3)
MBI_MEMORY = 1 << 0
MBI_BOOT_DEVICE = 1 << 1
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

MMAP_AVAILABLE = 1  # memory-map entry types (3.3)
MMAP_RESERVED = 2

LOADER_NAME = b"hvm"
BOOT_DEVICE_NONE = 0xFFFFFFFF  # no BIOS boot drive


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(image: bytes) -> MultibootHeader | None:
    """The multiboot header (3.1.1): magic, flags and checksum summing to 0 mod 2^32."""
    for off in range(0, min(len(image), SEARCH_LIMIT) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & HF_AOUT_KLUDGE:
                if off + 32 > len(image):
                    raise ImageError("multiboot header is cut short (a.out kludge fields missing)")
                fields = struct.unpack_from("<5I", image, off + 12)
                return MultibootHeader(off, flags, *fields)
            return MultibootHeader(off, flags)
    return None


def _load_aout_kludge(mem: GuestMemory, image: bytes, hdr: MultibootHeader) -> int:
    # 3.1.3: file offset of load_addr is header offset - (header_addr - load_addr)
    if hdr.load_addr > hdr.header_addr:
        raise ImageError("multiboot header: load_addr lies above header_addr")
    start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    end = len(image) if hdr.load_end_addr == 0 else start + hdr.load_end_addr - hdr.load_addr
    if start < 0 or end > len(image) or end < start:
        raise ImageError("multiboot header: load range lies outside the image file")
    _place(mem, hdr.load_addr, image[start:end])
    if hdr.bss_end_addr:
        bss_start = hdr.load_addr + (end - start)
        if hdr.bss_end_addr > bss_start:
            _place(mem, bss_start, bytes(hdr.bss_end_addr - bss_start))
    return hdr.entry_addr


def _load_elf(mem: GuestMemory, image: bytes) -> int:
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf.elfclass != 32 or elf["e_machine"] != "EM_386":
            raise ImageError("multiboot ELF image must be ELF32 for i386 (no a.out kludge given)")
        loaded = False
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            data = seg.data()
            if len(data) != seg["p_filesz"] or seg["p_filesz"] > seg["p_memsz"]:
                raise ImageError("ELF segment is cut short or larger than its memory size")
            # Segments go to their physical addresses, as QEMU's multiboot loader does.
            _place(mem, seg["p_paddr"], data + bytes(seg["p_memsz"] - seg["p_filesz"]))
            loaded = True
        if not loaded:
            raise ImageError("ELF image has no loadable segment")
        return elf["e_entry"]
    except ELFError as exc:
        raise ImageError(f"malformed ELF image: {exc}") from None
    except (struct.error, ValueError) as exc:
        raise ImageError(f"malformed ELF image: {exc}") from None


def _place(mem: GuestMemory, gpa: int, data: bytes) -> None:
    if gpa < L.BOOT_DATA_END and gpa + len(data) > L.GDT_ADDR:
        raise ImageError(f"image segment at {gpa:#x} overlaps the VMM's boot data below {L.BOOT_DATA_END:#x}")
    if gpa + len(data) > mem.size:
        raise ImageError(
            f"image segment {gpa:#x}+{len(data):#x} does not fit in {mem.size >> 20} MiB of guest memory"
        )
    mem.write(gpa, data)


def memory_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(base, length, type) entries: the PC layout QEMU's firmware reports."""
    return [
        (0, L.LOW_MEM_END, MMAP_AVAILABLE),
        (L.LOW_MEM_END, L.EBDA_END - L.LOW_MEM_END, MMAP_RESERVED),
        (L.BIOS_ROM, L.HIGH_MEM_START - L.BIOS_ROM, MMAP_RESERVED),
        (L.HIGH_MEM_START, mem_size - L.HIGH_MEM_START, MMAP_AVAILABLE),
    ]


def write_boot_info(mem: GuestMemory, cmdline: bytes) -> int:
    """Write the multiboot information structure (3.3); returns its address (for EBX)."""
    if len(cmdline) + 1 > L.CMDLINE_MAX:
        raise ImageError(f"command line longer than {L.CMDLINE_MAX - 1} bytes")
    entries = memory_map(mem.size)
    # Each entry: size (of the rest, 20), base_addr, length, type.
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, typ) for base, length, typ in entries)
    mem.write(L.MMAP_ADDR, mmap)
    mem.write(L.LOADER_NAME_ADDR, LOADER_NAME + b"\0")
    mem.write(L.CMDLINE_ADDR, cmdline + b"\0")
    flags = MBI_MEMORY | MBI_BOOT_DEVICE | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    mem_lower = L.LOW_MEM_END // 1024  # KiB from 0 (3.3: at most 640)
    mem_upper = (mem.size - L.HIGH_MEM_START) // 1024  # KiB from 1 MiB to the first hole
    mbi = bytearray(116)
    struct.pack_into("<IIII", mbi, 0, flags, mem_lower, mem_upper, BOOT_DEVICE_NONE)
    struct.pack_into("<III", mbi, 16, L.CMDLINE_ADDR, 0, 0)  # cmdline, mods_count, mods_addr
    struct.pack_into("<II", mbi, 44, len(mmap), L.MMAP_ADDR)
    struct.pack_into("<I", mbi, 64, L.LOADER_NAME_ADDR)
    mem.write(L.MBI_ADDR, bytes(mbi))
    return L.MBI_ADDR


def load(mem: GuestMemory, image: bytes, cmdline: bytes) -> CpuState:
    hdr = find_header(image)
    if hdr is None:
        raise ImageError("no multiboot header in the first 8 KiB")
    unsupported = hdr.flags & 0xFFFF & ~HF_SUPPORTED_REQUIRED
    if unsupported:
        # 3.1.2: a loader that does not understand a required bit (0-15) must refuse the image
        raise ImageError(f"multiboot header requires unsupported features (flags {unsupported:#x})")
    if hdr.flags & HF_AOUT_KLUDGE:
        entry = _load_aout_kludge(mem, image, hdr)
    else:
        entry = _load_elf(mem, image)
    if not 0 <= entry < mem.size:
        raise ImageError(f"entry point {entry:#x} lies outside guest memory")
    write_gdt(mem)
    mbi = write_boot_info(mem, cmdline)
    state = CpuState()
    state.regs["rax"] = BOOTLOADER_MAGIC
    state.regs["rbx"] = mbi
    state.rip = entry
    state.cs = flat_segment(L.SEL_CODE32, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, flat_segment(L.SEL_DATA, code=False))
    state.gdt = DescriptorTable(L.GDT_ADDR, GDT_LIMIT)
    state.idt = DescriptorTable(0, 0)
    state.cr0 = CR0_PE | CR0_ET
    return state
