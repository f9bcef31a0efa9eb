/* tokenizer.c - text <-> token ids; the interface is tokenizer.h, the section
   it reads is documented in model.h.

   Both kinds share one BPE merge loop: the text becomes a row of symbols
   (bytes, or characters), and the adjacent pair whose concatenation is the
   best-scoring token merges, again and again, until no pair is a token.
     llama3   symbols start as single bytes; score = -rank, so the lowest rank
              merges first (tiktoken). The text is first cut into pieces by
              Llama 3's pre-tokenizer regex, hand-written below, and each
              piece is merged on its own.
     llama2c  symbols start as characters (or <0xXX> byte tokens for unknown
              ones) after a dummy " " prefix; highest score first (llama2.c).
   Ties go to the leftmost pair in both, as in tiktoken and llama2.c.
   Instead of rescanning every pair after each merge (quadratic), candidate
   pairs wait in a max-heap and stale ones are skipped when popped. */
#include "tokenizer.h"
#include "model.h"
#include "unicode_tables.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct Tokenizer {
    int kind;                    // TOKENIZER_LLAMA3 or TOKENIZER_LLAMA2C
    int n_tokens;
    size_t max_token_bytes;      // longest piece; bounds decode output
    const unsigned char *section; // the section, read in place (mmapped)
    uint32_t *entry;             // (n_tokens) offset of each token's entry in it
    struct Slot { uint32_t hash; int32_t id; } *slots; // bytes -> id, open addressing
    size_t slot_mask;            // n_slots - 1; n_slots is a power of two >= 2 n_tokens
    int byte_token[256];         // the token of each single byte (llama2c: "<0xXX>")
    size_t byte_piece_max;       // longest piece among byte_token[] (1 or 6)
    struct Special { uint32_t len; int id; } *specials; // parse_special's candidates, longest first
    int n_specials;
    uint8_t special_start[256];  // 1 if some special token starts with this byte
    int bos_id;                  // llama2c: "\n<s>\n", after which decode drops a space; else -1
    int cut_at_newline, cut_at_space; // tokenizer_cut may cut after '\n', before ' ' (see there)
};

static uint32_t read_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static float read_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }

typedef struct {
    const unsigned char *bytes; // the token's piece
    uint32_t len;               // bytes of the piece
    float score;                // merge priority, higher merges first
    int special;                // 1 for TOKEN_SPECIAL tokens
} Token;

/* Token id, read from its entry in the section: score f32, flags u32, len u32,
   bytes. Not copied out at build: in the section a token's header sits next
   to its bytes, so a lookup that compares them touches one cache line. */
static Token token(const Tokenizer *t, int id) {
    const unsigned char *e = t->section + t->entry[id];
    return (Token){e + 12, read_u32(e + 8), read_f32(e), (read_u32(e + 4) & TOKEN_SPECIAL) != 0};
}

// ----------------------------------------------------------------------------
// The bytes -> id hash table (FNV-1a, linear probing). Tokens are inserted in
// id order, so a lookup meets the lowest id among tokens with equal bytes.

static uint32_t hash_bytes(const unsigned char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static void table_insert(Tokenizer *t, int id) {
    Token tok = token(t, id);
    uint32_t h = hash_bytes(tok.bytes, tok.len);
    size_t i = h & t->slot_mask;
    while (t->slots[i].id >= 0) i = (i + 1) & t->slot_mask;
    t->slots[i] = (struct Slot){h, id};
}

/* The lowest id whose bytes equal s[0..n), or -1. With ordinary_only, special
   tokens are passed over (merging and plain text never produce them). */
static int lookup(const Tokenizer *t, const unsigned char *s, size_t n, int ordinary_only) {
    uint32_t h = hash_bytes(s, n);
    for (size_t i = h & t->slot_mask; t->slots[i].id >= 0; i = (i + 1) & t->slot_mask) {
        if (t->slots[i].hash != h) continue;
        Token tok = token(t, t->slots[i].id);
        if (tok.len == n && memcmp(tok.bytes, s, n) == 0 && !(ordinary_only && tok.special))
            return t->slots[i].id;
    }
    return -1;
}

// ----------------------------------------------------------------------------
// Building: parse and check the section, then index it

static Tokenizer *fail(Tokenizer *t, char *err, size_t err_cap, const char *fmt, ...) {
    if (err && err_cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_cap, fmt, ap);
        va_end(ap);
    }
    tokenizer_free(t);
    return NULL;
}

