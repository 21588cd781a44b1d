# outloop.s - N port writes, each one a trip to the VMM's userspace.
#
# Reads n=N from the command line (default 1000) and writes N bytes to
# OUTLOOP_PORT (0x500), where no in-kernel device lives, so under KVM every
# write is a KVM_EXIT_IO back to the VMM.  Then prints "outloop done N" and
# exits with value 0 (QEMU status 1).

        .include "lib.inc"

        .equ DEFAULT_N, 1000

        .text
main:
        mov     eax, DEFAULT_N
        call    arg_n
        mov     ebx, eax                # EBX = N, kept for the message
        mov     ecx, eax
        mov     dx, OUTLOOP_PORT
        test    ecx, ecx
        jz      2f
1:                                      # the loop: mov/out/dec/jnz
        mov     al, cl
        out     dx, al
        dec     ecx
        jnz     1b
2:
        RETURN_DONE msg_done            # "outloop done N\n", exit value 0

        .section .rodata
msg_done:       .asciz "outloop done "
