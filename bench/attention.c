// bench/attention.c - the attention kernels alone, per KV cache element type:
// one decode token's attention over D cached positions in one layer of the
// Llama-3.2-1B shape (32 query heads, head_dim 64), on one thread, timed by
// the thread's CPU time (the best of R), so that other programs on the
// machine change the figure little. Complements bench/decode_at_depth, which
// times whole tokens against the bandwidth: this says how much of a token
// attention takes, and whether a cache type's kernels keep up with memory.
//
//   bench/attention [-K kv_heads,...] [-d depth] [-r repeats]
//
// Prints per (KV heads, type): ms per layer and token, GB/s of cache read
// per CPU-second, and ns per (position, KV head).
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

static double thread_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void measure(int kv_heads, int type, int depth, int repeats) {
    Transformer m;
    memset(&m, 0, sizeof m);
    Config *c = &m.c;
    c->n_layers = 1, c->n_heads = 32, c->head_dim = 64, c->n_kv_heads = kv_heads, c->kv_mul = 32 / kv_heads;
    c->q_dim = 32 * 64, c->kv_dim = kv_heads * 64, c->dim = 2048, c->seq_len = depth + 1, c->kv_type = type;
    c->key_dim = c->value_dim = 64;
    m.n_threads = 1;
    m.s.q = xcalloc(c->q_dim, sizeof(float), "q");
    m.s.xb = xcalloc(c->q_dim, sizeof(float), "xb");
    m.s.att = xcalloc((size_t)c->kv_mul * cache_len(c), sizeof(float), "att");
    m.s.kv_f32 = xcalloc((size_t)ATT_BLOCK * c->head_dim, sizeof(float), "kv_f32");
    alloc_cache(&m.s.key_cache, c, c->head_dim, 1, "keys");
    alloc_cache(&m.s.value_cache, c, c->head_dim, 0, "values");
    uint64_t state = 1;
    float row[64];
    for (int i = 0; i < c->q_dim; i++) m.s.q[i] = random_f32(&state) - 0.5f;
    for (int g = 0; g < kv_heads; g++)
        for (int p = 0; p <= depth; p++)
            for (int kv = 0; kv < 2; kv++) {
                for (int d = 0; d < 64; d++) row[d] = 2 * random_f32(&state) - 1;
                cache_store(kv ? &m.s.value_cache : &m.s.key_cache, 0, g, p, row);
            }
    AttentionTask at = {&m, 0, depth, 1, 1, m.s.q, NULL, m.s.xb, 0.125f}; // the token at position depth attends to depth + 1 positions (scale 1 / sqrt(64))
    double best = 1e30;
    for (int r = 0; r <= repeats; r++) { // the first a warm-up
        double t0 = thread_seconds();
        attention_task(&at, 0, 1);
        double t = thread_seconds() - t0;
        if (r && t < best) best = t;
    }
    double bytes = (double)kv_bytes_per_token(&m) * (depth + 1);
    printf("kv_heads %2d %-4s depth %d: %.3f ms per layer and token, %.1f GB/s of cache per CPU-second, "
           "%.1f ns per (position, KV head)\n", kv_heads, kv_type_name(type), depth, best * 1e3, bytes / best / 1e9,
           best * 1e9 / (depth + 1) / kv_heads);
    free(m.s.q); free(m.s.xb); free(m.s.att); free(m.s.kv_f32);
    free_cache(&m.s.key_cache); free_cache(&m.s.value_cache);
}

int main(int argc, char **argv) {
    int heads[8] = {32, 8, 1}, n_heads = 3, depth = 4000, repeats = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-d")) depth = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) repeats = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-K")) {
            n_heads = 0;
            for (char *s = argv[i + 1], *end; *s && n_heads < 8; s = end + (*end == ',')) {
                heads[n_heads] = (int)strtol(s, &end, 10);
                if (end == s || heads[n_heads] < 1 || 32 % heads[n_heads]) die("-K: divisors of 32, comma-separated");
                n_heads++;
            }
        } else die("usage: bench/attention [-K kv_heads,...] [-d depth] [-r repeats]");
    }
    if (depth < 1 || repeats < 1) die("usage: bench/attention [-K kv_heads,...] [-d depth] [-r repeats]");
    for (int k = 0; k < n_heads; k++)
        for (int type = KV_F32; type <= KV_Q8_0; type++) measure(heads[k], type, depth, repeats);
    return 0;
}
