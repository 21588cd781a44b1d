/* ctxsw.c - the guest of the context-switch experiment, and a paging self-check.
 *
 * Freestanding 64-bit C, linked with ctxsw.s (multiboot entry, long mode, 4 GiB
 * identity map with 2 MiB supervisor pages, exception stubs); runs at ring 0.
 *
 * Command line (words; the last one wins; unknown words are ignored):
 *     p=P  processes, 1..8                                   (default 4)
 *     n=N  CR3 switches                                       (default 1000)
 *     k=K  pages each process touches per time slice, 1..64   (default 8)
 *     x=X  writes to port 0x80 per time slice, 0..16 (default 1): each is a
 *          VM exit in the middle of the slice (a device access, say)
 *     ring=0|3  where the time slices run (default 0): ring 3 enters each slice
 *          with SYSEXIT (IRETQ on AMD) and leaves it with a UD2 whose #UD the
 *          kernel takes as the end of the slice (as a process's system call
 *          would end it); on KVM-on-PVM hosts only ring-3 code runs natively
 *     pcid=0|1  (default 0) 1: give process p PCID p + 1 (SDM Vol. 3A 4.10.1):
 *          needs CPUID.01H:ECX.PCID, sets CR4.PCIDE, and each switch loads CR3
 *          with the PCID and bit 63 set, so it invalidates no TLB entries
 *          (4.10.4.1); 0: plain CR3 loads, each invalidating PCID 000H's
 *     check                  run the paging self-check instead (see below)
 *
 * Processes: each has its own page-table tree (PML4, PDPT, PD, PT) that maps the
 * kernel's identity map (PML4[0], shared) and, at the same linear address
 * USER_VA, K 4-KiB pages of its own.  Word 0 of process p's page i starts as
 * p << 16 | i.  Switch s (s = 0..N-1) loads CR3 with process s % P's PML4 and,
 * makes X + 1 passes over its K pages, with one write of the pass number to
 * port 0x80 between passes; a pass reads word 0 of each page into the sum and
 * writes it back plus 1 (the access sets the accessed and dirty flags, SDM Vol.
 * 3A 4.8).  At the end the kernel checks every page through the identity map:
 * process p's words must have grown by exactly X + 1 per slice p ran (no page
 * reached through the wrong CR3), and prints one line
 *     ctxsw p=P n=N k=K x=X ring=R sum=0xXXXXXXXX isolation=ok|bad
 * and exits (isa-debug-exit) with 0 if isolation held, else 1.
 *
 * check: on process 0's tree, with expected results from the SDM (Vol. 3A):
 *     ad read/write/reread   accessed and dirty flags of a fresh PTE after a read,
 *                            a write, and a read after clearing them and INVLPG (4.8)
 *     ad upper               the accessed flags of the PML4E, PDPTE and PDE (4.8)
 *     remap                  a PTE pointed at another frame, INVLPG, the new data (4.10.4.1)
 *     pf notpresent          a write to a not-present page: #PF, CR2, error code 0x2 (4.7);
 *                            the handler maps it and the write completes
 *     pf readonly            CR0.WP = 1, a write to a read-only page: #PF error 0x3
 *     wp0 write              CR0.WP = 0, a supervisor write to a read-only page succeeds (4.6)
 *     cr3 switch             the same linear address through two processes' trees
 * then "ctxsw check done" and exit value 0; an unexpected exception prints
 * "ctxsw: error: exception ..." and exits with 1.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long uptr;

#pragma GCC target("general-regs-only")

#define COM1_PORT 0x3F8
#define UART_LSR 5
#define LSR_THRE 0x20
#define THRE_POLL_LIMIT 0xFFFF
#define EXIT_PORT 0xF4
#define POST_PORT 0x80

#define MAXP 8
#define MAXK 64
#define USER_VA 0x8000000000UL /* PML4 index 1 */
#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_US 0x4UL
#define KERNEL_CS 0x08
#define TSS_SEL 0x38
#define DONE_VECTOR 0x81
#define PTE_A 0x20UL
#define PTE_D 0x40UL
#define CR0_WP (1UL << 16)
#define TEST_SLOT 200 /* PT slots from here are the self-check's (k <= 64) */

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void load_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }
static inline u64 read_cr0(void)
{
    u64 v;
    __asm__ volatile("mov %%cr0, %0" : "=r"(v));
    return v;
}
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }
static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}
static inline u64 read_cr4(void)
{
    u64 v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }
