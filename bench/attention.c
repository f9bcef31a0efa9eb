// bench/attention.c - the attention kernels alone, per KV cache element type:
// one decode token's attention over D cached positions in one layer of the
// Llama-3.2-1B shape (32 query heads, head_dim 64), on one thread, timed by
// the thread's CPU time (the best of R), so that other programs on the
// machine change the figure little. Complements bench/decode_at_depth, which
// times whole tokens against the bandwidth: this says how much of a token
// attention takes, and whether a cache type's kernels keep up with memory.
//
//   bench/attention [-K kv_heads|mla,...] [-d depth] [-r repeats] [-F 0|1]
//
// -F 1 flushes the caches before every run (writes 96 MiB elsewhere), as a
// token's other layers do in decode: the cache then comes from memory, not
// from L3, where a layer's cache of up to ~30 MB otherwise stays between runs.
//
// Prints per (KV heads, type): ms per layer and token, GB/s of cache read
// per CPU-second, GFLOP/s per CPU-second (2 x the multiply-adds of the
// scores and the weighted sums: to compare with bench/fma_peak -t 1, the
// limit of MLA, whose 32 heads all read one latent), and ns per (position,
// KV head). -K mla: DeepSeek-V2's MLA shape (latent 512, RoPE key 64).
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

static double thread_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// kv_heads 0 is MLA (DeepSeek-V2's shape: a latent c of 512 and a RoPE key of
// 64 per position, all 32 query heads sharing them; query heads 64 + 512 wide
// against the key [c; k_R], 512 wide against the value c).
static void measure(int kv_heads, int type, int depth, int repeats, int flush) {
    Transformer m;
    memset(&m, 0, sizeof m);
    Config *c = &m.c;
    const int mla = kv_heads == 0, dc = 512, dr = 64;
    if (mla) kv_heads = 1;
    c->n_layers = 1, c->n_heads = 32, c->head_dim = 64, c->n_kv_heads = kv_heads, c->kv_mul = 32 / kv_heads;
    c->q_dim = 32 * 64, c->kv_dim = kv_heads * 64, c->dim = 2048, c->seq_len = depth + 1, c->kv_type = type;
    c->key_dim = mla ? dr : 64, c->value_dim = mla ? dc : 64;
    if (mla) c->attention = ATTENTION_MLA, c->kv_latent_dim = dc, c->kv_rope_dim = dr;
    m.n_threads = 1;
    float *q = xcalloc((size_t)32 * c->key_dim, sizeof(float), "q");
    float *q_row = xcalloc((size_t)32 * c->value_dim, sizeof(float), "q_row");
    float *out = xcalloc((size_t)32 * c->value_dim, sizeof(float), "out");
    m.s.att = xcalloc((size_t)c->kv_mul * cache_len(c), sizeof(float), "att");
    m.s.kv_f32 = xcalloc((size_t)ATT_BLOCK * KV_F32_WIDTH(c), sizeof(float), "kv_f32");
    alloc_cache(&m.s.key_cache, c, c->key_dim, 1, "keys");
    alloc_cache(&m.s.value_cache, c, c->value_dim, 0, "values");
    alloc_latent_queries(&m.s, c, 1);
    uint64_t state = 1;
    float *row = xcalloc(KV_F32_WIDTH(c), sizeof(float), "row");
    for (int i = 0; i < 32 * c->key_dim; i++) q[i] = random_f32(&state) - 0.5f;
    for (int i = 0; i < 32 * c->value_dim; i++) q_row[i] = random_f32(&state) - 0.5f;
    for (int g = 0; g < kv_heads; g++)
        for (int p = 0; p <= depth; p++)
            for (int kv = 0; kv < 2; kv++) {
                KVCache *kc = kv ? &m.s.value_cache : &m.s.key_cache;
                for (int d = 0; d < kc->width; d++) row[d] = 2 * random_f32(&state) - 1;
                cache_store(kc, 0, g, p, row);
            }
    // the token at position depth attends to depth + 1 positions
    AttentionTask at = {&m, 0, depth, 1, 1, q, mla ? q_row : NULL, out, 1.0f / sqrtf((float)(mla ? 64 + dr : 64))};
    double best = 1e30;
    unsigned char *junk = flush ? xcalloc((size_t)96 << 20, 1, "flush") : NULL;
    for (int r = 0; r <= repeats; r++) { // the first a warm-up
        for (size_t i = 0; junk && i < ((size_t)96 << 20); i += 64) junk[i]++;
        double t0 = thread_seconds();
        attention_task(&at, 0, 1);
        double t = thread_seconds() - t0;
        if (r && t < best) best = t;
    }
    double bytes = (double)kv_bytes_per_token(&m) * (depth + 1);
    // multiply-adds: every query head against every position's key (key_dim, + the latent for MLA) and value
    double flops = 2.0 * 32 * (depth + 1) * (c->key_dim + (mla ? dc : 0) + c->value_dim);
    char label[32];
    snprintf(label, sizeof label, mla ? "mla 512+64" : "kv_heads %2d", kv_heads);
    printf("%-11s %-4s depth %d: %.3f ms per layer and token, %.1f GB/s of cache per CPU-second, "
           "%.1f GFLOP/s per CPU-second, %.1f ns per (position, KV head)\n", label, kv_type_name(type), depth, best * 1e3, bytes / best / 1e9, flops / best / 1e9,
           best * 1e9 / (depth + 1) / kv_heads);
    free(junk); free(q); free(q_row); free(out); free(row); free(m.s.att); free(m.s.kv_f32);
    free(m.s.lat_q[0].q); free(m.s.lat_q[0].s); free(m.s.lat_q[0].sum128); free(m.s.lat_q); free(m.s.lat_order);
    free_cache(&m.s.key_cache); free_cache(&m.s.value_cache);
}

int main(int argc, char **argv) {
    int heads[8] = {32, 8, 1, 0}, n_heads = 4, depth = 4000, repeats = 20, flush = 0;
    const char *usage = "usage: bench/attention [-K kv_heads|mla,...] [-d depth] [-r repeats] [-F 0|1]";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-d")) depth = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) repeats = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-F")) flush = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-K")) {
            n_heads = 0;
            for (char *s = argv[i + 1], *end; *s && n_heads < 8; s = end + (*end == ',')) {
                if (!strncmp(s, "mla", 3)) { heads[n_heads++] = 0, end = s + 3; continue; }
                heads[n_heads] = (int)strtol(s, &end, 10);
                if (end == s || heads[n_heads] < 1 || 32 % heads[n_heads]) die("-K: divisors of 32 or mla, comma-separated");
                n_heads++;
            }
        } else die("%s", usage);
    }
    if (depth < 1 || repeats < 1) die("%s", usage);
    for (int k = 0; k < n_heads; k++)
        for (int type = KV_F32; type <= KV_Q8_0; type++) measure(heads[k], type, depth, repeats, flush);
    return 0;
}
