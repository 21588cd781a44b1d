"""KVM with the in-kernel irqchip ("kernel") or the VMM's local APIC in userspace ("user").

Expected behaviour comes from Documentation/virt/kvm/api.rst and <linux/kvm.h> (KVM_INTERRUPT,
kvm_run's request_interrupt_window / ready_for_interrupt_injection, KVM_EXIT_HLT without an
in-kernel local APIC) and from the SDM's local-APIC rules; the guest is exitmix, whose accesses
to the APIC page are fixed by its source (hvm/guests/src/exitmix.c).
"""

from __future__ import annotations

import re

import pytest

from hvm.errors import EngineUnavailable
from hvm.kvm import api as K
from hvm.vmm.machine import Machine, MachineConfig
from tests.conftest import QEMU, needs_kvm, needs_qemu

pytestmark = needs_kvm
SUMMARY = re.compile(rb"exitmix (.*)")
OK = "guest wrote 0x0 to isa-debug-exit"


def boot(irqchip: str, args: str, timeout: float = 60):
    from hvm import guests

    m = Machine(MachineConfig(engine="kvm", mem_size=32 << 20, console=lambda b: None,
                              engine_options={"irqchip": irqchip}))
    try:
        m.load(guests.image_path("exitmix"), append=args)
        result = m.run(timeout=timeout)
        lapic = m.lapic.counters() if m.lapic else None
    finally:
        m.close()
    match = SUMMARY.search(result.console)
    assert match, (result.reason, result.console)
    fields = dict(w.split("=", 1) for w in match.group(1).decode().split())
    return result, {k: int(v) if v.isdigit() else v for k, v in fields.items()}, lapic


def test_unknown_irqchip_is_refused_in_one_line() -> None:
    with pytest.raises(EngineUnavailable, match="unknown irqchip 'pic'.*kernel, user"):
        Machine(MachineConfig(engine="kvm", engine_options={"irqchip": "pic"}))


def test_kvm_interrupt_semantics_per_api_rst() -> None:
    """KVM_INTERRUPT: ENXIO with the in-kernel PIC; accepted without one; EINVAL above 255."""
    kernel = Machine(MachineConfig(engine="kvm", mem_size=2 << 20, console=lambda b: None))
    try:
        assert kernel.lapic is None and not kernel.engine.userspace_lapic
        with pytest.raises(K.KvmError) as exc:
            kernel.engine.vcpu.interrupt(0x40)
        assert exc.value.errno == 6  # ENXIO
    finally:
        kernel.close()
    user = Machine(MachineConfig(engine="kvm", mem_size=2 << 20, console=lambda b: None,
                                 engine_options={"irqchip": "user"}))
    try:
        assert user.lapic is not None and user.mmio.lookup(0xFEE0_0000 + 0xB0) == (user.lapic, 0xB0)
        with pytest.raises(K.KvmError) as exc:
            user.engine.vcpu.interrupt(256)  # KVM_NR_INTERRUPTS
        assert exc.value.errno == 22  # EINVAL
        user.engine.vcpu.interrupt(0x40)  # accepted (EEXIST is the split-irqchip case only)
    finally:
        user.close()


