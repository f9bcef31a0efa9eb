"""make_hf.py - writes small random Hugging Face Llama directories for the
tests: config.json, safetensors (one file or shards with an index, F32 / BF16
/ F16, data deliberately stored in a different order than the header lists
it) and a tokenizer.json (a small synthetic byte-level BPE, or the real
Llama 3 one from ../shared).

  cfg = hf_config(dim=64, hidden=160, n_layers=2, n_heads=4, n_kv_heads=2)
  weights = random_weights(cfg, seed=1)
  write_hf_dir(path, cfg, weights, dtype="BF16", shards=2)
"""
import json
import os
import shutil
import struct

import numpy as np

# ----------------------------------------------------------------------------
# config.json


def hf_config(dim, hidden, n_layers, n_heads, n_kv_heads, vocab=300, head_dim=None, tied=True,
              max_pos=256, theta=10000.0, eps=1e-5, rope_scaling=None, bos=None, eos=None):
    """A LlamaForCausalLM config.json dict. bos/eos default to the synthetic
    tokenizer's <|begin_of_text|> / <|end_of_text|> for this vocab size."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rope_theta": theta,
        "rms_norm_eps": eps,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": synthetic_bos(vocab) if bos is None else bos,
        "eos_token_id": synthetic_bos(vocab) + 1 if eos is None else eos,
        "torch_dtype": "float32",
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    return cfg


def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# ----------------------------------------------------------------------------
# Weights


def hf_shapes(cfg):
    """{HF tensor name: shape} of a Llama checkpoint with this config."""
    dim, hid, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = head_dim_of(cfg)
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, dim), "model.norm.weight": (dim,)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (q, dim), p + "self_attn.k_proj.weight": (kv, dim),
                       p + "self_attn.v_proj.weight": (kv, dim), p + "self_attn.o_proj.weight": (dim, q),
                       p + "mlp.gate_proj.weight": (hid, dim), p + "mlp.up_proj.weight": (hid, dim),
                       p + "mlp.down_proj.weight": (dim, hid)})
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, dim)
    return shapes


def random_weights(cfg, seed, exact=False, std=0.05):
    """{name: float32 array}. Matrices ~ N(0, std), norm gains ~ 1 + noise.
    exact=True puts every value on a grid (k/1024 with |k| < 256, gains
    1 + k/128) that F32, BF16 and F16 all represent exactly, so the three
    dtypes must export to identical bytes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            x = 1 + 0.1 * rng.standard_normal(shape)
            if exact:
                x = 1 + np.clip(np.round((x - 1) * 128), -12, 12) / 128
        else:
            x = std * rng.standard_normal(shape)
            if exact:
                x = np.clip(np.round(x * 1024), -255, 255) / 1024
        out[name] = x.astype(np.float32)
    return out


# ----------------------------------------------------------------------------
# safetensors


def to_dtype_bytes(x, dtype):
    """Little-endian bytes of float32 array x stored as F32, F16 or BF16
    (BF16: round to nearest even, keep the high 16 bits)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype("<u2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors, dtype="F32", seed=0):
    """Writes {name: float32 array} as one .safetensors file. The data blocks
    are stored in a shuffled order, unlike the header's key order, so a reader
    that assumes file order fails."""
    names = list(tensors)
    order = np.random.default_rng(seed).permutation(len(names))
    blobs, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    for i in order:
        name = names[i]
        blob = to_dtype_bytes(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header = {k: header[k] for k in ["__metadata__"] + names}  # header lists them in the original order
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def write_hf_dir(path, cfg, weights, dtype="F32", shards=1, tokenizer="synthetic"):
    """A Hugging Face model directory. tokenizer: "synthetic" (fits
    cfg["vocab_size"]), "llama3" (the real one: path of its tokenizer.json in
    ../shared, vocab 128256), a dict, or None (no tokenizer.json)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), weights, dtype)
    else:
        names = list(weights)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s::shards]}  # interleaved: layers span files
            write_safetensors(os.path.join(path, fname), part, dtype, seed=s)
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is None:
        return
    dest = os.path.join(path, "tokenizer.json")
    if isinstance(tokenizer, str) and tokenizer != "synthetic":
        shutil.copyfile(tokenizer, dest)
        return
    tok = synthetic_tokenizer(cfg["vocab_size"]) if tokenizer == "synthetic" else tokenizer
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)


# ----------------------------------------------------------------------------
# A small byte-level BPE tokenizer.json


def byte_chars():
    """GPT-2's byte-level alphabet, {byte: character}: printable Latin-1
    bytes stand for themselves, the other 68 get U+0100.. in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + n)
            n += 1
    return out


# Merges in rank order; each result gets id 256 + rank and every part exists before it.
# "Ġ" is the byte-level character of the space.
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
          ("Ġ", "s"), ("in", "g"), ("n", "d"), ("Ġa", "nd"), ("Ġ", "w"), ("e", "d"), ("o", "u")]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def synthetic_bos(vocab_size):
    return 256 + len(MERGES)


def synthetic_tokenizer(vocab_size):
    """tokenizer.json dict: 256 byte tokens, len(MERGES) merges, then special
    tokens (<|begin_of_text|> ... <|eot_id|>, reserved ones) up to vocab_size."""
    first_special = 256 + len(MERGES)
    assert vocab_size >= first_special + len(SPECIALS), vocab_size
    chars = byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for rank, (a, b) in enumerate(MERGES):
        assert a in vocab and b in vocab and a + b not in vocab
        vocab[a + b] = 256 + rank
    names = SPECIALS + [f"<|reserved_special_token_{k}|>" for k in range(vocab_size - first_special - len(SPECIALS))]
    added = [{"id": first_special + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, s in enumerate(names)]
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": [f"{a} {b}" for a, b in MERGES]},
    }
