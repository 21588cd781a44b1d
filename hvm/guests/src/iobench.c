/* iobench.c - the guest of the I/O experiment: "a guest reads a device status
 * register 1,000,000 times and writes 30,000 commands".
 *
 * Freestanding 64-bit C (no libc, no libgcc), built with
 *     gcc -m64 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2
 *         -mno-red-zone -mgeneral-regs-only -c
 * and linked with iobench.s, which boots through multiboot in 32-bit mode (with
 * lib.inc), switches to long mode (lib/long64.inc: 4 GiB identity-mapped with
 * 2 MiB pages) and calls iobench_main at ring 0, and with the guests' C runtime
 * (lib/rt.c: serial output, command-line words, IDT/TSS; lib/cmd.c: the command
 * data and CRC-32).  Why 64-bit: on this project's KVM host (KVM on
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

#include "lib/cmd.h"

/* ------------------------------------------------------------ constants */

#define LATENCY_GPA 0x01800000       /* u32 latency_tsc[w] */
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

#define HALT_VECTOR 0x80
#define NEVER 0xFFFFFFFFu /* no loop iteration has this number (i < r <= 2^32 - 1) */

enum design { PIO, MMIO, COALESCED, DIRTY, LOOPBACK, SELFTEST, NDESIGNS };
static const char *const design_names[NDESIGNS] = {
    "pio", "mmio", "coalesced", "dirty", "loopback", "selftest",
};

/* Leave through isa-debug-exit; from ring 3 `hlt` would fault, so ask ring 0
 * (int 0x80, a DPL3 gate to iobench_halt) to halt if the VMM keeps running. */
static void __attribute__((noreturn)) guest_exit(u32 value)
{
    debug_exit(value);
    for (;;)
        __asm__ volatile("int %0" : : "i"(HALT_VECTOR));
}

/* --------------------------------------------------------- descriptor tables */

static struct gate64 idt[HALT_VECTOR + 1] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));

extern char iobench_ustack_top[];
extern char iobench_halt[];
void __attribute__((noreturn)) iobench_enter_user(void (*entry)(void), void *stack);

/* An IDT for the exceptions and int 0x80, and a 64-bit TSS whose rsp0 gives
 * ring-3 exceptions a kernel stack and whose I/O bitmap allows every port (see
 * tss_load in lib/rt.h).  Loaded at ring 0 whatever cpl= says (the IDT reports
 * faults in both). */
static void setup_cpu_tables(void)
{
    for (int v = 0; v < 32; v++)
        idt[v] = gate64(long64_isr_table[v], 0x8E);      /* P, DPL0, interrupt gate */
    idt[HALT_VECTOR] = gate64((uptr)iobench_halt, 0xEE); /* P, DPL3: callable from ring 3 */
    load_idt(idt, sizeof(idt));
    tss_load(&tss, long64_kstack_top);
}

/* Called by the exception stubs in iobench.s, at ring 0. */
void __attribute__((noreturn)) iobench_fault(const u64 *frame) /* vector, error, rip, cs, ... */
{
    rt_puts("iobench: error: CPU exception vector=");
    rt_put_dec((u32)frame[0]);
    rt_puts(" error=");
    rt_put_hex32((u32)frame[1]);
    rt_puts(" rip=");
    rt_put_hex32((u32)frame[2]);
    rt_puts(" cs=");
    rt_put_hex32((u32)frame[3] & 0xFFFF);
    rt_putc('\n');
    guest_exit(1);
}

/* ------------------------------------------------------------- the state */

static struct desc descs[SLOTS] __attribute__((aligned(16)));
static u64 sent_tsc[SLOTS];

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
        if (seq < cfg.w && len == CMD_LEN && buf == gpa(cmd_bufs[seq % SLOTS]) &&
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
    ds->buf_gpa = gpa(cmd_bufs[slot]);
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
        rt_puts("iobench: error: running with cs=");
        rt_put_hex32((u32)cs & 0xFFFF);
        rt_putc('\n');
        return 0;
    }
    return 1;
}

static void summary(u32 bad)
{
    const struct kv fields[] = {
        {"r", cfg.r},
        {"w", cfg.w},
        {"cpl", cfg.cpl},
        {"sent", S.sent},
        {"completed", S.completed},
        {"stall_reads", S.stall_reads},
        {"drain_reads", S.drain_reads},
        {"bad_results", bad},
    };
    rt_put_result("iobench", design_names[cfg.design], fields, sizeof(fields) / sizeof(fields[0]));
    rt_putc('\n');
}

