/* What this CPU's cores can do in fp32, as ceilings for BENCHMARKS.md's "of matmul" column.
 *
 *   fma:    independent fused multiply-add chains on registers only (no memory): the rate the
 *           FMA units allow at the clock the cores hold while doing it.
 *   kernel: a register-blocked matrix-multiply inner kernel (12 rows x 2 vectors of C held in
 *           registers, one broadcast of A and two loads of B per step) on L1-resident packed
 *           panels: what the best GEMM could reach if memory cost nothing.
 *
 * Vector width comes from the compiler flags (-march=native: AVX-512 when the CPU has it,
 * otherwise AVX2 + FMA). Each mode runs on 1 thread and on every thread asked for; rates are the
 * median of 5 repeats. Built and run by benchmarks/fp32_peak.sh.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define W 16
#define VFMA _mm512_fmadd_ps
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_load_ps
#define VLOADU _mm512_loadu_ps
#define VSTOREU _mm512_storeu_ps
#define VADD _mm512_add_ps
#define ISA "AVX-512"
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define W 8
#define VFMA _mm256_fmadd_ps
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_load_ps
#define VLOADU _mm256_loadu_ps
#define VSTOREU _mm256_storeu_ps
#define VADD _mm256_add_ps
#define ISA "AVX2+FMA"
#else
#error "needs AVX2+FMA or AVX-512: build with -march=native on an x86-64 CPU that has them"
#endif

#define CHAINS 12 /* the accumulators in fma_chains */
#ifndef FMA_STEPS /* -D overrides, for a quick build check */
#define FMA_STEPS 50000000L /* per thread: CHAINS vector FMAs each */
#endif
#define MR 12
#define KC 256
#ifndef KERNEL_CALLS
#define KERNEL_CALLS 200000L
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float sink[64][W];

static void *fma_chains(void *arg) {
    long id = (long)arg;
    /* twelve named accumulators (not an array, which the compiler would keep in memory) */
    vec a0 = VSET1(1.0f), a1 = VSET1(1.1f), a2 = VSET1(1.2f), a3 = VSET1(1.3f);
    vec a4 = VSET1(1.4f), a5 = VSET1(1.5f), a6 = VSET1(1.6f), a7 = VSET1(1.7f);
    vec a8 = VSET1(1.8f), a9 = VSET1(1.9f), a10 = VSET1(2.0f), a11 = VSET1(2.1f);
    vec m = VSET1(0.9999999f), c = VSET1(1e-7f);
    for (long s = 0; s < FMA_STEPS; s++) {
        a0 = VFMA(a0, m, c), a1 = VFMA(a1, m, c), a2 = VFMA(a2, m, c), a3 = VFMA(a3, m, c);
        a4 = VFMA(a4, m, c), a5 = VFMA(a5, m, c), a6 = VFMA(a6, m, c), a7 = VFMA(a7, m, c);
        a8 = VFMA(a8, m, c), a9 = VFMA(a9, m, c), a10 = VFMA(a10, m, c), a11 = VFMA(a11, m, c);
        /* keeps the compiler from folding the loop: the chains must really run */
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5),
                         "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
    }
    vec s = VADD(VADD(VADD(a0, a1), VADD(a2, a3)), VADD(VADD(a4, a5), VADD(a6, a7)));
    VSTOREU(sink[id], VADD(s, VADD(VADD(a8, a9), VADD(a10, a11))));
    return NULL;
}

/* C[MR x 2W] += A[MR x KC] * B[KC x 2W], A packed k-major (MR per k), B packed (2W per k). */
static void kernel(const float *A, const float *B, float *C, long ldc) {
    vec c0[MR], c1[MR];
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = VZERO();
    for (int k = 0; k < KC; k++) {
        vec b0 = VLOAD(B + k * 2 * W), b1 = VLOAD(B + k * 2 * W + W);
#pragma GCC unroll 12
        for (int i = 0; i < MR; i++) {
            vec a = VSET1(A[k * MR + i]);
            c0[i] = VFMA(a, b0, c0[i]);
            c1[i] = VFMA(a, b1, c1[i]);
        }
    }
    for (int i = 0; i < MR; i++) {
        VSTOREU(C + i * ldc, VADD(c0[i], VLOADU(C + i * ldc)));
        VSTOREU(C + i * ldc + W, VADD(c1[i], VLOADU(C + i * ldc + W)));
    }
}

static void *kernel_loop(void *arg) {
    long id = (long)arg;
    const int panels = 8; /* 8 A panels (96 KiB) + one B panel (32 KiB at W=16) */
    float *A = aligned_alloc(64, sizeof(float) * KC * MR * panels);
    float *B = aligned_alloc(64, sizeof(float) * KC * 2 * W);
    float *C = aligned_alloc(64, sizeof(float) * MR * 2 * W * panels);
    if (!A || !B || !C) {
        fprintf(stderr, "fp32_peak: out of memory\n");
        exit(1);
    }
    for (long i = 0; i < (long)KC * MR * panels; i++) A[i] = 1e-3f * (i % 7);
    for (long i = 0; i < (long)KC * 2 * W; i++) B[i] = 1e-3f * (i % 5);
    memset(C, 0, sizeof(float) * MR * 2 * W * panels);
    for (long r = 0; r < KERNEL_CALLS; r++)
        kernel(A + (r % panels) * KC * MR, B, C + (r % panels) * MR * 2 * W, 2 * W);
    sink[id][0] = C[id];
    free(A);
    free(B);
    free(C);
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double rate(void *(*fn)(void *), int threads, double flop_per_thread) {
    double r[5];
    pthread_t t[64];
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, fn, (void *)i);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        r[rep] = threads * flop_per_thread / (now() - t0) * 1e-9;
    }
    qsort(r, 5, sizeof(double), cmp);
    return r[2];
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    if (threads < 1 || threads > 64) {
        fprintf(stderr, "usage: fp32_peak [THREADS]  (1-64, default 2)\n");
        return 2;
    }
    double fma_flop = (double)FMA_STEPS * CHAINS * W * 2;
    double kernel_flop = (double)KERNEL_CALLS * KC * MR * 2 * W * 2;
    printf("isa %s, %d fp32 lanes per vector\n", ISA, W);
    for (int n = 1; n <= threads; n += (threads > 1 ? threads - 1 : 1)) {
        printf("fma    threads %d: %.1f GFLOP/s\n", n, rate(fma_chains, n, fma_flop));
        printf("kernel threads %d: %.1f GFLOP/s\n", n, rate(kernel_loop, n, kernel_flop));
    }
    return 0;
}
