# tscread.s - reads the time-stamp counter and hands each value to the VMM.
#
# Reads n=N from the command line (default 4).  N times: RDTSC, then a 32-bit
# OUT of EAX (low half) to TSCREAD_PORT and of EDX (high half) to
# TSCREAD_PORT + 4.  If CPUID.80000001H:EDX[27] says RDTSCP exists, N more
# reads with RDTSCP, reported at TSCREAD_PORT + 8 (low) and + 12 (high).
# Then prints "tscread done N" and exits with value 0 (QEMU status 1).
# The VMM (hvm.lab.tsc) compares every value with the host TSC it came from.

        .include "lib.inc"

        .equ DEFAULT_N, 4
        .equ TSCREAD_PORT, 0x530

        .text
main:
        mov     eax, DEFAULT_N
        call    arg_n
        mov     ebx, eax                # EBX = N, kept for the message
        mov     ecx, eax
        test    ecx, ecx
        jz      2f
1:
        rdtsc                           # EDX:EAX, so the port number goes in DX afterwards
        mov     edi, edx
        mov     dx, TSCREAD_PORT
        out     dx, eax                 # low half
        mov     eax, edi
        mov     dx, TSCREAD_PORT + 4
        out     dx, eax                 # high half
        dec     ecx
        jnz     1b
2:
        push    ebx                     # CPUID overwrites EBX (N)
        mov     eax, 0x80000000         # is leaf 80000001H there?
        cpuid
        cmp     eax, 0x80000001
        jb      5f
        mov     eax, 0x80000001
        cpuid
        pop     ebx
        bt      edx, 27                 # RDTSCP
        jnc     4f
        mov     ecx, ebx
        test    ecx, ecx
        jz      4f
3:
        mov     esi, ecx                # RDTSCP overwrites ECX (IA32_TSC_AUX)
        rdtscp
        mov     edi, edx
        mov     dx, TSCREAD_PORT + 8
        out     dx, eax
        mov     eax, edi
        mov     dx, TSCREAD_PORT + 12
        out     dx, eax
        mov     ecx, esi
        dec     ecx
        jnz     3b
        jmp     4f
5:
        pop     ebx
4:
        RETURN_DONE msg_done            # "tscread done N\n", exit value 0

        .section .rodata
msg_done:       .asciz "tscread done "
