# ctxsw.s - the assembly half of the context-switch guest (ctxsw.c is the rest).
#
# Assembled with `as --64`: lib.inc (multiboot header, `_start`, COM1 and
# command-line helpers) is 32-bit code, included under .code32; `main`, called
# by `_start` in 32-bit protected mode, identity-maps the first 4 GiB with 2 MiB
# pages (user-accessible, so ring-3 slices run the image's code), turns on PAE,
# EFER.LME and paging, and calls the 64-bit C entry point `ctxsw_main(cmdline)`
# at ring 0, which never returns.  64-bit because on this project's KVM host
# 32-bit paging triple-faults, and because only 64-bit ring-3 code runs there
# natively.
#
# Ring-3 time slices (ring=3): `ctxsw_enter_user(entry, stack)` goes to ring 3
# with SYSEXIT (IOPL 3, IF 0); where SYSEXIT is undefined in long mode (AMD) its
# #UD enters ring 3 with IRETQ instead.  The slice ends with UD2 at
# `ctxsw_slice_end`: its #UD reaches ring 0 through the IDT (on KVM-on-PVM hosts
# INT n from ring 3 is itself a #UD, and SYSCALL is not executed by Unicorn), and
# `ctxsw_user_done` drops the frame, resets the kernel stack and calls
# `ctxsw_next()` (C), which switches CR3 and enters the next slice.
#
# Also here: exception stubs for vectors 0-31 that save the caller-saved
# registers, call `ctxsw_trap(frame)` (frame: vector, error code, RIP, CS,
# RFLAGS, RSP, SS) and, when it returns, resume the guest with IRETQ; the GDT,
# the stack and the kernel's page tables (`ctxsw_pml4` -> `ctxsw_pdpt`).

        .code32
        .include "lib.inc"              # leaves .intel_syntax noprefix on

        .equ KCODE_SEL,          0x08    # 64-bit code, DPL0
        .equ KDATA_SEL,          0x10    # data, DPL0
        .equ UCODE_SEL,          0x28    # 64-bit code, DPL3 (SYSEXIT: SYSENTER_CS + 32)
        .equ UDATA_SEL,          0x30    # data, DPL3 (SYSEXIT: SYSENTER_CS + 40)
        .equ RPL3,               3
        .equ MSR_SYSENTER_CS,    0x174
        .equ EFLAGS_IF,          1 << 9
        .equ EFLAGS_IOPL3,       3 << 12
        .equ MSR_EFER,           0xC0000080
        .equ EFER_LME,           1 << 8
        .equ CR0_PG,             1 << 31
        .equ CR4_PAE,            1 << 5
        .equ PTE_P_RW_US,        0x7
        .equ PDE_2M_P_RW_US,     0x87    # present, writable, user, 2 MiB page
        .equ CTXSW_STACK_SIZE,   16384

        .text
main:
        call    serial_init
        call    cmdline                 # ESI = command line, or 0
        mov     [boot_cmdline], esi

        # PML4[0] -> PDPT; PDPT[0..3] -> 4 page directories; 2048 x 2 MiB = 4 GiB.
        mov     dword ptr [ctxsw_pml4], OFFSET ctxsw_pdpt + PTE_P_RW_US
        mov     edi, OFFSET ctxsw_pdpt
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

# ctxsw_enter_user(rdi = entry, rsi = stack): to ring 3 until the slice's int 0x81.
        .globl ctxsw_enter_user
ctxsw_enter_user:
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
        mov     rcx, rsi                # SYSEXIT: RSP = RCX, RIP = RDX
        mov     rdx, rdi
        .globl ctxsw_sysexit
ctxsw_sysexit:
        sysexitq

# The ring-3 slice is over: continue the kernel's loop on a fresh stack.
        .globl ctxsw_user_done
ctxsw_user_done:
        mov     ax, KDATA_SEL
        mov     ds, ax
        mov     es, ax
        lea     rsp, [rip + ctxsw_stack_top]
        call    ctxsw_next              # does not return
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
        lea     rax, [rip + ctxsw_sysexit]
        cmp     [rsp + 24], rax         # the faulting RIP (above RAX, vector, error code)
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
        cmp     qword ptr [rsp + 8], 6  # #UD (the vector, above RAX) ...
        jne     2f
        lea     rax, [rip + ctxsw_slice_end]
        cmp     [rsp + 24], rax         # ... at the ring-3 slice's final UD2: the slice is over
        je      ctxsw_user_done
2:
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
        .quad 0x00CFFA000000FFFF        # 0x18: code, 32-bit, DPL3 (unused)
        .quad 0x00CFF2000000FFFF        # 0x20: data, DPL3 (unused)
        .quad 0x00AFFA000000FFFF        # 0x28: code, 64-bit (L), DPL3
        .quad 0x00CFF2000000FFFF        # 0x30: data, DPL3
        .globl ctxsw_tss_desc
ctxsw_tss_desc:
        .quad 0, 0                      # 0x38: 64-bit TSS, filled in by ctxsw.c
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
        .globl ctxsw_stack_top
ctxsw_stack_top:
