/* fma_peak.c - this machine's f32 fused multiply-add peak, in GFLOP/s, with
   N threads.

   What is measured: the rate of f32 FMAs (a = a * b + c) when nothing else
   limits it: no memory traffic, and enough independent chains to hide the FMA
   latency. A core with P FMA pipes of latency L cycles needs at least P x L
   chains in flight (Zen 4/5: 2 x 4 = 8); we run 16, one per vector register.
   Each FMA counts 2 flops per lane. Prefill in an LLM engine is dominated by
   matrix-matrix products, so this is its roofline:
       best prefill tok/s = FMA peak / (2 x matmul params per token).

   The widest vector unit this build targets is used (build with -march=native):
   AVX-512 (16 lanes), AVX2+FMA (8), NEON (4), else scalar fmaf. `-u avx2`
   picks the narrower x86 unit for comparison. Threads start together at a
   barrier; a pass ends when the last one is done; the best of several passes
   is printed as `fma_peak_gflops`.

   Build: cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Wall -Wextra -o bench/fma_peak bench/fma_peak.c -lpthread
   Usage: bench/fma_peak [-t THREADS] [-p PASSES] [-u avx512|avx2|neon|scalar]   */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define CHAINS 16          // independent accumulators per thread
#define ITERS (1L << 24)   // FMAs per chain per pass (~40 ms at 220 GFLOP/s per core)

// Each kernel runs CHAINS chains of ITERS dependent FMAs; returns a sum of the
// results so the work cannot be optimized away. b < 1 keeps the values finite.
#define FMA_KERNEL(name, vtype, set1, fma, lanes_sum)                          \
    static double name(float seed) {                                           \
        vtype acc[CHAINS];                                                     \
        for (int k = 0; k < CHAINS; k++) acc[k] = set1(seed + k);              \
        vtype b = set1(0.999999f), c = set1(1e-3f);                            \
        for (long i = 0; i < ITERS; i++)                                       \
            for (int k = 0; k < CHAINS; k++) acc[k] = fma(acc[k], b, c);       \
        double s = 0;                                                          \
        for (int k = 0; k < CHAINS; k++) s += lanes_sum(acc[k]);               \
        return s;                                                              \
    }

#ifdef __AVX512F__
static float sum512(__m512 v) { return _mm512_reduce_add_ps(v); }
FMA_KERNEL(kernel_avx512, __m512, _mm512_set1_ps, _mm512_fmadd_ps, sum512)
#endif
#if defined(__AVX2__) && defined(__FMA__)
static float sum256(__m256 v) {
    float f[8];
    _mm256_storeu_ps(f, v);
    return f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
}
FMA_KERNEL(kernel_avx2, __m256, _mm256_set1_ps, _mm256_fmadd_ps, sum256)
#endif
#ifdef __ARM_NEON
static float fma_neon(float32x4_t a, float32x4_t b, float32x4_t c) { return vfmaq_f32(c, a, b); }
FMA_KERNEL(kernel_neon, float32x4_t, vdupq_n_f32, fma_neon, vaddvq_f32)
#endif
static float set1_scalar(float x) { return x; }
static float sum_scalar(float x) { return x; }
FMA_KERNEL(kernel_scalar, float, set1_scalar, fmaf, sum_scalar)

typedef struct { const char *name; int lanes; double (*run)(float); } Unit;
static const Unit units[] = { // widest first
#ifdef __AVX512F__
    {"avx512", 16, kernel_avx512},
#endif
#if defined(__AVX2__) && defined(__FMA__)
    {"avx2", 8, kernel_avx2},
#endif
#ifdef __ARM_NEON
    {"neon", 4, kernel_neon},
#endif
    {"scalar", 1, kernel_scalar},
};

static const Unit *unit;
static int n_passes;
static pthread_barrier_t start_line, finish_line;
static double results[1024];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    long t = (long)arg;
    for (int p = 0; p < n_passes; p++) {
        pthread_barrier_wait(&start_line);
        results[t] += unit->run((float)t);
        pthread_barrier_wait(&finish_line);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n_threads = 2;
    const char *want = NULL;
    n_passes = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-t")) n_threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-p")) n_passes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-u")) want = argv[i + 1];
        else { fprintf(stderr, "usage: %s [-t THREADS] [-p PASSES] [-u UNIT]\n", argv[0]); return 1; }
    }
    if (n_threads < 1 || n_threads > 1024 || n_passes < 1) {
        fprintf(stderr, "error: need -t in [1, 1024] and -p >= 1\n");
        return 1;
    }
    unit = &units[0];
    if (want) {
        unit = NULL;
        for (size_t k = 0; k < sizeof units / sizeof units[0]; k++)
            if (!strcmp(units[k].name, want)) unit = &units[k];
        if (!unit) { fprintf(stderr, "error: vector unit '%s' is not in this build\n", want); return 1; }
    }

    pthread_barrier_init(&start_line, NULL, n_threads);
    pthread_barrier_init(&finish_line, NULL, n_threads);
    pthread_t tids[1024];
    for (long t = 1; t < n_threads; t++) pthread_create(&tids[t], NULL, worker, (void *)t);
    double flops = 2.0 * unit->lanes * CHAINS * (double)ITERS * n_threads, best = 0;
    for (int p = 0; p < n_passes; p++) { // the main thread is worker 0 and keeps the time
        pthread_barrier_wait(&start_line);
        double t0 = now();
        results[0] += unit->run(0);
        pthread_barrier_wait(&finish_line);
        double gflops = flops / (now() - t0) / 1e9;
        if (gflops > best) best = gflops;
    }
    for (int t = 1; t < n_threads; t++) pthread_join(tids[t], NULL);
    double check = 0;
    for (int t = 0; t < n_threads; t++) check += results[t];
    printf("threads: %d\nvector_unit: %s\nfma_peak_gflops: %.1f\nchecksum: %g\n", n_threads, unit->name, best, check);
    return 0;
}
