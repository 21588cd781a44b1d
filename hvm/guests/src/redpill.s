# redpill.s - does this kernel run on real hardware? Four probes with unprivileged instructions.
#
# Each probe compares what an unprivileged ("sensitive but not privileged", Robin & Irvine,
# USENIX Security 2000) instruction shows with what the kernel knows to be true:
#
#   sgdt  the GDTR base and limit against the GDT lib.inc loaded (LGDT in _start);
#   sidt  the IDTR against an IDT this guest loads with LIDT;
#   smsw  CR0's low 16 bits against MOV from CR0 (privileged: a hypervisor answers it);
#   popf  IF after POPF of a flags image with IF = 1, taken with PUSHF right after STI.
#
# Under ring deprivileging (the guest kernel at CPL 3, hvm's `trap` engine) none of the four
# traps: SGDT/SIDT show the hypervisor's own tables, SMSW the real CR0, and POPF at CPL 3 with
# IOPL 0 leaves IF alone without a fault. Under VT-x the kernel runs at its own ring 0 in VMX
# non-root operation, with its own GDTR/IDTR, and a CR0 read shadow answers SMSW.
#
# Prints one evidence line per probe, then "redpill: virtualized (N of 4 probes)" or
# "redpill: not detected", and exits through isa-debug-exit with value 0.

        .include "lib.inc"

        .equ EFLAGS_IF,         1 << 9

        .text
main:
        call    serial_init
        xor     ebp, ebp                # EBP = probes that found a difference

        # --- SGDT ----------------------------------------------------------------------------
        sgdt    [table]
        mov     esi, OFFSET m_sgdt
        call    puts
        mov     eax, [table + 2]
        call    put_hex32
        mov     esi, OFFSET m_limit
        call    puts
        movzx   eax, word ptr [table]
        call    put_hex
        mov     esi, OFFSET m_own_gdt
        call    puts
        mov     eax, OFFSET gdt
        call    put_hex32
        mov     eax, [table + 2]
        cmp     eax, OFFSET gdt
        jne     1f
        cmp     word ptr [table], gdt_end - gdt - 1
        jne     1f
        call    same
        jmp     2f
1:
        call    differs
2:
        # --- SIDT ----------------------------------------------------------------------------
        lidt    [idt_descriptor]
        sidt    [table]
        mov     esi, OFFSET m_sidt
        call    puts
        mov     eax, [table + 2]
        call    put_hex32
        mov     esi, OFFSET m_limit
        call    puts
        movzx   eax, word ptr [table]
        call    put_hex
        mov     esi, OFFSET m_own_idt
        call    puts
        mov     eax, OFFSET idt
        call    put_hex32
        mov     eax, [table + 2]
        cmp     eax, OFFSET idt
        jne     1f
        cmp     word ptr [table], idt_end - idt - 1
        jne     1f
        call    same
        jmp     2f
1:
        call    differs
2:
        # --- SMSW against MOV from CR0 -------------------------------------------------------
        smsw    ebx
        mov     ecx, cr0
        mov     esi, OFFSET m_smsw
        call    puts
        movzx   eax, bx
        call    put_hex
        mov     esi, OFFSET m_cr0
        call    puts
        mov     eax, ecx
        call    put_hex32
        cmp     bx, cx
        jne     1f
        call    same
        jmp     2f
1:
        call    differs
2:
        # --- POPF: restore IF = 1 after CLI --------------------------------------------------
        sti
        pushfd                          # IF = 1 in the image
        cli
        popfd                           # at CPL 0 this sets IF again
        pushfd
        cli
        pop     ebx
        mov     esi, OFFSET m_popf
        call    puts
        mov     eax, ebx
        shr     eax, 9
        and     eax, 1
        call    put_dec
        test    ebx, EFLAGS_IF
        jz      1f
        call    same
        jmp     2f
1:
        call    differs
2:
        # --- verdict ---------------------------------------------------------------------------
        test    ebp, ebp
        jz      3f
        mov     esi, OFFSET m_virtualized
        call    puts
        mov     eax, ebp
        call    put_dec
        mov     esi, OFFSET m_of4
        call    puts
        jmp     4f
3:
        mov     esi, OFFSET m_not_detected
        call    puts
4:
        xor     eax, eax
        ret

same:
        mov     esi, OFFSET m_same
        jmp     puts

differs:
        inc     ebp
        mov     esi, OFFSET m_differs
        jmp     puts

        .section .rodata
m_sgdt:         .asciz "redpill: sgdt base="
m_sidt:         .asciz "redpill: sidt base="
m_limit:        .asciz " limit="
m_own_gdt:      .asciz ", own GDT at "
m_own_idt:      .asciz ", own IDT at "
m_smsw:         .asciz "redpill: smsw="
m_cr0:          .asciz ", mov from cr0="
m_popf:         .asciz "redpill: popf of an image with IF=1 left IF="
m_same:         .asciz " -> same\n"
m_differs:      .asciz " -> differs\n"
m_virtualized:  .asciz "redpill: virtualized ("
m_of4:          .asciz " of 4 probes)\n"
m_not_detected: .asciz "redpill: not detected\n"

        .data
        .balign 8
table:  .skip 8                         # SGDT/SIDT store 6 bytes here
idt_descriptor:
        .word idt_end - idt - 1
        .long idt
        .balign 8
idt:    .skip 32 * 8                    # never used: the probes raise no interrupt
idt_end:
