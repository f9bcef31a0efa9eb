/* test_tokenizer_robustness.c - bad sections are refused with a reason (no
   crash), any bytes encode and decode back exactly, and the merge order and
   special-token splitting follow tiktoken on a tiny vocabulary. Run it under
   -fsanitize=address,undefined too. */
#include "tokenizer_testlib.h"

static void check_bad_sections(void) {
    Buf b = tiny_llama3_section();
    char err[256];
    int truncated_ok = 1;
    for (size_t len = 0; len < b.len; len++) {
        err[0] = '\0';
        Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, b.data, len, err, sizeof err);
        if (t || !err[0]) {
            truncated_ok = check(0, "truncated_section_is_refused_with_a_reason", "%zu of %zu bytes: %s",
                                 len, b.len, t ? "built" : "no message");
            tokenizer_free(t);
            break;
        }
    }
    if (truncated_ok) check(1, "truncated_section_is_refused_with_a_reason", "");

    Buf bad = {0};
    buf_add(&bad, b.data, b.len);
    uint32_t huge = 0xFFFFFFF0u;
    memcpy(bad.data, &huge, 4); // n_tokens
    Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, bad.data, bad.len, err, sizeof err);
    check(!t && strstr(err, "tokens"), "huge_token_count_is_refused", "%s", t ? "built" : err);
    memcpy(bad.data, b.data, 8);
    memcpy(bad.data + 8 + 13 * 5 + 8, &huge, 4); // token 5's len
    t = tokenizer_build(TOKENIZER_LLAMA3, bad.data, bad.len, err, sizeof err);
    check(!t && strstr(err, "token 5"), "corrupt_token_length_is_refused", "%s", t ? "built" : err);
    t = tokenizer_build(7, b.data, b.len, NULL, 0);
    check(!t, "unknown_kind_is_refused_even_without_err_buffer", "built");

    Buf few = section_begin(2, 1); // only bytes 'a' and 'b': cannot encode every text
    section_token(&few, 0, 0, "a", 1);
    section_token(&few, -1, 0, "b", 1);
    t = tokenizer_build(TOKENIZER_LLAMA3, few.data, few.len, err, sizeof err);
    check(!t && strstr(err, "byte 0x00"), "vocabulary_missing_a_byte_is_refused", "%s", t ? "built" : err);
    t = tokenizer_build(TOKENIZER_LLAMA2C, b.data, b.len, err, sizeof err);
    check(!t && strstr(err, "byte"), "llama3_vocabulary_is_refused_as_llama2c", "%s", t ? "built" : err);
    free(few.data);
    free(bad.data);
    free(b.data);
}

/* Random mutations of a valid section: each must build or be refused, and
   a built one must survive encode and decode. */
static void check_mutated_sections(void) {
    Buf b = tiny_llama3_section();
    uint64_t rng = 5;
    for (int round = 0; round < 2000; round++) {
        Buf m = {0};
        buf_add(&m, b.data, b.len);
        for (int k = 0; k < 1 + round % 4; k++) m.data[rng_next(&rng) % m.len] = (char)rng_next(&rng);
        char err[256];
        int kind = round % 2 ? TOKENIZER_LLAMA3 : TOKENIZER_LLAMA2C;
        Tokenizer *t = tokenizer_build(kind, m.data, m.len, err, sizeof err);
        if (t) {
            size_t n;
            int *ids = tokenizer_encode(t, "abc <|x|> \xFF", 11, 1, &n);
            char *text = stream_decode(t, ids, n, -1, &n);
            free(text);
            free(ids);
            tokenizer_free(t);
        }
        free(m.data);
    }
    free(b.data);
    check(1, "mutated_sections_build_or_are_refused_without_crashing", "");
}

static void expect_ids(const Tokenizer *t, const char *name, const char *text, int parse_special,
                       const int *want, size_t n_want) {
    size_t n;
    int *got = tokenizer_encode(t, text, strlen(text), parse_special, &n);
    check(got && same_ids(got, n, want, n_want), name, "[%s] -> %s, want %s", text,
          got ? ids_str(got, n) : "NULL", ids_str(want, n_want));
    free(got);
}

