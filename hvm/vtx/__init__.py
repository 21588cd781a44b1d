"""Intel VT-x as data and rules (Intel SDM Vol. 3C), pure Python.

One module per concept; each starts with how to use it:

- ``exit_reasons``: basic exit reasons (Appendix C)
- ``errors``: VM-instruction error numbers, ``VmxInstructionError`` (31.4)
- ``vmcs``: field encodings, ``VMCS`` with VMREAD/VMWRITE semantics (25.11, Appendix B)
- ``capabilities``: the model's ``IA32_VMX_*`` capability MSRs (Appendix A)
- ``controls``: control bits and the VM-entry checks on them (25.6-25.8, 27.2.1)
- ``qualification``: exit qualifications, instruction and interruption information (25.8-25.9, 28.2)
- ``bitmaps``: I/O and MSR bitmaps (25.6.4, 25.6.9, 26.1.3)
- ``ept``: EPT pointer, walker and builder (29.3); ``memory``: the walkers' memory interface
- ``paging``: guest paging, linear to guest-physical (Vol. 3A chapter 4); ``regs``: CR0/CR4/EFER bits
- ``tsc``: TSC offsetting and scaling (25.6.5, 26.3)
- ``apic``: the local APIC, xAPIC page and x2APIC MSRs, timer, IPIs (Vol. 3A chapter 11)
- ``apicv``: virtual-APIC page, TPR/EOI/self-IPI virtualization, virtual interrupts, posted interrupts (30)
"""
