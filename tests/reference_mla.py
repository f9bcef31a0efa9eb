"""reference_mla.py - an independent float64 numpy model of multi-head latent
attention (MLA), the yardstick for the engine's MLA numbers.

Written from DeepSeek-V2 (DeepSeek-AI 2024, section 2.1.2-2.1.3, equations
9-19: dense, without the query's low-rank compression), not from run.c. For
every token t of a layer's normed input h_t:

  c_t    = W_DKV h_t                     the compressed latent (kv_latent_dim)      (9)
  k_C,i  = W_UK,i c_t                    head i's key, from the latent (head_dim)   (10)
  v_C,i  = W_UV,i c_t                    head i's value (head_dim)                  (11)
  q_C,i  = W_Q,i h_t                     head i's query (head_dim)                  (12, no compression)
  q_R,i  = RoPE(W_QR,i h_t)              head i's decoupled RoPE query              (15)
  k_R    = RoPE(W_KR h_t)                ONE RoPE key shared by all heads           (16)
  q_i = [q_C,i; q_R,i], k_i = [k_C,i; k_R]                                         (17, 18)
  o_i = sum_j softmax_j(q_i . k_j / sqrt(head_dim + kv_rope_dim)) v_C,j,i          (19)
  u   = W_O [o_1; ...; o_heads]

This is the explicit form: every head's key and value are up-projected from
the cached latent, as in the paper's training-time description; the engine
uses the absorbed form (W_UK into the query, W_UV after the weighted sum). One
difference from the paper, by the format's design: no RMSNorm on c (DeepSeek's
kv_a_layernorm), so that a GQA model converts exactly.

It reads the tensors of an exported MLA file (tests/testlib.read_tensors;
model.h gives their meaning): wkv_a = [W_DKV; W_KR], wk_b head i = W_UK,i^T,
wv_b head i = W_UV,i, wq = W_Q, wq_rope = W_QR, and rope_pairs, the pair of a
head (frequency) each pair of the RoPE key turns at. RoPE on adjacent pairs
(2j, 2j+1), as the file stores it. The rest of the model is Llama's
(reference.py): RMSNorm, SwiGLU, tied or untied classifier.

  logits = forward(h, W, ids)       h, W = testlib.read_tensors(path)

forward(..., q8_0_activations=True) rounds the input of every product to
q8_0 first, as int8 kernels meeting q8_0 weights do; the products with W_UK
and W_UV then have to be the absorbed ones (section 2.1.2: "W_UK can be
absorbed into W_Q, and W_UV into W_O"), whose inputs are what gets rounded:
head i's weighted sum of latents, when W_UV's rows (kv_latent_dim values)
are at least 512 long: the engine dequantizes shorter q8_0 rows at load
(run.c, dequantize_short_rows), and those products take f32 inputs. The
product with W_UK^T (rows of head_dim values) always takes f32 inputs: the
engine keeps that matrix as its columns (run.c, make_columns) and weighs
them by the query's f32 numbers.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402


def head_frequencies(h):
    """inv_freq of each pair of a head (head_dim / 2), with Llama 3.1's scaling, as reference.py."""
    cfg = {"hidden_size": h["dim"], "num_attention_heads": h["n_heads"], "head_dim": h["head_dim"],
           "rope_theta": h["rope_theta"], "rope_scaling": None}
    if h["rope_scaling"] == 1:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": h["rope_factor"],
                               "low_freq_factor": h["rope_low_freq_factor"],
                               "high_freq_factor": h["rope_high_freq_factor"],
                               "original_max_position_embeddings": h["rope_original_max_pos"]}
    return reference.rope_inv_freq(cfg)