static int longer_first(const void *a, const void *b) {
    const struct Special *x = a, *y = b;
    if (x->len != y->len) return x->len < y->len ? 1 : -1;
    return x->id - y->id;
}

/* Lists the special tokens parse_special looks for (not empty placeholders). */
static int index_specials(Tokenizer *t) {
    int n = 0;
    for (int id = 0; id < t->n_tokens; id++) n += token(t, id).special && token(t, id).len > 0;
    t->specials = malloc(sizeof *t->specials * (size_t)(n + 1));
    if (!t->specials) return 0;
    for (int id = 0; id < t->n_tokens; id++) {
        Token tok = token(t, id);
        if (!tok.special || tok.len == 0) continue;
        t->specials[t->n_specials++] = (struct Special){tok.len, id};
        t->special_start[tok.bytes[0]] = 1;
    }
    qsort(t->specials, (size_t)t->n_specials, sizeof *t->specials, longer_first);
    return 1;
}

/* Finds the token of every byte: llama3 has the 256 bytes as tokens,
   llama2c has "<0x00>" .. "<0xFF>" (ids 3..258 in llama2.c's files, which
   it assumes). Returns the first missing byte, or -1. */
static int index_byte_tokens(Tokenizer *t) {
    for (int b = 0; b < 256; b++) {
        unsigned char one = (unsigned char)b;
        char hex[8];
        snprintf(hex, sizeof hex, "<0x%02X>", b);
        t->byte_token[b] = t->kind == TOKENIZER_LLAMA3
                               ? lookup(t, &one, 1, 1)
                               : lookup(t, (const unsigned char *)hex, 6, 1);
        if (t->byte_token[b] < 0) return b;
        size_t len = token(t, t->byte_token[b]).len;
        if (len > t->byte_piece_max) t->byte_piece_max = len;
    }
    return -1;
}

Tokenizer *tokenizer_build(int kind, const void *data, size_t bytes, char *err, size_t err_cap) {
    const unsigned char *p = data, *end = p + bytes;
    if (kind != TOKENIZER_LLAMA3 && kind != TOKENIZER_LLAMA2C)
        return fail(NULL, err, err_cap, "unknown tokenizer kind %d", kind);
    if (bytes < 8) return fail(NULL, err, err_cap, "tokenizer section is %zu bytes, too short", bytes);
    if (bytes > UINT32_MAX) return fail(NULL, err, err_cap, "tokenizer section is %zu bytes, over 4 GiB", bytes);
    uint32_t n = read_u32(p), max_bytes = read_u32(p + 4);
    p += 8;
    if (n == 0 || n > (bytes - 8) / 12 || n > INT32_MAX)
        return fail(NULL, err, err_cap, "tokenizer section claims %u tokens but has %zu bytes "
                    "(truncated or corrupt?)", n, bytes);
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) return fail(NULL, err, err_cap, "out of memory");
    t->kind = kind;
    t->n_tokens = (int)n;
    t->bos_id = -1;
    size_t n_slots = 1;
    while (n_slots < 2 * (size_t)n) n_slots *= 2;
    t->slot_mask = n_slots - 1;
    t->section = data;
    t->entry = malloc(n * sizeof *t->entry);
    t->slots = malloc(n_slots * sizeof *t->slots);
    if (!t->entry || !t->slots)
        return fail(t, err, err_cap, "out of memory for %u tokens", n);
    memset(t->slots, 0xff, n_slots * sizeof *t->slots); // id -1: empty

    for (uint32_t id = 0; id < n; id++) { // score f32, flags u32, len u32, bytes
        if (end - p < 12)
            return fail(t, err, err_cap, "tokenizer section ends inside token %u of %u (truncated?)", id, n);
        uint32_t len = read_u32(p + 8);
        if (len > max_bytes || len > (size_t)(end - p) - 12)
            return fail(t, err, err_cap, "token %u claims %u bytes (max_token_bytes %u, %zu left in "
                        "the section): corrupt tokenizer section", id, len, max_bytes, (size_t)(end - p) - 12);
        t->entry[id] = (uint32_t)(p - t->section);
        if (len > t->max_token_bytes) t->max_token_bytes = len;
        p += 12 + len;
        if (len > 0) table_insert(t, (int)id);
    }
    if (p != end)
        return fail(t, err, err_cap, "%zu bytes follow the last token of the tokenizer section (corrupt?)",
                    (size_t)(end - p));
    int missing = index_byte_tokens(t);
    if (missing >= 0)
        return fail(t, err, err_cap, "the vocabulary has no token for byte 0x%02X, so it cannot "
                    "encode every text (wrong tokenizer kind?)", missing);
    if (!index_specials(t)) return fail(t, err, err_cap, "out of memory");
    if (kind == TOKENIZER_LLAMA2C) t->bos_id = lookup(t, (const unsigned char *)"\n<s>\n", 5, 0);
    // Llama 3's pre-tokenizer never joins "\n" to a following letter, nor a
    // letter to a following " x" (see tokenizer_cut); llama2c merges across
    // anything its pieces span: a piece with '\n', or ' ' past its start, rules those cuts out.
    // (Llama 3 special tokens are matched in the text as literals: one with '\n' or ' ' rules out the same.)
    t->cut_at_newline = t->cut_at_space = 1;
    for (int id = 0; id < t->n_tokens; id++) {
        Token tk = token(t, id);
        if (tk.special != (kind == TOKENIZER_LLAMA3)) continue;
        if (memchr(tk.bytes, '\n', tk.len)) t->cut_at_newline = 0;
        if (tk.len > 1 && memchr(tk.bytes + 1, ' ', tk.len - 1)) t->cut_at_space = 0;
    }
    return t;
}

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    free(t->entry);
    free(t->slots);
    free(t->specials);
    free(t);
}