def test_user_irqchip_cpuid_hides_x2apic_and_tsc_deadline() -> None:
    m = Machine(MachineConfig(engine="kvm", mem_size=2 << 20, console=lambda b: None,
                              engine_options={"irqchip": "user"}))
    try:
        from hvm.kvm import structs as S

        buf = S.cpuid2_buffer(256)
        K._ioctl(m.engine.vcpu.fd, K.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        leaf1 = next(e for e in list(buf.entries)[: buf.nent] if e.function == 1)
        assert not leaf1.ecx & (1 << 21) and not leaf1.ecx & (1 << 24)
        assert leaf1.edx & (1 << 9)  # CPUID.01H:EDX[9]: an APIC is present (the VMM's)
    finally:
        m.close()


def test_user_irqchip_delivers_timer_ticks_and_self_ipis() -> None:
    """Every APIC access exits to userspace; every interrupt the guest handled was one KVM_INTERRUPT."""
    units, ipi = 20, 2
    result, out, lapic = boot("user", f"units={units} work=1000 io=0 sys=0 ipi={ipi} tick=1000000 halt=20")
    assert result.reason == OK and out["ipis"] == units * ipi and out["spurious"] == 0
    assert out["ticks"] >= 20
    # exitmix's APIC accesses: TPR, SVR, DCR, LVT timer, initial count, then per interrupt one EOI,
    # per self-IPI one ICR write, and the final LVT mask: all MMIO exits, none other reach the page.
    handled = out["ticks"] + out["ipis"]
    assert result.exits["mmio"] == 5 + handled + units * ipi + 1
    assert lapic["mmio_writes"] == result.exits["mmio"] and lapic["mmio_reads"] == 0
    counters = result.engine_counters
    assert counters["user_irqchip.injected"] == handled == lapic["acks"]
    assert counters["irq_injections"] >= handled  # the kernel's count of injections it performed
    # HLT without an in-kernel local APIC is KVM_EXIT_HLT (api.rst); each of the 20 idle HLTs woke on a tick
    assert result.exits["hlt"] == 20 == counters["halt_exits"]
    assert lapic["apic.self_ipi"] == units * ipi and lapic["apic.eoi"] == handled


def test_kernel_irqchip_same_guest_no_userspace_apic_exits() -> None:
    units, ipi = 20, 2
    result, out, lapic = boot("kernel", f"units={units} work=1000 io=0 sys=0 ipi={ipi} tick=1000000 halt=20")
    assert lapic is None and result.reason == OK and out["ipis"] == units * ipi and out["ticks"] >= 20
    assert "mmio" not in result.exits and "hlt" not in result.exits and "interrupt_window" not in result.exits
    assert result.engine_counters["halt_exits"] >= 20  # the kernel handled the HLTs itself


def test_user_irqchip_timer_period_follows_the_initial_count() -> None:
    """Initial count 2,000,000 at divide-by-1 on a 1 GHz APIC bus: a 2 ms period (SDM 11.5.4)."""
    result, out, _ = boot("user", "units=1 work=10 io=0 sys=0 tick=2000000 halt=25")
    assert out["ticks"] >= 25
    assert result.wall_s >= 25 * 0.002 * 0.8  # ticks never come faster than the period


GARBAGE = """
        .intel_syntax noprefix
        .code64
        mov     rax, 0xFEE00000
        mov     rcx, -1
        xor     edx, edx
1:      mov     [rax + rdx], ecx        # all ones into every register, in every width
        mov     [rax + rdx], cl
        mov     [rax + rdx], cx
        mov     [rax + rdx], rcx        # at 0xFFC this one crosses into the next page
        mov     ebx, [rax + rdx]
        mov     bl, [rax + rdx]
        add     edx, 4
        cmp     edx, 0x1000
        jne     1b
        sti
2:      hlt
        jmp     2b
"""


def test_user_irqchip_survives_garbage_on_the_apic_page_and_a_hlt_forever(tmp_path) -> None:
    """A guest that writes all ones everywhere on the APIC page, then halts with IF = 1 and no timer:
    every access is served (the one byte range past the page is an unhandled MMIO access), the halted
    vCPU sleeps in userspace and the run ends at its timeout."""
    import subprocess

    from hvm.boot import ImageFormat

    src, obj, binary = tmp_path / "g.s", tmp_path / "g.o", tmp_path / "g.bin"
    src.write_text(GARBAGE)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(obj), str(binary)], check=True)
    m = Machine(MachineConfig(engine="kvm", mem_size=8 << 20, console=lambda b: None,
                              engine_options={"irqchip": "user"}))
    try:
        m.load(binary.read_bytes(), fmt=ImageFormat.LONG)
        result = m.run(timeout=0.5)
        lapic = m.lapic.counters()
    finally:
        m.close()
    assert result.reason == "timeout" and result.exits["hlt"] == 1
    assert lapic["mmio_writes"] == 4 * 1024 and lapic["mmio_reads"] == 2 * 1024
    assert result.unhandled == {"mmio": 1} and lapic["acks"] == 0


# QEMU with its userspace local APIC (kernel-irqchip=off); its KVM paravirtual MSRs are switched off,
# because without an in-kernel APIC this host's KVM refuses to set one of them and QEMU aborts.
QEMU_PV_OFF = ",".join(f"-{f}" for f in (
    "kvm-pv-eoi", "kvmclock", "kvm-asyncpf", "kvm-steal-time", "kvm-pv-unhalt", "kvm-pv-ipi",
    "kvm-poll-control", "kvm-pv-sched-yield", "kvm-asyncpf-int", "kvmclock-stable-bit", "kvm-pv-tlb-flush"))


@needs_qemu
def test_apictick_prints_what_qemu_with_its_userspace_apic_prints() -> None:
    """The peer: QEMU -machine kernel-irqchip=off runs the same guest with its own userspace APIC."""
    import subprocess

    from hvm import guests

    image = guests.image_path("apictick")
    append = "n=20 ipis=20 hlt"
    proc = subprocess.run(
        [QEMU, "-accel", "kvm", "-machine", "pc,kernel-irqchip=off",
         "-cpu", f"host,-arch-capabilities,{QEMU_PV_OFF}", "-m", "32",
         "-kernel", str(image), "-append", append,
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none",
         "-nodefaults", "-no-reboot"], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    m = Machine(MachineConfig(engine="kvm", mem_size=32 << 20, console=lambda b: None,
                              engine_options={"irqchip": "user"}))
    try:
        m.load(image, append=append)
        result = m.run(timeout=60)
    finally:
        m.close()
    assert proc.returncode == 1, proc.stderr[-300:]  # isa-debug-exit value 0
    assert result.reason == OK and result.console == proc.stdout
    assert b"ticks 20 ipis 20 spurious 0" in result.console
