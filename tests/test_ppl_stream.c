// -m ppl reads its text in parts, cut where tokenizer_cut allows, so that a
// text of any length is scored in bounded memory. These checks prove the
// parts change nothing: the streamed tokens equal the whole text's, for both
// tokenizer kinds, on the shared corpora at several read sizes and on a
// 200 MB file made of them; the perplexity of a streamed text equals the
// whole text's to the last bit; and ./run on the 200 MB file stays within
// the model + KV cache + 100 MB while it scores it.
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"
#include "tokenizer_testlib.h"

#include <sys/wait.h>

static int failures = 0;

typedef struct { int *ids; size_t n, cap, parts; } Collected;

static void collect(void *ctx, const int *ids, size_t n) {
    Collected *c = ctx;
    if (c->n + n > c->cap) {
        c->cap = (c->n + n) * 2;
        c->ids = realloc(c->ids, c->cap * sizeof(int));
        if (!c->ids) die("out of memory");
    }
    memcpy(c->ids + c->n, ids, n * sizeof(int));
    c->n += n;
    c->parts++;
}

// The tokens of the file at path read whole, and streamed read_bytes at a time: equal?
static void same_tokens(const char *name, const Tokenizer *tok, const char *path, size_t read_bytes, int min_parts) {
    size_t len, n_whole;
    char *text = read_path(path, &len);
    int *whole = tokenizer_encode(tok, text, len, 1, &n_whole);
    free(text);
    FILE *f = open_input(path);
    Collected c = {0};
    stream_tokens(tok, f, read_bytes, collect, &c);
    fclose(f);
    size_t first_diff = 0;
    while (first_diff < c.n && first_diff < n_whole && c.ids[first_diff] == whole[first_diff]) first_diff++;
    failures += !check(c.n == n_whole && first_diff == n_whole && c.parts >= (size_t)min_parts, name,
          "%zu tokens streamed in %zu parts, %zu whole, first difference at token %zu", c.n, c.parts, n_whole, first_diff);
    free(whole);
    free(c.ids);
}

static int export_model(const char *py, const char *out, const char *args) {
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "%s export/export.py %s %s >/dev/null 2>&1", py, out, args);
    return system(cmd) == 0;
}

