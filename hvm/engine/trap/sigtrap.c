/* sigtrap.c - what one trap costs a hypervisor that runs as a host process (the chapter's
 * CLI walk-through, for real): user-mode code executes CLI, the CPU raises #GP, the host
 * kernel turns it into SIGSEGV, the handler (the "hypervisor") decodes the instruction,
 * clears a virtual IF and advances RIP, and sigreturn resumes the "guest".
 *
 * Prints the median TSC cycles of the three parts over N traps:
 *   fault_to_handler  from just before CLI to the handler's first instruction
 *   handler           decode + emulate + RIP update inside the handler
 *   resume            from the handler's last instruction back to the instruction after CLI
 * Built and run by `python3 -m hvm.engine.trap.cost --measure` (x86-64 Linux, gcc).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <x86intrin.h>

enum { N = 20000 };
static volatile uint64_t t_enter, t_leave;
static volatile int if_virt = 1;

static void hypervisor(int sig, siginfo_t *info, void *context) {
    t_enter = __rdtsc();
    ucontext_t *uc = context;
    const unsigned char *rip = (const unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
    switch (rip[0]) {                   /* decode */
    case 0xFA: if_virt = 0; break;      /* cli: IF_virt <- 0 */
    case 0xFB: if_virt = 1; break;      /* sti: IF_virt <- 1 */
    default: abort();
    }
    uc->uc_mcontext.gregs[REG_RIP] += 1; /* RIP advanced */
    (void)sig; (void)info;
    t_leave = __rdtsc();
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v) {
    qsort(v, N, sizeof *v, by_value);
    return v[N / 2];
}

int main(void) {
    static uint64_t fault[N], handler[N], resume[N];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = hypervisor;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = __rdtsc();
        __asm__ volatile("cli" ::: "memory");
        uint64_t t3 = __rdtsc();
        fault[i] = t_enter - t0;
        handler[i] = t_leave - t_enter;
        resume[i] = t3 - t_leave;
    }
    printf("fault_to_handler=%llu handler=%llu resume=%llu if_virt=%d\n",
           (unsigned long long)median(fault), (unsigned long long)median(handler),
           (unsigned long long)median(resume), if_virt);
    return 0;
}
