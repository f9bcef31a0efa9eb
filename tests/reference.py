"""reference.py - an independent float64 numpy model of Hugging Face's
LlamaForCausalLM, the yardstick for the engine's numbers.

Written from the Hugging Face modeling_llama.py math (not from run.c, not
from export.py): it reads a Hugging Face directory (config.json and
safetensors, with its own small loader), keeps HF's row order of q_proj /
k_proj and applies RoPE the HF way (rotate_half), so agreeing with the engine
also proves export.py's un-permutation.

  cfg, weights = load_hf_dir(path)
  logits = forward(cfg, weights, ids)           # (len(ids), vocab_size)
  ppl = perplexity(cfg, weights, bos, ids, context)
"""
import json
import math
import os
import struct

import numpy as np


# ----------------------------------------------------------------------------
# Loading

def load_safetensors(path):
    """{name: float64 array} of one .safetensors file: u64 LE header length,
    JSON header, data; each tensor located by its data_offsets."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = data[base + begin: base + end]
        if info["dtype"] == "F32":
            x = np.frombuffer(raw, "<f4")
        elif info["dtype"] == "F16":
            x = np.frombuffer(raw, "<f2")
        elif info["dtype"] == "BF16":  # the high half of a float32
            x = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not handled by the reference")
        out[name] = x.astype(np.float64).reshape(info["shape"])
    return out


def load_hf_dir(path):
    """(config dict, {name: float64 array}) of a Hugging Face Llama directory."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    single = os.path.join(path, "model.safetensors")
    weights = {}
    if os.path.exists(single):
        weights = load_safetensors(single)
    else:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for shard in shards:
            weights.update(load_safetensors(os.path.join(path, shard)))
    return cfg, weights


# ----------------------------------------------------------------------------
# The model (HF LlamaForCausalLM)

def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_inv_freq(cfg):
    """inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim/2, rescaled as
    transformers' _compute_llama3_parameters does when rope_scaling is llama3:
    wavelengths longer than original_max_pos / low_freq_factor are divided by
    factor, those shorter than original_max_pos / high_freq_factor kept, and
    those between interpolated with smooth = (orig/wavelen - low) / (high - low)."""
    hd = head_dim_of(cfg)
    theta = cfg.get("rope_theta", 10000.0)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = cfg.get("rope_scaling")
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default"):
        return inv_freq
    assert rs.get("rope_type", rs.get("type")) == "llama3", rs
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_context = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def rms_norm(x, w, eps):
    """x (T, dim) * rsqrt(mean(x^2) + eps) * w."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    """(..., hd) -> cat(-x[hd/2:], x[:hd/2]): HF pairs element i with i + hd/2."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x (heads, T, hd); cos/sin (T, hd) = cos/sin of cat(freqs, freqs)."""
    return x * cos + rotate_half(x) * sin


def silu(x):
    return x / (1 + np.exp(-x))


def round_to_q8_0(x):
    """x with every group of 32 along the last axis rounded to q8_0
    (scale = max|x| / 127, q = round(x / scale)): what a kernel that feeds
    int8 activations to q8_0 weights computes with."""
    n = x.shape[-1]
    pad = -n % 32  # a short last group: as if zero-padded to 32
    xp = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), x.dtype)], axis=-1) if pad else x
    g = xp.reshape(-1, 32)
    scale = np.abs(g).max(axis=1, keepdims=True) / 127
    q = np.round(np.divide(g, scale, out=np.zeros_like(g), where=scale > 0))
    return (q * scale).reshape(xp.shape)[..., :n]


def linear(x, w, quantize_x=False):
    """x (T, in) @ w.T, w (out, in) as in PyTorch."""
    return (round_to_q8_0(x) if quantize_x else x) @ w.T


def attention(cfg, W, p, h, cos, sin, aq=False):
    """One self-attention block on normed input h (T, dim) -> (T, dim)."""
    T = h.shape[0]
    n_h, n_kv, hd = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim_of(cfg)
    q = linear(h, W[p + "self_attn.q_proj.weight"], aq).reshape(T, n_h, hd).transpose(1, 0, 2)   # (n_h, T, hd)
    k = linear(h, W[p + "self_attn.k_proj.weight"], aq).reshape(T, n_kv, hd).transpose(1, 0, 2)  # (n_kv, T, hd)
    v = linear(h, W[p + "self_attn.v_proj.weight"], aq).reshape(T, n_kv, hd).transpose(1, 0, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # repeat_kv: query head j uses key/value head j // (n_h / n_kv)
    k, v = np.repeat(k, n_h // n_kv, axis=0), np.repeat(v, n_h // n_kv, axis=0)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)                                     # (n_h, T, T)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)              # causal
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(T, n_h * hd)
    return linear(out, W[p + "self_attn.o_proj.weight"], aq)


def mlp(W, p, h, aq=False):
    """SwiGLU: down(silu(gate(h)) * up(h))."""
    gate = linear(h, W[p + "mlp.gate_proj.weight"], aq)
    up = linear(h, W[p + "mlp.up_proj.weight"], aq)
    return linear(silu(gate) * up, W[p + "mlp.down_proj.weight"], aq)


def forward(cfg, W, ids, q8_0_activations=False):
    """Logits (len(ids), vocab_size) for tokens ids at positions 0, 1, ...
    q8_0_activations: round the input of every linear layer to q8_0 first
    (only meaningful with weights that are q8_0 values themselves)."""
    aq = q8_0_activations
    eps = cfg.get("rms_norm_eps", 1e-6)
    ids = np.asarray(ids)
    x = W["model.embed_tokens.weight"][ids]                   # (T, dim)
    freqs = np.outer(np.arange(len(ids)), rope_inv_freq(cfg))  # (T, hd/2)
    emb = np.concatenate([freqs, freqs], axis=-1)              # (T, hd)
    cos, sin = np.cos(emb), np.sin(emb)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attention(cfg, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps), cos, sin, aq)
        x = x + mlp(W, p, rms_norm(x, W[p + "post_attention_layernorm.weight"], eps), aq)
    x = rms_norm(x, W["model.norm.weight"], eps)
    tied = cfg.get("tie_word_embeddings", False)
    classifier = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    return linear(x, classifier, aq)


# ----------------------------------------------------------------------------
# Perplexity

def nll_sum(logits, targets):
    """Sum of -log softmax(logits[t])[targets[t]]."""
    m = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(axis=-1)) + m[:, 0]
    return float(np.sum(logz - logits[np.arange(len(targets)), targets]))


def perplexity(cfg, W, bos, ids, context):
    """exp(mean NLL) of the text tokens `ids` (no BOS), each predicted from its
    prefix. The text is cut into consecutive chunks of (context - 1) tokens,
    each scored after its own BOS; a text that fits is one chunk, so this is
    plain exp(mean NLL of tokens 1..N-1 of BOS + ids)."""
    step = context - 1
    total, count = 0.0, 0
    for start in range(0, len(ids), step):
        window = [bos] + list(ids[start:start + step])
        logits = forward(cfg, W, window[:-1])
        total += nll_sum(logits, np.asarray(window[1:]))
        count += len(window) - 1
    return math.exp(total / count)
