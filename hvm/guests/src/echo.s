# echo.s - console input: echo what arrives on COM1 until a 'q'.
#
# Polls the line status register's Data Ready bit (LSR bit 0) and reads the
# receive buffer register, as a polled driver does; each byte is written back
# in upper case so a test can tell echo from input.  On 'q' it prints
# "echo done N" (N bytes seen before the 'q') and exits with value 0.

        .include "lib.inc"

        .equ UART_RBR,  0               # receive buffer register (read, DLAB = 0)
        .equ LSR_DR,    1 << 0          # data ready

        .text
main:
        call    serial_init
        mov     esi, OFFSET msg_ready
        call    puts
        xor     ebx, ebx                # EBX = bytes echoed
1:
        mov     dx, COM1_PORT + UART_LSR
2:
        in      al, dx
        test    al, LSR_DR
        jz      2b
        mov     dx, COM1_PORT + UART_RBR
        in      al, dx
        cmp     al, 'q'
        je      3f
        cmp     al, 'a'                 # lower case -> upper case
        jb      4f
        cmp     al, 'z'
        ja      4f
        sub     al, 'a' - 'A'
4:
        call    putc
        inc     ebx
        jmp     1b
3:
        call    newline
        RETURN_DONE msg_done            # "echo done N\n", exit value 0

        .section .rodata
msg_ready:      .asciz "echo ready\n"
msg_done:       .asciz "echo done "
