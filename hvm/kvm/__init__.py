"""The KVM binding: ioctl encoding, ctypes mirrors of <linux/kvm.h>, fd-owning objects."""

from hvm.kvm.api import KvmError, MemorySlot, System, Vcpu, Vm
from hvm.kvm.stats import StatsReader

__all__ = ["KvmError", "MemorySlot", "StatsReader", "System", "Vcpu", "Vm"]
