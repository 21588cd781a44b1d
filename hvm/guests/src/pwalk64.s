# pwalk64.s - a cold random-access guest for the page-walk experiment (64-bit code).
#
# A flat binary loaded at 0x100000 and entered in 64-bit mode with paging already on: the
# loader (hvm/lab/page_walk.py) builds the page tables of the paging depth and page size under
# test and passes the region in registers:
#   RDI = linear base of the region, RSI = number of 4-KiB pages in it minus 1 (a power of two
#   minus 1), RCX = number of accesses, RBX = seed.
# Each access reads one quadword at a pseudo-random page of the region (a 64-bit LCG, Knuth's
# MMIX constants; bits 63:33 of the state pick the page), so almost every access touches a page
# not touched before: a TLB miss per access once the region outgrows the TLB.
# It then writes 0 to isa-debug-exit (port 0xF4) and halts. No stack, no memory but the region.
# Runs at CPL 0 or CPL 3 (with IOPL 3 for the OUT).

        .code64
        .include "lib/flat.inc"          # EXIT_PORT, EXIT0_HALT

        .text
        .globl start
start:
        mov     rax, rbx
        movabs  r8, 6364136223846793005
        movabs  r9, 1442695040888963407
        xor     r10, r10
1:
        imul    rax, r8
        add     rax, r9
        mov     rdx, rax
        shr     rdx, 33
        and     rdx, rsi
        shl     rdx, 12
        add     r10, [rdi + rdx]
        dec     rcx
        jnz     1b
        EXIT0_HALT

        .section .note.GNU-stack, "", @progbits
