# selfmap.s - a guest that edits its page tables through a recursive (self-mapped) PML4 entry,
# as Windows and some hobby kernels do.
#
# Multiboot, 64-bit body (lib/long64.inc: 4 GiB identity-mapped with 2-MiB pages, ring 0, no
# interrupts). With PML4[510] -> the PML4 itself, the paging structures appear in a linear
# window (SDM Vol. 3A 4.5: each level's entry is read from the frame the previous one names):
#   PML4                      at (510,510,510,510) = 0xFFFFFF7FBFDFE000
#   PDPT of PML4 slot a       at (510,510,510,a)   = 0xFFFFFF7FBFC00000 + a<<12
#   PD of (a,b)               at (510,510,a,b)     = 0xFFFFFF7F80000000 + a<<21 + b<<12
#   PT of (a,b,c)             at (510,a,b,c)       = 0xFFFFFF0000000000 + a<<30 + b<<21 + c<<12
# The guest
#   1. installs PML4[510] (directly, through the identity map) and reads PML4 entries back
#      through the window;
#   2. maps linear 0x8000005000 (PML4 slot 1) to page A by writing PML4[1] through the PML4's
#      own window entry, then the PDPT, PD and PT entries through the window; reads it, prints
#      the PTE's flags after a read and after a write (accessed, then dirty: SDM 4.8);
#   3. points the PTE at page B through the window, INVLPG, reads B;
#   4. clears the PTE through the window, INVLPG, and takes the #PF (CR2, error code printed);
#   5. writes PML4[2] through the PML4's window and clears it again;
#   6. makes PML4[511] a second recursive entry and stores 8 bytes across the boundary of the
#      two window pages that map the PML4 (its own bytes, unchanged), then clears PML4[511]
#      through the window;
#   7. clears PML4[1] through the window, reloads CR3, and takes the #PF at 0x8000005000 again;
#   8. puts a 5-byte stub in the PML4's unused upper half (PML4[256], not present) and calls it
#      through the identity map: the stub stores to PML4[2] through the window, i.e. to the page
#      it runs from; then clears PML4[2] and the stub through the window;
#   9. prints the flags of PML4[510] (accessed and dirty: it is the PTE of the PML4's window
#      page, which was written) and exits through isa-debug-exit with 0 (1 after "FAIL n").
#
# Instructions that store to the live PML4 (every walk reads it, so each is a write to a page
# table through a mapping whose own walk reads that table): through the identity map, step 1
# (PML4[510]) and step 6 (PML4[511]); through the window, steps 2 (PML4[1]), 5 (two), 6 (the
# split store, one instruction over two pages, and the clear of PML4[511]), 7 (PML4[1]) and
# 8 (four: the stub's bytes, the stub's own store, two clears): 12 instructions. Everything
# printed depends only on the architecture, so every engine and QEMU print the same.

        .include "lib/long64.inc"       # and lib.inc; leaves .intel_syntax noprefix on

        .equ WIN_PML4,   0xFFFFFF7FBFDFE000
        .equ WIN_PML4B,  0xFFFFFF7FBFDFF000     # (510,510,510,511): the PML4 via PML4[511]
        .equ WIN_PDPT1,  0xFFFFFF7FBFC01000     # PDPT of PML4 slot 1
        .equ WIN_PD10,   0xFFFFFF7F80200000     # PD of (1,0)
        .equ WIN_PT100,  0xFFFFFF0040000000     # PT of (1,0,0)
        .equ TEST_VA,    0x8000005000           # (1,0,0,5)

        LONG64_MAIN selfmap_main, user=0

        .code64
        .text
