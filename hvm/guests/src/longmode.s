# longmode.s - a flat 64-bit guest.
#
# Not multiboot: a flat binary loaded at 0x100000 and entered at its first
# byte in 64-bit long mode, with paging identity-mapping the first 4 GiB; the
# VMM sets that up.  Prints "long mode ok\n" on COM1 and exits through
# isa-debug-exit with value 0 (QEMU status 1).
#
# The stack lives inside the image, so the loader only has to copy the file.
# Built with `as --32` (.code64 below) and
# `ld -m elf_i386 -Ttext 0x100000 --oformat binary`.

        .code64
        .include "lib/flat.inc"          # ports, EXIT0_HALT, PUTS_LOOP, FLAT_PUTC

        .text
        .globl start
start:
        cli
        cld
        lea     rsp, [rip + stack_top]
        lea     rsi, [rip + msg]
        PUTS_LOOP
        EXIT0_HALT cli=1

        FLAT_PUTC rax, rdx

msg:    .asciz "long mode ok\n"

        .balign 16
stack:  .fill 512, 1, 0
stack_top:

        .section .note.GNU-stack, "", @progbits
