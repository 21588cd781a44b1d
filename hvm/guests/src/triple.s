# triple.s - deliberately triple-faults, for error-path tests.
#
# Prints a line, loads an IDT with limit 0 and divides by zero.  The #DE
# (vector 0) is outside the IDT, so delivering it raises #GP; vector 13 is
# outside too, so that becomes #DF; vector 8 is outside as well: triple fault,
# i.e. shutdown (a VM exit with basic reason 2 on VT-x, KVM_EXIT_SHUTDOWN
# under KVM; QEMU with -no-reboot exits with status 0).
#
# Why not int3?  It triple-faults the same way on real VT-x, but KVM's
# instruction emulator cannot execute INT n in protected mode, so on hosts
# where guest CPL0 code is emulated (e.g. KVM on PVM) int3 ends in
# KVM_EXIT_INTERNAL_ERROR (emulation failure) instead.  A #DE is an ordinary
# fault everywhere, and Unicorn reports it through UC_HOOK_INTR (intno 0)
# just like int3, whereas ud2 would stop Unicorn with UC_ERR_INSN_INVALID.

        .include "lib.inc"

        .text
main:
        mov     esi, OFFSET msg
        call    puts
        lidt    [empty_idt]
        xor     ecx, ecx
        div     ecx                     # #DE -> #GP -> #DF -> triple fault
        # Not reached.
        mov     eax, 1
        ret

        .section .rodata
msg:            .asciz "triple fault next\n"
        .balign 8
empty_idt:
        .word 0                         # limit 0: no vector is valid
        .long 0                         # base
