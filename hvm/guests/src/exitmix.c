/* exitmix.c - the guest of the exit-rate experiment: a mixed workload whose I/O
 * intensity is a parameter.
 *
 * Freestanding 64-bit C built like iobench.c (see hvm/guests/__init__.py), with the same
 * runtime (lib/rt.c, lib/cmd.c); exitmix.s boots it into long mode (lib/long64.inc) and
 * calls exitmix_main at ring 0, where it stays.
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

#include "lib/cmd.h"

#define PHASE_PORT 0x510 /* OUT 1: the measured phase starts; OUT 2: it ends */
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

enum design { PIO, MMIO, DIRTY, NDESIGNS };
static const char *const design_names[NDESIGNS] = {"pio", "mmio", "dirty"};

static struct {
    u32 design, units, work, io, sys, ipi, tick, halt;
} cfg = {PIO, 100, 1000, 0, 1, 0, 0, 0};

extern volatile u64 exitmix_ticks, exitmix_ipis, exitmix_spurious;
extern char exitmix_timer_isr[], exitmix_ipi_isr[], exitmix_spurious_isr[];

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)phys(LAPIC + reg) = v; }

static void __attribute__((noreturn)) guest_exit(u32 value)
{
    __asm__ volatile("cli" ::: "memory");
    debug_exit(value);
    for (;;)
        __asm__ volatile("hlt");
}

/* --------------------------------------------------------- descriptor tables */

static struct gate64 idt[256] __attribute__((aligned(16)));

static void setup_idt(void)
{
    for (int v = 0; v < 32; v++) /* P, DPL0, 64-bit interrupt gates */
        idt[v] = gate64(long64_isr_table[v], 0x8E);
    idt[TIMER_VECTOR] = gate64((uptr)exitmix_timer_isr, 0x8E);
    idt[IPI_VECTOR] = gate64((uptr)exitmix_ipi_isr, 0x8E);
    idt[SPURIOUS_VECTOR] = gate64((uptr)exitmix_spurious_isr, 0x8E);
    load_idt(idt, sizeof(idt));
}

void __attribute__((noreturn)) exitmix_fault(const u64 *frame) /* vector, error, rip, cs, ... */
{
    rt_puts("exitmix: error: CPU exception vector=");
    rt_put_dec(frame[0]);
    rt_puts(" error=");
    rt_put_hex32((u32)frame[1]);
    rt_puts(" rip=");
    rt_put_hex32((u32)frame[2]);
    rt_putc('\n');
    guest_exit(1);
}

/* ------------------------------------------------------------- the work */

static struct desc descs[SLOTS] __attribute__((aligned(16)));
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
    d->buf_gpa = gpa(cmd_bufs[slot]);
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

#define USAGE "design=pio|mmio|dirty units=N work=N io=N sys=N ipi=N tick=N halt=N"

static int take_word(const char *p) /* 0: a known key with a bad value */
{
    static const struct {
        const char *key;
        u32 *value;
    } keys[] = {{"units=", &cfg.units}, {"work=", &cfg.work}, {"io=", &cfg.io},
                {"sys=", &cfg.sys},     {"ipi=", &cfg.ipi},   {"tick=", &cfg.tick},
                {"halt=", &cfg.halt}};
    const char *v;
    if (starts_with(p, "design=", &v))
        return parse_choice(v, design_names, NDESIGNS, &cfg.design);
    int ok = 1;
    for (u32 i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (starts_with(p, keys[i].key, &v))
            ok = parse_u32(v, keys[i].value);
    return ok;
}

/* ---------------------------------------------------------------- entry */

void __attribute__((noreturn)) exitmix_main(u32 cmdline_gpa, u32 mem_upper_kib)
{
    setup_idt();
    if (!parse_args(cmdline_gpa, take_word, "exitmix", USAGE))
        guest_exit(1);
    u64 cmds = (u64)cfg.units * cfg.io;
    if (cmds > MAX_CMDS || (mem_upper_kib != 0xFFFFFFFFu && cmds &&
                            RESULTS_GPA + 4 * cmds > 0x100000 + (u64)mem_upper_kib * 1024)) {
        rt_puts("exitmix: error: units * io = ");
        rt_put_dec(cmds);
        rt_puts(" commands do not fit\n");
        guest_exit(1);
    }
    cmd_init();
    volatile u32 *results = phys(RESULTS_GPA);
    for (u32 k = 0; k < cmds; k++)
        results[k] = ~cmd_expected[k % SLOTS];
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
        bad += results[k] != cmd_expected[k % SLOTS];

    const struct kv fields[] = {
        {"units", cfg.units},  {"work", cfg.work},           {"io", cfg.io},
        {"sys", cfg.sys},      {"ipi", cfg.ipi},             {"tick", cfg.tick},
        {"halt", cfg.halt},    {"sent", sent},               {"completed", completed},
        {"ticks", exitmix_ticks}, {"ipis", exitmix_ipis},    {"spurious", exitmix_spurious},
        {"tsc_aux", aux},      {"bad", bad},
    };
    rt_put_result("exitmix", design_names[cfg.design], fields, sizeof(fields) / sizeof(fields[0]));
    rt_puts(" sum=");
    rt_put_hex32(x);
    rt_putc('\n');
    int ok = sent == cmds && completed == cmds && bad == 0 && exitmix_ipis == (u64)cfg.units * cfg.ipi &&
             aux == cfg.units * cfg.sys;
    guest_exit(ok ? 0 : 1);
}
