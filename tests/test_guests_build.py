"""The guest build step (hvm.guests) and the images it produces.

The QEMU tests boot the images under TCG (the reference emulator; fast and
independent of the host's KVM) and are skipped when qemu-system-x86_64 is not
installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

import hvm.guests as guests
from hvm.guests import GUEST_FORMAT, GUESTS, GuestBuildError, build_all, image_path

MULTIBOOT_GUESTS = [name for name, fmt in GUEST_FORMAT.items() if fmt == "multiboot"]
MULTIBOOT_SEARCH_BYTES = 8192  # multiboot v1, section 3.1: header within the first 8 KiB

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    return build_all()


@pytest.fixture
def private_tree(tmp_path, monkeypatch) -> Path:
    """A copy of the guest sources and an empty build dir, so tests can touch,
    break and rebuild without disturbing the shared tree."""
    src = tmp_path / "src"
    shutil.copytree(guests.SRC_DIR, src)
    monkeypatch.setattr(guests, "SRC_DIR", src)
    monkeypatch.setenv("HVM_GUESTS_BUILD_DIR", str(tmp_path / "build"))
    return src


def find_multiboot_header(data: bytes) -> int:
    for off in range(0, min(len(data), MULTIBOOT_SEARCH_BYTES) - 11, 4):
        if struct.unpack_from("<I", data, off)[0] == 0x1BADB002:
            return off
    raise AssertionError("no multiboot header magic in the first 8 KiB at 4-byte alignment")


# ------------------------------------------------------------------ the API


def test_every_guest_is_described_and_built(images):
    assert set(GUESTS) == set(GUEST_FORMAT) == set(images)
    assert set(GUESTS) >= {"hello", "outloop", "spin", "triple", "forever", "realmode", "longmode"}
    for name, path in images.items():
        assert path == image_path(name)
        assert path.parent == guests.build_dir()
        assert path.is_file() and path.stat().st_size > 0, name


def test_unknown_guest():
    with pytest.raises(ValueError, match="unknown guest"):
        image_path("no-such-guest")


def test_qemu_exit_status():
    assert guests.qemu_exit_status(0) == 1
    assert guests.qemu_exit_status(3) == 7


# --------------------------------------------------------------- the images


@pytest.mark.parametrize("name", MULTIBOOT_GUESTS)
def test_multiboot_header(images, name):
    data = images[name].read_bytes()
    off = find_multiboot_header(data)
    magic, flags, checksum = struct.unpack_from("<III", data, off)
    assert magic == guests.MULTIBOOT_HEADER_MAGIC == 0x1BADB002
    assert flags == guests.MULTIBOOT_HEADER_FLAGS
    assert flags & (1 << 1), "requests memory information"
    assert not flags & (1 << 16), "ELF image: no address fields"
    assert (magic + flags + checksum) % 2**32 == 0


@pytest.mark.parametrize("name", MULTIBOOT_GUESTS)
def test_multiboot_elf(images, name):
    with images[name].open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 32
        assert elf.little_endian
        assert elf["e_machine"] == "EM_386"
        assert elf["e_type"] == "ET_EXEC"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads
        assert min(s["p_paddr"] for s in loads) == guests.MULTIBOOT_LOAD_ADDRESS
        entry = elf["e_entry"]
        text = [s for s in loads if s["p_flags"] & P_FLAGS.PF_X]
        assert any(s["p_vaddr"] <= entry < s["p_vaddr"] + s["p_filesz"] for s in text)
        for s in loads:
            assert s["p_vaddr"] == s["p_paddr"]
            assert s["p_filesz"] <= s["p_memsz"]


@pytest.mark.parametrize("name", MULTIBOOT_GUESTS)
def test_constants_match_the_assembly(images, name):
    with images[name].open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        symbols = {sym.name: sym["st_value"] for sym in symtab.iter_symbols()}
    assert symbols["COM1_PORT"] == guests.COM1_PORT == 0x3F8
    assert symbols["EXIT_PORT"] == guests.EXIT_PORT == 0xF4
    assert symbols["POST_PORT"] == guests.POST_PORT == 0x80
    assert symbols["OUTLOOP_PORT"] == guests.OUTLOOP_PORT == 0x500
    assert symbols["MB_HEADER_MAGIC"] == guests.MULTIBOOT_HEADER_MAGIC
    assert symbols["MB_HEADER_FLAGS"] == guests.MULTIBOOT_HEADER_FLAGS
    assert symbols["MB_BOOTLOADER_MAGIC"] == guests.MULTIBOOT_BOOTLOADER_MAGIC
    if name in guests.DEFAULT_N:
        assert symbols["DEFAULT_N"] == guests.DEFAULT_N[name]


def test_realmode_boot_sector(images):
    data = images["realmode"].read_bytes()
    assert len(data) == 512
    assert data[510:] == b"\x55\xaa"
    assert b"real mode ok\n" in data


def test_longmode_flat_binary(images):
    data = images["longmode"].read_bytes()
    assert not data.startswith(b"\x7fELF")
    assert 0 < len(data) < 64 * 1024
    assert data[0] == 0xFA  # cli: the entry point is the first byte
    assert b"long mode ok\n" in data


# ---------------------------------------------------------------- the build


def test_fresh_image_is_not_rebuilt(private_tree):
    image = image_path("spin")
    before = image.stat()
    assert image_path("spin") == image
    after = image.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("source", ["spin.s", "lib.inc", "multiboot.ld"])
def test_stale_image_is_rebuilt_when_a_source_is_touched(private_tree, source):
    image = image_path("spin")
    old = image.stat().st_mtime - 3600
    os.utime(image, (old, old))  # the image was built an hour ago...
    os.utime(private_tree / source)  # ...and the source was edited just now
    assert image_path("spin") == image
    assert image.stat().st_mtime_ns >= (private_tree / source).stat().st_mtime_ns
    assert find_multiboot_header(image.read_bytes()) >= 0


@pytest.mark.parametrize(
    ("name", "shared"),
    [
        ("trapkern", "lib/mb64.inc"),
        ("apictick", "lib/mb64.inc"),
        ("uartirq", "lib/mb64.inc"),
        ("apictick", "lib/has_word.inc"),
        ("uartirq", "lib/has_word.inc"),
    ],
)
def test_guest_is_rebuilt_when_a_shared_include_is_touched(private_tree, name, shared):
    # The long-mode guests' set-up lives in lib/ include files; an edit there must reach them.
    assert private_tree / shared in guests.guest_sources(name)
    image = image_path(name)
    old = image.stat().st_mtime - 3600
    os.utime(image, (old, old))  # built an hour ago...
    os.utime(private_tree / shared)  # ...and the shared file edited just now
    assert image_path(name) == image
    assert image.stat().st_mtime_ns >= (private_tree / shared).stat().st_mtime_ns


def test_flat_image_depends_only_on_its_own_sources(private_tree):
    assert guests.guest_sources("realmode") == [private_tree / "realmode.s", private_tree / "lib/flat.inc"]
    image = image_path("realmode")
    built = image.stat().st_mtime_ns
    later = image.stat().st_mtime + 100
    os.utime(private_tree / "lib.inc", (later, later))  # not a source of realmode
    image_path("realmode")
    assert image.stat().st_mtime_ns == built
    os.utime(private_tree / "realmode.s", (later, later))
    image_path("realmode")
    assert image.stat().st_mtime_ns != built


def test_missing_binutils(private_tree, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(GuestBuildError, match="install binutils") as info:
        image_path("hello")
    message = str(info.value)
    assert "'as'" in message and "'ld'" in message
    assert "\n" not in message


def test_build_failure_is_one_line_and_leaves_no_image(private_tree):
    broken = private_tree / "spin.s"
    broken.write_text(broken.read_text() + "\n        this_is_not_an_instruction eax\n")
    with pytest.raises(GuestBuildError, match=r"assembling spin\.s failed: .*Error") as info:
        image_path("spin")
    assert "\n" not in str(info.value)
    build = guests.build_dir()
    assert not (build / "spin.elf").exists()
    assert [p.name for p in build.iterdir()] == []  # temp files cleaned up


def test_concurrent_builds_produce_a_valid_image(private_tree):
    # Several processes race to build the same images into the same directory.
    code = textwrap.dedent(
        f"""
        import hvm.guests as g, pathlib
        g.SRC_DIR = pathlib.Path({str(private_tree)!r})
        g.build_all()
        """
    )
    env = dict(os.environ)
    root = str(Path(guests.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    build = guests.build_dir()
    assert sorted(p.name for p in build.iterdir()) == sorted(image_path(name).name for name in GUESTS)
    for name in MULTIBOOT_GUESTS:
        find_multiboot_header(image_path(name).read_bytes())
    assert len(image_path("realmode").read_bytes()) == 512


def test_command_line_entry_point(private_tree):
    out = subprocess.run(
        [sys.executable, "-m", "hvm.guests"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(guests.__file__).resolve().parents[2],
    )
    # The child does not see the monkeypatched SRC_DIR, only the build dir.
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(GUESTS)
    for line in lines:
        assert Path(line.split(maxsplit=1)[1]).is_file()


# --------------------------------------------------------- QEMU, the reference

QEMU_ARGS = [
    "-accel", "tcg",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    "-serial", "stdio",
    "-display", "none",
    "-nodefaults",
    "-no-reboot",
]  # fmt: skip


def run_qemu(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QEMU, *QEMU_ARGS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@needs_qemu
def test_qemu_hello(images):
    proc = run_qemu("-kernel", str(images["hello"]), "-append", "n=5")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[0] == "Hello from hvm guest!"
    assert lines[1].startswith("cpu vendor: ") and len(lines[1]) == len("cpu vendor: ") + 12
    assert lines[2].startswith("cpu signature: 0x")
    assert "scratch ok" in lines
    assert any(line.startswith("mem_upper: ") and line.endswith(" KiB") for line in lines)
    assert any(line.startswith("cmdline: ") and line.endswith(" n=5") for line in lines)
    assert lines[-1] == "bye"


@needs_qemu
@pytest.mark.parametrize(
    ("name", "append", "expected"),
    [
        ("outloop", "n=5", "outloop done 5\n"),
        ("outloop", "", "outloop done 1000\n"),
        ("outloop", "x n=abc n=12 n=13", "outloop done 12\n"),
        ("spin", "n=5", "spin done\n"),
    ],
)
def test_qemu_counted_guests(images, name, append, expected):
    proc = run_qemu("-kernel", str(images[name]), "-append", append)
    assert (proc.stdout, proc.returncode) == (expected, 1), proc.stderr


@needs_qemu
def test_qemu_triple_fault(images):
    proc = run_qemu("-kernel", str(images["triple"]))
    # -no-reboot turns the triple fault's reset into a clean QEMU exit.
    assert (proc.stdout, proc.returncode) == ("triple fault next\n", 0), proc.stderr


@needs_qemu
def test_qemu_forever(images):
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_qemu("-kernel", str(images["forever"]), timeout=2)
    output = info.value.stdout or b""
    assert (output.decode() if isinstance(output, bytes) else output) == "looping\n"


@needs_qemu
def test_qemu_realmode(images):
    # snapshot=on: QEMU opens the image read-only and writes to a temporary overlay.
    proc = run_qemu("-drive", f"file={images['realmode']},format=raw,snapshot=on")
    assert (proc.stdout, proc.returncode) == ("real mode ok\n", 1), proc.stderr


# QEMU cannot enter a flat 64-bit image directly, so boot a small multiboot
# trampoline that copies it to 0x100000, identity-maps 4 GiB with 2 MiB pages
# and jumps to it in long mode, as the hvm VMM does.
LONGMODE_TRAMPOLINE = """\
        .intel_syntax noprefix
        .section .multiboot, "a"
        .balign 4
        .long 0x1BADB002, 0, -0x1BADB002
        .text
        .globl _start
