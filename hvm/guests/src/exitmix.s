# exitmix.s - the assembly half of the exit-rate experiment's guest (exitmix.c is the rest).
#
# Assembled with `as --64` like iobench.s, whose boot path it copies: lib.inc's 32-bit
# multiboot entry calls `main`, which identity-maps 4 GiB with 2 MiB pages, enters long
# mode and calls the 64-bit C entry `exitmix_main` at ring 0.  The guest stays at ring 0
# (its "system calls" write IA32_TSC_AUX, a ring-0 instruction).
#
# Besides the boot path this file holds the interrupt and exception stubs the C side puts
# in its IDT:
#   * vectors 0-31: report through `exitmix_fault` and stop,
#   * vector 0x40 (local APIC timer) and 0x41 (self-IPI): count the interrupt in
#     `exitmix_ticks` / `exitmix_ipis` and signal end of interrupt (a write of 0 to the
#     local APIC's EOI register at FEE000B0H, SDM Vol. 3A 11.8.5), then IRETQ,
#   * vector 0xFF (the spurious vector programmed in the SVR): IRETQ, no EOI
#     (SDM Vol. 3A 11.9: a spurious interrupt is not in service).

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
        .equ LAPIC_EOI,          0xFEE000B0
        .equ EXITMIX_STACK_SIZE, 16384

        .text
main:
        call    serial_init
        call    mem_upper               # EAX = KiB above 1 MiB, or -1
        mov     [boot_mem_upper], eax
        call    cmdline                 # ESI = command line, or 0
        mov     [boot_cmdline], esi

        # PML4[0] -> PDPT; PDPT[0..3] -> 4 page directories; 2048 x 2 MiB = 4 GiB.
        mov     dword ptr [pml4], OFFSET pdpt + PTE_P_RW
        mov     edi, OFFSET pdpt
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
        mov     eax, OFFSET pml4
        mov     cr3, eax
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_LME
        wrmsr
        lgdt    [exitmix_gdt_descriptor]
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
        lea     rsp, [rip + exitmix_stack_top]
        mov     edi, [rip + boot_cmdline]       # exitmix_main(cmdline, mem_upper)
        mov     esi, [rip + boot_mem_upper]
        call    exitmix_main                    # does not return
        jmp     exitmix_halt

# ------------------------------------------------------------ exceptions

# Vectors that push an error code (SDM Vol. 3A, 6.13); the others get a 0.
        .macro ISR vec
exitmix_isr_\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        push    0
        .endif
        push    \vec
        jmp     exitmix_isr_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        ISR     \v
        .endr

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
exitmix_isr_common:
        cld
        mov     rdi, rsp                # exitmix_fault(frame), does not return
        and     rsp, -16
        call    exitmix_fault
        .globl exitmix_halt
exitmix_halt:
        cli
        hlt
        jmp     exitmix_halt

# ------------------------------------------------------------ interrupts

        .globl exitmix_timer_isr
exitmix_timer_isr:
        push    rax
        lock inc qword ptr [rip + exitmix_ticks]
        mov     eax, LAPIC_EOI
        mov     dword ptr [rax], 0
        pop     rax
        iretq

        .globl exitmix_ipi_isr
exitmix_ipi_isr:
        push    rax
        lock inc qword ptr [rip + exitmix_ipis]
        mov     eax, LAPIC_EOI
        mov     dword ptr [rax], 0
        pop     rax
        iretq

        .globl exitmix_spurious_isr
exitmix_spurious_isr:
        lock inc qword ptr [rip + exitmix_spurious]
        iretq

        .section .rodata
        .balign 8
        .globl exitmix_isr_table
exitmix_isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   exitmix_isr_\v
        .endr

# -------------------------------------------------------------------- data

        .data
        .balign 16
exitmix_gdt:
        .quad 0                         # 0x00: null
        .quad 0x00AF9A000000FFFF        # 0x08: code, 64-bit (L), DPL0
        .quad 0x00CF92000000FFFF        # 0x10: data, DPL0
exitmix_gdt_end:
exitmix_gdt_descriptor:
        .word exitmix_gdt_end - exitmix_gdt - 1
        .quad exitmix_gdt               # lgdt in 32-bit mode reads the low 4 bytes

boot_cmdline:   .long 0
boot_mem_upper: .long 0
        .balign 8
        .globl exitmix_ticks, exitmix_ipis, exitmix_spurious
exitmix_ticks:    .quad 0
exitmix_ipis:     .quad 0
exitmix_spurious: .quad 0

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4 * 4096
        .balign 16
exitmix_stack:
        .skip EXITMIX_STACK_SIZE
        .globl exitmix_stack_top
exitmix_stack_top:

        .text