def rope_adjacent(x, freq, positions):
    """x (..., T, 2n): pair j = (x[2j], x[2j+1]) turned by positions * freq[j]."""
    angle = np.outer(positions, freq)                       # (T, n)
    cos, sin = np.cos(angle), np.sin(angle)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def mla_attention(h, W, p, x, freq, kv_cache=None):
    """DeepSeek-V2 MLA of the normed input x (T, dim) -> (T, dim), layer prefix p. kv_cache (None/"f32",
    "f16", "q8_0"): what a KV cache of that element type keeps of the cached c and k_R (each a row of its
    own: q8_0 groups of 32 along it); with q8_0 and whole groups of c, the scores against c take the
    absorbed query rounded to q8_0."""
    T = x.shape[0]
    H, hd, dc, dr = h["n_heads"], h["head_dim"], h["kv_latent_dim"], h["kv_rope_dim"]
    W_DKV, W_KR = W[p + "wkv_a"][:dc], W[p + "wkv_a"][dc:]
    W_UK = W[p + "wk_b"].reshape(H, dc, hd).transpose(0, 2, 1)   # (H, hd, dc): k_C,i = W_UK,i c
    W_UV = W[p + "wv_b"].reshape(H, hd, dc)                      # (H, hd, dc): v_C,i = W_UV,i c
    rope_freq = freq[W[p + "rope_pairs"]]                        # (dr / 2) the frequency of each pair of k_R
    pos = np.arange(T)
    c = reference.round_kv_cache(x @ W_DKV.T, kv_cache)         # (T, dc)      (9)
    k_C = np.einsum("hdc,tc->htd", W_UK, c)                      # (H, T, hd)   (10)
    v_C = np.einsum("hdc,tc->htd", W_UV, c)                      # (H, T, hd)   (11)
    q_C = (x @ W[p + "wq"].T).reshape(T, H, hd).transpose(1, 0, 2)                      # (12)
    q_R = rope_adjacent((x @ W[p + "wq_rope"].T).reshape(T, H, dr).transpose(1, 0, 2), rope_freq, pos)  # (15)
    k_R = reference.round_kv_cache(rope_adjacent(x @ W_KR.T, rope_freq, pos), kv_cache)  # (T, dr), shared   (16)
    q = np.concatenate([q_C, q_R], axis=-1)                      # (H, T, hd + dr)   (17)
    k = np.concatenate([k_C, np.broadcast_to(k_R, (H, T, dr))], axis=-1)                  # (18)
    scores = q @ k.transpose(0, 2, 1)
    if kv_cache == "q8_0" and dc % 32 == 0:
        # int8 kernels meet an int8 cache with the query in its absorbed form (section 2.1.2), W_UK,i^T q_C,i,
        # rounded to q8_0 as matmul activations are: q_C,i . k_C,j = (W_UK,i^T q_C,i) . c_j
        q_lat = reference.round_to_q8_0(np.einsum("hdc,htd->htc", W_UK, q_C))                # (H, T, dc)
        scores = q_lat @ c.T + q_R @ k_R.T
    scores = scores / math.sqrt(hd + dr)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    o = (probs @ v_C).transpose(1, 0, 2).reshape(T, H * hd)     # (19)
    return o @ W[p + "wo"].T


def mla_attention_absorbed_q8(h, W, p, x, freq):
    """mla_attention in the absorbed form, every product's input rounded to q8_0."""
    T = x.shape[0]
    H, hd, dc, dr = h["n_heads"], h["head_dim"], h["kv_latent_dim"], h["kv_rope_dim"]
    lin = lambda v, w: reference.linear(v, w, True)
    rope_freq, pos = freq[W[p + "rope_pairs"]], np.arange(T)
    kv = lin(x, W[p + "wkv_a"])
    c, k_R = kv[:, :dc], rope_adjacent(kv[:, dc:], rope_freq, pos)
    int8 = lambda cols: (lambda v: reference.round_to_q8_0(v)) if cols >= 512 else (lambda v: v)
    q_C = lin(x, W[p + "wq"]).reshape(T, H, hd)
    q_lat = np.einsum("hcd,thd->htc", W[p + "wk_b"].reshape(H, dc, hd), q_C)            # W_UK,i^T q_C,i
    q_R = rope_adjacent(lin(x, W[p + "wq_rope"]).reshape(T, H, dr).transpose(1, 0, 2), rope_freq, pos)
    scores = (q_lat @ c.T + q_R @ k_R.T) / math.sqrt(hd + dr)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    o_lat = (scores / scores.sum(axis=-1, keepdims=True)) @ c                               # (H, T, dc)
    o_lat = int8(dc)(o_lat.transpose(1, 0, 2).reshape(T, H * dc)).reshape(T, H, dc)
    o = np.einsum("hdc,thc->thd", W[p + "wv_b"].reshape(H, hd, dc), o_lat).reshape(T, H * hd)  # W_UV,i o_i
    return lin(o, W[p + "wo"])


def forward(h, W, ids, q8_0_activations=False, kv_cache=None):
    """Logits (len(ids), vocab_size) of an MLA file's model for ids at positions 0, 1, ...; kv_cache: the
    element type of the cache (mla_attention)."""
    W = {k: (v if v.dtype.kind == "i" else v.astype(np.float64)) for k, v in W.items()
         if not k.endswith((".q", ".scale"))}
    eps, freq = h["norm_eps"], head_frequencies(h)
    x = W["token_embedding"][np.asarray(ids)]
    for l in range(h["n_layers"]):
        p = f"layers.{l}."
        normed = reference.rms_norm(x, W[p + "attn_norm"], eps)
        x = x + (mla_attention_absorbed_q8(h, W, p, normed, freq) if q8_0_activations
                 else mla_attention(h, W, p, normed, freq, kv_cache))
        g = reference.rms_norm(x, W[p + "ffn_norm"], eps)
        lin = lambda v, w: reference.linear(v, w, q8_0_activations)
        x = x + lin(reference.silu(lin(g, W[p + "w1"])) * lin(g, W[p + "w3"]), W[p + "w2"])  # SwiGLU
    x = reference.rms_norm(x, W["final_norm"], eps)
    return reference.linear(x, W["token_embedding"] if h["tied_classifier"] else W["classifier"], q8_0_activations)
