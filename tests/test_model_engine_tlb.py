"""The model engine's translation path: guest walks remembered across TLB misses, MMIO replays.

The engine keeps what a walk read (guest paging-structure entries, EPT entries that left a page
unmapped) and reuses the result while those entries hold their values; the SDM's rules must
still hold exactly: a guest's page-table edit is seen after INVLPG (Vol. 3A 4.10.4.1), accessed
and dirty flags are set again after software clears them (4.8), a new EPTP applies to the walk's
own accesses (Vol. 3C 29.3.2), and a not-present EPT entry is never cached (29.4.2). MMIO: each
access is one EPT-violation exit in program order, however often the instruction runs.
"""

from __future__ import annotations

import struct

from hvm.exits import ExitKind
from hvm.vtx.ept import EptBuilder, EptViolationQualification
from hvm.vtx.exit_reasons import ExitReason as X
from tests.test_model_engine_support import CODE, F, Tiny, entry_state, needs_as

pytestmark = needs_as

P, RW, US, A, D = 1, 2, 4, 1 << 5, 1 << 6
MMIO = 0xFE00_0000
TABLES = 0x10_0000  # PML4; PDPT, PD, two page tables and the MMIO tables follow
PT0 = TABLES + 0x3000  # maps 0-2 MiB with 4-KiB pages
PT_MMIO = TABLES + 0x6000


def pte(linear: int) -> int:
    """Guest-physical address of the PTE that maps ``linear`` (below 4 MiB)."""
    return PT0 + (linear >> 12) * 8


def paged(source: str) -> Tiny:
    """A 64-bit guest under 4-level paging with 4-KiB pages: identity for 0-4 MiB, MMIO at :data:`MMIO`."""
    g = Tiny(source, bits=64)
    mem = g.memory
    mem.write(TABLES, struct.pack("<Q", TABLES + 0x1000 | P | RW))
    mem.write(TABLES + 0x1000, struct.pack("<4Q", TABLES + 0x2000 | P | RW, 0, 0, TABLES + 0x5000 | P | RW))
    mem.write(TABLES + 0x2000, struct.pack("<2Q", PT0 | P | RW, PT0 + 0x1000 | P | RW))
    mem.write(PT0, struct.pack("<1024Q", *(i << 12 | P | RW for i in range(1024))))
    mem.write(TABLES + 0x5000 + 0x1F0 * 8, struct.pack("<Q", PT_MMIO | P | RW))  # PD entry for MMIO
    mem.write(PT_MMIO, struct.pack("<2Q", MMIO | P | RW, MMIO + 0x1000 | P | RW))
    state = entry_state(64)
    state.cr3 = TABLES
    g.engine.set_state(state)
    return g


def mmio_run(g: Tiny, answer, until: ExitKind = ExitKind.HLT, limit: int = 500) -> list[tuple]:
    """Run to ``until``, answering each MMIO read with ``answer(addr, size)``; the MMIO exits seen."""
    seen = []
    for _ in range(limit):
        ex = g.engine.run()
        if ex.kind is until:
            return seen
        assert ex.kind is ExitKind.MMIO, ex
        seen.append((ex.addr, ex.size, ex.is_write, ex.data))
        if not ex.is_write:
            g.engine.complete_read(answer(ex.addr, ex.size))
    raise AssertionError(f"no {until.value} exit")


def u64(g: Tiny, gpa: int) -> int:
    return struct.unpack("<Q", g.memory.read(gpa, 8))[0]


# --- MMIO ----------------------------------------------------------------------------------------

def test_mmio_in_a_loop_exits_once_per_access_in_program_order() -> None:
    # Each pass reads STATUS, adds it up, writes the sum to a second register and to RAM.
    g = paged("mov rbp, 0xFE000000\nmov ecx, 30\nxor ebx, ebx\n1:\nmov eax, [rbp]\nadd ebx, eax\n"
              "mov [rbp + 4], ebx\nmov [0x200000 + rcx*4], ebx\ndec ecx\njnz 1b\nhlt")
    try:
        values = iter(range(1, 100))
        seen = mmio_run(g, lambda addr, size: next(values).to_bytes(size, "little"))
        sums = [sum(range(1, n + 1)) for n in range(1, 31)]
        expected = []
        for total in sums:
            expected += [(MMIO, 4, False, b""), (MMIO + 4, 4, True, total.to_bytes(4, "little"))]
        assert seen == expected
        assert g.reg("rbx") == sums[-1]
        assert struct.unpack("<I", g.memory.read(0x200000 + 4, 4))[0] == sums[-1]  # the last pass: rcx = 1
        assert g.engine.exit_counts[X.EPT_VIOLATION] == 60
    finally:
        g.close()