int tokenizer_kind(const Tokenizer *t) { return t->kind; }
int tokenizer_n_tokens(const Tokenizer *t) { return t->n_tokens; }

const char *tokenizer_piece(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_tokens) { *len = 0; return NULL; }
    Token tok = token(t, id);
    *len = tok.len;
    return (const char *)tok.bytes;
}

int tokenizer_is_special(const Tokenizer *t, int id) {
    return id >= 0 && id < t->n_tokens && token(t, id).special;
}

int tokenizer_find(const Tokenizer *t, const char *name) {
    return lookup(t, (const unsigned char *)name, strlen(name), 0);
}

// ----------------------------------------------------------------------------
// UTF-8 and character classes

/* The length (1..4) of the UTF-8 character that `lead` starts, or 0 if no
   character can start with it (a continuation byte, C0, C1, F5..FF). */
static int utf8_length(unsigned char lead) {
    if (lead < 0x80) return 1;
    if (lead < 0xC2) return 0;
    if (lead < 0xE0) return 2;
    if (lead < 0xF0) return 3;
    return lead < 0xF5 ? 4 : 0;
}

/* Whether b may follow `lead` as its second byte; the narrow ranges exclude
   overlong forms, surrogates (ED A0..) and code points above U+10FFFF. */
static int utf8_second_ok(unsigned char lead, unsigned char b) {
    unsigned char lo = 0x80, hi = 0xBF;
    if (lead == 0xE0) lo = 0xA0;
    else if (lead == 0xED) hi = 0x9F;
    else if (lead == 0xF0) lo = 0x90;
    else if (lead == 0xF4) hi = 0x8F;
    return b >= lo && b <= hi;
}

static int unicode_class(uint32_t cp) {
    if (cp < 128) return unicode_ascii_class[cp];
    size_t lo = 0, hi = sizeof unicode_ranges / sizeof unicode_ranges[0];
    while (lo < hi) { // first range whose last >= cp
        size_t mid = (lo + hi) / 2;
        if (unicode_ranges[mid].last < cp) lo = mid + 1; else hi = mid;
    }
    return lo < sizeof unicode_ranges / sizeof unicode_ranges[0] && unicode_ranges[lo].first <= cp
               ? (int)unicode_ranges[lo].cls : UC_OTHER;
}

typedef struct {
    int len; // bytes
    int cls; // UC_*
} Char;

/* The character at s[i], i < n. A byte that does not start a valid UTF-8
   sequence is a character of its own, of class UC_OTHER (tiktoken works on
   valid strings only, so this is our choice: safe and deterministic). */
static Char char_at(const unsigned char *s, size_t n, size_t i) {
    unsigned char b = s[i];
    if (b < 0x80) return (Char){1, unicode_ascii_class[b]};
    int len = utf8_length(b);
    if (len == 0 || n - i < (size_t)len || !utf8_second_ok(b, s[i + 1])) return (Char){1, UC_OTHER};
    uint32_t cp = b & (0x7F >> len);
    for (int k = 1; k < len; k++) {
        if (k > 1 && (s[i + k] & 0xC0) != 0x80) return (Char){1, UC_OTHER};
        cp = cp << 6 | (s[i + k] & 0x3F);
    }
    return (Char){len, unicode_class(cp)};
}

/* The end of the run of characters of class cls that starts at s[p]. */
static size_t skip_class(const unsigned char *s, size_t n, size_t p, int cls) {
    while (p < n && s[p] < 0x80 && unicode_ascii_class[s[p]] == cls) p++; // fast path
    while (p < n) {
        Char c = char_at(s, n, p);
        if (c.cls != cls) break;
        p += c.len;
    }
    return p;
}

static int is_newline(unsigned char b) { return b == '\r' || b == '\n'; }

// ----------------------------------------------------------------------------
// Llama 3's pre-tokenizer, the regex
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// by hand. Each match_* function tries one alternative at s[p] (p < n) and
// returns the length it matches, 0 if none. Leftmost-first: the first
// alternative that matches wins, even if a later one would match more.

static unsigned char ascii_lower(unsigned char b) { return b >= 'A' && b <= 'Z' ? b + 32 : b; }

/* (?i:'s|'t|'re|'ve|'m|'ll|'d). Case-insensitive as in Rust's regex crate,
   which folds s with U+017F LATIN SMALL LETTER LONG S (UTF-8 C5 BF) too. */
