"""The bundled guest programs and the step that builds them into images.

The guests are GNU ``as`` sources under ``src/``; no binary image is committed.
:func:`image_path` builds a guest on demand into ``build/`` (or into
``$HVM_GUESTS_BUILD_DIR``) with ``as --32`` and ``ld -m elf_i386`` and returns
the image's path; it rebuilds when the image is older than any of its sources.
Guests with C sources (:data:`C_SOURCES`: ``iobench``, ``ctxsw``, ``exitmix``) are
built as 64-bit code behind lib.inc's 32-bit multiboot entry and share a small
runtime in ``src/lib/``; see :data:`C_SOURCES`.

Three image formats (:data:`GUEST_FORMAT`):

``multiboot``
    A multiboot v1 ELF32 i386 image linked at 1 MiB (``hello``, ``outloop``,
    ``spin``, ``triple``, ``forever``, ``iobench``).  ``qemu-system-x86_64 -kernel IMAGE``
    boots it; a VMM loads its PT_LOAD segments and enters ``e_entry`` in 32-bit
    protected mode with EAX = 0x2BADB002 and EBX = the multiboot info address.
    The command line may carry ``n=NUMBER``.
``flat16``
    A 512-byte real-mode boot sector (``realmode``): load at 0x7C00 and start
    at CS:IP = 0000:7C00.
``flat64``
    A flat 64-bit binary (``longmode``): load at 0x100000 and start at its
    first byte in long mode, paging identity-mapping the first 4 GiB.
    (``pwalk64`` too, but its loader is the page-walk experiment, which builds
    the paging under test.)
``flat32``
    A flat 32-bit binary loaded at 0x100000 (``pwalk32``), entered in
    protected mode by the page-walk experiment with its paging on.

Every guest reports on COM1 and leaves through QEMU's isa-debug-exit device
(:data:`EXIT_PORT`) with value 0, i.e. QEMU exit status ``(0 << 1) | 1 == 1``;
``triple`` triple-faults instead and ``forever`` never stops.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "C_LINKER_SCRIPT",
    "C_SOURCES",
    "LONG64_ASM",
    "COM1_PORT",
    "DEFAULT_N",
    "EXIT_PORT",
    "GUESTS",
    "GUEST_FORMAT",
    "FLAT16_LOAD_ADDRESS",
    "FLAT64_LOAD_ADDRESS",
    "GuestBuildError",
    "MULTIBOOT_BOOTLOADER_MAGIC",
    "MULTIBOOT_HEADER_FLAGS",
    "MULTIBOOT_HEADER_MAGIC",
    "MULTIBOOT_LOAD_ADDRESS",
    "OUTLOOP_PORT",
    "POST_PORT",
    "build_all",
    "build_dir",
    "guest_sources",
    "image_path",
    "qemu_exit_status",
]

# I/O ports used by the guests (the assembly defines the same values in
# src/lib.inc; tests/test_guests_build.py checks that they agree).
COM1_PORT = 0x3F8
"""16550 UART the guests print on (THR at +0, LSR at +5, scratch at +7)."""
EXIT_PORT = 0xF4
"""QEMU isa-debug-exit (``iobase=0xf4,iosize=4``); the guests write a 32-bit value."""
POST_PORT = 0x80
"""POST code port; ``hello`` writes one byte (0x42) to it."""
OUTLOOP_PORT = 0x500
"""``outloop`` writes N bytes here; no device lives there, so each is a userspace exit."""

# Multiboot v1 (spec section 3.1.1 for the header, 3.2 for the machine state).
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_HEADER_FLAGS = 0x00000002  # bit 1: please provide mem_lower/mem_upper
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002  # EAX at entry

MULTIBOOT_LOAD_ADDRESS = 0x100000
FLAT16_LOAD_ADDRESS = 0x7C00
FLAT64_LOAD_ADDRESS = 0x100000

GUESTS: dict[str, str] = {
    "hello": (
        "demo: UART init, greeting, CPUID vendor/signature, UART scratch register, "
        "POST code, multiboot mem_upper and command line, then 'bye'"
    ),
    "outloop": f"N (n=N, default 1000) byte writes to port {OUTLOOP_PORT:#x}, then 'outloop done N'",
    "spin": "N (n=N, default 1000000) iterations of a 5-instruction register-only loop, then 'spin done'",
    "triple": "prints 'triple fault next', loads an empty IDT and divides by zero: triple fault",
    "forever": "prints 'looping', then jmp . forever",
    "echo": "echoes COM1 input in upper case until 'q', then 'echo done N'",
    "realmode": "512-byte real-mode boot sector at 0x7C00: prints 'real mode ok'",
    "longmode": "flat 64-bit binary at 0x100000, entered in long mode: prints 'long mode ok'",
    "iobench": (
        "the I/O experiment: r status reads and w CRC-32 commands to the command device "
        "(design=pio|mmio|coalesced|dirty r=N w=N cpl=0|3, default pio 1000000 30000 3), "
        "then one 'iobench ...' summary line; C, see src/iobench.c"
    ),
    "trapkern": "interrupt-toggling guest kernel: CLI/STI/POPF, CR0/CR3/CR4, RDMSR/WRMSR, paging, "
    "long mode, INVLPG, #UD/#DE through its IDT and IRETQ ('swint': also int 0x30)",
    "redpill": "detects trap-and-emulate: SGDT/SIDT base, SMSW against CR0, POPF keeping IF; "
    "prints the evidence per probe and 'redpill: virtualized' or 'redpill: not detected'",
    "tscread": "N (n=N, default 4) RDTSC reads, then N RDTSCP reads if CPUID has it, each 64-bit value "
    "written as two 32-bit OUTs to port 0x530 (RDTSC) or 0x538 (RDTSCP); then 'tscread done N'",
    "pwalk64": "the page-walk experiment's cold random-access guest (64-bit code, flat at 0x100000, entered "
    "with paging on by hvm/lab/page_walk.py): RCX reads of random pages of the region at RDI (RSI+1 pages)",
    "pwalk32": "pwalk64 in 32-bit code for 32-bit and PAE paging (EDI region, ESI pages-1, ECX reads)",
    "syscalls": "N (n=N, default 10000) 'system calls' at CPL 0, each a WRMSR of IA32_TSC_AUX with the "
    "call's number; then 'rdtscp yes|no', 'tsc_aux V' (RDTSCP or RDMSR) and 'syscalls done N'",
    "ctxsw": "the context-switch experiment: p processes (own page tables, same linear addresses), "
    "n CR3 switches, k pages touched per slice (p=P n=N k=K, default 4 1000 8), then one 'ctxsw ...' "
    "line; 'pcid=1': each process its own PCID, CR3 loaded with the no-flush bit; "
    "'check': accessed/dirty flags, remap + INVLPG, #PF error codes, CR0.WP; C, see src/ctxsw.c",
    "exitmix": "the exit-rate experiment's mixed workload at ring 0: units of CPU work, IA32_TSC_AUX "
    "'system calls', command-device I/O at a chosen intensity (design=pio|mmio|dirty io=K per unit), "
    "self-IPIs and a periodic local APIC timer; one 'exitmix ...' summary line; C, see src/exitmix.c",
    "selfmap": "edits its page tables through a recursive PML4 entry (PML4[510] -> PML4): maps, remaps "
    "(INVLPG) and unmaps a page and writes the PML4 through itself; prints what it reads, the A/D flags "
    "and the #PFs, then 'selfmap: done'; assembly on lib/long64.inc",
    "apictick": "the apicv experiment's guest: xAPIC at 0xFEE00000 in long mode; a TPR check, M self-IPIs "
    "(ipis=M, default 50) and N periodic 1-ms APIC timer ticks (n=N, default 50; waits with PAUSE, or "
    "HLT with 'hlt'), an EOI each; then 'apictick: ticks N ipis M spurious 0'",
    "uartirq": "interrupt-driven COM1 input: I/O APIC entry 4 (level-triggered, 'edge': edge) -> vector "
    "0x34 at the xAPIC; prints the I/O APIC's registers, 'uartirq: ready', echoes each byte in the "
    "handler until '~', then the entry seen in service and 'uartirq: done'",
}
"""Guest name -> what it does."""

GUEST_FORMAT: dict[str, str] = {
    "hello": "multiboot",
    "outloop": "multiboot",
    "spin": "multiboot",
    "triple": "multiboot",
    "forever": "multiboot",
    "echo": "multiboot",
    "realmode": "flat16",
    "longmode": "flat64",
    "iobench": "multiboot",
    "trapkern": "multiboot",
    "redpill": "multiboot",
    "tscread": "multiboot",
    "syscalls": "multiboot",
    "pwalk64": "flat64",
    "pwalk32": "flat32",
    "ctxsw": "multiboot",
    "exitmix": "multiboot",
    "apictick": "multiboot",
    "uartirq": "multiboot",
    "selfmap": "multiboot",
}
"""Guest name -> image format: ``multiboot``, ``flat16``, ``flat32`` or ``flat64``."""

DEFAULT_N: dict[str, int] = {"outloop": 1000, "spin": 1_000_000}
"""Value of ``n`` when the command line has no ``n=NUMBER``."""

C_SOURCES: dict[str, tuple[str, ...]] = {
    "iobench": ("iobench.c", "lib/rt.c", "lib/cmd.c"),
    "ctxsw": ("ctxsw.c", "lib/rt.c"),
    "exitmix": ("exitmix.c", "lib/rt.c", "lib/cmd.c"),
}
"""Guest name -> freestanding C files in ``src/`` (its own, then the shared runtime's).

Such a guest is a multiboot image whose body is 64-bit: ``NAME.s`` includes
lib.inc under ``.code32`` (entry in 32-bit protected mode) and lib/long64.inc,
which switches to long mode and calls the C entry point.  It is assembled with
``as --64``, the C compiled with ``gcc -m64`` (:data:`_CC_FLAGS`), linked by
:data:`C_LINKER_SCRIPT` as ELF64 at 1 MiB and converted with ``objcopy -O
elf32-i386`` into the ELF32 image multiboot loaders accept.  (64-bit because on
KVM-on-PVM hosts only 64-bit ring-3 guest code runs natively.)  The shared
runtime: lib/rt.c (rt.h: port I/O, COM1 output, numbers, command-line words,
IDT/TSS) and lib/cmd.c (cmd.h: the command device's data and CRC-32).
"""

LONG64_ASM: frozenset[str] = frozenset({"selfmap"})
"""Assembly-only guests built like those in :data:`C_SOURCES` (``as --64``, lib/long64.inc's boot
path, :data:`C_LINKER_SCRIPT`), with no C file."""

C_LINKER_SCRIPT = "lib/long64.ld"
"""The linker script of every guest in :data:`C_SOURCES` and :data:`LONG64_ASM`, relative to ``src/``."""

_CC_FLAGS = [
    "-m64", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-nostdlib", "-O2",
    "-mno-red-zone",  # ring-0 code shares its stack with exception frames
    "-mgeneral-regs-only",  # the guest never enables SSE (CR4.OSFXSR = 0)
    "-c",
]  # fmt: skip

SRC_DIR = Path(__file__).resolve().parent / "src"
_DEFAULT_BUILD_DIR = Path(__file__).resolve().parent / "build"
_BUILD_DIR_ENV = "HVM_GUESTS_BUILD_DIR"
_TOOL_TIMEOUT = 60  # seconds per as/ld run


class GuestBuildError(Exception):
    """A guest image could not be built (missing binutils, or as/ld failed)."""


def qemu_exit_status(value: int) -> int:
    """QEMU's exit status after a guest writes ``value`` to isa-debug-exit."""
    return ((value << 1) | 1) & 0xFF


@dataclass(frozen=True)
class _Recipe:
    fmt: str

    @property
    def suffix(self) -> str:
        return ".elf" if self.fmt == "multiboot" else ".bin"


def _recipe(name: str) -> _Recipe:
    try:
        return _Recipe(GUEST_FORMAT[name])
    except KeyError:
        raise ValueError(f"unknown guest {name!r}; known: {', '.join(GUESTS)}") from None


def build_dir() -> Path:
    """Where images go: ``$HVM_GUESTS_BUILD_DIR`` if set, else ``hvm/guests/build``."""
    override = os.environ.get(_BUILD_DIR_ENV)
    return Path(override) if override else _DEFAULT_BUILD_DIR


def guest_sources(name: str) -> list[Path]:
    """The files an image is built from; it is rebuilt when any is newer.

    The guest's ``.s`` file, its C files, every file they include (``.include "F"``,
    ``#include "F"``, followed into included files) and the linker script.
    """
    recipe = _recipe(name)
    sources = [SRC_DIR / f"{name}.s", *(SRC_DIR / c for c in C_SOURCES.get(name, ()))]
    for source in list(sources):
        sources += [inc for inc in _includes(source) if inc not in sources]
    if name in C_SOURCES or name in LONG64_ASM:
        sources.append(SRC_DIR / C_LINKER_SCRIPT)
    elif recipe.fmt == "multiboot":
        sources.append(SRC_DIR / "multiboot.ld")
    return sources


_INCLUDE = re.compile(r'^\s*(?:\.include|#\s*include)\s+"([^"]+)"', re.MULTILINE)


def _includes(source: Path) -> list[Path]:
    """The files ``source`` includes, directly or not, in the order first met.

    A name is looked up next to the including file, then in ``src/`` (``as -I`` and
    ``gcc -I`` get ``src/``); one found nowhere is listed as it would be in ``src/``,
    so the staleness check sees it missing and the build reports it.
    """
    found: list[Path] = []
    pending = [source]
    while pending:
        current = pending.pop(0)
        try:
            text = current.read_text(errors="replace")
        except OSError:
            continue  # missing: the build says so
        for include in _INCLUDE.findall(text):
            beside = current.parent / include
            path = beside if beside.is_file() else SRC_DIR / include
            if path not in found and path != source:
                found.append(path)
                pending.append(path)
    return found


def _output_path(name: str) -> Path:
    return build_dir() / f"{name}{_recipe(name).suffix}"


def _is_fresh(image: Path, sources: list[Path]) -> bool:
    try:
        built = image.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    try:
        return all(built >= src.stat().st_mtime_ns for src in sources)
    except FileNotFoundError:
        return False  # a missing source: let the build report it


def _require_binutils() -> None:
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build guest images: {' and '.join(repr(t) for t in missing)} "
            "not found on PATH; install binutils (e.g. apt-get install binutils)"
        )


def _require_cc(name: str) -> None:
    if name not in C_SOURCES:
        return
    missing = [tool for tool in ("gcc", "objcopy") if shutil.which(tool) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build guest {name!r}: {' and '.join(repr(t) for t in missing)} not found on PATH; "
            "install gcc and binutils (e.g. apt-get install gcc binutils)"
        )


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT)
    except FileNotFoundError:
        raise GuestBuildError(f"{argv[0]!r} not found; install binutils") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"{what}: {argv[0]} timed out after {_TOOL_TIMEOUT}s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        # Prefer the first real diagnostic over "Assembler messages:" headers.
        detail = next(
            (ln for ln in lines if "error" in ln.lower()),
            lines[0] if lines else f"exit status {proc.returncode}",
        )
        raise GuestBuildError(f"{what} failed: {detail}")