static u32 selftest(void)
{
    u8 data[CMD_LEN];
    u32 bad = 0;
    for (u32 k = 0; k < cfg.w; k++) {
        for (u32 i = 0; i < CMD_LEN; i++)
            data[i] = (u8)(k * 7 + i);
        u32 crc = crc32(data, CMD_LEN);
        bad += crc != cmd_expected[k % SLOTS] || crc32(cmd_bufs[k % SLOTS], CMD_LEN) != crc;
        rt_puts("iobench selftest k=");
        rt_put_dec(k);
        rt_puts(" crc=");
        rt_put_hex32(crc);
        rt_putc('\n');
    }
    summary(bad);
    return bad ? 1 : 0;
}

/* Everything after the switch to ring 3 (or at ring 0 with cpl=0). */
static u32 run(void)
{
    if (!check_cpu_state())
        return 1;
    cmd_init();
    if (cfg.design == SELFTEST)
        return selftest();

    /* Results start as a wrong value, so a command the device never did is caught. */
    volatile u32 *results = phys(RESULTS_GPA);
    u32 *latency = phys(LATENCY_GPA);
    for (u32 k = 0; k < cfg.w; k++) {
        results[k] = ~cmd_expected[k % SLOTS];
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
        bad += results[k] != cmd_expected[k % SLOTS];
    summary(bad);
    return S.sent == cfg.w && S.completed == cfg.w && bad == 0 ? 0 : 1;
}

static void __attribute__((noreturn, used)) user_main(void)
{
    guest_exit(run());
}

/* ------------------------------------------------------- the command line */

#define USAGE "design=pio|mmio|coalesced|dirty|loopback|selftest r=N w=N cpl=0|3 maxwait=N"

static int take_word(const char *p) /* 0: a known key with a bad value */
{
    const char *v;
    if (starts_with(p, "design=", &v))
        return parse_choice(v, design_names, NDESIGNS, &cfg.design);
    if (starts_with(p, "r=", &v))
        return parse_u32(v, &cfg.r);
    if (starts_with(p, "w=", &v))
        return parse_u32(v, &cfg.w);
    if (starts_with(p, "cpl=", &v)) {
        u32 c = 0;
        int ok = parse_u32(v, &c) && (c == 0 || c == 3);
        if (ok)
            cfg.cpl = c;
        return ok;
    }
    if (starts_with(p, "maxwait=", &v))
        return parse_u32(v, &cfg.maxwait);
    return 1; /* not ours */
}

/* ---------------------------------------------------------------- entry */

/* From iobench.s, in long mode at ring 0. */
void __attribute__((noreturn)) iobench_main(u32 cmdline_gpa, u32 mem_upper_kib)
{
    setup_cpu_tables();
    if (!parse_args(cmdline_gpa, take_word, "iobench", USAGE))
        guest_exit(1);
    if (cfg.w > MAX_W) {
        rt_puts("iobench: error: w=");
        rt_put_dec(cfg.w);
        rt_puts(" exceeds ");
        rt_put_dec(MAX_W);
        rt_putc('\n');
        guest_exit(1);
    }
    if (cfg.design != SELFTEST && cfg.w && mem_upper_kib != 0xFFFFFFFFu) {
        u64 top = 0x100000 + (u64)mem_upper_kib * 1024;
        u64 need = LATENCY_GPA + 4 * (u64)cfg.w;
        if (need > top) {
            rt_puts("iobench: error: w=");
            rt_put_dec(cfg.w);
            rt_puts(" needs guest RAM up to ");
            rt_put_hex32((u32)need);
            rt_puts(", have up to ");
            rt_put_hex32((u32)top);
            rt_putc('\n');
            guest_exit(1);
        }
    }
    if (cfg.cpl == 0)
        guest_exit(run());
    /* Ring 3, 64-bit, IOPL = 3, IF = 0 (see iobench.s); the stack is set so
     * that user_main starts as if called (RSP + 8 a multiple of 16). */
    iobench_enter_user(user_main, (void *)((uptr)iobench_ustack_top - 8));
}
