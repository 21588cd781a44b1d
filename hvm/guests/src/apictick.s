# apictick.s - a timer-tick and IPI heavy guest: the workload of the `apicv` experiment.
#
# Drives the local APIC the way a kernel does (Intel SDM Vol. 3A chapter 11), through the
# xAPIC page at 0xFEE00000, from 64-bit long mode entered from multiboot like `trapkern`:
#
#   * reads IA32_APIC_BASE (RDMSR 0x1B) and the version register, prints both;
#   * software-enables the APIC (SVR = 0x1FF: spurious vector 0xFF), masks LINT0 (firmware
#     leaves the 8259 there in virtual-wire mode), builds an IDT with
#     handlers for the timer (0x20), the IPI (0x40) and the spurious vector (0xFF);
#   * TPR: with TPR = 0x50 a self-IPI with vector 0x40 (class 4) must stay pending in the
#     IRR (SDM 11.8.3.1); writing TPR = 0 lets it in;
#   * M self-IPIs (ipis=M, default 50) through the ICR (destination shorthand "self", fixed,
#     vector 0x40): even ones with IF = 1, odd ones between CLI and STI (so the interrupt
#     waits for the window STI opens);
#   * a periodic APIC timer (LVT timer vector 0x20, divide by 16, initial count 62500: 1 ms
#     with the 1 GHz APIC bus clock KVM and QEMU give guests) for N ticks (n=N, default 50),
#     waiting with PAUSE, or with HLT if the command line has the word `hlt`;
#   * every handler ends with an EOI (write of 0 to offset 0xB0); the spurious one does not
#     (SDM 11.9);
#   * prints "apictick: ticks N ipis M spurious S" and "apictick: done", exits through
#     isa-debug-exit with value 0 (1 if something went wrong, after saying what).
#
#
# With the word `x2apic` on the command line it does all of that in x2APIC mode (SDM 11.12): it
# checks CPUID.01H:ECX[21], sets IA32_APIC_BASE.EXTD (the base it prints is then 0xfee00d00),
# and reaches every register through its MSR 800H + offset/16 instead of the page: the TPR
# check's self-IPI through the 64-bit ICR (MSR 830H, destination in EDX), the M self-IPIs
# through the SELF IPI register (MSR 83FH), EOI as a WRMSR of 0 to 80BH.
#
# The console output depends on nothing but the command line, so every engine prints the same.

        .include "lib.inc"              # 32-bit code, .intel_syntax noprefix
        .include "lib/mb64.inc"         # into long mode: GDT, IDT, page tables (macros)

        .equ MSR_APIC_BASE,     0x1B
        .equ APIC_BASE_EXTD,    1 << 10 # x2APIC mode (SDM 11.12.1)
        .equ CPUID_1_ECX_X2APIC, 1 << 21
        .equ MSR_X2APIC_FIRST,  0x800   # SDM 11.12.1.2: MSR = 800H + (MMIO offset >> 4)
        .equ MSR_X2APIC_SELF_IPI, 0x83F

        .equ APIC_PHYS,         0xFEE00000
        .equ APIC_ID,           0x20    # SDM 11.4.1, Table 11-1
        .equ APIC_VERSION,      0x30
        .equ APIC_TPR,          0x80
        .equ APIC_EOI,          0xB0
        .equ APIC_SVR,          0xF0
        .equ APIC_IRR,          0x200
        .equ APIC_ICR_LOW,      0x300
        .equ APIC_ICR_HIGH,     0x310
        .equ APIC_LVT_TIMER,    0x320
        .equ APIC_LVT_LINT0,    0x350
        .equ APIC_TIMER_ICR,    0x380
        .equ APIC_TIMER_CCR,    0x390
        .equ APIC_TIMER_DCR,    0x3E0
        .equ LVT_MASKED,        1 << 16
        .equ TIMER_PERIODIC,    1 << 17
        .equ ICR_SELF,          1 << 18 # destination shorthand 01: self
        .equ TIMER_VECTOR,      0x20
        .equ IPI_VECTOR,        0x40
        .equ SPURIOUS_VECTOR,   0xFF
        .equ TIMER_COUNT,       62500   # 1 ms at 1 GHz / 16
        .equ DEFAULT_TICKS,     50
        .equ DEFAULT_IPIS,      50
        .equ WAIT_LIMIT,        100000000

