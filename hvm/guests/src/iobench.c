/* iobench.c - the guest of the I/O experiment: "a guest reads a device status
 * register 1,000,000 times and writes 30,000 commands".
 *
 * Freestanding 64-bit C (no libc, no libgcc), built with
 *     gcc -m64 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2
 *         -mno-red-zone -mgeneral-regs-only -c
 * and linked with iobench.s, which boots through multiboot in 32-bit mode (with
 * lib.inc), switches to long mode (4 GiB identity-mapped with 2 MiB pages) and
 * calls iobench_main at ring 0.  Why 64-bit: on this project's KVM host (KVM on
 * PVM) only 64-bit ring-3 code runs natively; all other guest code, 32-bit
 * ring 3 included, goes through KVM's instruction emulator (~2M instr/s).
 *
 * Command line (words; QEMU and hvm pass "IMAGE-PATH ARGS"; unknown words are
 * ignored, a known key with a bad value is an error; the last one wins):
 *     design=pio|mmio|coalesced|dirty   how the device is reached (default pio)
 *     r=N        status reads in the main loop           (default 1000000)
 *     w=N        commands, at most 2000000               (default 30000)
 *     cpl=0|3    ring the loop runs in                   (default 3)
 *     maxwait=N  bound on the stall reads and, separately, on the drain reads
 *                                                        (default 4000000000)
 * and two modes that need no device (for testing under plain QEMU):
 *     design=loopback  the same loop against a software device in the guest
 *                      that completes one command per STATUS read and checks
 *                      every descriptor field
 *     design=selftest  prints "iobench selftest k=K crc=0xXXXXXXXX" for k < w
 *
 * The device (hvm/devices/cmddev.py): a command is a 16-byte descriptor of
 * little-endian u32s {seq, buf_gpa, len, result_gpa}; the device writes the
 * CRC-32 (zlib's) of the len bytes at buf_gpa to result_gpa and increments its
 * completed counter, which the guest reads as STATUS.
 *     pio        STATUS = inl 0x520, DOORBELL = outl 0x524 <descriptor address>
 *     mmio       STATUS = [0xD0000000], DOORBELL = [0xD0000004] (32-bit)
 *     coalesced  the same registers; DOORBELL writes are coalesced by KVM
 *     dirty      ordinary memory at 0xD0100000: +0 STATUS (device-written),
 *                +4 PRODUCER (guest-written), +0x1000 a ring of 256 descriptors
 * Command k: 64 bytes, byte i = (k * 7 + i) & 0xFF, in buffer slot k % 256;
 * descriptor slot k % 256 (descs[] for pio/mmio/coalesced, the ring for dirty);
 * result at RESULTS_GPA + 4k, latency (TSC ticks from the doorbell to the
 * STATUS read that showed the completion, saturated to u32) at LATENCY_GPA + 4k.
 * Command k is sent at loop iteration floor(k * r / w), once k - completed <
 * 256; until then the guest keeps reading STATUS (stall_reads).  After the loop
 * it reads STATUS until everything sent has completed (drain_reads).
 *
 * A device that misbehaves cannot hang the guest: a STATUS value that is not
 * in [completed, sent] while commands are outstanding (e.g. QEMU's all-ones
 * read of an empty port) counts as one bad result and stops all sending and
 * waiting; stalls and the drain each give up after maxwait reads.  While no
 * command is outstanding the value read is not interpreted.
 *
 * Output: exactly one line,
 *     iobench design=D r=R w=W cpl=C sent=S completed=N stall_reads=X drain_reads=Y bad_results=B
 * where bad_results = commands k < sent whose result is not the CRC-32 of its
 * data, plus 1 if STATUS was ever impossible.  Exit value (isa-debug-exit,
 * port 0xF4) 0 if sent == completed == w and bad_results == 0, else 1.
 * Errors (bad arguments, too little memory, a CPU exception) print one line
 * starting "iobench: error:" and exit with value 1.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long uptr;

/* CR4.OSFXSR stays clear: no SSE code, ever (the build says so too). */
#pragma GCC target("general-regs-only")

/* ------------------------------------------------------------ constants */

#define COM1_PORT 0x3F8
#define UART_LSR 5
#define LSR_THRE 0x20
#define THRE_POLL_LIMIT 0xFFFF
#define EXIT_PORT 0xF4

#define PIO_STATUS_PORT 0x520
#define PIO_DOORBELL_PORT 0x524
#define MMIO_STATUS_GPA 0xD0000000
#define MMIO_DOORBELL_GPA 0xD0000004
#define DIRTY_GPA 0xD0100000         /* +0 STATUS, +4 PRODUCER */
#define DIRTY_RING_GPA 0xD0101000    /* 256 descriptor slots of 16 bytes */
#define RESULTS_GPA 0x01000000       /* u32 results[w] */
#define LATENCY_GPA 0x01800000       /* u32 latency_tsc[w] */
#define SLOTS 256
#define CMD_LEN 64
#define MAX_W 2000000
#define DEFAULT_R 1000000
#define DEFAULT_W 30000
#define DEFAULT_CPL 3
#define DEFAULT_MAXWAIT 4000000000

/* The layout as symbols in the image, so tests can compare with the device. */
#define STR_(x) #x
#define STR(x) STR_(x)
#define EXPORT(name) __asm__(".set IOBENCH_" #name ", " STR(name))
EXPORT(PIO_STATUS_PORT);
EXPORT(PIO_DOORBELL_PORT);
EXPORT(MMIO_STATUS_GPA);
EXPORT(MMIO_DOORBELL_GPA);
EXPORT(DIRTY_GPA);
EXPORT(DIRTY_RING_GPA);
EXPORT(RESULTS_GPA);
EXPORT(LATENCY_GPA);
EXPORT(SLOTS);
EXPORT(CMD_LEN);
EXPORT(MAX_W);
EXPORT(DEFAULT_R);
EXPORT(DEFAULT_W);
EXPORT(DEFAULT_CPL);
EXPORT(DEFAULT_MAXWAIT);

/* iobench_gdt in iobench.s: 64-bit code 0x08, data 0x10 (ring 0); 64-bit
 * code 0x28, data 0x30 (ring 3); the 64-bit TSS at 0x38, filled in here. */
#define KERNEL_CS 0x08
#define USER_CS (0x28 | 3)
#define TSS_SEL 0x38
#define HALT_VECTOR 0x80


#define NEVER 0xFFFFFFFFu /* no loop iteration has this number (i < r <= 2^32 - 1) */

enum design { PIO, MMIO, COALESCED, DIRTY, LOOPBACK, SELFTEST, NDESIGNS };
static const char *const design_names[NDESIGNS] = {
    "pio", "mmio", "coalesced", "dirty", "loopback", "selftest",
};

/* ------------------------------------------------------------ CPU helpers */

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* A pointer to a guest-physical address (the first 4 GiB are identity-mapped).
 * Laundered through an empty asm so the compiler treats it as an unknown
 * object, not as "an array at a constant address". */
static inline void *phys(u32 addr)
{
    void *p;
    __asm__("" : "=r"(p) : "0"((uptr)addr));
    return p;
}

static inline u32 gpa(const volatile void *p) { return (u32)(uptr)p; }

/* Leave through isa-debug-exit; from ring 3 `hlt` would fault, so ask ring 0
 * (int 0x80, a DPL3 gate to iobench_halt) to halt if the VMM keeps running. */
static void __attribute__((noreturn)) guest_exit(u32 value)
{
    barrier(); /* every result and latency store is done before the exit */
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"((u16)EXIT_PORT) : "memory");
    for (;;)
        __asm__ volatile("int %0" : : "i"(HALT_VECTOR));
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

static void put_hex32(u32 v)
{
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

static void put_kv(const char *key, u32 v)
{
    putc(' ');
    puts(key);
    putc('=');
    put_dec(v);
}

static void put_word(const char *s) /* up to the next space or the end */
{
    while (*s && *s != ' ')
        putc(*s++);
}

/* --------------------------------------------------------- descriptor tables */

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

struct gate64 {
    u64 lo, hi;
};

static struct gate64 idt[HALT_VECTOR + 1] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));

extern u64 iobench_gdt[];
extern char iobench_kstack_top[], iobench_ustack_top[];
extern const u64 iobench_isr_table[32];
extern char iobench_halt[];
void __attribute__((noreturn)) iobench_enter_user(void (*entry)(void), void *stack);

static struct gate64 gate(u64 offset, u32 type) /* 64-bit gate into KERNEL_CS */
{
    struct gate64 g = {
        (offset & 0xFFFF) | ((u64)KERNEL_CS << 16) | ((u64)type << 40) | (((offset >> 16) & 0xFFFF) << 48),
        offset >> 32,
    };
    return g;
}

/* A 64-bit TSS whose rsp0 gives ring-3 exceptions a kernel stack, and an IDT
 * for the exceptions and int 0x80.  Loaded at ring 0 whatever cpl= says (the
 * IDT reports faults in both).
 *
 * The TSS carries an I/O bitmap that allows every port.  With EFLAGS.IOPL = 3
 * a CPU never looks at it, but on KVM-on-PVM ring-3 guest code runs on the
 * hardware with the host's IOPL (0): each IN/OUT traps into KVM, whose
 * emulator then sees IOPL 0 and consults the guest's TSS bitmap.  Without the
 * bitmap (iomap_base beyond the limit) ring-3 port I/O got #GP there. */
static void setup_cpu_tables(void)
{
    u64 base = (uptr)&tss, limit = sizeof(tss) - 1;
    tss.rsp0 = (uptr)iobench_kstack_top;
    tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
    tss.iomap[sizeof(tss.iomap) - 1] = 0xFF;
    iobench_gdt[TSS_SEL >> 3] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
                                (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    iobench_gdt[(TSS_SEL >> 3) + 1] = base >> 32; /* P, DPL0, 64-bit TSS (available) */

    for (int v = 0; v < 32; v++)
        idt[v] = gate(iobench_isr_table[v], 0x8E);     /* P, DPL0, interrupt gate */
    idt[HALT_VECTOR] = gate((uptr)iobench_halt, 0xEE); /* P, DPL3: callable from ring 3 */

    struct dtr idtr = {sizeof(idt) - 1, (uptr)idt};
    __asm__ volatile("lidt %0\n\tltr %w1" : : "m"(idtr), "r"(TSS_SEL) : "memory");
}

/* Called by the exception stubs in iobench.s, at ring 0. */
void __attribute__((noreturn)) iobench_fault(const u64 *frame) /* vector, error, rip, cs, ... */
{
    puts("iobench: error: CPU exception vector=");
    put_dec((u32)frame[0]);
    puts(" error=");
    put_hex32((u32)frame[1]);
    puts(" rip=");
    put_hex32((u32)frame[2]);
    puts(" cs=");
    put_hex32((u32)frame[3] & 0xFFFF);
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

/* ------------------------------------------------------------- the state */

struct desc {
    u32 seq, buf_gpa, len, result_gpa;
};

static struct desc descs[SLOTS] __attribute__((aligned(16)));
static u8 bufs[SLOTS][CMD_LEN] __attribute__((aligned(16)));
static u64 sent_tsc[SLOTS];
static u32 expected[SLOTS]; /* CRC-32 of command k's data, k % 256: it depends on k * 7 mod 256 */

static struct {
    u32 design, r, w, cpl, maxwait;
} cfg = {PIO, DEFAULT_R, DEFAULT_W, DEFAULT_CPL, DEFAULT_MAXWAIT};

static struct {
    u32 sent, completed;
    u32 next_iter;     /* loop iteration at which command `sent` is due, or NEVER */
    u32 q, rem;        /* sent * r == q * w + rem, rem < w */
    u32 qstep, rstep;  /* r == qstep * w + rstep */
    u32 stop;          /* no more sending or waiting */
    u32 bogus;         /* STATUS was impossible */
    u32 stall_reads, drain_reads;
} S;

/* ------------------------------------------- loopback: a device in the guest */

static struct {
    u32 queue[SLOTS]; /* doorbell values (descriptor addresses) not yet processed */
    u32 head, tail, completed;
} lb;

static void lb_doorbell(u32 desc_gpa)
{
    if (lb.tail - lb.head < SLOTS) /* a full queue drops the doorbell: verify catches it */
        lb.queue[lb.tail++ % SLOTS] = desc_gpa;
}

/* Completes one queued command per read, checking the descriptor like a strict
 * device: a wrong field leaves its result unwritten (or wrong). */
static u32 __attribute__((noinline)) lb_status(void)
{
    if (lb.head != lb.tail) {
        const volatile struct desc *d = phys(lb.queue[lb.head++ % SLOTS]);
        u32 seq = d->seq, buf = d->buf_gpa, len = d->len, result = d->result_gpa;
        if (seq < cfg.w && len == CMD_LEN && buf == gpa(bufs[seq % SLOTS]) &&
            result == RESULTS_GPA + 4 * seq) {
            u32 crc = crc32(phys(buf), len);
            *(volatile u32 *)phys(result) = seq == lb.completed ? crc : ~crc;
        }
        lb.completed++;
    }
    return lb.completed;
}

/* ------------------------------------------------------------ the device */

static inline __attribute__((always_inline)) u32 status_read(const enum design d)
{
    switch (d) {
    case PIO:
        return inl(PIO_STATUS_PORT);
    case MMIO:
    case COALESCED:
        return *(volatile u32 *)phys(MMIO_STATUS_GPA);
    case DIRTY:
        return *(volatile u32 *)phys(DIRTY_GPA);
    default:
        return lb_status();
    }
}

/* Fill descriptor slot k % 256, note the time, ring the doorbell. */
static inline __attribute__((always_inline)) void publish(const enum design d, u32 k)
{
    u32 slot = k % SLOTS;
    volatile struct desc *ds = d == DIRTY ? (volatile struct desc *)phys(DIRTY_RING_GPA) + slot : &descs[slot];
    ds->seq = k;
    ds->buf_gpa = gpa(bufs[slot]);
    ds->len = CMD_LEN;
    ds->result_gpa = RESULTS_GPA + 4 * k;
    sent_tsc[slot] = rdtsc();
    barrier();
    switch (d) {
    case PIO:
        outl(PIO_DOORBELL_PORT, gpa(ds));
        break;
    case MMIO:
    case COALESCED:
        *(volatile u32 *)phys(MMIO_DOORBELL_GPA) = gpa(ds);
        break;
    case DIRTY: /* x86 stores are seen in order: the slot before PRODUCER */
        *(volatile u32 *)phys(DIRTY_GPA + 4) = k + 1;
        break;
    default:
        lb_doorbell(gpa(ds));
        break;
    }
    barrier();
}

/* STATUS read v != S.completed: account completions and their latency. */
static void __attribute__((noinline)) on_status(u32 v)
{
    u32 outstanding = S.sent - S.completed;
    if (S.bogus || outstanding == 0)
        return; /* nothing in flight: the value is not interpreted */
    if (v - S.completed > outstanding) { /* below completed or above sent */
        S.bogus = 1;
        S.stop = 1;
        S.next_iter = NEVER;
        return;
    }
    u64 now = rdtsc();
    u32 *latency = phys(LATENCY_GPA);
    for (u32 j = S.completed; j != v; j++) {
        u64 dt = now - sent_tsc[j % SLOTS];
        latency[j] = dt > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)dt;
    }
    S.completed = v;
}

/* Send every command due at iteration i, stalling while its slot is busy. */
static inline __attribute__((always_inline)) void send_due(const enum design d, u32 i)
{
    while (S.next_iter == i) {
        while (S.sent - S.completed >= SLOTS && !S.stop) {
            if (S.stall_reads >= cfg.maxwait) {
                S.stop = 1;
                break;
            }
            u32 v = status_read(d);
            S.stall_reads++;
            if (v != S.completed)
                on_status(v);
        }
        if (S.stop) {
            S.next_iter = NEVER;
            return;
        }
        publish(d, S.sent);
        if (++S.sent == cfg.w) {
            S.next_iter = NEVER;
            return;
        }
        S.q += S.qstep; /* next due: floor(sent * r / w), without 64-bit division */
        S.rem += S.rstep;
        if (S.rem >= cfg.w) {
            S.rem -= cfg.w;
            S.q++;
        }
        S.next_iter = S.q;
    }
}

static inline __attribute__((always_inline)) void bench(const enum design d)
{
    const u32 r = cfg.r;
    for (u32 i = 0; i < r; i++) {
        u32 v = status_read(d);
        if (__builtin_expect(v != S.completed, 0))
            on_status(v);
        if (__builtin_expect(S.next_iter == i, 0))
            send_due(d, i);
    }
    if (r == 0) /* then every command is due "at iteration 0" */
        send_due(d, 0);
    while (S.completed != S.sent && !S.bogus && S.drain_reads < cfg.maxwait) {
        u32 v = status_read(d);
        S.drain_reads++;
        if (v != S.completed)
            on_status(v);
    }
}

/* One copy of the loop per design, each with its access inlined. */
static void __attribute__((noinline)) bench_pio(void) { bench(PIO); }
static void __attribute__((noinline)) bench_mmio(void) { bench(MMIO); }
static void __attribute__((noinline)) bench_dirty(void) { bench(DIRTY); }
static void __attribute__((noinline)) bench_loopback(void) { bench(LOOPBACK); }

/* ------------------------------------------------------------- the run */

/* Are we in the ring cpl= asked for?  (Not a check of RFLAGS: under PVM,
 * ring-3 code reads the hardware's IF = 1 and IOPL = 0, not the guest's.) */
static u32 check_cpu_state(void)
{
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    if ((cs & 3) != cfg.cpl) {
        puts("iobench: error: running with cs=");
        put_hex32((u32)cs & 0xFFFF);
        putc('\n');
        return 0;
    }
    return 1;
}

static void summary(u32 bad)
{
    puts("iobench design=");
    puts(design_names[cfg.design]);
    put_kv("r", cfg.r);
    put_kv("w", cfg.w);
    put_kv("cpl", cfg.cpl);
    put_kv("sent", S.sent);
    put_kv("completed", S.completed);
    put_kv("stall_reads", S.stall_reads);
    put_kv("drain_reads", S.drain_reads);
    put_kv("bad_results", bad);
    putc('\n');
}

static u32 selftest(void)
{
    u8 data[CMD_LEN];
    u32 bad = 0;
    for (u32 k = 0; k < cfg.w; k++) {
        for (u32 i = 0; i < CMD_LEN; i++)
            data[i] = (u8)(k * 7 + i);
        u32 crc = crc32(data, CMD_LEN);
        bad += crc != expected[k % SLOTS] || crc32(bufs[k % SLOTS], CMD_LEN) != crc;
        puts("iobench selftest k=");
        put_dec(k);
        puts(" crc=");
        put_hex32(crc);
        putc('\n');
    }
    summary(bad);
    return bad ? 1 : 0;
}

/* Everything after the switch to ring 3 (or at ring 0 with cpl=0). */
static u32 run(void)
{
    if (!check_cpu_state())
        return 1;
    crc_init();
    for (u32 s = 0; s < SLOTS; s++) {
        for (u32 i = 0; i < CMD_LEN; i++)
            bufs[s][i] = (u8)(s * 7 + i); /* (k * 7 + i) & 0xFF for every k == s mod 256 */
        expected[s] = crc32(bufs[s], CMD_LEN);
    }
    if (cfg.design == SELFTEST)
        return selftest();

    /* Results start as a wrong value, so a command the device never did is caught. */
    volatile u32 *results = phys(RESULTS_GPA);
    u32 *latency = phys(LATENCY_GPA);
    for (u32 k = 0; k < cfg.w; k++) {
        results[k] = ~expected[k % SLOTS];
        latency[k] = 0;
    }
    if (cfg.design == DIRTY)
        *(volatile u32 *)phys(DIRTY_GPA + 4) = 0; /* PRODUCER: nothing published */

    if (cfg.w) {
        S.qstep = cfg.r / cfg.w;
        S.rstep = cfg.r % cfg.w;
        S.next_iter = 0;
    } else {
        S.next_iter = NEVER;
    }
    switch (cfg.design) {
    case PIO:
        bench_pio();
        break;
    case MMIO:
    case COALESCED: /* the same guest code: only the VMM's registration differs */
        bench_mmio();
        break;
    case DIRTY:
        bench_dirty();
        break;
    default:
        bench_loopback();
        break;
    }

    u32 bad = S.bogus;
    for (u32 k = 0; k < S.sent; k++)
        bad += results[k] != expected[k % SLOTS];
    summary(bad);
    return S.sent == cfg.w && S.completed == cfg.w && bad == 0 ? 0 : 1;
}

static void __attribute__((noreturn, used)) user_main(void)
{
    guest_exit(run());
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
    if (!line)
        return 1;
    for (const char *p = line; *p; p++) {
        if (p != line && p[-1] != ' ')
            continue; /* not the start of a word */
        const char *v;
        int ok = 1;
        if (starts_with(p, "design=", &v)) {
            u32 d;
            for (d = 0; d < NDESIGNS && !word_is(v, design_names[d]); d++)
                ;
            ok = d < NDESIGNS;
            if (ok)
                cfg.design = d;
        } else if (starts_with(p, "r=", &v)) {
            ok = parse_u32(v, &cfg.r);
        } else if (starts_with(p, "w=", &v)) {
            ok = parse_u32(v, &cfg.w);
        } else if (starts_with(p, "cpl=", &v)) {
            u32 c = 0;
            ok = parse_u32(v, &c) && (c == 0 || c == 3);
            if (ok)
                cfg.cpl = c;
        } else if (starts_with(p, "maxwait=", &v)) {
            ok = parse_u32(v, &cfg.maxwait);
        }
        if (!ok) {
            puts("iobench: error: bad argument '");
            put_word(p);
            puts("' (design=pio|mmio|coalesced|dirty|loopback|selftest r=N w=N cpl=0|3 maxwait=N)\n");
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- entry */

/* From iobench.s, in long mode at ring 0. */
void __attribute__((noreturn)) iobench_main(u32 cmdline_gpa, u32 mem_upper_kib)
{
    setup_cpu_tables();
    if (!parse_cmdline(cmdline_gpa ? phys(cmdline_gpa) : 0))
        guest_exit(1);
    if (cfg.w > MAX_W) {
        puts("iobench: error: w=");
        put_dec(cfg.w);
        puts(" exceeds ");
        put_dec(MAX_W);
        putc('\n');
        guest_exit(1);
    }
    if (cfg.design != SELFTEST && cfg.w && mem_upper_kib != 0xFFFFFFFFu) {
        u64 top = 0x100000 + (u64)mem_upper_kib * 1024;
        u64 need = LATENCY_GPA + 4 * (u64)cfg.w;
        if (need > top) {
            puts("iobench: error: w=");
            put_dec(cfg.w);
            puts(" needs guest RAM up to ");
            put_hex32((u32)need);
            puts(", have up to ");
            put_hex32((u32)top);
            putc('\n');
            guest_exit(1);
        }
    }
    if (cfg.cpl == 0)
        guest_exit(run());
    /* Ring 3, 64-bit, IOPL = 3, IF = 0 (see iobench.s); the stack is set so
     * that user_main starts as if called (RSP + 8 a multiple of 16). */
    iobench_enter_user(user_main, (void *)((uptr)iobench_ustack_top - 8));
}
