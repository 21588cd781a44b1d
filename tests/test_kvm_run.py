"""Integration: bundled guests on /dev/kvm through the CLI and the library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvm.boot import ImageFormat
from hvm.vmm.machine import Machine, MachineConfig
from tests.conftest import needs_kvm

pytestmark = needs_kvm
ROOT = Path(__file__).resolve().parent.parent


def hvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hvm", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def machine() -> Machine:
    return Machine(MachineConfig(engine="kvm", mem_size=64 << 20, console=lambda b: None))


def test_hello_runs_and_exits_through_debug_port() -> None:
    proc = hvm("run")
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc.stderr  # isa-debug-exit value 0 -> (0 << 1) | 1
    assert out.startswith("Hello from hvm guest!\n") and out.endswith("bye\n")
    assert "scratch ok" in out  # the 16550 scratch register holds what was written
    assert proc.stderr == b""


def test_outloop_counts_exactly_n_port_exits(guest) -> None:
    m = machine()
    try:
        m.load(guest("outloop"), append="n=777")
        result = m.run(timeout=60)
    finally:
        m.close()
    assert result.exit_status == 1
    assert result.console == b"outloop done 777\n"
    stats = m.ledger.kinds
    io_to_0x500 = 777
    # every write to port 0x500 is an unhandled userspace I/O exit; the rest are UART/debug-exit writes
    assert stats[next(k for k in stats if k.value == "io")].unhandled == io_to_0x500
    # the kernel counted at least as many exits as reached userspace
    assert result.engine_counters["exits"] >= result.exits["io"]


def test_json_output_has_the_documented_keys(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = hvm("run", "--guest", "outloop", "--append", "n=10", "--json", str(out))
    assert proc.returncode == 1
    doc = json.loads(out.read_text())
    assert {"engine", "exit_status", "console", "exits", "kvm_stats", "wall_s"} <= set(doc)
    assert doc["engine"] == "kvm" and doc["exit_status"] == 1
    assert doc["console"] == "outloop done 10\n"
    assert doc["exits"]["io"] >= 10
    assert doc["kvm_stats"]["exits"] >= doc["exits"]["io"]
    detail = {d["kind"]: d for d in doc["exits_detail"]}
    assert detail["io"]["sdm_name"] == "IO_INSTRUCTION" and detail["io"]["sdm_number"] == 30  # SDM App. C


def test_json_to_stdout_keeps_console_out_of_the_document_stream() -> None:
    proc = hvm("run", "--guest", "outloop", "--append", "n=3", "--json", "-")
    doc = json.loads(proc.stdout)
    assert doc["console"] == "outloop done 3\n"


def test_stats_table_names_sdm_reasons() -> None:
    proc = hvm("run", "--guest", "outloop", "--append", "n=5", "--stats")
    err = proc.stderr.decode()
    assert "IO_INSTRUCTION" in err and "KVM kernel counters" in err


@pytest.mark.parametrize(
    ("name", "fmt", "text"), [("realmode", "real", "real mode ok\n"), ("longmode", "long", "long mode ok\n")]
)
def test_flat_binaries(guest, name: str, fmt: str, text: str) -> None:
    proc = hvm("run", str(guest(name)), "--format", fmt)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.decode() == text


def test_triple_fault_is_one_line_and_status_3() -> None:
    proc = hvm("run", "--guest", "triple")
    assert proc.returncode == 3
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "triple fault" in err[0]
    for reg in ("RIP=", "CS=", "CR0=", "CR3="):
        assert reg in err[0]


def test_timeout_prints_what_the_guest_wrote_and_exits_124() -> None:
    proc = hvm("run", "--guest", "forever", "--timeout", "1")
    assert proc.returncode == 124
    assert proc.stdout == b"looping\n"
    assert "timeout" in proc.stderr.decode()


def test_unknown_ports_and_mmio_are_counted_not_fatal() -> None:
    # in al,0x71 (unclaimed CMOS data port... claimed? use 0x510); mov eax,[0xd0000000]; out 0xf4
    code = bytes.fromhex(
        "66ba10050000"  # mov edx,0x510 (16-bit code: operand-size prefix)
        "ec"  # in al,dx      -> no device: reads 0xff
        "ba1005"  # mov dx,0x510
        "ee"  # out dx,al     -> no device: dropped
        "88c3"  # mov bl,al
        "b000"  # mov al,0
        "bAf400"  # mov dx,0xf4
        "88d8"  # mov al,bl
        "ee"  # out dx,al     -> exit with the value read
    )
    m = machine()
    try:
        m.load(code, ImageFormat.REAL)
        result = m.run(timeout=20)
    finally:
        m.close()
    assert result.exit_status == (0xFF << 1) | 1
    assert result.unhandled["io"] == 2


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (("run", "/nonexistent/image"), 2, "image not found"),
        (("run", "--mem", "lots"), 2, "invalid size"),
        (("run", "--mem", "4G"), 2, "not supported"),
        (("run", "--engine", "vmware"), 2, "invalid choice"),
        (("run", "--guest", "nope"), 2, "unknown bundled guest"),
        (("run", "--timeout", "-1"), 2, "greater than 0"),
        (("run", "README.md"), 2, "no multiboot header"),
        (("run", "tests"), 2, "directory"),
    ],
)
def test_bad_input_is_one_line_with_status(args: tuple[str, ...], status: int, needle: str) -> None:
    proc = hvm(*args)
    err = proc.stderr.decode()
    assert proc.returncode == status
    assert needle in err
    assert "Traceback" not in err


def test_console_input_reaches_the_guest_through_the_uart(guest) -> None:
    # The data sheet's receive path: bytes given to the UART set LSR.DR and are read from RBR.
    # They are fed once the guest has set up its UART (enabling the FIFOs clears the receiver).
    fed = []

    def console(data: bytes) -> None:
        if data == b"\n" and not fed:  # end of "echo ready"
            fed.append(True)
            m.feed_console(b"hi thereq")

    m = Machine(MachineConfig(engine="kvm", mem_size=64 << 20, console=console))
    try:
        m.load(guest("echo"))
        result = m.run(timeout=30)
    finally:
        m.close()
    assert result.exit_status == 1
    assert result.console == b"echo ready\nHI THERE\necho done 8\n"


def test_input_fd_is_wired_to_com1(guest) -> None:
    # What `hvm run` does with a terminal on stdin, here with a pipe.
    import os
    import threading

    rfd, wfd = os.pipe()
    try:
        m = Machine(MachineConfig(engine="kvm", mem_size=64 << 20, console=lambda b: None, input_fd=rfd))
        m.load(guest("echo"))
        threading.Timer(0.5, lambda: os.write(wfd, b"abcq")).start()
        result = m.run(timeout=30)
        m.close()
    finally:
        os.close(wfd)
        os.close(rfd)
    assert result.console.endswith(b"ABC\necho done 3\n")
