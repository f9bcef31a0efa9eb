/* test_tokenizer_llama3.c - the Llama 3 tokenizer against tiktoken's output:
   the golden files, whole corpora (token count and sha256 of the ids), special
   tokens, streaming decode of real ids, and long pieces (no quadratic time).
   The reference ids come from tiktoken 1.0.22 (see shared/models/PROVENANCE.md). */
#include "tokenizer_testlib.h"

#include <time.h>

// Under a sanitizer (make test-asan, test-tsan) the code runs 2-15x slower; the
// time check is for quadratic behaviour (hours on a 1 MB piece), so it just gets room.
#ifndef __has_feature
#define __has_feature(x) 0
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || __has_feature(address_sanitizer) \
    || __has_feature(thread_sanitizer)
#define LONG_PIECE_SECONDS 120
#else
#define LONG_PIECE_SECONDS 10
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Decode for round trips: every piece's raw bytes, special ones included. */
static char *pieces_joined(const Tokenizer *t, const int *ids, size_t n, size_t *len) {
    Buf b = {0};
    buf_add(&b, "", 0);
    for (size_t i = 0; i < n; i++) {
        size_t plen;
        const char *p = tokenizer_piece(t, ids[i], &plen);
        buf_add(&b, p, plen);
    }
    *len = b.len;
    return b.data;
}

/* Encodes every line of a golden file, compares with its ids, and checks
   that the text comes back: through the UTF-8 stream when there are no
   special tokens, else by joining the pieces. */
static void check_golden(const Tokenizer *t, const char *rel, const char *what, int parse_special,
                         int expected_lines) {
    char name[128], why[4096] = "";
    snprintf(name, sizeof name, "golden_%s", what);
    size_t len;
    char *data = read_file(shared_path(rel), &len);
    if (!data) { missing_file(name, shared_path(rel)); return; }
    int lines = 0, matched = 0, round_trips = 0, malformed = 0;
    size_t w = 0;
    for (char *line = data, *nl; *line; line = nl + 1) {
        nl = strchr(line, '\n');
        if (!nl) nl = line + strlen(line) - 1;
        else *nl = '\0';
        if (!*line) continue;
        char *text;
        int *want;
        size_t text_len, n_want, n_got, back_len;
        if (!parse_golden_line(line, &text, &text_len, &want, &n_want)) { malformed++; continue; }
        lines++;
        int *got = tokenizer_encode(t, text, text_len, parse_special, &n_got);
        if (got && same_ids(got, n_got, want, n_want)) matched++;
        else if (w < sizeof why - 1024)
            w += (size_t)snprintf(why + w, sizeof why - w, " [%.60s] want %s got %s;", text,
                                  ids_str(want, n_want), got ? ids_str(got, n_got) : "NULL");
        char *back = parse_special ? pieces_joined(t, got, n_got, &back_len)
                                   : stream_decode(t, got, n_got, -1, &back_len);
        round_trips += back_len == text_len && memcmp(back, text, text_len) == 0;
        free(back);
        free(got);
        free(text);
        free(want);
    }
    free(data);
    char counted[256];
    snprintf(counted, sizeof counted, "%s_%d_of_%d", name, matched, expected_lines);
    check(matched == expected_lines && lines == expected_lines && !malformed, counted,
          "%d lines (%d malformed), %d match; first mismatches:%s", lines, malformed, matched, why);
    snprintf(counted, sizeof counted, "%s_decode_gives_back_the_text_%d_of_%d", name, round_trips, lines);
    check(round_trips == lines, counted, "%d of %d texts differ after decode(encode(s))",
          lines - round_trips, lines);
}

/* sha256 of a file, by $PYTHON's hashlib (static string), or NULL. */
static const char *sha256_of(const char *path) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"
             "\"rb\").read()).hexdigest())' '%s'", env_or("PYTHON", "python3"), path);
    return run_command(cmd);
}

/* A whole file, encoded as ordinary text without BOS: its token count and
   the sha256 of the ids joined by single spaces must equal tiktoken's. */
static void check_corpus(const Tokenizer *t, const char *rel, const char *what, size_t want_n,
                         const char *want_sha) {
    char name[160];
    snprintf(name, sizeof name, "corpus_%s_%zu_tokens_sha256_match_tiktoken", what, want_n);
    size_t len, n;
    char *text = read_file(shared_path(rel), &len);
    if (!text) { missing_file(name, shared_path(rel)); return; }
    int *ids = tokenizer_encode(t, text, len, 0, &n);
    const char *path = scratch_path("corpus_ids.txt");
    FILE *f = fopen(path, "w");
    for (size_t i = 0; f && ids && i < n; i++) fprintf(f, i ? " %d" : "%d", ids[i]);
    if (f) fclose(f);
    const char *sha = sha256_of(path);
    check(ids && n == want_n && sha && strcmp(sha, want_sha) == 0, name,
          "%zu tokens (want %zu), sha256 %s (want %s); first ids %s", n, want_n, sha ? sha : "?",
          want_sha, ids ? ids_str(ids, n < 8 ? n : 8) : "NULL");
    size_t back_len;
    char *back = stream_decode(t, ids, n, -1, &back_len);
    snprintf(name, sizeof name, "corpus_%s_decodes_back_byte_for_byte", what);
    check(back_len == len && memcmp(back, text, len) == 0, name, "decoded %zu bytes of %zu", back_len, len);
    free(back);
    free(ids);
    free(text);
}