# APIC register access in either mode (64-bit code): the xAPIC page at RBX, or in x2APIC mode
# (use_x2apic) the register's MSR.  Arguments without spaces.  Flags change; APIC_RD leaves the
# register in EAX, nothing else changes.
        .macro APIC_WR reg, value
        cmp     dword ptr [rip + use_x2apic], 0
        jne     .Lx2w\@
        mov     dword ptr [rbx + \reg], \value
        jmp     .Lxw\@
.Lx2w\@:
        push    rax
        push    rcx
        push    rdx
        mov     ecx, MSR_X2APIC_FIRST + ((\reg) >> 4)
        mov     eax, \value
        xor     edx, edx                # ICR: destination 0 (the shorthand decides)
        wrmsr
        pop     rdx
        pop     rcx
        pop     rax
.Lxw\@:
        .endm

        .macro APIC_RD reg
        cmp     dword ptr [rip + use_x2apic], 0
        jne     .Lx2r\@
        mov     eax, [rbx + \reg]
        jmp     .Lxr\@
.Lx2r\@:
        push    rcx
        push    rdx
        mov     ecx, MSR_X2APIC_FIRST + ((\reg) >> 4)
        rdmsr
        pop     rdx
        pop     rcx
.Lxr\@:
        .endm

# A self-IPI with IPI_VECTOR: the ICR (shorthand self) on the page, the SELF IPI MSR in x2APIC mode.
        .macro SELF_IPI
        cmp     dword ptr [rip + use_x2apic], 0
        jne     .Lx2s\@
        mov     dword ptr [rbx + APIC_ICR_LOW], ICR_SELF | IPI_VECTOR
        jmp     .Lxs\@
.Lx2s\@:
        push    rax
        push    rcx
        push    rdx
        mov     ecx, MSR_X2APIC_SELF_IPI
        mov     eax, IPI_VECTOR
        xor     edx, edx
        wrmsr
        pop     rdx
        pop     rcx
        pop     rax
.Lxs\@:
        .endm

        .text
main:
        call    serial_init
        mov     eax, DEFAULT_TICKS
        call    arg_n
        mov     [n_ticks], eax
        mov     esi, OFFSET k_ipis
        mov     eax, DEFAULT_IPIS
        call    arg_named
        mov     [n_ipis], eax
        mov     esi, OFFSET k_hlt
        call    has_word
        mov     [use_hlt], eax
        mov     esi, OFFSET k_x2apic
        call    has_word
        mov     [use_x2apic], eax

        MB64_LOAD_GDT at
        call    build_idt
        lidt    [at_idt_descriptor]
        call    build_page_tables
        MB64_PAE_CR3
        MB64_LONG_JUMP long_entry

# arg_named: ESI = "key=" (a C string), EAX = default.  Returns EAX = the decimal number of
# the first word of the command line that starts with the key, or the default.
arg_named:
        push    esi
        push    edi
        push    edx
        push    ecx
        push    ebx
        mov     edx, eax                # result so far: the default
        mov     edi, esi                # EDI = key
        call    cmdline
        test    esi, esi
        jz      5f
        mov     bl, ' '                 # previous character
1:
        cmp     byte ptr [esi], 0
        je      5f
        cmp     bl, ' '
        jne     4f
        xor     ecx, ecx                # compare the key at ESI
2:
        mov     al, [edi + ecx]
        test    al, al
        jz      3f                      # whole key matched
        cmp     al, [esi + ecx]
        jne     4f
        inc     ecx
        jmp     2b
3:
        add     ecx, esi                # ECX -> digits
        movzx   eax, byte ptr [ecx]
        sub     eax, '0'
        cmp     eax, 9
        ja      4f
        xor     eax, eax
6:
        movzx   ebx, byte ptr [ecx]
        sub     ebx, '0'
        cmp     ebx, 9
        ja      7f
        imul    eax, eax, 10
        add     eax, ebx
        inc     ecx
        jmp     6b
7:
        mov     edx, eax
        jmp     5f
4:
        mov     bl, [esi]
        inc     esi
        jmp     1b
5:
        mov     eax, edx
        pop     ebx
        pop     ecx
        pop     edx
        pop     edi
        pop     esi
        ret

        .include "lib/has_word.inc"     # has_word: is a word on the command line

# build_idt: 64-bit interrupt gates (type 14, DPL 0): timer, IPI, spurious; all else `unexpected`.
build_idt:
        MB64_IDT_BEGIN isr_unexpected
        MB64_IDT_GATE TIMER_VECTOR, isr_timer
        MB64_IDT_GATE IPI_VECTOR, isr_ipi
        MB64_IDT_GATE SPURIOUS_VECTOR, isr_spurious
        MB64_IDT_END
        ret

