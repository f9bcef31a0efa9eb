/* tokenizer.h - text <-> token ids, for the two tokenizer kinds of model.h:
   TOKENIZER_LLAMA3  byte-level BPE with tiktoken ranks and Llama 3's exact
                     pre-tokenizer, special tokens <|...|>;
   TOKENIZER_LLAMA2C llama2.c's SentencePiece-style BPE with scores, a dummy
                     prefix space and <0xXX> byte fallback.
   The engine adds BOS itself; encode never does. */
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stddef.h>
#include <stdio.h>

typedef struct Tokenizer Tokenizer;

/* Parses a tokenizer section (model.h) of `bytes` bytes at `data`; `data`
   must stay valid (it is the mmapped file) while the tokenizer lives.
   Returns NULL on failure and, if err is not NULL, a one-line reason in
   err[0..err_cap) (no "error: " prefix, no newline). */
Tokenizer *tokenizer_build(int kind, const void *data, size_t bytes,
                           char *err, size_t err_cap);
void tokenizer_free(Tokenizer *t);

int tokenizer_kind(const Tokenizer *t);
int tokenizer_n_tokens(const Tokenizer *t);
/* The raw bytes of token id (not NUL-terminated); *len receives their count. */
const char *tokenizer_piece(const Tokenizer *t, int id, size_t *len);
int tokenizer_is_special(const Tokenizer *t, int id);
/* The id of the token whose bytes equal name exactly (e.g. "<|eot_id|>"), or -1. */
int tokenizer_find(const Tokenizer *t, const char *name);

/* Encodes text[0..len) (no BOS). With parse_special, a special-token literal
   in the text (llama3: "<|eot_id|>") becomes its id; otherwise it is ordinary
   text (llama2c has no such literals and ignores the flag). Returns a malloc'd array of *n_ids ids (free() it), or NULL if out of
   memory. Any byte sequence is accepted, including invalid UTF-8. */
int *tokenizer_encode(const Tokenizer *t, const char *text, size_t len,
                      int parse_special, size_t *n_ids);

/* Streaming encode, for texts too long to hold (-m ppl): tokenizer_cut
   returns the largest i < len at which text may be cut so that the tokens of
   text[0..i) followed by those of text[i..) equal those of the whole, or 0 if
   there is none (it looks for a newline or a space between words). The part
   after a cut is encoded with tokenizer_encode_continued (llama2c then adds
   no dummy prefix space). */
size_t tokenizer_cut(const Tokenizer *t, const char *text, size_t len);
int *tokenizer_encode_continued(const Tokenizer *t, const char *text, size_t len,
                                int parse_special, size_t *n_ids);
/* Bytes of the longest token: a text of n bytes has at least n / this many tokens. */
size_t tokenizer_max_token_bytes(const Tokenizer *t);

/* Streaming decode that never emits broken UTF-8: the bytes of a character
   split across tokens are held back until it is complete; an invalid sequence
   becomes U+FFFD. Special tokens produce no text. For llama2c, `prev` is the
   previous token id (a piece right after BOS loses its leading space, as in
   llama2.c); pass -1 when there is none. */
typedef struct {
    unsigned char pending[4]; // bytes of an incomplete UTF-8 character
    int n_pending;
} Utf8Stream;

/* Appends the text of token `id` to out[0..cap); returns the number of bytes
   written. cap >= tokenizer_max_decode_bytes(t) always suffices. */
size_t tokenizer_decode(const Tokenizer *t, Utf8Stream *s, int prev, int id,
                        char *out, size_t cap);
/* Flushes what is held back at the end of a stream (as U+FFFD, since it is
   an incomplete character); returns bytes written (cap >= 8 suffices). */
size_t tokenizer_decode_flush(Utf8Stream *s, char *out, size_t cap);
size_t tokenizer_max_decode_bytes(const Tokenizer *t);

#endif