int main(void) {
    const char *py = env_or("PYTHON", "python3"), *run = env_or("RUN", "./run");
    char stories[4096], llama3[4096], args[8192], corpus[2][4096], big[4096], part[4096];
    snprintf(stories, sizeof stories, "%s", scratch_path("ppl_stream_stories.l3ck"));
    snprintf(llama3, sizeof llama3, "%s", scratch_path("ppl_stream_llama3.l3ck"));
    snprintf(big, sizeof big, "%s", scratch_path("ppl_stream_big.txt"));
    snprintf(part, sizeof part, "%s", scratch_path("ppl_stream_64k.txt"));
    snprintf(corpus[0], sizeof corpus[0], "%s", shared_path("corpora/tinystories-valid.txt"));
    snprintf(corpus[1], sizeof corpus[1], "%s", shared_path("corpora/prose.txt"));
    snprintf(args, sizeof args, "--random --dim 16 --hidden-dim 32 --n-layers 1 --n-heads 2 --n-kv-heads 1 "
             "--max-seq-len 64 --vocab-size 128256 --tokenizer %s", shared_path("models/llama3-tokenizer.json"));
    for (int i = 0; i < 2; i++)
        if (access(corpus[i], R_OK)) {
            missing_file("ppl_stream", corpus[i]);
            return 0;
        }
    if (!export_model(py, stories, "--llama2c models/stories260K.bin --tokenizer models/tok512.bin")
        || !export_model(py, llama3, args)) {
        printf("FAIL ppl_stream_setup: cannot export the models with %s\n", py);
        return 1;
    }
    Transformer m[2];
    build_transformer(&m[0], stories);
    build_transformer(&m[1], llama3);
    const char *kind[2] = {"llama2c", "llama3"}, *text_name[2] = {"tinystories", "prose"};

    // 1. the corpora, cut into many parts (under a sanitizer, which slows the tokenizer and the forward
    // pass ~10-50x, one way, on the corpus's first 128 KB, and a 4 KB text in 2.)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    const int n_texts = 1, n_reads = 1;
    const size_t big_bytes = 4u << 20, ppl_bytes = 4096;
    (void)run; // the RSS check below is compiled out
    char head[4096];
    snprintf(head, sizeof head, "%s", scratch_path("ppl_stream_head.txt"));
    size_t head_len;
    char *head_text = read_path(corpus[0], &head_len);
    FILE *hf = fopen(head, "wb");
    fwrite(head_text, 1, head_len < (128u << 10) ? head_len : (128u << 10), hf);
    fclose(hf);
    free(head_text);
    snprintf(corpus[0], sizeof corpus[0], "%s", head);
#else
    const int n_texts = 2, n_reads = 3;
    const size_t big_bytes = 200u << 20, ppl_bytes = 65536; // the perplexity text, read in 16 parts
#endif
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < n_texts; i++) {
            size_t reads[] = {4096, 997, 65536};
            for (int r = 0; r < n_reads; r++) {
                char name[256];
                snprintf(name, sizeof name, "%s_%s_read_%zu_bytes_at_a_time_gives_the_whole_texts_tokens",
                         kind[k], text_name[i], reads[r]);
                same_tokens(name, m[k].tok, corpus[i], reads[r], 6);
            }
        }

    // 2. the perplexity of a streamed text is the whole text's, bit for bit (stories260K, 64 KB of text)
    size_t len;
    char *text = read_path(corpus[0], &len);
    len = len < ppl_bytes ? len : ppl_bytes;
    FILE *f = fopen(part, "wb");
    fwrite(text, 1, len, f);
    fclose(f);
    setup_transformer(&m[0], 0, 2, 0);
    Perplexity whole = perplexity(&m[0], NULL, text, len, 0);
    f = open_input(part);
    Perplexity streamed = perplexity(&m[0], f, NULL, 0, ppl_bytes / 16);
    fclose(f);
    failures += !check(whole.scored == streamed.scored && whole.nll == streamed.nll && whole.scored > (long)len / 8,
          "streamed_perplexity_equals_the_whole_texts_bit_for_bit",
          "whole: %ld tokens, nll %.17g; streamed: %ld tokens, nll %.17g", whole.scored, whole.nll, streamed.scored,
          streamed.nll);
    free(text);
    remove(part);

    // 3. a 200 MB file of the corpora repeated (4 MB under a sanitizer: the checks keep their names)
    f = fopen(big, "wb");
    for (size_t written = 0; written < big_bytes;)
        for (int i = 0; i < 2 && written < big_bytes; i++) {
            size_t n;
            char *t = read_path(corpus[i], &n);
            fwrite(t, 1, n, f);
            written += n;
            free(t);
        }
    fclose(f);
    // the same tokens, so the same windows and the same perplexity as scoring it whole. (Not for
    // llama2c: its merge over the whole text needs ~60 bytes of scratch per byte of text, 12 GB
    // here, which is why -m ppl could not score such a file before it streamed.)
    same_tokens("llama3_200_MB_file_streamed_gives_the_whole_texts_tokens", m[1].tok, big, PPL_READ_BYTES, 4);

    // ./run -m ppl on it: the peak RSS after 5 s of scoring stays within model + KV + 100 MB
    // (it read the text whole before, 200 MB at once). Not with a sanitizer's shadow memory.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "%s %s -m ppl -f %s -T 2 >/dev/null 2>&1 & pid=$!; sleep 5; "
             "grep VmHWM /proc/$pid/status; kill $pid; wait $pid 2>/dev/null", run, stories, big);
    FILE *p = popen(cmd, "r");
    long hwm_kb = -1;
    if (p) { if (fscanf(p, "VmHWM: %ld kB", &hwm_kb) != 1) hwm_kb = -1; pclose(p); }
    double budget_mb = (m[0].map_bytes + 2.0 * m[0].c.n_layers * m[0].c.max_seq_len * m[0].c.kv_dim * sizeof(float))
                       / 1048576.0 + 100;
    printf("note: ./run -m ppl on %zu MB: peak RSS %.1f MB after 5 s (budget %.1f MB)\n", big_bytes >> 20,
           hwm_kb / 1024.0, budget_mb);
    failures += !check(hwm_kb > 0 && hwm_kb / 1024.0 < budget_mb, "ppl_of_a_200_MB_file_runs_in_bounded_memory",
          "peak RSS %ld kB, budget %.1f MB", hwm_kb, budget_mb);
#endif
    remove(big);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    remove(head);
#endif
    free_transformer(&m[0]);
    free_transformer(&m[1]);
    return failures ? 1 : 0;
}
