#!/usr/bin/env python3
"""Writes the tokenizer section of a model file (layout in model.h).

  section_from_tokenizer_json(path_or_dict, vocab_size=None) -> (bytes, info)
      a Hugging Face tokenizer.json of a byte-level BPE with Llama 3's
      pre-tokenizer (TOKENIZER_LLAMA3)
  section_from_llama2c(path, vocab_size=None) -> bytes
      a llama2.c tokenizer.bin (TOKENIZER_LLAMA2C)

CLI (writes just the section, e.g. for tests):
  python3 export/tokenizer_section.py IN(tokenizer.json|tokenizer.bin) OUT.tok [--vocab-size N]
Standard library only."""
import argparse
import json
import struct
import sys

TOKEN_SPECIAL = 1

# The pre-tokenizer tokenizer.c implements, as written in Llama 3's tokenizer.json.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Names of the special tokens export.py may want, as info keys.
NAMED_SPECIALS = {"bos_id": "<|begin_of_text|>", "eos_id": "<|end_of_text|>",
                  "eot_id": "<|eot_id|>", "eom_id": "<|eom_id|>"}


def pack_section(tokens):
    """tokens: list of (score, flags, bytes), index = id. Returns the section."""
    parts = [struct.pack("<II", len(tokens), max((len(b) for _, _, b in tokens), default=0))]
    for score, flags, piece in tokens:
        parts.append(struct.pack("<fII", score, flags, len(piece)))
        parts.append(piece)
    return b"".join(parts)


# ----------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE)

def byte_level_alphabet():
    """GPT-2's byte-level BPE writes each byte as one printable character:
    the printable Latin-1 bytes stand for themselves and the other 68 bytes
    (controls, space, 0x7F-0xA0, 0xAD) become U+0100, U+0101, ... in byte
    order. Returns {character: byte}."""
    printable = [b for b in range(256)
                 if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    char_of = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in char_of]
    for i, b in enumerate(shifted):
        char_of[b] = chr(256 + i)
    return {c: b for b, c in char_of.items()}


def pre_tokenizer_patterns(node):
    """Yields the regex of every Split pre-tokenizer in a (nested) pre_tokenizer."""
    if not isinstance(node, dict):
        return
    if node.get("type") == "Split":
        yield node.get("pattern", {}).get("Regex")
    for child in node.get("pretokenizers", []) or []:
        yield from pre_tokenizer_patterns(child)


