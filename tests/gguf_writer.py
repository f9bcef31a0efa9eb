"""gguf_writer.py - writes GGUF files for the tests, from the specification
(llama.cpp docs/gguf.md), independently of export/gguf.py:

  header      uint32 "GGUF", uint32 version, uint64 n_tensors, uint64 n_kv
  metadata    n_kv x (string key, uint32 type, value); string = uint64 length + bytes;
              array = uint32 element type, uint64 count, elements
  tensor info n_tensors x (string name, uint32 n_dims, uint64 dims[] (fastest first),
              uint32 ggml type, uint64 offset from the data section)
  padding to the alignment (general.alignment, default 32), then the data,
  each tensor at a multiple of the alignment.

and what llama.cpp's convert_hf_to_gguf.py puts in one for a Llama: the
llama.* hyperparameters, the tokenizer.ggml.* arrays, the tensors renamed,
attn_q / attn_k rows permuted from HF's rotate_half order back to Meta's
adjacent pairs, Llama 3.1 RoPE scaling as a rope_freqs tensor.

  meta, tensors = hf_to_gguf(cfg, hf_weights, "Q8_0", tokenizer=llama3_tokenizer(path))
  write_gguf(path, meta, tensors)
"""
import json
import math
import struct

import numpy as np

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
          UINT64: "Q", INT64: "q", FLOAT64: "d"}
# ggml types
GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


# ----------------------------------------------------------------------------
# The container


def gguf_string(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype, value):
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        etype, values = value
        out = [struct.pack("<IQ", etype, len(values))]
        if etype in SCALAR:
            out.append(struct.pack(f"<{len(values)}{SCALAR[etype]}", *values))
        else:
            out += [gguf_value(etype, v) for v in values]
        return b"".join(out)
    return struct.pack("<" + SCALAR[vtype], value)


def write_gguf(path, meta, tensors, version=3, alignment=None):
    """meta: [(key, type, value)]; tensors: [(name, type name, shape (rows, cols)
    or (n,), raw bytes)]. alignment: written as general.alignment when given."""
    align = alignment or 32
    if alignment is not None:
        meta = list(meta) + [("general.alignment", UINT32, alignment)]
    head = [struct.pack("<4sIQQ", b"GGUF", version, len(tensors), len(meta))]
    marks = {"kv": [], "tensor_info": [], "tensor": []}  # byte positions, for corrupting tests
    pos = 24
    for k, t, v in meta:
        entry = gguf_string(k) + struct.pack("<I", t) + gguf_value(t, v)
        key_end = pos + 8 + len(k.encode("utf-8"))
        marks["kv"].append({"key": k, "start": pos, "type": key_end, "value": key_end + 4})
        head.append(entry)
        pos += len(entry)
    offset, data = 0, []
    for name, tname, shape, raw in tensors:
        dims = list(reversed(shape))
        info = (gguf_string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
                + struct.pack("<IQ", GGML[tname], offset))
        n_dims_at = pos + 8 + len(name.encode("utf-8"))
        marks["tensor_info"].append({"name": name, "start": pos, "n_dims": n_dims_at, "dims": n_dims_at + 4,
                                     "type": n_dims_at + 4 + 8 * len(dims), "offset": n_dims_at + 8 + 8 * len(dims)})
        head.append(info)
        pos += len(info)
        marks["tensor"].append({"name": name, "offset": offset, "bytes": len(raw)})
        pad = -len(raw) % align
        data.append(raw + bytes(pad))
        offset += len(raw) + pad
    marks["infos_end"] = pos
    head = b"".join(head)
    head += bytes(-len(head) % align)
    marks["data_start"] = len(head)
    for t in marks["tensor"]:
        t["start"] = len(head) + t["offset"]
    with open(path, "wb") as f:
        f.write(head)
        f.write(b"".join(data))
    return marks


# ----------------------------------------------------------------------------
# Tensor types (quantizers: the reference rules, rows of whole blocks)


def f16_bytes(d):
    return np.asarray(d, dtype="<f2").tobytes()


