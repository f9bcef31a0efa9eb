"""Tests of export/tokenizer_section.py, the tokenizer section writer:
the Llama 3 section reproduces Meta's tiktoken ranks file, the llama2.c one
reproduces tokenizer.bin, bad inputs are refused, the CLI writes the same
bytes. Prints one "ok NAME" / "FAIL NAME: why" / "skip NAME: why" per check."""
import base64
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "export"))
import tokenizer_section as ts  # noqa: E402

SHARED = os.environ.get("SHARED", os.path.join(HERE, "..", "..", "shared"))
SCRATCH = os.environ.get("TMPDIR_TESTS", "/tmp")


def report(ok, name, why=""):
    print(f"ok {name}" if ok else f"FAIL {name}: {why}", flush=True)


def shared_file(name, rel):
    """The path of a $SHARED file, or None after a skip (FAIL under CI=true)."""
    path = os.path.join(SHARED, rel)
    if os.path.exists(path):
        return path
    print(f"{'FAIL' if os.environ.get('CI') == 'true' else 'skip'} {name}: {path} is missing")
    return None


def parse_section(data):
    """-> list of (score, flags, bytes); checks the layout of model.h."""
    n, max_bytes = struct.unpack_from("<II", data)
    pos, tokens = 8, []
    for _ in range(n):
        score, flags, length = struct.unpack_from("<fII", data, pos)
        tokens.append((score, flags, data[pos + 12:pos + 12 + length]))
        pos += 12 + length
    assert pos == len(data), "section has trailing bytes"
    assert max_bytes == max(len(b) for _, _, b in tokens), "max_token_bytes is not the longest token"
    return tokens


def tiny_tokenizer_json(extra_vocab=(), model_type="BPE", pattern=ts.LLAMA3_PATTERN):
    """A minimal Llama-3-style tokenizer.json: the 256 bytes, extra_vocab
    strings after them, and <|begin_of_text|> as an added token."""
    alphabet = {b: c for c, b in ts.byte_level_alphabet().items()}
    vocab = {alphabet[b]: b for b in range(256)}
    for s in extra_vocab:
        vocab[s] = len(vocab)
    return {"model": {"type": model_type, "vocab": vocab, "merges": []},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
            "decoder": {"type": "ByteLevel"},
            "added_tokens": [{"id": len(vocab), "content": "<|begin_of_text|>", "special": True}]}


def refuses(make, *args):
    try:
        make(*args)
    except ValueError as e:
        return str(e)
    return None


def test_tiny_json():
    tj = tiny_tokenizer_json(["ĠĠ", "ab"])  # "ĠĠ" is two spaces in the byte-level alphabet
    tokens = parse_section(ts.section_from_tokenizer_json(tj)[0])
    report(tokens[256] == (-256.0, 0, b"  ") and tokens[257][2] == b"ab" and tokens[32][2] == b" "
           and tokens[0][2] == b"\x00", "json_vocab_maps_back_through_byte_level_alphabet", repr(tokens[256:258]))
    section, info = ts.section_from_tokenizer_json(tj, vocab_size=261)
    tokens = parse_section(section)
    report(len(tokens) == 261 and tokens[258] == (-258.0, 1, b"<|begin_of_text|>")
           and tokens[259] == (-259.0, 1, b"") and tokens[260][1:] == (1, b""),
           "vocab_size_pads_with_empty_special_placeholders", repr(tokens[258:]))
    report(info["bos_id"] == 258 and info["eos_id"] is None and info["stop_ids"] == [],
           "info_names_bos_and_eos_ids", repr(info))


def test_refusals():
    cases = {
        "non_bpe_model_is_refused": (tiny_tokenizer_json(model_type="WordPiece"),),
        "other_pre_tokenizer_regex_is_refused": (tiny_tokenizer_json(pattern=r"\s+|\w+"),),
        "ids_beyond_vocab_size_are_refused": (tiny_tokenizer_json(), 100),
    }
    for name, args in cases.items():
        why = refuses(ts.section_from_tokenizer_json, *args)
        report(why is not None, name, "no ValueError")
    tj = tiny_tokenizer_json()
    tj["model"]["byte_fallback"] = True
    report(refuses(ts.section_from_tokenizer_json, tj) is not None, "byte_fallback_bpe_is_refused", "no ValueError")
    tj = tiny_tokenizer_json(["▁the"])
    report("byte-level" in (refuses(ts.section_from_tokenizer_json, tj) or ""),
           "vocab_outside_byte_level_alphabet_is_refused", "no ValueError")


def test_llama3():
    json_path = shared_file("llama3_section_reproduces_tiktoken_ranks", "models/llama3-tokenizer.json")
    model_path = shared_file("llama3_section_reproduces_tiktoken_ranks", "models/llama3-tokenizer.model")
    if not json_path or not model_path:
        return
    section, info = ts.section_from_tokenizer_json(json_path)
    tokens = parse_section(section)
    bad = []
    with open(model_path) as f:
        for line in f:
            b64, rank = line.split()
            rank = int(rank)
            if tokens[rank] != (float(-rank), 0, base64.b64decode(b64)):
                bad.append(rank)
    report(len(tokens) == 128256 and not bad, "llama3_section_reproduces_tiktoken_ranks",
           f"{len(tokens)} tokens, ranks differ: {bad[:5]}")
    report(all(f == 1 for _, f, _ in tokens[128000:]) and tokens[128009][2] == b"<|eot_id|>",
           "llama3_added_tokens_are_special", repr(tokens[128009]))
    report(info["bos_id"] == 128000 and info["eos_id"] == 128001 and info["eot_id"] == 128009
           and info["eom_id"] is None and info["stop_ids"] == [128001, 128009],
           "llama3_info_has_bos_eos_eot", repr({k: info[k] for k in ("bos_id", "eos_id", "eot_id", "eom_id")}))


def test_llama2c():
    path = shared_file("llama2c_section_reproduces_tokenizer_bin", "models/tok512.bin")
    if not path:
        return
    tokens = parse_section(ts.section_from_llama2c(path, 512))
    with open(path, "rb") as f:
        data = f.read()
    pos, same = 4, True
    for i in range(512):
        score, n = struct.unpack_from("<fi", data, pos)
        same &= tokens[i] == (score, 1 if i < 3 else 0, data[pos + 8:pos + 8 + n])
        pos += 8 + n
    report(same and len(tokens) == 512, "llama2c_section_reproduces_tokenizer_bin", "tokens differ")
    report(refuses(ts.section_from_llama2c, path, 500) is not None
           and refuses(ts.section_from_llama2c, path, 600) is not None,
           "llama2c_wrong_vocab_size_is_refused", "no ValueError")
    out = os.path.join(SCRATCH, "cli_tok512.tok")
    run = subprocess.run([sys.executable, os.path.join(HERE, "..", "export", "tokenizer_section.py"),
                          path, out, "--vocab-size", "512"], capture_output=True, text=True)
    with open(out, "rb") as f:
        written = f.read() if run.returncode == 0 else b""
    report(written == ts.section_from_llama2c(path, 512), "cli_writes_the_section", run.stderr.strip())


if __name__ == "__main__":
    test_tiny_json()
    test_refusals()
    test_llama3()
    test_llama2c()
