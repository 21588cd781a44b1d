/* exitmix.c - the guest of the exit-rate experiment: a mixed workload whose I/O
 * intensity is a parameter.
 *
 * Freestanding 64-bit C built like iobench.c (see hvm/guests/__init__.py); exitmix.s
 * boots it into long mode and calls exitmix_main at ring 0, where it stays.
 *
 * The work is `units` units; each unit does, in this order:
 *     work=W   W rounds of a register-only xorshift step (CPU-bound, no exit)
 *     sys=S    S "system calls": each writes IA32_TSC_AUX (C0000103H) with the call's
 *              number 1, 2, ... as a kernel's system-call entry does (WRMSR at ring 0)
 *     io=K     K commands to the command device (hvm/devices/cmddev.py) through
 *              design=pio|mmio|dirty: a 16-byte descriptor {seq, buf_gpa, len,
 *              result_gpa} for 64 bytes of data (byte i of command k is
 *              (k * 7 + i) & 0xFF), rung by OUT to port 0x524 (pio), a 32-bit store
 *              to D0000004H (mmio), or published in the ring at
 *              D0101000H with PRODUCER at D0100004H (dirty; at most 256 in flight,
 *              waiting on STATUS at D0100000H while the ring is full)
 *     ipi=I    I self-IPIs: a write of (shorthand "self" | fixed | vector 41H) to the
 *              local APIC's ICR low (FEE00300H, SDM Vol. 3A 11.6.1), each followed by
 *              PAUSE until its handler ran (at most 1,000,000 times)
 * then, with tick=T > 0 and halt=H, the guest idles: HLT until H more timer interrupts came.
 * With tick=T > 0 the local APIC timer runs periodic (LVT timer FEE00320H = 20040H:
 * periodic, vector 40H; divide configuration FEE003E0H = 1011b: divide by 1; initial
 * count FEE00380H = T; SDM Vol. 3A 11.5.4) from before the first unit until after the
 * last; the handlers (exitmix.s) count interrupts and write EOI.  With tick or ipi the
 * local APIC is software-enabled first (SVR FEE000F0H = 1FFH: enable, spurious vector
 * FFH) and IF is set; otherwise IF stays clear and the APIC page is never touched.
 * The units, the wait for the commands (dirty) and the idle HLTs are bracketed by two byte
 * writes to port 510H, 1 before and 2 after, so a VMM can count exits of that phase alone.
 * After the last unit the guest waits (dirty) until every command completed, masks
 * the timer, clears IF, reads IA32_TSC_AUX back (RDMSR; only if sys > 0), checks each
 * command's CRC-32 result and prints one line:
 *     exitmix design=D units=N work=W io=K sys=S ipi=I tick=T halt=H sent=C completed=C
 *         ticks=X ipis=Y spurious=Z tsc_aux=V bad=B sum=0xXXXXXXXX
 * then leaves through isa-debug-exit (port F4H) with 0 if sent == completed ==
 * units * io, bad == 0, ipis == units * ipi and tsc_aux == units * sys, else 1.
 * A bad argument or a CPU exception prints one line starting "exitmix: error:" and
 * exits with 1.
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

#define PHASE_PORT 0x510 /* OUT 1: the measured phase starts; OUT 2: it ends */
#define PIO_STATUS_PORT 0x520
#define PIO_DOORBELL_PORT 0x524
#define MMIO_DOORBELL_GPA 0xD0000004
#define DIRTY_GPA 0xD0100000
#define DIRTY_RING_GPA 0xD0101000
#define RESULTS_GPA 0x01000000
#define SLOTS 256
#define CMD_LEN 64
#define MAX_CMDS 1000000
#define MAXWAIT 4000000000u
#define IPI_WAIT 1000000u /* PAUSE loops waiting for one self-IPI */

#define LAPIC 0xFEE00000u
#define LAPIC_TPR 0x80
#define LAPIC_SVR 0xF0
#define LAPIC_ICR_LO 0x300
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_DCR 0x3E0
#define TIMER_VECTOR 0x40
#define IPI_VECTOR 0x41
#define SPURIOUS_VECTOR 0xFF
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define ICR_SELF (1u << 18) /* destination shorthand 01b: self */
#define MSR_TSC_AUX 0xC0000103u
#define KERNEL_CS 0x08

