/* Preloaded by masked_cpu.py: this process's CPUID answers as an older x86 CPU's would.
 *
 * The constructor turns CPUID faulting on for the calling thread (arch_prctl ARCH_SET_CPUID,
 * Linux 4.12+, CPUs listing cpuid_fault); threads created later inherit it and execve resets
 * it. Each CPUID then raises SIGSEGV; the handler turns faulting off, runs the instruction,
 * turns faulting back on, clears the features below from the answer and steps over it.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

#if defined(HIDE_AVX512)
/* An AVX2-only CPU. Leaf 7, subleaf 0. EBX: AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL. ECX: VBMI,
 * VBMI2, VNNI, BITALG, VPOPCNTDQ. EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16,
 * AMX-TILE, AMX-INT8. */
#define LEAF7_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
#define LEAF7_ECX (BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14))
#define LEAF7_EDX (BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25))
#elif defined(HIDE_AMX)
/* An AVX-512 VNNI CPU of Ice Lake's generation. Leaf 7, subleaf 0. EDX: AMX-BF16, AVX512-FP16,
 * AMX-TILE, AMX-INT8. */
#define LEAF7_EBX 0u
#define LEAF7_ECX 0u
#define LEAF7_EDX (BIT(22) | BIT(23) | BIT(24) | BIT(25))
#else
#error "compile with -DHIDE_AVX512 or -DHIDE_AMX"
#endif
/* Both. Leaf 7, subleaf 1. EAX: AVX-VNNI, AVX512-BF16, AVX-IFMA. EDX: AVX-VNNI-INT8,
 * AVX-NE-CONVERT, AVX-VNNI-INT16. */
#define LEAF71_EAX (BIT(4) | BIT(5) | BIT(23))
#define LEAF71_EDX (BIT(4) | BIT(5) | BIT(10))

static const unsigned char CPUID[2] = {0x0f, 0xa2};

static void fault_on_cpuid(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, !on); }

static void answer_cpuid(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    unsigned leaf = (unsigned)reg[REG_RAX], subleaf = (unsigned)reg[REG_RCX];
    unsigned a, b, c, d;
    (void)info;
    if (memcmp((const void *)reg[REG_RIP], CPUID, sizeof CPUID) != 0) {
        signal(sig, SIG_DFL); /* a real fault: returning re-runs it and the default handler acts */
        return;
    }
    fault_on_cpuid(0);
    __cpuid_count(leaf, subleaf, a, b, c, d);
    fault_on_cpuid(1);
    if (leaf == 7 && subleaf == 0) {
        b &= ~LEAF7_EBX;
        c &= ~LEAF7_ECX;
        d &= ~LEAF7_EDX;
    } else if (leaf == 7 && subleaf == 1) {
        a &= ~LEAF71_EAX;
        d &= ~LEAF71_EDX;
    }
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += sizeof CPUID;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = answer_cpuid;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    fault_on_cpuid(1);
}