/* ids 0..255 bytes, 256 "ab", 257 "abc", 258 "<|x|>", 259 "<|xy|>" */
static void check_tiny_vocabulary(const Tokenizer *t) {
    // "xabcab": "ab" (rank 256) merges at the left first, then the right one
    // (256 beats "abc" 257), then nothing: tiktoken's lowest-rank-first order
    expect_ids(t, "lowest_rank_pair_merges_first_leftmost_on_ties", "xabcab", 0, (int[]){'x', 257, 256}, 3);
    expect_ids(t, "whole_piece_token_is_used_directly", "abc", 0, (int[]){257}, 1);
    expect_ids(t, "special_literal_becomes_its_id", "a<|xy|>b", 1, (int[]){'a', 259, 'b'}, 3);
    expect_ids(t, "special_literals_back_to_back", "<|x|><|x|>", 1, (int[]){258, 258}, 2);
    expect_ids(t, "near_miss_special_stays_text", "<|x|", 1, (int[]){'<', '|', 'x', '|'}, 4);
    expect_ids(t, "special_literal_is_text_without_parse_special", "<|x|>", 0,
               (int[]){'<', '|', 'x', '|', '>'}, 5);
    expect_ids(t, "empty_text_is_no_tokens", "", 1, NULL, 0);
}

/* Random bytes (NUL and invalid UTF-8 included) must encode and join back
   exactly, with and without parse_special. */
static void check_random_round_trips(const Tokenizer *t, const char *name) {
    uint64_t rng = 11;
    int ok = 0, total = 0;
    char text[400];
    for (int i = 0; i < 400; i++, total++) {
        size_t len = rng_next(&rng) % sizeof text;
        int ascii = i % 2; // half the texts printable ASCII-ish, half any bytes
        for (size_t k = 0; k < len; k++) {
            uint32_t r = rng_next(&rng);
            text[k] = ascii ? " <|>'abcx\n1"[r % 11] : (char)r;
        }
        size_t n, back_len;
        int *ids = tokenizer_encode(t, text, len, i % 4 < 2, &n);
        char *back = NULL;
        if (ids && tokenizer_kind(t) == TOKENIZER_LLAMA3) { // join raw pieces, specials included
            Buf b = {0};
            buf_add(&b, "", 0);
            for (size_t k = 0; k < n; k++) {
                size_t plen;
                const char *p = tokenizer_piece(t, ids[k], &plen);
                buf_add(&b, p, plen);
            }
            back = b.data;
            back_len = b.len;
        } else if (ids) {
            back = raw_decode(t, ids, n, &back_len);
        }
        ok += back && back_len == len && memcmp(back, text, len) == 0;
        free(back);
        free(ids);
    }
    check(ok == total, name, "%d of %d random texts did not come back", total - ok, total);
}

int main(void) {
    check_bad_sections();
    check_mutated_sections();
    Buf section = tiny_llama3_section();
    char err[256];
    Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, section.data, section.len, err, sizeof err);
    if (!check(t != NULL, "tiny_section_builds", "%s", err)) return 0;
    check_tiny_vocabulary(t);
    check_random_round_trips(t, "random_bytes_round_trip_tiny_vocabulary");
    tokenizer_free(t);
    free(section.data);

    char *data;
    if ((t = load_shared_tokenizer(TOKENIZER_LLAMA3, "models/llama3-tokenizer.json", "llama3.tok", &data))) {
        check_random_round_trips(t, "random_bytes_round_trip_llama3");
        tokenizer_free(t);
        free(data);
    }
    if ((t = load_shared_tokenizer(TOKENIZER_LLAMA2C, "models/tok512.bin", "tok512.tok", &data))) {
        check_random_round_trips(t, "random_bytes_round_trip_llama2c_tok512");
        tokenizer_free(t);
        free(data);
    }
    return 0;
}
