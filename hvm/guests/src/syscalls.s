# syscalls.s - N "system calls", each writing IA32_TSC_AUX as a kernel's syscall path does.
#
# Reads n=N from the command line (default 10000).  The guest stays at CPL 0 (on
# KVM-on-PVM hosts INT n and 32-bit IRET cannot run at CPL 0, so there is no ring
# switch): each iteration i = 1..N does what a kernel's system-call entry does with
# IA32_TSC_AUX (C0000103H), the MSR RDTSCP returns in ECX (per-CPU data, e.g. Linux's
# CPU/node number): WRMSR with ECX = C0000103H, EAX = i, EDX = 0.
# Then it prints "rdtscp yes" or "rdtscp no" (CPUID.80000001H:EDX[27]) and the value the
# guest now sees in IA32_TSC_AUX: "tsc_aux V", by RDTSCP if CPUID has it, else by RDMSR.
# After a correct run V == N.  Last it prints "syscalls done N" and exits with value 0.

        .include "lib.inc"

        .equ DEFAULT_N, 10000
        .equ MSR_TSC_AUX, 0xC0000103

        .text
main:
        mov     eax, DEFAULT_N
        call    arg_n
        mov     ebx, eax                # EBX = N
        xor     esi, esi                # ESI = i
        test    ebx, ebx
        jz      2f
1:
        inc     esi
        mov     ecx, MSR_TSC_AUX        # the "system call": the entry path sets TSC_AUX
        mov     eax, esi
        xor     edx, edx
        wrmsr
        cmp     esi, ebx
        jne     1b
2:
        push    ebx                     # CPUID overwrites EBX (N)
        xor     edi, edi                # EDI = 1 if RDTSCP exists
        mov     eax, 0x80000000
        cpuid
        cmp     eax, 0x80000001
        jb      3f
        mov     eax, 0x80000001
        cpuid
        bt      edx, 27                 # RDTSCP
        adc     edi, 0
3:
        pop     ebx
        mov     esi, OFFSET msg_rdtscp_no
        test    edi, edi
        jz      4f
        mov     esi, OFFSET msg_rdtscp_yes
4:
        call    puts
        test    edi, edi
        jz      5f
        rdtscp                          # ECX = IA32_TSC_AUX
        mov     eax, ecx
        jmp     6f
5:
        mov     ecx, MSR_TSC_AUX
        rdmsr                           # EAX = IA32_TSC_AUX (low half)
6:
        mov     esi, OFFSET msg_aux
        call    puts
        call    put_dec
        call    newline
        RETURN_DONE msg_done            # "syscalls done N\n", exit value 0

        .section .rodata
msg_rdtscp_yes: .asciz "rdtscp yes\n"
msg_rdtscp_no:  .asciz "rdtscp no\n"
msg_aux:        .asciz "tsc_aux "
msg_done:       .asciz "syscalls done "
