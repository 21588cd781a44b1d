"""The exit ledger: how many exits of each kind, and the time the VMM spent handling them."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvm.exits import ExitKind


@dataclass
class KindStats:
    count: int = 0
    handler_ns: int = 0
    unhandled: int = 0  # accesses no device claimed (ports, MMIO, MSRs)


@dataclass
class ExitLedger:
    kinds: dict[ExitKind, KindStats] = field(default_factory=dict)

    def record(self, kind: ExitKind, handler_ns: int) -> None:
        stats = self.kinds.get(kind)
        if stats is None:
            stats = self.kinds[kind] = KindStats()
        stats.count += 1
        stats.handler_ns += handler_ns

    def unhandled(self, kind: ExitKind) -> None:
        stats = self.kinds.get(kind)
        if stats is None:
            stats = self.kinds[kind] = KindStats()
        stats.unhandled += 1

    @property
    def total(self) -> int:
        return sum(s.count for s in self.kinds.values())

    def counts(self) -> dict[str, int]:
        return {kind.value: s.count for kind, s in self.kinds.items() if s.count}

    def rows(self) -> list[tuple[ExitKind, KindStats]]:
        return sorted(self.kinds.items(), key=lambda kv: -kv[1].count)
