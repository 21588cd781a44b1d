# ctxsw.s - the assembly half of the context-switch guest (ctxsw.c is the rest).
#
# Assembled with `as --64`: lib.inc (multiboot header, `_start`, COM1 and
# command-line helpers) is 32-bit code, included under .code32; `main`, called
# by `_start` in 32-bit protected mode, identity-maps the first 4 GiB with 2 MiB
# pages (supervisor-only), turns on PAE, EFER.LME and paging, and calls the
# 64-bit C entry point `ctxsw_main(cmdline)` at ring 0, which never returns.
# 64-bit because on this project's KVM host 32-bit paging triple-faults.
#
# Also here: exception stubs for vectors 0-31 that save the caller-saved
# registers, call `ctxsw_trap(frame)` (frame: vector, error code, RIP, CS,
# RFLAGS, RSP, SS) and, when it returns, resume the guest with IRETQ; the GDT,
# the stack and the kernel's page tables (`ctxsw_pml4` -> `ctxsw_pdpt`).

        .code32
        .include "lib.inc"              # leaves .intel_syntax noprefix on

        .equ KCODE_SEL,          0x08    # 64-bit code, DPL0
        .equ KDATA_SEL,          0x10    # data, DPL0
        .equ MSR_EFER,           0xC0000080
        .equ EFER_LME,           1 << 8
        .equ CR0_PG,             1 << 31
        .equ CR4_PAE,            1 << 5
        .equ PTE_P_RW,           0x3
        .equ PDE_2M_P_RW,        0x83    # present, writable, 2 MiB page
        .equ CTXSW_STACK_SIZE,   16384

        .text
main:
        call    serial_init
        call    cmdline                 # ESI = command line, or 0
        mov     [boot_cmdline], esi

        # PML4[0] -> PDPT; PDPT[0..3] -> 4 page directories; 2048 x 2 MiB = 4 GiB.
        mov     dword ptr [ctxsw_pml4], OFFSET ctxsw_pdpt + PTE_P_RW
        mov     edi, OFFSET ctxsw_pdpt
        mov     eax, OFFSET pds + PTE_P_RW
        mov     ecx, 4
1:
        mov     [edi], eax
        add     eax, 4096
        add     edi, 8
        dec     ecx
        jnz     1b
        mov     edi, OFFSET pds
        mov     eax, PDE_2M_P_RW
        xor     edx, edx                # bits 63..32 of the entry
        mov     ecx, 2048
2:
        mov     [edi], eax
        mov     [edi + 4], edx
        add     eax, 0x200000
        adc     edx, 0
        add     edi, 8
        dec     ecx
        jnz     2b

        mov     eax, cr4
        or      eax, CR4_PAE
        mov     cr4, eax
        mov     eax, OFFSET ctxsw_pml4
        mov     cr3, eax
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_LME
        wrmsr
        lgdt    [ctxsw_gdt_descriptor]
        mov     eax, cr0
        or      eax, CR0_PG             # paging on: long mode (compatibility)
        mov     cr0, eax
        ljmp    KCODE_SEL, OFFSET long_entry

        .code64
long_entry:
        mov     ax, KDATA_SEL
        mov     ds, ax
        mov     es, ax
        mov     fs, ax
        mov     gs, ax
        mov     ss, ax
        lea     rsp, [rip + ctxsw_stack_top]
        mov     edi, [rip + boot_cmdline]       # ctxsw_main(cmdline)
        call    ctxsw_main                      # does not return
        .globl ctxsw_halt
ctxsw_halt:
        cli
        hlt
        jmp     ctxsw_halt

# ------------------------------------------------------------ exceptions

# Vectors that push an error code (SDM Vol. 3A, 6.13); the others get a 0.
        .macro ISR vec
ctxsw_isr_\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        push    0
        .endif
        push    \vec
        jmp     ctxsw_isr_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        ISR     \v
        .endr

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS (the CPU aligned RSP to 16
# before its pushes; 7 + 9 quadwords keep it aligned for the call).
ctxsw_isr_common:
        push    rax
        push    rcx
        push    rdx
        push    rsi
        push    rdi
        push    r8
        push    r9
        push    r10
        push    r11
        cld
        lea     rdi, [rsp + 72]
        call    ctxsw_trap
        pop     r11
        pop     r10
        pop     r9
        pop     r8
        pop     rdi
        pop     rsi
        pop     rdx
        pop     rcx
        pop     rax
        add     rsp, 16                 # vector and error code
        iretq

        .section .rodata
        .balign 8
        .globl ctxsw_isr_table
ctxsw_isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   ctxsw_isr_\v
        .endr

# -------------------------------------------------------------------- data

        .data
        .balign 16
ctxsw_gdt:
        .quad 0                         # 0x00: null
        .quad 0x00AF9A000000FFFF        # 0x08: code, 64-bit (L), DPL0
        .quad 0x00CF92000000FFFF        # 0x10: data, DPL0
ctxsw_gdt_end:
ctxsw_gdt_descriptor:
        .word ctxsw_gdt_end - ctxsw_gdt - 1
        .quad ctxsw_gdt                 # lgdt in 32-bit mode reads the low 4 bytes

boot_cmdline:   .long 0

        .bss
        .balign 4096
        .globl ctxsw_pml4, ctxsw_pdpt
ctxsw_pml4:     .skip 4096
ctxsw_pdpt:     .skip 4096
pds:            .skip 4 * 4096
        .balign 16
ctxsw_stack:
        .skip CTXSW_STACK_SIZE
ctxsw_stack_top:
