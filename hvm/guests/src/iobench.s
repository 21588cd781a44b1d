# iobench.s - the assembly half of the I/O experiment's guest (iobench.c is the rest).
#
# Assembled with `as --64`: lib.inc (multiboot header, `_start`, COM1 and
# command-line helpers) is 32-bit code, included under .code32; lib/long64.inc's
# `main`, called by `_start` in 32-bit protected mode, maps 4 GiB with
# user-accessible 2 MiB pages (so ring 3 reaches RAM, the MMIO registers and the
# dirty-page doorbell at the same addresses as guest-physical), switches to long
# mode and calls the 64-bit C entry point `iobench_main`, which never returns.
#
# Why 64-bit: on this project's KVM host (KVM on PVM) guest code is executed by
# KVM's instruction emulator (~2M instructions/s) unless it is 64-bit ring-3
# code in long mode with paging; only that runs natively.  So the main loop must
# be 64-bit user code: long mode, page tables, and a way into ring 3 that KVM's
# emulator can execute (SYSEXIT; it cannot emulate a protected-mode IRET).
#
# This file provides:
#   * `iobench_enter_user(entry, stack)` (lib/long64.inc): IOPL = 3, IF = 0,
#     SYSEXIT to ring 3 (IRETQ where SYSEXIT is undefined in long mode),
#   * the exception path of vectors 0-31 (stubs from lib/long64.inc, installed by
#     the C side in its IDT): it reports through `iobench_fault`,
#   * `iobench_halt`, the handler of `int 0x80` (a DPL3 gate): after the exit
#     port write, ring 3 cannot `hlt`, so it asks ring 0 to halt forever,
#   * the ring-3 stack.

        .include "lib/long64.inc"       # and lib.inc; leaves .intel_syntax noprefix on

        .equ IOBENCH_USTACK_SIZE, 65536

        LONG64_MAIN iobench_main, user=1
        LONG64_ENTER_USER iobench
        LONG64_ISR_STUBS iobench_isr_common

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
iobench_isr_common:
        cld
        LONG64_SYSEXIT_FALLBACK iobench, 16
        mov     rdi, rsp                # iobench_fault(frame), does not return
        and     rsp, -16
        call    iobench_fault
        .globl iobench_halt
iobench_halt:                           # int 0x80: stop for good (ring 0)
        cli
        hlt
        jmp     iobench_halt

        .bss
        .balign 16
iobench_ustack:
        .skip IOBENCH_USTACK_SIZE
        .globl iobench_ustack_top
iobench_ustack_top:                     # ring 3

        .text
