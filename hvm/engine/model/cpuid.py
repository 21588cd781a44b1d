"""What CPUID returns inside the model: the host's identity, the emulated CPU's features.

CPUID exits unconditionally in VMX non-root operation (SDM Vol. 3C 26.1.2), so every guest
CPUID is a VM exit and the hypervisor chooses the answer. This policy is the one KVM applies
(arch/x86/kvm/cpuid.c): the vendor string, family/model/stepping signature and brand string are
the host's, while the feature bits describe what the virtual CPU really implements, here the
CPU that Unicorn emulates (QEMU's "qemu64"-class model), probed once by executing CPUID in a
scratch Unicorn instance. As KVM does, it sets the "hypervisor present" bit (CPUID.1:ECX[31])
and hides VMX (CPUID.1:ECX[5]): the guest gets no nested virtualization.

PCIDs: Unicorn 2.1.4 reports neither CPUID.01H:ECX.PCID (bit 17) nor
CPUID.(EAX=07H,ECX=0):EBX.INVPCID (bit 10) under any of its CPU models (``uc.ctl_set_cpu_model``
with UC_CPU_X86_HASWELL, SKYLAKE_CLIENT/SERVER, ... changes other leaf-7 bits but QEMU's TCG
feature filter drops these two), and it raises #UD for INVPCID. The model engine implements
both itself (:mod:`hvm.engine.model.instructions`), so ``CpuidPolicy(pcid=True)`` reports them;
the engine clears INVPCID again when "enable INVPCID" is 0, where INVPCID is #UD (SDM 26.3), as
KVM does.
"""

from __future__ import annotations

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as R

from hvm.engine.model.hostcpu import host_cpuid

_CPUID_HLT = b"\x0f\xa2\xf4"  # cpuid; hlt
_IDENTITY_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)  # brand string
_ECX_VMX, _ECX_HYPERVISOR = 1 << 5, 1 << 31
ECX_PCID = 1 << 17  # CPUID.01H:ECX
EBX_INVPCID = 1 << 10  # CPUID.(EAX=07H,ECX=0):EBX


class CpuidPolicy:
    """Maps (leaf, subleaf) to the EAX, EBX, ECX, EDX a guest CPUID returns."""

    def __init__(self, *, pcid: bool = False) -> None:
        self.pcid = pcid  # the engine implements PCIDs and INVPCID (report them)
        self._uc: Uc | None = None
        self._cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def emulated(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """CPUID as the emulated CPU answers it."""
        if self._uc is None:
            self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
            self._uc.mem_map(0, 0x1000, UC_PROT_ALL)
            self._uc.mem_write(0, _CPUID_HLT)
        uc = self._uc
        uc.reg_write(R.UC_X86_REG_RAX, leaf)
        uc.reg_write(R.UC_X86_REG_RCX, subleaf)
        uc.emu_start(0, len(_CPUID_HLT))
        return tuple(uc.reg_read(r) & 0xFFFF_FFFF for r in
                     (R.UC_X86_REG_RAX, R.UC_X86_REG_RBX, R.UC_X86_REG_RCX, R.UC_X86_REG_RDX))

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        key = (leaf, subleaf)
        if key not in self._cache:
            self._cache[key] = self._answer(leaf, subleaf)
        return self._cache[key]

    def _answer(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        eax, ebx, ecx, edx = self.emulated(leaf, subleaf)
        host = host_cpuid(leaf, subleaf)
        if leaf in (0, 0x8000_0000) and host is not None:
            _, ebx, ecx, edx = host  # vendor string
        elif leaf == 1:
            if host is not None:
                eax = host[0]  # family, model, stepping
            ecx = ecx & ~_ECX_VMX | _ECX_HYPERVISOR | (ECX_PCID if self.pcid else 0)
        elif leaf == 7 and subleaf == 0 and self.pcid:
            ebx |= EBX_INVPCID
        elif leaf in _IDENTITY_LEAVES and host is not None and host_cpuid(0x8000_0000)[0] >= leaf:
            eax, ebx, ecx, edx = host
        return eax, ebx, ecx, edx