def check_llama3_bpe(tj):
    """Raises ValueError unless tj is a byte-level BPE with Llama 3's regex."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: model.type is {model.get('type')!r}, expected 'BPE'")
    if model.get("byte_fallback"):
        raise ValueError("tokenizer.json: BPE with byte_fallback is SentencePiece-style, "
                         "not byte-level BPE")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("tokenizer.json: decoder is not ByteLevel, so this is not a "
                         "byte-level BPE")
    patterns = list(pre_tokenizer_patterns(tj.get("pre_tokenizer")))
    if LLAMA3_PATTERN not in patterns:
        raise ValueError("tokenizer.json: the pre-tokenizer is not Llama 3's regex split "
                         f"(found {patterns!r}); tokenizer.c implements only that one")


def section_from_tokenizer_json(path_or_dict, vocab_size=None):
    """Returns (section bytes, info). Token id = BPE rank (as in tiktoken):
    ordinary tokens get score -id and their bytes; added_tokens are flagged
    TOKEN_SPECIAL with their content as bytes; ids below vocab_size with no
    token become empty special placeholders. info holds vocab_size,
    max_token_bytes, n_special, special ({content: id}), bos_id, eos_id,
    eot_id, eom_id (None when absent) and stop_ids (those of eos/eot/eom present)."""
    if isinstance(path_or_dict, dict):
        tj = path_or_dict
    else:
        with open(path_or_dict, encoding="utf-8") as f:
            tj = json.load(f)
    check_llama3_bpe(tj)
    to_byte = byte_level_alphabet()
    pieces, specials = {}, {}
    for text, i in tj["model"]["vocab"].items():
        try:
            pieces[i] = bytes(to_byte[c] for c in text)
        except KeyError as e:
            raise ValueError(f"tokenizer.json: vocab entry {text!r} (id {i}) has the character "
                             f"{e.args[0]!r}, which is not in the byte-level alphabet") from None
    for tok in tj.get("added_tokens", []):
        i, content = tok["id"], tok["content"].encode("utf-8")
        if i in pieces and pieces[i] != content:
            raise ValueError(f"tokenizer.json: added token {tok['content']!r} has id {i}, "
                             f"which the vocab gives to {pieces[i]!r}")
        pieces[i] = content
        specials[tok["content"]] = i
    n = max(pieces, default=-1) + 1 if vocab_size is None else vocab_size
    too_big = sorted(i for i in pieces if i >= n or i < 0)
    if too_big:
        raise ValueError(f"tokenizer.json: token ids {too_big[:5]} do not fit vocab_size {n}")
    special_ids = set(specials.values())
    tokens = []
    for i in range(n):
        flags = TOKEN_SPECIAL if (i in special_ids or i not in pieces) else 0
        tokens.append((float(-i), flags, pieces.get(i, b"")))
    info = {"vocab_size": n, "max_token_bytes": max((len(p) for p in pieces.values()), default=0),
            "n_special": sum(1 for _, f, _ in tokens if f & TOKEN_SPECIAL), "special": specials}
    for key, name in NAMED_SPECIALS.items():
        info[key] = specials.get(name)
    info["stop_ids"] = [info[k] for k in ("eos_id", "eot_id", "eom_id") if info[k] is not None]
    return pack_section(tokens), info


# ----------------------------------------------------------------------------
# llama2.c tokenizer.bin

def section_from_llama2c(path, vocab_size=None):
    """tokenizer.bin: uint32 max_token_length, then per token float32 score,
    int32 len, bytes. Reads vocab_size tokens (all of the file if None);
    ids 0, 1, 2 (<unk>, "\\n<s>\\n", "\\n</s>\\n") are flagged TOKEN_SPECIAL."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a llama2.c tokenizer")
    pos, tokens = 4, []
    while pos < len(data) and (vocab_size is None or len(tokens) < vocab_size):
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated in the header of token {len(tokens)}")
        score, n = struct.unpack_from("<fi", data, pos)
        if n < 0 or pos + 8 + n > len(data):
            raise ValueError(f"{path}: token {len(tokens)} claims {n} bytes, past the end of file")
        flags = TOKEN_SPECIAL if len(tokens) < 3 else 0
        tokens.append((score, flags, data[pos + 8:pos + 8 + n]))
        pos += 8 + n
    if vocab_size is not None and len(tokens) < vocab_size:
        raise ValueError(f"{path}: has {len(tokens)} tokens, the model needs {vocab_size}")
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} bytes left after {len(tokens)} tokens; "
                         "is this the model's own tokenizer?")
    return pack_section(tokens)


def main():
    ap = argparse.ArgumentParser(description="Write a tokenizer section (model.h) to a file.")
    ap.add_argument("input", help="tokenizer.json (Hugging Face, Llama 3) or tokenizer.bin (llama2.c)")
    ap.add_argument("output")
    ap.add_argument("--vocab-size", type=int, default=None)
    args = ap.parse_args()
    try:
        if args.input.endswith(".json"):
            section, info = section_from_tokenizer_json(args.input, args.vocab_size)
            summary = (f"llama3, {info['vocab_size']} tokens ({info['n_special']} special), "
                       f"bos {info['bos_id']}, stop {info['stop_ids']}")
        else:
            section = section_from_llama2c(args.input, args.vocab_size)
            summary = f"llama2c, {struct.unpack_from('<I', section)[0]} tokens"
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    with open(args.output, "wb") as f:
        f.write(section)
    print(f"{args.output}: {len(section)} bytes, {summary}")


if __name__ == "__main__":
    main()
