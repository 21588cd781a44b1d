"""Reader for KVM's binary statistics file descriptor (KVM_GET_STATS_FD).

Layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a kvm_stats_header,
an id string, ``num_desc`` descriptors each followed by a ``name_size``-byte name,
then the data block of u64 values at each descriptor's ``offset``.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from hvm.kvm import structs as S

KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4


@dataclass(frozen=True)
class StatDesc:
    name: str
    flags: int
    exponent: int
    size: int  # number of u64 values
    offset: int  # within the data block

    @property
    def kind(self) -> int:
        return self.flags & KVM_STATS_TYPE_MASK


class StatsReader:
    """Owns a stats fd; ``read()`` returns {name: value} for the scalar statistics."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        header_size = ctypes.sizeof(S.kvm_stats_header)
        header = S.kvm_stats_header.from_buffer_copy(os.pread(fd, header_size, 0))
        self.header = header
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0")[0].decode()
        desc_size = ctypes.sizeof(S.kvm_stats_desc) + header.name_size
        blob = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        self.descs: list[StatDesc] = []
        for i in range(header.num_desc):
            raw = blob[i * desc_size : (i + 1) * desc_size]
            d = S.kvm_stats_desc.from_buffer_copy(raw)
            name = raw[ctypes.sizeof(S.kvm_stats_desc) :].split(b"\0")[0].decode()
            self.descs.append(StatDesc(name, d.flags, d.exponent, d.size, d.offset))
        self._data_size = max((d.offset + 8 * d.size for d in self.descs), default=0)

    def read(self) -> dict[str, int]:
        """Scalar statistics (histograms are summed) by name."""
        data = os.pread(self.fd, self._data_size, self.header.data_offset)
        out: dict[str, int] = {}
        for d in self.descs:
            values = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = values[0] if d.size == 1 else sum(values)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
