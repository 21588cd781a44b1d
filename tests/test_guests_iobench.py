"""The I/O experiment's guest, ``iobench`` (hvm/guests/src/iobench.{s,c,ld}).

No VMM device is needed here: the image is checked statically, and under QEMU
(TCG, skipped without qemu-system-x86_64) the guest runs against what QEMU has
at the device's addresses (nothing: all-ones port reads, zero MMIO reads), its
in-guest ``loopback`` device (compared with a Python model of the same
algorithm), and its ``selftest`` CRC mode (compared with zlib.crc32).

The guest boots through multiboot in 32-bit mode and runs 64-bit code in long
mode; it enters ring 3 with SYSEXIT (what KVM's emulator can execute), which
AMD CPUs (QEMU's default qemu64 model) reject in long mode with #UD, so the
guest then uses IRETQ: both paths are run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import hvm.guests as guests
from hvm.guests import GUEST_FORMAT, GUESTS, GuestBuildError, image_path

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")

# The protocol, as the guest implements it (and hvm/devices/cmddev.py serves it).
LAYOUT = {
    "PIO_STATUS_PORT": 0x520,
    "PIO_DOORBELL_PORT": 0x524,
    "MMIO_STATUS_GPA": 0xD000_0000,
    "MMIO_DOORBELL_GPA": 0xD000_0004,
    "DIRTY_GPA": 0xD010_0000,
    "DIRTY_RING_GPA": 0xD010_1000,
    "RESULTS_GPA": 0x0100_0000,
    "LATENCY_GPA": 0x0180_0000,
    "SLOTS": 256,
    "CMD_LEN": 64,
    "MAX_W": 2_000_000,
    "DEFAULT_R": 1_000_000,
    "DEFAULT_W": 30_000,
    "DEFAULT_CPL": 3,
    "DEFAULT_MAXWAIT": 4_000_000_000,
}
SLOTS = LAYOUT["SLOTS"]

SUMMARY = re.compile(
    r"iobench design=(?P<design>\w+) r=(?P<r>\d+) w=(?P<w>\d+) cpl=(?P<cpl>\d) sent=(?P<sent>\d+) "
    r"completed=(?P<completed>\d+) stall_reads=(?P<stall_reads>\d+) drain_reads=(?P<drain_reads>\d+) "
    r"bad_results=(?P<bad_results>\d+)\n"
)
FAILED = guests.qemu_exit_status(1)  # 3
PASSED = guests.qemu_exit_status(0)  # 1


def pattern(k: int) -> bytes:
    return bytes((k * 7 + i) & 0xFF for i in range(LAYOUT["CMD_LEN"]))


@pytest.fixture(scope="module")
def image() -> Path:
    return image_path("iobench")


# ------------------------------------------------------------------ the build


def test_registered():
    assert "iobench" in GUESTS
    assert GUEST_FORMAT["iobench"] == "multiboot"
    assert guests.C_SOURCES["iobench"] == ("iobench.c", "lib/rt.c", "lib/cmd.c")
    src = guests.SRC_DIR
    # Its own files, the shared runtime's, what they include, the linker script.
    assert guests.guest_sources("iobench") == [
        src / "iobench.s",
        src / "iobench.c",
        src / "lib/rt.c",
        src / "lib/cmd.c",
        src / "lib/long64.inc",
        src / "lib.inc",
        src / "lib/cmd.h",
        src / "lib/rt.h",
        src / "lib/long64.ld",
    ]
    # The assembly-only guests are built as before: no C sources.
    assert all(name not in guests.C_SOURCES for name in GUESTS if name not in ("iobench", "ctxsw", "exitmix"))
    assert guests.C_SOURCES["exitmix"] == ("exitmix.c", "lib/rt.c", "lib/cmd.c")
    assert guests.C_SOURCES["ctxsw"] == ("ctxsw.c", "lib/rt.c")
    assert src / "lib/cmd.h" not in guests.guest_sources("ctxsw")


def test_multiboot_image(image):
    data = image.read_bytes()
    offsets = [
        off
        for off in range(0, min(len(data), 8192) - 11, 4)
        if struct.unpack_from("<I", data, off)[0] == guests.MULTIBOOT_HEADER_MAGIC
    ]
    assert offsets, "no multiboot header in the first 8 KiB"
    magic, flags, checksum = struct.unpack_from("<III", data, offsets[0])
    assert flags == guests.MULTIBOOT_HEADER_FLAGS
    assert (magic + flags + checksum) % 2**32 == 0
    with image.open("rb") as f:
        elf = ELFFile(f)
        assert (elf.elfclass, elf["e_machine"], elf["e_type"]) == (32, "EM_386", "ET_EXEC")
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert min(s["p_paddr"] for s in loads) == guests.MULTIBOOT_LOAD_ADDRESS
        # The image (with .bss) stays clear of the arrays the VMM reads afterwards.
        assert max(s["p_paddr"] + s["p_memsz"] for s in loads) <= LAYOUT["RESULTS_GPA"]
        symtab = elf.get_section_by_name(".symtab")
        symbols = {sym.name: sym["st_value"] for sym in symtab.iter_symbols()}
        sections = {sec.name for sec in elf.iter_sections()}
    for name, value in LAYOUT.items():
        assert symbols[f"IOBENCH_{name}"] == value, name
    assert symbols["EXIT_PORT"] == guests.EXIT_PORT
    assert symbols["COM1_PORT"] == guests.COM1_PORT
    for name in ("_start", "main", "iobench_main", "iobench_fault", "iobench_halt", "iobench_sysexit"):
        assert name in symbols, name
    assert not {s for s in sections if s.startswith(".rel")}, "fully linked, nothing left to relocate"


def test_layout_matches_the_device():
    cmddev = pytest.importorskip("hvm.devices.cmddev")
    assert cmddev.PIO_BASE + cmddev.REG_STATUS == LAYOUT["PIO_STATUS_PORT"]
    assert cmddev.PIO_BASE + cmddev.REG_DOORBELL == LAYOUT["PIO_DOORBELL_PORT"]
    assert cmddev.MMIO_BASE + cmddev.REG_STATUS == LAYOUT["MMIO_STATUS_GPA"]
    assert cmddev.MMIO_BASE + cmddev.REG_DOORBELL == LAYOUT["MMIO_DOORBELL_GPA"]
    assert cmddev.DIRTY_GPA == LAYOUT["DIRTY_GPA"]
    assert cmddev.RING_GPA == LAYOUT["DIRTY_RING_GPA"]
    assert cmddev.RING_SLOTS == SLOTS
    assert cmddev.DESC.size == 16
    assert set(cmddev.DESIGNS) == {"pio", "mmio", "coalesced", "dirty"}


@pytest.fixture
def private_tree(tmp_path, monkeypatch) -> Path:
    src = tmp_path / "src"
    shutil.copytree(guests.SRC_DIR, src)
    monkeypatch.setattr(guests, "SRC_DIR", src)
    monkeypatch.setenv("HVM_GUESTS_BUILD_DIR", str(tmp_path / "build"))
    return src


@pytest.mark.parametrize(
    "source", ["iobench.c", "lib/rt.c", "lib/rt.h", "lib/cmd.h", "lib/long64.inc", "lib/long64.ld"]
)
def test_touching_a_source_rebuilds(private_tree, source):
    image = image_path("iobench")
    old = image.stat().st_mtime - 3600
    os.utime(image, (old, old))
    os.utime(private_tree / source)
    assert image_path("iobench") == image
    assert image.stat().st_mtime_ns >= (private_tree / source).stat().st_mtime_ns


def test_shared_runtime_is_not_a_source_of_the_assembly_guests(private_tree):
    image = image_path("spin")
    built = image.stat().st_mtime_ns
    later = image.stat().st_mtime + 100
    for shared in ("lib/rt.h", "lib/rt.c", "lib/long64.inc"):
        os.utime(private_tree / shared, (later, later))
    image_path("spin")
    assert image.stat().st_mtime_ns == built


def test_a_missing_include_is_one_line(private_tree):
    (private_tree / "lib" / "cmd.h").unlink()
    with pytest.raises(GuestBuildError, match=r"compiling iobench\.c failed: .*cmd\.h") as info:
        image_path("iobench")
    assert "\n" not in str(info.value)


def test_c_compile_error_is_one_line(private_tree):
    broken = private_tree / "iobench.c"
    broken.write_text(broken.read_text() + "\nthis is not C;\n")
    with pytest.raises(GuestBuildError, match=r"compiling iobench\.c failed: .*error") as info:
        image_path("iobench")
    assert "\n" not in str(info.value)
    assert not (guests.build_dir() / "iobench.elf").exists()


def test_missing_gcc_only_matters_for_c_guests(private_tree, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("as", "ld"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    assert image_path("outloop").is_file()
    with pytest.raises(GuestBuildError, match="'gcc' and 'objcopy' not found") as info:
        image_path("iobench")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------- under QEMU

QEMU_ARGS = [
    "-accel", "tcg",
    "-serial", "stdio",
    "-display", "none",
    "-nodefaults",
    "-no-reboot",
]  # fmt: skip


def run(image: Path, append: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QEMU, *QEMU_ARGS, "-device", "isa-debug-exit,iobase=0xf4,iosize=4", *extra]
        + ["-kernel", str(image), "-append", append],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, int | str]:
    match = SUMMARY.fullmatch(proc.stdout)
    assert match, (proc.stdout, proc.stderr)
    return {k: (v if k == "design" else int(v)) for k, v in match.groupdict().items()}


INTEL_CPU = ("-cpu", "qemu64,vendor=GenuineIntel")  # SYSEXIT works in long mode


@needs_qemu
@pytest.mark.parametrize("cpu", [(), INTEL_CPU], ids=["amd-iretq", "intel-sysexit"])
@pytest.mark.parametrize("cpl", [3, 0])
def test_no_commands(image, cpl, cpu):
    # Ring switch (cpl=3), parsing and printing; with nothing sent the all-ones
    # STATUS that QEMU returns for the empty port is never interpreted.
    proc = run(image, f"design=pio r=10 w=0 cpl={cpl}", *cpu)
    assert proc.stdout == (
        f"iobench design=pio r=10 w=0 cpl={cpl} sent=0 completed=0 stall_reads=0 drain_reads=0"
        " bad_results=0\n"
    ), proc.stderr
    assert proc.returncode == PASSED


@needs_qemu
def test_defaults_and_a_device_that_returns_all_ones(image):
    # pio, r=1000000, w=30000, cpl=3: command 0 goes out at iteration 0, the
    # read at iteration 1 says 0xFFFFFFFF > sent: the device misbehaves, the
    # guest stops sending and waiting, and command 0's result is missing.
    proc = run(image, "")
    assert summary(proc) == {
        "design": "pio", "r": 1_000_000, "w": 30_000, "cpl": 3, "sent": 1, "completed": 0,
        "stall_reads": 0, "drain_reads": 0, "bad_results": 2,
    }  # fmt: skip
    assert proc.returncode == FAILED


@needs_qemu
@pytest.mark.parametrize("cpl", [3, 0])
def test_one_command_to_an_absent_port_device(image, cpl):
    proc = run(image, f"w=1 r=10 cpl={cpl}")
    s = summary(proc)
    assert (s["sent"], s["completed"], s["bad_results"], s["drain_reads"]) == (1, 0, 2, 0)
    assert proc.returncode == FAILED


@needs_qemu
@pytest.mark.parametrize("design", ["mmio", "coalesced", "dirty"])
def test_one_command_to_an_absent_memory_device(image, design):
    # Nothing at 0xD0000000/0xD0100000 under QEMU: STATUS reads some constant
    # (0 in QEMU 7/8, which looks like "not done yet") and the drain gives up
    # after maxwait reads; an all-ones value would be caught as impossible.
    proc = run(image, f"design={design} r=10 w=1 maxwait=1000")
    s = summary(proc)
    assert (s["design"], s["sent"], s["completed"]) == (design, 1, 0)
    assert (s["drain_reads"], s["bad_results"]) in {(1000, 1), (0, 2)}
    assert proc.returncode == FAILED


def loopback_model(r: int, w: int) -> dict[str, int]:
    """The guest's algorithm against its loopback device (one completion per STATUS read)."""
    dev = queued = sent = stall = drain = 0

    def read() -> None:
        nonlocal dev, queued
        if queued:
            queued -= 1
            dev += 1

    def send(count: int) -> None:
        nonlocal sent, queued, stall
        for _ in range(count):
            while sent - dev >= SLOTS:
                read()
                stall += 1
            queued += 1
            sent += 1

    due = [k * r // w for k in range(w)]
    per_iteration = {i: due.count(i) for i in set(due)}
    for i in range(r):
        read()
        send(per_iteration.get(i, 0))
    if r == 0:
        send(w)
    while dev != sent:
        read()
        drain += 1
    return {"sent": sent, "completed": dev, "stall_reads": stall, "drain_reads": drain}


@needs_qemu
@pytest.mark.parametrize(
    ("r", "w", "cpl", "cpu"),
    [
        (1000, 30_000, 3, ()),  # several commands per read: the ring fills, the guest stalls
        (100_000, 3000, 3, INTEL_CPU),  # one command every 33 reads: never more than one in flight
        (1000, 1000, 0, ()),
        (7, 1000, 3, ()),
        (0, 600, 3, ()),  # no loop at all: everything is sent (with stalls) and drained
        (300, 1, 0, ()),
        (0, 0, 3, ()),
    ],
)
def test_loopback_device(image, r, w, cpl, cpu):
    proc = run(image, f"design=loopback r={r} w={w} cpl={cpl}", *cpu)
    expected = {"design": "loopback", "r": r, "w": w, "cpl": cpl, **loopback_model(r, w), "bad_results": 0}
    assert summary(proc) == expected
    assert proc.returncode == PASSED


@needs_qemu
def test_selftest_crc_is_zlib_crc32(image):
    proc = run(image, "design=selftest w=260")
    lines = proc.stdout.splitlines(keepends=True)
    assert len(lines) == 261, proc.stderr
    for k, line in enumerate(lines[:-1]):
        assert line == f"iobench selftest k={k} crc={zlib.crc32(pattern(k)):#010x}\n"
    assert SUMMARY.fullmatch(lines[-1]) and "bad_results=0" in lines[-1]
    assert proc.returncode == PASSED


@needs_qemu
@pytest.mark.parametrize(
    ("append", "message"),
    [
        ("design=foo", "bad argument 'design=foo'"),
        ("cpl=1", "bad argument 'cpl=1'"),
        ("r=12x", "bad argument 'r=12x'"),
        ("w=", "bad argument 'w='"),
        ("r=4294967296", "bad argument 'r=4294967296'"),
        ("w=2000001", "w=2000001 exceeds 2000000"),
    ],
)
def test_bad_arguments(image, append, message):
    proc = run(image, f"x {append} y")
    assert proc.stdout.startswith("iobench: error: ") and message in proc.stdout, proc.stdout
    assert proc.stdout.count("\n") == 1
    assert proc.returncode == FAILED


@needs_qemu
def test_memory_must_hold_the_arrays(image):
    proc = run(image, "design=loopback r=10 w=1000", "-m", "20")  # < 24 MiB + 4000 bytes
    assert proc.stdout.startswith("iobench: error: w=1000 needs guest RAM up to 0x01800fa0"), proc.stdout
    assert proc.returncode == FAILED
    proc = run(image, "design=loopback r=10 w=1000", "-m", "32")
    assert summary(proc)["bad_results"] == 0 and proc.returncode == PASSED


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._reply()  # greeting
        self.execute("qmp_capabilities")

    def _reply(self) -> dict:
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._reply()
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@needs_qemu
def test_arrays_in_guest_memory_and_the_ring3_halt(image, tmp_path):
    # Without isa-debug-exit the guest's exit write goes nowhere; from ring 3 it
    # then halts through int 0x80, and QEMU's monitor can read what the VMM would.
    r, w = 3000, 700
    serial, qmp_path = tmp_path / "serial.txt", tmp_path / "qmp.sock"
    args = ["-accel", "tcg", "-display", "none", "-nodefaults", "-no-reboot", "-m", "64"]
    args += ["-serial", f"file:{serial}", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    args += ["-kernel", str(image), "-append", f"design=loopback r={r} w={w}"]
    proc = subprocess.Popen([QEMU, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (serial.exists() and serial.read_text().endswith("\n")):
            assert time.monotonic() < deadline, "no summary line"
            assert proc.poll() is None
            time.sleep(0.05)
        assert SUMMARY.fullmatch(serial.read_text())
        qmp = Qmp(qmp_path)
        try:
            while True:  # the exit write and int 0x80 follow the line closely
                regs = qmp.execute("human-monitor-command", **{"command-line": "info registers"})
                if "HLT=1" in regs:
                    break
                assert time.monotonic() < deadline, regs
                time.sleep(0.05)
            assert re.search(r"^CS =0008 ", regs, re.M), regs  # halted in ring 0
            dumps = {}
            for name in ("RESULTS_GPA", "LATENCY_GPA"):
                dumps[name] = tmp_path / f"{name}.bin"
                qmp.execute("pmemsave", val=LAYOUT[name], size=4 * w, filename=str(dumps[name]))
            qmp.execute("quit")
        finally:
            qmp.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = struct.unpack(f"<{w}I", dumps["RESULTS_GPA"].read_bytes())
    assert list(results) == [zlib.crc32(pattern(k)) for k in range(w)]
    latency = struct.unpack(f"<{w}I", dumps["LATENCY_GPA"].read_bytes())
    assert all(0 < t < 0xFFFF_FFFF for t in latency), latency[:8]