selfmap_main:
        lea     rax, [rip + pf_handler]         # IDT: vector 14 only (SDM 6.14.1)
        lea     rdi, [rip + sm_idt + 14 * 16]
        mov     [rdi], ax
        mov     word ptr [rdi + 2], KCODE_SEL
        mov     word ptr [rdi + 4], 0x8E00      # present, DPL 0, 64-bit interrupt gate
        shr     rax, 16
        mov     [rdi + 6], ax
        shr     rax, 16
        mov     [rdi + 8], eax
        lidt    [rip + sm_idt_desc]
        lea     rax, [rip + page_a]
        mov     qword ptr [rax], 0xA1
        lea     rax, [rip + page_b]
        mov     qword ptr [rax], 0xB2

        # 1. the recursive entry, through the identity map
        lea     rbx, [rip + long64_pml4]
        mov     rax, rbx
        or      rax, 3
        mov     [rbx + 510 * 8], rax
        mov     rax, cr3
        mov     cr3, rax
        movabs  rsi, WIN_PML4
        mov     rax, [rsi]
        cmp     rax, [rbx]
        mov     ecx, 1
        jne     fail
        mov     rax, [rsi + 510 * 8]
        and     rax, ~0xFFF
        cmp     rax, rbx
        mov     ecx, 2
        jne     fail
        lea     rsi, [rip + msg_window]
        call    puts64

        # 2. a new mapping through the window; PML4[1] through the PML4's own window page
        movabs  rsi, WIN_PML4
        lea     rax, [rip + sm_pdpt]
        or      rax, 3
        mov     [rsi + 1 * 8], rax              # self-mapped store 1
        movabs  rdi, WIN_PDPT1
        lea     rax, [rip + sm_pd]
        or      rax, 3
        mov     [rdi], rax
        movabs  rdi, WIN_PD10
        lea     rax, [rip + sm_pt]
        or      rax, 3
        mov     [rdi], rax
        movabs  rdi, WIN_PT100
        lea     rax, [rip + page_a]
        or      rax, 3
        mov     [rdi + 5 * 8], rax
        movabs  r12, TEST_VA
        mov     rax, [r12]
        lea     rsi, [rip + msg_read]
        call    put_msg_hex
        mov     rax, [rdi + 5 * 8]
        and     eax, 0xFFF
        lea     rsi, [rip + msg_pte_read]
        call    put_msg_hex
        mov     qword ptr [r12 + 8], 0x77
        mov     rax, [rdi + 5 * 8]
        and     eax, 0xFFF
        lea     rsi, [rip + msg_pte_write]
        call    put_msg_hex
        lea     rax, [rip + page_a]
        cmp     qword ptr [rax + 8], 0x77
        mov     ecx, 3
        jne     fail

        # 3. remap to page B through the window
        lea     rax, [rip + page_b]
        or      rax, 3
        mov     [rdi + 5 * 8], rax
        invlpg  [r12]
        mov     rax, [r12]
        lea     rsi, [rip + msg_read]
        call    put_msg_hex

        # 4. unmap through the window: #PF
        mov     qword ptr [rdi + 5 * 8], 0
        invlpg  [r12]
        call    touch

        # 5. PML4[2] through the PML4's window page, then cleared
        movabs  rsi, WIN_PML4
        mov     eax, 0x12345000                 # not present
        mov     [rsi + 2 * 8], rax              # self-mapped store 2
        cmp     [rbx + 2 * 8], rax
        mov     ecx, 4
        jne     fail
        mov     qword ptr [rsi + 2 * 8], 0      # self-mapped store 3
        cmp     qword ptr [rbx + 2 * 8], 0
        mov     ecx, 5
        jne     fail

        # 6. a store split across two window pages that both map the PML4
        mov     rax, rbx
        or      rax, 3
        mov     [rbx + 511 * 8], rax            # PML4[511] -> PML4, through the identity map
        mov     r13, [rbx]                      # PML4[0]
        mov     eax, [rbx]                      # bytes 0-3 of the PML4 ...
        shl     rax, 32
        mov     edx, [rbx + 511 * 8 + 4]        # ... after bytes 4092-4095
        or      rax, rdx
        movabs  rsi, WIN_PML4B - 4
        mov     [rsi], rax                      # self-mapped store 4 (two pages, one instruction)
        cmp     [rbx], r13
        mov     ecx, 6
        jne     fail
        mov     rax, [rbx + 511 * 8]
        and     eax, 0xFFF
        lea     rsi, [rip + msg_pml4_511]
        call    put_msg_hex
        movabs  rsi, WIN_PML4
        mov     qword ptr [rsi + 511 * 8], 0    # self-mapped store 5
        movabs  rax, WIN_PML4B
        invlpg  [rax]

        # 7. PML4[1] cleared through the window
        mov     qword ptr [rsi + 1 * 8], 0      # self-mapped store 6
        mov     rax, cr3
        mov     cr3, rax
        call    touch

        # 8. code on the PML4's own page: a stub there stores to the PML4
        movabs  rsi, WIN_PML4
        movabs  rax, 0x000000C310468948         # mov [rsi + 0x10], rax; ret (PML4[256]: P = 0)
        mov     [rsi + 256 * 8], rax            # self-mapped store 7
        lea     rcx, [rbx + 256 * 8]            # the stub, through the identity map
        mov     eax, 0x6789A000                 # not present
        call    rcx                             # self-mapped store 8, from the page it writes
        cmp     [rbx + 2 * 8], rax
        mov     ecx, 8
        jne     fail
        mov     qword ptr [rsi + 2 * 8], 0      # self-mapped store 9
        mov     qword ptr [rsi + 256 * 8], 0    # self-mapped store 10
        lea     rsi, [rip + msg_stub]
        call    puts64

        # 9. the recursive entry's flags
        mov     rax, [rbx + 510 * 8]
        and     eax, 0xFFF
        lea     rsi, [rip + msg_pml4_510]
        call    put_msg_hex
        lea     rsi, [rip + msg_done]
        call    puts64
        xor     eax, eax
        jmp     finish