static size_t match_contraction(const unsigned char *s, size_t n, size_t p) {
    if (s[p] != '\'' || n - p < 2) return 0;
    unsigned char a = ascii_lower(s[p + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (n - p < 3) return 0;
    if (s[p + 1] == 0xC5 && s[p + 2] == 0xBF) return 3;
    unsigned char b = ascii_lower(s[p + 2]);
    return ((a == 'r' || a == 'v') && b == 'e') || (a == 'l' && b == 'l') ? 3 : 0;
}

/* [^\r\n\p{L}\p{N}]?\p{L}+  a word, with one leading non-letter-or-digit
   (usually the space before it). */
static size_t match_word(const unsigned char *s, size_t n, size_t p) {
    Char c = char_at(s, n, p);
    size_t q = p; // where the letters start
    if (c.cls == UC_SPACE ? !is_newline(s[p]) : c.cls == UC_OTHER) q += c.len;
    size_t e = skip_class(s, n, q, UC_LETTER);
    return e > q ? e - p : 0; // without the prefix s[p] is no letter: no match either
}

/* \p{N}{1,3}  up to three digits. */
static size_t match_digits(const unsigned char *s, size_t n, size_t p) {
    size_t q = p;
    for (int k = 0; k < 3 && q < n; k++) {
        Char c = char_at(s, n, q);
        if (c.cls != UC_NUMBER) break;
        q += c.len;
    }
    return q - p;
}

/*  ?[^\s\p{L}\p{N}]+[\r\n]*  punctuation and symbols, with an optional space
   before and line breaks after. */
static size_t match_punctuation(const unsigned char *s, size_t n, size_t p) {
    size_t q = p + (s[p] == ' '); // a bare ' ' can't match the class, so no backtracking
    size_t e = q < n ? skip_class(s, n, q, UC_OTHER) : q;
    if (e == q) return 0;
    while (e < n && is_newline(s[e])) e++;
    return e - p;
}

/* \s*[\r\n]+  whitespace up to and including its last line break. */
static size_t match_line_breaks(const unsigned char *s, size_t n, size_t p) {
    size_t e = skip_class(s, n, p, UC_SPACE);
    while (e > p && !is_newline(s[e - 1])) e--; // \r, \n are ASCII: no character splits
    return e - p;
}

/* \s+(?!\S)  whitespace not followed by a non-space: all of it at the end of
   the text, else all but its last character, which then prefixes the word
   after it (the " world" of "a   world"). */
static size_t match_space_before_word(const unsigned char *s, size_t n, size_t p) {
    size_t e = skip_class(s, n, p, UC_SPACE);
    if (e == n) return e - p;
    if (e == p) return 0;
    size_t last = e - 1;
    while ((s[last] & 0xC0) == 0x80) last--; // back to the last character's lead byte
    return last - p;
}

/* \s+ */
static size_t match_space(const unsigned char *s, size_t n, size_t p) {
    return skip_class(s, n, p, UC_SPACE) - p;
}

/* The length of the pre-tokenizer piece that starts at s[p], p < n. */
static size_t next_piece(const unsigned char *s, size_t n, size_t p) {
    size_t len;
    if ((len = match_contraction(s, n, p))) return len;
    if ((len = match_word(s, n, p))) return len;
    if ((len = match_digits(s, n, p))) return len;
    if ((len = match_punctuation(s, n, p))) return len;
    if ((len = match_line_breaks(s, n, p))) return len;
    if ((len = match_space_before_word(s, n, p))) return len;
    if ((len = match_space(s, n, p))) return len;
    return (size_t)char_at(s, n, p).len; // unreachable: every character matches above
}

// ----------------------------------------------------------------------------
// BPE merging. Symbols live in a byte buffer buf[0..n) and are named by the
// offset where they start: sym_len[i] bytes, token sym_id[i], previous symbol
// sym_prev[i]; sym_len is 0 at offsets inside a symbol (merged away).
// Adjacent symbols are adjacent in buf, so a pair's bytes are buf[i..i+len).
// Offsets are 32-bit to halve the memory; longer inputs fail as out of memory.

typedef struct {
    float score;       // of the merged token
    int32_t id;        // the merged token
    uint32_t start;    // offset of the left symbol; the leftmost wins ties
    uint32_t left_len; // the left symbol's length when pushed (to spot stale pairs)
    uint32_t len;      // both symbols' bytes
} Pair;

typedef struct {       // per-encode working memory, grown on demand
    size_t cap;        // bytes of buf (so symbols) it can hold
    Pair *heap;        // (3 cap) candidate merges, a binary max-heap:
                       // n - 1 initial pairs + at most 2 per merge
    uint32_t *sym_len, *sym_prev; // (cap)
    int32_t *sym_id;   // (cap)
    unsigned char *buf; // (cap) llama2c: the initial symbols' pieces
} Scratch;

/* Makes room for n bytes (one block; old contents are not kept). */
static int scratch_reserve(Scratch *sc, size_t n) {
    if (n <= sc->cap) return 1;
    if (n > UINT32_MAX / 2) return 0;
    size_t cap = n > 2 * sc->cap ? n : 2 * sc->cap;
    free(sc->heap);
    sc->heap = malloc(cap * (3 * sizeof(Pair) + 3 * sizeof(uint32_t) + 1));
    sc->cap = sc->heap ? cap : 0;
    if (!sc->heap) return 0;
    sc->sym_len = (uint32_t *)(sc->heap + 3 * cap);
    sc->sym_prev = sc->sym_len + cap;
    sc->sym_id = (int32_t *)(sc->sym_prev + cap);
    sc->buf = (unsigned char *)(sc->sym_id + cap);
    return 1;
}

static int pair_before(const Pair *a, const Pair *b) {
    return a->score > b->score || (a->score == b->score && a->start < b->start);
}

static void heap_push(Pair *heap, size_t *n, Pair x) {
    size_t i = (*n)++;
    while (i > 0 && pair_before(&x, &heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = x;
}

static Pair heap_pop(Pair *heap, size_t *n) {
    Pair top = heap[0], x = heap[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && pair_before(&heap[c + 1], &heap[c])) c++;
        if (!pair_before(&heap[c], &x)) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = x;
    return top;
}

/* Pushes the pair of the symbol at i and the one after it, if their bytes are
   a token. Scores must beat -1e10, where llama2.c starts its search. */
static void push_pair(const Tokenizer *t, Scratch *sc, size_t *n_heap, const unsigned char *buf, uint32_t i) {
    uint32_t left = sc->sym_len[i], len = left + sc->sym_len[i + left];
    int id = lookup(t, buf + i, len, 1);
    float score = id >= 0 ? token(t, id).score : 0;
    if (id >= 0 && score > -1e10f) heap_push(sc->heap, n_heap, (Pair){score, id, i, left, len});
}

/* Merges the symbols set up in sc over buf[0..n), n > 0, best pair first,
   and writes the final symbols' ids to out. Returns their count. */
static size_t bpe_merge(const Tokenizer *t, Scratch *sc, const unsigned char *buf, uint32_t n, int *out) {
    uint32_t *len = sc->sym_len;
    size_t n_heap = 0;
    for (uint32_t i = 0; i + len[i] < n; i += len[i]) push_pair(t, sc, &n_heap, buf, i);
    while (n_heap > 0) {
        Pair m = heap_pop(sc->heap, &n_heap);
        uint32_t right = m.start + m.left_len;
        if (len[m.start] != m.left_len || right >= n || len[right] != m.len - m.left_len)
            continue; // stale: one of its symbols has merged since it was pushed
        len[m.start] = m.len;
        len[right] = 0;
        sc->sym_id[m.start] = m.id;
        uint32_t next = m.start + m.len;
        if (next < n) {
            sc->sym_prev[next] = m.start;
            push_pair(t, sc, &n_heap, buf, m.start);
        }
        if (m.start > 0) push_pair(t, sc, &n_heap, buf, sc->sym_prev[m.start]);
    }
    size_t n_out = 0;
    for (uint32_t i = 0; i < n; i += len[i]) out[n_out++] = sc->sym_id[i];
    return n_out;
}

// ----------------------------------------------------------------------------
// Encoding

/* Llama 3: one pre-tokenizer piece s[0..n) -> ids appended to out (tiktoken's
   byte_pair_encode). Returns the count, or -1 if out of memory. */
static long encode_piece(const Tokenizer *t, Scratch *sc, const unsigned char *s, size_t n, int *out) {
    int id = lookup(t, s, n, 1);
    if (id >= 0) { out[0] = id; return 1; } // a whole-word token: most pieces end here
    if (!scratch_reserve(sc, n)) return -1;
    for (uint32_t i = 0; i < n; i++) { // one symbol per byte
        sc->sym_len[i] = 1;
        sc->sym_id[i] = t->byte_token[s[i]];
        sc->sym_prev[i] = i - 1;
    }
    return (long)bpe_merge(t, sc, s, (uint32_t)n, out);
}

/* Llama 3, text without special tokens: pre-tokenize, then merge each piece. */
static long encode_ordinary(const Tokenizer *t, Scratch *sc, const unsigned char *s, size_t n, int *out) {
    long n_out = 0;
    for (size_t p = 0; p < n;) {
        size_t len = next_piece(s, n, p);
        long k = encode_piece(t, sc, s + p, len, out + n_out);
        if (k < 0) return -1;
        n_out += k;
        p += len;
    }
    return n_out;
}

/* The first special-token literal in s[p..n): returns where it starts and its
   id in *id (the longest, if several start there), or n and *id = -1. */
static size_t find_special(const Tokenizer *t, const unsigned char *s, size_t n, size_t p, int *id) {
    for (; p < n; p++) {
        if (!t->special_start[s[p]]) continue;
        for (int k = 0; k < t->n_specials; k++) {
            const struct Special *sp = &t->specials[k];
            if (sp->len <= n - p && memcmp(s + p, token(t, sp->id).bytes, sp->len) == 0) {
                *id = sp->id;
                return p;
            }
        }
    }
    *id = -1;
    return n;
}

/* Llama 3: with parse_special, cuts the text at special-token literals and
   encodes the ordinary text between them on its own (tiktoken's encode()). */
static long encode_llama3(const Tokenizer *t, Scratch *sc, const unsigned char *s, size_t n,
                          int parse_special, int *out) {
    long n_out = 0;
    for (size_t p = 0;;) {
        int id = -1;
        size_t q = parse_special ? find_special(t, s, n, p, &id) : n;
        long k = encode_ordinary(t, sc, s + p, q - p, out + n_out);
        if (k < 0) return -1;
        n_out += k;
        if (id < 0) return n_out;
        out[n_out++] = id;
        p = q + token(t, id).len;
    }
}

/* Appends a symbol: `len` bytes, token id, after the symbol at *prev. */
static void add_symbol(Scratch *sc, uint32_t *m, uint32_t *prev, const unsigned char *bytes,
                       size_t len, int id) {
    memcpy(sc->buf + *m, bytes, len);
    sc->sym_len[*m] = (uint32_t)len;
    sc->sym_id[*m] = id;
    sc->sym_prev[*m] = *prev;
    *prev = *m;
    *m += (uint32_t)len;
}

/* llama2c: appends the symbols of one character: its token, or else one
   "<0xXX>" byte token per byte (byte fallback). */
static void add_character(const Tokenizer *t, Scratch *sc, uint32_t *m, uint32_t *prev,
                          const unsigned char *ch, size_t len) {
    int id = lookup(t, ch, len, 1);
    if (id >= 0) {
        add_symbol(sc, m, prev, ch, len, id);
        return;
    }
    for (size_t k = 0; k < len; k++) {
        Token byte = token(t, t->byte_token[ch[k]]);
        add_symbol(sc, m, prev, byte.bytes, byte.len, t->byte_token[ch[k]]);
    }
}

/* llama2.c's encode(): a dummy " " prefix, one symbol per character, then
   merges. Symbols hold their tokens' pieces ("<0xE4>" for a fallback byte),
   as llama2.c concatenates pieces to look pairs up. Like llama2.c, a
   "character" is any byte plus up to 3 continuation bytes after it, valid
   UTF-8 or not. Special tokens are never parsed (llama2.c has no such
   option). Returns the count, or -1 if out of memory. */
static long encode_llama2c(const Tokenizer *t, Scratch *sc, const unsigned char *s, size_t n, int dummy_prefix,
                           int *out) {
    if (n == 0) return 0;
    if (n > UINT32_MAX / 8 || !scratch_reserve(sc, (n + 1) * t->byte_piece_max)) return -1;
    uint32_t m = 0, prev = UINT32_MAX; // bytes in sc->buf; the last symbol
    if (dummy_prefix) add_character(t, sc, &m, &prev, (const unsigned char *)" ", 1);
    for (size_t i = 0; i < n;) {
        size_t len = 1;
        while (len < 4 && i + len < n && (s[i + len] & 0xC0) == 0x80) len++;
        add_character(t, sc, &m, &prev, s + i, len);
        i += len;
    }
    return (long)bpe_merge(t, sc, sc->buf, m, out);
}

static int *encode(const Tokenizer *t, const char *text, size_t len, int parse_special, int start, size_t *n_ids) {
    // every byte yields at most one id, plus llama2c's dummy prefix
    int *ids = len < SIZE_MAX / sizeof(int) - 1 ? malloc((len + 1) * sizeof(int)) : NULL;
    const unsigned char *s = len ? (const unsigned char *)text : (const unsigned char *)""; // text may be NULL
    Scratch sc = {0};
    long n = -1;
    if (ids) {
        n = t->kind == TOKENIZER_LLAMA3 ? encode_llama3(t, &sc, s, len, parse_special, ids)
                                        : encode_llama2c(t, &sc, s, len, start, ids);
    }
    free(sc.heap); // the block that holds all of sc's arrays
    if (n < 0) {
        free(ids);
        *n_ids = 0;
        return NULL;
    }
    *n_ids = (size_t)n;
    return ids;
}

int *tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int parse_special, size_t *n_ids) {
    return encode(t, text, len, parse_special, 1, n_ids);
}

int *tokenizer_encode_continued(const Tokenizer *t, const char *text, size_t len, int parse_special, size_t *n_ids) {
    return encode(t, text, len, parse_special, 0, n_ids);
}

static int ascii_letter(unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }
static int ascii_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* Where a text may be cut without changing its tokens: between s[i-1] and
   s[i] when (a) s[i-1] is '\n' and s[i] an ASCII letter or digit, or (b)
   s[i-1] is an ASCII letter, s[i] ' ' and s[i+1] a letter. In Llama 3's
   pre-tokenizer regex no alternative matches a newline followed by a letter
   or digit, nor a letter followed by a space, and none looks behind, so its
   words (which BPE never merges across) end at the cut in the whole text as
   in the two parts. llama2c merges across words, but only into its pieces:
   tokenizer_build allows each rule only if no piece spans such a pair.
   Special-token literals contain neither '\n' nor ' '. */
size_t tokenizer_cut(const Tokenizer *t, const char *text, size_t len) {
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = len - (len > 0); i > 0; i--) {
        if (t->cut_at_newline && s[i - 1] == '\n' && (ascii_letter(s[i]) || ascii_digit(s[i]))) return i;
        if (t->cut_at_space && s[i] == ' ' && i + 1 < len && ascii_letter(s[i - 1]) && ascii_letter(s[i + 1])) return i;
    }
    return 0;
}

size_t tokenizer_max_token_bytes(const Tokenizer *t) { return t->max_token_bytes; }

// ----------------------------------------------------------------------------
// Decoding: token bytes go through a UTF-8 stream that holds back an
// incomplete character and replaces each maximal invalid subsequence with
// U+FFFD (the "maximal subpart" practice of the Unicode standard, ch. 3).

typedef struct {
    char *out;
    size_t cap, len;
} Writer;

static void put(Writer *w, const void *bytes, size_t n) {
    if (w->len + n > w->cap) return; // cap too small: drop rather than overflow
    memcpy(w->out + w->len, bytes, n);
    w->len += n;
}

static void put_replacement(Writer *w) { put(w, "\xEF\xBF\xBD", 3); }

static void stream_byte(Utf8Stream *s, unsigned char b, Writer *w) {
    if (s->n_pending > 0) {
        int ok = s->n_pending == 1 ? utf8_second_ok(s->pending[0], b) : (b & 0xC0) == 0x80;
        if (ok) {
            s->pending[s->n_pending++] = b;
            if (s->n_pending == utf8_length(s->pending[0])) {
                put(w, s->pending, (size_t)s->n_pending);
                s->n_pending = 0;
            }
            return;
        }
        put_replacement(w); // the held-back bytes never completed; b starts afresh
        s->n_pending = 0;
    }
    int len = utf8_length(b);
    if (len == 1) put(w, &b, 1);
    else if (len == 0) put_replacement(w);
    else s->pending[s->n_pending++] = b;
}

/* A llama2c byte token "<0xXX>" -> its byte in *b (llama2.c's sscanf). */
static int parse_byte_piece(const unsigned char *p, size_t n, unsigned char *b) {
    if (n != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return 0;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        int c = p[k], d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return 0;
        v = v * 16 + d;
    }
    *b = (unsigned char)v;
    return 1;
}

size_t tokenizer_decode(const Tokenizer *t, Utf8Stream *s, int prev, int id, char *out, size_t cap) {
    if (id < 0 || id >= t->n_tokens || token(t, id).special) return 0;
    const unsigned char *p = token(t, id).bytes;
    size_t n = token(t, id).len;
    unsigned char byte;
    if (t->kind == TOKENIZER_LLAMA2C) {
        if (prev == t->bos_id && t->bos_id >= 0 && n > 0 && p[0] == ' ') { p++; n--; }
        if (parse_byte_piece(p, n, &byte)) { p = &byte; n = 1; }
    }
    Writer w = {out, cap, 0};
    for (size_t i = 0; i < n; i++) stream_byte(s, p[i], &w);
    return w.len;
}

size_t tokenizer_decode_flush(Utf8Stream *s, char *out, size_t cap) {
    Writer w = {out, cap, 0};
    if (s->n_pending > 0) put_replacement(&w);
    s->n_pending = 0;
    return w.len;
}

/* Each byte in (a token's, plus up to 3 held back) yields at most 3 out. */
size_t tokenizer_max_decode_bytes(const Tokenizer *t) { return 3 * (t->max_token_bytes + 3); }
