// libFuzzer harness of the tokenizer: encode + decode of arbitrary bytes, and
// tokenizer sections of arbitrary bytes. The first input byte picks the mode:
//   mode 0  the Llama 3 vocabulary encodes the rest (bit 2: parse_special)
//   mode 1  the llama2.c tok512 vocabulary encodes the rest
//   mode 2  the rest is a tokenizer section (bit 2: llama3, else llama2c kind);
//           if it builds, it encodes a fixed text and the input, and decodes
//   mode 3  the rest, read as 16-bit ids (some out of range), is decoded
// and checks, beyond "no crash, no sanitizer report":
//   - every id is in [0, n_tokens), at most one per input byte (+1 prefix);
//   - llama3: the ids' pieces concatenate to the input exactly, and decoding
//     them gives the input with each invalid UTF-8 sequence replaced by
//     U+FFFD (maximal subparts; a reference implementation is below);
//   - llama2c (tok512, input without '<'): decoding after BOS gives the same;
//   - decode never writes past tokenizer_max_decode_bytes and its output is
//     always valid UTF-8.
// Vocabularies: tokenizer sections (model.h) in $FUZZ_LLAMA3_TOK and
// $FUZZ_LLAMA2C_TOK (default tests/fuzz/build/llama3.tok, tok512.tok, written
// by tests/fuzz/run_fuzz.sh). Without them: for llama2c the section of the
// seed model tests/fuzz/corpus_loader/f32_llama2c_tok512, for Llama 3 a small
// built-in byte-level vocabulary with a few merges and special tokens.
// tests/test_fuzz_replay.c runs this file's checks on the seeds and on
// tests/fuzz/regressions/tokenizer/ in `make test`, without libFuzzer.
#include "../../model.h"
#include "../../tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static Tokenizer *llama3, *llama2c;
static char *llama3_section, *llama2c_section; // must outlive the tokenizers

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "fuzz_tokenizer: " __VA_ARGS__); \
                                             fputc('\n', stderr); abort(); } } while (0)

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *bigger = realloc(buf, cap *= 2);
        if (!bigger) { free(buf); buf = NULL; }
        buf = bigger;
    }
    fclose(f);
    *len = n;
    return buf;
}

// --- a built-in byte-level vocabulary: the 256 bytes, a few merges, specials

typedef struct { unsigned char *data; size_t len, cap; } Bytes;

