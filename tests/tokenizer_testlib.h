/* tokenizer_testlib.h - helpers shared by the tests/test_tokenizer_*.c programs:
   reporting (one "ok NAME" / "FAIL NAME: why" / "skip NAME: why" line per
   check, see tests/run_tests.sh), files from $SHARED, tokenizer sections made
   by export/tokenizer_section.py, a JSON string reader for the golden files,
   and a small PRNG. All static inline, so a test need not use every helper. */
#ifndef TOKENIZER_TESTLIB_H
#define TOKENIZER_TESTLIB_H

#include "model.h"
#include "tokenizer.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// Reporting

/* Prints "ok name" if cond, else "FAIL name: why" (why is printf-style). */
static inline int check(int cond, const char *name, const char *why, ...) {
    if (cond) {
        printf("ok %s\n", name);
    } else {
        va_list ap;
        va_start(ap, why);
        printf("FAIL %s: ", name);
        vprintf(why, ap);
        printf("\n");
        va_end(ap);
    }
    fflush(stdout);
    return cond;
}

/* A needed file from ../shared is missing: skip, except under CI=true. */
static inline void missing_file(const char *name, const char *path) {
    const char *ci = getenv("CI");
    printf("%s %s: %s is missing\n", ci && strcmp(ci, "true") == 0 ? "FAIL" : "skip", name, path);
}

// ----------------------------------------------------------------------------
// Files

static inline char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc((size_t)n + 1);
    if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
        free(data);
        data = NULL;
    }
    fclose(f);
    if (data) data[n] = '\0';
    if (len) *len = (size_t)n;
    return data;
}

static inline const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

/* "$SHARED/rel" in a static buffer. */
static inline const char *shared_path(const char *rel) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", env_or("SHARED", "../shared"), rel);
    return path;
}

static inline const char *scratch_path(const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", env_or("TMPDIR_TESTS", "/tmp"), name);
    return path;
}

/* Runs a shell command; returns its first output line (static) or NULL. */
static inline const char *run_command(const char *cmd) {
    static char line[4096];
    FILE *p = popen(cmd, "r");
    if (!p) return NULL;
    char *got = fgets(line, sizeof line, p);
    int rc = pclose(p);
    if (!got || rc != 0) return NULL;
    line[strcspn(line, "\n")] = '\0';
    return line;
}

/* The tokenizer of $SHARED/source_rel (a tokenizer.json or a llama2.c
   tokenizer.bin), via `export/tokenizer_section.py` into $TMPDIR_TESTS/name
   (made once, then reused). *section receives the section bytes, which must
   outlive the tokenizer. Reports a skip (or FAIL) line and returns NULL if
   the source is missing or the section does not build. */
static inline Tokenizer *load_shared_tokenizer(int kind, const char *source_rel, const char *name,
                                        char **section) {
    char source[4096], out[4096], cmd[12288], err[256];
    snprintf(source, sizeof source, "%s", shared_path(source_rel));
    snprintf(out, sizeof out, "%s", scratch_path(name));
    FILE *f = fopen(source, "rb");
    if (!f) {
        missing_file(name, source);
        return NULL;
    }
    fclose(f);
    size_t len;
    *section = read_file(out, &len);
    if (!*section) {
        snprintf(cmd, sizeof cmd, "'%s' export/tokenizer_section.py '%s' '%s' 2>&1",
                 env_or("PYTHON", "python3"), source, out);
        const char *said = run_command(cmd);
        *section = read_file(out, &len);
        if (!*section) {
            check(0, name, "export/tokenizer_section.py %s failed: %s", source, said ? said : "?");
            return NULL;
        }
    }
    Tokenizer *t = tokenizer_build(kind, *section, len, err, sizeof err);
    if (!t) check(0, name, "tokenizer_build: %s", err);
    return t;
}