# build_page_tables: the first GiB identity-mapped with 2-MiB pages, and the 2-MiB page holding
# the APIC (0xFEE00000) identity-mapped uncacheable: PML4[0] -> PDPT; PDPT[0] -> PD0;
# PDPT[3] -> PD3; PD3[(0xFEE00000 - 0xC0000000) >> 21] -> 0xFEE00000.
build_page_tables:
        MB64_PT_IDENTITY APIC_PHYS
        ret

# --------------------------------------------------------------------- 64-bit code
        .code64
long_entry:
        MB64_LONG_ENTRY

        # --- where the APIC is, which one it is ------------------------------------------
        mov     ecx, MSR_APIC_BASE
        rdmsr
        mov     r12d, eax
        cmp     dword ptr [rip + use_x2apic], 0
        je      1f
        mov     eax, 1                  # x2APIC mode only where CPUID says there is one
        cpuid
        test    ecx, CPUID_1_ECX_X2APIC
        jz      no_x2apic
        mov     ecx, MSR_APIC_BASE
        mov     eax, r12d
        or      eax, APIC_BASE_EXTD     # xAPIC -> x2APIC (SDM 11.12.5, Figure 11-27)
        xor     edx, edx
        wrmsr
        rdmsr
        mov     r12d, eax
1:
        lea     rsi, [rip + m_base]
        call    puts64
        mov     eax, r12d
        call    put_hex64
        mov     eax, r12d
        and     eax, 0xFFFFF000
        cmp     eax, APIC_PHYS
        jne     bad_base
        mov     ebx, APIC_PHYS          # RBX = the xAPIC page, from here on
        lea     rsi, [rip + m_version]
        call    puts64
        APIC_RD APIC_VERSION
        call    put_hex64
        call    newline64

        # --- enable: spurious vector 0xFF, APIC software enable ---------------------------
        APIC_WR APIC_SVR, 0x100|SPURIOUS_VECTOR
        # Firmware (QEMU's SeaBIOS) leaves LINT0 in ExtINT "virtual wire" mode, so the 8259's
        # PIT interrupt would arrive at vector 8; mask it (SDM 11.5.1) as a kernel does.
        APIC_WR APIC_LVT_LINT0, LVT_MASKED
        APIC_WR APIC_TPR, 0
        APIC_WR APIC_TIMER_DCR, 0x3     # divide by 16 (SDM Figure 11-10)
        sti

        # --- TPR holds back a lower-class interrupt ----------------------------------------
        APIC_WR APIC_TPR, 0x50
        APIC_WR APIC_ICR_LOW, ICR_SELF|IPI_VECTOR
        mov     ecx, 1000               # time enough for a wrong delivery to show
1:
        pause
        dec     ecx
        jnz     1b
        mov     r13d, [rip + ipis]      # must still be 0
        APIC_RD (APIC_IRR+0x20)         # vector 0x40: IRR bit 0 at offset 0x220 (MSR 822H)
        mov     r14d, eax
        and     r14d, 1
        APIC_WR APIC_TPR, 0
        mov     eax, 1
        call    wait_ipis
        lea     rsi, [rip + m_tpr]
        call    puts64
        test    r13d, r13d
        jnz     tpr_bad
        test    r14d, r14d
        jz      tpr_bad
        mov     eax, [rip + ipis]
        cmp     eax, 1
        jne     tpr_bad
        lea     rsi, [rip + m_ok]
        call    puts64
        mov     dword ptr [rip + ipis], 0

        # --- M self-IPIs --------------------------------------------------------------------
        xor     r15d, r15d
2:
        cmp     r15d, [rip + n_ipis]
        jae     4f
        test    r15d, 1
        jnz     3f
        SELF_IPI
        jmp     5f
3:
        cli
        SELF_IPI
        sti
        nop
5:
        inc     r15d
        mov     eax, r15d
        call    wait_ipis
        jmp     2b
4:
        # --- N timer ticks ------------------------------------------------------------------
        cmp     dword ptr [rip + n_ticks], 0
        je      8f
        APIC_WR APIC_LVT_TIMER, TIMER_PERIODIC|TIMER_VECTOR
        APIC_WR APIC_TIMER_ICR, TIMER_COUNT
        APIC_RD APIC_TIMER_CCR          # counting down from the initial count
        cmp     eax, TIMER_COUNT
        ja      ccr_bad