def encode(x, tname, q8_rule="model.h"):
    """float32 array (rows, cols) or (n,) -> bytes of ggml type tname."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if tname == "F32":
        return x.astype("<f4").tobytes()
    if tname == "F16":
        return x.astype("<f2").tobytes()
    if tname == "BF16":  # round to nearest even, keep the high half
        u = x.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    groups = x.reshape(-1, 32)
    if tname == "Q8_0":
        amax = np.abs(groups).max(axis=1)
        if q8_rule == "model.h":  # model.h: scale = float16(max|x| / 127), q = rint(x / scale)
            d = (amax / np.float32(127)).astype(np.float16)
            s = d.astype(np.float32)[:, None]
            q = np.where(s > 0, np.clip(np.rint(groups / np.where(s > 0, s, 1)), -127, 127), 0)
        else:  # ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x * (1 / d)), half away from 0
            d32 = amax / np.float32(127)
            inv = np.where(d32 > 0, np.float32(1) / np.where(d32 > 0, d32, 1), 0).astype(np.float32)[:, None]
            y = groups * inv
            q = np.sign(y) * np.floor(np.abs(y) + np.float32(0.5))
            d = d32.astype(np.float16)
        blocks = np.concatenate([d.astype("<f2")[:, None].view(np.uint8),
                                 q.astype(np.int8).view(np.uint8)], axis=1)
        return blocks.tobytes()
    if tname == "Q4_0":  # ggml's quantize_row_q4_0_ref: d = (signed max) / -8, q = min(15, trunc(x / d + 8.5))
        idx = np.abs(groups).argmax(axis=1)
        mx = groups[np.arange(len(groups)), idx]
        d32 = mx / np.float32(-8)
        inv = np.where(d32 != 0, np.float32(1) / np.where(d32 != 0, d32, 1), 0).astype(np.float32)[:, None]
        q = np.minimum(15, np.trunc(groups * inv + np.float32(8.5))).astype(np.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)
        blocks = np.concatenate([d32.astype("<f2")[:, None].view(np.uint8), packed], axis=1)
        return blocks.tobytes()
    raise ValueError(tname)


# ----------------------------------------------------------------------------
# Hugging Face Llama -> GGUF, as convert_hf_to_gguf.py lays it out


def permute_to_meta(w, n_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: within each head, HF row
    j * head_dim/2 + i (rotate_half pair (i, i + head_dim/2)) goes back to
    row 2i + j (adjacent pair (2i, 2i+1))."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama3_rope_freqs(cfg):
    """The per-frequency factors convert_hf_to_gguf.py writes as rope_freqs
    for rope_type llama3 (in float32, as it computes them with torch)."""
    rs = cfg["rope_scaling"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = np.float32(cfg.get("rope_theta", 10000.0))
    freqs = np.float32(1) / base ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))
    factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_to_gguf(cfg, W, mat_type="F32", tokenizer=None, q8_rule="model.h", types=None):
    """(meta, tensors) of the GGUF convert_hf_to_gguf.py would write (then
    quantized to mat_type) for a HF config dict and {HF name: float32 array}.
    Norms stay F32; types overrides the type per GGUF name."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    meta = [("general.architecture", STRING, "llama"), ("general.name", STRING, "test model"),
            ("llama.block_count", UINT32, cfg["num_hidden_layers"]),
            ("llama.context_length", UINT32, cfg["max_position_embeddings"]),
            ("llama.embedding_length", UINT32, cfg["hidden_size"]),
            ("llama.feed_forward_length", UINT32, cfg["intermediate_size"]),
            ("llama.attention.head_count", UINT32, nh), ("llama.attention.head_count_kv", UINT32, nkv),
            ("llama.rope.freq_base", FLOAT32, cfg.get("rope_theta", 10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", FLOAT32, cfg.get("rms_norm_eps", 1e-6)),
            ("llama.rope.dimension_count", UINT32, hd), ("llama.vocab_size", UINT32, cfg["vocab_size"]),
            ("general.file_type", UINT32, 0)]
    if cfg.get("head_dim"):
        meta += [("llama.attention.key_length", UINT32, hd), ("llama.attention.value_length", UINT32, hd)]
    meta += tokenizer or []
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
                 "mlp.up_proj": "ffn_up"}
    tensors = []
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        f = llama3_rope_freqs(cfg)
        tensors.append(("rope_freqs.weight", "F32", f.shape, encode(f, "F32")))
    for hname, x in W.items():
        if hname == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if hname in names:
            gname = names[hname]
        else:
            _, _, l, *rest = hname.split(".")
            gname = f"blk.{l}.{per_layer['.'.join(rest[:-1])]}.weight"
        if gname.endswith("attn_q.weight"):
            x = permute_to_meta(x, nh)
        elif gname.endswith("attn_k.weight"):
            x = permute_to_meta(x, nkv)
        tname = (types or {}).get(gname, "F32" if x.ndim == 1 else mat_type)
        tensors.append((gname, tname, x.shape, encode(x, tname, q8_rule)))
    return meta, tensors


# ----------------------------------------------------------------------------
# Tokenizers in the metadata


def llama3_tokenizer(tokenizer_json, bos=128000, eos=128001, eot=128009):
    """tokenizer.ggml.* of a Llama 3 GGUF from its tokenizer.json (path or
    dict): model gpt2, pre llama-bpe, tokens by id, token_type (1 normal,
    3 control for the added special tokens), merges, bos/eos/eot ids."""
    if isinstance(tokenizer_json, dict):
        tj = tokenizer_json
    else:
        with open(tokenizer_json, encoding="utf-8") as f:
            tj = json.load(f)
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for a in tj["added_tokens"]:
        by_id[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] else 4
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    ttypes = [types.get(i, 5) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "llama-bpe"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)), ("tokenizer.ggml.token_type", ARRAY, (INT32, ttypes)),
            ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
            ("tokenizer.ggml.bos_token_id", UINT32, bos), ("tokenizer.ggml.eos_token_id", UINT32, eos),
            ("tokenizer.ggml.add_bos_token", BOOL, True)] + ([("tokenizer.ggml.eot_token_id", UINT32, eot)]
                                                             if eot is not None else [])


def sentencepiece_tokenizer(tokenizer_bin_path, vocab_size):
    """tokenizer.ggml.* (model llama) from a llama2.c tokenizer.bin, undoing
    llama2.c's export: spaces back to U+2581, "\\n<s>\\n" / "\\n</s>\\n" back to
    <s> / </s>; types: 2 unknown (id 0), 3 control (1, 2), 6 byte (<0xXX>), 1 normal."""
    with open(tokenizer_bin_path, "rb") as f:
        data = f.read()
    pos, tokens, scores, types = 4, [], [], []
    for i in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        text = data[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        text = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}.get(text, text.replace(" ", "\u2581"))
        tokens.append(text)
        scores.append(score)
        types.append(2 if i == 0 else 3 if i in (1, 2) else
                     6 if len(text) == 6 and text.startswith("<0x") and text.endswith(">") else 1)
    return [("tokenizer.ggml.model", STRING, "llama"), ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.scores", ARRAY, (FLOAT32, scores)), ("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
            ("tokenizer.ggml.bos_token_id", UINT32, 1), ("tokenizer.ggml.eos_token_id", UINT32, 2),
            ("tokenizer.ggml.unknown_token_id", UINT32, 0)]
