/* rt.c - the freestanding C runtime of the 64-bit guests; see rt.h. */

#include "rt.h"

/* -------------------------------------------------------------- serial */

void rt_putc(char c)
{
    for (u32 n = THRE_POLL_LIMIT; n && !(inb(COM1_PORT + UART_LSR) & LSR_THRE); n--)
        ;
    outb(COM1_PORT, (u8)c);
}

void rt_puts(const char *s)
{
    while (*s)
        rt_putc(*s++);
}

void rt_put_dec(u64 v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        rt_putc(digits[--n]);
}

void rt_put_hex(u64 v)
{
    int shift = 60;
    rt_puts("0x");
    while (shift > 0 && !((v >> shift) & 0xF))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        rt_putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

void rt_put_hex32(u32 v)
{
    rt_puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        rt_putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

void rt_put_kv(const char *key, u64 v)
{
    rt_putc(' ');
    rt_puts(key);
    rt_putc('=');
    rt_put_dec(v);
}

void rt_put_result(const char *guest, const char *design, const struct kv *fields, u32 n)
{
    rt_puts(guest);
    rt_puts(" design=");
    rt_puts(design);
    for (u32 i = 0; i < n; i++)
        rt_put_kv(fields[i].key, fields[i].value);
}

void rt_put_word(const char *s)
{
    while (*s && *s != ' ')
        rt_putc(*s++);
}

/* ------------------------------------------------------- the command line */

int is_end(char c) { return c == 0 || c == ' '; }

int starts_with(const char *s, const char *prefix, const char **rest)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    *rest = s;
    return 1;
}

int word_is(const char *s, const char *word)
{
    while (*word)
        if (*s++ != *word++)
            return 0;
    return is_end(*s);
}

int parse_u32(const char *s, u32 *out)
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

int parse_choice(const char *s, const char *const *words, u32 n, u32 *out)
{
    for (u32 i = 0; i < n; i++)
        if (word_is(s, words[i])) {
            *out = i;
            return 1;
        }
    return 0;
}

const char *each_word(const char *line, int (*take)(const char *word))
{
    if (!line)
        return 0;
    for (const char *p = line; *p; p++) {
        if (p != line && p[-1] != ' ')
            continue; /* not the start of a word */
        if (!take(p))
            return p;
    }
    return 0;
}

int parse_args(u32 cmdline_gpa, int (*take)(const char *word), const char *guest, const char *usage)
{
    const char *bad = each_word(cmdline_gpa ? phys(cmdline_gpa) : 0, take);
    if (bad) {
        rt_puts(guest);
        rt_puts(": error: bad argument '");
        rt_put_word(bad);
        rt_puts("' (");
        rt_puts(usage);
        rt_puts(")\n");
    }
    return !bad;
}

/* --------------------------------------------------------- descriptor tables */

struct gate64 gate64(u64 offset, u32 type)
{
    struct gate64 g = {
        (offset & 0xFFFF) | ((u64)KERNEL_CS << 16) | ((u64)type << 40) | (((offset >> 16) & 0xFFFF) << 48),
        offset >> 32,
    };
    return g;
}

void load_idt(const struct gate64 *idt, u32 bytes)
{
    struct dtr idtr = {(u16)(bytes - 1), (uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

void tss_load(struct tss64 *tss, void *rsp0)
{
    u64 base = (uptr)tss, limit = sizeof(*tss) - 1;
    tss->rsp0 = (uptr)rsp0;
    tss->iomap_base = __builtin_offsetof(struct tss64, iomap);
    tss->iomap[sizeof(tss->iomap) - 1] = 0xFF;
    long64_gdt[TSS_SEL >> 3] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) |
                               (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    long64_gdt[(TSS_SEL >> 3) + 1] = base >> 32; /* P, DPL0, 64-bit TSS (available) */
    __asm__ volatile("ltr %w0" : : "r"(TSS_SEL) : "memory");
}
