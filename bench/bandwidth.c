/* bandwidth.c - this machine's memory READ bandwidth, with N threads.

   What is measured: the time N threads take to sum a large array (2 GiB by
   default, far larger than any cache) that they only read. Decode in an LLM
   engine streams every weight once per token, so this read rate is the
   "roofline" a decode step can at best reach:
       best decode tok/s = bandwidth / bytes read per token.

   The array is mapped with 2 MiB pages where the kernel allows
   (MADV_HUGEPAGE; -H 0 for 4 KiB pages), as ./run's weights are when the file
   sits in the page cache in large folios and its KV cache always: with 4 KiB
   pages the TLB misses of a VM's nested page tables lower the figure, and the
   roofline would flatter the engine.

   How: the array is touched first (so page faults are not timed), then each
   pass splits it into one contiguous slice per thread; the threads start
   together at a barrier and the pass ends when the last one is done. Loads
   are 64-byte vectors (GCC vector extensions; the compiler maps them onto
   AVX-512, AVX2 or NEON as -march allows) into 8 independent accumulators, so
   the loop waits on memory, not on the adder. Prints the best and the median
   pass; `bandwidth_gbs` is the best one (GB = 1e9 bytes), the least disturbed
   measure of what the hardware can deliver. With -P BYTES each load also
   prefetches the line BYTES ahead, as run.c's decode kernels do: on the Xeon
   where those prefetches made decode 9-11 % faster, the plain sum measured
   32.7 GB/s and -P 2048 or 3072 32.1-32.4, so the roofline is not lowered
   by the sum lacking them.

   Build: cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Wall -Wextra -o bench/bandwidth bench/bandwidth.c -lpthread
   Usage: bench/bandwidth [-t THREADS] [-g GIB] [-p PASSES] [-H 0|1] [-P BYTES]      */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

typedef float vec __attribute__((vector_size(64))); // 16 floats, one cache line

typedef struct {
    const vec *data;  // this thread's slice
    size_t n;         // vectors in it (a multiple of 8)
    float sum;        // result, so the loads cannot be optimized away
} Slice;

static pthread_barrier_t start_line, finish_line;
static int n_passes, ahead;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float sum_slice(const vec *p, size_t n, int bytes_ahead) {
    vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    if (bytes_ahead) // (the loop twice rather than a branch in it)
        for (size_t i = 0; i < n; i += 8) {
            for (int k = 0; k < 8; k++) __builtin_prefetch((const char *)(p + i + k) + bytes_ahead, 0, 3);
            a0 += p[i];     a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
            a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
        }
    else
        for (size_t i = 0; i < n; i += 8) { // 512 bytes per iteration
            a0 += p[i];     a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
            a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
        }
    vec a = (a0 + a1) + (a2 + a3) + (a4 + a5) + (a6 + a7);
    float s = 0;
    for (int k = 0; k < 16; k++) s += a[k];
    return s;
}

// Every thread (the main one included) runs n_passes passes between barriers.
static void *worker(void *arg) {
    Slice *s = arg;
    for (int p = 0; p < n_passes; p++) {
        pthread_barrier_wait(&start_line);
        s->sum += sum_slice(s->data, s->n, ahead);
        pthread_barrier_wait(&finish_line);
    }
    return NULL;
}

// First touch: each thread writes its own slice (pages land near it).
static void *touch(void *arg) {
    Slice *s = arg;
    float *f = (float *)s->data;
    for (size_t i = 0; i < s->n * 16; i++) f[i] = (float)(i & 7);
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int n_threads = 2, huge = 1;
    double gib = 2;
    n_passes = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-t")) n_threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-g")) gib = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "-p")) n_passes = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-H")) huge = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-P")) ahead = atoi(argv[i + 1]);
        else { fprintf(stderr, "usage: %s [-t THREADS] [-g GIB] [-p PASSES] [-H 0|1] [-P BYTES]\n", argv[0]); return 1; }
    }
    if (n_threads < 1 || n_threads > 1024 || gib <= 0 || n_passes < 1 || ahead < 0) {
        fprintf(stderr, "error: need -t in [1, 1024], -g > 0, -p >= 1, -P >= 0\n");
        return 1;
    }
    // Whole 8-vector blocks per thread, so the inner loop needs no tail.
    size_t per_thread = (size_t)(gib * (1ull << 30)) / sizeof(vec) / n_threads / 8 * 8;
    size_t bytes = per_thread * n_threads * sizeof(vec);
    vec *data = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED || per_thread == 0) { fprintf(stderr, "error: cannot allocate %zu bytes\n", bytes); return 1; }
    if (huge) madvise(data, bytes, MADV_HUGEPAGE);

    Slice *slices = calloc(n_threads, sizeof(Slice));
    pthread_t *tids = calloc(n_threads, sizeof(pthread_t));
    if (!slices || !tids) { fprintf(stderr, "error: out of memory\n"); return 1; }
    for (int t = 0; t < n_threads; t++) slices[t] = (Slice){data + t * per_thread, per_thread, 0};
    for (int t = 0; t < n_threads; t++) pthread_create(&tids[t], NULL, touch, &slices[t]);
    for (int t = 0; t < n_threads; t++) pthread_join(tids[t], NULL);

    pthread_barrier_init(&start_line, NULL, n_threads);
    pthread_barrier_init(&finish_line, NULL, n_threads);
    for (int t = 1; t < n_threads; t++) pthread_create(&tids[t], NULL, worker, &slices[t]);
    double *gbs = calloc(n_passes, sizeof(double));
    for (int p = 0; p < n_passes; p++) { // the main thread is worker 0 and keeps the time
        pthread_barrier_wait(&start_line);
        double t0 = now();
        slices[0].sum += sum_slice(slices[0].data, slices[0].n, ahead);
        pthread_barrier_wait(&finish_line);
        gbs[p] = bytes / (now() - t0) / 1e9;
    }
    for (int t = 1; t < n_threads; t++) pthread_join(tids[t], NULL);

    float check = 0;
    for (int t = 0; t < n_threads; t++) check += slices[t].sum;
    qsort(gbs, n_passes, sizeof(double), cmp_double);
    printf("threads: %d\narray_bytes: %zu\npasses: %d\n", n_threads, bytes, n_passes);
    printf("bandwidth_median_gbs: %.1f\n", gbs[n_passes / 2]);
    printf("bandwidth_gbs: %.1f\n", gbs[n_passes - 1]);
    printf("checksum: %g\n", check);
    free(gbs); free(tids); free(slices); munmap(data, bytes);
    return 0;
}