_start:
        cli
        cld
        mov     esp, OFFSET stack_top
        mov     esi, OFFSET payload             # copy the image to 1 MiB
        mov     edi, 0x100000
        mov     ecx, OFFSET payload_end
        sub     ecx, esi
        rep movsb
        mov     eax, OFFSET pdpt + 3            # PML4[0] -> PDPT
        mov     [pml4], eax
        mov     edi, OFFSET pdpt                # PDPT[0..3] -> 4 page directories
        mov     eax, OFFSET pds + 3
        mov     ecx, 4
1:      mov     [edi], eax
        add     eax, 4096
        add     edi, 8
        loop    1b
        mov     edi, OFFSET pds                 # 2048 x 2 MiB pages = 4 GiB
        mov     eax, 0x83                       # present, writable, 2 MiB
        xor     edx, edx
        mov     ecx, 2048
2:      mov     [edi], eax
        mov     [edi + 4], edx
        add     eax, 0x200000
        adc     edx, 0
        add     edi, 8
        loop    2b
        mov     eax, cr4
        or      eax, 1 << 5                     # PAE
        mov     cr4, eax
        mov     eax, OFFSET pml4
        mov     cr3, eax
        mov     ecx, 0xC0000080                 # EFER.LME
        rdmsr
        or      eax, 1 << 8
        wrmsr
        lgdt    [gdt_descriptor]
        mov     eax, cr0
        or      eax, 0x80000001                 # PG | PE
        mov     cr0, eax
        jmp     0x08:0x100000
        .data
        .balign 8
gdt:    .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF
gdt_descriptor:
        .word 23
        .long gdt
payload:
        .incbin "PAYLOAD"
payload_end:
        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4 * 4096
        .skip 4096
stack_top:
        .section .note.GNU-stack, "", @progbits
"""


@needs_qemu
def test_qemu_longmode(images, tmp_path):
    src = tmp_path / "trampoline.s"
    src.write_text(LONGMODE_TRAMPOLINE.replace("PAYLOAD", str(images["longmode"])))
    script = tmp_path / "trampoline.ld"
    script.write_text((guests.SRC_DIR / "multiboot.ld").read_text().replace("0x100000", "0x400000"))
    obj, elf = tmp_path / "trampoline.o", tmp_path / "trampoline.elf"
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-n", "-z", "noexecstack", "-T", str(script), "-o", str(elf), str(obj)],
        check=True,
    )
    proc = run_qemu("-kernel", str(elf))
    assert (proc.stdout, proc.returncode) == ("long mode ok\n", 1), proc.stderr