def _build(name: str, image: Path) -> None:
    """Assemble and link ``name`` into ``image`` atomically (temp file + rename)."""
    _require_binutils()
    _require_cc(name)
    try:
        _build_into(name, image)
    except OSError as exc:
        raise GuestBuildError(f"building {image.name}: {exc.strerror or exc}: {exc.filename}") from None


def _build_into(name: str, image: Path) -> None:
    recipe = _recipe(name)
    source = SRC_DIR / f"{name}.s"
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=image.parent) as tmp:
        obj = Path(tmp) / f"{name}.o"
        out = Path(tmp) / image.name
        if name in C_SOURCES or name in LONG64_ASM:
            _build_c_guest(name, Path(tmp), out)
            os.replace(out, image)
            return
        assemble = ["as", "--32", "-I", str(SRC_DIR), "-o", str(obj), str(source)]
        _run(assemble, f"assembling {source.name}")
        if recipe.fmt == "multiboot":
            # -n: don't page-align sections in the file (keeps it small and
            # the multiboot header near the start).
            link = ["ld", "-m", "elf_i386", "-n", "-z", "noexecstack"]
            link += ["-T", str(SRC_DIR / "multiboot.ld")]
        else:
            base = FLAT16_LOAD_ADDRESS if recipe.fmt == "flat16" else FLAT64_LOAD_ADDRESS
            link = ["ld", "-m", "elf_i386", "-Ttext", f"{base:#x}", "-e", "start"]
            link += ["--oformat", "binary"]
        _run([*link, "-o", str(out), str(obj)], f"linking {image.name}")
        # Same filesystem, so the rename is atomic: a concurrent reader sees the
        # old image or the new one, never a half-written file.
        os.replace(out, image)


