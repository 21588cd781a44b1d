/* ctxsw.c - the guest of the context-switch experiment, and a paging self-check.
 *
 * Freestanding 64-bit C, linked with ctxsw.s (multiboot entry, long mode, 4 GiB
 * identity map with 2 MiB pages, exception path: lib/long64.inc) and lib/rt.c (serial
 * output, command-line words, IDT/TSS); runs at ring 0.
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

#include "lib/rt.h"

#define MAXP 8
#define MAXK 64
#define USER_VA 0x8000000000UL /* PML4 index 1 */
#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_US 0x4UL
#define DONE_VECTOR 0x81
#define PTE_A 0x20UL
#define PTE_D 0x40UL
#define CR0_WP (1UL << 16)
#define TEST_SLOT 200 /* PT slots from here are the self-check's (k <= 64) */

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
    debug_exit(value);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------ descriptor tables */

static struct gate64 idt[DONE_VECTOR + 1] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
extern char ctxsw_user_done[];

/* The IDT (exceptions; vector 0x81, a DPL3 gate, also ends a ring-3 slice) and a TSS
 * whose rsp0 is the kernel stack (and whose I/O bitmap allows every port, see rt.h). */
static void setup_cpu_tables(void)
{
    for (int v = 0; v < 32; v++)
        idt[v] = gate64(long64_isr_table[v], 0x8E);            /* P, DPL0, interrupt gate */
    idt[DONE_VECTOR] = gate64((uptr)ctxsw_user_done, 0xEE); /* P, DPL3 */
    load_idt(idt, sizeof(idt));
    tss_load(&tss, long64_kstack_top);
}

/* --------------------------------------------------------------- processes */

struct tree {
    u64 pml4[512], pdpt[512], pd[512], pt[512];
};

static struct tree trees[MAXP] __attribute__((aligned(4096)));
static u8 frames[MAXP][MAXK][4096] __attribute__((aligned(4096)));
static u8 spare[6][4096] __attribute__((aligned(4096)));

static void build_tree(u32 p, u32 k)
{
    struct tree *t = &trees[p];
    t->pml4[0] = (uptr)long64_pdpt | PTE_P | PTE_RW | PTE_US;
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
    rt_puts("ctxsw: error: exception vector=");
    rt_put_dec((u32)frame[0]);
    rt_puts(" error=");
    rt_put_hex(frame[1]);
    rt_puts(" rip=");
    rt_put_hex(frame[2]);
    rt_puts(" cr2=");
    rt_put_hex(read_cr2());
    rt_putc('\n');
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
    load_cr3((uptr)long64_pml4);
    u32 ok = 1;
    for (u32 q = 0; q < p; q++) {
        u64 slices = (n / p + (q < n % p ? 1 : 0)) * (x + 1);
        for (u32 i = 0; i < k; i++)
            if (*(volatile u64 *)frames[q][i] != ((u64)q << 16 | i) + slices)
                ok = 0;
    }
    rt_puts("ctxsw p=");
    rt_put_dec(p);
    rt_puts(" n=");
    rt_put_dec(n);
    rt_puts(" k=");
    rt_put_dec(k);
    rt_puts(" x=");
    rt_put_dec(x);
    rt_puts(" ring=");
    rt_put_dec(g_ring);
    rt_puts(" sum=");
    rt_put_hex(sum & 0xFFFFFFFF);
    rt_puts(ok ? " isolation=ok\n" : " isolation=bad\n");
    guest_exit(ok ? 0 : 1);
}

/* ------------------------------------------------------------- the self-check */

