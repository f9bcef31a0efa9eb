#!/usr/bin/env python3
"""export.py - writes a checkpoint in the format of model.h (one file: header,
tokenizer section, weights; every tensor 64-byte aligned).

Four sources:

  python3 export/export.py OUT.bin --hf HF_DIR [--dtype f32|q8_0|q4_0] [--embedding-dtype T]
      A Hugging Face Llama 3.x directory: config.json, model.safetensors (or
      shards listed in model.safetensors.index.json) and tokenizer.json.
  python3 export/export.py OUT.bin --gguf MODEL.gguf [--dtype f32|q8_0]
      A llama.cpp GGUF file of a Llama (versions 2 and 3; gguf.py reads it):
      the hyperparameters, tokenizer and RoPE scaling come from the file.
      Q8_0 tensors are repacked into q8_0 bit for bit; the others (F32, F16,
      BF16, Q4_0, Q4_K, Q5_K, Q6_K) dequantized as llama.cpp does, then
      written as --dtype (default q8_0 for a quantized file, else f32).
  python3 export/export.py OUT.bin --llama2c MODEL.bin --tokenizer TOK.bin
      A legacy llama2.c checkpoint and its tokenizer.bin. Needs no numpy
      (unless --dtype q8_0 or q4_0).
  python3 export/export.py OUT.bin --random [--preset llama3.2-1b] [--dim N ...]
      Random weights of any shape, e.g. the Llama-3.2-1B shape for benchmarks.

Any source, with --kv-heads K: the file gets K key/value heads instead of the
checkpoint's n_kv_heads, converted exactly as the engine's --kv-heads does it
at load time (run.c, regroup_matrix), so a converted checkpoint can be shared:
  K < n_kv_heads  each new KV head is the mean of n_kv_heads / K adjacent old
                  ones (rows of wk and wv; the GQA paper's mean-pooling, with
                  no uptraining, so the model changes);
  K > n_kv_heads  (a multiple of n_kv_heads dividing n_heads) each KV head is
                  repeated K / n_kv_heads times: the same outputs, a bigger cache.
Pooling is done in f32 before any q8_0 quantization. Needs numpy.

Any source, with --mla N: the file gets multi-head latent attention (model.h)
caching N numbers per token and layer instead of 2 x n_kv_heads x head_dim:
  --mla full      (N = 2 x n_kv_heads x head_dim) exact: same outputs;
  --mla N --calib TEXT.txt [--mla-rope-dim R]   a smaller cache, fitted to
                  the source model's activations on TEXT (TransMLA-style; see
                  "Multi-head latent attention" below). Needs numpy, and ./run
                  built (it tokenizes TEXT).
--random --kv-latent-dim N --kv-rope-dim R writes random MLA weights directly.

The file is written to OUT.bin.tmp and renamed at the end, so a failed export
never leaves a half-written model. Anything this script does not understand is
refused with a one-line "error: ..." and exit status 1; it never guesses.

Layout written (see model.h for the authoritative description):
  [0, 256)            header (struct ModelHeader)
  [256, ...)          tokenizer section (built by tokenizer_section.py)
  weights_offset ...  token_embedding, per layer: attn_norm wq wk wv wo
                      ffn_norm w1 w2 w3, final_norm, [classifier]
Matrices are (out_features, in_features), row-major. The RoPE convention is
adjacent pairs (2i, 2i+1), so Hugging Face's rotate_half row order of wq/wk
is undone here, once. With --dtype q8_0 (format version 3) each matrix row is
stored as blocks of up to 32 groups of 32 values, a block being its int8
values (interleaved 4 at a time across chunks of 16 groups) then its float16
scales (scale = max|x| / 127 rounded to float16; an export whose scale would
overflow float16 is refused); rows follow each other with no padding,
cols * 17 / 16 bytes each. With --dtype q4_0 the same groups hold 4-bit
values (q in [-8, 7], GGML's Q4_0; the scale chosen by a small search,
quantize_q4_0), two of q8_0's interleaved rows per byte row, 18 bytes a group;
the token embedding and classifier stay q8_0 unless --embedding-dtype says
otherwise. A row whose length is not a multiple of 32 ends with a short group,
zero-padded. Norm vectors stay f32. The layout is kept apart from the rounding:
q8_0_rows(q, scale) and q4_0_rows(q, scale) take integer values and float16
scales (a GGUF Q8_0 / Q4_0 tensor repacks through them bit-exactly).
"""
import argparse
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field, replace

np = None  # numpy, imported on demand by need_numpy(): --llama2c runs without it

# ----------------------------------------------------------------------------
# The format (mirrors model.h)

MODEL_MAGIC = 0x4B43334C  # "L3CK" as a little-endian uint32
MODEL_VERSION = 4  # 4: attention kind, MLA sizes, embedding dtype; 3: q8_0 values interleaved in a block; 2: blocks with float16 scales; 1: values, then f32 scales
MODEL_HEADER_BYTES = 256
MODEL_ALIGN = 64
MODEL_MAX_STOP_IDS = 8
DTYPE_F32, DTYPE_Q8_0, DTYPE_Q4_0 = 0, 1, 2
DTYPE_NAMES = {"f32": DTYPE_F32, "q8_0": DTYPE_Q8_0, "q4_0": DTYPE_Q4_0}
DTYPE_LABELS = {v: k for k, v in DTYPE_NAMES.items()}
ATTENTION_GQA, ATTENTION_MLA = 0, 1
ROPE_SCALING_NONE, ROPE_SCALING_LLAMA3 = 0, 1
TOKENIZER_LLAMA2C, TOKENIZER_LLAMA3 = 1, 2
Q8_0_GROUP_SIZE = 32    # values per scale
Q8_0_BLOCK_GROUPS = 32  # groups per block of a q8_0 row (a row's last block may have fewer)
Q8_0_CHUNK_GROUPS = 16  # groups whose values are interleaved together in a block
# q4_0 (the same groups, blocks and chunks; value = q * d, q in [-8, 7], stored as q + 8 in 4 bits)
Q4_0_DIVISORS = (-8.0, -7.5, -7.0, 7.0, 7.5)  # candidate scales d = m / c, m the group's value of largest |x|

# struct ModelHeader, field by field (176 bytes, then zero padding to 256)
HEADER_FORMAT = (
    "<II"   # magic, version
    "8i"    # dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, max_seq_len
    "f"     # rope_theta
    "i"     # rope_scaling
    "3f"    # rope_factor, rope_low_freq_factor, rope_high_freq_factor
    "i"     # rope_original_max_pos
    "f"     # norm_eps
    "4i"    # tied_classifier, dtype, group_size, bos_id
    "i8i"   # n_stop_ids, stop_ids[8]
    "2i"    # tokenizer_kind, reserved
    "4Q"    # tokenizer_offset, tokenizer_bytes, weights_offset, file_bytes
    "4i"    # attention, kv_latent_dim, kv_rope_dim, embedding_dtype (version 4)
)
assert struct.calcsize(HEADER_FORMAT) == 176


class ExportError(Exception):
    """A refusal: printed as one 'error: ...' line, exit status 1."""


@dataclass
class Config:
    """The model-describing header fields (everything but offsets and dtype)."""
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    tied_classifier: bool
    rope_scaling: int = ROPE_SCALING_NONE
    rope_factor: float = 0.0            # the four rope_* below: Llama 3.1 scaling only
    rope_low_freq_factor: float = 0.0
    rope_high_freq_factor: float = 0.0
    rope_original_max_pos: int = 0
    bos_id: int = -1
    stop_ids: list = field(default_factory=list)
    tokenizer_kind: int = 0
    attention: int = ATTENTION_GQA      # ATTENTION_MLA: n_kv_heads is 1 and the two sizes below are set
    kv_latent_dim: int = 0
    kv_rope_dim: int = 0


def validate_config(c):
    """Checks every field the engine relies on, by name."""
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                 "head_dim", "vocab_size", "max_seq_len"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ExportError(f"{name} must be a positive integer, got {value!r}")
        if value >= 2**31:
            raise ExportError(f"{name} = {value} does not fit the header's int32")
    if c.n_heads % c.n_kv_heads:
        raise ExportError(f"n_heads ({c.n_heads}) must be a multiple of n_kv_heads ({c.n_kv_heads})")
    if c.head_dim % 2:
        raise ExportError(f"head_dim must be even for RoPE, got {c.head_dim}")
    if c.attention == ATTENTION_MLA and not (c.n_kv_heads == 1 and 1 <= c.kv_latent_dim <= 1 << 16
                                             and 2 <= c.kv_rope_dim <= 1 << 12 and c.kv_rope_dim % 2 == 0):
        raise ExportError(f"an MLA model needs n_kv_heads 1, kv_latent_dim in [1, 65536] and an even kv_rope_dim "
                          f"in [2, 4096]; got {c.n_kv_heads}, {c.kv_latent_dim}, {c.kv_rope_dim}")
    if not c.rope_theta > 0 or not c.norm_eps > 0:
        raise ExportError(f"rope_theta ({c.rope_theta}) and norm_eps ({c.norm_eps}) must be positive")
    if c.rope_scaling == ROPE_SCALING_LLAMA3:
        if not (c.rope_factor > 0 and c.rope_low_freq_factor > 0 and c.rope_original_max_pos > 0
                and c.rope_high_freq_factor > c.rope_low_freq_factor):
            raise ExportError("llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 "
                              "and high_freq_factor > low_freq_factor > 0")
    if len(c.stop_ids) > MODEL_MAX_STOP_IDS:
        raise ExportError(f"{len(c.stop_ids)} stop ids, the format holds at most {MODEL_MAX_STOP_IDS}")
    for i in [c.bos_id] * (c.bos_id != -1) + list(c.stop_ids):
        if not isinstance(i, int) or not 0 <= i < c.vocab_size:
            raise ExportError(f"special token id {i} is outside the vocabulary (0..{c.vocab_size - 1})")


