/* test_tokenizer_stream.c - tokenizer_decode never prints broken UTF-8: a
   character split over tokens comes out once, whole; invalid bytes become
   U+FFFD exactly as Python's bytes.decode("utf-8", "replace") does (the
   Unicode "maximal subpart" rule); special tokens print nothing. Uses the
   tiny vocabulary of tokenizer_testlib.h (ids 0..255 = the bytes), no files. */
#include "tokenizer_testlib.h"

#define FFFD "\xEF\xBF\xBD"

/* Decodes ids one by one; the outputs joined by '|' (plus "|" and the flush
   output if flush) into a static string, to compare with an expectation. */
static const char *decode_steps(const Tokenizer *t, const int *ids, int n, int flush) {
    static char all[1024];
    char out[64];
    size_t k = 0;
    Utf8Stream s = {0};
    for (int i = 0; i < n; i++) {
        size_t len = tokenizer_decode(t, &s, i ? ids[i - 1] : -1, ids[i], out, sizeof out);
        k += (size_t)snprintf(all + k, sizeof all - k, "%s%.*s", i ? "|" : "", (int)len, out);
    }
    if (flush) {
        size_t len = tokenizer_decode_flush(&s, out, 8);
        snprintf(all + k, sizeof all - k, "|%.*s", (int)len, out);
    }
    return all;
}

#define STEPS(flush, ...) \
    decode_steps(t, (int[]){__VA_ARGS__}, (int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int)), flush)

static void expect_steps(const char *name, const char *got, const char *want) {
    check(strcmp(got, want) == 0, name, "printed [%s], want [%s]", got, want);
}

static void check_fixed_sequences(const Tokenizer *t) {
    expect_steps("character_split_over_3_tokens_prints_once_whole", STEPS(1, 0xE2, 0x82, 0xAC), "||\xE2\x82\xAC|");
    expect_steps("four_byte_character_split_over_4_tokens", STEPS(0, 0xF0, 0x9F, 0xA6, 0x99), "|||\xF0\x9F\xA6\x99");
    expect_steps("invalid_byte_prints_replacement_char", STEPS(0, 'a', 0xFF, 'b'), "a|" FFFD "|b");
    expect_steps("lone_continuation_byte_prints_replacement_char", STEPS(0, 0x80), FFFD);
    expect_steps("interrupted_character_prints_one_replacement_then_the_byte",
                 STEPS(0, 0xE2, 0x82, 'a'), "||" FFFD "a");
    expect_steps("surrogate_encoding_is_three_replacements", STEPS(0, 0xED, 0xA0, 0x80), "|" FFFD FFFD "|" FFFD);
    expect_steps("overlong_encoding_is_rejected", STEPS(0, 0xC0, 0xAF), FFFD "|" FFFD);
    expect_steps("flush_replaces_an_incomplete_tail", STEPS(1, 'x', 0xF0, 0x9F), "x|||" FFFD);
    expect_steps("flush_of_a_complete_stream_prints_nothing", STEPS(1, 'x'), "x|");
    expect_steps("special_tokens_print_nothing", STEPS(0, 258, 259, 260, 'a'), "|||a");
    expect_steps("special_token_inside_a_character_leaves_it_pending", STEPS(0, 0xE2, 258, 0x82, 0xAC),
                 "|||\xE2\x82\xAC");
    expect_steps("out_of_range_ids_print_nothing", STEPS(0, -1, 261, 1 << 30, 'a'), "|||a");
    expect_steps("multi_byte_token_decodes_whole", STEPS(0, 257, 256), "abc|ab");
}

/* A small cap must cut the output, never overflow it (ASan checks this). */
static void check_small_cap(const Tokenizer *t) {
    char out[2];
    Utf8Stream s = {0};
    size_t total = 0;
    int ids[] = {0xF0, 0x9F, 0xA6, 0x99, 0xFF};
    for (int i = 0; i < 5; i++) total += tokenizer_decode(t, &s, -1, ids[i], out, sizeof out);
    check(total <= 2 && tokenizer_decode_flush(&s, out, 2) == 0, "small_cap_truncates_without_overflow",
          "wrote %zu bytes into 2", total);
}

/* Random byte-token sequences, decoded by the stream and by Python. */
static void check_against_python(const Tokenizer *t) {
    enum { N = 300, MAX_LEN = 40 };
    static const unsigned char interesting[] = {0x00, 'a', 0x7F, 0x80, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF,
                                                0xE0, 0xE1, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF4, 0xF5, 0xFF};
    uint64_t rng = 99;
    int ids[N][MAX_LEN], lens[N];
    const char *in_path = scratch_path("stream_bytes.hex");
    FILE *f = fopen(in_path, "w");
    for (int i = 0; i < N; i++) {
        lens[i] = 1 + (int)(rng_next(&rng) % MAX_LEN);
        for (int k = 0; k < lens[i]; k++) {
            uint32_t r = rng_next(&rng) % 3;
            ids[i][k] = r == 0 ? (int)(rng_next(&rng) % 256)
                        : r == 1 ? interesting[rng_next(&rng) % sizeof interesting] : 0x80 + (int)(rng_next(&rng) % 64);
            if (f) fprintf(f, "%02x", ids[i][k]);
        }
        if (f) fprintf(f, "\n");
    }
    if (f) fclose(f);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' -c 'import sys\nfor l in sys.stdin: print(bytes.fromhex(l.strip())"
             ".decode(\"utf-8\", \"replace\").encode().hex())' < '%s'", env_or("PYTHON", "python3"), in_path);
    FILE *p = popen(cmd, "r");
    int agree = 0, lines = 0;
    char line[1024], why[2200] = "";
    for (int i = 0; p && i < N && fgets(line, sizeof line, p); i++, lines++) {
        size_t len;
        char *got = stream_decode(t, ids[i], (size_t)lens[i], -1, &len), hex[1024] = "";
        for (size_t k = 0; k < len && 2 * k + 2 < sizeof hex; k++)
            snprintf(hex + 2 * k, 3, "%02x", (unsigned char)got[k]);
        line[strcspn(line, "\n")] = '\0';
        if (strcmp(hex, line) == 0) agree++;
        else if (!why[0]) snprintf(why, sizeof why, "sequence %d: got %s, python %s", i, hex, line);
        free(got);
    }
    if (p) pclose(p);
    check(agree == N, "stream_matches_python_utf8_replace_on_random_bytes", "%d of %d lines agree; %s",
          agree, lines, why);
}

int main(void) {
    Buf section = tiny_llama3_section();
    char err[256];
    Tokenizer *t = tokenizer_build(TOKENIZER_LLAMA3, section.data, section.len, err, sizeof err);
    if (!check(t != NULL, "tiny_section_builds", "%s", err)) return 0;
    check(tokenizer_max_decode_bytes(t) >= 4 * 6, "max_decode_bytes_covers_a_token", "%zu",
          tokenizer_max_decode_bytes(t));
    check_fixed_sequences(t);
    check_small_cap(t);
    check_against_python(t);
    tokenizer_free(t);
    free(section.data);
    return 0;
}