# touch: read TEST_VA (R12), which must fault; print CR2 >> 12 and the error code.
touch:
        lea     rax, [rip + 1f]
        mov     [rip + pf_resume], rax
        mov     qword ptr [rip + pf_count], 0
        mov     rax, [r12]
        mov     ecx, 7
        jmp     fail
1:
        mov     rax, [rip + pf_cr2]
        shr     rax, 12
        lea     rsi, [rip + msg_pf_cr2]
        call    put_msg_hex
        mov     rax, [rip + pf_err]
        lea     rsi, [rip + msg_pf_err]
        call    put_msg_hex
        ret

# put_msg_hex: the string at RSI, EAX in hex, a newline.
put_msg_hex:
        call    puts64
        call    put_hex64
        call    newline64
        ret

pf_handler:
        pop     qword ptr [rip + pf_err]
        push    rax
        mov     rax, cr2
        mov     [rip + pf_cr2], rax
        incq    [rip + pf_count]
        mov     rax, [rip + pf_resume]
        mov     [rsp + 8], rax                  # the return RIP
        pop     rax
        iretq

fail:
        lea     rsi, [rip + msg_fail]
        call    puts64
        mov     eax, ecx
        call    put_hex64
        call    newline64
        mov     eax, 1
finish:
        mov     dx, EXIT_PORT
        out     dx, eax
        jmp     long64_halt

        .include "lib/serial64.inc"   # putc64, puts64, newline64, put_hex64, put_dec64

        .section .rodata
msg_window:     .asciz "selfmap: PML4 read through PML4[510]\n"
msg_read:       .asciz "selfmap: read 0x8000005000 = "
msg_pte_read:   .asciz "selfmap: PTE flags after read "
msg_pte_write:  .asciz "selfmap: PTE flags after write "
msg_pf_cr2:     .asciz "selfmap: #PF CR2>>12 "
msg_pf_err:     .asciz "selfmap: #PF error code "
msg_pml4_511:   .asciz "selfmap: PML4[511] flags "
msg_pml4_510:   .asciz "selfmap: PML4[510] flags "
msg_stub:       .asciz "selfmap: a stub on the PML4's page wrote PML4[2]\n"
msg_done:       .asciz "selfmap: done\n"
msg_fail:       .asciz "selfmap: FAIL "

        .data
        .balign 16
sm_idt_desc:
        .word   256 * 16 - 1
        .quad   sm_idt
pf_resume:      .quad 0
pf_cr2:         .quad 0
pf_err:         .quad 0
pf_count:       .quad 0

        .bss
        .balign 4096
sm_idt:         .skip 4096
sm_pdpt:        .skip 4096
sm_pd:          .skip 4096
sm_pt:          .skip 4096
page_a:         .skip 4096
page_b:         .skip 4096

        .section .note.GNU-stack, "", @progbits
