// bench/decode_at_depth.c - the engine's decode speed at a given depth
// (tokens already in the KV cache), without paying for the prefill.
//
//   decode_at_depth MODEL.bin [MODEL2.bin ...] -d 1,1024,4000 [-n 16] [-r 3] [-T 2] [-K kv_heads] [-b GIB]
//
// Decoding at depth D = one forward() call per token at positions D, D+1, ...:
// the same call ./run's generate loop makes after its prefill, so the same
// matmuls and the same attention loop over D cached positions. What the cache
// holds does not change the work, so instead of prefilling D tokens (minutes
// on a 1B model with 2 cores) positions 0..D-1 of every layer are filled with
// pseudo-random values. (They must be written: calloc'ed memory never written
// is the kernel's shared zero page, which would read unrealistically fast.)
// experiments/kv_heads.py checks the result against a real ./run prefill + decode.
//
// With several models, all are loaded first and measured in turn (repeat,
// depth, model), one short measurement each: a burst of load from other
// programs then hits the models alike, so comparing them stays fair on a
// shared machine.
//
// Prints one line per measurement: "model J depth D: N tokens, X tok/s, cpu share S",
// S = process CPU time / (wall time x threads) while timing: near 1 when the
// threads had the cores to themselves (and spun little), lower when other
// programs took them.
// With -b GIB, the read bandwidth is measured between the tokens: before
// every token and after the last, the engine's threads sum the first GIB of
// the model's own weights once (the memory decode streams, mapped the same
// way, huge pages or not), and the line ends ", bandwidth B GB/s", the median
// of those passes. (tok/s counts the tokens' time only.) On a VM whose
// neighbours share the memory bus, the bandwidth on offer moves by 2x within
// seconds; sampled between the tokens in the same process on the same pages,
// tok/s x bytes per token / B is the fraction of the bandwidth decode got
// *then*.
//
// Built by experiments/kv_heads.py with the Makefile's flags:
//   cc -O3 -march=native -std=c11 -D_GNU_SOURCE -ffp-contract=fast -DTESTING -I.
//   -o bench/decode_at_depth bench/decode_at_depth.c tokenizer.c -lm -lpthread
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Bytes of `path`'s mapping that the kernel maps with huge (PMD) pages, from
// /proc/self/smaps: a weight file in the page cache as 2 MiB folios streams
// faster (fewer TLB misses) than one in 4 KiB pages, which depends on how the
// file was first read, not on the model: kv_heads.py re-reads every file the
// same way, and this line shows it worked.
static long long huge_mapped_kb(const char *path) {
    char real[PATH_MAX], line[PATH_MAX + 256];
    if (!realpath(path, real)) return -1;
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    int in_file = 0;
    long long kb = 0, v;
    unsigned long long lo, hi;
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\n"), len = strlen(real);
        line[n] = 0;
        if (sscanf(line, "%llx-%llx", &lo, &hi) == 2) // a mapping's header: range perms offset dev inode path
            in_file = n >= len && !strcmp(line + n - len, real);
        else if (in_file && sscanf(line, "FilePmdMapped: %lld kB", &v) == 1)
            kb += v;
    }
    fclose(f);
    return kb;
}

static void fill_cache(Transformer *m, int positions) {
    const Config *c = &m->c;
    uint64_t state = 0x2545F4914F6CDD1Dull;
    for (int l = 0; l < c->n_layers; l++)
        for (int g = 0; g < c->n_kv_heads; g++) {
            float *k = cache_head(m->s.key_cache, c, l, g, c->key_dim), *v = cache_head(m->s.value_cache, c, l, g, c->value_dim);
            // (keys lie in tiles: about the same positions; MLA: key_dim k_R, value_dim the latent c)
            for (size_t i = 0; i < (size_t)positions * c->key_dim; i++) k[i] = 2 * random_f32(&state) - 1; // [-1, 1)
            for (size_t i = 0; i < (size_t)positions * c->value_dim; i++) v[i] = 2 * random_f32(&state) - 1;
        }
}

#define MAX_MODELS 8

// Bandwidth: each thread sums its share of the bytes (as integers: weights
// read as floats could be denormals, slow on some CPUs) into vector accumulators.
typedef struct { const vint *data; size_t n; int32_t sink[64]; } SumTask; // n vectors, a multiple of 8

static void sum_task(void *arg, int ith, int nth) {
    SumTask *a = arg;
    int lo, hi, blocks = (int)(a->n / 8);
    split_range(blocks, ith, nth, 1, &lo, &hi);
    vint acc[8] = {0};
    for (size_t i = (size_t)lo * 8; i < (size_t)hi * 8; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a->data[i + k];
    vint sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (int k = 0; k < VEC_LEN; k++) a->sink[ith % 64] += sum[k];
}

// GB/s of one pass over the array (GB = 1e9 bytes).
static double bandwidth_pass(ThreadPool *pool, SumTask *task) {
    double t0 = now_seconds();
    pool_run(pool, sum_task, task);
    return task->n * sizeof(vint) / (now_seconds() - t0) / 1e9;
}

// The median of n values (sorts them).
static double median_of(double *x, int n) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j - 1] > x[j]; j--) { double t = x[j]; x[j] = x[j - 1]; x[j - 1] = t; }
    return n % 2 ? x[n / 2] : (x[n / 2 - 1] + x[n / 2]) / 2;
}