static void put_ad(const char *what, u64 pte)
{
    rt_puts(what);
    rt_puts(": A=");
    rt_put_dec((pte & PTE_A) ? 1 : 0);
    rt_puts(" D=");
    rt_put_dec((pte & PTE_D) ? 1 : 0);
    rt_putc('\n');
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
    rt_puts("ad upper: A=");
    rt_put_dec((t->pml4[1] & PTE_A) && (t->pdpt[0] & PTE_A) && (t->pd[0] & PTE_A) ? 1 : 0);
    rt_puts(" value=");
    rt_put_hex(*(volatile u64 *)spare[0]);
    rt_putc('\n');

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
    rt_puts("remap: ");
    rt_put_hex(before);
    rt_puts(" -> ");
    rt_put_hex(after);
    rt_putc('\n');

    /* a true page fault: not present */
    va = USER_VA + (TEST_SLOT + 2) * 4096UL;
    pt[TEST_SLOT + 2] = 0;
    invlpg(va);
    pf_pte = &pt[TEST_SLOT + 2];
    pf_fix = (uptr)spare[3] | PTE_P | PTE_RW;
    expecting_pf = 1;
    *(volatile u64 *)va = 0x33;
    rt_puts("pf notpresent: cr2=");
    rt_put_hex(pf_cr2 - USER_VA);
    rt_puts(" error=");
    rt_put_hex(pf_error);
    rt_puts(" value=");
    rt_put_hex(*(volatile u64 *)spare[3]);
    rt_putc('\n');

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
    rt_puts("pf readonly: error=");
    rt_put_hex(pf_error);
    rt_puts(" value=");
    rt_put_hex(*(volatile u64 *)spare[4]);
    rt_putc('\n');

    /* CR0.WP = 0: the same write does not fault */
    write_cr0(read_cr0() & ~CR0_WP);
    va = USER_VA + (TEST_SLOT + 4) * 4096UL;
    pt[TEST_SLOT + 4] = (uptr)spare[5] | PTE_P;
    invlpg(va);
    expecting_pf = 1;
    pf_error = 0;
    *(volatile u64 *)va = 0x55;
    rt_puts("wp0 write: faulted=");
    rt_put_dec(expecting_pf ? 0 : 1);
    expecting_pf = 0;
    rt_puts(" value=");
    rt_put_hex(*(volatile u64 *)spare[5]);
    put_ad(" pte", pt[TEST_SLOT + 4]);

    /* the same linear address through two trees */
    u64 a = *user_page(0);
    load_cr3((uptr)trees[1].pml4);
    u64 b = *user_page(0);
    load_cr3((uptr)t->pml4);
    u64 c = *user_page(0);
    rt_puts("cr3 switch: ");
    rt_put_hex(a);
    rt_puts(" ");
    rt_put_hex(b);
    rt_puts(" ");
    rt_put_hex(c);
    rt_putc('\n');
    load_cr3((uptr)long64_pml4);
    rt_puts("ctxsw check done\n");
    return 0;
}

/* ------------------------------------------------------------- command line */

static u32 leading_digits(const char *s) /* the decimal number at s, 0 if none; no checks */
{
    u32 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u32)(*s++ - '0');
    return v;
}

static struct {
    u32 p, n, k, x, ring, check, pcid;
} arg = {4, 1000, 8, 1, 0, 0, 0};

static int take_word(const char *s) /* unknown words are ignored; values are checked later */
{
    const char *v;
    if (starts_with(s, "p=", &v))
        arg.p = leading_digits(v);
    else if (starts_with(s, "n=", &v))
        arg.n = leading_digits(v);
    else if (starts_with(s, "k=", &v))
        arg.k = leading_digits(v);
    else if (starts_with(s, "x=", &v))
        arg.x = leading_digits(v);
    else if (starts_with(s, "ring=", &v))
        arg.ring = leading_digits(v);
    else if (starts_with(s, "pcid=", &v))
        arg.pcid = leading_digits(v);
    else if (word_is(s, "check"))
        arg.check = 1;
    return 1;
}

void __attribute__((noreturn)) ctxsw_main(u32 cmdline)
{
    setup_cpu_tables();
    parse_args(cmdline, take_word, "ctxsw", ""); /* takes every word */
    if (arg.check)
        guest_exit(check());
    u32 p = arg.p, k = arg.k;
    if (p < 1 || p > MAXP || k < 1 || k > MAXK || arg.x > 16 || (arg.ring != 0 && arg.ring != 3)) {
        rt_puts("ctxsw: error: p must be 1..8, k 1..64, x 0..16 and ring 0 or 3\n");
        guest_exit(1);
    }
    if (arg.pcid > 1 || (arg.pcid && !(cpuid_ecx(1) & (1U << 17)))) {
        rt_puts("ctxsw: error: pcid=1 needs CPUID.01H:ECX.PCID (pcid is 0 or 1)\n");
        guest_exit(1);
    }
    if (arg.pcid)
        write_cr4(read_cr4() | 1UL << 17); /* CR3[11:0] is 0 here: SDM 4.10.1 */
    g_p = p, g_n = arg.n, g_k = k, g_x = arg.x, g_ring = arg.ring, g_pcid = arg.pcid;
    for (u32 q = 0; q < p; q++)
        build_tree(q, k);
    ctxsw_next();
}