def _build_c_guest(name: str, tmp: Path, out: Path) -> None:
    """A multiboot guest with a 64-bit body (see :data:`C_SOURCES`) into ``out``."""
    source = SRC_DIR / f"{name}.s"
    objects = [tmp / f"{name}.o"]
    _run(["as", "--64", "-I", str(SRC_DIR), "-o", str(objects[0]), str(source)], f"assembling {source.name}")
    for c_name in C_SOURCES.get(name, ()):
        c_source = SRC_DIR / c_name
        objects.append(tmp / (c_name.replace("/", "_") + ".o"))
        compile_ = ["gcc", *_CC_FLAGS, "-I", str(SRC_DIR), "-o", str(objects[-1]), str(c_source)]
        _run(compile_, f"compiling {c_name}")
    elf64 = tmp / f"{name}.elf64"
    link = ["ld", "-m", "elf_x86_64", "-n", "-z", "noexecstack", "-T", str(SRC_DIR / C_LINKER_SCRIPT)]
    _run([*link, "-o", str(elf64), *map(str, objects)], f"linking {out.name}")
    _run(["objcopy", "-O", "elf32-i386", str(elf64), str(out)], f"converting {out.name} to ELF32")


def image_path(name: str) -> Path:
    """Path of guest ``name``'s image, (re)building it if missing or stale.

    Raises :class:`GuestBuildError` if binutils is missing or the build fails,
    and :class:`ValueError` for an unknown guest.
    """
    image = _output_path(name)
    if not _is_fresh(image, guest_sources(name)):
        _build(name, image)
    return image


def build_all() -> dict[str, Path]:
    """Build (if needed) every guest; returns name -> image path."""
    return {name: image_path(name) for name in GUESTS}
