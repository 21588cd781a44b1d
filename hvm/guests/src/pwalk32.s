# pwalk32.s - the cold random-access guest of pwalk64.s in 32-bit code (32-bit and PAE paging).
#
# A flat binary loaded at 0x100000 and entered in 32-bit protected mode with paging on; the
# loader passes EDI = linear base of the region, ESI = its 4-KiB pages minus 1 (a power of two
# minus 1), ECX = accesses, EBX = seed. Each access reads a dword at a pseudo-random page (a
# 32-bit LCG, Numerical Recipes' constants; bits 31:10 pick the page). Then 0 to isa-debug-exit.

        .code32
        .include "lib/flat.inc"          # EXIT_PORT, EXIT0_HALT

        .text
        .globl start
start:
        mov     eax, ebx
        xor     ebp, ebp
1:
        imul    eax, eax, 1664525
        add     eax, 1013904223
        mov     edx, eax
        shr     edx, 10
        and     edx, esi
        shl     edx, 12
        add     ebp, [edi + edx]
        dec     ecx
        jnz     1b
        EXIT0_HALT

        .section .note.GNU-stack, "", @progbits