#define barrier() __asm__ volatile("" ::: "memory")

enum design { PIO, MMIO, DIRTY, NDESIGNS };
static const char *const design_names[NDESIGNS] = {"pio", "mmio", "dirty"};

static struct {
    u32 design, units, work, io, sys, ipi, tick, halt;
} cfg = {PIO, 100, 1000, 0, 1, 0, 0, 0};

extern volatile u64 exitmix_ticks, exitmix_ipis, exitmix_spurious;
extern const u64 exitmix_isr_table[32];
extern char exitmix_timer_isr[], exitmix_ipi_isr[], exitmix_spurious_isr[];

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }

static inline void *phys(u32 addr)
{
    void *p;
    __asm__("" : "=r"(p) : "0"((uptr)addr));
    return p;
}
static inline u32 gpa(const volatile void *p) { return (u32)(uptr)p; }

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)phys(LAPIC + reg) = v; }

static void __attribute__((noreturn)) guest_exit(u32 value)
{
    barrier();
    __asm__ volatile("cli; outl %0, %1" : : "a"(value), "Nd"((u16)EXIT_PORT) : "memory");
    for (;;)
        __asm__ volatile("hlt");
}

/* -------------------------------------------------------------- serial */

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
static void put_dec(u64 v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(digits[--n]);
}
static void put_hex32(u32 v)
{
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xF]);
}
static void put_kv(const char *key, u64 v)
{
    putc(' ');
    puts(key);
    putc('=');
    put_dec(v);
}
static void put_word(const char *s)
{
    while (*s && *s != ' ')
        putc(*s++);
}

/* --------------------------------------------------------- descriptor tables */

struct dtr {
    u16 limit;
    u64 base;
} __attribute__((packed));

struct gate64 {
    u64 lo, hi;
};

static struct gate64 idt[256] __attribute__((aligned(16)));

static struct gate64 gate(u64 offset) /* P, DPL0, 64-bit interrupt gate into KERNEL_CS */
{
    struct gate64 g = {
        (offset & 0xFFFF) | ((u64)KERNEL_CS << 16) | (0x8EUL << 40) | (((offset >> 16) & 0xFFFF) << 48),
        offset >> 32,
    };
    return g;
}

