# trapkern.s - an interrupt-toggling guest kernel: the workload of the trap-and-emulate lab.
#
# A little kernel that does, once each, what a kernel does and a classic trap-and-emulate
# hypervisor must intercept, and prints only what every correct virtual machine shows alike
# (values read back through privileged instructions, never through SGDT, SIDT, SMSW or a
# segment register, whose answers differ under ring deprivileging -- that is `redpill`):
#
#   * 32-bit protected mode: reads CR0; toggles IF with CLI/STI and reads it with PUSHF;
#     saves and restores the arithmetic flags with PUSHF/POPF (IF unchanged);
#   * loads its own GDT (32- and 64-bit code, data) and reloads every segment register,
#     builds a 64-bit IDT and loads it with LIDT;
#   * builds 4-level page tables: the first GiB identity-mapped with 2-MiB pages, and one
#     4-KiB page at 0x40000000 that aliases page A;
#   * enables PAE (MOV to CR4), loads CR3, sets EFER.LME with RDMSR/WRMSR, enables paging
#     (MOV to CR0), and far-jumps to 64-bit code;
#   * writes and reads a harmless MSR (IA32_SYSENTER_ESP);
#   * reads page A through the alias, remaps the alias to page B by writing the page table,
#     INVLPG, and reads again; reloads CR3;
#   * takes two exceptions through its IDT and returns with IRETQ: #UD (ud2) with IF = 1
#     before (the interrupt gate clears it, IRETQ restores it) and #DE (divide by zero);
#   * with `swint` on the command line, also a software interrupt (int 0x30) and IRETQ.
#     Not by default: KVM's instruction emulator cannot execute INT n in protected or long
#     mode, and on hosts where guest CPL0 code is emulated (KVM on PVM) it fails there;
#   * exits through isa-debug-exit with value 0.
#
# 64-bit because on a KVM-on-PVM host 32-bit paging and a protected-mode IRET both fail
# (measured: triple fault on MOV to CR0.PG with 32-bit paging, "instruction emulation failed"
# on IRET), while long mode with IRETQ works.

        .include "lib.inc"              # 32-bit code, .intel_syntax noprefix
        .include "lib/mb64.inc"         # into long mode: GDT, IDT, page tables (macros)

        .equ MSR_SYSENTER_ESP,  0x175
        .equ EFLAGS_CF,         1 << 0
        .equ EFLAGS_IF,         1 << 9
        .equ ALIAS,             0x40000000      # linear address of the 4-KiB alias page
        .equ PATTERN_A,         0x11111111
        .equ PATTERN_B,         0x22222222
        .equ PATTERN_W,         0x33333333
        .equ SYSENTER_VALUE,    0x00C0FFEE
        .equ SWINT_VECTOR,      0x30

        .text
main:
        call    serial_init
        mov     esi, OFFSET m_hello
        call    puts
        mov     eax, cr0
        call    put_hex32
        call    newline

        # --- the interrupt flag: CLI, STI, PUSHF -----------------------------------------
        mov     esi, OFFSET m_cli
        call    puts
        cli
        pushfd
        pop     eax
        call    put_if
        mov     esi, OFFSET m_sti
        call    puts
        sti
        pushfd
        cli
        pop     eax
        call    put_if
        call    newline
        # PUSHF/POPF with IF unchanged (0): the carry flag goes through the stack and back.
        mov     esi, OFFSET m_popf
        call    puts
        stc
        pushfd
        clc
        popfd
        pushfd
        pop     eax
        and     eax, EFLAGS_CF
        call    put_dec
        mov     esi, OFFSET m_popf_if
        call    puts
        pushfd
        pop     eax
        call    put_if
        call    newline

        # --- own GDT and IDT --------------------------------------------------------------
        MB64_LOAD_GDT tk
        call    build_idt
        lidt    [tk_idt_descriptor]
        mov     esi, OFFSET m_tables
        call    puts

        # --- EFER before long mode ----------------------------------------------------------
        mov     esi, OFFSET m_efer
        call    puts
        mov     ecx, MSR_EFER
        rdmsr
        call    put_hex32
        call    newline

        # --- page tables, then long mode ----------------------------------------------------
        call    build_page_tables
        MB64_PAE_CR3
        mov     esi, OFFSET m_paging
        call    puts
        mov     eax, cr4
        call    put_hex32
        mov     esi, OFFSET m_cr3
        call    puts
        mov     eax, cr3
        call    put_hex32
        call    newline
        MB64_LONG_JUMP long_entry

