/* rt.h - the freestanding C runtime of the 64-bit guests (iobench, ctxsw, exitmix).
 *
 * The guests are built as 64-bit C behind lib.inc's 32-bit multiboot entry and
 * lib/long64.inc's switch to long mode (see hvm/guests/__init__.py, C_SOURCES);
 * each links lib/rt.c, and the command-device guests lib/cmd.c too.  Here:
 * integer types, port I/O and other one-instruction helpers (inline), COM1
 * output and number printing, command-line words, and the 64-bit IDT/TSS
 * structures that go with lib/long64.inc's GDT.
 *
 * Every routine does exactly the port I/O its name says and no more: the lab
 * tests count a guest's exits one by one (rt_putc: LSR reads until THRE, then one
 * THR write; nothing else touches a port).
 */
#ifndef HVM_GUEST_RT_H
#define HVM_GUEST_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long uptr;

/* CR4.OSFXSR stays clear: no SSE code, ever (the build says so too). */
#pragma GCC target("general-regs-only")

/* The same values as lib.inc (hvm.guests mirrors them; a test checks they agree). */
#define COM1_PORT 0x3F8
#define UART_LSR 5
#define LSR_THRE 0x20
#define THRE_POLL_LIMIT 0xFFFF
#define EXIT_PORT 0xF4
#define POST_PORT 0x80

/* lib/long64.inc's GDT: 64-bit code 0x08, data 0x10 (ring 0); 64-bit code 0x28,
 * data 0x30 (ring 3); a 64-bit TSS at 0x38, filled in by tss_load(). */
#define KERNEL_CS 0x08
#define USER_CS (0x28 | 3)
#define TSS_SEL 0x38

#define barrier() __asm__ volatile("" ::: "memory")

/* ------------------------------------------------------------ CPU helpers */

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

/* The exit value to QEMU's isa-debug-exit (one OUT); what the guest does if the
 * VMM lets it run on is the caller's business (ring 3 cannot HLT). */
static inline void debug_exit(u32 value)
{
    barrier(); /* every store of a result is done before the exit */
    outl(EXIT_PORT, value);
}

/* ------------------------------------------------------- COM1 output (rt.c) */

/* (rt_: lib.inc, in the same image, has 32-bit putc, puts, put_dec, ... of its own.) */

void rt_putc(char c);              /* poll LSR.THRE (at most THRE_POLL_LIMIT reads), write THR */
void rt_puts(const char *s);
void rt_put_dec(u64 v);            /* unsigned decimal */
void rt_put_hex(u64 v);            /* "0x" and as few hex digits as needed */
void rt_put_hex32(u32 v);          /* "0x" and exactly 8 hex digits */
void rt_put_kv(const char *key, u64 v); /* " key=DECIMAL" */
void rt_put_word(const char *s);   /* up to the next space or the end */

struct kv {
    const char *key;
    u64 value;
};
/* "GUEST design=DESIGN", then " key=DECIMAL" for each of the n fields: a result line's start. */
void rt_put_result(const char *guest, const char *design, const struct kv *fields, u32 n);

/* ------------------------------------------------ command-line words (rt.c) */

/* The command line is words separated by spaces (QEMU and hvm pass "IMAGE-PATH ARGS"). */
int is_end(char c);                                          /* NUL or space: the word ends */
int starts_with(const char *s, const char *prefix, const char **rest); /* *rest = after it */
int word_is(const char *s, const char *word);                /* the word at s is `word` */
int parse_u32(const char *s, u32 *out); /* the word at s is all digits and fits: 1, else 0 */
/* the word at s is words[i] for an i < n: *out = i, 1; else 0 */
int parse_choice(const char *s, const char *const *words, u32 n, u32 *out);
/* take(word) for each word of `line` (a word starts the line or follows a space; `line` may be 0);
 * returns the first word take() refuses (returns 0 for), or 0 if it took them all. */
const char *each_word(const char *line, int (*take)(const char *word));
/* each_word on the command line at guest-physical `cmdline_gpa` (0: none); a refused word is
 * reported as "GUEST: error: bad argument 'WORD' (USAGE)" and makes it return 0, else 1. */
int parse_args(u32 cmdline_gpa, int (*take)(const char *word), const char *guest, const char *usage);

/* ------------------------------------------- descriptor tables (rt.c) */

struct dtr {
    u16 limit;
    u64 base;
} __attribute__((packed));

struct gate64 {
    u64 lo, hi;
};

struct tss64 {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    u16 reserved3, iomap_base;
    u8 iomap[65536 / 8 + 1]; /* all ports allowed; the extra byte must be 0xFF */
} __attribute__((packed));

/* A 64-bit gate into KERNEL_CS; type 0x8E: P, DPL0, interrupt gate; 0xEE: the same, DPL3. */
struct gate64 gate64(u64 offset, u32 type);
void load_idt(const struct gate64 *idt, u32 bytes);
/* Point `tss` (rsp0 = `rsp0`, an I/O bitmap allowing every port) at GDT slot TSS_SEL and LTR it.
 *
 * With EFLAGS.IOPL = 3 a CPU never looks at the bitmap, but on KVM-on-PVM ring-3
 * guest code runs on the hardware with the host's IOPL (0): each IN/OUT traps
 * into KVM, whose emulator then sees IOPL 0 and consults the guest's TSS bitmap.
 * Without the bitmap (iomap_base beyond the limit) ring-3 port I/O got #GP there. */
void tss_load(struct tss64 *tss, void *rsp0);

/* ------------------------------------------------------ lib/long64.inc */

extern u64 long64_gdt[];                /* the GDT above */
extern u64 long64_pml4[], long64_pdpt[]; /* the identity map of the first 4 GiB (2 MiB pages) */
extern char long64_kstack_top[];        /* the ring-0 stack the C entry starts on */
extern const u64 long64_isr_table[32];  /* the exception stubs (vector, error code, CPU frame) */

#endif