static inline u32 cpuid_ecx(u32 leaf)
{
    u32 a = leaf, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return c;
}
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }

static void __attribute__((noreturn)) guest_exit(u32 value)
{
    barrier();
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"((u16)EXIT_PORT) : "memory");
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void putc(char c)
{
    for (u32 n = THRE_POLL_LIMIT; n && !(inb(COM1_PORT + UART_LSR) & LSR_THRE); n--)
        ;
    outb(COM1_PORT, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_dec(u32 v)
{
    char digits[10];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(digits[--n]);
}

static void put_hex(u64 v)
{
    int shift = 60;
    puts("0x");
    while (shift > 0 && !((v >> shift) & 0xF))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

/* ------------------------------------------------------------ descriptor tables */

struct dtr {
    u16 limit;
    u64 base;
} __attribute__((packed));

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3, iomap_base;
    u8 iomap[65536 / 8 + 1]; /* all ports allowed; the extra byte must be 0xFF */
} __attribute__((packed));

static u64 idt[2 * (DONE_VECTOR + 1)] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
extern const u64 ctxsw_isr_table[32];
extern u64 ctxsw_tss_desc[2];
extern char ctxsw_stack_top[], ctxsw_user_done[];

static void set_gate(int v, u64 off, u64 type) /* 64-bit gate into KERNEL_CS */
{
    idt[2 * v] = (off & 0xFFFF) | ((u64)KERNEL_CS << 16) | (type << 40) | (((off >> 16) & 0xFFFF) << 48);
    idt[2 * v + 1] = off >> 32;
}

/* The IDT (exceptions; vector 0x81, a DPL3 gate, also ends a ring-3 slice) and a TSS
 * whose rsp0 is the kernel stack.  Its I/O bitmap allows every port: on
 * KVM-on-PVM ring-3 code runs with the host's IOPL, so KVM's emulator consults
 * the bitmap for each IN/OUT (as iobench.c explains). */
static void setup_cpu_tables(void)
{
    u64 base = (uptr)&tss, limit = sizeof(tss) - 1;
    tss.rsp0 = (uptr)ctxsw_stack_top;
    tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
    tss.iomap[sizeof(tss.iomap) - 1] = 0xFF;
    ctxsw_tss_desc[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
                        (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    ctxsw_tss_desc[1] = base >> 32; /* P, DPL0, 64-bit TSS (available) */
    for (int v = 0; v < 32; v++)
        set_gate(v, ctxsw_isr_table[v], 0x8E); /* P, DPL0, interrupt gate */
    set_gate(DONE_VECTOR, (uptr)ctxsw_user_done, 0xEE); /* P, DPL3 */
    struct dtr idtr = {sizeof(idt) - 1, (uptr)idt};
    __asm__ volatile("lidt %0\n\tltr %w1" : : "m"(idtr), "r"(TSS_SEL) : "memory");
}

/* --------------------------------------------------------------- processes */

struct tree {
    u64 pml4[512], pdpt[512], pd[512], pt[512];
};

extern u64 ctxsw_pml4[], ctxsw_pdpt[];
static struct tree trees[MAXP] __attribute__((aligned(4096)));
static u8 frames[MAXP][MAXK][4096] __attribute__((aligned(4096)));
static u8 spare[6][4096] __attribute__((aligned(4096)));

static void build_tree(u32 p, u32 k)
{
    struct tree *t = &trees[p];
    t->pml4[0] = (uptr)ctxsw_pdpt | PTE_P | PTE_RW | PTE_US;
    t->pml4[1] = (uptr)t->pdpt | PTE_P | PTE_RW | PTE_US;
    t->pdpt[0] = (uptr)t->pd | PTE_P | PTE_RW | PTE_US;
    t->pd[0] = (uptr)t->pt | PTE_P | PTE_RW | PTE_US;
    for (u32 i = 0; i < k; i++) {
        t->pt[i] = (uptr)frames[p][i] | PTE_P | PTE_RW | PTE_US;
        *(volatile u64 *)frames[p][i] = (u64)p << 16 | i;
    }
}

static inline volatile u64 *user_page(u32 i) { return (volatile u64 *)(USER_VA + (u64)i * 4096); }

/* ------------------------------------------------------------- exceptions */

static volatile u32 expecting_pf;
static volatile u64 pf_cr2, pf_error, pf_fix;
static volatile u64 *pf_pte;

void ctxsw_trap(u64 *frame) /* vector, error, rip, cs, rflags, rsp, ss */
{
    if (frame[0] == 14 && expecting_pf) {
        expecting_pf = 0;
        pf_cr2 = read_cr2();
        pf_error = frame[1];
        *pf_pte = pf_fix;
        invlpg(pf_cr2);
        return;
    }
    puts("ctxsw: error: exception vector=");
    put_dec((u32)frame[0]);
    puts(" error=");
    put_hex(frame[1]);
    puts(" rip=");
    put_hex(frame[2]);
    puts(" cr2=");
    put_hex(read_cr2());
    putc('\n');
    guest_exit(1);
}

/* ------------------------------------------------------------- the experiment */

static u32 g_p, g_n, g_k, g_x, g_ring, g_switch, g_pcid;
static volatile u64 g_sum;
static u8 user_stack[16384] __attribute__((aligned(16)));
void __attribute__((noreturn)) ctxsw_enter_user(void (*entry)(void), void *stack);
static void __attribute__((noreturn)) finish(void);

/* One time slice: X + 1 passes over the process's pages, a port write between passes. */
static inline __attribute__((always_inline)) void slice(void)
{
    u64 sum = 0;
    for (u32 pass = 0; pass <= g_x; pass++) {
        if (pass)
            outb(POST_PORT, (u8)pass);
        for (u32 i = 0; i < g_k; i++) {
            volatile u64 *w = user_page(i);
            u64 v = *w;
            sum += v;
            *w = v + 1;
        }
    }
    g_sum += sum;
}

static void __attribute__((noreturn, noinline)) user_slice(void) /* ring 3 */
{
    slice();
    __asm__ volatile(".globl ctxsw_slice_end\nctxsw_slice_end: ud2" : : : "memory");
    for (;;)
        ;
}

/* The kernel's loop, one switch per call: ring 0 runs the slice itself, ring 3
 * enters it (and comes back here through the slice's final #UD, on a fresh stack). */
void __attribute__((noreturn)) ctxsw_next(void)
{
    while (g_switch < g_n) {
        u32 q = g_switch % g_p;
        load_cr3((uptr)trees[q].pml4 | (g_pcid ? 1UL << 63 | (q + 1) : 0)); /* no flush */
        g_switch++;
        if (g_ring == 3)
            ctxsw_enter_user(user_slice, user_stack + sizeof(user_stack));
        slice();
    }
    finish();
}

static void __attribute__((noreturn)) finish(void)
{
    u32 p = g_p, n = g_n, k = g_k, x = g_x;
    u64 sum = g_sum;
    load_cr3((uptr)ctxsw_pml4);
    u32 ok = 1;
    for (u32 q = 0; q < p; q++) {
        u64 slices = (n / p + (q < n % p ? 1 : 0)) * (x + 1);
        for (u32 i = 0; i < k; i++)
            if (*(volatile u64 *)frames[q][i] != ((u64)q << 16 | i) + slices)
                ok = 0;
    }
    puts("ctxsw p=");
    put_dec(p);
    puts(" n=");
    put_dec(n);
    puts(" k=");
    put_dec(k);
    puts(" x=");
    put_dec(x);
    puts(" ring=");
    put_dec(g_ring);
    puts(" sum=");
    put_hex(sum & 0xFFFFFFFF);
    puts(ok ? " isolation=ok\n" : " isolation=bad\n");
    guest_exit(ok ? 0 : 1);
}

/* ------------------------------------------------------------- the self-check */

static void put_ad(const char *what, u64 pte)
{
    puts(what);
    puts(": A=");
    put_dec((pte & PTE_A) ? 1 : 0);
    puts(" D=");
    put_dec((pte & PTE_D) ? 1 : 0);
    putc('\n');
}

static u32 check(void)
{
    build_tree(0, 1);
    build_tree(1, 1);
    struct tree *t = &trees[0];
    volatile u64 *pt = t->pt;
    load_cr3((uptr)t->pml4);

    /* accessed and dirty flags */
    u64 va = USER_VA + TEST_SLOT * 4096UL;
    *(volatile u64 *)spare[0] = 0x5151;
    pt[TEST_SLOT] = (uptr)spare[0] | PTE_P | PTE_RW;
    invlpg(va);
    u64 v = *(volatile u64 *)va;
    put_ad("ad read", pt[TEST_SLOT]);
    *(volatile u64 *)va = v + 1;
    put_ad("ad write", pt[TEST_SLOT]);
    pt[TEST_SLOT] &= ~(PTE_A | PTE_D);
    invlpg(va);
    v = *(volatile u64 *)va;
    put_ad("ad reread", pt[TEST_SLOT]);
    puts("ad upper: A=");
    put_dec((t->pml4[1] & PTE_A) && (t->pdpt[0] & PTE_A) && (t->pd[0] & PTE_A) ? 1 : 0);
    puts(" value=");
    put_hex(*(volatile u64 *)spare[0]);
    putc('\n');

    /* remap */
    va = USER_VA + (TEST_SLOT + 1) * 4096UL;
    *(volatile u64 *)spare[1] = 0x11111111;
    *(volatile u64 *)spare[2] = 0x22222222;
    pt[TEST_SLOT + 1] = (uptr)spare[1] | PTE_P | PTE_RW;
    invlpg(va);
    u64 before = *(volatile u64 *)va;
    pt[TEST_SLOT + 1] = (uptr)spare[2] | PTE_P | PTE_RW;
    invlpg(va);
    u64 after = *(volatile u64 *)va;
    puts("remap: ");
    put_hex(before);
    puts(" -> ");
    put_hex(after);
    putc('\n');

    /* a true page fault: not present */
    va = USER_VA + (TEST_SLOT + 2) * 4096UL;
    pt[TEST_SLOT + 2] = 0;
    invlpg(va);
    pf_pte = &pt[TEST_SLOT + 2];
    pf_fix = (uptr)spare[3] | PTE_P | PTE_RW;
    expecting_pf = 1;
    *(volatile u64 *)va = 0x33;
    puts("pf notpresent: cr2=");
    put_hex(pf_cr2 - USER_VA);
    puts(" error=");
    put_hex(pf_error);
    puts(" value=");
    put_hex(*(volatile u64 *)spare[3]);
    putc('\n');

    /* CR0.WP = 1: a supervisor write to a read-only page faults */
    write_cr0(read_cr0() | CR0_WP);
    va = USER_VA + (TEST_SLOT + 3) * 4096UL;
    pt[TEST_SLOT + 3] = (uptr)spare[4] | PTE_P;
    invlpg(va);
    v = *(volatile u64 *)va;
    pf_pte = &pt[TEST_SLOT + 3];
    pf_fix = (uptr)spare[4] | PTE_P | PTE_RW;
    expecting_pf = 1;
    *(volatile u64 *)va = 0x44;
    puts("pf readonly: error=");
    put_hex(pf_error);
    puts(" value=");
    put_hex(*(volatile u64 *)spare[4]);
    putc('\n');

    /* CR0.WP = 0: the same write does not fault */
    write_cr0(read_cr0() & ~CR0_WP);
    va = USER_VA + (TEST_SLOT + 4) * 4096UL;
    pt[TEST_SLOT + 4] = (uptr)spare[5] | PTE_P;
    invlpg(va);
    expecting_pf = 1;
    pf_error = 0;
    *(volatile u64 *)va = 0x55;
    puts("wp0 write: faulted=");
    put_dec(expecting_pf ? 0 : 1);
    expecting_pf = 0;
    puts(" value=");
    put_hex(*(volatile u64 *)spare[5]);
    put_ad(" pte", pt[TEST_SLOT + 4]);

    /* the same linear address through two trees */
    u64 a = *user_page(0);
    load_cr3((uptr)trees[1].pml4);
    u64 b = *user_page(0);
    load_cr3((uptr)t->pml4);
    u64 c = *user_page(0);
    puts("cr3 switch: ");
    put_hex(a);
    puts(" ");
    put_hex(b);
    puts(" ");
    put_hex(c);
    putc('\n');
    load_cr3((uptr)ctxsw_pml4);
    puts("ctxsw check done\n");
    return 0;
}

/* ------------------------------------------------------------- command line */

static int word_is(const char *s, const char *w)
{
    while (*w && *s == *w)
        s++, w++;
    return !*w && (!*s || *s == ' ');
}

static u32 parse_u32(const char *s)
{
    u32 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u32)(*s++ - '0');
    return v;
}

void __attribute__((noreturn)) ctxsw_main(u32 cmdline)
{
    setup_cpu_tables();
    u32 p = 4, n = 1000, k = 8, x = 1, ring = 0, do_check = 0, pcid = 0;
    const char *s = (const char *)(uptr)cmdline;
    while (s && *s) {
        while (*s == ' ')
            s++;
        if (s[0] == 'p' && s[1] == '=')
            p = parse_u32(s + 2);
        else if (s[0] == 'n' && s[1] == '=')
            n = parse_u32(s + 2);
        else if (s[0] == 'k' && s[1] == '=')
            k = parse_u32(s + 2);
        else if (s[0] == 'x' && s[1] == '=')
            x = parse_u32(s + 2);
        else if (s[0] == 'r' && s[1] == 'i' && s[2] == 'n' && s[3] == 'g' && s[4] == '=')
            ring = parse_u32(s + 5);
        else if (s[0] == 'p' && s[1] == 'c' && s[2] == 'i' && s[3] == 'd' && s[4] == '=')
            pcid = parse_u32(s + 5);
        else if (word_is(s, "check"))
            do_check = 1;
        while (*s && *s != ' ')
            s++;
    }
    if (do_check)
        guest_exit(check());
    if (p < 1 || p > MAXP || k < 1 || k > MAXK || x > 16 || (ring != 0 && ring != 3)) {
        puts("ctxsw: error: p must be 1..8, k 1..64, x 0..16 and ring 0 or 3\n");
        guest_exit(1);
    }
    if (pcid > 1 || (pcid && !(cpuid_ecx(1) & (1U << 17)))) {
        puts("ctxsw: error: pcid=1 needs CPUID.01H:ECX.PCID (pcid is 0 or 1)\n");
        guest_exit(1);
    }
    if (pcid)
        write_cr4(read_cr4() | 1UL << 17); /* CR3[11:0] is 0 here: SDM 4.10.1 */
    g_p = p, g_n = n, g_k = k, g_x = x, g_ring = ring, g_pcid = pcid;
    for (u32 q = 0; q < p; q++)
        build_tree(q, k);
    ctxsw_next();
}