# put_if: print "1" or "0" for EFLAGS.IF in EAX.
put_if:
        shr     eax, 9
        and     eax, 1
        jmp     put_dec

# build_idt: 64-bit interrupt gates (type 14, DPL 0) for #DE, #UD and the software vector;
# every other vector gets `unexpected`.
build_idt:
        MB64_IDT_BEGIN isr_unexpected
        MB64_IDT_GATE 0, isr_de
        MB64_IDT_GATE 6, isr_ud
        MB64_IDT_GATE SWINT_VECTOR, isr_swint
        MB64_IDT_END
        ret

# build_page_tables: PML4[0] -> PDPT; PDPT[0] -> PD0 (1 GiB of 2-MiB pages, identity);
# PDPT[1] -> PD1; PD1[0] -> PT; PT[0] -> page A, so linear ALIAS reads page A.
build_page_tables:
        MB64_PT_ROOT
        mov     dword ptr [pdpt + 8], OFFSET pd1 + PTE_P_RW
        mov     dword ptr [pd1], OFFSET pt + PTE_P_RW
        mov     dword ptr [pt], OFFSET page_a + PTE_P_RW
        MB64_PT_PD0
        mov     dword ptr [page_a], PATTERN_A
        mov     dword ptr [page_b], PATTERN_B
        ret

# has_swint: ZF = 0 if the command line holds the word "swint".
has_swint:
        push    esi
        push    edi
        push    ecx
        call    cmdline
        test    esi, esi
        jz      3f
1:
        cmp     byte ptr [esi], 0
        je      3f
        mov     edi, OFFSET w_swint
        mov     ecx, 5
        push    esi
        repe cmpsb
        pop     esi
        je      2f
        inc     esi
        jmp     1b
2:
        or      ecx, 1                  # found: ZF = 0
        jmp     4f
3:
        xor     ecx, ecx                # not found: ZF = 1
4:
        pop     ecx
        pop     edi
        pop     esi
        ret

# --------------------------------------------------------------------- 64-bit code
        .code64
long_entry:
        MB64_LONG_ENTRY
        lea     rsi, [rip + m_long]
        call    puts64
        mov     ecx, MSR_EFER
        rdmsr
        call    put_hex64
        lea     rsi, [rip + m_cr0]
        call    puts64
        mov     rax, cr0
        call    put_hex64
        call    newline64

        # a harmless MSR: IA32_SYSENTER_ESP
        lea     rsi, [rip + m_msr]
        call    puts64
        mov     ecx, MSR_SYSENTER_ESP
        mov     eax, SYSENTER_VALUE
        xor     edx, edx
        wrmsr
        xor     eax, eax
        rdmsr
        call    put_hex64
        call    newline64

        # the alias page: read A through it, write through it, remap it to B
        lea     rsi, [rip + m_alias]
        call    puts64
        mov     eax, [ALIAS]
        call    put_hex64
        mov     dword ptr [ALIAS], PATTERN_W
        lea     rsi, [rip + m_alias_w]
        call    puts64
        mov     eax, [rip + page_a]
        call    put_hex64
        call    newline64
        lea     rsi, [rip + m_remap]
        call    puts64
        mov     dword ptr [rip + pt], OFFSET page_b + PTE_P_RW
        invlpg  [ALIAS]
        mov     eax, [ALIAS]
        call    put_hex64
        mov     rax, cr3
        mov     cr3, rax
        lea     rsi, [rip + m_cr3_reload]
        call    puts64
        mov     eax, [ALIAS]
        call    put_hex64
        call    newline64

        # exceptions through the IDT, back with IRETQ
        sti
        ud2
        lea     rsi, [rip + m_after]
        call    puts64
        pushfq
        pop     rax
        call    put_if64
        call    newline64
        cli
        xor     ecx, ecx
        mov     eax, 7
        div     ecx
        lea     rsi, [rip + m_de_back]
        call    puts64

        call    has_swint64
        jz      1f
        int     SWINT_VECTOR
        lea     rsi, [rip + m_swint_back]
        call    puts64
1:
        lea     rsi, [rip + m_done]
        call    puts64
        xor     eax, eax
        mov     dx, EXIT_PORT
        out     dx, eax
