"""The hypervisor proper: a Machine assembled from a config, and its run loop.

Data flow of one exit: engine.run() -> Exit -> handler (bus -> device) -> the read
result goes back through engine.complete_read() -> ledger.record -> next run().
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvm import boot
from hvm.boot import ImageFormat
from hvm.cpu import RFLAGS_IF, CpuState
from hvm.devices.base import StopMachine
from hvm.devices.debug_exit import DEFAULT_PORT, DEFAULT_SIZE, DebugExit, Port80
from hvm.devices.ioapic import IoApic
from hvm.devices.uart16550 import Uart16550
from hvm.engine import create_engine, resolve_engine_name
from hvm.errors import EXIT_GUEST_CRASH, EXIT_OK, EXIT_TIMEOUT, HvmError, SetupError
from hvm.exits import Exit, ExitKind
from hvm.vmm.bus import MmioBus, PioBus
from hvm.vmm.ledger import ExitLedger
from hvm.vmm.memory import GuestMemory, GuestMemoryError, Region

COM1_PORT, COM1_IRQ = 0x3F8, 4
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0  # <linux/kvm.h>; the engines share the flag's meaning
CONSOLE_KEEP = 1 << 20  # bytes of console output kept for the run result


@dataclass
class MachineConfig:
    engine: str = "auto"
    mem_size: int = 128 << 20
    console: Callable[[bytes], None] | None = None  # None: write to stdout
    input_fd: int | None = None  # bytes read from this fd (e.g. 0, a terminal) go to COM1
    # keyword arguments for the engine's constructor, e.g. {"paging": "shadow"} on the model engine
    engine_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    engine: str
    exit_status: int
    reason: str
    console: bytes
    exits: dict[str, int]
    engine_counters: dict[str, int]
    wall_s: float
    crash_state: CpuState | None = None
    unhandled: dict[str, int] = field(default_factory=dict)


class GuestCrash(HvmError):
    status = EXIT_GUEST_CRASH


class Machine:
    def __init__(self, config: MachineConfig | None = None) -> None:
        self.config = config or MachineConfig()
        self.engine_name = resolve_engine_name(self.config.engine)
        try:
            self.memory = GuestMemory(self.config.mem_size)
        except GuestMemoryError as exc:
            raise SetupError(str(exc)) from None
        self.engine = create_engine(self.engine_name, self.memory, self.config.engine_options)
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.ledger = ExitLedger()
        self._console = bytearray()
        self._sink = self.config.console or _stdout
        self.uart = Uart16550(irq=lambda level: self.engine.set_irq(COM1_IRQ, level), output=self._output)
        self.pio.register(COM1_PORT, 8, self.uart)
        self.pio.register(DEFAULT_PORT, DEFAULT_SIZE, DebugExit())
        self.pio.register(0x80, 1, Port80())
        #: The VMM's local APIC, when the engine has none of its own (KVM with irqchip="user").
        self.lapic = None
        if self.engine.userspace_lapic:
            from hvm.devices.lapic import LapicDevice

            self.lapic = LapicDevice()
            self.mmio.register(self.lapic.base, self.lapic.size, self.lapic)
            self.engine.attach_interrupt_controller(self.lapic)
        #: The VMM's I/O APIC at 0xFEC00000, when the VMM emulates the local APIC (KVM with
        #: irqchip="user", the model engine with apic="legacy"|"apicv"): ISA IRQ n -> its pin n.
        self.ioapic: IoApic | None = None
        ioapic = IoApic()
        if self.engine.attach_ioapic(ioapic):
            self.ioapic = ioapic
            self.mmio.register(ioapic.base, ioapic.size, ioapic)
        self._lock = threading.Lock()
        self._pollers: list[_Poller] = []
        if self.lapic is not None:
            self._pollers.append(_Poller(self.lapic.poll_interval_s, self.lapic.tick))
        self._deadline: float | None = None
        self._coalesced = False
        self.coalesced_writes = 0  # guest writes buffered by the engine, delivered without an exit
        #: The VMM's MSR emulation for RDMSR/WRMSR exits: returns True when it handled the exit
        #: (completing an RDMSR through engine.complete_read); otherwise the access counts as unhandled.
        self.msr_handler: Callable[[Exit], bool] | None = None
        self.entry_state: CpuState | None = None

    # --- set-up ------------------------------------------------------------------------
    def load(
        self, image: str | Path | bytes, fmt: ImageFormat = ImageFormat.AUTO, append: str = ""
    ) -> ImageFormat:
        """Load a guest image; the multiboot command line is "<image path> <append>", as QEMU passes it."""
        data = image if isinstance(image, bytes) else boot.read_image(image)
        name = "" if isinstance(image, bytes) else str(image)
        cmdline = f"{name} {append}".strip() if name else append
        fmt, state = boot.load(self.memory, data, fmt, cmdline.encode())
        self.entry_state = state
        self.engine.set_state(state)
        return fmt

    def _output(self, data: bytes) -> None:
        if len(self._console) < CONSOLE_KEEP:
            self._console += data[: CONSOLE_KEEP - len(self._console)]
        self._sink(data)

    # --- the run loop ------------------------------------------------------------------
    def add_poller(self, interval_s: float, poll: Callable[[], None]) -> None:
        """Call ``poll()`` on the vCPU thread about every ``interval_s`` while the guest runs.

        One host interval timer drives all pollers and the timeout: its signal kicks the
        engine out of the guest (on KVM a real exit), the loop runs whatever is due.
        """
        self._pollers.append(_Poller(interval_s, poll))

    def run(self, timeout: float | None = None) -> RunResult:
        if self.entry_state is None:
            raise SetupError("no guest image loaded")
        start = time.perf_counter()
        status, reason, crash = EXIT_OK, "", None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        tick = min(
            [p.interval for p in self._pollers] + ([timeout] if timeout is not None else []), default=0
        )
        old_handler = None
        if tick:
            now = time.monotonic()
            for p in self._pollers:
                p.due = now + p.interval
            old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, tick, tick)
        input_thread = self._start_input() if self.config.input_fd is not None else None
        try:
            status, reason = self._loop()
        except StopMachine as stop:
            status, reason = stop.status, stop.reason
        except GuestCrash as exc:
            status, reason = exc.status, str(exc)
            crash = self.engine.get_state()
        finally:
            if tick:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
            if input_thread:
                input_thread.stop()
        for p in self._pollers:  # a last harvest: nothing the guest published is left behind
            p.poll()
        return RunResult(
            engine=self.engine_name,
            exit_status=status,
            reason=reason,
            console=bytes(self._console),
            exits=self.ledger.counts(),
            engine_counters=self.engine.counters(),
            wall_s=time.perf_counter() - start,
            crash_state=crash,
            unhandled={k.value: s.unhandled for k, s in self.ledger.kinds.items() if s.unhandled},
        )

    def _on_alarm(self, signum: int, frame: object) -> None:
        self.engine.kick()

    def _on_intr(self) -> tuple[int, str] | None:
        """The host interrupted the guest (timer tick or signal): run due pollers, check the deadline."""
        now = time.monotonic()
        for p in self._pollers:
            if now >= p.due:
                p.poll()
                p.runs += 1
                p.due = now + p.interval
        if self._deadline is not None and now >= self._deadline - 0.005:  # timer granularity
            return EXIT_TIMEOUT, "timeout"
        return None

    def _loop(self) -> tuple[int, str]:
        engine, ledger, clock = self.engine, self.ledger, time.perf_counter_ns
        pio_lookup = self.pio.lookup
        lock = self._lock if self.config.input_fd is not None else None
        coalesced = self._coalesced
        while True:
            ex = engine.run()
            t0 = clock()
            kind = ex.kind
            try:
                if coalesced:
                    self._flush_coalesced()
                if kind is ExitKind.IO:
                    if lock:
                        with lock:
                            self._io(ex, pio_lookup)
                    else:
                        self._io(ex, pio_lookup)
                    continue
                result = self._on_intr() if kind is ExitKind.INTR else self._slow(ex)
                if result is not None:
                    return result
            finally:  # every exit is counted, also the one that ends the run
                ledger.record(kind, clock() - t0)

    # --- memory and coalesced writes -------------------------------------------------------
    def add_ram_region(self, gpa: int, size: int, log_dirty: bool = False) -> Region:
        """Guest memory outside RAM (a device's pages), optionally with dirty-page tracking."""
        region = self.memory.add_region(gpa, size, KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        self.engine.map_region(region)
        return region

    def coalesce_mmio(self, addr: int, size: int) -> bool:
        """Let guest writes to [addr, addr+size) be buffered by the engine instead of exiting."""
        if not self.engine.register_coalesced_mmio(addr, size):
            return False
        self._coalesced = True
        return True

    def _flush_coalesced(self) -> None:
        for addr, data in self.engine.drain_coalesced():
            self.coalesced_writes += 1
            hit = self.mmio.lookup(addr)
            if hit is None:
                self.ledger.unhandled(ExitKind.MMIO)
            else:
                device, offset = hit
                device.write(offset, len(data), int.from_bytes(data, "little"))

    def _io(self, ex: Exit, lookup) -> None:
        hit = lookup(ex.port)
        size = ex.size
        if hit is None:
            self.ledger.unhandled(ExitKind.IO)
            if not ex.is_write:
                self.engine.complete_read(b"\xff" * (size * ex.count))
            return
        device, offset = hit
        if ex.is_write:
            data = ex.data
            if ex.count == 1:
                device.write(offset, size, int.from_bytes(data, "little"))
            else:
                for i in range(0, len(data), size):
                    device.write(offset, size, int.from_bytes(data[i : i + size], "little"))
        else:
            out = b"".join(device.read(offset, size).to_bytes(size, "little") for _ in range(ex.count))
            self.engine.complete_read(out)

    def _slow(self, ex: Exit) -> tuple[int, str] | None:
        kind = ex.kind
        if kind is ExitKind.MMIO:
            hit = self.mmio.lookup(ex.addr)
            if hit is None:
                self.ledger.unhandled(kind)
                if not ex.is_write:
                    self.engine.complete_read(b"\xff" * ex.size)
            else:
                device, offset = hit
                if ex.is_write:
                    device.write(offset, ex.size, int.from_bytes(ex.data, "little"))
                else:
                    self.engine.complete_read(device.read(offset, ex.size).to_bytes(ex.size, "little"))
            return None
        if kind is ExitKind.HLT:
            if not self.engine.get_state().rflags & RFLAGS_IF:
                return EXIT_OK, "guest halted with interrupts disabled"
            return None
        if kind in (ExitKind.RDMSR, ExitKind.WRMSR):
            if self.msr_handler is not None and self.msr_handler(ex):
                return None
            self.ledger.unhandled(kind)
            if kind is ExitKind.RDMSR:
                self.engine.complete_read(bytes(8))
            return None
        if kind is ExitKind.SYSTEM_EVENT:
            return EXIT_OK, ex.detail
        if kind in (ExitKind.SHUTDOWN, ExitKind.INTERNAL_ERROR, ExitKind.FAIL_ENTRY, ExitKind.EPT_MISCONFIG):
            what = "triple fault" if kind is ExitKind.SHUTDOWN else ex.detail
            state = self.engine.get_state()
            raise GuestCrash(f"guest crashed: {what} ({state.describe()}; exit kind {kind.value})")
        # Any other exit the engine reports is counted and the guest resumes.
        return None

    # --- console input -----------------------------------------------------------------
    def _start_input(self) -> _InputThread:
        thread = _InputThread(self)
        thread.start()
        return thread

    def feed_console(self, data: bytes) -> None:
        with self._lock:
            self.uart.receive(data)

    def close(self) -> None:
        self.engine.close()
        self.memory.close()


@dataclass
class _Poller:
    interval: float
    poll: Callable[[], None]
    due: float = 0.0
    runs: int = 0


def _stdout(data: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), data)
    except (BlockingIOError, BrokenPipeError):
        pass


class _InputThread(threading.Thread):
    """Reads stdin and feeds COM1 (the in-kernel irqchip wakes a halted vCPU on IRQ 4)."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(daemon=True, name="hvm-stdin")
        self.machine = machine
        self._stop = threading.Event()

    def run(self) -> None:
        fd = self.machine.config.input_fd
        while not self._stop.is_set():
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            self.machine.feed_console(data)

    def stop(self) -> None:
        self._stop.set()
