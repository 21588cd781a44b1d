# exitmix.s - the assembly half of the exit-rate experiment's guest (exitmix.c is the rest).
#
# Assembled with `as --64` like iobench.s, with the same boot path (lib/long64.inc):
# lib.inc's 32-bit multiboot entry calls `main`, which identity-maps 4 GiB with 2 MiB
# supervisor pages, enters long mode and calls the 64-bit C entry `exitmix_main` at
# ring 0.  The guest stays at ring 0 (its "system calls" write IA32_TSC_AUX, a ring-0
# instruction).
#
# Besides the boot path this file holds the interrupt and exception handlers the C side
# puts in its IDT:
#   * vectors 0-31 (stubs from lib/long64.inc): report through `exitmix_fault` and stop,
#   * vector 0x40 (local APIC timer) and 0x41 (self-IPI): count the interrupt in
#     `exitmix_ticks` / `exitmix_ipis` and signal end of interrupt (a write of 0 to the
#     local APIC's EOI register at FEE000B0H, SDM Vol. 3A 11.8.5), then IRETQ,
#   * vector 0xFF (the spurious vector programmed in the SVR): IRETQ, no EOI
#     (SDM Vol. 3A 11.9: a spurious interrupt is not in service).

        .include "lib/long64.inc"       # and lib.inc; leaves .intel_syntax noprefix on

        .equ LAPIC_EOI,          0xFEE000B0

        LONG64_MAIN exitmix_main, user=0
        LONG64_ISR_STUBS exitmix_isr_common

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
exitmix_isr_common:
        cld
        mov     rdi, rsp                # exitmix_fault(frame), does not return
        and     rsp, -16
        call    exitmix_fault
        jmp     long64_halt

# ------------------------------------------------------------ interrupts

# An interrupt handler that counts in `counter` and signals end of interrupt.
        .macro COUNT_AND_EOI name, counter
        .globl \name
\name:
        push    rax
        lock inc qword ptr [rip + \counter]
        mov     eax, LAPIC_EOI
        mov     dword ptr [rax], 0
        pop     rax
        iretq
        .endm

        COUNT_AND_EOI exitmix_timer_isr, exitmix_ticks
        COUNT_AND_EOI exitmix_ipi_isr, exitmix_ipis

        .globl exitmix_spurious_isr
exitmix_spurious_isr:
        lock inc qword ptr [rip + exitmix_spurious]
        iretq

# -------------------------------------------------------------------- data

        .data
        .balign 8
        .globl exitmix_ticks, exitmix_ipis, exitmix_spurious
exitmix_ticks:    .quad 0
exitmix_ipis:     .quad 0
exitmix_spurious: .quad 0

        .text
