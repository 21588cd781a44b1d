# iobench.s - the assembly half of the I/O experiment's guest (iobench.c is the rest).
#
# Assembled with `as --64`: lib.inc (multiboot header, `_start`, COM1 and
# command-line helpers) is 32-bit code, included under .code32; `main`, called
# by `_start` in 32-bit protected mode, switches to long mode and calls the
# 64-bit C entry point `iobench_main`, which never returns.
#
# Why 64-bit: on this project's KVM host (KVM on PVM) guest code is executed by
# KVM's instruction emulator (~2M instructions/s) unless it is 64-bit ring-3
# code in long mode with paging; only that runs natively.  So the main loop must
# be 64-bit user code: long mode, page tables, and a way into ring 3 that KVM's
# emulator can execute (SYSEXIT; it cannot emulate a protected-mode IRET).
#
# This file provides:
#   * `main` (32-bit): program COM1, fetch the command line and mem_upper, build
#     page tables identity-mapping 4 GiB with 2 MiB pages (user-accessible, so
#     ring 3 reaches RAM, the MMIO registers and the dirty-page doorbell at the
#     same addresses as guest-physical), enable PAE + EFER.LME + paging, load
#     the 64-bit GDT and jump to 64-bit code,
#   * `iobench_enter_user(entry, stack)`: IOPL = 3, IF = 0, SYSEXIT to ring 3;
#     where SYSEXIT is undefined in long mode (AMD CPUs, e.g. QEMU's default
#     qemu64 model) its #UD lands in the exception path, which enters ring 3
#     with IRETQ instead,
#   * exception stubs for vectors 0-31 (installed by the C side in its IDT):
#     they report through `iobench_fault`,
#   * `iobench_halt`, the handler of `int 0x80` (a DPL3 gate): after the exit
#     port write, ring 3 cannot `hlt`, so it asks ring 0 to halt forever,
#   * the GDT (the C side fills in the TSS descriptor), the ring-0 stack (also
#     TSS.rsp0), the ring-3 stack and the page tables.

        .code32
        .include "lib.inc"              # leaves .intel_syntax noprefix on

# GDT selectors.  SYSEXIT derives the ring-3 selectors from IA32_SYSENTER_CS
# (= KCODE_SEL): 64-bit CS = +32, SS = +40 (and for a 32-bit SYSEXIT CS = +16,
# SS = +24, which is why those slots hold 32-bit user segments).
        .equ KCODE_SEL,          0x08    # 64-bit code, DPL0
        .equ KDATA_SEL,          0x10    # data, DPL0
        .equ UCODE32_SEL,        0x18    # 32-bit code, DPL3 (unused)
        .equ UDATA32_SEL,        0x20    # data, DPL3 (unused)
        .equ UCODE_SEL,          0x28    # 64-bit code, DPL3
        .equ UDATA_SEL,          0x30    # data, DPL3
        .equ TSS_SEL,            0x38    # 64-bit TSS (16-byte descriptor)
        .equ RPL3,               3

        .equ MSR_EFER,           0xC0000080
        .equ EFER_LME,           1 << 8
        .equ MSR_SYSENTER_CS,    0x174
        .equ CR0_PG,             1 << 31
        .equ CR4_PAE,            1 << 5
        .equ PTE_P_RW_US,        0x7
        .equ PDE_2M_P_RW_US,     0x87    # present, writable, user, 2 MiB page
        .equ EFLAGS_IF,          1 << 9
        .equ EFLAGS_IOPL3,       3 << 12

        .equ IOBENCH_KSTACK_SIZE, 8192
        .equ IOBENCH_USTACK_SIZE, 65536

        .text
main:
        call    serial_init
        call    mem_upper               # EAX = KiB above 1 MiB, or -1
        mov     [boot_mem_upper], eax
        call    cmdline                 # ESI = command line, or 0
        mov     [boot_cmdline], esi

        # PML4[0] -> PDPT; PDPT[0..3] -> 4 page directories; 2048 x 2 MiB = 4 GiB.
        mov     dword ptr [pml4], OFFSET pdpt + PTE_P_RW_US
        mov     edi, OFFSET pdpt
        mov     eax, OFFSET pds + PTE_P_RW_US
        mov     ecx, 4