static void check_specials(const Tokenizer *t) {
    check(tokenizer_find(t, "<|begin_of_text|>") == 128000 && tokenizer_find(t, "<|eot_id|>") == 128009
          && tokenizer_find(t, "Hello") == 9906 && tokenizer_find(t, "<|nope|>") == -1,
          "find_returns_ids_of_special_and_ordinary_tokens", "begin_of_text %d, eot_id %d, Hello %d",
          tokenizer_find(t, "<|begin_of_text|>"), tokenizer_find(t, "<|eot_id|>"), tokenizer_find(t, "Hello"));
    check(tokenizer_is_special(t, 128009) && !tokenizer_is_special(t, 9906) && !tokenizer_is_special(t, -1)
          && !tokenizer_is_special(t, 1 << 30), "is_special_only_for_control_tokens", "wrong flags");
    const char *text = "a<|eot_id|>b";
    size_t n, back_len;
    int *ids = tokenizer_encode(t, text, strlen(text), 0, &n);
    int has_eot = 0;
    for (size_t i = 0; ids && i < n; i++) has_eot |= ids[i] == 128009;
    char *back = pieces_joined(t, ids, n, &back_len);
    check(ids && !has_eot && back_len == strlen(text) && memcmp(back, text, back_len) == 0,
          "special_literal_is_plain_text_without_parse_special", "got %s", ids ? ids_str(ids, n) : "NULL");
    free(back);
    free(ids);
}

/* 🦙 (F0 9F A6 99) is the tokens 9468 99 247: printed once, whole, by the last. */
static void check_streaming(const Tokenizer *t) {
    int ids[] = {9468, 99, 247, 128009};
    char out[4][64];
    size_t len[4];
    Utf8Stream s = {0};
    for (int i = 0; i < 4; i++) len[i] = tokenizer_decode(t, &s, i ? ids[i - 1] : -1, ids[i], out[i], 64);
    check(len[0] == 0 && len[1] == 0 && len[2] == 4 && memcmp(out[2], "\xF0\x9F\xA6\x99", 4) == 0
          && len[3] == 0 && s.n_pending == 0, "emoji_split_over_3_tokens_prints_once_whole",
          "printed %zu, %zu, %zu, %zu bytes", len[0], len[1], len[2], len[3]);
}

/* Pieces of 1 MB (one letter run, one run of random letters, digits, spaces)
   must not take quadratic time: tiktoken's rescanning merge would need
   minutes on the random one. */
static void check_long_pieces(const Tokenizer *t) {
    size_t n = 1 << 20;
    char *text = malloc(n);
    const char *kinds[] = {"same_letter", "random_letters", "digits", "spaces"};
    uint64_t rng = 42;
    double worst = 0;
    int ok = 1;
    for (int k = 0; k < 4; k++) {
        for (size_t i = 0; i < n; i++)
            text[i] = k == 0 ? 'a' : k == 1 ? (char)('a' + rng_next(&rng) % 26) : k == 2 ? '7' : ' ';
        double t0 = now_seconds();
        size_t n_ids, back_len;
        int *ids = tokenizer_encode(t, text, n, 0, &n_ids);
        double dt = now_seconds() - t0;
        if (dt > worst) worst = dt;
        char *back = stream_decode(t, ids, n_ids, -1, &back_len);
        if (!ids || back_len != n || memcmp(back, text, n) != 0) {
            ok = check(0, "long_pieces_round_trip", "%s: %s", kinds[k], ids ? "decode differs" : "NULL");
        }
        free(back);
        free(ids);
    }
    free(text);
    if (ok) check(1, "long_pieces_round_trip", "");
    check(worst < LONG_PIECE_SECONDS, "long_pieces_encode_without_quadratic_time", "a 1 MB piece took %.1f s", worst);
}

int main(void) {
    char *section = NULL;
    Tokenizer *t = load_shared_tokenizer(TOKENIZER_LLAMA3, "models/llama3-tokenizer.json", "llama3.tok", &section);
    if (!t) return 0;
    check(tokenizer_n_tokens(t) == 128256 && tokenizer_kind(t) == TOKENIZER_LLAMA3,
          "llama3_section_has_128256_tokens", "%d tokens", tokenizer_n_tokens(t));
    check_golden(t, "corpora/llama3-tokenizer-golden.jsonl", "ordinary", 0, 425);
    check_golden(t, "corpora/llama3-tokenizer-golden-special.jsonl", "special", 1, 23);
    check_corpus(t, "corpora/prose.txt", "prose", 311544,
                 "e1d16e42bef915fe652b27ca544397d434666c4cec4639d010bd12b0385af1c5");
    check_corpus(t, "corpora/tinystories-valid.txt", "tinystories", 100030,
                 "adac035b8f45179fa558e1fa479af562121e93f69b12bf9ab7c52a55373a2b7c");
    check_specials(t);
    check_streaming(t);
    check_long_pieces(t);
    tokenizer_free(t);
    free(section);
    return 0;
}
