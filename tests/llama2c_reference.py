#!/usr/bin/env python3
"""An independent reference for the llama2c tokenizer kind: llama2.c run.c's
encode(), transliterated to Python straight from its C (the same loops, the
same -1e10 start of the best-score search, byte fallback id = byte + 3),
reading the llama2.c tokenizer.bin itself, not our section.

Usage: llama2c_reference.py tokenizer.bin < texts > ids
  input:  one text per line, hex-encoded bytes (an empty line is "")
  output: per text, its ids separated by spaces (no BOS, as our encode)."""
import struct
import sys


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    pos, vocab, scores = 4, [], []  # skips uint32 max_token_length
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        vocab.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return vocab, scores


def encode(vocab, scores, lookup, text):
    tokens = []
    if text:  # the dummy prefix
        tokens.append(lookup[b" "])
    buf = b""
    for i, c in enumerate(text):
        if c & 0xC0 != 0x80:  # not a continuation byte: a new codepoint starts
            buf = b""
        buf += bytes([c])
        nxt = text[i + 1] if i + 1 < len(text) else 0
        if nxt & 0xC0 == 0x80 and len(buf) < 4:
            continue
        if buf in lookup:
            tokens.append(lookup[buf])
        else:
            tokens.extend(b + 3 for b in buf)  # byte fallback
        buf = b""
    while True:  # merge the best-scoring pair, the first one on ties
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    return tokens


def main():
    vocab, scores = load(sys.argv[1])
    lookup = {}
    for i, piece in enumerate(vocab):
        lookup.setdefault(piece, i)
    for line in sys.stdin:
        ids = encode(vocab, scores, lookup, bytes.fromhex(line.strip()))
        print(" ".join(map(str, ids)))


if __name__ == "__main__":
    main()