1:
        mov     [edi], eax
        add     eax, 4096
        add     edi, 8
        dec     ecx
        jnz     1b
        mov     edi, OFFSET pds
        mov     eax, PDE_2M_P_RW_US
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
        lgdt    [iobench_gdt_descriptor]
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
        lea     rsp, [rip + iobench_kstack_top]
        mov     edi, [rip + boot_cmdline]       # iobench_main(cmdline, mem_upper)
        mov     esi, [rip + boot_mem_upper]
        call    iobench_main                    # does not return
        jmp     iobench_halt

# iobench_enter_user(rdi = entry, rsi = stack): to ring 3, for good.
        .globl iobench_enter_user
iobench_enter_user:
        pushfq
        or      qword ptr [rsp], EFLAGS_IOPL3   # port I/O stays legal in ring 3
        and     qword ptr [rsp], ~EFLAGS_IF
        popfq
        mov     ecx, MSR_SYSENTER_CS
        mov     eax, KCODE_SEL
        xor     edx, edx
        wrmsr
        mov     ax, UDATA_SEL | RPL3
        mov     ds, ax
        mov     es, ax
        mov     fs, ax
        mov     gs, ax
        mov     rcx, rsi                # SYSEXIT: RSP = RCX, RIP = RDX,
        mov     rdx, rdi                # CS = UCODE_SEL | 3, SS = UDATA_SEL | 3
        .globl iobench_sysexit
iobench_sysexit:
        sysexitq

# ------------------------------------------------------------ exceptions

# Vectors that push an error code (SDM Vol. 3A, 6.13); the others get a 0.
        .macro ISR vec
iobench_isr_\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        push    0
        .endif
        push    \vec
        jmp     iobench_isr_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        ISR     \v
        .endr

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS.
iobench_isr_common:
        cld
        lea     rax, [rip + iobench_sysexit]
        cmp     [rsp + 16], rax
        jne     1f
        # SYSEXIT faulted (#UD: no SYSEXIT in long mode on AMD): RCX and RDX
        # still hold the ring-3 stack and entry point; IRETQ there instead.
        push    UDATA_SEL | RPL3        # SS
        push    rcx                     # RSP
        pushfq                          # RFLAGS: IOPL = 3 and IF = 0 already
        push    UCODE_SEL | RPL3        # CS
        push    rdx                     # RIP
        iretq
1:
        mov     rdi, rsp                # iobench_fault(frame), does not return
        and     rsp, -16
        call    iobench_fault
        .globl iobench_halt
iobench_halt:                           # int 0x80: stop for good (ring 0)
        cli
        hlt
        jmp     iobench_halt

        .section .rodata
        .balign 8
        .globl iobench_isr_table
iobench_isr_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   iobench_isr_\v
        .endr

# -------------------------------------------------------------------- data

        .data
        .balign 16
        .globl iobench_gdt
iobench_gdt:
        .quad 0                         # 0x00: null
        .quad 0x00AF9A000000FFFF        # 0x08: code, 64-bit (L), DPL0
        .quad 0x00CF92000000FFFF        # 0x10: data, DPL0
        .quad 0x00CFFA000000FFFF        # 0x18: code, 32-bit, DPL3
        .quad 0x00CFF2000000FFFF        # 0x20: data, DPL3
        .quad 0x00AFFA000000FFFF        # 0x28: code, 64-bit (L), DPL3
        .quad 0x00CFF2000000FFFF        # 0x30: data, DPL3
        .quad 0, 0                      # 0x38: 64-bit TSS, filled in by iobench.c
iobench_gdt_end:
        .globl iobench_gdt_descriptor
iobench_gdt_descriptor:
        .word iobench_gdt_end - iobench_gdt - 1
        .quad iobench_gdt               # lgdt in 32-bit mode reads the low 4 bytes

boot_cmdline:   .long 0
boot_mem_upper: .long 0

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4 * 4096
        .balign 16
iobench_kstack:
        .skip IOBENCH_KSTACK_SIZE
        .globl iobench_kstack_top
iobench_kstack_top:                     # ring 0 (and TSS.rsp0: where ring-3 exceptions land)
        .balign 16
iobench_ustack:
        .skip IOBENCH_USTACK_SIZE
        .globl iobench_ustack_top
iobench_ustack_top:                     # ring 3

        .text
