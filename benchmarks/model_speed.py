"""Benchmark: the VT-x model engine while the guest computes, against raw Unicorn and QEMU TCG.

The bundled `spin` guest runs a 5-instruction register-only loop n=N times. The
per-iteration cost is the slope of run time over two values of N (constant costs
cancel), for:

- the model engine (`hvm.vmm.Machine`, engine "model": VMCS, code-page scanning, EPT, all on);
- raw Unicorn running the same multiboot image with only the port-I/O hooks it needs;
- `qemu-system-x86_64 -accel tcg` booting the same image (process wall time).

Target: model >= 0.8x raw Unicorn's speed (the VMX model costs nothing while the guest computes).
Printed, not asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32, UC_PROT_ALL, Uc  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

from hvm import boot, guests  # noqa: E402
from hvm.vmm.machine import Machine, MachineConfig  # noqa: E402
from hvm.vmm.memory import GuestMemory  # noqa: E402

LSR_IDLE = 0x60  # 16550 LSR after reset: THR empty, transmitter empty


def model_seconds(image: Path, n: int) -> float:
    m = Machine(MachineConfig(engine="model", mem_size=64 << 20, console=lambda b: None))
    try:
        m.load(image, append=f"n={n}")
        t0 = time.perf_counter()
        result = m.run()
        dt = time.perf_counter() - t0
    finally:
        m.close()
    assert result.console == b"spin done\n", result.console
    return dt


def raw_unicorn_seconds(image: Path, n: int) -> float:
    """The same image on bare Unicorn: loaded by hvm's multiboot loader, IN/OUT hooked, nothing else."""
    mem = GuestMemory(64 << 20)
    _, st = boot.load(mem, boot.read_image(image), boot.ImageFormat.MULTIBOOT, f"{image} n={n}".encode())
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.regions[0].host_addr)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, st.gdt.base, st.gdt.limit, 0))
    uc.reg_write(X.UC_X86_REG_CR0, st.cr0)
    uc.reg_write(X.UC_X86_REG_EAX, st.regs["rax"])
    uc.reg_write(X.UC_X86_REG_EBX, st.regs["rbx"])
    out = bytearray()

    def port_in(uc: Uc, port: int, size: int, user: object) -> int:
        return LSR_IDLE if port == 0x3FD else (1 << (8 * size)) - 1

    def port_out(uc: Uc, port: int, size: int, value: int, user: object) -> None:
        if port == 0x3F8:
            out.append(value & 0xFF)
        elif port == 0xF4:
            uc.emu_stop()

    uc.hook_add(UC_HOOK_INSN, port_in, None, 1, 0, X.UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, port_out, None, 1, 0, X.UC_X86_INS_OUT)
    t0 = time.perf_counter()
    uc.emu_start(st.rip, 0xFFFF_FFFF)
    dt = time.perf_counter() - t0
    assert bytes(out) == b"spin done\n", bytes(out)
    return dt


def qemu_tcg_seconds(image: Path, n: int) -> float:
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-kernel", str(image), "-append", f"n={n}", "-m", "64",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none",
           "-nodefaults", "-no-reboot"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    assert proc.returncode == 1 and proc.stdout == b"spin done\n", (proc.returncode, proc.stdout)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1", type=int, default=20_000_000)
    ap.add_argument("--n2", type=int, default=200_000_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    image = guests.image_path("spin")
    runners = {"model engine": model_seconds, "raw unicorn": raw_unicorn_seconds}
    if shutil.which("qemu-system-x86_64"):
        runners["qemu tcg"] = qemu_tcg_seconds
    slopes: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.reps):  # interleaved, so load on this shared machine hits every runner alike
        for name, fn in runners.items():
            slopes[name].append((fn(image, args.n2) - fn(image, args.n1)) / (args.n2 - args.n1))
    per_iter = {name: statistics.median(v) for name, v in slopes.items()}
    print(f"spin loop, slope over n={args.n1:,} and n={args.n2:,}, medians of {args.reps} (ns/iteration):")
    for name, value in per_iter.items():
        runs = ", ".join(f"{s * 1e9:.3f}" for s in slopes[name])
        print(f"  {name:13s} {value * 1e9:7.3f} ns  (runs: {runs})")
    speed = per_iter["raw unicorn"] / per_iter["model engine"]
    print(f"model engine speed / raw unicorn speed = {speed:.2f}x  (target >= 0.8x): "
          f"{'met' if speed >= 0.8 else 'NOT met'}")
    if "qemu tcg" in per_iter:
        ratio = per_iter["raw unicorn"] / per_iter["qemu tcg"]
        print(f"raw unicorn time / qemu tcg time per iteration = {ratio:.2f}x")


if __name__ == "__main__":
    main()
