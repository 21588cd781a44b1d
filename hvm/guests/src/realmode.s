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
        .intel_syntax noprefix

        .equ COM1_PORT,   0x3F8
        .equ UART_THR,    0
        .equ UART_LSR,    5
        .equ LSR_THRE,    1 << 5
        .equ EXIT_PORT,   0xF4

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
2:
        lodsb
        test    al, al
        jz      3f
        call    putc
        jmp     2b
3:
        mov     dx, EXIT_PORT
        xor     eax, eax                # exit value 0
        out     dx, eax
4:
        cli
        hlt
        jmp     4b

# putc: write AL to COM1 once the transmit holding register is empty.
putc:
        push    ax
        push    dx
        mov     dx, COM1_PORT + UART_LSR
1:
        in      al, dx
        test    al, LSR_THRE
        jz      1b
        pop     dx
        pop     ax
        push    dx
        mov     dx, COM1_PORT + UART_THR
        out     dx, al
        pop     dx
        ret

msg:    .asciz "real mode ok\n"

        .org 510                        # pad the sector...
        .byte 0x55, 0xAA                # ...and end it with the boot signature

        .section .note.GNU-stack, "", @progbits
