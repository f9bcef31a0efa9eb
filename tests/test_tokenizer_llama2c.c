/* test_tokenizer_llama2c.c - the llama2c kind with Karpathy's tok512.bin
   (stories260K's vocabulary) and aidreams260K's tok512.bin, against
   tests/llama2c_reference.py, a Python transliteration of llama2.c's encode()
   that reads the tokenizer.bin directly; plus hand-checked ids and decode. */
#include "tokenizer_testlib.h"

enum { N_RANDOM = 60, MAX_TEXT = 200 };

/* Fixed texts: plain, empty, punctuation, whitespace runs, characters that
   tok512 lacks (byte fallback), and invalid UTF-8 (llama2.c groups a lead
   byte with up to 3 continuation bytes, valid or not). No NUL: llama2.c
   reads C strings. */
static const char *fixed_texts[] = {
    "Once upon a time", "", "Hello, world!", "Lily's big red ball.", "  two  spaces  ",
    "\n\nnew lines\n", "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\xA6\x99",
    "bad \xFF\xFE bytes \x80\x80\x80\x80\x80 and \xE6\x97", "<s> </s> <unk> <0x41>",
};

/* A random text of less than n bytes: ASCII words and spaces, some
   multi-byte characters and, if stray_bytes, now and then a byte >= 0x80. */
static size_t random_text(uint64_t *rng, char *out, size_t n, int stray_bytes) {
    static const char *multi[] = {"\xC3\xA9", "\xE2\x80\x94", "\xE6\x97\xA5", "\xF0\x9F\xA6\x99"};
    static const char ascii[] = "abcdefghijklmnopqrstuvwxyz    ,.!?'\nABC0123";
    size_t k = 0;
    while (k + 4 < n) {
        uint32_t r = rng_next(rng) % 100;
        if (r < 90) out[k++] = ascii[rng_next(rng) % (sizeof ascii - 1)];
        else if (r < 98) {
            const char *m = multi[rng_next(rng) % 4];
            memcpy(out + k, m, strlen(m));
            k += strlen(m);
        } else if (stray_bytes) {
            out[k++] = (char)(0x80 + rng_next(rng) % 128);
        }
    }
    return k;
}

/* Encodes texts with the C tokenizer of $SHARED/bin_rel and with the Python
   reference on the same file; counts agreements. */
static void check_against_reference(const Tokenizer *t, const char *bin_rel, const char *vocab_name) {
    char texts[N_RANDOM + 16][MAX_TEXT];
    size_t lens[N_RANDOM + 16], n_texts = 0;
    for (size_t i = 0; i < sizeof fixed_texts / sizeof *fixed_texts; i++, n_texts++) {
        lens[n_texts] = strlen(fixed_texts[i]);
        memcpy(texts[n_texts], fixed_texts[i], lens[n_texts]);
    }
    uint64_t rng = 2024;
    for (int i = 0; i < N_RANDOM; i++, n_texts++)
        lens[n_texts] = random_text(&rng, texts[n_texts], 1 + rng_next(&rng) % (MAX_TEXT - 1), 1);

    const char *in_path = scratch_path("llama2c_texts.hex");
    FILE *f = fopen(in_path, "w");
    for (size_t i = 0; f && i < n_texts; i++) {
        for (size_t k = 0; k < lens[i]; k++) fprintf(f, "%02x", (unsigned char)texts[i][k]);
        fprintf(f, "\n");
    }
    if (f) fclose(f);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' tests/llama2c_reference.py '%s' < '%s'", env_or("PYTHON", "python3"),
             shared_path(bin_rel), in_path);
    FILE *p = popen(cmd, "r");
    size_t matched = 0;
    char why[2048] = "", line[8192];
    for (size_t i = 0; p && i < n_texts && fgets(line, sizeof line, p); i++) {
        int want[MAX_TEXT + 1];
        size_t n_want = 0, n_got;
        for (char *q = line, *end; n_want <= MAX_TEXT; q = end) {
            long v = strtol(q, &end, 10);
            if (end == q) break;
            want[n_want++] = (int)v;
        }
        int *got = tokenizer_encode(t, texts[i], lens[i], 0, &n_got);
        if (got && same_ids(got, n_got, want, n_want)) matched++;
        else if (strlen(why) < 1024)
            snprintf(why + strlen(why), sizeof why - strlen(why), " text %zu: want %s got %s;", i,
                     ids_str(want, n_want), got ? ids_str(got, n_got) : "NULL");
        free(got);
    }
    if (p) pclose(p);
    char name[128];
    snprintf(name, sizeof name, "%s_encode_matches_llama2c_reference_%zu_of_%zu", vocab_name, matched, n_texts);
    check(matched == n_texts, name, "%s", why[0] ? why : " reference produced no output");
}

