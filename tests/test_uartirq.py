"""Device interrupts through the I/O APIC: the uartirq guest on every engine configuration and on QEMU.

uartirq (hvm/guests/src/uartirq.s) routes COM1's IRQ 4 through I/O APIC entry 4 to vector 0x34 at
the xAPIC and echoes what it receives in the interrupt handler. The reference is QEMU 7.2
(`-accel kvm`, so KVM's in-kernel IOAPIC and LAPIC behind QEMU's 16550): TRANSCRIPT is what it
printed for the input below (level-triggered; with `edge` the programmed entry and the entry seen in
service read 0x00000034), exit status 1 (isa-debug-exit value 0). Where QEMU is installed the test
also runs it live and compares.
"""

from __future__ import annotations

import functools
import os
import select
import subprocess
import threading
import time

import pytest

from hvm import guests
from hvm.vmm.machine import Machine, MachineConfig
from tests.conftest import QEMU, needs_kvm, needs_qemu

INPUT = b"hi ioapic!~"
TRANSCRIPT = (
    b"uartirq: ioapic id 0x00000000 version 0x00170011 arb 0x00000000\n"
    b"uartirq: redirection entry 4 at reset 0x00000000 0x00010000\n"
    b"uartirq: id after writing 0xffffffff 0x0f000000 arb 0x0f000000 arb 0x0f000000"
    b" index 0x03 0xffffffff index 0x40 0xffffffff index 0xff 0xffffffff\n"
    b"uartirq: programmed 0x00008034\n"
    b"uartirq: ready\n"
    b"hi ioapic!~\n"
    b"uartirq: entry 4 in service 0x0000c034 bytes 11\n"
    b"uartirq: done\n"
)
QEMU_STATUS = 1  # isa-debug-exit: (0 << 1) | 1

CONFIGS = [
    pytest.param("model", {"apic": "legacy"}, id="model-legacy"),
    pytest.param("model", {"apic": "apicv"}, id="model-apicv"),
    pytest.param("kvm", {"irqchip": "user"}, id="kvm-user", marks=needs_kvm),
    pytest.param("kvm", {"irqchip": "kernel"}, id="kvm-kernel", marks=needs_kvm),
]


def expected(append: str) -> bytes:
    if append == "edge":
        return TRANSCRIPT.replace(b"0x00008034", b"0x00000034").replace(b"0x0000c034", b"0x00000034")
    return TRANSCRIPT


def run_hvm(engine: str, options: dict, append: str, through_pipe: bool = False):
    """Runs uartirq; the input goes in once it printed 'ready': at once from the console callback, or
    (through_pipe) in three pieces from another thread through the Machine's input fd."""
    out = bytearray()
    ready = threading.Event()
    rfd = wfd = None
    if through_pipe:
        rfd, wfd = os.pipe()
    machine: Machine | None = None

    def console(data: bytes) -> None:
        out.extend(data)
        if b"ready\n" in out and not ready.is_set():
            ready.set()
            if not through_pipe:
                machine.feed_console(INPUT)

    def writer() -> None:
        ready.wait(30)
        for piece in (INPUT[:3], INPUT[3:9], INPUT[9:]):
            time.sleep(0.02)
            os.write(wfd, piece)

    machine = Machine(MachineConfig(engine=engine, mem_size=32 << 20, console=console, input_fd=rfd,
                                    engine_options=options))
    thread = threading.Thread(target=writer, daemon=True) if through_pipe else None
    try:
        machine.load(guests.image_path("uartirq"), append=append)
        if thread:
            thread.start()
        result = machine.run(timeout=60)
        ioapic = machine.ioapic.counters() if machine.ioapic else None
    finally:
        machine.close()
        if thread:
            thread.join(5)
        for fd in (rfd, wfd):
            if fd is not None:
                os.close(fd)
    return result, ioapic


@functools.cache
def qemu(append: str) -> tuple[bytes, int]:
    image = guests.image_path("uartirq")
    proc = subprocess.Popen(
        [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "32", "-kernel", str(image),
         "-append", append, "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
         "-display", "none", "-nodefaults", "-no-reboot"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + 60
    while b"ready\n" not in out and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
    proc.stdin.write(INPUT)
    proc.stdin.flush()
    rest, _ = proc.communicate(timeout=60)
    return out + rest, proc.returncode


@pytest.mark.parametrize("append", ["", "edge"])
@pytest.mark.parametrize(("engine", "options"), CONFIGS)
def test_uartirq_echoes_through_the_ioapic(engine: str, options: dict, append: str) -> None:
    result, ioapic = run_hvm(engine, options, append)
    assert result.reason == "guest wrote 0x0 to isa-debug-exit"
    assert result.exit_status == QEMU_STATUS
    assert result.console == expected(append)
    if options.get("irqchip") == "kernel":
        assert ioapic is None  # KVM's own IOAPIC routed the line
    else:
        assert ioapic["delivered"] >= 1
        assert ioapic["eoi"] == (ioapic["delivered"] if append == "" else 0)


@pytest.mark.parametrize(("engine", "options"), CONFIGS)
def test_uartirq_input_from_another_thread(engine: str, options: dict) -> None:
    """Bytes arrive while the vCPU halts, from the Machine's input thread: the I/O APIC's pending
    message must wake it (one interrupt or more per piece, the same echo)."""
    result, ioapic = run_hvm(engine, options, "", through_pipe=True)
    assert result.exit_status == QEMU_STATUS and result.console == TRANSCRIPT
    if ioapic is not None:
        assert ioapic["delivered"] >= 1 and ioapic["eoi"] == ioapic["delivered"]


@needs_kvm
@needs_qemu
@pytest.mark.parametrize("append", ["", "edge"])
def test_qemu_prints_the_transcript(append: str) -> None:
    console, status = qemu(append)
    assert status == QEMU_STATUS and console == expected(append)


def test_default_configurations_have_no_vmm_ioapic() -> None:
    m = Machine(MachineConfig(engine="model", mem_size=16 << 20, console=lambda b: None))
    try:
        assert m.ioapic is None  # apic="off": no local APIC to deliver to
    finally:
        m.close()
