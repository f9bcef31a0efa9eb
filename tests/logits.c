// tests/logits MODEL.bin OUT.f32 id0 id1 ... [-c N] [-T N] [-B N] [-K N] [-k f32|f16|q8_0]
// Feeds the ids at positions 0, 1, 2, ... and writes (n_ids, vocab_size)
// float32 logits, one row per position: the engine's numbers for the
// reference tests. -B sets the block size of the forward calls (default 1:
// token by token; larger blocks exercise batched prefill); -K applies --kv-heads,
// -k --kv-type.
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

int main(int argc, char **argv) {
    if (argc < 4) die("usage: tests/logits MODEL.bin OUT.f32 id0 id1 ... [-c N] [-T N] [-B N] [-K N] [-k f32|f16|q8_0]");
    int n = 0, seq_len = 0, threads = 2, block = 1, kv_heads = 0, kv_type = KV_F32;
    int *ids = xcalloc(argc, sizeof(int), "ids");
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "-c") && i + 1 < argc) seq_len = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-T") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-B") && i + 1 < argc) block = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-K") && i + 1 < argc) kv_heads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-k") && i + 1 < argc) kv_type = parse_kv_type(argv[++i]);
        else ids[n++] = atoi(argv[i]);
    }
    if (block < 1 || block > MAX_BATCH) die("-B must be in [1, %d]", MAX_BATCH);
    Transformer m;
    build_transformer(&m, argv[1]);
    m.c.kv_type = kv_type;
    setup_transformer(&m, seq_len, threads, kv_heads);
    if (n > m.c.seq_len) die("%d ids exceed the context %d", n, m.c.seq_len);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m.c.vocab_size) die("id %d out of range", ids[i]);
    FILE *f = fopen(argv[2], "wb");
    if (!f) die("cannot open %s", argv[2]);
    for (int i = 0; i < n; i += block) {
        int T = n - i < block ? n - i : block;
        float *logits = forward(&m, ids + i, T, i, 1);
        if (fwrite(logits, sizeof(float), (size_t)T * m.c.vocab_size, f) != (size_t)T * m.c.vocab_size)
            die("write failed");
    }
    fclose(f);
    free(ids);
    free_transformer(&m);
    return 0;
}