def tensor_plan(c):
    """[(name, shape)] of every tensor, in file order. 1-D shapes are norms
    (always f32), 2-D shapes are matrices (out_features, in_features)."""
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    plan = [("token_embedding", (c.vocab_size, c.dim))]
    dc, dr = c.kv_latent_dim, c.kv_rope_dim
    for l in range(c.n_layers):
        p = f"layers.{l}."
        if c.attention == ATTENTION_MLA:
            attention = [(p + "rope_pairs", (dr // 2,)),            # int32
                         (p + "wq", (q_dim, c.dim)),                 # q_C
                         (p + "wq_rope", (c.n_heads * dr, c.dim)),   # q_R
                         (p + "wkv_a", (dc + dr, c.dim)),            # W_DKV; W_KR
                         (p + "wk_b", (c.n_heads * dc, c.head_dim)), # W_UK_h^T, per head
                         (p + "wv_b", (q_dim, dc))]                  # W_UV_h, per head
        else:
            attention = [(p + "wq", (q_dim, c.dim)), (p + "wk", (kv_dim, c.dim)), (p + "wv", (kv_dim, c.dim))]
        plan += [(p + "attn_norm", (c.dim,))] + attention + [
                 (p + "wo", (c.dim, q_dim)),
                 (p + "ffn_norm", (c.dim,)),
                 (p + "w1", (c.hidden_dim, c.dim)),   # gate
                 (p + "w2", (c.dim, c.hidden_dim)),   # down
                 (p + "w3", (c.hidden_dim, c.dim))]   # up
    plan.append(("final_norm", (c.dim,)))
    if not c.tied_classifier:
        plan.append(("classifier", (c.vocab_size, c.dim)))
    return plan


def need_numpy(why):
    global np
    if np is None:
        try:
            import numpy
        except ImportError:
            raise ExportError(f"numpy is required for {why} (apt-get install python3-numpy)") from None
        np = numpy
    return np


def row_ranges(rows, cols, max_values=1 << 22):
    """Splits `rows` into [r0, r1) blocks of at most ~max_values values (16 MB
    of f32), so that converting a tensor never holds more than one block."""
    step = max(1, max_values // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


# ----------------------------------------------------------------------------
# Reading: safetensors

SAFETENSORS_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


class SafetensorsFile:
    """A .safetensors file, mmapped: u64 little-endian header length N, N bytes
    of JSON {name: {dtype, shape, data_offsets: [begin, end)}}, then the data.
    Offsets are relative to the start of the data (8 + N) and the tensors may
    be stored in any order, so each is located by its own offsets."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ExportError(f"{path}: {size} bytes, too short for a safetensors file")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self.mm[:8])
        if n < 2 or 8 + n > size:
            raise ExportError(f"{path}: header length {n} does not fit in the {size}-byte file (corrupt safetensors)")
        try:
            header = json.loads(bytes(self.mm[8:8 + n]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ExportError(f"{path}: header is not valid JSON ({e}) (corrupt safetensors)") from None
        if not isinstance(header, dict):
            raise ExportError(f"{path}: header is not a JSON object (corrupt safetensors)")
        header.pop("__metadata__", None)
        self.data_start, data_bytes = 8 + n, size - 8 - n
        self.tensors = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info, data_bytes)

    def _check_entry(self, name, info, data_bytes):
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ExportError(f"{self.path}: bad header entry for {name} (corrupt safetensors)") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"{self.path}: tensor {name} has dtype {dtype}; "
                              f"supported: {', '.join(SAFETENSORS_DTYPES)}")
        itemsize = SAFETENSORS_DTYPES[dtype][1]
        count = 1
        for d in shape:
            if not isinstance(d, int) or d < 0:
                raise ExportError(f"{self.path}: tensor {name} has shape {shape} (corrupt safetensors)")
            count *= d
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes
                and end - begin == count * itemsize):
            raise ExportError(f"{self.path}: tensor {name}: data_offsets [{begin}, {end}) do not hold "
                              f"{shape} {dtype} inside the {data_bytes} data bytes (corrupt safetensors)")
        return dtype, shape, begin

    def to_f32(self, name, r0=None, r1=None):
        """Tensor `name` (rows r0..r1 of it, if given) as a new float32 array.
        bf16 is the top half of a float32, so it widens by a 16-bit shift."""
        need_numpy("reading safetensors")
        dtype, shape, begin = self.tensors[name]
        np_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
        row_values = 1
        for d in shape[1:]:
            row_values *= d
        if r0 is None:
            r0, r1 = 0, (shape[0] if shape else 1)
        raw = np.frombuffer(self.mm, dtype=np_dtype, count=(r1 - r0) * row_values,
                            offset=self.data_start + begin + r0 * row_values * itemsize)
        if dtype == "BF16":
            x = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            x = raw.astype(np.float32)
        return x.reshape([r1 - r0] + shape[1:]) if shape else x


class HFWeights:
    """All tensors of an HF directory: name -> the SafetensorsFile holding it."""

    def __init__(self, hf_dir):
        single = os.path.join(hf_dir, "model.safetensors")
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        self.where = {}
        if os.path.exists(single):
            st = SafetensorsFile(single)
            self.where = {name: st for name in st.tensors}
        elif os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ExportError(f"{index}: no weight_map object")
            shards = {}
            for name, fname in weight_map.items():
                if fname not in shards:
                    shards[fname] = SafetensorsFile(os.path.join(hf_dir, fname))
                if name not in shards[fname].tensors:
                    raise ExportError(f"{index}: maps {name} to {fname}, which does not hold it")
                self.where[name] = shards[fname]
        else:
            raise ExportError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")

    def shape(self, name):
        return self.where[name].tensors[name][1]

    def to_f32(self, name, r0=None, r1=None):
        return self.where[name].to_f32(name, r0, r1)


# ----------------------------------------------------------------------------
# Reading: Hugging Face config.json

def read_json(path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: not found") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def config_from_hf(hc):
    """Config from an HF LlamaConfig dict. Missing optional keys take HF's
    LlamaConfig defaults; anything that would change the math we don't
    implement is refused."""
    arch, model_type = hc.get("architectures"), hc.get("model_type")
    if model_type not in (None, "llama") or arch not in (None, ["LlamaForCausalLM"]) \
            or (arch is None and model_type is None):
        raise ExportError(f"config.json: architectures {arch}, model_type {model_type!r}: "
                          "only LlamaForCausalLM (model_type llama) is supported")
    if hc.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json: hidden_act {hc['hidden_act']!r}, only silu is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key, False):
            raise ExportError(f"config.json: {key} is true; bias tensors are not supported")

    def need(key):
        if key not in hc:
            raise ExportError(f"config.json: missing {key}")
        return hc[key]

    n_heads = need("num_attention_heads")
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ExportError(f"config.json: num_attention_heads {n_heads!r} is not a positive integer")
    c = Config(
        dim=need("hidden_size"),
        hidden_dim=need("intermediate_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hc.get("num_key_value_heads") or n_heads,
        head_dim=hc.get("head_dim") or need("hidden_size") // n_heads,
        vocab_size=need("vocab_size"),
        max_seq_len=hc.get("max_position_embeddings", 2048),
        rope_theta=float(hc.get("rope_theta", 10000.0)),
        norm_eps=float(hc.get("rms_norm_eps", 1e-6)),
        tied_classifier=bool(hc.get("tie_word_embeddings", False)),
        tokenizer_kind=TOKENIZER_LLAMA3)
    rope = hc.get("rope_scaling")
    if "rope_parameters" in hc:  # newer transformers: theta and scaling in one dict
        rope = dict(hc["rope_parameters"] or {})
        c.rope_theta = float(rope.get("rope_theta", c.rope_theta))
    set_rope_scaling(c, rope)
    if hc.get("head_dim") is None and c.dim % n_heads:
        raise ExportError(f"config.json: hidden_size {c.dim} is not a multiple of num_attention_heads {n_heads}")
    c.bos_id = hc.get("bos_token_id")
    c.bos_id = -1 if c.bos_id is None else c.bos_id
    eos = hc.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    # Generation stops at EOS, and at BOS too: a model that starts a new document is done.
    c.stop_ids = unique(eos + ([c.bos_id] if c.bos_id != -1 else []))
    return c


def set_rope_scaling(c, rope):
    """rope_scaling: null (or rope_type "default") or Llama 3.1's "llama3"."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ExportError(f"config.json: rope_scaling {rope!r} is not an object")
    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default") and not {"factor", "low_freq_factor"} & set(rope):
        return
    if kind != "llama3":
        raise ExportError(f"config.json: rope scaling type {kind!r} is not supported (only llama3)")
    try:
        c.rope_scaling = ROPE_SCALING_LLAMA3
        c.rope_factor = float(rope["factor"])
        c.rope_low_freq_factor = float(rope["low_freq_factor"])
        c.rope_high_freq_factor = float(rope["high_freq_factor"])
        c.rope_original_max_pos = int(rope["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"config.json: llama3 rope_scaling: bad or missing {e}") from None


def unique(ids):
    out = []
    for i in ids:
        if i not in out:
            out.append(i)
    return out


def hf_name(name, c):
    """Our tensor name -> (HF tensor name, heads whose rows to un-permute or 0)."""
    if name == "token_embedding":
        return "model.embed_tokens.weight", 0
    if name == "final_norm":
        return "model.norm.weight", 0
    if name == "classifier":
        return "lm_head.weight", 0
    _, l, kind = name.split(".")
    p = f"model.layers.{l}."
    return {
        "attn_norm": (p + "input_layernorm.weight", 0),
        "wq": (p + "self_attn.q_proj.weight", c.n_heads),
        "wk": (p + "self_attn.k_proj.weight", c.n_kv_heads),
        "wv": (p + "self_attn.v_proj.weight", 0),
        "wo": (p + "self_attn.o_proj.weight", 0),
        "ffn_norm": (p + "post_attention_layernorm.weight", 0),
        "w1": (p + "mlp.gate_proj.weight", 0),
        "w2": (p + "mlp.down_proj.weight", 0),
        "w3": (p + "mlp.up_proj.weight", 0),
    }[kind]


def check_hf_tensors(weights, c):
    """Every tensor present with the shape the config implies; nothing
    unexpected (a bias, an extra projection) that we would silently drop."""
    expected = set()
    for name, shape in tensor_plan(c):
        hname, _ = hf_name(name, c)
        expected.add(hname)
        if hname not in weights.where:
            raise ExportError(f"missing tensor {hname}")
        if tuple(weights.shape(hname)) != shape:
            raise ExportError(f"tensor {hname} has shape {weights.shape(hname)}, "
                              f"config.json implies {list(shape)}")
    for hname in sorted(weights.where):
        if hname in expected or hname.endswith("rotary_emb.inv_freq"):
            continue  # inv_freq: a cached buffer in old checkpoints, recomputed by the engine
        if hname == "lm_head.weight" and c.tied_classifier:
            continue  # tied: logits use the embedding; a stored copy is ignored
        if hname.endswith(".bias"):
            raise ExportError(f"bias tensor {hname}: attention/mlp biases are not supported")
        raise ExportError(f"unexpected tensor {hname}: not a plain Llama checkpoint")


# ----------------------------------------------------------------------------
# Reading: legacy llama2.c checkpoints (no numpy needed)

class Llama2cCheckpoint:
    """llama2.c's version-0 file: 7 x int32 (dim, hidden_dim, n_layers,
    n_heads, n_kv_heads, vocab_size, seq_len; vocab_size < 0 means an untied
    classifier), then f32 tensors grouped by kind across layers:
      token_embedding (vocab, dim), rms_att (L, dim), wq (L, dim, dim),
      wk (L, kv_dim, dim), wv (L, kv_dim, dim), wo (L, dim, dim),
      rms_ffn (L, dim), w1 (L, hidden, dim), w2 (L, dim, hidden),
      w3 (L, hidden, dim), rms_final (dim), freq_cis_real (seq_len, head_dim/2),
      freq_cis_imag (same), [wcls (vocab, dim)].
    Its RoPE already rotates adjacent pairs, our convention: no permutation."""

    KINDS = ["token_embedding", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm",
             "w1", "w2", "w3", "final_norm", "freq_cis_real", "freq_cis_imag", "classifier"]

    def __init__(self, path):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 28:
                raise ExportError(f"{path}: {size} bytes, too short for a llama2.c checkpoint")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", self.mm[:28])
        if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0 \
                or dim % n_heads or n_heads % n_kv_heads:
            raise ExportError(f"{path}: implausible llama2.c header {[dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len]}")
        head_dim = dim // n_heads
        self.config = Config(
            dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=abs(vocab), max_seq_len=seq_len,
            rope_theta=10000.0, norm_eps=1e-5, tied_classifier=vocab > 0,
            bos_id=1, stop_ids=[1, 2],  # llama2.c stops when the model emits BOS (1); 2 is EOS
            tokenizer_kind=TOKENIZER_LLAMA2C)
        kv_dim, L, V = n_kv_heads * head_dim, n_layers, abs(vocab)
        per_layer = {"attn_norm": dim, "wq": dim * dim, "wk": kv_dim * dim, "wv": kv_dim * dim,
                     "wo": dim * dim, "ffn_norm": dim, "w1": hidden_dim * dim,
                     "w2": dim * hidden_dim, "w3": hidden_dim * dim}
        counts = {"token_embedding": V * dim, "final_norm": dim,
                  "freq_cis_real": seq_len * head_dim // 2, "freq_cis_imag": seq_len * head_dim // 2,
                  "classifier": 0 if vocab > 0 else V * dim}
        counts.update({k: L * n for k, n in per_layer.items()})
        self.per_layer = per_layer
        self.offset, pos = {}, 28  # byte offset of each kind's block
        for kind in self.KINDS:
            self.offset[kind] = pos
            pos += 4 * counts[kind]
        if pos != size:
            raise ExportError(f"{path}: file is {size} bytes, its header {[dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len]} "
                              f"says {pos}: truncated, or not a llama2.c checkpoint")

    def blocks_of(self, name, shape):
        """Raw little-endian f32 bytes of tensor `name`, in row blocks."""
        if name.startswith("layers."):
            _, l, kind = name.split(".")
            start = self.offset[kind] + 4 * int(l) * self.per_layer[kind]
        else:
            start = self.offset[name]
        cols = shape[-1]
        view = memoryview(self.mm)
        for r0, r1 in row_ranges(shape[0] if len(shape) == 2 else 1, cols):
            yield view[start + 4 * r0 * cols: start + 4 * r1 * cols]


# ----------------------------------------------------------------------------
# Converting

def unpermute_rope_rows(w, n_heads, head_dim):
    """HF -> adjacent-pairs RoPE. HF's conversion script reorders the rows of
    each head of wq/wk from (pair i, element j) -> j * head_dim/2 + i, so that
    rotate_half pairs row i with row i + head_dim/2. Undo it:
    (n_heads*head_dim, dim) -> (n_heads, 2, head_dim/2, dim)
    -> swap the middle axes -> row 2i + j is HF row j*head_dim/2 + i."""
    rows, cols = w.shape
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def pad_groups(x):
    """(rows, cols) -> (rows, groups, 32) float32, a short last group padded with zeros."""
    rows, cols = x.shape
    groups = -(-cols // Q8_0_GROUP_SIZE)
    if cols % Q8_0_GROUP_SIZE:
        x = np.concatenate([x, np.zeros((rows, groups * Q8_0_GROUP_SIZE - cols), np.float32)], axis=1)
    return x.reshape(rows, groups, Q8_0_GROUP_SIZE)


def check_scales(scale16, m, name, row0, dtype, divisor):
    """Refuses a float16 scale that overflowed (or a NaN in the group)."""
    bad = ~np.isfinite(scale16)
    if bad.any():
        r, g = (int(i) for i in np.argwhere(bad)[0])
        if np.isnan(m[r, g]):
            raise ExportError(f"tensor {name}: row {row0 + r} holds a NaN; {dtype} cannot store it")
        raise ExportError(f"tensor {name}: row {row0 + r} holds a value of magnitude {abs(float(m[r, g])):g}, "
                          f"too large for {dtype} (its scale max|x| / {divisor} overflows float16 above "
                          f"|x| ~ {divisor * 65504:.3g}); export it with --dtype f32")


def quantize_q8_0(x, name="tensor", row0=0):
    """(rows, cols) f32 -> int8 q (rows, 32 * groups), float16 scale (rows,
    groups), groups = ceil(cols / 32), as model.h specifies (a short last
    group is padded with zeros, which quantize to q = 0). Per group of 32 values along a row: scale = max|x| /
    127 in float32, rounded to the nearest float16 (ties to even); with s that
    float16 as a float32, q = round(x / s) (x / s in float32, ties to even)
    clamped to [-127, 127]; a group whose s is 0 has q 0. A scale that
    overflows float16 (max|x| >= about 127 x 65520) or a NaN is refused with
    an ExportError naming the tensor (`name`) and the row (`row0` + index)."""
    rows = x.shape[0]
    groups = pad_groups(x)
    amax = np.maximum(groups.max(axis=2), -groups.min(axis=2))  # max|x|, float32 (NaN propagates)
    with np.errstate(over="ignore", invalid="ignore"):
        scale16 = (amax / np.float32(127)).astype(np.float16)  # to nearest even; too big -> inf
    check_scales(scale16, amax, name, row0, "q8_0", 127)
    s = scale16.astype(np.float32)
    y = groups / np.where(s > 0, s, np.float32(1))[:, :, None]  # float32 division
    np.rint(y, out=y)
    np.clip(y, -127, 127, out=y)
    y[s == 0] = 0  # scale 0: q 0, whatever (tiny) values the group held
    return y.astype(np.int8).reshape(rows, -1), scale16


def quantize_q4_0(x, name="tensor", row0=0):
    """(rows, cols) f32 -> int8 q in [-8, 7] (rows, 32 * groups), float16
    scale d (rows, groups): value = q * d, GGML's Q4_0 (which stores q + 8).
    A short last group is padded with zeros. Per group, with m its value of
    largest |x|: GGML takes d = m / -8; here each d = m / c for c in
    Q4_0_DIVISORS is rounded to float16, the group rounded with it (x / d in
    float32, to nearest even, clamped to [-8, 7]), then d refit by least
    squares for those q (sum x q / sum q^2 in float32, rounded to float16);
    the candidate with the smallest squared error (float32) wins, the first
    on a tie. On stories260K's weights this leaves 6.8 % less squared error
    than GGML's rule (and 4 % less than d = m / -8 rounded to nearest). The
    engine's quantize_q4_row (kernels.h, for --kv-heads) runs the same search.
    A d that overflows float16 (|m| above ~5.2e5) or a NaN is refused."""
    rows = x.shape[0]
    groups = pad_groups(x)
    idx = np.abs(groups).argmax(axis=2)
    m = np.take_along_axis(groups, idx[:, :, None], axis=2)[:, :, 0]  # signed value of largest |x|
    with np.errstate(over="ignore", invalid="ignore"):
        check_scales((m / np.float32(-8)).astype(np.float16), m, name, row0, "q4_0", 8)
    best_err = np.full(m.shape, np.inf, np.float32)
    best_q = np.zeros(groups.shape, np.int8)
    best_d = np.zeros(m.shape, np.float16)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for c in Q4_0_DIVISORS:
            d16 = (m / np.float32(c)).astype(np.float16)
            d = d16.astype(np.float32)
            q = np.rint(groups * np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0)[:, :, None])
            np.clip(q, -8, 7, out=q)
            qq = (q * q).sum(axis=2, dtype=np.float32)
            refit = np.where(qq > 0, (groups * q).sum(axis=2, dtype=np.float32) / np.where(qq > 0, qq, 1), 0)
            for cand in (d16, refit.astype(np.float32).astype(np.float16)):
                err = ((groups - q * cand.astype(np.float32)[:, :, None]) ** 2).sum(axis=2, dtype=np.float32)
                better = err < best_err
                best_err[better], best_d[better] = err[better], cand[better]
                best_q[better] = q[better]
    return best_q.reshape(rows, -1), best_d


def interleave_q8_0(qb):
    """The values of one block of g groups, (rows, 32 * g) in group order ->
    the order model.h stores them: chunks of up to 16 groups, a chunk of m
    groups as 8 rows of m x 4 bytes (values 4r .. 4r+3 of each group in turn)."""
    rows, g = qb.shape[0], qb.shape[1] // Q8_0_GROUP_SIZE
    groups = qb.reshape(rows, g, Q8_0_GROUP_SIZE // 4, 4)  # (rows, group, r, 4)
    return np.concatenate([groups[:, c0:c0 + Q8_0_CHUNK_GROUPS].transpose(0, 2, 1, 3).reshape(rows, -1)
                           for c0 in range(0, g, Q8_0_CHUNK_GROUPS)], axis=1)


def pack_q4_0(vb):
    """A block's values interleaved as q8_0's (rows, 32 * g) uint8 in [0, 16)
    -> (rows, 16 * g): in each chunk of m groups, byte k of row r (of 4, each
    4 * m bytes) holds q8_0's row 2r byte k in its low 4 bits and row 2r + 1
    byte k in its high 4 bits."""
    rows, g = vb.shape[0], vb.shape[1] // Q8_0_GROUP_SIZE
    parts = []
    for c0 in range(0, g, Q8_0_CHUNK_GROUPS):
        m = min(Q8_0_CHUNK_GROUPS, g - c0)
        chunk = vb[:, c0 * Q8_0_GROUP_SIZE:(c0 + m) * Q8_0_GROUP_SIZE].reshape(rows, 4, 2, 4 * m)
        parts.append((chunk[:, :, 0] | chunk[:, :, 1] << 4).reshape(rows, -1))
    return np.concatenate(parts, axis=1)


def quantized_rows(q, scale16, bits):
    """Rows of integer values q (rows, 32 * groups) and their float16 scales
    (rows, groups) -> model.h's bytes, a uint8 array: each row cut into
    blocks of up to 32 groups, a block of g groups = its values (interleaved;
    q8_0: 32 * g int8, q4_0: 16 * g bytes of q + 8 in 4 bits), then its g
    little-endian float16 scales."""
    rows, n_groups = scale16.shape
    if q.shape != (rows, n_groups * Q8_0_GROUP_SIZE):
        raise ValueError(f"q {q.shape} does not fit scales {scale16.shape} in groups of {Q8_0_GROUP_SIZE}")
    value_bytes = Q8_0_GROUP_SIZE * bits // 8  # per group
    out = np.empty((rows, n_groups * (value_bytes + 2)), dtype=np.uint8)
    qb = q.view(np.uint8) if bits == 8 else (q.astype(np.int16) + 8).astype(np.uint8)
    sb = scale16.astype("<f2").view(np.uint8)  # (rows, 2 * n_groups)
    pos = 0
    for g0 in range(0, n_groups, Q8_0_BLOCK_GROUPS):
        g1 = min(n_groups, g0 + Q8_0_BLOCK_GROUPS)
        nq, ns = (g1 - g0) * value_bytes, (g1 - g0) * 2
        vb = interleave_q8_0(qb[:, g0 * Q8_0_GROUP_SIZE:g1 * Q8_0_GROUP_SIZE])
        out[:, pos:pos + nq] = vb if bits == 8 else pack_q4_0(vb)
        out[:, pos + nq:pos + nq + ns] = sb[:, 2 * g0:2 * g1]
        pos += nq + ns
    return out


def q8_0_rows(q, scale16):
    """int8 q (rows, 32 * groups) and float16 scale16 (rows, groups) -> the
    q8_0 rows as model.h lays them out, a uint8 array (rows, 34 * groups).
    Takes GGML's Q8_0 blocks as they are (qs = q, d = scale): a GGUF tensor
    is repacked bit-exactly, without requantizing."""
    return quantized_rows(q, scale16, 8)


def q4_0_rows(q, scale16):
    """int8 q in [-8, 7] (rows, 32 * groups) and float16 scale16 (rows,
    groups) -> the q4_0 rows as model.h lays them out, a uint8 array (rows,
    18 * groups). value = q * scale. GGML's Q4_0 block (d, qs[16]) holds
    value j of the group in the low 4 bits of qs[j] and value j + 16 in the
    high 4 bits, as u = q + 8: pass q = u - 8, scale16 = d, and the tensor is
    repacked bit-exactly, without requantizing."""
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("q4_0 values must lie in [-8, 7]")
    return quantized_rows(q, scale16, 4)


def as_f32_rows(block, cols):
    """A block (numpy array or raw f32 bytes) as a (rows, cols) float32 array."""
    if isinstance(block, np.ndarray):
        return block.reshape(-1, cols).astype(np.float32, copy=False)
    if isinstance(block, QuantizedRows):
        return block.to_f32()
    return np.frombuffer(block, dtype="<f4").reshape(-1, cols)


# ----------------------------------------------------------------------------
# Changing the number of KV heads (--kv-heads K), as run.c's regroup_matrix

def valid_kv_heads(c, K):
    """Divisors of n_kv_heads, and multiples of it that divide n_heads."""
    if K <= 0:
        return False
    return c.n_kv_heads % K == 0 if K <= c.n_kv_heads else K % c.n_kv_heads == 0 and c.n_heads % K == 0


def regroup_rows(w, old, K, head_dim):
    """w (old * head_dim, cols) f32 -> (K * head_dim, cols). Pooling sums
    row / group over the group's heads in order, in float32, as run.c does,
    so an f32 export is bit-identical to the engine's --kv-heads."""
    w = np.asarray(w, dtype=np.float32).reshape(old, head_dim, -1)
    if K > old:  # repeat: new head j is old head j // (K / old)
        return np.repeat(w, K // old, axis=0).reshape(K * head_dim, -1)
    group = old // K
    heads = w.reshape(K, group, head_dim, -1)
    acc = np.zeros((K, head_dim, w.shape[2]), dtype=np.float32)
    for i in range(group):
        acc += heads[:, i] / np.float32(group)
    return acc.reshape(K * head_dim, -1)


def apply_kv_heads(c, blocks_of, K):
    """(output config, blocks_of) of the model with K KV heads. The source's
    blocks_of keeps reading with the original config c."""
    if K is None or K == c.n_kv_heads:
        return c, blocks_of
    if not valid_kv_heads(c, K):
        valid = ", ".join(str(k) for k in range(1, c.n_heads + 1) if valid_kv_heads(c, k))
        raise ExportError(f"--kv-heads {K} is not possible for this model ({c.n_heads} query heads, "
                          f"{c.n_kv_heads} KV heads); valid: {valid}")
    need_numpy("--kv-heads")
    src_shape = {name: shape for name, shape in tensor_plan(c)}
    out_c = replace(c, n_kv_heads=K, stop_ids=list(c.stop_ids))

    def regrouped(name, shape):
        if not name.endswith((".wk", ".wv")):
            yield from blocks_of(name, shape)
            return
        rows = [as_f32_rows(b, shape[1]) for b in blocks_of(name, src_shape[name])]
        yield regroup_rows(np.concatenate(rows), c.n_kv_heads, K, c.head_dim)

    return out_c, regrouped


# ----------------------------------------------------------------------------
# Multi-head latent attention (--mla N): a GQA/MHA checkpoint converted into
# an MLA one (model.h) whose cache holds N numbers per token and layer: a
# latent c of kv_latent_dim = N - kv_rope_dim numbers and one RoPE key k_R of
# kv_rope_dim numbers, shared by all query heads.
#
# --mla full (N = 2 x n_kv_heads x head_dim) is exact: k_R is every KV head's
# key (its pair j turning as pair j % (head_dim / 2) of a head), c every KV
# head's value; query head h's RoPE query is its own query placed at its KV
# head's slot (zeros elsewhere), W_UV_h picks its KV head's value out of c, and
# the no-RoPE query part is unused (W_UK = 0).
#
# A smaller N is lossy, TransMLA-style (Meng, Yao and Zhang 2025), from
# calibration activations (--calib TEXT.txt, run in numpy through the layers
# already converted, one layer after the other):
#  1. RoPE turns pair i of every KV head by the same angle, so a real
#     orthogonal mixing U_i of the G heads' pair i (the same G x G matrix on
#     both numbers of the pair) commutes with it; query head h absorbs it
#     (its pair i becomes U_i[g(h), j] q_h,i on mixed component j). U_i is the
#     PCA of the calibration keys' pair i, both numbers together: the energy
#     gathers in the first components.
#  2. The kv_rope_dim / 2 mixed pairs of most energy (over all i and j) keep
#     RoPE: they are k_R, each turning at its own frequency i (rope_pairs).
#  3. The other mixed key pairs give up RoPE (their scores lose the relative
#     angle: the approximation), and with the values compress jointly into the
#     latent: c = P^T [a L_K K_nope; L_V V], P the kv_latent_dim principal
#     directions of those calibration activations, where L_K and L_V weight
#     each by what reads it (L_K^2 the no-RoPE queries' covariance, L_V,g^2 =
#     sum of wo_h^T wo_h over KV head g's query heads) and a balances the two
#     (equal mean energy, times 0.5, 1 or 2: whichever gives the layer's
#     attention output nearest the source's on calibration text). Then K_nope ~ L_K^-1 P_K c / a and V ~ L_V^-1 P_V c,
#     so W_UK_h^T = P_K^T L_K^-1 N_h / a (N_h: query head h's mixed no-RoPE
#     components) and W_UV_h = L_V,g^-1 (P_V's rows of head g = g(h)).
#  4. With the cache's projections W_DKV and W_KR fixed, what reads them is
#     refitted by ridge least squares on the calibration activations
#     (closed form, refit_keys and refit_values): each head's W_UK_h and RoPE
#     query (a map of its own query, so any mix of the mixed pairs' queries)
#     to the source's scores, the error weighted by the source's attention
#     (the second-order term of the KL divergence of the attention rows);
#     then every W_UV_h, jointly through wo, to the source layer's attention
#     output, with the converted layer's own attention weights. The idea of
#     fitting low-rank factors to what the activations make of them rather
#     than to the weights is ASVD's, SVD-LLM's and Palu's. (stories260K
#     --mla 32: perplexity 15.75 -> 14.79 with W_UV refitted, 14.45 with the
#     key side, 13.34 with both; with both, fewer RoPE numbers pay: see
#     parse_mla.)
# The query keeps wq as its no-RoPE part, and the engine's score scale
# 1 / sqrt(head_dim + kv_rope_dim) is turned back into the source's
# 1 / sqrt(head_dim) by the factor sqrt((head_dim + kv_rope_dim) / head_dim)
# on wq_rope and wk_b.

MLA_CALIB_TOKENS = 16384  # calibration tokens used at most (the first ones of the text)


def mla_full_dim(c):
    return 2 * c.n_kv_heads * c.head_dim


def parse_mla(spec, c, kv_heads, calib, rope_dim):
    """(kv_latent_dim, kv_rope_dim, lossless) for --mla spec on source config c, or an ExportError."""
    full = mla_full_dim(c)
    if kv_heads is not None:
        raise ExportError("--mla and --kv-heads cannot be combined: --mla converts the checkpoint's own "
                          f"{c.n_kv_heads} KV heads into one latent")
    if spec == "full":
        n = full
    else:
        try:
            n = int(spec)
        except ValueError:
            n = 0
        if n < 1:
            raise ExportError(f"--mla expects a positive number of cached numbers per token and layer, or full; got {spec!r}")
        if n > full:
            raise ExportError(f"--mla {n} is more than full: this model's full conversion caches 2 x n_kv_heads x "
                              f"head_dim = 2 x {c.n_kv_heads} x {c.head_dim} = {full} numbers per token and layer")
    if n == full and rope_dim is None:
        return full // 2, full // 2, True
    if calib is None:
        raise ExportError(f"--mla {n} is lossy (full is {full}): it needs calibration text, --calib TEXT.txt")
    if rope_dim is None:  # default: 3/8 of N from the keys' width (n_kv_heads x head_dim) up, half below it.
        # Measured on stories260K (keys 32 wide; perplexity on the held-out half of tinystories-valid, with
        # the refits): --mla 48 with 12 / 18 / 24 RoPE numbers 9.96 / 9.46 / 9.96; --mla 32 with 8 / 10 / 12 /
        # 14 / 16: 17.7 / 17.7 / 12.3 / 12.8 / 13.3; --mla 24 with 8 / 12: 24.8 / 21.0; --mla 16 with 6 / 8: 62.7 / 51.2
        share = 3 / 8 if n >= c.n_kv_heads * c.head_dim else 1 / 2
        rope_dim = max(2, min(c.n_kv_heads * c.head_dim, int(n * share / 2 + 0.5) * 2))
    if rope_dim % 2 or not 2 <= rope_dim < n or rope_dim > c.n_kv_heads * c.head_dim:
        raise ExportError(f"--mla-rope-dim {rope_dim} must be even, at least 2, less than N ({n}) and at most "
                          f"n_kv_heads x head_dim ({c.n_kv_heads * c.head_dim})")
    return n - rope_dim, rope_dim, False


def rope_frequencies(c):
    """float32 frequency of each pair i < head_dim / 2, as run.c's rope_frequencies."""
    freqs = []
    for i in range(c.head_dim // 2):
        f = c.rope_theta ** (-2.0 * i / c.head_dim)
        if c.rope_scaling == ROPE_SCALING_LLAMA3:
            wavelen, old = 2 * 3.141592653589793 / f, c.rope_original_max_pos
            if wavelen > old / c.rope_low_freq_factor:
                f /= c.rope_factor
            elif wavelen >= old / c.rope_high_freq_factor:
                smooth = (old / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
                f = (1 - smooth) * f / c.rope_factor + smooth * f
        freqs.append(f)
    return np.asarray(freqs, dtype=np.float64)


def mla_layer_full(c, Wq, Wk, Wv):
    """The exact MLA tensors of one layer (float64) from wq, wk, wv (file convention)."""
    hd, G, H = c.head_dim, c.n_kv_heads, c.n_heads
    kv, mul, dim = G * hd, H // G, c.dim
    s = np.sqrt((hd + kv) / hd)
    wq_rope = np.zeros((H, kv, dim))
    wv_b = np.zeros((H, hd, kv))
    for h in range(H):
        g = h // mul
        wq_rope[h, g * hd:(g + 1) * hd] = Wq[h * hd:(h + 1) * hd] * s
        wv_b[h, :, g * hd:(g + 1) * hd] = np.eye(hd)
    return {"rope_pairs": np.arange(kv // 2, dtype=np.int32) % (hd // 2), "wq": np.zeros((H * hd, dim)),
            "wq_rope": wq_rope.reshape(H * kv, dim), "wkv_a": np.concatenate([Wv, Wk]),
            "wk_b": np.zeros((H * kv, hd)), "wv_b": wv_b.reshape(H * hd, kv)}


def top_eigenvectors(cov, k):
    """(eigenvalues, eigenvectors as columns) of a symmetric matrix, largest first, k of them."""
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:k]
    return w[order], v[:, order]


def sym_power(M, power, ridge=1e-6):
    """M^power of a symmetric positive semi-definite matrix, its eigenvalues
    floored at ridge x their mean (so that power -1/2 exists)."""
    w, v = np.linalg.eigh(M)
    w = np.maximum(w, ridge * max(np.mean(w), 1e-30))
    return (v * w ** power) @ v.T


def mla_layer_lossy(c, Wq, Wk, Wv, Wo, X, dc, dr, balance=1.0):
    """The MLA tensors of one layer (float64), TransMLA-style, from the layer's
    calibration inputs X (tokens, dim): the attention block's normed input.
    balance scales the keys' weight in the latent's PCA (1: equal energy)."""
    hd, G, H, P = c.head_dim, c.n_kv_heads, c.n_heads, c.head_dim // 2
    mul = H // G
    s = np.sqrt((hd + dr) / hd)
    Wk_pairs = Wk.reshape(G, P, 2, -1)                      # (head g, pair i, number e, dim)
    K = (X @ Wk.T).reshape(len(X), G, P, 2)                  # calibration keys, before RoPE
    U, energy = np.zeros((P, G, G)), np.zeros((P, G))       # per pair: the mixing, and each component's energy
    for i in range(P):
        energy[i], U[i] = top_eigenvectors(np.einsum("ngE,nhE->gh", K[:, :, i], K[:, :, i]), G)
    # (Ranking the components by key energy x the energy of the queries that read them instead
    # was worse: stories260K --mla 64 with 16 RoPE numbers, perplexity 9.19 -> 12.6.)
    ranked = sorted(((energy[i, j], i, j) for i in range(P) for j in range(G)), reverse=True)
    rope = sorted((i, j) for _, i, j in ranked[:dr // 2])   # the mixed pairs that keep RoPE, by frequency
    nope = sorted((i, j) for _, i, j in ranked[dr // 2:])
    mixed = lambda i, j: np.einsum("g,ged->ed", U[i][:, j], Wk_pairs[:, i])  # (2, dim): key rows of component (i, j)

    W_kr = np.concatenate([mixed(i, j) for i, j in rope]) if rope else np.zeros((0, c.dim))
    wq_rope = np.zeros((H, dr, c.dim))
    for h in range(H):
        g, Wq_pairs = h // mul, Wq[h * hd:(h + 1) * hd].reshape(P, 2, -1)
        for r, (i, j) in enumerate(rope):
            wq_rope[h, 2 * r:2 * r + 2] = U[i][g, j] * Wq_pairs[i] * s

    # The latent: PCA of the no-RoPE keys and the values, each weighted by what
    # reads it: a key error e costs (q . e)^2, so keys are weighted by the
    # square root of the queries' covariance M_K; a value error e of KV head g
    # costs |wo_h e|^2 summed over its query heads h, weight M_V,g^(1/2).
    # (stories260K --mla 32, 16 RoPE numbers: perplexity 18.5 unweighted -> 15.6;
    # a = 1/2 or 2 x the energy balance: 14.7, 18.7; --mla 16: 67 -> 70, 72.)
    Dk = 2 * len(nope)
    Ns = np.zeros((H, Dk, hd))                               # query head h's mixed no-RoPE components
    for h in range(H):
        for r, (i, j) in enumerate(nope):
            Ns[h, 2 * r, 2 * i] = Ns[h, 2 * r + 1, 2 * i + 1] = U[i][h // mul, j]
    Wk_nope = np.concatenate([mixed(i, j) for i, j in nope]) if nope else np.zeros((0, c.dim))
    M_K = np.zeros((Dk, Dk))
    for h in range(H):
        Qh = X @ Wq[h * hd:(h + 1) * hd].T @ Ns[h].T         # (tokens, Dk)
        M_K += Qh.T @ Qh / len(X)
    M_V = [sum(Wo[:, h * hd:(h + 1) * hd].T @ Wo[:, h * hd:(h + 1) * hd] for h in range(g * mul, (g + 1) * mul))
           for g in range(G)]
    Lk, Lk_inv = (sym_power(M_K, 0.5), sym_power(M_K, -0.5)) if Dk else (np.zeros((0, 0)),) * 2
    Lv = [sym_power(M, 0.5) for M in M_V]
    Lv_inv = [sym_power(M, -0.5) for M in M_V]
    Wk_w = Lk @ Wk_nope                                      # weighted key rows (Dk, dim)
    Wv_w = np.concatenate([Lv[g] @ Wv[g * hd:(g + 1) * hd] for g in range(G)])
    Kn, V = X @ Wk_w.T, X @ Wv_w.T
    ek, ev = np.mean(np.sum(Kn * Kn, 1)), np.mean(np.sum(V * V, 1))
    a = (np.sqrt(ev / ek) if ek > 0 and ev > 0 else 1.0) * balance
    Z = np.concatenate([a * Kn, V], axis=1)
    _, Pc = top_eigenvectors(Z.T @ Z, dc)                   # (Dk + G * hd, dc)
    Pk, Pv = Pc[:Dk], Pc[Dk:]
    W_dkv = Pc.T @ np.concatenate([a * Wk_w, Wv_w])

    wk_b = np.zeros((H, dc, hd))
    wv_b = np.zeros((H, hd, dc))
    for h in range(H):
        g = h // mul
        wk_b[h] = Pk.T @ Lk_inv @ Ns[h] / a * s              # K_nope ~ Lk^-1 Pk c / a
        wv_b[h] = Lv_inv[g] @ Pv[g * hd:(g + 1) * hd]        # V_g ~ Lv_g^-1 Pv_g c
    return {"rope_pairs": np.asarray([i for i, _ in rope], dtype=np.int32), "wq": Wq,
            "wq_rope": wq_rope.reshape(H * dr, c.dim), "wkv_a": np.concatenate([W_dkv, W_kr]),
            "wk_b": wk_b.reshape(H * dc, hd), "wv_b": wv_b.reshape(H * hd, dc)}


MLA_BALANCES = (0.5, 1.0, 2.0)  # the keys' weights in the latent's PCA tried per layer
MLA_CHECK_WINDOWS = 8           # calibration windows a layer's candidates are compared on
MLA_KEY_WORK = 2e10             # multiply-adds per layer the key refit's weighted sums may take: queries subsampled
                                # beyond (stories260K --mla 32: 2e9 -> 2e10, perplexity 13.05 -> 12.32)
MLA_REFIT_MAX_UNKNOWNS = 4096   # a refit with more unknowns per system: keys kept, values by sweeps over the heads
MLA_VALUE_SWEEPS = 12
MLA_RIDGE = 1e-5                # the refits' ridge, relative to the normal matrix's mean diagonal (stories260K
                                # --mla 32: 1e-2 / 1e-3 / 1e-5 -> perplexity 13.59 / 13.44 / 13.34)


def rope_pairs_turn(x, pos, f):
    """x (T, ..., 2 * len(f)) with pair j of row t turned by the angle pos[t] * f[j] (file convention)."""
    ang = (pos[:, None] * f[None, :]).reshape((len(pos),) + (1,) * (x.ndim - 2) + (len(f),))
    cos, sin = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2], y[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return y


def ridge_solve(G, b, u0, ridge):
    """argmin_u u^T G u - 2 b^T u + ridge * mean(diag G) * |u - u0|^2."""
    lam = ridge * max(float(np.mean(np.diag(G))), 1e-30)
    return np.linalg.solve(G + lam * np.eye(len(G)), b + lam * u0)


def calibrate_layers(c, weights, ids_list, convert):
    """{layer: MLA tensors} converted one layer after the other: layer l by
    convert(l, X), a list of candidate conversions of which the one whose
    attention output (through wo) is nearest the source layer's on the first
    MLA_CHECK_WINDOWS windows is kept, then its key side and values are
    refitted to the source layer (refit_keys, refit_values); X (tokens, dim) float64 the normed input of its attention
    over the token windows in ids_list, from a numpy forward pass in float32
    (file convention: RoPE on adjacent pairs) through the layers before it
    already converted, so that each layer is fitted to the inputs it will
    see (sequential calibration; stories260K on the first 100 KB of the
    held-out half of tinystories-valid: --mla 32 15.6 -> 15.5, --mla 16
    67.1 -> 61.5, against calibrating every layer on the source's inputs)."""
    H, hd, G = c.n_heads, c.head_dim, c.n_kv_heads
    freq = rope_frequencies(c).astype(np.float32)
    weights = {k: v.astype(np.float32) for k, v in weights.items()}

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * w

    def softmax_causal(scores):
        T = scores.shape[-1]
        scores = scores + np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def mla_parts(t, h, pos):  # the converted layer (absorbed): attention (H, T, T), latent (T, dc), rotated k_R (T, dr)
        T, dc, dr = len(h), t["wk_b"].shape[0] // H, t["wq_rope"].shape[0] // H
        f = freq[t["rope_pairs"]]
        kv = h @ t["wkv_a"].T
        lat, kr = kv[:, :dc], rope_pairs_turn(kv[:, dc:], pos, f)
        q = (h @ t["wq"].T).reshape(T, H, 1, hd)
        q_lat = (q @ t["wk_b"].reshape(H, dc, hd).transpose(0, 2, 1))[:, :, 0].transpose(1, 0, 2)  # (H, T, dc)
        q_r = rope_pairs_turn((h @ t["wq_rope"].T).reshape(T, H, dr), pos, f).transpose(1, 0, 2)  # (H, T, dr)
        att = softmax_causal((q_lat @ lat.T + q_r @ kr.T) / np.float32(np.sqrt(hd + dr)))
        return att, lat, kr

    def mla(t, h, pos):  # the converted layer's attention output (T, H * hd)
        att, lat, _ = mla_parts(t, h, pos)
        dc = lat.shape[1]
        return ((att @ lat) @ t["wv_b"].reshape(H, hd, dc).transpose(0, 2, 1)).transpose(1, 0, 2).reshape(len(h), -1)

    def gqa_parts(p, h, pos):  # the source layer: logits (H, T, T), attention (H, T, T), output (T, H, hd)
        T = len(h)
        q = rope_pairs_turn((h @ weights[p + "wq"].T).reshape(T, H, hd), pos, freq)
        k = np.repeat(rope_pairs_turn((h @ weights[p + "wk"].T).reshape(T, G, hd), pos, freq), H // G, axis=1)
        v = np.repeat((h @ weights[p + "wv"].T).reshape(T, G, hd), H // G, axis=1)
        s = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0) / np.float32(np.sqrt(hd))
        att = softmax_causal(s)
        return s, att, (att @ v.transpose(1, 0, 2)).transpose(1, 0, 2)

    def gqa(p, h, pos):
        return gqa_parts(p, h, pos)[2].reshape(len(h), -1)

    f32 = lambda t: {k: (v if v.dtype.kind == "i" else v.astype(np.float32)) for k, v in t.items()}
    xs = [weights["token_embedding"][ids] for ids in ids_list]
    out = {}

    def ffn(p, x):
        g = rmsnorm(x, weights[p + "ffn_norm"])
        a, u = g @ weights[p + "w1"].T, g @ weights[p + "w3"].T
        return x + (a / (1 + np.exp(-a)) * u) @ weights[p + "w2"].T
    for l in range(c.n_layers):
        p = f"layers.{l}."
        hs = [rmsnorm(x, weights[p + "attn_norm"]) for x in xs]
        candidates = convert(l, np.concatenate(hs).astype(np.float64))
        if len(candidates) > 1:
            check = [(h, np.arange(len(h), dtype=np.float32)) for h in hs[:MLA_CHECK_WINDOWS]]
            want = [gqa(p, h, pos) for h, pos in check]
            err = [sum(float(np.sum(((mla(f32(t), h, pos) - w) @ weights[p + "wo"].T) ** 2))
                       for (h, pos), w in zip(check, want)) for t in candidates]
            candidates = [candidates[int(np.argmin(err))]]
        t = candidates[0]
        t = refit_keys(c, t, weights[p + "wq"], hs, freq, lambda h, pos: gqa_parts(p, h, pos)[:2])
        t = refit_values(c, t, weights[p + "wo"], hs, lambda h, pos: mla_parts(f32(t), h, pos),
                         lambda i, h, pos: gqa(p, h, pos) @ weights[p + "wo"].T)
        out[l] = t
        t = f32(out[l])
        for i, h in enumerate(hs):
            pos = np.arange(len(h), dtype=np.float32)
            xs[i] = ffn(p, xs[i] + mla(t, h, pos) @ weights[p + "wo"].T)
    return out


def refit_keys(c, t, Wq, hs, freq, source):
    """t with each head's key side refitted: head h's score of position p from
    query t is q_t^T B_h z_tp / sqrt(head_dim + dr), q_t = wq_h x_t (no RoPE),
    z_tp = [c_p; R(p - t) k_R,p]: B_h's first dc columns are W_UK_h (wk_b),
    the others map q_t to the RoPE query (wq_rope_h = B_h,R^T wq_h). B_h
    minimizes, by ridge least squares, the source's attention-weighted
    variance of the score error, sum_t sum_p a*_tp (e_tp - mean_p' a*_tp' e_tp')^2,
    the second-order term of KL(a*_t || a_t) (what the softmax sees of the
    scores; the idea of fitting to activations, not weights, as ASVD / SVD-LLM)."""
    H, hd = c.n_heads, c.head_dim
    dc, dr = t["wk_b"].shape[0] // H, t["wq_rope"].shape[0] // H
    Z, sig = dc + dr, np.sqrt(hd + dr)
    if hd * Z > MLA_REFIT_MAX_UNKNOWNS:
        return t
    f = freq[t["rope_pairs"]].astype(np.float64)
    work = H * sum(len(h) ** 2 for h in hs) * Z * Z          # multiply-adds of the weighted sums over all queries
    stride = max(1, int(np.ceil(work / MLA_KEY_WORK)))
    Gm = np.zeros((H, hd * hd, Z * Z))
    bv = np.zeros((H, hd, Z))
    for w, h in enumerate(hs):
        T = len(h)
        pos = np.arange(T, dtype=np.float64)
        rows = np.arange(w % stride, T, stride)                             # the queries t fitted on
        s_star, a_star = source(h, pos.astype(np.float32))
        a = a_star[:, rows]                                                 # (H, R, T)
        s = np.where(a > 0, s_star[:, rows], 0)
        h = h.astype(np.float64)
        kv = h @ t["wkv_a"].T
        zt = np.concatenate([kv[:, :dc], rope_pairs_turn(kv[:, dc:], pos, f)], axis=1)   # (T, Z): [c_p; R(p) k_R,p]
        zz = (zt[:, :, None] * zt[:, None, :]).reshape(T, Z * Z).astype(np.float32)
        R, z32 = len(rows), zt.astype(np.float32)
        zbar = a @ z32                                                      # (H, R, Z)
        S = (a.reshape(H * R, T) @ zz).reshape(H, R, Z, Z)                  # sum_p a_tp zt_p zt_p^T
        S -= zbar[..., :, None] * zbar[..., None, :]
        r = (a * (s - np.sum(a * s, -1, keepdims=True))) @ z32              # (H, R, Z)
        # z_tp = D_t zt_p, D_t = diag(I, R(-t)): turn S's columns, then its rows (S^T's columns), and r
        ang = -pos[rows, None] * f[None, :]
        cos, sin = np.cos(ang).astype(np.float32)[:, None], np.sin(ang).astype(np.float32)[:, None]
        for x in (S, S.transpose(0, 1, 3, 2), r[:, :, None]):
            x0, x1 = x[..., dc::2].copy(), x[..., dc + 1::2].copy()
            x[..., dc::2], x[..., dc + 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        q = (h[rows] @ Wq.T).reshape(R, H, hd).transpose(1, 0, 2).astype(np.float32)   # (H, R, hd)
        qq = (q[..., :, None] * q[..., None, :]).reshape(H, R, hd * hd)
        Gm += qq.transpose(0, 2, 1) @ S.reshape(H, R, Z * Z) / sig ** 2
        bv += q.transpose(0, 2, 1) @ r / sig
    wk_b = t["wk_b"].reshape(H, dc, hd).copy()
    wq_rope = t["wq_rope"].reshape(H, dr, -1).copy()
    for k in range(H):
        Wq_h = Wq[k * hd:(k + 1) * hd]
        B0 = np.concatenate([wk_b[k].T, (wq_rope[k] @ np.linalg.pinv(Wq_h)).T], axis=1)   # (hd, Z)
        Gk = Gm[k].reshape(hd, hd, Z, Z).transpose(0, 2, 1, 3).reshape(hd * Z, hd * Z)
        B = ridge_solve(Gk, bv[k].reshape(-1), B0.reshape(-1), MLA_RIDGE).reshape(hd, Z)
        wk_b[k], wq_rope[k] = B[:, :dc].T, B[:, dc:].T @ Wq_h
    return dict(t, wk_b=wk_b.reshape(H * dc, hd), wq_rope=wq_rope.reshape(H * dr, -1))


def refit_values(c, t, Wo, hs, model, target):
    """t with the value up-projections W_UV_h (wv_b) refitted by ridge least
    squares so that the layer's attention output through wo, sum_h wo_h W_UV_h
    (sum_p a_tp c_p), is nearest the source's on calibration text, with the
    converted layer's own attention a (the attention-weighted value
    statistics, and the heads' outputs fitted jointly: output-aware, as
    SVD-LLM / Palu)."""
    H, hd = c.n_heads, c.head_dim
    dc = t["wk_b"].shape[0] // H
    Wo = Wo.astype(np.float64)
    n = H * dc
    OO, OY = np.zeros((n, n)), np.zeros((n, Wo.shape[0]))
    for i, h in enumerate(hs):
        pos = np.arange(len(h), dtype=np.float32)
        att, lat, _ = model(h, pos)
        ob = (att @ lat).transpose(1, 0, 2).reshape(len(h), n).astype(np.float64)
        y = target(i, h, pos).astype(np.float64)                                           # (T, dim)
        OO += ob.T @ ob
        OY += ob.T @ y
    WoWo = (Wo.T @ Wo).reshape(H, hd, H, hd)                                               # (H hd, H hd)
    if H * hd * dc > MLA_REFIT_MAX_UNKNOWNS:  # too many for one system: sweeps over the heads, each solved given the others
        W = t["wv_b"].reshape(H, hd, dc).astype(np.float64)
        OO4 = OO.reshape(H, dc, H, dc)
        for _ in range(MLA_VALUE_SWEEPS):
            for h in range(H):
                M = Wo[:, h * hd:(h + 1) * hd].T @ OY[h * dc:(h + 1) * dc].T - sum(
                    WoWo[h, :, k] @ W[k] @ OO4[k, :, h] for k in range(H) if k != h)
                L, R = WoWo[h, :, h], OO4[h, :, h]
                L = L + MLA_RIDGE * np.mean(np.diag(L)) * np.eye(hd)
                R = R + MLA_RIDGE * max(np.mean(np.diag(R)), 1e-30) * np.eye(dc)
                W[h] = np.linalg.solve(L, np.linalg.solve(R, M.T).T)
        return dict(t, wv_b=W.reshape(H * hd, dc))
    # unknown u[(h, i, a)] = W_UV_h[i, a]; normal matrix (wo_h^T wo_h')[i, j] OO[(h, a), (h', b)]
    Gm = np.einsum("hiHj,haHb->hiaHjb", WoWo, OO.reshape(H, dc, H, dc)).reshape(H * hd * dc, -1)
    b = np.einsum("dhi,had->hia", Wo.reshape(-1, H, hd), OY.reshape(H, dc, -1))  # sum_t (wo_h^T y_t)_i ob_h,a
    u = ridge_solve(Gm, b.reshape(-1), t["wv_b"].reshape(H, hd, dc).reshape(-1), MLA_RIDGE)
    return dict(t, wv_b=u.reshape(H * hd, dc))


def calibration_ids(c, source_blocks_of, section, calib_path):
    """Token windows of the calibration text, tokenized by the engine (./run
    -m tokenize on the source model written to a scratch file): each window
    BOS (if any) + up to max_seq_len - 1 tokens, MLA_CALIB_TOKENS in all."""
    run = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run")
    if not os.access(run, os.X_OK):
        raise ExportError(f"--calib tokenizes the text with the engine, {run}: build it first (make)")
    if not os.path.isfile(calib_path):
        raise ExportError(f"--calib {calib_path}: not found")
    fd, tmp = tempfile.mkstemp(suffix=".bin")
    os.close(fd)
    try:
        write_model(tmp, c, DTYPE_F32, section, source_blocks_of)
        r = subprocess.run([run, tmp, "-m", "tokenize", "-f", calib_path], capture_output=True, text=True)
    finally:
        os.remove(tmp)
    if r.returncode != 0:
        raise ExportError(f"tokenizing --calib {calib_path}: {r.stderr.strip()[-200:]}")
    ids = [int(t) for t in r.stdout.split()]
    bos = [ids[0]] if c.bos_id >= 0 else []
    ids = ids[len(bos):MLA_CALIB_TOKENS + len(bos)]
    if len(ids) < 2:
        raise ExportError(f"--calib {calib_path}: too little text to calibrate on ({len(ids)} tokens)")
    step = min(c.max_seq_len, 512) - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids), step)]


def apply_mla(c, blocks_of, section, spec, kv_heads, calib, rope_dim):
    """(output config, blocks_of) of the MLA conversion of the model (c, blocks_of)."""
    dc, dr, lossless = parse_mla(spec, c, kv_heads, calib, rope_dim)
    need_numpy("--mla")
    shapes = dict(tensor_plan(c))

    def source(name):
        return np.concatenate([as_f32_rows(b, shapes[name][-1]) for b in blocks_of(name, shapes[name])]).astype(np.float64)

    layers = None
    if not lossless:
        windows = calibration_ids(c, blocks_of, section, calib)
        weights = {name: source(name) for name in shapes}
        weights = {k: (v.reshape(-1) if len(shapes[k]) == 1 else v) for k, v in weights.items()}
        p = "layers.{}."
        layers = calibrate_layers(c, weights, windows, lambda l, X: [mla_layer_lossy(
            c, *(weights[p.format(l) + n] for n in ("wq", "wk", "wv", "wo")), X, dc, dr, b) for b in MLA_BALANCES])
    out_c = replace(c, attention=ATTENTION_MLA, n_kv_heads=1, kv_latent_dim=dc, kv_rope_dim=dr,
                    stop_ids=list(c.stop_ids))
    done = {}  # the layer being converted: its MLA tensors

    def converted(name, shape):
        if not name.startswith("layers.") or name.split(".")[2] in ("attn_norm", "wo", "ffn_norm", "w1", "w2", "w3"):
            yield from blocks_of(name, shape)
            return
        l = int(name.split(".")[1])
        if done.get("layer") != l:
            p = f"layers.{l}."
            done.clear()
            done.update(mla_layer_full(c, *(source(p + n) for n in ("wq", "wk", "wv"))) if lossless else layers[l])
            done["layer"] = l
        t = done[name.split(".")[2]]
        yield t if t.dtype.kind == "i" else t.astype(np.float32)

    return out_c, converted


# ----------------------------------------------------------------------------
# Writing

def align_up(n, a=MODEL_ALIGN):
    return (n + a - 1) // a * a


def pad_to_alignment(f):
    f.write(bytes(align_up(f.tell()) - f.tell()))


def pack_header(c, dtype, tokenizer_offset, tokenizer_bytes, weights_offset, file_bytes, embedding_dtype=None):
    embedding_dtype = dtype if embedding_dtype is None else embedding_dtype
    grouped = dtype != DTYPE_F32 or embedding_dtype != DTYPE_F32
    stops = list(c.stop_ids) + [-1] * (MODEL_MAX_STOP_IDS - len(c.stop_ids))
    fields = struct.pack(
        HEADER_FORMAT, MODEL_MAGIC, MODEL_VERSION,
        c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.max_seq_len,
        c.rope_theta, c.rope_scaling, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
        c.rope_original_max_pos, c.norm_eps,
        int(c.tied_classifier), dtype, Q8_0_GROUP_SIZE if grouped else 0, c.bos_id,
        len(c.stop_ids), *stops, c.tokenizer_kind, 0,
        tokenizer_offset, tokenizer_bytes, weights_offset, file_bytes,
        c.attention, c.kv_latent_dim, c.kv_rope_dim, embedding_dtype)
    return fields + bytes(MODEL_HEADER_BYTES - len(fields))


def write_tensor(f, shape, blocks, dtype, name="tensor"):
    """Writes one tensor at the current (64-aligned) offset, padded to 64.
    `blocks` yields its f32 values in row order (numpy arrays or raw bytes).
    q8_0, q4_0 (matrices only): each block of rows is quantized and written
    as it comes, row after row, each row in blocks of up to 32 groups (values,
    then float16 scales), as model.h lays it out."""
    if dtype == DTYPE_F32 or len(shape) == 1:
        for block in blocks:
            if isinstance(block, memoryview):
                f.write(block)
            elif isinstance(block, np.ndarray) and block.dtype.kind in "iu":  # MLA's rope_pairs: int32
                f.write(np.ascontiguousarray(block, dtype="<i4").data)
            else:
                f.write(np.ascontiguousarray(as_f32_rows(block, shape[-1]), dtype="<f4").data)
    else:
        row = 0
        for block in blocks:
            if isinstance(block, QuantizedRows) and block.dtype == dtype:  # the source's own numbers, as they are
                f.write((q8_0_rows if dtype == DTYPE_Q8_0 else q4_0_rows)(block.q, block.scale).data)
                row += block.q.shape[0]
                continue
            x = as_f32_rows(block, shape[1])
            if dtype == DTYPE_Q8_0:
                f.write(q8_0_rows(*quantize_q8_0(x, name, row)).data)
            else:
                f.write(q4_0_rows(*quantize_q4_0(x, name, row)).data)
            row += x.shape[0]
    pad_to_alignment(f)


def tensor_bytes(shape, dtype):
    """Bytes a tensor takes in the file, padding included. A row of cols
    values has ceil(cols / 32) groups, each 32 int8 values (q8_0) or 16 bytes
    of 4-bit values (q4_0), and a float16 scale."""
    n = 1
    for d in shape:
        n *= d
    if dtype != DTYPE_F32 and len(shape) == 2:
        groups = -(-shape[1] // Q8_0_GROUP_SIZE)
        return align_up(shape[0] * groups * (Q8_0_GROUP_SIZE * (8 if dtype == DTYPE_Q8_0 else 4) // 8 + 2))
    return align_up(4 * n)


EMBEDDING_TENSORS = ("token_embedding", "classifier")


def tensor_dtype(name, dtype, embedding_dtype):
    return embedding_dtype if name in EMBEDDING_TENSORS else dtype


def default_embedding_dtype(dtype):
    """The rule for the token embedding and the classifier: q4_0 models keep
    them at q8_0 (experiments/quant_quality.md: 4 bits there add 26 % to
    stories260K's KL from f32, 16 % to aidreams260K's, for 16 % fewer bytes
    of a Llama-3.2-1B-shape file); f32 and q8_0 models store them as the
    other matrices."""
    return DTYPE_Q8_0 if dtype == DTYPE_Q4_0 else dtype


def write_model(out_path, c, dtype, tokenizer_section, blocks_of, embedding_dtype=None):
    """Writes the whole file to out_path + ".tmp", then renames it.
    blocks_of(name, shape) yields the tensor's f32 values in row blocks.
    embedding_dtype (token_embedding, classifier): default_embedding_dtype(dtype) if None."""
    validate_config(c)
    plan = tensor_plan(c)
    embedding_dtype = default_embedding_dtype(dtype) if embedding_dtype is None else embedding_dtype
    if dtype != DTYPE_F32 or embedding_dtype != DTYPE_F32:
        need_numpy("--dtype q8_0 / q4_0")
    show_progress = sys.stderr.isatty()
    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(MODEL_HEADER_BYTES))  # the header goes last, once offsets are known
            tokenizer_offset = f.tell()
            f.write(tokenizer_section)
            pad_to_alignment(f)
            weights_offset = f.tell()
            for k, (name, shape) in enumerate(plan):
                if show_progress:
                    sys.stderr.write(f"\rtensor {k + 1}/{len(plan)} {name:<24}")
                    sys.stderr.flush()
                start, tdtype = f.tell(), tensor_dtype(name, dtype, embedding_dtype)
                write_tensor(f, shape, blocks_of(name, shape), tdtype, name)
                if f.tell() - start != tensor_bytes(shape, tdtype):
                    raise ExportError(f"internal: {name} took {f.tell() - start} bytes, "
                                      f"expected {tensor_bytes(shape, tdtype)} (wrong source size?)")
            file_bytes = f.tell()
            f.seek(0)
            f.write(pack_header(c, dtype, tokenizer_offset, len(tokenizer_section), weights_offset, file_bytes,
                                embedding_dtype))
        if show_progress:
            sys.stderr.write("\n")
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file_bytes


# ----------------------------------------------------------------------------
# Tokenizer section (built by tokenizer_section.py, next to this file)

def tokenizer_section_module():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import tokenizer_section
    except ImportError as e:
        raise ExportError(f"cannot import export/tokenizer_section.py ({e})") from None
    return tokenizer_section


def llama3_tokenizer_section(tok, path, vocab_size):
    """(section bytes, info) for a tokenizer.json (path or dict). The builder
    refuses anything but a byte-level BPE with Llama 3's pre-tokenizer, and
    info names the special ids it found (bos_id, stop_ids, ...)."""
    try:
        return tokenizer_section_module().section_from_tokenizer_json(tok, vocab_size=vocab_size)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = str(e)
        why = why[len("tokenizer.json: "):] if why.startswith("tokenizer.json: ") else why
        raise ExportError(f"{path}: {why}") from None


def llama2c_tokenizer_section(path, vocab_size):
    try:
        return tokenizer_section_module().section_from_llama2c(path, vocab_size)
    except ValueError as e:
        raise ExportError(str(e)) from None


SYNTHETIC_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>"]


def synthetic_tokenizer_json(vocab_size):
    """A tokenizer.json-like dict for --random without --tokenizer: ids 0..255
    are the single bytes (no merges), 256.. the Llama 3 special tokens, then
    <|reserved_special_token_K|> up to vocab_size."""
    if vocab_size < 256 + len(SYNTHETIC_SPECIALS):
        raise ExportError(f"the built-in tokenizer needs vocab_size >= {256 + len(SYNTHETIC_SPECIALS)}, "
                          f"got {vocab_size} (or pass --tokenizer)")
    ts = tokenizer_section_module()
    byte_of = ts.byte_level_alphabet()  # GPT-2's: each byte written as one printable character
    specials = SYNTHETIC_SPECIALS + [f"<|reserved_special_token_{k}|>"
                                     for k in range(vocab_size - 256 - len(SYNTHETIC_SPECIALS))]
    return {
        "model": {"type": "BPE", "vocab": dict(sorted(byte_of.items(), key=lambda kv: kv[1])),
                  "merges": [], "ignore_merges": True, "byte_fallback": False},
        "added_tokens": [{"id": 256 + k, "content": s, "special": True} for k, s in enumerate(specials)],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": ts.LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel"},
    }


# ----------------------------------------------------------------------------
# The three sources

def convert_heads(c, blocks_of, section, kv_heads, mla):
    """The source model, its KV heads regrouped (--kv-heads) or converted into
    MLA (mla = (N or "full", calibration text or None, rope dim or None))."""
    if mla is not None:
        return apply_mla(c, blocks_of, section, *mla[:1], kv_heads, *mla[1:])
    return apply_kv_heads(c, blocks_of, kv_heads)


def export_hf(out, hf_dir, dtype, kv_heads=None, embedding_dtype=None, mla=None):
    need_numpy("--hf")
    c = config_from_hf(read_json(os.path.join(hf_dir, "config.json")))
    validate_config(c)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ExportError(f"{tok_path}: not found (a byte-level BPE tokenizer.json is required)")
    section, _ = llama3_tokenizer_section(read_json(tok_path), tok_path, c.vocab_size)
    weights = HFWeights(hf_dir)
    check_hf_tensors(weights, c)

    def blocks_of(name, shape):
        hname, permute_heads = hf_name(name, c)
        if permute_heads:  # wq/wk: whole tensor, the permutation mixes rows
            yield unpermute_rope_rows(weights.to_f32(hname), permute_heads, c.head_dim)
        elif len(shape) == 1:
            yield weights.to_f32(hname)
        else:
            for r0, r1 in row_ranges(*shape):
                yield weights.to_f32(hname, r0, r1)

    out_c, out_blocks_of = convert_heads(c, blocks_of, section, kv_heads, mla)  # blocks_of still reads with c
    return out_c, write_model(out, out_c, dtype, section, out_blocks_of, embedding_dtype)


def export_llama2c(out, model_path, tokenizer_path, dtype, kv_heads=None, embedding_dtype=None, mla=None):
    ck = Llama2cCheckpoint(model_path)
    section = llama2c_tokenizer_section(tokenizer_path, ck.config.vocab_size)
    c, blocks_of = convert_heads(ck.config, ck.blocks_of, section, kv_heads, mla)
    return c, write_model(out, c, dtype, section, blocks_of, embedding_dtype)


PRESETS = {
    # Small enough to export in a blink; the default.
    "tiny": dict(dim=64, hidden_dim=192, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None,
                 vocab_size=512, max_seq_len=256, rope_theta=10000.0, rope_scaling="none",
                 rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                 rope_original_max_pos=8192, norm_eps=1e-5),
    # The shape of meta-llama/Llama-3.2-1B (tied embeddings).
    "llama3.2-1b": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                        vocab_size=128256, max_seq_len=131072, rope_theta=500000.0, rope_scaling="llama3",
                        rope_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_pos=8192, norm_eps=1e-5),
}


def random_config(args):
    """The preset, overridden by any shape flag given."""
    p = dict(PRESETS[args.preset])
    for key in p:
        if getattr(args, key, None) is not None:
            p[key] = getattr(args, key)
    if args.head_dim is None and (args.dim is not None or args.n_heads is not None or p["head_dim"] is None):
        p["head_dim"] = p["dim"] // p["n_heads"]  # shape changed: the usual dim / n_heads
    c = Config(dim=p["dim"], hidden_dim=p["hidden_dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
               n_kv_heads=p["n_kv_heads"], head_dim=p["head_dim"], vocab_size=p["vocab_size"],
               max_seq_len=p["max_seq_len"], rope_theta=p["rope_theta"], norm_eps=p["norm_eps"],
               tied_classifier=not args.untied)
    if p["rope_scaling"] == "llama3":
        c.rope_scaling = ROPE_SCALING_LLAMA3
        c.rope_factor, c.rope_low_freq_factor = p["rope_factor"], p["rope_low_freq_factor"]
        c.rope_high_freq_factor, c.rope_original_max_pos = p["rope_high_freq_factor"], p["rope_original_max_pos"]
    return c


def random_tokenizer(c, path):
    """Sets c's tokenizer fields; returns the section bytes. A file starting
    with "{" is a tokenizer.json, anything else a llama2.c tokenizer.bin."""
    if path is None:
        tok, path = synthetic_tokenizer_json(c.vocab_size), "built-in tokenizer"
    else:
        with open(path, "rb") as f:
            is_json = f.read(1) == b"{"
        if not is_json:
            c.tokenizer_kind, c.bos_id, c.stop_ids = TOKENIZER_LLAMA2C, 1, [1, 2]
            return llama2c_tokenizer_section(path, c.vocab_size)
        tok = read_json(path)
    section, info = llama3_tokenizer_section(tok, path, c.vocab_size)
    c.tokenizer_kind = TOKENIZER_LLAMA3
    c.bos_id = -1 if info.get("bos_id") is None else info["bos_id"]
    c.stop_ids = list(info.get("stop_ids") or [])
    return section


def export_random(out, args, dtype, embedding_dtype=None, mla=None):
    need_numpy("--random")
    c = random_config(args)
    if args.kv_latent_dim is not None or args.kv_rope_dim is not None:  # a native MLA model
        if args.kv_latent_dim is None or args.kv_rope_dim is None:
            raise ExportError("a random MLA model needs both --kv-latent-dim and --kv-rope-dim")
        if mla is not None or args.kv_heads is not None:
            raise ExportError("--kv-latent-dim writes random MLA weights directly: drop --mla / --kv-heads")
        c.attention, c.n_kv_heads, c.kv_latent_dim, c.kv_rope_dim = ATTENTION_MLA, 1, args.kv_latent_dim, args.kv_rope_dim
        if c.kv_rope_dim // 2 > c.head_dim // 2:
            raise ExportError(f"--kv-rope-dim {c.kv_rope_dim}: at most head_dim ({c.head_dim}) RoPE numbers, one per frequency")
    validate_config(c)
    section = random_tokenizer(c, args.tokenizer)
    mla_unit = ("wq_rope", "wkv_a", "wk_b", "wv_b")  # MLA's own matrices: std 1/sqrt(cols), so scores are not all ~0

    def blocks_of(name, shape):
        # One generator per tensor, seeded by (seed, name): the values do not
        # depend on block sizes or on which other tensors exist.
        rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
        if name.endswith(".rope_pairs"):  # the k_R pairs' frequencies, spread over a head's
            yield (np.arange(shape[0]) * (c.head_dim // 2) // shape[0]).astype(np.int32)
            return
        if len(shape) == 1:  # RMSNorm gains: around 1
            yield (1 + 0.05 * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
            return
        std = 1 / np.sqrt(shape[1]) if name.endswith(mla_unit) else 0.02
        for r0, r1 in row_ranges(*shape):
            x = rng.standard_normal((r1 - r0, shape[1]), dtype=np.float32)
            x *= np.float32(std)
            yield x

    c, blocks_of = convert_heads(c, blocks_of, section, args.kv_heads, mla)
    return c, write_model(out, c, dtype, section, blocks_of, embedding_dtype)


# ----------------------------------------------------------------------------
# Reading: GGUF (llama.cpp's files; the container and its block formats are
# in gguf.py, next to this file)
#
# What llama.cpp's convert_hf_to_gguf.py writes for a Llama: the hyperparameters
# as llama.* keys, the tokenizer as tokenizer.ggml.* arrays, and the tensors
# below, with the rows of each head of attn_q / attn_k permuted back from
# Hugging Face's rotate_half order to Meta's adjacent pairs (its permute is
# the inverse of HF's), because llama.cpp's "normal" RoPE rotates (2i, 2i+1)
# as this engine does: a GGUF's q/k rows are used as they are.

GGUF_NAMES = {"token_embedding": "token_embd.weight", "final_norm": "output_norm.weight",
              "classifier": "output.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                    "w3": "ffn_up"}
GGUF_ROPE_FREQS = "rope_freqs.weight"
GGUF_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's names for Llama 3's pre-tokenizer
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6  # token_type
TOKEN_SPECIAL = 1  # model.h: the tokenizer section's flag of a control token


def gguf_module():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import gguf
    return gguf


def gguf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, l, kind = name.split(".")
    return f"blk.{l}.{GGUF_LAYER_NAMES[kind]}.weight"


class QuantizedRows:
    """Rows the source holds already quantized (a GGUF's Q8_0 blocks): integer
    values q (rows, cols), their float16 scales (rows, cols / 32) and the
    DTYPE_* whose numbers they are (value = q * scale). write_tensor lays them
    out as they are into a tensor of that dtype (no requantization), and
    dequantizes them for any other."""

    def __init__(self, dtype, q, scale):
        self.dtype, self.q, self.scale = dtype, q, scale

    def to_f32(self):
        rows, cols = self.q.shape
        x = self.q.reshape(rows, -1, Q8_0_GROUP_SIZE).astype(np.float32) * self.scale.astype(np.float32)[:, :, None]
        return x.reshape(rows, cols)


# The GGUF types whose blocks are this format's numbers: repacked, bit for bit,
# into a tensor of the same dtype (gguf.q4_0_parts gives Q4_0's values in
# [-8, 7] and its float16 scales); into another dtype they are dequantized.
GGUF_REPACKABLE = {"Q8_0": DTYPE_Q8_0, "Q4_0": DTYPE_Q4_0}


def gguf_rope_scaling(c, factors, original_hint):
    """Sets c's Llama 3.1 RoPE scaling from the rope_freqs tensor, by which
    llama.cpp divides the frequency of each pair i. The parameters found
    must reproduce every factor (relative 1e-5: the converter computes them
    in float32), or the export is refused."""
    n = c.head_dim // 2
    if len(factors) != n:
        raise ExportError(f"{GGUF_ROPE_FREQS} has {len(factors)} values, head_dim / 2 is {n}")
    f = np.asarray(factors, dtype=np.float64)
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ExportError(f"{GGUF_ROPE_FREQS} holds a factor that is not finite and positive")
    if np.all(np.abs(f - 1) <= 1e-6):
        return  # no scaling
    base = c.rope_theta ** (-2.0 * np.arange(n) / c.head_dim)
    factor, best = float(f.max()), float("inf")
    with np.errstate(all="ignore"), warnings.catch_warnings():  # odd factors: no fit, and no warning lines
        warnings.simplefilter("ignore")
        candidates = llama3_rope_candidates(f, base, factor, original_hint) if factor >= 1 else []
    for orig, low, high in candidates:
        if not (isinstance(orig, int) and orig >= 1 and 0 < low < high):
            continue
        cand = replace(c, rope_scaling=ROPE_SCALING_LLAMA3, rope_factor=factor, rope_low_freq_factor=low,
                       rope_high_freq_factor=high, rope_original_max_pos=orig, stop_ids=list(c.stop_ids))
        err = float(np.max(np.abs(llama3_rope_factors(cand, base) / f - 1)))
        if err <= 1e-5:
            c.rope_scaling, c.rope_factor, c.rope_original_max_pos = ROPE_SCALING_LLAMA3, factor, orig
            c.rope_low_freq_factor, c.rope_high_freq_factor = float(np.float32(low)), float(np.float32(high))
            return
        best = min(best, err)
    raise ExportError(f"{GGUF_ROPE_FREQS}: the per-frequency factors (max {factor:g}) are not Llama 3.1's "
                      f"rope scaling for any factor >= 1, low / high frequency factors and original context "
                      f"(best fit off by {best:.3g}); not supported")


def llama3_rope_candidates(f, base, factor, original_hint):
    """(original context, low_freq_factor, high_freq_factor) that may give the
    factors f. Llama 3.1's rule divides by 1 short wavelengths, by `factor`
    long ones and, between, by 1 / ((1 - s) / factor + s) with
    s = (orig / wavelen - low) / (high - low), a line in 1 / wavelen. Only
    the line matters (orig, low and high scaled together give the same
    factors), so low is taken as 1, Llama 3.x's own, unless the original
    context is given in the metadata."""
    wavelen = 2 * np.pi / base
    out = []
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if mid.sum() >= 2:  # the line through the in-between factors
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        # s = slope / wavelen + intercept: slope = orig / (high - low), intercept = -low / (high - low)
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)
        if slope > 0 and intercept < 0:
            orig_per_low = -slope / intercept
            orig = original_hint or int(round(orig_per_low))
            low = orig / orig_per_low
            high = low + orig / slope
            out += [(orig, round(low, 3), round(high, 3)), (orig, low, high)]  # rounded if that fits
    # Fewer in-between factors: low 1 and high 4 (Llama 3.1's) with an original
    # context that puts every frequency in its band (kept: wavelen < orig / 4;
    # divided: wavelen > orig): the hint or 8192 if they do, else one between.
    lo = max([4 * w for w in wavelen[f <= 1 + 1e-6]], default=0.0)
    hi = min([w for w in wavelen[f >= factor * (1 - 1e-6)]], default=float("inf"))
    fits = [o for o in ([original_hint] if original_hint else []) + [8192] if lo < o < hi]
    if not fits and lo < hi:
        fits = [int(lo) + 1 if hi == float("inf") else int(round(math.sqrt(max(lo, 1) * hi)))]
    return out + [(orig, 1.0, 4.0) for orig in fits]


def llama3_rope_factors(c, base):
    """What the engine divides each base frequency by, as run.c's
    rope_frequencies computes it (float64), from c's float32 header fields."""
    factor, low = float(np.float32(c.rope_factor)), float(np.float32(c.rope_low_freq_factor))
    high, orig = float(np.float32(c.rope_high_freq_factor)), c.rope_original_max_pos
    wavelen = 2 * np.pi / base
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen > orig / low, base / factor,
                      np.where(wavelen < orig / high, base, (1 - smooth) * base / factor + smooth * base))
    return base / scaled


def config_from_gguf(g):
    gg = gguf_module()
    meta = g.metadata
    arch = gg.get(meta, "general.architecture", "str", required=True)
    if arch != "llama":
        raise ExportError(f"general.architecture is {arch!r}; only llama is supported")

    def key(name, kind="int", default=None, required=True):
        return gg.get(meta, "llama." + name, kind, default, required and default is None)

    if key("expert_count", default=0):
        raise ExportError(f"llama.expert_count is {key('expert_count')}: mixture-of-experts models are not supported")
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    if n_heads <= 0 or dim <= 0:
        raise ExportError(f"llama.embedding_length {dim} and llama.attention.head_count {n_heads} must be positive")
    head_dim = key("attention.key_length", required=False)
    if head_dim is None:
        if dim % n_heads:
            raise ExportError(f"llama.embedding_length {dim} is not a multiple of llama.attention.head_count {n_heads}")
        head_dim = dim // n_heads
    if key("attention.value_length", default=head_dim) != head_dim:
        raise ExportError(f"llama.attention.value_length {key('attention.value_length')} differs from the key "
                          f"length {head_dim}; this engine has one head_dim")
    if key("rope.dimension_count", default=head_dim) != head_dim:
        raise ExportError(f"llama.rope.dimension_count {key('rope.dimension_count')} is not head_dim {head_dim}: "
                          "partial rotary embeddings are not supported")
    if "token_embd.weight" not in g.tensors or len(g.tensors["token_embd.weight"].shape) != 2:
        raise ExportError("missing tensor token_embd.weight (or it is not a matrix)")
    c = Config(dim=dim, hidden_dim=key("feed_forward_length"), n_layers=key("block_count"), n_heads=n_heads,
               n_kv_heads=key("attention.head_count_kv", default=n_heads), head_dim=head_dim,
               vocab_size=g.tensors["token_embd.weight"].shape[0], max_seq_len=key("context_length"),
               rope_theta=key("rope.freq_base", "float", 10000.0),
               norm_eps=key("attention.layer_norm_rms_epsilon", "float"),
               tied_classifier="output.weight" not in g.tensors)
    if key("vocab_size", default=c.vocab_size) != c.vocab_size:
        raise ExportError(f"llama.vocab_size {key('vocab_size')} differs from token_embd.weight's "
                          f"{c.vocab_size} rows")
    kind = key("rope.scaling.type", "str", "none")
    if not (kind == "none" or kind == "linear" and key("rope.scaling.factor", "float", 1.0) == 1.0):
        raise ExportError(f"llama.rope.scaling.type is {kind!r}; only Llama 3.1's scaling (a rope_freqs "
                          "tensor) is supported")
    validate_config(c)
    if GGUF_ROPE_FREQS in g.tensors:
        t = g.tensors[GGUF_ROPE_FREQS]
        gguf_rope_scaling(c, g.rows_f32(t, 0, 1).reshape(-1),
                          key("rope.scaling.original_context_length", required=False))
    return c


def check_gguf_tensors(g, c):
    """Every tensor the plan needs, of its shape and of a type we read;
    nothing else but rope_freqs (a bias or an extra tensor would be dropped)."""
    gg = gguf_module()
    expected = {GGUF_ROPE_FREQS}
    for name, shape in tensor_plan(c):
        gname = gguf_name(name)
        expected.add(gname)
        t = g.tensors.get(gname)
        if t is None:
            raise ExportError(f"missing tensor {gname}")
        if t.shape != shape and not (len(shape) == 1 and t.shape == (1,) + shape):
            raise ExportError(f"tensor {gname} has shape {list(t.shape)} (rows, columns), "
                              f"the metadata implies {list(shape)}")
        if t.type_name not in gg.SUPPORTED:
            raise ExportError(f"tensor {gname} has type {t.type_name}; this exporter reads "
                              f"{', '.join(gg.SUPPORTED)}")
    for gname in sorted(set(g.tensors) - expected):
        if gname.endswith(".bias"):
            raise ExportError(f"bias tensor {gname}: attention/mlp biases are not supported")
        raise ExportError(f"unexpected tensor {gname}: not a plain Llama checkpoint")


def gguf_tokenizer(g, c, path):
    """The tokenizer section from tokenizer.ggml.*; sets c's tokenizer kind,
    bos_id and stop ids: the eos, eot and eom ids, the Llama 3 tokens of those
    names, and bos (as for Hugging Face: a model that starts a new document is done)."""
    gg = gguf_module()
    meta = g.metadata
    model = gg.get(meta, "tokenizer.ggml.model", "str", required=True)
    tokens = gg.get(meta, "tokenizer.ggml.tokens", "list", required=True)
    types = gg.get(meta, "tokenizer.ggml.token_type", "list", [GGUF_NORMAL] * len(tokens))
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens) \
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise ExportError("tokenizer.ggml.tokens / token_type: not one string and one integer type per token")
    if len(tokens) > c.vocab_size:
        raise ExportError(f"tokenizer.ggml.tokens has {len(tokens)} tokens, the model's vocabulary {c.vocab_size}")
    special, named_stops = {}, []
    for k in ("bos", "eos", "eot", "eom"):
        i = gg.get(meta, f"tokenizer.ggml.{k}_token_id", "int")
        if i is not None and not 0 <= i < len(tokens):
            raise ExportError(f"tokenizer.ggml.{k}_token_id {i} is outside the {len(tokens)} tokens")
        special[k] = i
    if model == "gpt2":
        pre = gg.get(meta, "tokenizer.ggml.pre", "str")
        if pre is None:
            raise ExportError("tokenizer.ggml.pre is missing (a GGUF converted before llama.cpp recorded the "
                              "pre-tokenizer, spring 2024), so its tokenization is not known; use a newer conversion")
        if pre not in GGUF_LLAMA3_PRE:
            raise ExportError(f"tokenizer.ggml.pre is {pre!r}: only Llama 3's pre-tokenizer "
                              f"({' / '.join(GGUF_LLAMA3_PRE)}) is implemented")
        # As a tokenizer.json: ordinary tokens are the BPE vocabulary (id = rank, as
        # tiktoken's; the merges list is then not needed), the others added tokens.
        vocab, added = {}, []
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind in (GGUF_NORMAL, GGUF_BYTE):
                if vocab.setdefault(text, i) != i:
                    raise ExportError(f"tokenizer.ggml.tokens: {text!r} is both token {vocab[text]} and {i}")
            else:
                added.append({"id": i, "content": text, "special": True})
        tj = {
            "model": {"type": "BPE", "vocab": vocab, "merges": [], "byte_fallback": False},
            "added_tokens": added, "decoder": {"type": "ByteLevel"},
            "pre_tokenizer": {"type": "Split",
                              "pattern": {"Regex": tokenizer_section_module().LLAMA3_PATTERN}}}
        section, info = llama3_tokenizer_section(tj, path, c.vocab_size)
        named_stops = info["stop_ids"]  # <|end_of_text|>, <|eot_id|>, <|eom_id|>: llama.cpp ends generation at them too
        c.tokenizer_kind = TOKENIZER_LLAMA3
    elif model == "llama":
        scores = gg.get(meta, "tokenizer.ggml.scores", "list", required=True)
        if len(scores) != len(tokens) or not all(isinstance(s, float) for s in scores):
            raise ExportError("tokenizer.ggml.scores: not one float per token")
        if len(tokens) != c.vocab_size:
            raise ExportError(f"tokenizer.ggml.tokens has {len(tokens)} tokens, the model's vocabulary {c.vocab_size}")
        section = tokenizer_section_module().pack_section(
            [(s, TOKEN_SPECIAL if kind in (GGUF_UNKNOWN, GGUF_CONTROL) else 0, sentencepiece_bytes(text, i, special))
             for i, (text, s, kind) in enumerate(zip(tokens, scores, types))])
        c.tokenizer_kind = TOKENIZER_LLAMA2C
    else:
        raise ExportError(f"tokenizer.ggml.model is {model!r}; supported: gpt2 (Llama 3, pre-tokenizer "
                          "llama-bpe) and llama (SentencePiece)")
    bos = special["bos"]
    if gg.get(meta, "tokenizer.ggml.add_bos_token", "bool", True) is False:
        bos = None
    c.bos_id = -1 if bos is None else bos
    c.stop_ids = unique([special[k] for k in ("eos", "eot", "eom") if special[k] is not None] + named_stops
                        + ([bos] if bos is not None else []))
    return section


def sentencepiece_bytes(text, i, special):
    """A SentencePiece token as llama2.c's tokenizer.bin stores it: the word
    boundary U+2581 as a space, BOS and EOS as "\\n<s>\\n" and "\\n</s>\\n"."""
    if i == special["bos"]:
        return b"\n<s>\n"
    if i == special["eos"]:
        return b"\n</s>\n"
    return text.replace("\u2581", " ").encode("utf-8")


def gguf_default_dtype(g):
    """q8_0 for a quantized source (its matrices hold fewer than 16 bits), f32 otherwise."""
    gg = gguf_module()
    return DTYPE_Q8_0 if any(t.type_name in gg.QUANTIZED for t in g.tensors.values()) else DTYPE_F32


def export_gguf(out, path, dtype, kv_heads=None, embedding_dtype=None, mla=None):
    need_numpy("--gguf")
    gg = gguf_module()
    try:
        g = gg.GGUFFile(path)
        c = config_from_gguf(g)
        check_gguf_tensors(g, c)
        section = gguf_tokenizer(g, c, path)
    except gg.GGUFError as e:
        raise ExportError(f"{path}: {e}") from None
    if dtype is None:
        dtype = gguf_default_dtype(g)

    def blocks_of(name, shape):
        t = g.tensors[gguf_name(name)]
        rows = shape[0] if len(shape) == 2 else 1
        for r0, r1 in row_ranges(rows, shape[-1]):
            if len(shape) == 2 and t.type_name in GGUF_REPACKABLE:
                q, scale = gg.quantized_parts(t.type_name, g.rows_raw(t, r0, r1))
                yield QuantizedRows(GGUF_REPACKABLE[t.type_name], q, scale)
            else:
                yield g.rows_f32(t, r0, r1)

    out_c, out_blocks_of = convert_heads(c, blocks_of, section, kv_heads, mla)
    return out_c, write_model(out, out_c, dtype, section, out_blocks_of, embedding_dtype), dtype


# ----------------------------------------------------------------------------
# CLI

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Write a model.h checkpoint from a Hugging Face Llama dir, a llama2.c "
                    "checkpoint, or random weights.")
    ap.add_argument("out", help="output file (written to OUT.tmp, then renamed)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face Llama 3.x directory")
    src.add_argument("--llama2c", metavar="MODEL.bin", help="legacy llama2.c checkpoint")
    src.add_argument("--random", action="store_true", help="random weights")
    src.add_argument("--gguf", metavar="MODEL.gguf", help="llama.cpp GGUF file of a Llama (versions 2 and 3)")
    ap.add_argument("--tokenizer", metavar="PATH",
                    help="llama2.c tokenizer.bin (--llama2c), or tokenizer.json / tokenizer.bin (--random)")
    ap.add_argument("--dtype", choices=list(DTYPE_NAMES),
                    help="the matrices' type (default f32; --gguf: q8_0 if the GGUF is quantized, else f32; "
                         "q4_0: 4-bit values in groups of 32 with a float16 scale)")
    ap.add_argument("--embedding-dtype", choices=list(DTYPE_NAMES),
                    help="the token embedding's and classifier's type (default: q8_0 with --dtype q4_0, else --dtype)")
    ap.add_argument("--kv-heads", type=int, metavar="K",
                    help="write K key/value heads: mean-pool groups of KV heads (K < n_kv_heads) or "
                         "repeat them (K > n_kv_heads), as ./run --kv-heads K does at load time")
    ap.add_argument("--mla", metavar="N",
                    help="convert to multi-head latent attention caching N numbers per token and layer; "
                         "'full' (2 x n_kv_heads x head_dim) is exact, a smaller N needs --calib")
    ap.add_argument("--calib", metavar="TEXT.txt", help="calibration text for a lossy --mla N")
    ap.add_argument("--mla-rope-dim", type=int, metavar="R",
                    help="of the N numbers, R form the shared RoPE key (even; default 3N/8 if N >= n_kv_heads x "
                         "head_dim, else N/2)")
    r = ap.add_argument_group("--random options (default: the 'tiny' preset)")
    r.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for flag, typ in [("dim", int), ("hidden-dim", int), ("n-layers", int), ("n-heads", int),
                      ("n-kv-heads", int), ("head-dim", int), ("vocab-size", int), ("max-seq-len", int),
                      ("rope-theta", float), ("rope-factor", float), ("rope-low-freq-factor", float),
                      ("rope-high-freq-factor", float), ("rope-original-max-pos", int), ("norm-eps", float)]:
        r.add_argument("--" + flag, type=typ, metavar="N")
    r.add_argument("--rope-scaling", choices=["none", "llama3"])
    r.add_argument("--kv-latent-dim", type=int, metavar="N", help="random MLA weights: the latent's size")
    r.add_argument("--kv-rope-dim", type=int, metavar="N", help="random MLA weights: the shared RoPE key's size")
    r.add_argument("--untied", action="store_true", help="own classifier instead of the tied embedding")
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.llama2c and not args.tokenizer:
        ap.error("--llama2c needs --tokenizer TOK.bin")
    if (args.hf or args.gguf) and args.tokenizer:
        ap.error("--hf and --gguf take the tokenizer from the model; drop --tokenizer")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = None if args.dtype is None else DTYPE_NAMES[args.dtype]
    if dtype is None and not args.gguf:
        dtype = DTYPE_F32
    emb = None if args.embedding_dtype is None else DTYPE_NAMES[args.embedding_dtype]
    mla = None if args.mla is None else (args.mla, args.calib, args.mla_rope_dim)
    try:
        if args.mla is None and (args.calib is not None or args.mla_rope_dim is not None):
            raise ExportError("--calib and --mla-rope-dim only apply to a conversion with --mla N")
        if not args.random and (args.kv_latent_dim is not None or args.kv_rope_dim is not None):
            raise ExportError("--kv-latent-dim and --kv-rope-dim are for --random (random MLA weights); "
                              "convert a checkpoint with --mla N")
        if args.gguf:  # its default type depends on the file's
            c, size, dtype = export_gguf(args.out, args.gguf, dtype, args.kv_heads, emb, mla)
        elif args.hf:
            c, size = export_hf(args.out, args.hf, dtype, args.kv_heads, emb, mla)
        elif args.llama2c:
            c, size = export_llama2c(args.out, args.llama2c, args.tokenizer, dtype, args.kv_heads, emb, mla)
        else:
            c, size = export_random(args.out, args, dtype, emb, mla)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    mla_note = f", MLA latent {c.kv_latent_dim} + RoPE key {c.kv_rope_dim}" if c.attention == ATTENTION_MLA else ""
    print(f"wrote {args.out}: {size} bytes, dim {c.dim}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads{mla_note}, "
          f"vocab {c.vocab_size}, {DTYPE_LABELS[dtype]}"
          f"{'' if emb is None else ', embedding ' + args.embedding_dtype}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
