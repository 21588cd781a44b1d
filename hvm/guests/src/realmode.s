# realmode.s - a 512-byte boot sector in 16-bit real mode.
#
# Not multiboot: a flat binary loaded at 0x7C00 and entered with
# CS:IP = 0000:7C00 (what a PC BIOS does with a boot sector; QEMU boots it with
# `-drive file=realmode.bin,format=raw`).  Prints "real mode ok\n" on COM1 and
# exits through isa-debug-exit with value 0 (QEMU status 1).
#
# Built with `as --32` (.code16 below) and
# `ld -m elf_i386 -Ttext 0x7c00 --oformat binary`.

        .code16
        .include "lib/flat.inc"          # ports, EXIT0_HALT, PUTS_LOOP, FLAT_PUTC

        .text
        .globl start
start:
        cli
        xor     ax, ax                  # flat segments: DS = ES = SS = 0
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, 0x7C00              # stack grows down below the boot sector
        jmp     0:1f                    # some BIOSes enter at 07C0:0000; make CS = 0
1:
        cld
        mov     si, OFFSET msg
        PUTS_LOOP
        EXIT0_HALT cli=1

        FLAT_PUTC ax, dx

msg:    .asciz "real mode ok\n"

        .org 510                        # pad the sector...
        .byte 0x55, 0xAA                # ...and end it with the boot signature

        .section .note.GNU-stack, "", @progbits
