// libFuzzer harness of the checkpoint loader: any bytes as a model file.
// A file the loader accepts is then run: a few tokens through the forward
// pass (sometimes with --kv-heads 1), sampled and decoded, so weird but
// valid shapes (odd head_dim, one head, huge vocab) meet the kernels too.
//
//   make fuzz        (builds with clang -fsanitize=fuzzer,address,undefined)
//
// run.c is included with TESTING (no main) and FUZZING: die() then longjmps
// back here instead of exiting, so a rejected file is an ordinary outcome.
#define FUZZING
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "../../run.c"

static void release(Transformer *m) {
    free_model_state(m);
    free(m->map); // the harness's copy of the input, not an mmap
    memset(m, 0, sizeof *m);
}

// Static, or volatile: they are set after setjmp and read after the longjmp.
static Transformer m;
static int *volatile tokens;
static char *volatile text;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < MODEL_HEADER_BYTES) return 0; // build_transformer rejects these before mapping
    memset(&m, 0, sizeof m);
    tokens = NULL;
    text = NULL;
    // an exact-size copy: ASan then flags any read past the end of the "file"
    m.map = malloc(size);
    memcpy(m.map, data, size);
    m.map_bytes = size;
    // The last header byte is padding the loader never reads; its bit 0 makes the
    // header's file_bytes agree with the input's length, so mutations that grow or
    // shrink the input still get past that check to the ones behind it.
    if (data[MODEL_HEADER_BYTES - 1] & 1) {
        uint64_t file_bytes = size;
        memcpy((uint8_t *)m.map + offsetof(ModelHeader, file_bytes), &file_bytes, sizeof file_bytes);
    }
    if (setjmp(die_jump)) { // die(): the file was rejected (or ran out of memory)
        free(tokens);
        free(text);
        release(&m);
        return 0;
    }
    load_checkpoint(&m, "fuzz.bin");

    // Accepted: run it. A short context keeps the KV cache and the work small.
    int kv_heads = (data[size - 1] & 1) && m.c.n_kv_heads > 1 ? 1 : 0;
    setup_transformer(&m, m.c.max_seq_len < 8 ? m.c.max_seq_len : 8, 1, kv_heads);
    static const char prompt[] = "Hi \xF0\x9F\x98\x80 <|eot_id|>\xFF";
    int n = 0;
    tokens = encode_with_bos(&m, prompt, sizeof prompt - 1, &n);
    if (n > m.c.seq_len) n = m.c.seq_len;
    if (n > 0) {
        float *logits = prefill(&m, tokens, n, 0);
        Sampler sp = {m.c.vocab_size, 0.8f, 0.9f, 42, NULL};
        sp.cand = xcalloc(m.c.vocab_size, sizeof(ProbIndex), "sampler");
        int next = sample(&sp, logits);
        free(sp.cand);
        if (next < 0 || next >= m.c.vocab_size) __builtin_trap();
        if (n < m.c.seq_len) forward(&m, &next, 1, n, 0);
        text = xcalloc(tokenizer_max_decode_bytes(m.tok), 1, "decode");
        Utf8Stream us = {0};
        tokenizer_decode(m.tok, &us, tokens[n - 1], next, text, tokenizer_max_decode_bytes(m.tok));
    }
    free(tokens);
    free(text);
    release(&m);
    return 0;
}