6:
        mov     eax, [rip + ticks]
        cmp     eax, [rip + n_ticks]
        jae     7f
        cmp     dword ptr [rip + use_hlt], 0
        je      9f
        hlt
        jmp     6b
9:
        pause
        jmp     6b
7:
        APIC_WR APIC_TIMER_ICR, 0       # stop the timer
8:
        cli
        MB64_PUT m_ticks, ticks
        MB64_PUT m_ipis, ipis
        MB64_PUT m_spurious, spurious
        call    newline64
        MB64_DONE m_done

bad_base:
        lea     rsi, [rip + m_bad_base]
        jmp     fail64
no_x2apic:
        lea     rsi, [rip + m_no_x2apic]
        jmp     fail64
tpr_bad:
        lea     rsi, [rip + m_tpr_bad]
        jmp     fail64
ccr_bad:
        lea     rsi, [rip + m_ccr_bad]
        jmp     fail64
ipi_lost:
        lea     rsi, [rip + m_ipi_lost]
        MB64_EXIT                       # fail64 (message at RSI), exit64 (status in EAX)

# wait_ipis: wait (bounded) until the IPI handler has counted EAX interrupts; else fail.
wait_ipis:
        push    rcx
        mov     ecx, WAIT_LIMIT
1:
        cmp     [rip + ipis], eax
        jae     2f
        pause
        dec     ecx
        jnz     1b
        jmp     ipi_lost
2:
        pop     rcx
        ret

# Interrupt handlers (64-bit interrupt gates: IF is 0 inside). Frame: RIP, CS, RFLAGS, RSP, SS.
# A tick already pending in the IRR when the N-th one masks the timer still arrives (masking
# withdraws nothing, SDM 11.5.1): such late ticks are acknowledged but not counted.
isr_timer:
        push    rax
        push    rbx
        mov     ebx, APIC_PHYS
        mov     eax, [rip + ticks]
        cmp     eax, [rip + n_ticks]
        jae     1f
        inc     eax
        mov     [rip + ticks], eax
        cmp     eax, [rip + n_ticks]
        jb      1f
        APIC_WR APIC_LVT_TIMER, LVT_MASKED|TIMER_PERIODIC|TIMER_VECTOR
1:
        APIC_WR APIC_EOI, 0
        pop     rbx
        pop     rax
        iretq

isr_ipi:
        push    rbx
        mov     ebx, APIC_PHYS
        inc     dword ptr [rip + ipis]
        APIC_WR APIC_EOI, 0
        pop     rbx
        iretq

isr_spurious:                           # SDM 11.9: no EOI for the spurious vector
        inc     dword ptr [rip + spurious]
        iretq

isr_unexpected:
        lea     rsi, [rip + m_unexpected]
        jmp     fail64

        .include "lib/serial64.inc"   # putc64, puts64, newline64, put_hex64, put_dec64

        .section .rodata
k_ipis:         .asciz "ipis="
k_hlt:          .asciz "hlt"
k_x2apic:       .asciz "x2apic"
m_base:         .asciz "apictick: apic base "
m_version:      .asciz " version "
m_tpr:          .asciz "apictick: tpr 0x50 holds vector 0x40, tpr 0 lets it in: "
m_ok:           .asciz "ok\n"
m_ticks:        .asciz "apictick: ticks "
m_ipis:         .asciz " ipis "
m_spurious:     .asciz " spurious "
m_done:         .asciz "apictick: done\n"
m_bad_base:     .asciz "\napictick: the APIC is not at 0xfee00000\n"
m_no_x2apic:    .asciz "apictick: no x2APIC (CPUID.01H:ECX[21] is 0)\n"
m_tpr_bad:      .asciz "FAILED\n"
m_ccr_bad:      .asciz "apictick: current count above the initial count\n"
m_ipi_lost:     .asciz "\napictick: an IPI was not delivered\n"
m_unexpected:   .asciz "\napictick: unexpected interrupt or exception\n"

        MB64_GDT at                     # at_gdt, at_gdt_descriptor, at_idt_descriptor

        MB64_BSS_TABLES                 # pml4, pdpt, pd0
pd3:    .skip 4096
        MB64_BSS_IDT_STACK              # idt, kstack, kstack_top
# Written while the guest runs: a page of their own, away from code (an engine that watches
# code pages for writes, like the model engine, would otherwise rescan the code at every tick).
        .balign 4096
n_ticks:        .skip 4
n_ipis:         .skip 4
use_hlt:        .skip 4
ticks:          .skip 4
ipis:           .skip 4
spurious:       .skip 4
use_x2apic:     .skip 4

        .text