static int encodes_to(const Tokenizer *t, const char *text, const int *want, size_t n_want) {
    size_t n;
    int *got = tokenizer_encode(t, text, strlen(text), 0, &n);
    int ok = got && same_ids(got, n, want, n_want);
    if (!ok) printf("  %s -> %s\n", text, got ? ids_str(got, n) : "NULL");
    free(got);
    return ok;
}

/* One token's text as decode prints it after `prev`, NUL-terminated (static). */
static const char *decoded(const Tokenizer *t, int prev, int id) {
    static char out[256];
    Utf8Stream s = {0};
    size_t n = tokenizer_decode(t, &s, prev, id, out, sizeof out - 1);
    out[n] = '\0';
    return out;
}

static void check_fixed_cases(const Tokenizer *t) {
    // ids read off tok512.bin: 403 " Once", 407 " upon", 261 " a", 378 " time"
    check(encodes_to(t, "Once upon a time", (int[]){403, 407, 261, 378}, 4),
          "once_upon_a_time_is_403_407_261_378", "see above");
    // U+65E5 (E6 97 A5) is not in tok512: dummy " " (410), then <0xE6> <0x97> <0xA5> = byte + 3
    check(encodes_to(t, "\xE6\x97\xA5", (int[]){410, 0xE6 + 3, 0x97 + 3, 0xA5 + 3}, 4),
          "unknown_character_falls_back_to_byte_tokens", "see above");
    check(encodes_to(t, "", NULL, 0), "empty_text_has_no_dummy_prefix", "see above");
    check(strcmp(decoded(t, 1, 403), "Once") == 0 && strcmp(decoded(t, 407, 403), " Once") == 0,
          "decode_drops_leading_space_only_after_bos", "after BOS [%s]", decoded(t, 1, 403));
    check(strcmp(decoded(t, 1, 0x41 + 3), "A") == 0 && strcmp(decoded(t, 1, 0x20 + 3), " ") == 0,
          "byte_token_decodes_to_its_byte", "<0x41> -> [%s]", decoded(t, 1, 0x41 + 3));
    check(!decoded(t, -1, 0)[0] && !decoded(t, -1, 1)[0] && !decoded(t, -1, 2)[0] && tokenizer_is_special(t, 1),
          "unk_bos_eos_decode_to_nothing", "BOS -> [%s]", decoded(t, -1, 1));
    check(tokenizer_find(t, "\n<s>\n") == 1 && tokenizer_find(t, " Once") == 403,
          "find_returns_ids_by_piece", "BOS %d", tokenizer_find(t, "\n<s>\n"));
}

/* Valid UTF-8 texts come back exactly through the stream decode after BOS. */
static void check_round_trip(const Tokenizer *t) {
    uint64_t rng = 7;
    int ok = 0, total = 0;
    for (int i = 0; i < 200; i++, total++) {
        char text[MAX_TEXT];
        size_t k = random_text(&rng, text, 1 + rng_next(&rng) % (MAX_TEXT - 1), 0);
        size_t n, back_len;
        int *ids = tokenizer_encode(t, text, k, 0, &n);
        char *back = stream_decode(t, ids, n, 1, &back_len);
        ok += back_len == k && memcmp(back, text, k) == 0;
        free(back);
        free(ids);
    }
    check(ok == total, "llama2c_decode_after_bos_gives_back_valid_text", "%d of %d differ", total - ok, total);
}

int main(void) {
    char *section = NULL;
    Tokenizer *t = load_shared_tokenizer(TOKENIZER_LLAMA2C, "models/tok512.bin", "tok512.tok", &section);
    if (!t) return 0;
    check(tokenizer_n_tokens(t) == 512 && tokenizer_kind(t) == TOKENIZER_LLAMA2C,
          "tok512_section_has_512_tokens", "%d tokens", tokenizer_n_tokens(t));
    check_fixed_cases(t);
    check_against_reference(t, "models/tok512.bin", "tok512");
    check_round_trip(t);
    tokenizer_free(t);
    free(section);
    // a second, unrelated vocabulary (aidreams260K's)
    t = load_shared_tokenizer(TOKENIZER_LLAMA2C, "models/aidreams260K-tok512.bin", "aidreams.tok", &section);
    if (!t) return 0;
    check_against_reference(t, "models/aidreams260K-tok512.bin", "aidreams_tok512");
    tokenizer_free(t);
    free(section);
    return 0;
}
