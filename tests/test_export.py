"""test_export.py - export.py on its own, without the engine: what it refuses,
what it writes (header, layout, alignment, padding), that every input dtype
and sharding gives the same bytes, q8_0 accuracy, the numpy-free llama2.c
path, --random, and that the exported wq/wk (adjacent-pair RoPE) compute what
the HF weights (rotate_half RoPE) compute."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf  # noqa: E402
import reference  # noqa: E402
from testlib import (EXPORT, MODEL_MAGIC, MODEL_VERSION, Checks, export, export_ok, hf_permute,  # noqa: E402
                     read_header, read_llama2c, read_tensors, read_tokenizer_section, rel_err, scratch,
                     shared_file, tensor_layout)

T = Checks()
TMP = scratch("export-")
STORIES, TOK512 = shared_file("models/stories260K.bin"), shared_file("models/tok512.bin")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def path(*parts):
    return os.path.join(TMP, *parts)


def sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------
# Refusals: one "error:" line, exit 1, no output file (and no .tmp)

BASE_CFG = make_hf.hf_config(dim=32, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2)
BASE_W = make_hf.random_weights(BASE_CFG, seed=7)


def hf_variant(name, cfg=None, weights=None, tokenizer="synthetic", dtype="F32", shards=1):
    d = path("bad", name)
    make_hf.write_hf_dir(d, cfg or BASE_CFG, weights or BASE_W, dtype=dtype, shards=shards, tokenizer=tokenizer)
    return d


def rewrite_safetensors_header(d, edit):
    """Applies edit(header_bytes) -> (new_len_field, new_header_bytes) to d/model.safetensors."""
    p = os.path.join(d, "model.safetensors")
    with open(p, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data)
    new_len, new_header = edit(data[8:8 + n])
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", new_len) + new_header + data[8 + n:])


def expect_refusal(name, args, must_mention=""):
    out = path("refused", name + ".bin")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    r = export(out, *args)
    lines = r.stderr.strip().splitlines()
    why = None
    if r.returncode != 1:
        why = f"exit status {r.returncode}, stderr {r.stderr.strip()[-200:]!r}"
    elif len(lines) != 1 or not lines[0].startswith("error: "):
        why = f"stderr is not one 'error: ...' line: {r.stderr.strip()[-300:]!r}"
    elif must_mention.lower() not in lines[0].lower():
        why = f"message does not mention {must_mention!r}: {lines[0]!r}"
    elif os.path.exists(out) or os.path.exists(out + ".tmp"):
        why = "an output file was left behind"
    T.check("refuses_" + name, why is None, why)


UP1 = "model.layers.1.mlp.up_proj.weight"  # layers.1.w3, (hidden, dim)


def with_value(w, index, value):
    w = w.copy()
    w[index] = value
    return w


def refusal_cases():
    def cfg_with(**kw):
        return dict(BASE_CFG, **kw)

    def weights_with(extra=(), drop=(), reshape=None):
        w = {k: v for k, v in BASE_W.items() if k not in drop}
        w.update(extra)
        if reshape:
            w[reshape[0]] = np.zeros(reshape[1], np.float32)
        return w

    corrupt_json = hf_variant("bad_json")
    rewrite_safetensors_header(corrupt_json, lambda h: (len(h), b"{" + h[2:]))
    bad_len = hf_variant("bad_length")
    rewrite_safetensors_header(bad_len, lambda h: (1 << 40, h))
    bad_dtype = hf_variant("bad_dtype")
    rewrite_safetensors_header(bad_dtype, lambda h: (len(h), h.replace(b'"F32"', b'"I32"', 1)))
    truncated = hf_variant("truncated")
    with open(os.path.join(truncated, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(truncated, "model.safetensors")) - 100)

    tok = make_hf.synthetic_tokenizer(BASE_CFG["vocab_size"])
    unigram = dict(tok, model={"type": "Unigram", "vocab": [["a", 0.0]]})
    not_byte_level = dict(tok, decoder={"type": "Metaspace"},
                          model=dict(tok["model"], byte_fallback=True))
    big_vocab = make_hf.synthetic_tokenizer(BASE_CFG["vocab_size"] + 10)

    cases = [
        ("other_architecture", ["--hf", hf_variant("arch", cfg_with(architectures=["MistralForCausalLM"],
                                                                    model_type="mistral"))], "llama"),
        ("bias_tensor", ["--hf", hf_variant("bias", weights=weights_with(
            {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))], "bias"),
        ("attention_bias_config", ["--hf", hf_variant("attn_bias", cfg_with(attention_bias=True))], "bias"),
        ("mlp_bias_config", ["--hf", hf_variant("mlp_bias", cfg_with(mlp_bias=True))], "bias"),
        ("unknown_rope_type", ["--hf", hf_variant("yarn", cfg_with(rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))], "yarn"),
        ("hidden_act_not_silu", ["--hf", hf_variant("gelu", cfg_with(hidden_act="gelu"))], "gelu"),
        ("missing_tensor", ["--hf", hf_variant("missing", weights=weights_with(
            drop=["model.layers.1.mlp.up_proj.weight"]))], "model.layers.1.mlp.up_proj.weight"),
        ("missing_lm_head_when_untied", ["--hf", hf_variant("no_head", cfg_with(tie_word_embeddings=False))],
         "lm_head"),
        ("shape_mismatch", ["--hf", hf_variant("shape", weights=weights_with(
            reshape=("model.layers.0.self_attn.k_proj.weight", (32, 32))))], "k_proj"),
        ("unexpected_tensor", ["--hf", hf_variant("extra", weights=weights_with(
            {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))], "q_norm"),
        ("unknown_safetensors_dtype", ["--hf", bad_dtype], "I32"),
        ("corrupt_safetensors_json", ["--hf", corrupt_json], "json"),
        ("corrupt_safetensors_length", ["--hf", bad_len], "header length"),
        ("safetensors_offsets_past_end", ["--hf", truncated], "data_offsets"),
        ("missing_tokenizer_json", ["--hf", hf_variant("no_tok", tokenizer=None)], "tokenizer.json"),
        ("non_bpe_tokenizer", ["--hf", hf_variant("unigram", tokenizer=unigram)], "BPE"),
        ("bpe_not_byte_level", ["--hf", hf_variant("metaspace", tokenizer=not_byte_level)], ""),
        ("tokenizer_larger_than_vocab", ["--hf", hf_variant("big_vocab", tokenizer=big_vocab)], "vocab"),
        ("q8_0_scale_overflows_float16", ["--hf", hf_variant("q8huge", weights=weights_with(
            {UP1: with_value(BASE_W[UP1], (5, 3), -1e7)})), "--dtype", "q8_0"], "tensor layers.1.w3: row 5"),
        ("q8_0_scale_just_past_float16", ["--hf", hf_variant("q8past", weights=weights_with(
            {UP1: with_value(BASE_W[UP1], (0, 31), 8.33e6)})), "--dtype", "q8_0"], "float16"),
        ("q8_0_nan_weight", ["--hf", hf_variant("q8nan", weights=weights_with(
            {UP1: with_value(BASE_W[UP1], (2, 0), np.nan)})), "--dtype", "q8_0"], "tensor layers.1.w3: row 2"),
        ("q4_0_scale_overflows_float16", ["--hf", hf_variant("q4huge", weights=weights_with(
            {UP1: with_value(BASE_W[UP1], (5, 3), -1e6)})), "--dtype", "q4_0"], "tensor layers.1.w3: row 5"),
        ("q4_0_nan_weight", ["--hf", hf_variant("q4nan", weights=weights_with(
            {UP1: with_value(BASE_W[UP1], (2, 0), np.nan)})), "--dtype", "q4_0"], "tensor layers.1.w3: row 2"),
        ("random_vocab_too_small_for_builtin_tokenizer", ["--random", "--vocab-size", "200"], "vocab_size"),
        ("random_odd_head_dim", ["--random", "--dim", "60", "--n-heads", "4", "--n-kv-heads", "2"], "even"),
    ]
    if os.path.exists(STORIES) and os.path.exists(TOK512):
        short = path("bad", "stories_truncated.bin")
        with open(STORIES, "rb") as f:
            data = f.read()
        with open(short, "wb") as f:
            f.write(data[:-4096])
        cases.append(("truncated_llama2c_checkpoint", ["--llama2c", short, "--tokenizer", TOK512], "bytes"))
        cases.append(("llama2c_tokenizer_of_wrong_size", ["--llama2c", STORIES, "--tokenizer",
                                                          os.path.join(TMP, "bad", "tiny_tok.bin")], "tokens"))
        with open(os.path.join(TMP, "bad", "tiny_tok.bin"), "wb") as f:  # 3 tokens, model needs 512
            f.write(struct.pack("<I", 7) + b"".join(struct.pack("<fi", 0.0, 1) + b"a" for _ in range(3)))
    else:
        T.missing("refuses_truncated_llama2c_checkpoint", STORIES)
    for name, args, mention in cases:
        T.run("refuses_" + name, expect_refusal, name, args, mention)


def failed_export_keeps_existing_file():
    out = path("keep.bin")
    with open(out, "wb") as f:
        f.write(b"previous model")
    r = export(out, "--hf", hf_variant("arch2", dict(BASE_CFG, hidden_act="relu")))
    with open(out, "rb") as f:
        kept = f.read() == b"previous model"
    T.check("failed_export_keeps_existing_output", r.returncode == 1 and kept and not os.path.exists(out + ".tmp"),
            f"exit {r.returncode}, previous file kept: {kept}")


# ----------------------------------------------------------------------------
# What is written

def check_layout(name, p):
    """Header's file_bytes = file size; tokenizer section right after the
    header; every tensor at a 64-byte aligned offset, back to back; every
    padding byte zero; the file ends after the last tensor."""
    h = read_header(p)
    data = np.fromfile(p, dtype=np.uint8)
    problems = []
    if h["file_bytes"] != len(data):
        problems.append(f"file is {len(data)} bytes, header says {h['file_bytes']}")
    if h["magic"] != MODEL_MAGIC or h["version"] != MODEL_VERSION or not h["pad_is_zero"] or h["reserved"] != 0:
        problems.append(f"magic/version/reserved/header padding wrong (version {h['version']})")
    if h["tokenizer_offset"] != 256 or h["weights_offset"] != (256 + h["tokenizer_bytes"] + 63) // 64 * 64:
        problems.append(f"tokenizer at {h['tokenizer_offset']}+{h['tokenizer_bytes']}, weights at {h['weights_offset']}")
    if data[h["tokenizer_offset"] + h["tokenizer_bytes"]:h["weights_offset"]].any():
        problems.append("non-zero bytes between tokenizer section and weights")
    end = h["weights_offset"]
    for tname, shape, off, nbytes in tensor_layout(h):
        n = int(np.prod(shape))
        if off % 64:
            problems.append(f"{tname} at unaligned offset {off}")
        if h["dtype"] == 1 and len(shape) == 2:  # rows back to back: int8 values + float16 scales
            used = [(off, off + n * 17 // 16)]
        else:
            used = [(off, off + 4 * n)]
        cursor = off
        for a, b in used:
            if data[cursor:a].any():
                problems.append(f"non-zero padding before {tname} part at {a}")
            cursor = b
        if data[cursor:off + nbytes].any():
            problems.append(f"non-zero padding after {tname}")
        end = off + nbytes
    if end != len(data):
        problems.append(f"tensors end at {end}, file at {len(data)}")
    T.check(name, not problems, "; ".join(problems[:3]))


def hf_header_fields():
    cfg = make_hf.hf_config(dim=64, hidden=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, vocab=300,
                            tied=False, max_pos=512, theta=500000.0, eps=1e-6, rope_scaling=LLAMA3_SCALING,
                            eos=[271, 274])
    d = path("hf_header")
    make_hf.write_hf_dir(d, cfg, make_hf.random_weights(cfg, 3))
    p = export_ok(path("hf_header.bin"), "--hf", d)
    h = read_header(p)
    want = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, vocab_size=300,
                max_seq_len=512, rope_theta=500000.0, rope_scaling=1, rope_factor=8.0, rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_pos=32, norm_eps=float(np.float32(1e-6)),
                tied_classifier=0, dtype=0, group_size=0, bos_id=270, stop_ids=[271, 274, 270], tokenizer_kind=2)
    bad = {k: (h[k], v) for k, v in want.items() if h[k] != v}
    T.check("hf_header_fields_read_back", not bad, f"(got, want): {bad}")
    check_layout("hf_file_size_alignment_and_padding", p)
    p8 = export_ok(path("hf_header_q8.bin"), "--hf", d, "--dtype", "q8_0")
    h8 = read_header(p8)
    T.check("q8_0_header_fields", h8["dtype"] == 1 and h8["group_size"] == 32, f"dtype {h8['dtype']}, group {h8['group_size']}")
    check_layout("q8_0_file_size_alignment_and_padding", p8)
    toks = read_tokenizer_section(p)
    T.check("hf_tokenizer_section_has_vocab_size_tokens", len(toks) == 300 and toks[270][2] == b"<|begin_of_text|>"
            and toks[270][1] == 1 and toks[ord("A")][2] == b"A" and toks[258][2] == b" the",
            f"{len(toks)} tokens, 270 = {toks[270] if len(toks) > 270 else None}")


def llama2c_header_fields():
    if not (os.path.exists(STORIES) and os.path.exists(TOK512)):
        return T.missing("llama2c_header_fields_read_back", STORIES)
    p = export_ok(path("stories.bin"), "--llama2c", STORIES, "--tokenizer", TOK512)
    h = read_header(p)
    want = dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, head_dim=8, vocab_size=512,
                max_seq_len=512, rope_theta=10000.0, rope_scaling=0, norm_eps=float(np.float32(1e-5)),
                tied_classifier=1, dtype=0, bos_id=1, stop_ids=[1, 2], tokenizer_kind=1)
    bad = {k: (h[k], v) for k, v in want.items() if h[k] != v}
    T.check("llama2c_header_fields_read_back", not bad, f"(got, want): {bad}")
    check_layout("llama2c_file_size_alignment_and_padding", p)
    # The weights are copied verbatim: llama2.c already rotates adjacent pairs.
    lh, W = read_llama2c(STORIES)
    _, E = read_tensors(p)
    same = all(np.array_equal(E[f"layers.{l}.{k}"], W[src][l]) for l in range(5) for k, src in
               [("attn_norm", "rms_att"), ("wq", "wq"), ("wk", "wk"), ("wv", "wv"), ("wo", "wo"),
                ("ffn_norm", "rms_ffn"), ("w1", "w1"), ("w2", "w2"), ("w3", "w3")])
    same = same and np.array_equal(E["token_embedding"], W["token_embedding"]) and \
        np.array_equal(E["final_norm"], W["rms_final"])
    T.check("llama2c_weights_copied_verbatim", same, "some tensor differs from the checkpoint")
    toks = read_tokenizer_section(p)
    with open(TOK512, "rb") as f:
        raw = f.read()
    (score0, n0) = struct.unpack_from("<fi", raw, 4)
    T.check("llama2c_tokenizer_section_from_tok512", len(toks) == 512 and toks[0][2] == raw[12:12 + n0]
            and toks[1][1] == 1 and toks[300][1] == 0, f"{len(toks)} tokens, first {toks[0] if toks else None}")


def llama2c_without_numpy():
    if not (os.path.exists(STORIES) and os.path.exists(TOK512)):
        return T.missing("llama2c_export_works_without_numpy", STORIES)
    with_np = export_ok(path("stories_np.bin"), "--llama2c", STORIES, "--tokenizer", TOK512)

    def run_blocked(out, *args):
        code = ("import sys, runpy; sys.modules['numpy'] = None; "
                f"sys.argv = {[EXPORT, out] + list(args)!r}; runpy.run_path({EXPORT!r}, run_name='__main__')")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    out = path("stories_nonp.bin")
    r = run_blocked(out, "--llama2c", STORIES, "--tokenizer", TOK512)
    T.check("llama2c_export_works_without_numpy", r.returncode == 0 and os.path.exists(out)
            and sha(out) == sha(with_np), f"exit {r.returncode}: {r.stderr.strip()[-200:]}")
    r = run_blocked(path("hf_nonp.bin"), "--hf", path("hf_header"))
    T.check("hf_export_without_numpy_says_numpy_is_required",
            r.returncode == 1 and r.stderr.startswith("error: numpy is required"), r.stderr.strip()[-200:])


def dtypes_and_shards_identical():
    """Values on a grid exact in F32, BF16 and F16: every input form must
    export to the very same file."""
    cfg = make_hf.hf_config(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, tied=False)
    W = make_hf.random_weights(cfg, 11, exact=True)
    outs = {}
    for dtype, shards in [("F32", 1), ("BF16", 1), ("F16", 1), ("F32", 3), ("BF16", 2)]:
        d = path(f"forms_{dtype}_{shards}")
        make_hf.write_hf_dir(d, cfg, W, dtype=dtype, shards=shards)
        outs[(dtype, shards)] = sha(export_ok(d + ".bin", "--hf", d))
    first = outs[("F32", 1)]
    diff = [k for k, v in outs.items() if v != first]
    T.check("bf16_f16_f32_and_sharded_inputs_export_identically", not diff, f"differ from F32: {diff}")
    # bf16 widening: an arbitrary bf16 value must come out as its exact f32 (shifted) value
    W2 = make_hf.random_weights(cfg, 12)
    d = path("bf16_values")
    make_hf.write_hf_dir(d, cfg, W2, dtype="BF16")
    _, E = read_tensors(export_ok(d + ".bin", "--hf", d))
    bf = np.frombuffer(make_hf.to_dtype_bytes(W2["model.layers.1.mlp.down_proj.weight"], "BF16"), "<u2")
    want = (bf.astype(np.uint32) << 16).view(np.float32).reshape(E["layers.1.w2"].shape)
    T.check("bf16_widens_exactly_to_f32", np.array_equal(E["layers.1.w2"], want), "w2 differs from bf16 << 16")


def weights_land_in_the_right_place():
    """Non-RoPE tensors are copied as is; the exported wq/wk, run with
    adjacent-pair RoPE (Meta's complex form), give the reference's logits
    from the HF weights with rotate_half: the un-permutation is right."""
    cfg = make_hf.hf_config(dim=64, hidden=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, tied=False,
                            theta=500000.0, rope_scaling=LLAMA3_SCALING)
    W = make_hf.random_weights(cfg, 5)
    d = path("placement")
    make_hf.write_hf_dir(d, cfg, W)
    h, E = read_tensors(export_ok(d + ".bin", "--hf", d))
    pairs = [("token_embedding", "model.embed_tokens.weight"), ("classifier", "lm_head.weight"),
             ("final_norm", "model.norm.weight")]
    for l in range(2):
        p = f"model.layers.{l}."
        pairs += [(f"layers.{l}.attn_norm", p + "input_layernorm.weight"),
                  (f"layers.{l}.wv", p + "self_attn.v_proj.weight"), (f"layers.{l}.wo", p + "self_attn.o_proj.weight"),
                  (f"layers.{l}.ffn_norm", p + "post_attention_layernorm.weight"),
                  (f"layers.{l}.w1", p + "mlp.gate_proj.weight"), (f"layers.{l}.w2", p + "mlp.down_proj.weight"),
                  (f"layers.{l}.w3", p + "mlp.up_proj.weight"),
                  (f"layers.{l}.wq", None), (f"layers.{l}.wk", None)]
    wrong = [a for a, b in pairs if b and not np.array_equal(E[a], W[b])]
    T.check("hf_tensors_map_to_model_h_names", not wrong, f"differ: {wrong}")
    inverse_ok = all(np.array_equal(hf_permute(E[f"layers.{l}.wq"], 8), W[f"model.layers.{l}.self_attn.q_proj.weight"])
                     and np.array_equal(hf_permute(E[f"layers.{l}.wk"], 2), W[f"model.layers.{l}.self_attn.k_proj.weight"])
                     for l in range(2))
    T.check("wq_wk_unpermutation_inverts_hf_permutation", inverse_ok, "hf_permute(exported) != HF weights")
    ids = [270, 5, 100, 260, 7, 8, 9, 10, 33, 44, 55, 66, 1, 2, 3, 4, 200, 199]
    rc, rw = reference.load_hf_dir(d)
    ref = reference.forward(rc, rw, ids)
    err = rel_err(adjacent_pair_forward(h, E, ids, reference.rope_inv_freq(rc)), ref)
    T.check("adjacent_pair_rope_on_exported_weights_matches_reference", err < 1e-9, f"relative error {err:.3g}")


def adjacent_pair_forward(h, E, ids, inv_freq):
    """Meta's formulation: each head's (2i, 2i+1) pair is a complex number
    rotated by exp(i * pos * inv_freq[i]). float64, straight from the file."""
    W = {k: v.astype(np.float64) for k, v in E.items()}
    hd, nh, nkv, eps = h["head_dim"], h["n_heads"], h["n_kv_heads"], float(h["norm_eps"])
    n = len(ids)
    rot = np.exp(1j * np.outer(np.arange(n), inv_freq))  # (n, hd/2)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x, heads):  # (n, heads*hd) -> rotated, same shape
        c = x.reshape(n, heads, hd // 2, 2)
        z = (c[..., 0] + 1j * c[..., 1]) * rot[:, None, :]
        return np.stack([z.real, z.imag], -1).reshape(n, heads, hd)

    x = W["token_embedding"][ids]
    causal = np.triu(np.ones((n, n), bool), 1)
    for l in range(h["n_layers"]):
        p = f"layers.{l}."
        a = norm(x, W[p + "attn_norm"])
        q, k = rope(a @ W[p + "wq"].T, nh), rope(a @ W[p + "wk"].T, nkv)
        v = (a @ W[p + "wv"].T).reshape(n, nkv, hd)
        out = np.zeros((n, nh, hd))
        for kvh in range(nkv):  # each KV head serves kv_mul query heads
            for qh in range(kvh * (nh // nkv), (kvh + 1) * (nh // nkv)):
                s = np.where(causal, -np.inf, q[:, qh] @ k[:, kvh].T / np.sqrt(hd))
                pr = np.exp(s - s.max(-1, keepdims=True))
                out[:, qh] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(n, nh * hd) @ W[p + "wo"].T
        f = norm(x, W[p + "ffn_norm"])
        g = f @ W[p + "w1"].T
        x = x + (g / (1 + np.exp(-g)) * (f @ W[p + "w3"].T)) @ W[p + "w2"].T
    x = norm(x, W["final_norm"])
    return x @ W["token_embedding" if h["tied_classifier"] else "classifier"].T


def q8_0_roundtrip():
    """q8_0 (model.h, version 3) against the f32 export of the same weights:
    every scale is the float16 nearest to max|x| / 127 (in float32), every q
    is round(x / scale) (ties to even) clamped to [-127, 127], so each value
    is within half a step (0.5 x scale) of the original. hidden = 2080 = 65
    groups: w2's rows hold two full blocks of 32 groups and a last of one;
    dim = 64: the other matrices' rows are a single block of 2 groups."""
    cfg = make_hf.hf_config(dim=64, hidden=2080, n_layers=1, n_heads=4, n_kv_heads=2, tied=False)
    W = make_hf.random_weights(cfg, 9)
    W["model.embed_tokens.weight"][3] = 0  # an all-zero row: scale 0, q 0
    W["model.embed_tokens.weight"][4, 32:] = 1e-9  # a group whose scale rounds to float16 0: q 0
    W["model.layers.0.mlp.down_proj.weight"][1, 1030] = 8.32e6  # scale just below float16's overflow: 65504
    d = path("q8")
    make_hf.write_hf_dir(d, cfg, W)
    _, F = read_tensors(export_ok(d + "_f32.bin", "--hf", d))
    _, Q = read_tensors(export_ok(d + "_q8.bin", "--hf", d, "--dtype", "q8_0"))
    problems = []
    worst = 0.0
    for name, x in F.items():
        if x.ndim == 1:
            if not np.array_equal(Q[name], x):
                problems.append(f"norm {name} changed")
            continue
        rows, cols = x.shape
        groups = x.reshape(rows, cols // 32, 32)
        scale16 = Q[name + ".scale"]
        if scale16.dtype != np.float16 or scale16.shape != (rows, cols // 32):
            problems.append(f"{name}: scales {scale16.dtype} {scale16.shape}, expected float16 {(rows, cols // 32)}")
            continue
        want16 = (np.abs(groups).max(axis=2) / np.float32(127)).astype(np.float16)
        if not np.array_equal(scale16, want16):
            problems.append(f"{name}: a scale is not the float16 nearest to max|x|/127")
        s = scale16.astype(np.float32)[:, :, None]
        want_q = np.where(s > 0, np.clip(np.rint(groups / np.where(s > 0, s, 1)), -127, 127), 0)
        if not np.array_equal(Q[name + ".q"].reshape(groups.shape), want_q.astype(np.int8)):
            problems.append(f"{name}: a q is not round(x / scale) clamped to [-127, 127]")
        deq = Q[name].reshape(groups.shape)
        if not np.array_equal(deq, Q[name + ".q"].reshape(groups.shape) * s):
            problems.append(f"{name}: dequantized != q * float32(scale)")
        err = np.abs(deq.astype(np.float64) - groups)
        normal = np.abs(groups).max(axis=2, keepdims=True) >= 127 * 2.0 ** -14  # scale a normal float16
        if np.any((err > s * 0.5 * (1 + 1e-6)) & normal):
            problems.append(f"{name}: an element is off by more than half a step")
        if name != "layers.0.w2":
            worst = max(worst, float(np.linalg.norm(Q[name] - x) / np.linalg.norm(x)))
    if Q["token_embedding.q"][3].any() or Q["token_embedding.scale"][3].any():
        problems.append("all-zero row did not give q 0, scale 0")
    if Q["token_embedding.q"][4, 32:64].any() or Q["token_embedding.scale"][4, 1] != 0:
        problems.append("a group of 1e-9 did not give q 0, scale 0")
    if Q["layers.0.w2.scale"][1, 1030 // 32] != 65504 or Q["layers.0.w2.q"][1, 1030] != 127:
        problems.append(f"8.32e6 gave scale {Q['layers.0.w2.scale'][1, 1030 // 32]}, q {Q['layers.0.w2.q'][1, 1030]}; "
                        "expected 65504 (float16's largest), 127")
    if worst > 0.01:
        problems.append(f"relative Frobenius error {worst:.3g}")
    T.check("q8_0_roundtrip_within_half_a_step", not problems, "; ".join(problems[:3]))
    T.check("q8_0_row_bytes_follow_model_h", q8_0_row_by_hand(d + "_q8.bin", "layers.0.w2", 1, Q), "")


def q8_0_row_by_hand(p, name, r, Q):
    """Row r of q8_0 matrix `name` decoded with struct, straight from model.h:
    cols * 17 / 16 bytes per row; blocks of g <= 32 groups: int8 q[32 g],
    then float16 scale[g]; within a block, value i of group j of a chunk of m
    <= 16 groups at chunk_start + (i // 4) * 4 * m + j * 4 + i % 4. Must equal
    what read_tensors returned."""
    h = read_header(p)
    (_, (rows, cols), off, _), = [t for t in tensor_layout(h) if t[0] == name]
    with open(p, "rb") as f:
        f.seek(off + r * cols * 17 // 16)
        row = f.read(cols * 17 // 16)
    q, scales, pos, left = [], [], 0, cols // 32
    while left:
        g = min(32, left)
        values = struct.unpack_from(f"<{32 * g}b", row, pos)
        for j in range(g):
            c0 = j // 16 * 16
            m = min(16, g - c0)
            q += [values[c0 * 32 + (i // 4) * 4 * m + (j - c0) * 4 + i % 4] for i in range(32)]
        scales += struct.unpack_from(f"<{g}e", row, pos + 32 * g)
        pos, left = pos + 34 * g, left - g
    return (pos == len(row) and list(Q[name + ".q"][r]) == q
            and Q[name + ".scale"][r].astype(float).tolist() == scales)


def ggml_q4_0_error(groups):
    """Squared error per group of GGML's Q4_0 rule (d = m / -8, m the value of
    largest |x|, d rounded to float16, q = round(x / d) clamped to [-8, 7])."""
    m = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[:, :, None], axis=2)
    d = (m / np.float32(-8)).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint(np.divide(groups, d, out=np.zeros(groups.shape), where=d != 0)), -8, 7)
    return ((groups - q * d) ** 2).sum(axis=2)


def q4_0_roundtrip():
    """q4_0 (model.h) against the f32 export of the same weights, on shapes
    whose rows end in short groups (dim 80, hidden 1060): q in [-8, 7], a
    short group's padding q = 0, dequantized = q * float32(scale), each
    group's squared error no more than GGML's rule gives, the embedding and
    classifier q8_0 unless --embedding-dtype says otherwise."""
    cfg = make_hf.hf_config(dim=80, hidden=1060, n_layers=1, n_heads=4, n_kv_heads=2, tied=False)
    W = make_hf.random_weights(cfg, 9)
    W["model.embed_tokens.weight"][3] = 0  # an all-zero row: scale 0, q 0
    d = path("q4")
    make_hf.write_hf_dir(d, cfg, W)
    _, F = read_tensors(export_ok(d + "_f32.bin", "--hf", d))
    h4, Q = read_tensors(export_ok(d + "_q4.bin", "--hf", d, "--dtype", "q4_0"))
    h44, Q44 = read_tensors(export_ok(d + "_q44.bin", "--hf", d, "--dtype", "q4_0", "--embedding-dtype", "q4_0"))
    problems, ours, ggml = [], 0.0, 0.0
    if (h4["dtype"], h4["embedding_dtype"], h4["group_size"], h44["embedding_dtype"]) != (2, 1, 32, 2):
        problems.append(f"header dtype {h4['dtype']} embedding {h4['embedding_dtype']} / {h44['embedding_dtype']}")
    for name, x in F.items():
        if x.ndim == 1:
            if not np.array_equal(Q[name], x):
                problems.append(f"norm {name} changed")
            continue
        rows, cols = x.shape
        groups = -(-cols // 32)
        padded = np.zeros((rows, groups * 32), np.float32)
        padded[:, :cols] = x
        q = Q44[name + ".q"]
        scale = Q44[name + ".scale"].astype(np.float32)
        if q.shape != (rows, groups * 32) or q.min() < -8 or q.max() > 7 or q[:, cols:].any():
            problems.append(f"{name}: q shape {q.shape}, range [{q.min()}, {q.max()}], or padding not 0")
            continue
        deq = (q.reshape(rows, groups, 32) * scale[:, :, None]).reshape(rows, -1)[:, :cols]
        if not np.array_equal(Q44[name], deq):
            problems.append(f"{name}: dequantized != q * float32(scale)")
        g = padded.reshape(rows, groups, 32).astype(np.float64)
        err = ((g - q.reshape(g.shape) * scale[:, :, None]) ** 2).sum(axis=2)
        ref = ggml_q4_0_error(g)
        if np.any(err > ref * (1 + 1e-5) + 1e-30):
            problems.append(f"{name}: a group's squared error exceeds GGML's rule's")
        ours, ggml = ours + err.sum(), ggml + ref.sum()
        if name in ("token_embedding", "classifier") and not np.array_equal(Q[name + ".q"].shape, (rows, groups * 32)):
            problems.append(f"{name}: q8_0 embedding shape")
    if Q44["token_embedding.q"][3].any() or Q44["token_embedding.scale"][3].any():
        problems.append("all-zero row did not give q 0, scale 0")
    if not np.array_equal(Q["token_embedding"], read_tensors(export_ok(d + "_q8.bin", "--hf", d, "--dtype", "q8_0"))[1]
                          ["token_embedding"]):
        problems.append("the default q4_0 export's embedding is not the q8_0 export's")
    if not ours < 0.97 * ggml:
        problems.append(f"squared error {ours:.4g}, GGML's rule {ggml:.4g}: the scale search gains under 3 %")
    T.check("q4_0_roundtrip_no_worse_than_ggml_per_group", not problems, "; ".join(problems[:3]))
    T.check("q4_0_row_bytes_follow_model_h", q4_0_row_by_hand(d + "_q4.bin", "layers.0.w2", 1, Q), "")


def q4_0_row_by_hand(p, name, r, Q):
    """Row r of q4_0 matrix `name` decoded with struct, straight from model.h:
    ceil(cols / 32) groups of 18 bytes per row; blocks of g <= 32 groups: 16 g
    bytes of values, then float16 scale[g]; within a block, value i of group
    j of a chunk of m <= 16 groups in byte chunk_start + (i // 8) * 4 * m +
    j * 4 + i % 4, its low 4 bits if i % 8 < 4, as q + 8."""
    h = read_header(p)
    (_, (rows, cols), off, _), = [t for t in tensor_layout(h) if t[0] == name]
    n_groups = -(-cols // 32)
    with open(p, "rb") as f:
        f.seek(off + r * 18 * n_groups)
        row = f.read(18 * n_groups)
    q, scales, pos, left = [], [], 0, n_groups
    while left:
        g = min(32, left)
        values = row[pos:pos + 16 * g]
        for j in range(g):
            c0 = j // 16 * 16
            m = min(16, g - c0)
            q += [(values[c0 * 16 + (i // 8) * 4 * m + (j - c0) * 4 + i % 4] >> (4 * (i % 8 // 4)) & 15) - 8
                  for i in range(32)]
        scales += struct.unpack_from(f"<{g}e", row, pos + 16 * g)
        pos, left = pos + 18 * g, left - g
    return (pos == len(row) and list(Q[name + ".q"][r]) == q
            and Q[name + ".scale"][r].astype(float).tolist() == scales)


def ggml_blocks_repack_bit_exactly():
    """export.q8_0_rows / q4_0_rows take integer values and float16 scales
    (the GGUF reader's entry points): GGML blocks (Q4_0: nibble u = q + 8,
    values j and j + 16 in one byte; Q8_0: int8) written through them and
    read back by model.h give the same integers and the same scale bits."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))
    import export as ex
    ex.need_numpy("test")
    rng = np.random.default_rng(3)
    rows, groups = 3, 70  # two full blocks and a short one with a short chunk
    qs = rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8)  # GGML Q4_0 qs[16] per block
    u = np.concatenate([qs & 15, qs >> 4], axis=2)  # value j: low bits of qs[j]; value j + 16: high bits
    d = rng.standard_normal((rows, groups)).astype(np.float16)
    raw = ex.q4_0_rows(u.reshape(rows, -1).astype(np.int8) - 8, d)
    from testlib import read_q8_0_rows
    q4, d4 = read_q8_0_rows(raw.ravel(), rows, groups * 32, bits=4)
    q8 = rng.integers(-128, 128, (rows, groups * 32), dtype=np.int8)
    q8b, d8 = read_q8_0_rows(ex.q8_0_rows(q8, d).ravel(), rows, groups * 32, bits=8)
    T.check("ggml_q4_0_and_q8_0_blocks_repack_bit_exactly",
            np.array_equal(q4, u.reshape(rows, -1).astype(np.int8) - 8) and d4.view(np.uint16).tolist() == d.view(np.uint16).tolist()
            and np.array_equal(q8b, q8) and np.array_equal(d8.view(np.uint16), d.view(np.uint16)), "values or scales differ")


def random_exports():
    a = export_ok(path("rand_a.bin"), "--random", "--seed", "1")
    b = export_ok(path("rand_b.bin"), "--random", "--seed", "1")
    c = export_ok(path("rand_c.bin"), "--random", "--seed", "2")
    T.check("random_same_seed_same_bytes_other_seed_differs", sha(a) == sha(b) != sha(c), "")
    check_layout("random_file_size_alignment_and_padding", a)
    h, E = read_tensors(a)
    mats = np.concatenate([v.ravel() for k, v in E.items() if v.ndim == 2])
    norms = np.concatenate([v.ravel() for k, v in E.items() if v.ndim == 1])
    T.check("random_weights_have_llama_like_statistics",
            abs(mats.std() - 0.02) < 0.002 and abs(mats.mean()) < 0.001 and abs(norms.mean() - 1) < 0.02
            and 0 < norms.std() < 0.2, f"matrix std {mats.std():.4f}, norm mean {norms.mean():.3f} std {norms.std():.3f}")
    toks = read_tokenizer_section(a)
    T.check("random_builtin_tokenizer_is_bytes_then_specials",
            len(toks) == 512 and all(toks[i][2] == bytes([i]) and toks[i][1] == 0 for i in range(256))
            and [t[2] for t in toks[256:261]] == [b"<|begin_of_text|>", b"<|end_of_text|>", b"<|start_header_id|>",
                                                  b"<|end_header_id|>", b"<|eot_id|>"]
            and all(t[1] == 1 for t in toks[256:]) and toks[511][2] == b"<|reserved_special_token_250|>"
            and h["bos_id"] == 256 and h["stop_ids"] == [257, 260] and h["tokenizer_kind"] == 2,
            f"bos {h['bos_id']}, stops {h['stop_ids']}, token 256 {toks[256] if len(toks) > 256 else None}")
    p = export_ok(path("rand_preset.bin"), "--random", "--preset", "llama3.2-1b", "--dim", "64", "--hidden-dim", "128",
                  "--n-layers", "1", "--n-heads", "4", "--n-kv-heads", "1", "--vocab-size", "300", "--untied",
                  "--dtype", "q8_0")
    h = read_header(p)
    want = dict(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=16, vocab_size=300,
                max_seq_len=131072, rope_theta=500000.0, rope_scaling=1, rope_factor=32.0, rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_pos=8192, tied_classifier=0, dtype=1, group_size=32)
    bad = {k: (h[k], v) for k, v in want.items() if h[k] != v}
    T.check("random_preset_keeps_llama3_rope_under_shape_overrides", not bad, f"(got, want): {bad}")
    check_layout("random_untied_q8_0_layout", p)
    if os.path.exists(TOK512):
        p = export_ok(path("rand_tok512.bin"), "--random", "--vocab-size", "512", "--tokenizer", TOK512)
        h = read_header(p)
        T.check("random_with_llama2c_tokenizer", h["tokenizer_kind"] == 1 and h["bos_id"] == 1
                and h["stop_ids"] == [1, 2], f"{h['tokenizer_kind']}, {h['bos_id']}, {h['stop_ids']}")
    else:
        T.missing("random_with_llama2c_tokenizer", TOK512)


def main():
    T.run("refusals", refusal_cases)
    T.run("failed_export_keeps_existing_output", failed_export_keeps_existing_file)
    T.run("hf_header_fields_read_back", hf_header_fields)
    T.run("llama2c_header_fields_read_back", llama2c_header_fields)
    T.run("llama2c_export_works_without_numpy", llama2c_without_numpy)
    T.run("bf16_f16_f32_and_sharded_inputs_export_identically", dtypes_and_shards_identical)
    T.run("adjacent_pair_rope_on_exported_weights_matches_reference", weights_land_in_the_right_place)
    T.run("q8_0_roundtrip_within_half_a_step", q8_0_roundtrip)
    T.run("q4_0_roundtrip_no_worse_than_ggml_per_group", q4_0_roundtrip)
    T.run("ggml_q4_0_and_q8_0_blocks_repack_bit_exactly", ggml_blocks_repack_bit_exactly)
    T.run("random_exports", random_exports)
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