static void bytes_put(Bytes *b, const void *p, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = 2 * (b->len + n);
        b->data = realloc(b->data, b->cap);
        CHECK(b->data, "out of memory");
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_token(Bytes *b, float score, uint32_t flags, const char *bytes, uint32_t len) {
    bytes_put(b, &score, 4);
    bytes_put(b, &flags, 4);
    bytes_put(b, &len, 4);
    bytes_put(b, bytes, len);
}

static char *builtin_llama3_section(size_t *len) {
    static const char *merges[] = {"th", "he", "the", " t", " the", "in", "ing", " a", "an", "and", " and",
                                   "er", "re", "ll", "ell", "ello", "hello", "\xC3\xA9", "\xE2\x82", "\xE2\x82\xAC",
                                   "  ", "    ", "\n\n", "12", "123", "'s", " 's", "\xF0\x9F", "\xF0\x9F\x98"};
    static const char *specials[] = {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eot|>", ""};
    uint32_t n = 256 + sizeof merges / sizeof *merges + sizeof specials / sizeof *specials;
    Bytes b = {0};
    uint32_t header[2] = {n, 17};
    bytes_put(&b, header, 8);
    uint32_t id = 0;
    for (int c = 0; c < 256; c++, id++) { char ch = (char)c; put_token(&b, -(float)id, 0, &ch, 1); }
    for (size_t i = 0; i < sizeof merges / sizeof *merges; i++, id++)
        put_token(&b, -(float)id, 0, merges[i], (uint32_t)strlen(merges[i]));
    for (size_t i = 0; i < sizeof specials / sizeof *specials; i++, id++)
        put_token(&b, -(float)id, TOKEN_SPECIAL, specials[i], (uint32_t)strlen(specials[i]));
    *len = b.len;
    return (char *)b.data;
}

// The tokenizer section of a model file (model.h): its tokenizer_bytes bytes
// at tokenizer_offset, copied out.
static char *section_of_model(const char *path, size_t *len) {
    size_t n;
    char *file = read_all(path, &n);
    if (!file) return NULL;
    ModelHeader h;
    char *out = NULL;
    if (n >= sizeof h) {
        memcpy(&h, file, sizeof h);
        if (h.tokenizer_offset <= n && h.tokenizer_bytes <= n - h.tokenizer_offset && (out = malloc(h.tokenizer_bytes + 1))) {
            memcpy(out, file + h.tokenizer_offset, h.tokenizer_bytes);
            *len = h.tokenizer_bytes;
        }
    }
    free(file);
    return out;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    const char *p3 = getenv("FUZZ_LLAMA3_TOK"), *p2 = getenv("FUZZ_LLAMA2C_TOK");
    size_t n3 = 0, n2 = 0;
    char err[256];
    llama3_section = read_all(p3 && *p3 ? p3 : "tests/fuzz/build/llama3.tok", &n3);
    if (!llama3_section) llama3_section = builtin_llama3_section(&n3);
    llama3 = tokenizer_build(TOKENIZER_LLAMA3, llama3_section, n3, err, sizeof err);
    CHECK(llama3, "llama3 vocabulary: %s", err);
    llama2c_section = read_all(p2 && *p2 ? p2 : "tests/fuzz/build/tok512.tok", &n2);
    if (!llama2c_section) // the seed model made with tok512 holds the same section
        llama2c_section = section_of_model("tests/fuzz/corpus_loader/f32_llama2c_tok512", &n2);
    CHECK(llama2c_section, "no llama2c vocabulary: run from the repository root, or set FUZZ_LLAMA2C_TOK");
    llama2c = tokenizer_build(TOKENIZER_LLAMA2C, llama2c_section, n2, err, sizeof err);
    CHECK(llama2c, "llama2c vocabulary: %s", err);
    return 0;
}

// --- reference UTF-8 sanitizer: each maximal subpart of an ill-formed
// sequence becomes one U+FFFD (Unicode ch. 3, "U+FFFD substitution")

static size_t sanitize_utf8(const unsigned char *s, size_t n, unsigned char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char b = s[i];
        int need = b < 0x80 ? 0 : b >= 0xC2 && b <= 0xDF ? 1 : b >= 0xE0 && b <= 0xEF ? 2 : b >= 0xF0 && b <= 0xF4 ? 3 : -1;
        if (need == 0) { out[o++] = b; i++; continue; }
        size_t k = 1; // bytes of the sequence that are well-formed so far
        if (need > 0) {
            unsigned char lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
            unsigned char hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
            while (k <= (size_t)need && i + k < n && s[i + k] >= (k == 1 ? lo : 0x80) && s[i + k] <= (k == 1 ? hi : 0xBF)) k++;
        }
        if (need > 0 && k == (size_t)need + 1) { memcpy(out + o, s + i, k); o += k; }
        else { memcpy(out + o, "\xEF\xBF\xBD", 3); o += 3; }
        i += k;
    }
    return o;
}

static int valid_utf8(const unsigned char *s, size_t n) {
    unsigned char *tmp = malloc(3 * n + 1);
    size_t m = sanitize_utf8(s, n, tmp);
    int ok = m == n && memcmp(tmp, s, n) == 0;
    free(tmp);
    return ok;
}

// Decodes ids (prev = the id before the first, -1 for none) into a malloc'd
// string; checks each step against its bound.
static unsigned char *decode_all(const Tokenizer *t, int prev, const int *ids, size_t n, size_t *len) {
    size_t cap = tokenizer_max_decode_bytes(t), total = 0, in = 0;
    for (size_t i = 0; i < n; i++) { // each byte in yields at most 3 out
        size_t piece_len = 0;
        tokenizer_piece(t, ids[i], &piece_len);
        in += piece_len;
    }
    unsigned char *out = malloc(3 * in + 8 + 1);
    char *step = malloc(cap); // exactly cap: ASan sees any write past it
    CHECK(out && step, "out of memory");
    Utf8Stream us = {0};
    for (size_t i = 0; i < n; i++) {
        size_t k = tokenizer_decode(t, &us, prev, ids[i], step, cap);
        CHECK(k <= cap && total + k <= 3 * in, "decode wrote %zu bytes, bound %zu", k, cap);
        memcpy(out + total, step, k);
        total += k;
        prev = ids[i];
    }
    total += tokenizer_decode_flush(&us, (char *)out + total, 8);
    free(step);
    *len = total;
    return out;
}

// Encodes text with t and runs the checks of the header comment.
static void roundtrip(const Tokenizer *t, const unsigned char *text, size_t n, int parse_special, int exact) {
    size_t n_ids = 0;
    int *ids = tokenizer_encode(t, (const char *)text, n, parse_special, &n_ids);
    CHECK(ids, "encode returned NULL for %zu bytes", n);
    CHECK(n_ids <= n + 1, "%zu ids for %zu bytes", n_ids, n);
    int n_tokens = tokenizer_n_tokens(t);
    for (size_t i = 0; i < n_ids; i++) CHECK(ids[i] >= 0 && ids[i] < n_tokens, "id %d of %d", ids[i], n_tokens);
    int is_llama3 = tokenizer_kind(t) == TOKENIZER_LLAMA3;
    if (is_llama3) { // the pieces are the text, byte for byte
        size_t pos = 0;
        for (size_t i = 0; i < n_ids; i++) {
            size_t len;
            const char *piece = tokenizer_piece(t, ids[i], &len);
            CHECK(pos + len <= n && memcmp(piece, text + pos, len) == 0, "piece of id %d is not the text at %zu", ids[i], pos);
            CHECK(parse_special || !tokenizer_is_special(t, ids[i]), "special id %d from ordinary text", ids[i]);
            pos += len;
        }
        CHECK(pos == n, "pieces cover %zu of %zu bytes", pos, n);
    }
    int bos = is_llama3 ? -1 : tokenizer_find(t, "\n<s>\n");
    size_t out_len;
    unsigned char *out = decode_all(t, bos, ids, n_ids, &out_len);
    CHECK(valid_utf8(out, out_len), "decode produced invalid UTF-8");
    if (exact && !parse_special) {
        unsigned char *want = malloc(3 * n + 1);
        size_t want_len = sanitize_utf8(text, n, want);
        CHECK(out_len == want_len && memcmp(out, want, want_len) == 0,
              "decode(encode(text)) differs from the sanitized text (%zu vs %zu bytes)", out_len, want_len);
        free(want);
    }
    free(out);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    int mode = data[0] & 3, flag = (data[0] >> 2) & 1;
    const unsigned char *rest = data + 1;
    size_t n = size - 1;
    if (mode == 0) {
        roundtrip(llama3, rest, n, flag, 1);
    } else if (mode == 1) {
        roundtrip(llama2c, rest, n, 0, memchr(rest, '<', n) == NULL);
    } else if (mode == 2) {
        char err[256];
        // a copy of exactly n bytes: ASan flags any read past the section
        unsigned char *section = malloc(n ? n : 1);
        memcpy(section, rest, n);
        Tokenizer *t = tokenizer_build(flag ? TOKENIZER_LLAMA3 : TOKENIZER_LLAMA2C, section, n, err, sizeof err);
        if (t) {
            static const char fixed[] = "Hello, world! \xC3\xA9t\xC3\xA9 123 <|eot_id|> \xFF\xFE x";
            roundtrip(t, (const unsigned char *)fixed, sizeof fixed - 1, flag, 0);
            roundtrip(t, (const unsigned char *)fixed, sizeof fixed - 1, 0, 0);
            roundtrip(t, rest, n < 256 ? n : 256, 1, 0);
            int k = tokenizer_n_tokens(t) < 512 ? tokenizer_n_tokens(t) : 512;
            int *all = malloc(sizeof(int) * (size_t)k + 1);
            for (int i = 0; i < k; i++) all[i] = i;
            size_t out_len;
            unsigned char *out = decode_all(t, -1, all, (size_t)k, &out_len);
            CHECK(valid_utf8(out, out_len), "decode of a built section produced invalid UTF-8");
            free(out);
            free(all);
            tokenizer_free(t);
        } else {
            CHECK(err[0] && memchr(err, '\n', strlen(err)) == NULL, "build failed without a one-line reason");
        }
        free(section);
    } else {
        const Tokenizer *t = flag ? llama3 : llama2c;
        size_t k = n / 2;
        int *ids = malloc(sizeof(int) * k + 1);
        for (size_t i = 0; i < k; i++) // mostly valid ids, some just outside
            ids[i] = (int)((rest[2 * i] | rest[2 * i + 1] << 8) % (tokenizer_n_tokens(t) + 4)) - 2;
        size_t out_len;
        unsigned char *out = decode_all(t, k ? ids[0] : -1, ids, k, &out_len);
        CHECK(valid_utf8(out, out_len), "decode of arbitrary ids produced invalid UTF-8");
        free(out);
        free(ids);
    }
    return 0;
}
