// libFuzzer harness of the checkpoint loader: any bytes as a model file, from
// a structure-aware mutator (below) that keeps most of them consistent enough
// to get past the length checks.
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

// ----------------------------------------------------------------------------
// A structure-aware mutator. Byte-level mutations of a model file almost all
// die at the first size check (the header's file_bytes, then the length the
// header implies), so the checks behind it see few inputs. This one mutates
// what the file is made of – a header field, a tensor's numbers, the
// tokenizer section – and then repairs the lengths and offsets that the
// mutation made inconsistent, so that most mutants reach the later checks and
// the forward pass; a quarter of the time it leaves the bytes to libFuzzer.

// (-DFUZZ_PLAIN_MUTATOR builds the harness without it, to compare coverage.)
#ifndef FUZZ_PLAIN_MUTATOR
size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);

static uint32_t mutator_rand(uint32_t *s) { *s ^= *s << 13; *s ^= *s >> 17; *s ^= *s << 5; return *s; }

typedef struct { size_t offset; int is_float; } HeaderField;
#define FIELD(name, is_float) {offsetof(ModelHeader, name), is_float}
static const HeaderField header_fields[] = {
    FIELD(version, 0), FIELD(dim, 0), FIELD(hidden_dim, 0), FIELD(n_layers, 0), FIELD(n_heads, 0),
    FIELD(n_kv_heads, 0), FIELD(head_dim, 0), FIELD(vocab_size, 0), FIELD(max_seq_len, 0), FIELD(rope_theta, 1),
    FIELD(rope_scaling, 0), FIELD(rope_factor, 1), FIELD(rope_low_freq_factor, 1), FIELD(rope_high_freq_factor, 1),
    FIELD(rope_original_max_pos, 0), FIELD(norm_eps, 1), FIELD(tied_classifier, 0), FIELD(dtype, 0),
    FIELD(group_size, 0), FIELD(bos_id, 0), FIELD(n_stop_ids, 0), FIELD(stop_ids[0], 0), FIELD(stop_ids[1], 0),
    FIELD(tokenizer_kind, 0), FIELD(reserved, 0), FIELD(attention, 0), FIELD(kv_latent_dim, 0),
    FIELD(kv_rope_dim, 0), FIELD(embedding_dtype, 0),
};
#undef FIELD

static int32_t interesting_int(uint32_t *r, int32_t now) {
    static const int32_t values[] = {-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 31, 32, 33, 48, 63, 64, 65, 96, 128,
                                     255, 256, 1024, 4096, 65536, 1 << 22, INT32_MAX, INT32_MIN};
    switch (mutator_rand(r) % 4) {
    case 0: return (int32_t)((uint32_t)now + mutator_rand(r) % 5 - 2); // wraps, as the bytes would
    case 1: return (int32_t)((uint32_t)now * 2);
    case 2: return now / 2;
    default: return values[mutator_rand(r) % (sizeof values / sizeof values[0])];
    }
}

static float interesting_float(uint32_t *r) {
    static const float values[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 2.0f, 4.0f, 8.0f, 1e-5f, 1e-38f, 1e-45f, 1e30f,
                                   3.4e38f, 10000.0f, 500000.0f, INFINITY, -INFINITY, NAN};
    return values[mutator_rand(r) % (sizeof values / sizeof values[0])];
}

// Sets file_bytes to the length the header implies and resizes the file to it
// (cut, or zero-filled: zeros are finite numbers), when that length is
// computable and fits; otherwise to the file's own length.
static size_t repair_length(uint8_t *data, size_t size, size_t max_size) {
    ModelHeader h;
    memcpy(&h, data, sizeof h);
    uint64_t want = size;
    int sane = h.dim > 0 && h.dim <= 1 << 16 && h.hidden_dim > 0 && h.hidden_dim <= 1 << 18 && h.n_layers > 0
            && h.n_layers <= 1024 && h.n_heads > 0 && h.n_heads <= 1024 && h.n_kv_heads > 0 && h.n_kv_heads <= 1024
            && h.head_dim > 0 && h.head_dim <= 1 << 12 && h.vocab_size > 0 && h.vocab_size <= 1 << 22
            && h.dtype >= DTYPE_F32 && h.dtype <= DTYPE_Q4_0 && h.embedding_dtype >= DTYPE_F32
            && h.embedding_dtype <= DTYPE_Q4_0 && h.group_size == (h.dtype || h.embedding_dtype ? Q8_GROUP : 0)
            && h.weights_offset % MODEL_ALIGN == 0 && h.weights_offset <= max_size;
    if (sane) {
        size_t end = layout_weights(&h, NULL);
        if (end <= max_size && end >= MODEL_HEADER_BYTES) want = end;
    }
    if (want > size) memset(data + size, 0, want - size);
    size = want;
    memcpy(data + offsetof(ModelHeader, file_bytes), &want, sizeof want);
    return size;
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size, unsigned int seed) {
    uint32_t r = seed | 1;
    ModelHeader h;
    if (size < MODEL_HEADER_BYTES || max_size < MODEL_HEADER_BYTES || mutator_rand(&r) % 4 == 0)
        return LLVMFuzzerMutate(data, size, max_size);
    memcpy(&h, data, sizeof h);
    size_t to = h.tokenizer_offset, tb = h.tokenizer_bytes, wo = h.weights_offset;
    int sections_ok = h.magic == MODEL_MAGIC && to >= MODEL_HEADER_BYTES && tb <= size && to <= size - tb && wo <= size;
    switch (sections_ok ? mutator_rand(&r) % 4 : 0) {
    case 0: { // one header field, then the length it implies
        const HeaderField *f = &header_fields[mutator_rand(&r) % (sizeof header_fields / sizeof header_fields[0])];
        if (f->is_float) { float v = interesting_float(&r); memcpy(data + f->offset, &v, 4); }
        else { int32_t v; memcpy(&v, data + f->offset, 4); v = interesting_int(&r, v); memcpy(data + f->offset, &v, 4); }
        return repair_length(data, size, max_size);
    }
    case 1: { // a number in the tensors: a special float32, a special float16 (q8_0 / q4_0 scales), or a byte
        if (wo + 4 > size) return LLVMFuzzerMutate(data, size, max_size);
        size_t at = wo + mutator_rand(&r) % (size - wo - 3);
        static const uint16_t f16[] = {0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x0001, 0x0000, 0x3C00};
        switch (mutator_rand(&r) % 3) {
        case 0: { float v = interesting_float(&r); memcpy(data + (at & ~(size_t)3), &v, 4); break; }
        case 1: memcpy(data + (at & ~(size_t)1), &f16[mutator_rand(&r) % 7], 2); break;
        default: data[at] = (uint8_t)mutator_rand(&r); break;
        }
        return size;
    }
    case 2: { // the tokenizer section, mutated in place; what it loses becomes padding
        if (tb == 0) return size;
        size_t n = LLVMFuzzerMutate(data + to, tb, tb);
        uint64_t new_tb = n;
        memcpy(data + offsetof(ModelHeader, tokenizer_bytes), &new_tb, sizeof new_tb);
        memset(data + to + n, 0, tb - n);
        return size;
    }
    default: // libFuzzer's own mutation of the tensors' bytes, in place
        if (wo >= size) return size;
        LLVMFuzzerMutate(data + wo, size - wo, size - wo);
        return size;
    }
}

#endif

// ----------------------------------------------------------------------------
// The harness

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
