"""The Linux ioctl request encoding (include/uapi/asm-generic/ioctl.h).

A request number packs direction, argument size, type and number:
``dir << 30 | size << 16 | type << 8 | nr``. KVM's numbers are built here from
that rule, never typed in, so a reader can check each against <linux/kvm.h>.
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _size(argtype: type | int) -> int:
    return argtype if isinstance(argtype, int) else ctypes.sizeof(argtype)


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, argtype: type | int) -> int:
    return _IOC(_IOC_READ, typ, nr, _size(argtype))


def _IOW(typ: int, nr: int, argtype: type | int) -> int:
    return _IOC(_IOC_WRITE, typ, nr, _size(argtype))


def _IOWR(typ: int, nr: int, argtype: type | int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, _size(argtype))
