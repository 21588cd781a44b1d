"""Differential: the same multiboot images under QEMU (the reference peer) and under `hvm run`.

QEMU is Debian's qemu-system-x86 with `-accel kvm -cpu host` (less arch-capabilities,
whose MSR this host's KVM refuses to set, which makes QEMU abort), so both see the
host's CPUID as KVM filters it. The one expected difference is the firmware:
SeaBIOS keeps the top of RAM for itself, so QEMU's multiboot mem_upper is a
little smaller than hvm's (which has no firmware); that line is compared as
"QEMU <= hvm" and every other line must be identical.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QEMU, needs_kvm, needs_qemu

pytestmark = [needs_kvm, needs_qemu]
ROOT = Path(__file__).resolve().parent.parent
MEM_UPPER = re.compile(rb"^mem_upper: (\d+) KiB$", re.MULTILINE)


def qemu(image: Path, append: str) -> subprocess.CompletedProcess:
    cmd = [
        QEMU,
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "128",
        "-kernel",
        str(image),
        "-append",
        append,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-serial",
        "stdio",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def hvm(image: Path, append: str, engine: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "hvm",
        "run",
        str(image),
        "--engine",
        engine,
        "--mem",
        "128M",
        "--append",
        append,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)


@functools.cache
def reference(image: Path, append: str) -> subprocess.CompletedProcess:
    return qemu(image, append)


@pytest.mark.parametrize("engine", ["kvm", "model"])
@pytest.mark.parametrize(
    ("name", "append"), [("hello", "n=5 demo"), ("outloop", "n=2500"), ("spin", "n=2000")]
)
def test_same_console_and_status_as_qemu(guest, name: str, append: str, engine: str) -> None:
    image = guest(name)
    ref, ours = reference(image, append), hvm(image, append, engine)
    assert ours.returncode == ref.returncode == 1, (ref.stderr, ours.stderr)
    ref_mem = MEM_UPPER.search(ref.stdout)
    ours_mem = MEM_UPPER.search(ours.stdout)
    assert (ref_mem is None) == (ours_mem is None)
    if ref_mem:
        assert int(ref_mem.group(1)) <= int(ours_mem.group(1)) <= 127 * 1024
    assert MEM_UPPER.sub(b"", ours.stdout) == MEM_UPPER.sub(b"", ref.stdout)
