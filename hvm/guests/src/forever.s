# forever.s - never finishes, for timeout tests.
#
# Prints "looping", then spins on `jmp .` with interrupts off: no exits at all,
# only the host (a signal, a timer) can stop it.

        .include "lib.inc"

        .text
main:
        mov     esi, OFFSET msg
        call    puts
        jmp     .

        .section .rodata
msg:            .asciz "looping\n"
