# ctxsw.s - the assembly half of the context-switch guest (ctxsw.c is the rest).
#
# Assembled with `as --64`: lib.inc (multiboot header, `_start`, COM1 and
# command-line helpers) is 32-bit code, included under .code32; lib/long64.inc's
# `main`, called by `_start` in 32-bit protected mode, identity-maps the first
# 4 GiB with 2 MiB pages (user-accessible, so ring-3 slices run the image's code),
# turns on PAE, EFER.LME and paging, and calls the 64-bit C entry point
# `ctxsw_main(cmdline)` at ring 0, which never returns.  64-bit because on this
# project's KVM host 32-bit paging triple-faults, and because only 64-bit ring-3
# code runs there natively.
#
# Ring-3 time slices (ring=3): `ctxsw_enter_user(entry, stack)` goes to ring 3
# with SYSEXIT (IOPL 3, IF 0); where SYSEXIT is undefined in long mode (AMD) its
# #UD enters ring 3 with IRETQ instead.  The slice ends with UD2 at
# `ctxsw_slice_end`: its #UD reaches ring 0 through the IDT (on KVM-on-PVM hosts
# INT n from ring 3 is itself a #UD, and SYSCALL is not executed by Unicorn), and
# `ctxsw_user_done` drops the frame, resets the kernel stack and calls
# `ctxsw_next()` (C), which switches CR3 and enters the next slice.
#
# Also here: the exception path of vectors 0-31 (stubs from lib/long64.inc): it
# saves the caller-saved registers, calls `ctxsw_trap(frame)` (frame: vector,
# error code, RIP, CS, RFLAGS, RSP, SS) and, when it returns, resumes the guest
# with IRETQ.  The kernel's page tables are lib/long64.inc's (`long64_pml4`).

        .include "lib/long64.inc"       # and lib.inc; leaves .intel_syntax noprefix on

        LONG64_MAIN ctxsw_main, user=1
        LONG64_ENTER_USER ctxsw

# The ring-3 slice is over: continue the kernel's loop on a fresh stack.
        .globl ctxsw_user_done
ctxsw_user_done:
        mov     ax, KDATA_SEL
        mov     ds, ax
        mov     es, ax
        lea     rsp, [rip + long64_kstack_top]
        call    ctxsw_next              # does not return
        jmp     long64_halt

        LONG64_ISR_STUBS ctxsw_isr_common

# Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS (the CPU aligned RSP to 16
# before its pushes; 7 + 9 quadwords keep it aligned for the call).
ctxsw_isr_common:
        push    rax
        LONG64_SYSEXIT_FALLBACK ctxsw, 24   # the faulting RIP (above RAX, vector, error code)
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
