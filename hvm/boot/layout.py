"""Where the VMM puts the structures it builds in low guest memory.

The addresses stay below 0x7C00 (where a real-mode boot image is loaded) or in
0x9000-0x9FBFF, inside the conventional memory that the BIOS memory map of a
PC reports as usable, and below 1 MiB where multiboot kernels load.
"""

GDT_ADDR = 0x0500  # flat GDT: null, code32, data, code64
PML4_ADDR = 0x1000  # long-mode identity map: PML4, PDPT, 4 PDs of 2-MiB pages
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000  # 0x3000-0x6FFF
MBI_ADDR = 0x9000  # multiboot information structure
MMAP_ADDR = 0x9100  # multiboot memory map
LOADER_NAME_ADDR = 0x9400
CMDLINE_ADDR = 0x9500
CMDLINE_MAX = 0x9FC00 - CMDLINE_ADDR  # up to the end of conventional memory
BOOT_DATA_END = 0xA000
REALMODE_LOAD_ADDR = 0x7C00  # as a PC BIOS loads a boot sector
LONGMODE_LOAD_ADDR = 0x100000
LONGMODE_STACK = 0x80000

SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18

# Conventional memory and the reserved BIOS areas of a PC (as QEMU/SeaBIOS report them).
LOW_MEM_END = 0x9FC00  # 639 KiB usable below the EBDA
EBDA_END = 0xA0000
BIOS_ROM = 0xF0000
HIGH_MEM_START = 0x100000
