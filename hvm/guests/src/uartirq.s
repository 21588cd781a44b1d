# uartirq.s - interrupt-driven console input through the I/O APIC and the local APIC.
#
# A 64-bit multiboot guest (the structure of apictick.s) that takes the 16550's receive
# interrupt the way a PC kernel does, and echoes what it receives:
#
#   * masks the 8259s (OCW1 0xFF to ports 0x21/0xA1: firmware such as QEMU's SeaBIOS leaves
#     them initialized) and the local APIC's LINT0 (virtual-wire ExtINT), enables the xAPIC
#     (SVR = 0x1FF), builds an IDT with a handler for vector 0x34;
#   * reads the I/O APIC at 0xFEC00000 (82093AA datasheet 3.1: IOREGSEL at 0x00, IOWIN at 0x10)
#     and prints IOAPICID, IOAPICVER, IOAPICARB and redirection entry 4 as found;
#   * writes all ones to IOAPICID and prints it (only bits 27:24 hold the ID, 3.2.1) and IOAPICARB
#     before and after a write of 0 to it (read-only, 3.2.3), sets the ID back to 0, and prints the
#     registers at indexes 0x03, 0x40 and 0xFF (none defined);
#   * programs redirection entry 4 (ISA IRQ 4, COM1; datasheet 3.2.4): vector 0x34, fixed,
#     physical destination = this APIC's ID, active high, level-triggered (edge-triggered with
#     the word `edge` on the command line), unmasked - high word first, the low word (which
#     unmasks) last - and prints the low word read back;
#   * enables the UART's received-data-available interrupt (IER bit 0) with FIFOs on, prints
#     "uartirq: ready" and waits with STI; HLT;
#   * the handler reads RBR while LSR bit 0 (data ready) is set and echoes each byte; the first
#     time, before its EOI, it reads redirection entry 4's low word (remote IRR, bit 14, is set
#     for a level-triggered interrupt the local APIC accepted); then an EOI to the local APIC
#     (whose EOI message clears remote IRR for a level-triggered vector, SDM Vol. 3A 11.8.5);
#   * after the byte '~' it prints the entry seen in the handler and the byte count, and exits
#     through isa-debug-exit with value 0 (1 after an unexpected interrupt or exception).

        .include "lib.inc"              # 32-bit code, .intel_syntax noprefix
        .include "lib/mb64.inc"         # into long mode: GDT, IDT, page tables (macros)

        .equ APIC_PHYS,         0xFEE00000
        .equ APIC_ID,           0x20    # SDM 11.4.1, Table 11-1
        .equ APIC_EOI,          0xB0
        .equ APIC_SVR,          0xF0
        .equ APIC_LVT_LINT0,    0x350
        .equ LVT_MASKED,        1 << 16
        .equ IOAPIC_PHYS,       0xFEC00000
        .equ IOREGSEL,          0x00    # 82093AA datasheet 3.1, Table 1
        .equ IOWIN,             0x10
        .equ IOAPICID,          0x00    # datasheet 3.2, Table 2
        .equ IOAPICVER,         0x01
        .equ IOAPICARB,         0x02
        .equ IOREDTBL4,         0x18    # entry n: 10h + 2n (low), 11h + 2n (high)
        .equ REDIR_LEVEL,       1 << 15
        .equ UART_RBR,          0
        .equ LSR_DR,            1 << 0
        .equ IER_ERBFI,         1 << 0  # received data available interrupt
        .equ UART_VECTOR,       0x34
        .equ SPURIOUS_VECTOR,   0xFF
        .equ TERMINATOR,        '~'

        .text
main:
        call    serial_init
        mov     esi, OFFSET k_edge
        call    has_word
        mov     [use_edge], eax
        MB64_LOAD_GDT ui
        call    build_idt
        lidt    [ui_idt_descriptor]
        call    build_page_tables
        MB64_PAE_CR3
        MB64_LONG_JUMP long_entry

        .include "lib/has_word.inc"     # has_word: is a word on the command line

# build_idt: 64-bit interrupt gates: the UART's vector, the spurious one; all else `unexpected`.
build_idt:
        MB64_IDT_BEGIN isr_unexpected
        MB64_IDT_GATE UART_VECTOR, isr_uart
        MB64_IDT_GATE SPURIOUS_VECTOR, isr_spurious
        MB64_IDT_END
        ret

# build_page_tables: the first GiB identity-mapped with 2-MiB pages; the 2-MiB pages holding the
# I/O APIC (0xFEC00000) and the local APIC (0xFEE00000) identity-mapped uncacheable.
build_page_tables:
        MB64_PT_IDENTITY APIC_PHYS, IOAPIC_PHYS
        ret

# --------------------------------------------------------------------- 64-bit code
        .code64
# ioapic_read: EAX = index -> EAX = the register.  ioapic_write: EAX = index, EDX = value.
ioapic_read:
        push    rcx
        mov     ecx, IOAPIC_PHYS
        mov     dword ptr [rcx + IOREGSEL], eax
        mov     eax, dword ptr [rcx + IOWIN]
        pop     rcx
        ret

ioapic_write:
        push    rcx
        mov     ecx, IOAPIC_PHYS
        mov     dword ptr [rcx + IOREGSEL], eax
        mov     dword ptr [rcx + IOWIN], edx
        pop     rcx
        ret

# print_reg: RSI = label, EAX = I/O APIC index: prints the label and the register.
print_reg:
        call    puts64
        call    ioapic_read
        call    put_hex64
        ret

