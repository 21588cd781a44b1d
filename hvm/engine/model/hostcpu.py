"""The host processor's CPUID and time-stamp counter, read by executing the instructions.

The model answers a guest's CPUID with the host's identity (as KVM does) and bases the guest TSC
on the host TSC (SDM Vol. 3C 26.3: guest TSC = host TSC scaled and offset). Python has no
instruction for either, so two tiny x86-64 functions are placed in an executable mapping and
called through ctypes. On a host where that is impossible (not x86-64, or W^X policy) the
functions report ``None`` and the callers fall back (see :mod:`hvm.engine.model.cpuid`).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import time

# cpuid(leaf=edi, subleaf=esi, out=rdx): push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")
# rdtsc(): rdtsc; shl rdx,32; or rax,rdx; ret
_RDTSC = bytes.fromhex("0f3148c1e2204809d0c3")


class _Native:
    def __init__(self) -> None:
        self.cpuid = None
        self.rdtsc = None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return
        try:
            self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except (OSError, ValueError):
            return
        self._page.write(_CPUID + bytes(64 - len(_CPUID)) + _RDTSC)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(base)
        self.rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + 64)


_native = _Native()


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """EAX, EBX, ECX, EDX of CPUID on the host, or None where it cannot be executed."""
    if _native.cpuid is None:
        return None
    out = (ctypes.c_uint32 * 4)()
    _native.cpuid(leaf, subleaf, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]


_EPOCH = time.perf_counter_ns()


def host_tsc() -> int:
    """The host time-stamp counter (or, where RDTSC cannot run here, nanoseconds since start-up)."""
    if _native.rdtsc is not None:
        return _native.rdtsc()
    return time.perf_counter_ns() - _EPOCH
