"""Benchmark: hvm versus QEMU on the same images, in one run, each figure with its ratio.

(a) per-exit cost of a userspace-handled port write: the slope of wall time over
    two values of N for the bundled `outloop` guest (N port writes to a port no
    in-kernel device claims, so every write is a KVM_EXIT_IO to userspace).
    Target: hvm <= 1.5x QEMU.
(b) time from process start to the guest's first console byte with the bundled
    `hello` guest. QEMU boots through its firmware; hvm loads the image itself.
    Target: hvm <= 0.2x QEMU.

Both programs run as separate processes, interleaved, several times; medians
are reported. This is a benchmark, not a test: it prints, it does not assert.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvm import guests  # noqa: E402

QEMU = "qemu-system-x86_64"
QEMU_ARGS = [
    "-accel",
    "kvm",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=4",
    "-serial",
    "stdio",
    "-display",
    "none",
    "-nodefaults",
    "-no-reboot",
    "-m",
    "128",
]


def hvm_cmd(image: Path, append: str) -> list[str]:
    return [sys.executable, "-m", "hvm", "run", str(image), "--engine", "kvm", "--append", append]


def qemu_cmd(image: Path, append: str) -> list[str]:
    return [QEMU, *QEMU_ARGS, "-kernel", str(image), "-append", append]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=_env(),
        timeout=600,
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 1:  # the guests exit through isa-debug-exit with value 0 -> status 1
        raise SystemExit(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    return dt


def first_byte(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT, env=_env()
    )
    assert proc.stdout is not None
    byte = proc.stdout.read(1)
    dt = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait(timeout=60)
    if not byte:
        raise SystemExit(f"{cmd[0]} printed nothing")
    return dt


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def pair_slope(cmd_for, n1: int, n2: int) -> float:
    """Per-iteration seconds from one pair of runs: (T(n2) - T(n1)) / (n2 - n1)."""
    t1 = wall(cmd_for(n1))
    t2 = wall(cmd_for(n2))
    return (t2 - t1) / (n2 - n1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1", type=int, default=20_000)
    ap.add_argument("--n2", type=int, default=220_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: run scripts/setup.sh test (installs qemu-system-x86)")
    outloop = guests.image_path("outloop")
    hello = guests.image_path("hello")
    print(
        f"host: {os.uname().release}, {os.cpu_count()} CPUs; hvm and QEMU interleaved, medians of {args.reps}"
    )

    makers = {"hvm": hvm_cmd, "qemu": qemu_cmd}
    slopes: dict[str, list[float]] = {name: [] for name in makers}
    boots: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.reps):  # interleaved: each repetition measures both programs back to back
        for name, make in makers.items():
            slopes[name].append(pair_slope(lambda n, make=make: make(outloop, f"n={n}"), args.n1, args.n2))
            boots[name].append(first_byte(make(hello, "")))
    per_exit = {name: statistics.median(v) for name, v in slopes.items()}
    for name, values in slopes.items():
        print(
            f"(a) per-exit cost, {name:4s}: {per_exit[name] * 1e6:7.2f} µs  "
            f"(runs: {', '.join(f'{s * 1e6:.2f}' for s in values)})"
        )
    ratio_a = per_exit["hvm"] / per_exit["qemu"]
    verdict_a = "met" if ratio_a <= 1.5 else "NOT met"
    print(f"(a) hvm / qemu per-exit cost = {ratio_a:.2f}x  (target <= 1.5x): {verdict_a}")

    boot = {name: statistics.median(v) for name, v in boots.items()}
    for name, values in boots.items():
        print(
            f"(b) start to first console byte, {name:4s}: {boot[name] * 1e3:8.1f} ms  "
            f"(runs: {', '.join(f'{t * 1e3:.0f}' for t in values)})"
        )
    ratio_b = boot["hvm"] / boot["qemu"]
    print(
        f"(b) hvm / qemu time to first byte = {ratio_b:.3f}x  (target <= 0.2x): "
        f"{'met' if ratio_b <= 0.2 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
