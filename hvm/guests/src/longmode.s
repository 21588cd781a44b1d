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
        cld
        lea     rsp, [rip + stack_top]
        lea     rsi, [rip + msg]
1:
        lodsb
        test    al, al
        jz      2f
        call    putc
        jmp     1b
2:
        mov     dx, EXIT_PORT
        xor     eax, eax                # exit value 0
        out     dx, eax
3:
        cli
        hlt
        jmp     3b

# putc: write AL to COM1 once the transmit holding register is empty.
putc:
        push    rax
        push    rdx
        mov     dx, COM1_PORT + UART_LSR
1:
        in      al, dx
        test    al, LSR_THRE
        jz      1b
        pop     rdx
        pop     rax
        push    rdx
        mov     dx, COM1_PORT + UART_THR
        out     dx, al
        pop     rdx
        ret

msg:    .asciz "long mode ok\n"

        .balign 16
stack:  .fill 512, 1, 0
stack_top:

        .section .note.GNU-stack, "", @progbits