static void setup_idt(void)
{
    for (int v = 0; v < 32; v++)
        idt[v] = gate(exitmix_isr_table[v]);
    idt[TIMER_VECTOR] = gate((uptr)exitmix_timer_isr);
    idt[IPI_VECTOR] = gate((uptr)exitmix_ipi_isr);
    idt[SPURIOUS_VECTOR] = gate((uptr)exitmix_spurious_isr);
    struct dtr idtr = {sizeof(idt) - 1, (uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

void __attribute__((noreturn)) exitmix_fault(const u64 *frame) /* vector, error, rip, cs, ... */
{
    puts("exitmix: error: CPU exception vector=");
    put_dec(frame[0]);
    puts(" error=");
    put_hex32((u32)frame[1]);
    puts(" rip=");
    put_hex32((u32)frame[2]);
    putc('\n');
    guest_exit(1);
}

/* -------------------------------------------------------------- CRC-32 */

static u32 crc_table[256];

static void crc_init(void)
{
    for (u32 n = 0; n < 256; n++) {
        u32 c = n;
        for (int b = 0; b < 8; b++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static u32 crc32(const volatile u8 *p, u32 len) /* zlib.crc32(data) */
{
    u32 c = 0xFFFFFFFFu;
    while (len--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------- the work */

struct desc {
    u32 seq, buf_gpa, len, result_gpa;
};

static struct desc descs[SLOTS] __attribute__((aligned(16)));
static u8 bufs[SLOTS][CMD_LEN] __attribute__((aligned(16)));
static u32 expected[SLOTS];
static u32 sent, completed, syscalls, stalled;

static u32 dirty_status(void) { return *(volatile u32 *)phys(DIRTY_GPA); }

static void send_command(void)
{
    u32 k = sent, slot = k % SLOTS;
    if (cfg.design == DIRTY) {
        for (u32 n = 0; k - dirty_status() >= SLOTS; n++) { /* the ring is full: wait for a harvest */
            if (n == MAXWAIT) {
                stalled = 1;
                return;
            }
        }
    }
    volatile struct desc *d =
        cfg.design == DIRTY ? (volatile struct desc *)phys(DIRTY_RING_GPA) + slot : &descs[slot];
    d->seq = k;
    d->buf_gpa = gpa(bufs[slot]);
    d->len = CMD_LEN;
    d->result_gpa = RESULTS_GPA + 4 * k;
    barrier();
    if (cfg.design == PIO)
        outl(PIO_DOORBELL_PORT, gpa(d));
    else if (cfg.design == MMIO)
        *(volatile u32 *)phys(MMIO_DOORBELL_GPA) = gpa(d);
    else
        *(volatile u32 *)phys(DIRTY_GPA + 4) = k + 1; /* PRODUCER, after the slot */
    barrier();
    sent = k + 1;
}

static void syscall_entry(void) /* what a kernel's system-call entry does with IA32_TSC_AUX */
{
    u32 n = ++syscalls;
    __asm__ volatile("wrmsr" : : "c"(MSR_TSC_AUX), "a"(n), "d"(0) : "memory");
}

/* One self-IPI, then wait until its handler ran: a second IPI of the same vector sent while
 * the first still waits in the IRR would merge with it (one IRR bit per vector, SDM Vol. 3A
 * 11.8.4), and a hypervisor may deliver it only at its next entry. */
static void self_ipi(void)
{
    u64 before = exitmix_ipis;
    lapic_write(LAPIC_ICR_LO, ICR_SELF | IPI_VECTOR);
    for (u32 n = 0; exitmix_ipis == before && n < IPI_WAIT; n++)
        __asm__ volatile("pause" ::: "memory");
}

static u32 cpu_work(u32 x, u32 rounds)
{
    for (u32 i = 0; i < rounds; i++) { /* xorshift32: registers only */
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        __asm__("" : "+r"(x));
    }
    return x;
}

/* ------------------------------------------------------- the command line */

static int starts_with(const char *s, const char *prefix, const char **rest)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    *rest = s;
    return 1;
}
static int is_end(char c) { return c == 0 || c == ' '; }
static int parse_u32(const char *s, u32 *out)
{
    u32 v = 0;
    if (is_end(*s))
        return 0;
    for (; !is_end(*s); s++) {
        u32 digit = (u32)(*s - '0');
        if (digit > 9 || v > (0xFFFFFFFFu - digit) / 10)
            return 0;
        v = v * 10 + digit;
    }
    *out = v;
    return 1;
}
static int word_is(const char *s, const char *word)
{
    while (*word)
        if (*s++ != *word++)
            return 0;
    return is_end(*s);
}

static int parse_cmdline(const char *line)
{
    static const struct {
        const char *key;
        u32 *value;
    } keys[] = {{"units=", &cfg.units}, {"work=", &cfg.work}, {"io=", &cfg.io},
                {"sys=", &cfg.sys},     {"ipi=", &cfg.ipi},   {"tick=", &cfg.tick},
                {"halt=", &cfg.halt}};
    if (!line)
        return 1;
    for (const char *p = line; *p; p++) {
        if (p != line && p[-1] != ' ')
            continue;
        const char *v;
        int ok = 1;
        if (starts_with(p, "design=", &v)) {
            u32 d;
            for (d = 0; d < NDESIGNS && !word_is(v, design_names[d]); d++)
                ;
            ok = d < NDESIGNS;
            if (ok)
                cfg.design = d;
        } else {
            for (u32 i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
                if (starts_with(p, keys[i].key, &v))
                    ok = parse_u32(v, keys[i].value);
        }
        if (!ok) {
            puts("exitmix: error: bad argument '");
            put_word(p);
            puts("' (design=pio|mmio|dirty units=N work=N io=N sys=N ipi=N tick=N halt=N)\n");
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- entry */

void __attribute__((noreturn)) exitmix_main(u32 cmdline_gpa, u32 mem_upper_kib)
{
    setup_idt();
    if (!parse_cmdline(cmdline_gpa ? phys(cmdline_gpa) : 0))
        guest_exit(1);
    u64 cmds = (u64)cfg.units * cfg.io;
    if (cmds > MAX_CMDS || (mem_upper_kib != 0xFFFFFFFFu && cmds &&
                            RESULTS_GPA + 4 * cmds > 0x100000 + (u64)mem_upper_kib * 1024)) {
        puts("exitmix: error: units * io = ");
        put_dec(cmds);
        puts(" commands do not fit\n");
        guest_exit(1);
    }
    crc_init();
    for (u32 s = 0; s < SLOTS; s++) {
        for (u32 i = 0; i < CMD_LEN; i++)
            bufs[s][i] = (u8)(s * 7 + i);
        expected[s] = crc32(bufs[s], CMD_LEN);
    }
    volatile u32 *results = phys(RESULTS_GPA);
    for (u32 k = 0; k < cmds; k++)
        results[k] = ~expected[k % SLOTS];
    if (cfg.design == DIRTY)
        *(volatile u32 *)phys(DIRTY_GPA + 4) = 0;

    int apic = cfg.tick || cfg.ipi;
    if (apic) {
        lapic_write(LAPIC_TPR, 0);
        lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
        if (cfg.tick) {
            lapic_write(LAPIC_TIMER_DCR, 0xB);
            lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
            lapic_write(LAPIC_TIMER_ICR, cfg.tick);
        }
        __asm__ volatile("sti" ::: "memory");
    }

    u32 x = 2463534242u;
    outb(PHASE_PORT, 1);
    for (u32 u = 0; u < cfg.units && !stalled; u++) {
        x = cpu_work(x, cfg.work);
        for (u32 s = 0; s < cfg.sys; s++)
            syscall_entry();
        for (u32 k = 0; k < cfg.io && !stalled; k++)
            send_command();
        for (u32 i = 0; i < cfg.ipi; i++)
            self_ipi();
    }
    if (cfg.design == DIRTY) {
        for (u32 n = 0; dirty_status() != sent && n < MAXWAIT; n++)
            ;
        completed = dirty_status();
    } else {
        completed = sent; /* the doorbell exit completed each command before the guest resumed */
    }
    /* Idle: HLT until `halt` more timer interrupts arrived (STI's interrupt shadow covers the
     * HLT, so a tick between the check and the HLT still wakes it, SDM Vol. 2B STI). */
    if (cfg.tick) {
        u64 until = exitmix_ticks + cfg.halt;
        while (exitmix_ticks < until)
            __asm__ volatile("sti; hlt" ::: "memory");
    }
    outb(PHASE_PORT, 2);
    if (apic) {
        if (cfg.tick)
            lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
        __asm__ volatile("cli" ::: "memory");
    }
    u32 aux = 0;
    if (cfg.sys) {
        u32 lo, hi;
        __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(MSR_TSC_AUX));
        aux = lo;
    }
    u32 bad = 0;
    for (u32 k = 0; k < sent; k++)
        bad += results[k] != expected[k % SLOTS];

    puts("exitmix design=");
    puts(design_names[cfg.design]);
    put_kv("units", cfg.units);
    put_kv("work", cfg.work);
    put_kv("io", cfg.io);
    put_kv("sys", cfg.sys);
    put_kv("ipi", cfg.ipi);
    put_kv("tick", cfg.tick);
    put_kv("halt", cfg.halt);
    put_kv("sent", sent);
    put_kv("completed", completed);
    put_kv("ticks", exitmix_ticks);
    put_kv("ipis", exitmix_ipis);
    put_kv("spurious", exitmix_spurious);
    put_kv("tsc_aux", aux);
    put_kv("bad", bad);
    puts(" sum=");
    put_hex32(x);
    putc('\n');
    int ok = sent == cmds && completed == cmds && bad == 0 && exitmix_ipis == (u64)cfg.units * cfg.ipi &&
             aux == cfg.units * cfg.sys;
    guest_exit(ok ? 0 : 1);
}