// ----------------------------------------------------------------------------
// A tokenizer section built in memory (model.h layout), for tests that
// need no files

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static inline void buf_add(Buf *b, const void *p, size_t n) {
    if (!b->data || b->len + n > b->cap) {
        b->cap = 2 * (b->len + n) + 16;
        b->data = realloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static inline void buf_u32(Buf *b, uint32_t v) { buf_add(b, &v, 4); }

/* Starts a section of n_tokens tokens; add them with section_token. */
static inline Buf section_begin(uint32_t n_tokens, uint32_t max_token_bytes) {
    Buf b = {0};
    buf_u32(&b, n_tokens);
    buf_u32(&b, max_token_bytes);
    return b;
}

static inline void section_token(Buf *b, float score, uint32_t flags, const void *bytes, uint32_t len) {
    buf_add(b, &score, 4);
    buf_u32(b, flags);
    buf_u32(b, len);
    buf_add(b, bytes, len);
}

/* A tiny llama3-kind vocabulary: ids 0..255 the bytes, 256 "ab", 257 "abc",
   258 "<|x|>" and 259 "<|xy|>" (special), 260 an empty special placeholder.
   Returns the section (free b.data). */
static inline Buf tiny_llama3_section(void) {
    Buf b = section_begin(261, 6);
    for (int i = 0; i < 256; i++) {
        unsigned char byte = (unsigned char)i;
        section_token(&b, (float)-i, 0, &byte, 1);
    }
    section_token(&b, -256, 0, "ab", 2);
    section_token(&b, -257, 0, "abc", 3);
    section_token(&b, -258, TOKEN_SPECIAL, "<|x|>", 5);
    section_token(&b, -259, TOKEN_SPECIAL, "<|xy|>", 6);
    section_token(&b, -260, TOKEN_SPECIAL, "", 0);
    return b;
}

// ----------------------------------------------------------------------------
// Encoding and decoding helpers

/* The concatenated raw pieces of ids (llama2c: "<0xXX>" -> the byte, and the
   leading space of the first piece dropped, as decode does after BOS).
   Special tokens add nothing. Returns a malloc'd buffer, length in *len. */
static inline char *raw_decode(const Tokenizer *t, const int *ids, size_t n, size_t *len) {
    Buf b = {0};
    buf_add(&b, "", 0);
    int llama2c = tokenizer_kind(t) == TOKENIZER_LLAMA2C;
    for (size_t i = 0; i < n; i++) {
        size_t plen;
        const char *p = tokenizer_piece(t, ids[i], &plen);
        if (tokenizer_is_special(t, ids[i])) continue;
        if (llama2c && i == 0 && plen > 0 && p[0] == ' ') { p++; plen--; }
        unsigned int byte;
        char c;
        if (llama2c && plen == 6 && sscanf(p, "<0x%02X>", &byte) == 1) {
            c = (char)byte;
            p = &c;
            plen = 1;
        }
        buf_add(&b, p, plen);
    }
    *len = b.len;
    return b.data;
}

/* Decodes ids through tokenizer_decode (prev = the previous id, -1 first,
   or `first_prev` for the first id) and flushes. Returns malloc'd text. */
static inline char *stream_decode(const Tokenizer *t, const int *ids, size_t n, int first_prev, size_t *len) {
    Buf b = {0};
    buf_add(&b, "", 0);
    Utf8Stream s = {0};
    size_t cap = tokenizer_max_decode_bytes(t);
    char *piece = malloc(cap < 8 ? 8 : cap);
    for (size_t i = 0; i < n; i++)
        buf_add(&b, piece, tokenizer_decode(t, &s, i ? ids[i - 1] : first_prev, ids[i], piece, cap));
    buf_add(&b, piece, tokenizer_decode_flush(&s, piece, 8));
    free(piece);
    *len = b.len;
    return b.data;
}

/* "[1, 2, 3]" of at most 40 ids, in a static buffer. */
static inline const char *ids_str(const int *ids, size_t n) {
    static char s[2][512];
    static int which;
    char *o = s[which ^= 1];
    size_t k = 0;
    k += (size_t)snprintf(o + k, sizeof s[0] - k, "[");
    for (size_t i = 0; i < n && i < 40 && k < sizeof s[0] - 16; i++)
        k += (size_t)snprintf(o + k, sizeof s[0] - k, "%s%d", i ? ", " : "", ids[i]);
    snprintf(o + k, sizeof s[0] - k, "%s]", n > 40 ? ", ..." : "");
    return o;
}

static inline int same_ids(const int *a, size_t na, const int *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof(int)) == 0);
}

// ----------------------------------------------------------------------------
// JSON: just enough for the golden files' {"text": "...", "ids": [...]}

static inline int hex4(const char *p) {
    int v = 0;
    for (int k = 0; k < 4; k++) {
        int c = p[k], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static inline size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 63));
        o[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 63));
    o[2] = (char)(0x80 | (cp >> 6 & 63)); o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* Reads the JSON string at *p (at its opening quote) into out (UTF-8, room
   for strlen(*p) bytes suffices) and moves *p past it. Returns the length,
   or -1 if malformed (incl. lone surrogates). */
static inline long json_string(const char **p, char *out) {
    const char *s = *p;
    size_t n = 0;
    if (*s++ != '"') return -1;
    while (*s != '"') {
        if (*s == '\0') return -1;
        if (*s != '\\') { out[n++] = *s++; continue; }
        char e = s[1];
        s += 2;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) { out[n++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"]; continue; }
        if (e != 'u') return -1;
        int cp = hex4(s);
        s += 4;
        if (cp < 0 || (cp >= 0xDC00 && cp < 0xE000)) return -1;
        if (cp >= 0xD800 && cp < 0xDC00) { // a surrogate pair: \uD83E\uDD99
            int lo = s[0] == '\\' && s[1] == 'u' ? hex4(s + 2) : -1;
            if (lo < 0xDC00 || lo >= 0xE000) return -1;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            s += 6;
        }
        n += put_utf8(out + n, (uint32_t)cp);
    }
    *p = s + 1;
    return (long)n;
}

/* Parses one golden line {"text":"...","ids":[...]} into malloc'd *text and
   *ids. Returns 0 if malformed. */
static inline int parse_golden_line(const char *line, char **text, size_t *text_len, int **ids, size_t *n_ids) {
    const char *p = strstr(line, "\"text\"");
    const char *q = strstr(line, "\"ids\"");
    if (!p || !q) return 0;
    p = strchr(p + 6, ':');
    if (!p) return 0;
    p++;
    while (*p == ' ') p++;
    *text = malloc(strlen(p) + 1);
    long n = json_string(&p, *text);
    if (n < 0) { free(*text); return 0; }
    *text_len = (size_t)n;
    q = strchr(q, '[');
    if (!q) { free(*text); return 0; }
    *ids = malloc(sizeof(int) * (strlen(q) / 2 + 1));
    *n_ids = 0;
    for (q++; *q && *q != ']';) {
        char *end;
        long v = strtol(q, &end, 10);
        if (end == q) { q++; continue; } // ',' or ' '
        (*ids)[(*n_ids)++] = (int)v;
        q = end;
    }
    return 1;
}

// ----------------------------------------------------------------------------
// PRNG (xorshift64*), for reproducible random inputs

static inline uint32_t rng_next(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 2685821657736338717ull) >> 32);
}

#endif
