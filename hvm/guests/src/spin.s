# spin.s - a CPU-bound loop with no exits, for engine benchmarks.
#
# Reads n=N from the command line (default 1000000) and runs N iterations of
# a 5-instruction, register-only loop body.  Then prints "spin done" and exits
# with value 0 (QEMU status 1).

        .include "lib.inc"

        .equ DEFAULT_N, 1000000

        .text
main:
        mov     eax, DEFAULT_N
        call    arg_n
        mov     ecx, eax
        test    ecx, ecx
        jz      2f
        xor     eax, eax
        xor     ebx, ebx
1:                                      # 5 instructions, registers only
        add     eax, ecx
        xor     ebx, eax
        rol     ebx, 1
        dec     ecx
        jnz     1b
2:
        mov     esi, OFFSET msg_done
        call    puts
        xor     eax, eax
        ret

        .section .rodata
msg_done:       .asciz "spin done\n"
