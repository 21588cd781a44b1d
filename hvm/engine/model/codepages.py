"""Which guest pages hold code, and a hook at every address where a sensitive instruction may start.

The life of a host-physical page, driven by Unicorn's TLB fills (the model owns every
translation, see :mod:`hvm.engine.model.engine`):

* **unscanned**: TLB entries for it never carry execute permission, so the first instruction
  fetch from it misses the TLB and reaches the fill callback;
* **clean**: that fetch scanned it (:func:`~hvm.engine.model.decode.candidate_starts`) and
  hooked each candidate address of every virtual page that maps it; TLB entries carry execute
  permission but never write permission, so the first write to it after a scan misses too;
* **stale**: a write reached it; TLB entries now carry write permission but not execute
  permission. Code already translated from it keeps running (QEMU itself discards translations
  whose bytes a write changed), and any *new* translation needs an execute TLB entry, i.e. a
  fill, which re-checks the page: if its bytes differ from the scanned ones it is scanned again
  and the hooks follow. No instruction can be translated from bytes that were not scanned.

A page that holds both code and data (the bundled guests keep their stack next to their code)
settles after one stale/clean round trip: translated code runs without TLB lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hvm.engine.model.decode import PAGE, candidate_starts

PAGE_MASK = ~(PAGE - 1)


@dataclass
class CodePage:
    snapshot: bytes
    starts: frozenset[int]
    clean: bool = True
    version: int = 0
    aliases: set[int] = field(default_factory=set)  # virtual pages whose hooks follow this page


class CodePages:
    """Scan state of host pages and the per-address hooks of the virtual pages mapping them."""

    def __init__(self, read_page: Callable[[int], bytes], add_hook: Callable[[int], int],
                 del_hook: Callable[[int], None]) -> None:
        self._read_page = read_page
        self._add_hook = add_hook
        self._del_hook = del_hook
        self.pages: dict[int, CodePage] = {}
        self._vmap: dict[int, tuple[int, int]] = {}  # vpage -> (hpage, version hooked)
        self._hooks: dict[int, dict[int, int]] = {}  # vpage -> {offset: hook handle}
        self.scans = 0

    def is_clean(self, hpage: int) -> bool:
        page = self.pages.get(hpage)
        return page is not None and page.clean

    def host_page(self, vpage: int) -> int | None:
        """The host page whose hooks ``vpage`` carries (its mapping at the last fetch)."""
        entry = self._vmap.get(vpage)
        return None if entry is None else entry[0]

    def fetch(self, vpage: int, hpage: int) -> None:
        """An instruction fetch from ``vpage`` (mapping ``hpage``) missed the TLB."""
        page = self.pages.get(hpage)
        if page is None:
            data = self._read_page(hpage)
            page = self.pages[hpage] = CodePage(data, frozenset(candidate_starts(data)))
            self.scans += 1
        elif not page.clean:
            data = self._read_page(hpage)
            if data != page.snapshot:
                page.snapshot = data
                page.starts = frozenset(candidate_starts(data))
                page.version += 1
                self.scans += 1
            page.clean = True
        current = self._vmap.get(vpage)
        if current != (hpage, page.version):
            if current is not None and current[0] != hpage:
                old = self.pages.get(current[0])
                if old is not None:
                    old.aliases.discard(vpage)
            self._rehook(vpage, page.starts)
            self._vmap[vpage] = (hpage, page.version)
        page.aliases.add(vpage)

    def write(self, vpage: int, hpage: int) -> bool:
        """A write to a clean code page missed the TLB; True if other virtual pages map it."""
        page = self.pages[hpage]
        page.clean = False
        return bool(page.aliases - {vpage})

    def forget(self, hpage: int) -> None:
        """Bytes of ``hpage`` changed behind Unicorn's back (a write by the hypervisor itself)."""
        page = self.pages.get(hpage)
        if page is not None:
            page.clean = False

    def _rehook(self, vpage: int, starts: frozenset[int]) -> None:
        hooks = self._hooks.setdefault(vpage, {})
        for offset in set(hooks) - starts:
            self._del_hook(hooks.pop(offset))
        for offset in starts - set(hooks):
            hooks[offset] = self._add_hook(vpage + offset)

    @property
    def hook_count(self) -> int:
        return sum(len(h) for h in self._hooks.values())