2:
        cli
        hlt
        jmp     2b

# has_swint64: the 32-bit scan, from 64-bit code (it uses no stack-width-sensitive code
# but push/pop, so it is repeated here in 64-bit form).
has_swint64:
        push    rsi
        push    rdi
        push    rcx
        mov     esi, [rip + mb_info]
        test    esi, esi
        jz      3f
        test    dword ptr [rsi + MBI_FLAGS], MBI_HAS_CMDLINE
        jz      3f
        mov     esi, [rsi + MBI_CMDLINE]
1:
        cmp     byte ptr [rsi], 0
        je      3f
        lea     rdi, [rip + w_swint]
        mov     ecx, 5
        push    rsi
        repe cmpsb
        pop     rsi
        je      2f
        inc     rsi
        jmp     1b
2:
        or      ecx, 1
        jmp     4f
3:
        xor     ecx, ecx
4:
        pop     rcx
        pop     rdi
        pop     rsi
        ret

# Exception and interrupt handlers (64-bit interrupt gates: IF is 0 inside).
# Frame: RIP, CS, RFLAGS, RSP, SS (no error code for #DE, #UD or INT n).
isr_ud:
        push    rax
        push    rsi
        lea     rsi, [rip + m_ud]
        call    puts64
        pushfq
        pop     rax
        call    put_if64
        lea     rsi, [rip + m_frame_if]
        call    puts64
        mov     rax, [rsp + 16 + 16]    # saved RFLAGS
        call    put_if64
        call    newline64
        add     qword ptr [rsp + 16], 2 # past the 2-byte ud2
        pop     rsi
        pop     rax
        iretq

isr_de:
        push    rsi
        lea     rsi, [rip + m_de]
        call    puts64
        add     qword ptr [rsp + 8], 2  # past the 2-byte div ecx
        pop     rsi
        iretq

isr_swint:
        push    rsi
        lea     rsi, [rip + m_swint]
        call    puts64
        pop     rsi
        iretq

isr_unexpected:
        lea     rsi, [rip + m_unexpected]
        call    puts64
        mov     eax, 1
        mov     dx, EXIT_PORT
        out     dx, eax
1:
        cli
        hlt
        jmp     1b

# put_if64: "1" or "0" for RFLAGS.IF in RAX.
put_if64:
        push    rax
        shr     eax, 9
        and     al, 1
        add     al, '0'
        call    putc64
        pop     rax
        ret

        .include "lib/serial64.inc"   # putc64, puts64, newline64, put_hex64, put_dec64

        .section .rodata
m_hello:        .asciz "trapkern: protected mode, CR0="
m_cli:          .asciz "cli: IF="
m_sti:          .asciz ", sti: IF="
m_popf:         .asciz "popf: CF="
m_popf_if:      .asciz " restored, IF="
m_tables:       .asciz "gdt and idt loaded\n"
m_efer:         .asciz "rdmsr: EFER="
m_paging:       .asciz "paging: CR4="
m_cr3:          .asciz " CR3="
m_long:         .asciz "long mode: EFER="
m_cr0:          .asciz " CR0="
m_msr:          .asciz "wrmsr/rdmsr: SYSENTER_ESP="
m_alias:        .asciz "alias page: "
m_alias_w:      .asciz ", written through it: "
m_remap:        .asciz "remapped, invlpg: "
m_cr3_reload:   .asciz ", after CR3 reload: "
m_ud:           .asciz "#UD: IF in handler="
m_frame_if:     .asciz ", IF in frame="
m_after:        .asciz "iretq: IF="
m_de:           .asciz "#DE: handled\n"
m_de_back:      .asciz "iretq from #DE\n"
m_swint:        .asciz "int 0x30: handled\n"
m_swint_back:   .asciz "iretq from int 0x30\n"
m_unexpected:   .asciz "unexpected interrupt\n"
m_done:         .asciz "trapkern: done\n"
w_swint:        .ascii "swint"

        MB64_GDT tk                     # tk_gdt, tk_gdt_descriptor, tk_idt_descriptor

        MB64_BSS_TABLES                 # pml4, pdpt, pd0
pd1:    .skip 4096
pt:     .skip 4096
page_a: .skip 4096
page_b: .skip 4096
        MB64_BSS_IDT_STACK              # idt, kstack, kstack_top

        .text