long_entry:
        MB64_LONG_ENTRY

        # --- the 8259s and LINT0 out of the way, the local APIC on ----------------------------
        mov     al, 0xFF                # OCW1: mask all IRQs of both 8259s
        out     0x21, al
        out     0xA1, al
        mov     ebx, APIC_PHYS
        mov     dword ptr [rbx + APIC_SVR], 0x100 | SPURIOUS_VECTOR
        mov     dword ptr [rbx + APIC_LVT_LINT0], LVT_MASKED

        # --- the I/O APIC as found ---------------------------------------------------------
        lea     rsi, [rip + m_id]
        mov     eax, IOAPICID
        call    print_reg
        lea     rsi, [rip + m_ver]
        mov     eax, IOAPICVER
        call    print_reg
        lea     rsi, [rip + m_arb]
        mov     eax, IOAPICARB
        call    print_reg
        call    newline64
        lea     rsi, [rip + m_redir]
        mov     eax, IOREDTBL4 + 1
        call    print_reg
        mov     al, ' '
        call    putc64
        mov     eax, IOREDTBL4
        call    ioapic_read
        call    put_hex64
        call    newline64

        # --- IOAPICID is writable (bits 27:24), IOAPICARB not; indexes beyond the table ---------
        mov     eax, IOAPICID
        mov     edx, 0xFFFFFFFF
        call    ioapic_write
        lea     rsi, [rip + m_idw]
        mov     eax, IOAPICID
        call    print_reg
        lea     rsi, [rip + m_arb]
        mov     eax, IOAPICARB
        call    print_reg
        mov     eax, IOAPICARB
        xor     edx, edx
        call    ioapic_write
        lea     rsi, [rip + m_arb]
        mov     eax, IOAPICARB
        call    print_reg
        mov     eax, IOAPICID
        xor     edx, edx
        call    ioapic_write
        lea     rsi, [rip + m_ix3]
        mov     eax, 0x03
        call    print_reg
        lea     rsi, [rip + m_ix40]
        mov     eax, 0x40
        call    print_reg
        lea     rsi, [rip + m_ixff]
        mov     eax, 0xFF
        call    print_reg
        call    newline64

        # --- redirection entry 4: vector 0x34 to this APIC ------------------------------------
        mov     edx, [rbx + APIC_ID]    # bits 31:24 = APIC ID = destination field 63:56
        and     edx, 0xFF000000
        mov     eax, IOREDTBL4 + 1
        call    ioapic_write
        mov     edx, UART_VECTOR | REDIR_LEVEL
        cmp     dword ptr [rip + use_edge], 0
        je      1f
        mov     edx, UART_VECTOR
1:
        mov     eax, IOREDTBL4
        call    ioapic_write
        lea     rsi, [rip + m_programmed]
        mov     eax, IOREDTBL4
        call    print_reg
        call    newline64

        # --- the UART's receive interrupt -------------------------------------------------------
        mov     dx, COM1_PORT + UART_IER
        mov     al, IER_ERBFI
        out     dx, al
        lea     rsi, [rip + m_ready]
        call    puts64
2:
        cli
        cmp     dword ptr [rip + done], 0
        jne     3f
        sti                             # STI; HLT: no interrupt slips in between (SDM 6.8.3)
        hlt
        jmp     2b
3:
        call    newline64
        MB64_PUT m_seen, seen, put_hex64
        MB64_PUT m_bytes, received
        call    newline64
        MB64_DONE m_done

        MB64_EXIT                       # fail64 (message at RSI), exit64 (status in EAX)

# The UART's interrupt (a 64-bit interrupt gate: IF is 0 inside).
isr_uart:
        push    rax
        push    rdx
        cmp     dword ptr [rip + interrupts], 0
        jne     1f
        mov     eax, IOREDTBL4          # the entry while its interrupt is in service
        call    ioapic_read
        mov     [rip + seen], eax
1:
        inc     dword ptr [rip + interrupts]
2:
        mov     dx, COM1_PORT + UART_LSR
        in      al, dx
        test    al, LSR_DR
        jz      3f
        mov     dx, COM1_PORT + UART_RBR
        in      al, dx
        inc     dword ptr [rip + received]
        call    putc64
        cmp     al, TERMINATOR
        jne     2b
        mov     dword ptr [rip + done], 1
        jmp     2b
3:
        mov     edx, APIC_PHYS
        mov     dword ptr [rdx + APIC_EOI], 0
        pop     rdx
        pop     rax
        iretq

isr_spurious:                           # SDM 11.9: no EOI for the spurious vector
        iretq

isr_unexpected:
        lea     rsi, [rip + m_unexpected]
        jmp     fail64

        .include "lib/serial64.inc"

        .section .rodata
k_edge:         .asciz "edge"
m_id:           .asciz "uartirq: ioapic id "
m_ver:          .asciz " version "
m_arb:          .asciz " arb "
m_idw:          .asciz "uartirq: id after writing 0xffffffff "
m_ix3:          .asciz " index 0x03 "
m_ix40:         .asciz " index 0x40 "
m_ixff:         .asciz " index 0xff "
m_redir:        .asciz "uartirq: redirection entry 4 at reset "
m_programmed:   .asciz "uartirq: programmed "
m_ready:        .asciz "uartirq: ready\n"
m_seen:         .asciz "uartirq: entry 4 in service "
m_bytes:        .asciz " bytes "
m_done:         .asciz "uartirq: done\n"
m_unexpected:   .asciz "\nuartirq: unexpected interrupt or exception\n"

        MB64_GDT ui                     # ui_gdt, ui_gdt_descriptor, ui_idt_descriptor

        MB64_BSS_TABLES                 # pml4, pdpt, pd0
pd3:    .skip 4096
        MB64_BSS_IDT_STACK              # idt, kstack, kstack_top
        .balign 4096                    # written while the guest runs: away from code
use_edge:       .skip 4
done:           .skip 4
interrupts:     .skip 4
received:       .skip 4
seen:           .skip 4

        .text