def test_read_modify_write_and_string_copies_from_mmio_in_a_loop() -> None:
    # ADD to MMIO: one read, then one write of the sum; REP MOVSD from MMIO: one read per element,
    # in order, the elements stored to RAM.
    g = paged("mov rbp, 0xFE000000\nmov ecx, 4\n1:\nadd dword ptr [rbp + 8], 5\nmov ebx, ecx\n"
              "lea rsi, [rbp + 0x100]\nmov rdi, 0x200000\nmov ecx, 2\nrep movsd\nmov ecx, ebx\n"
              "dec ecx\njnz 1b\nhlt")
    try:
        values = iter(range(10, 100))
        seen = mmio_run(g, lambda addr, size: next(values).to_bytes(size, "little"))
        expected = []
        n = 10
        for _ in range(4):
            expected += [(MMIO + 8, 4, False, b""), (MMIO + 8, 4, True, (n + 5).to_bytes(4, "little")),
                         (MMIO + 0x100, 4, False, b""), (MMIO + 0x104, 4, False, b"")]
            n += 3
        assert seen == expected
        assert struct.unpack("<2I", g.memory.read(0x200000, 8)) == (n - 2, n - 1)
    finally:
        g.close()


def test_mmio_through_two_linear_aliases_of_one_page() -> None:
    g = paged("mov rbp, 0xFE000000\nmov ecx, 5\n1:\nmov eax, [rbp + 8]\nmov ebx, [0x3FF00C]\n"
              "mov [0x3FF010], eax\nmov [rbp + 0x14], ebx\ndec ecx\njnz 1b\nhlt")
    try:
        g.memory.write(pte(0x3FF000), struct.pack("<Q", MMIO | P | RW))  # linear 3FF000H -> MMIO too
        seen = mmio_run(g, lambda addr, size: (addr & 0xFF).to_bytes(size, "little"))
        assert seen == [(MMIO + 8, 4, False, b""), (MMIO + 0xC, 4, False, b""),
                        (MMIO + 0x10, 4, True, bytes([8, 0, 0, 0])),
                        (MMIO + 0x14, 4, True, bytes([0xC, 0, 0, 0]))] * 5
    finally:
        g.close()


def test_instruction_after_mmio_runs_often_on_ram_too() -> None:
    # The same load reads MMIO once and RAM 600 times: the hook that ends its MMIO replays sits at
    # the next instruction, which keeps running; every result must still be right.
    g = paged("mov rdi, 0xFE000000\ncall load\nmov ebx, eax\nmov rdi, 0x200000\nmov ecx, 600\n"
              "1:\ncall load\nadd ebx, eax\ndec ecx\njnz 1b\n"
              "mov rdi, 0xFE000004\ncall load\nadd ebx, eax\nhlt\n"
              "load:\nmov eax, [rdi]\nret")
    try:
        g.memory.write(0x200000, struct.pack("<I", 3))
        seen = mmio_run(g, lambda addr, size: (addr - MMIO + 1).to_bytes(size, "little"))
        assert seen == [(MMIO, 4, False, b""), (MMIO + 4, 4, False, b"")]
        assert g.reg("rbx") == 1 + 600 * 3 + 5
    finally:
        g.close()


def test_kick_before_the_replayed_instruction_does_not_repeat_the_read() -> None:
    # The read's data arrives; the run that replays the instruction with it is interrupted before
    # the instruction executes. The read must not reach the device twice.
    from unicorn import UC_HOOK_CODE

    g = paged("mov rbp, 0xFE000000\nmov eax, [rbp]\ncpuid\nhlt")
    try:
        ex = g.engine.run()
        assert (ex.kind, ex.addr, ex.is_write) == (ExitKind.MMIO, MMIO, False)
        g.engine.complete_read(b"\x78\x56\x34\x12")
        load = CODE + 10  # after the 10-byte MOV RBP, imm64
        kicked = []

        def kick_once(uc, address, size, _):
            if not kicked:
                kicked.append(address)
                g.engine.kick()
        hook = g.engine.uc.hook_add(UC_HOOK_CODE, kick_once, None, load, load)
        g.engine.uc.ctl_remove_cache(load, load + 1)
        try:
            assert g.engine.run().kind is ExitKind.INTR
        finally:
            g.engine.uc.hook_del(hook)
        assert kicked == [load]
        ex = g.engine.run()
        assert ex.kind is ExitKind.CPUID
        assert g.reg("rax") == 0x1234_5678
        assert g.engine.exit_counts[X.EPT_VIOLATION] == 1
    finally:
        g.close()