int main(int argc, char **argv) {
    const char *usage = "usage: decode_at_depth MODEL.bin [MODEL2.bin ...] -d D1,D2,... [-n TOKENS] [-r REPEATS] "
                        "[-T THREADS] [-K KV_HEADS] [-b GIB]";
    const char *paths[MAX_MODELS];
    int n_models = 0, depths[16], n_depths = 0, tokens = 16, repeats = 3, threads = 2, kv_heads = 0, max_depth = 0;
    double bw_gib = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-') {
            if (n_models == MAX_MODELS) die("at most %d models", MAX_MODELS);
            paths[n_models++] = argv[i];
            continue;
        }
        if (i + 1 >= argc) die("option %s needs a value", argv[i]);
        const char *a = argv[i], *v = argv[++i];
        if (!strcmp(a, "-d")) {
            for (char *s = (char *)v, *end; *s; s = end + (*end == ',')) {
                long d = strtol(s, &end, 10);
                if (end == s || d < 1 || n_depths == 16) die("-d: bad depth list '%s'", v);
                depths[n_depths++] = (int)d;
                if (d > max_depth) max_depth = (int)d;
            }
        } else if (!strcmp(a, "-n")) tokens = atoi(v);
        else if (!strcmp(a, "-r")) repeats = atoi(v);
        else if (!strcmp(a, "-T")) threads = atoi(v);
        else if (!strcmp(a, "-K")) kv_heads = atoi(v);
        else if (!strcmp(a, "-b")) bw_gib = atof(v);
        else die("unknown option '%s'\n%s", a, usage);
    }
    if (!n_models || !n_depths || tokens < 1 || repeats < 1 || threads < 1) die("%s", usage);
    // Several models are loaded together and measured in turn, one short
    // measurement each, so that load from other programs hits them alike.
    static Transformer m[MAX_MODELS];
    int tok[MAX_MODELS], context = max_depth + tokens;
    for (int j = 0; j < n_models; j++) {
        build_transformer(&m[j], paths[j]);
        setup_transformer(&m[j], context, threads, kv_heads);
        fill_cache(&m[j], context);
        tok[j] = m[j].h.bos_id >= 0 ? m[j].h.bos_id : 0;
        forward(&m[j], &tok[j], 1, 0, 0); // warm-up: every weight page touched once
        printf("model %d: %s, %lld of %zu MiB mapped in huge pages\n", j, paths[j], huge_mapped_kb(paths[j]) / 1024,
               m[j].map_bytes >> 20);
    }
    // one thread pool for all: an idle pool's worker spins a while before it sleeps,
    // and would take cycles from the model being measured next
    for (int j = 1; j < n_models; j++) {
        pool_free(m[j].pool);
        m[j].pool = m[0].pool;
    }
    SumTask bw_task[MAX_MODELS] = {0};
    for (int j = 0; j < n_models && bw_gib > 0; j++) { // the start of model j's weights, at most bw_gib
        size_t start = (m[j].h.weights_offset + 63) / 64 * 64, bytes = m[j].map_bytes - start;
        if (bytes > (size_t)(bw_gib * (1 << 30))) bytes = (size_t)(bw_gib * (1 << 30));
        bw_task[j].data = (const vint *)((const char *)m[j].map + start);
        bw_task[j].n = bytes / sizeof(vint) / 8 * 8;
    }
    double *passes = xcalloc((size_t)tokens + 1, sizeof(double), "bandwidth passes");
    for (int r = 0; r < repeats; r++)
        for (int k = 0; k < n_depths; k++)
            for (int j = 0; j < n_models; j++) {
                // position p attends to p + 1 cached positions; depth D = D positions before the
                // first decoded token, as after a D-token prompt in ./run
                double t = 0, cpu = 0;
                for (int i = 0; i < tokens; i++) {
                    if (bw_gib > 0) passes[i] = bandwidth_pass(m[0].pool, &bw_task[j]);
                    double t0 = now_seconds(), c0 = cpu_seconds();
                    float *logits = forward(&m[j], &tok[j], 1, depths[k] + i, 0);
                    tok[j] = argmax(logits, m[j].c.vocab_size);
                    t += now_seconds() - t0, cpu += cpu_seconds() - c0;
                }
                printf("model %d depth %d: %d tokens, %.3f tok/s, cpu share %.2f", j, depths[k], tokens, tokens / t,
                       cpu / (t * threads));
                if (bw_gib > 0) {
                    passes[tokens] = bandwidth_pass(m[0].pool, &bw_task[j]);
                    printf(", bandwidth %.2f GB/s", median_of(passes, tokens + 1));
                }
                printf("\n");
                fflush(stdout);
            }
    free(passes);
    for (int j = n_models - 1; j >= 0; j--) {
        if (j) m[j].pool = NULL;
        free_transformer(&m[j]);
    }
    return 0;
}
