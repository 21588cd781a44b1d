# hello.s - the demo guest.
#
# Does a little of everything a simple kernel does at boot, so each step
# shows up as a different kind of VM exit:
#   * programs the COM1 UART like a real driver and prints a greeting,
#   * CPUID leaf 0 (vendor string) and leaf 1 (family/model/stepping),
#   * writes and reads back the UART scratch register,
#   * writes a POST code to port 0x80,
#   * prints the multiboot mem_upper and command line,
#   * says "bye" and exits through isa-debug-exit with value 0 (status 1).

        .include "lib.inc"

        .equ POST_CODE, 0x42

        .text
main:
        call    serial_init
        mov     esi, OFFSET msg_hello
        call    puts

        # CPUID leaf 0: the vendor string is EBX, EDX, ECX (in that order).
        xor     eax, eax
        cpuid
        mov     [vendor + 0], ebx
        mov     [vendor + 4], edx
        mov     [vendor + 8], ecx
        mov     esi, OFFSET msg_vendor
        call    puts
        mov     esi, OFFSET vendor
        call    puts
        call    newline

        # CPUID leaf 1, EAX: stepping [3:0], model [7:4], family [11:8],
        # extended model [19:16], extended family [27:20].
        mov     eax, 1
        cpuid
        mov     ebx, eax                # EBX = signature
        mov     esi, OFFSET msg_sig
        call    puts
        call    put_hex32

        mov     ecx, ebx                # ECX = family
        shr     ecx, 8
        and     ecx, 0x0F
        mov     edx, ebx                # EDX = model
        shr     edx, 4
        and     edx, 0x0F
        cmp     ecx, 0x06               # family 6 and 15 use the extended model
        je      1f
        cmp     ecx, 0x0F
        jne     2f
        mov     eax, ebx                # family 15 also adds the extended family
        shr     eax, 20
        and     eax, 0xFF
        add     ecx, eax
1:
        mov     eax, ebx
        shr     eax, 12                 # extended model [19:16] -> bits 7:4
        and     eax, 0xF0
        add     edx, eax
2:
        mov     esi, OFFSET msg_family
        call    puts
        mov     eax, ecx
        call    put_hex
        mov     esi, OFFSET msg_model
        call    puts
        mov     eax, edx
        call    put_hex
        mov     esi, OFFSET msg_stepping
        call    puts
        mov     eax, ebx
        and     eax, 0x0F
        call    put_hex
        call    newline

        # UART scratch register: plain storage, must read back what we wrote.
        mov     dx, COM1_PORT + UART_SCR
        mov     al, 0x5A
        out     dx, al
        in      al, dx
        cmp     al, 0x5A
        jne     3f
        mov     al, 0xA5
        out     dx, al
        in      al, dx
        cmp     al, 0xA5
        jne     3f
        mov     esi, OFFSET msg_scratch_ok
        jmp     4f
3:
        mov     esi, OFFSET msg_scratch_fail
4:
        call    puts

        # POST code: the port-0x80 write firmware uses for progress/delays.
        mov     al, POST_CODE
        out     POST_PORT, al
        mov     esi, OFFSET msg_post
        call    puts

        # Multiboot information.
        mov     esi, OFFSET msg_mem
        call    puts
        call    mem_upper
        cmp     eax, -1
        je      5f
        call    put_dec
        mov     esi, OFFSET msg_kib
        jmp     6f
5:
        mov     esi, OFFSET msg_unknown
6:
        call    puts

        mov     esi, OFFSET msg_cmdline
        call    puts
        call    cmdline
        test    esi, esi
        jnz     7f
        mov     esi, OFFSET msg_none
7:
        call    puts
        call    newline

        mov     esi, OFFSET msg_bye
        call    puts
        xor     eax, eax                # exit value 0: QEMU status 1
        ret

        .section .rodata
msg_hello:        .asciz "Hello from hvm guest!\n"
msg_vendor:       .asciz "cpu vendor: "
msg_sig:          .asciz "cpu signature: "
msg_family:       .asciz " family "
msg_model:        .asciz " model "
msg_stepping:     .asciz " stepping "
msg_scratch_ok:   .asciz "scratch ok\n"
msg_scratch_fail: .asciz "scratch FAIL\n"
msg_post:         .asciz "post code 0x42 written to port 0x80\n"
msg_mem:          .asciz "mem_upper: "
msg_kib:          .asciz " KiB\n"
msg_unknown:      .asciz "unknown\n"
msg_cmdline:      .asciz "cmdline: "
msg_none:         .asciz "(none)"
msg_bye:          .asciz "bye\n"

        .data
vendor:           .skip 12
                  .byte 0               # NUL terminator