# --- guest page walks ------------------------------------------------------------------------------

def test_page_table_edit_takes_effect_after_invlpg() -> None:
    # Linear 200000H maps page 200000H, then (PTE rewritten, INVLPG) page 201000H, then back.
    g = paged(f"mov eax, [0x200000]\nmov rdx, [{pte(0x200000):#x}]\nmov rsi, rdx\nadd rsi, 0x1000\n"
              f"mov [{pte(0x200000):#x}], rsi\ninvlpg [0x200000]\nmov ebx, [0x200000]\n"
              f"mov [{pte(0x200000):#x}], rdx\nmov r8, cr3\nmov cr3, r8\nmov ecx, [0x200000]\nhlt")
    try:
        g.memory.write(0x200000, struct.pack("<I", 0x1111))
        g.memory.write(0x201000, struct.pack("<I", 0x2222))
        assert mmio_run(g, None) == []
        assert (g.reg("rax"), g.reg("rbx"), g.reg("rcx")) == (0x1111, 0x2222, 0x1111)
    finally:
        g.close()


def test_accessed_and_dirty_flags_are_set_again_after_the_guest_clears_them() -> None:
    # SDM 4.8: a read sets A in every entry used, a write also D in the PTE; software clears them,
    # invalidates, and the next accesses set them again.
    entry = pte(0x300000)
    g = paged(f"mov eax, [0x300000]\nmov dword ptr [0x300004], 1\nmov r8, [{entry:#x}]\n"
              f"and qword ptr [{entry:#x}], ~0x60\ninvlpg [0x300000]\nmov r9, [{entry:#x}]\n"
              f"mov eax, [0x300000]\nmov r10, [{entry:#x}]\nmov dword ptr [0x300004], 2\n"
              f"mov r11, [{entry:#x}]\nhlt")
    try:
        assert mmio_run(g, None) == []
        flags = [g.reg(r) & (A | D) for r in ("r8", "r9", "r10", "r11")]
        assert flags == [A | D, 0, A, A | D]
        assert u64(g, entry) & (A | D) == A | D
    finally:
        g.close()


def test_a_new_ept_pointer_applies_to_the_walk_of_a_page_walked_before() -> None:
    # The first access walks the guest tables with the default EPT; the VMM then installs an EPT
    # without read access to the PML4's page: the same access's walk must now violate EPT.
    g = paged("mov eax, [0x200000]\ncpuid\nmov ebx, [0x200000]\nhlt")  # CPUID: the VMM's turn
    try:
        assert g.engine.run().kind is ExitKind.CPUID
        host = g.engine.host
        ept = EptBuilder(host, pool=host.allocate(16), pool_size=16 * 4096)
        ept.map(0, 0, TABLES)
        ept.map(TABLES + 0x1000, TABLES + 0x1000, g.memory.size - TABLES - 0x1000)  # not the PML4
        g.vmwrite(F.EPT_POINTER, ept.eptp)
        ex = g.engine.run()
        assert ex.kind is ExitKind.EPT_VIOLATION
        q = EptViolationQualification.decode(ex.qualification)
        assert q.read and q.gla_valid and not q.linear_translation  # the walk's access to the PML4E
        assert ex.addr == TABLES
        # The first translation after the entry is the fetch of the instruction after CPUID.
        assert g.vmread(F.GUEST_LINEAR_ADDRESS) & ~0xFFF == CODE
    finally:
        g.close()


def test_a_page_ept_leaves_unmapped_is_reached_once_ept_maps_it() -> None:
    # SDM 29.4.2: nothing is cached from a not-present EPT entry, so mapping the page takes effect
    # without INVEPT: the second load reads RAM (host page 300000H) instead of exiting as MMIO.
    g = paged("mov rbp, 0xFE000000\nmov esi, [rbp]\ncpuid\nmov edi, [rbp + 4]\nhlt")
    try:
        host = g.engine.host
        ept = EptBuilder(host, pool=host.allocate(16), pool_size=16 * 4096)
        ept.map(0, 0, g.memory.size)
        g.vmwrite(F.EPT_POINTER, ept.eptp)
        assert mmio_run(g, lambda addr, size: b"\x01\0\0\0", until=ExitKind.CPUID) == [(MMIO, 4, False, b"")]
        ept.map(MMIO, 0x300000, 0x1000)
        g.memory.write(0x300004, struct.pack("<I", 0xBEEF))
        assert mmio_run(g, None) == []
        assert (g.reg("rsi"), g.reg("rdi")) == (1, 0xBEEF)
    finally:
        g.close()
