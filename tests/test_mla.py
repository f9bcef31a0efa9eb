"""test_mla.py - multi-head latent attention: the engine's MLA layer against
reference_mla.py (DeepSeek-V2's equations, explicit form), and export.py's
conversion of GQA/MHA checkpoints into it.

  engine   random MLA checkpoints (export.py --random --kv-latent-dim N
           --kv-rope-dim R) of several latent / RoPE sizes, head shapes, RoPE
           scaling, untied classifier: logits within 1e-4 of the reference,
           token by token and in prefill blocks; q8_0 weights within 1e-4 of
           the reference on the dequantized weights (f32 activations, or
           activations rounded to q8_0 where the engine's int8 kernels take
           them);
  full     --mla full (the lossless conversion) of every reference shape
           (MHA, GQA x2 and x4, MQA, head_dim != dim/n_heads, untied, Llama
           3.1 RoPE scaling, odd sizes), of the two real llama2.c
           checkpoints and of a GGUF: perplexity equal to the source's within
           1e-5 relative, logits within 1e-4 of reference.py's source model;
  lossy    --mla N --calib TEXT: the file matches reference_mla, caches N
           numbers, and is a different model from the source;
  kv       --kv-type f32 / f16 / q8_0: logits within 1e-4 of the reference
           whose cached c and k_R are rounded as the cache keeps them (or
           nearer it than half their distance from the exact one: a number
           within float32 rounding of a rounding boundary may round the
           other way), and the same logits at 1, 2 and 3 threads;
  info     attention: mla, kv_latent_dim, kv_rope_dim, kv_bytes_per_token =
           n_layers x (kv_latent_dim + kv_rope_dim) x 4;
  refuse   ./run MLA --kv-heads K; export.py --mla with --kv-heads, N above
           full, N < 1, a lossy N without --calib, --calib without --mla:
           one error line each.
Set VERBOSE=1 to print the measured errors.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_writer as gw  # noqa: E402
import make_hf  # noqa: E402
import reference  # noqa: E402
import reference_mla  # noqa: E402
from testlib import (Checks, LOGITS, RUN, engine, engine_built, engine_logits, engine_ppl,  # noqa: E402
                     export, export_ok, in_dir, llama2c_files, note, read_header,
                     read_tensors, rel_err, scratch, write_text)

T = Checks()
TMP = scratch("mla-")
TOL, PPL_EXACT = 1e-4, 1e-5

TEXT = ("Lily found a small key under the old oak tree. She asked her mother what it opened, but her mother did "
        "not know. Every day Lily tried the key in a new door: the shed, the garden gate, the blue box in the "
        "attic. At last it opened her grandfather's music box, and a little song filled the room.")


path = in_dir(TMP)


def random_ids(h, n, seed):
    first = [h["bos_id"]] if h["bos_id"] >= 0 else []
    return first + list(np.random.default_rng(seed).integers(0, h["vocab_size"], n - len(first)))


# ----------------------------------------------------------------------------
# The engine's MLA against the reference, on random MLA checkpoints

RANDOM_SHAPES = [  # name, export.py flags
    ("latent24_rope8_4_heads", ["--n-heads", 4, "--kv-latent-dim", 24, "--kv-rope-dim", 8]),
    ("latent16_rope2_8_heads_untied_llama31", ["--n-heads", 8, "--kv-latent-dim", 16, "--kv-rope-dim", 2,
                                               "--untied", "--rope-scaling", "llama3", "--rope-original-max-pos", 32,
                                               "--rope-theta", 500000]),
    ("latent100_rope16_head_dim_16_dim_96", ["--dim", 96, "--n-heads", 6, "--head-dim", 16, "--kv-latent-dim", 100,
                                             "--kv-rope-dim", 16, "--n-layers", 3, "--hidden-dim", 100]),
    ("latent7_rope4_one_head", ["--n-heads", 1, "--head-dim", 12, "--kv-latent-dim", 7, "--kv-rope-dim", 4]),
]


def engine_matches_reference(name, flags):
    model = export_ok(path(name + ".bin"), "--random", "--seed", 7, *flags)
    h, W = read_tensors(model)
    ids = random_ids(h, 40, 3)
    ref = reference_mla.forward(h, W, ids)
    for block, threads, label in [(1, 1, "token_by_token"), (20, 2, "prefill_blocks")]:
        got = engine_logits(model, ids, "-B", block, "-T", threads)
        err = rel_err(got, ref)
        note(f"{name} B={block}", err)
        T.check(f"mla_{name}_logits_{label}_match_reference", got.shape == ref.shape and err <= TOL,
                f"relative error {err:.3g}")
    # the attention is not trivial: a model without its RoPE key's positions differs
    flat = dict(W)
    for l in range(h["n_layers"]):
        flat[f"layers.{l}.rope_pairs"] = np.zeros_like(W[f"layers.{l}.rope_pairs"])
    T.check(f"mla_{name}_rope_pairs_matter", rel_err(reference_mla.forward(h, flat, ids), ref) > 100 * TOL
            or h["kv_rope_dim"] == 2, "the reference does not depend on rope_pairs")


def kv_types_match_reference(latent):
    """--kv-type f16 / q8_0 on an MLA model: the logits against the reference whose cached c and k_R are
    rounded as that cache keeps them; and the same logits at 1, 2 and 3 threads (-T 1 == -T 2)."""
    model = export_ok(path(f"kv_{latent}.bin"), "--random", "--seed", 11, "--dim", 64, "--n-heads", 4,
                      "--head-dim", 32, "--kv-latent-dim", latent, "--kv-rope-dim", 32)
    h, W = read_tensors(model)
    ids = random_ids(h, 40, 6)
    exact = reference_mla.forward(h, W, ids)
    for kind in ("f32", "f16", "q8_0"):
        ref = reference_mla.forward(h, W, ids, kv_cache=kind)
        runs = {(block, threads): engine_logits(model, ids, "-B", block, "-T", threads, "-k", kind)
                for block, threads in [(1, 1), (1, 2), (1, 3), (20, 2)]}
        for (block, threads), got in runs.items():
            err, from_exact = rel_err(got, ref), rel_err(got, exact)
            note(f"kv {kind} latent {latent} B={block} T={threads}", err)
            # (as test_reference.py: a cached number whose float32 value lies within rounding error of a
            # q8_0 / f16 rounding boundary may round the other way than the float64 reference's)
            T.check(f"mla_latent{latent}_kv_{kind}_B{block}_T{threads}_logits_match_reference_with_{kind}_cache",
                    err <= TOL or err <= from_exact / 2,
                    f"relative error {err:.3g}; from the exact reference {from_exact:.3g}")
        T.check(f"mla_latent{latent}_kv_{kind}_logits_equal_at_1_2_and_3_threads",
                all(np.array_equal(runs[(1, 1)], runs[(1, t)]) for t in (2, 3)), "a thread count changes the logits")


def q8_0_matches_reference(latent):
    """latent 512: W_UV's rows are int8 (512 values); latent 64: dequantized at load; W_UK^T (head_dim 32) is
    read as its columns (f32 queries times its int8 values and scales)."""
    model = export_ok(path(f"q8_{latent}.bin"), "--random", "--seed", 9, "--dim", 64, "--n-heads", 2,
                      "--head-dim", 32, "--kv-latent-dim", latent, "--kv-rope-dim", 8, "--untied", "--dtype", "q8_0")
    h, W = read_tensors(model)
    ids = random_ids(h, 24, 4)
    refs = {"f32 activations": reference_mla.forward(h, W, ids),
            "q8_0 activations": reference_mla.forward(h, W, ids, q8_0_activations=True)}
    for block, threads in [(1, 1), (len(ids), 2)]:
        got = engine_logits(model, ids, "-B", block, "-T", threads)
        per_pos = {k: np.max(np.abs(got - r), axis=1) / np.max(np.abs(r)) for k, r in refs.items()}
        best = np.minimum(*per_pos.values())
        note(f"q8_0 latent {latent} B={block}", float(best.max()))
        T.check(f"mla_q8_0_latent{latent}_logits_B{block}_match_reference_on_dequantized_weights", best.max() <= TOL,
                f"worst position {int(best.argmax())}: {best.max():.3g} from the nearer reference")


# ----------------------------------------------------------------------------
# --mla full: exact on every reference shape

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def full_shapes():
    C = make_hf.hf_config
    return [
        ("mha", C(dim=64, hidden=160, n_layers=2, n_heads=4, n_kv_heads=4)),
        ("gqa_kv_mul2", C(dim=64, hidden=128, n_layers=2, n_heads=8, n_kv_heads=4)),
        ("gqa_kv_mul4", C(dim=128, hidden=256, n_layers=2, n_heads=8, n_kv_heads=2)),
        ("mqa", C(dim=64, hidden=128, n_layers=2, n_heads=4, n_kv_heads=1)),
        ("head_dim_32_dim_64_4_heads", C(dim=64, hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32)),
        ("untied_classifier", C(dim=64, hidden=128, n_layers=2, n_heads=4, n_kv_heads=2, tied=False)),
        ("llama31_rope_scaling", C(dim=128, hidden=256, n_layers=2, n_heads=4, n_kv_heads=2, theta=500000.0,
                                   max_pos=512, rope_scaling=LLAMA31)),
        ("odd_sizes_dim96_hidden172", C(dim=96, hidden=172, n_layers=3, n_heads=6, n_kv_heads=3, vocab=333)),
    ]


def full_is_exact(name, cfg):
    d = path("full_" + name)
    make_hf.write_hf_dir(d, cfg, make_hf.random_weights(cfg, 5))
    src = export_ok(d + ".bin", "--hf", d)
    mla = export_ok(d + "_mla.bin", "--hf", d, "--mla", "full")
    h = read_header(mla)
    kv = cfg["num_key_value_heads"] * reference.head_dim_of(cfg)
    T.check(f"mla_full_{name}_header", h["attention"] == 1 and h["n_kv_heads"] == 1 and h["kv_latent_dim"] == kv
            and h["kv_rope_dim"] == kv, f"attention {h['attention']}, sizes {h['kv_latent_dim']} + {h['kv_rope_dim']}")
    text = write_text(TMP, "full_" + name, TEXT)
    a, b = engine_ppl(src, text), engine_ppl(mla, text)
    note(f"--mla full {name}: ppl {a:.6f} vs {b:.6f}", abs(a - b) / a)
    T.check(f"mla_full_{name}_ppl_equals_source", abs(a - b) / a <= PPL_EXACT,
            f"source {a:.7f}, MLA {b:.7f} (relative {abs(a - b) / a:.3g})")
    rcfg, W = reference.load_hf_dir(d)
    ids = [cfg["bos_token_id"]] + list(np.random.default_rng(2).integers(0, cfg["vocab_size"], 29))
    err = rel_err(engine_logits(mla, ids, "-B", 10), reference.forward(rcfg, W, ids))
    note(f"--mla full {name}: logits vs reference.py", err)
    T.check(f"mla_full_{name}_logits_match_reference", err <= TOL, f"relative error {err:.3g}")


def full_is_exact_llama2c(name, model_file, tok_file, chars):
    (mpath, tpath, corpus), missing = llama2c_files(model_file, tok_file)
    if missing:
        return T.missing(f"mla_full_{name}_ppl_equals_source", missing)
    src = export_ok(path(name + ".bin"), "--llama2c", mpath, "--tokenizer", tpath)
    mla = export_ok(path(name + "_mla.bin"), "--llama2c", mpath, "--tokenizer", tpath, "--mla", "full")
    with open(corpus, encoding="utf-8") as f:
        text = write_text(TMP, name, f.read(chars))
    a, b = engine_ppl(src, text), engine_ppl(mla, text)
    note(f"--mla full {name}: ppl {a:.6f} vs {b:.6f}", abs(a - b) / a)
    T.check(f"mla_full_{name}_ppl_equals_source", abs(a - b) / a <= PPL_EXACT,
            f"source {a:.7f}, MLA {b:.7f} (relative {abs(a - b) / a:.3g})")
    return src, mla, text


def full_is_exact_gguf():
    """--mla from the fourth source, a GGUF (F32 matrices: the same numbers as the source export)."""
    cfg = make_hf.hf_config(dim=64, hidden=128, n_layers=2, n_heads=4, n_kv_heads=2)
    meta, tensors = gw.hf_to_gguf(cfg, make_hf.random_weights(cfg, 6), "F32",
                                  gw.llama3_tokenizer(make_hf.synthetic_tokenizer(300), bos=270, eos=271, eot=274))
    g = path("full.gguf")
    gw.write_gguf(g, meta, tensors)
    src = export_ok(path("gguf.bin"), "--gguf", g)
    mla = export_ok(path("gguf_mla.bin"), "--gguf", g, "--mla", "full")
    text = write_text(TMP, "gguf", TEXT)
    a, b = engine_ppl(src, text), engine_ppl(mla, text)
    note(f"--mla full gguf: ppl {a:.6f} vs {b:.6f}", abs(a - b) / a)
    T.check("mla_full_from_gguf_ppl_equals_source", read_header(mla)["attention"] == 1 and abs(a - b) / a <= PPL_EXACT,
            f"source {a:.7f}, MLA {b:.7f} (relative {abs(a - b) / a:.3g})")


# ----------------------------------------------------------------------------
# Lossy --mla N --calib TEXT

def lossy_matches_reference():
    calib = write_text(TMP, "calib", TEXT * 3)
    flags = ["--random", "--seed", 3, "--n-heads", 8, "--n-kv-heads", 4, "--max-seq-len", 64]  # short windows: the refits' cost ~ T^2
    src = export_ok(path("lossy_src.bin"), *flags)
    hs = read_header(src)
    for N, rope in [(48, None), (20, 4), (9, 2)]:
        extra = ["--mla-rope-dim", rope] if rope else []
        model = export_ok(path(f"lossy{N}.bin"), *flags, "--mla", N, "--calib", calib, *extra)
        h, W = read_tensors(model)
        ids = random_ids(h, 30, N)
        err = rel_err(engine_logits(model, ids, "-B", 30), reference_mla.forward(h, W, ids))
        note(f"lossy --mla {N}: engine vs reference_mla", err)
        T.check(f"mla_lossy_{N}_logits_match_reference", err <= TOL, f"relative error {err:.3g}")
        T.check(f"mla_lossy_{N}_caches_{N}_numbers", h["kv_latent_dim"] + h["kv_rope_dim"] == N
                and (rope is None or h["kv_rope_dim"] == rope), f"{h['kv_latent_dim']} + {h['kv_rope_dim']}")
        diff = rel_err(engine_logits(model, ids), engine_logits(src, ids))
        T.check(f"mla_lossy_{N}_is_a_different_model", diff > 1e-3, f"logits differ by {diff:.3g} only")
    full = 2 * hs["n_kv_heads"] * hs["head_dim"]
    model = export_ok(path("lossy_full.bin"), *flags, "--mla", full)  # N = full needs no calibration: exact
    ids = random_ids(hs, 20, 1)
    err = rel_err(engine_logits(model, ids), engine_logits(src, ids))
    T.check("mla_n_equal_to_full_is_the_exact_conversion", err <= 1e-5, f"relative error {err:.3g}")
    # the calibrated path at full size (every key pair keeps RoPE, the latent holds every value): exact
    # too, through the PCA and both least-squares refits
    small = ["--random", "--seed", 4, "--dim", 32, "--n-heads", 4, "--n-kv-heads", 2, "--max-seq-len", 64]
    src = export_ok(path("lossy_small_src.bin"), *small)
    model = export_ok(path("lossy_full_rank.bin"), *small, "--mla", 32, "--mla-rope-dim", 16, "--calib", calib)
    err = rel_err(engine_logits(model, ids), engine_logits(src, ids))
    note("calibrated --mla full: engine vs source", err)
    T.check("mla_calibrated_conversion_at_full_rank_is_exact", err <= 1e-4, f"relative error {err:.3g}")


# ----------------------------------------------------------------------------
# The lossy conversion's least-squares refits (export.refit_keys, refit_values)

def mla_logits(H, hd, dc, dr, t, x, freq):
    """Scores (H, T, T) of MLA tensors t on normed input x, explicit form
    (reference_mla's equations 9-18), -inf above the diagonal."""
    T = len(x)
    pos = np.arange(T)
    c = x @ t["wkv_a"][:dc].T
    k_R = reference_mla.rope_adjacent(x @ t["wkv_a"][dc:].T, freq, pos)
    k_C = np.einsum("hcd,tc->htd", t["wk_b"].reshape(H, dc, hd), c)
    q_C = (x @ t["wq"].T).reshape(T, H, hd).transpose(1, 0, 2)
    q_R = reference_mla.rope_adjacent((x @ t["wq_rope"].T).reshape(T, H, dr).transpose(1, 0, 2), freq, pos)
    s = (q_C @ k_C.transpose(0, 2, 1) + q_R @ k_R.T) / np.sqrt(hd + dr)
    return np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def refits_fit_planted_models_and_lower_their_objectives():
    """refit_keys minimizes sum_t sum_p a*_tp (e_tp - sum_p' a*_tp' e_tp')^2
    over W_UK and the RoPE query (e: score error against the source, a*:
    the source's attention); refit_values minimizes |sum_h wo_h W_UV_h o_h -
    y*|^2 over W_UV (o_h: the layer's own attention over the latents, y*:
    the source's output). A source that is itself an MLA layer of the
    reachable form (other W_UK, W_UV, RoPE query = A_h^T wq_h) is recovered
    to rounding; a GQA source's objectives drop."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))
    import export as ex
    ex.need_numpy("test")
    rng = np.random.default_rng(11)
    H, G, hd, dim, dc, dr = 4, 2, 8, 24, 6, 4
    c = ex.Config(dim=dim, hidden_dim=32, n_layers=1, n_heads=H, n_kv_heads=G, head_dim=hd, vocab_size=64,
                  max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tied_classifier=True)
    head_freq = ex.rope_frequencies(c)
    xs = [rng.standard_normal((n, dim)) for n in (48, 40, 33)]
    Wq, Wo = rng.standard_normal((H * hd, dim)) / 3, rng.standard_normal((dim, H * hd)) / 5

    def mla_tensors():
        A = rng.standard_normal((H, hd, dr))
        return {"rope_pairs": np.asarray([0, 3], dtype=np.int32), "wq": Wq, "wkv_a": rng.standard_normal((dc + dr, dim)) / 3,
                "wq_rope": np.concatenate([A[h].T @ Wq[h * hd:(h + 1) * hd] for h in range(H)]),
                "wk_b": rng.standard_normal((H * dc, hd)), "wv_b": rng.standard_normal((H * hd, dc))}

    t0 = mla_tensors()
    freq = head_freq[t0["rope_pairs"]]
    logits = lambda t, x: mla_logits(H, hd, dc, dr, t, x, freq)

    def key_objective(t, source):
        total = 0.0
        for x in xs:
            s_star, a = source(x)
            L, e = logits(t, x), np.zeros_like(s_star)
            m = np.isfinite(L)
            e[m] = L[m] - s_star[m]
            total += float(np.sum(a * (e - np.sum(a * e, -1, keepdims=True)) ** 2))
        return total

    def model(t):
        def parts(x, pos):
            return softmax(logits(t, x)), x @ t["wkv_a"][:dc].T, None
        return parts

    def output(t, x):
        att, lat, _ = model(t)(x, None)
        return np.concatenate([att[h] @ lat @ t["wv_b"][h * hd:(h + 1) * hd].T for h in range(H)], 1) @ Wo.T

    def value_objective(t, target):
        return sum(float(np.sum((output(t, x) - target(i, x, None)) ** 2)) for i, x in enumerate(xs))

    def gqa_logits(x):  # the source: GQA with RoPE on every pair
        Wk = gqa_logits.Wk
        T, pos = len(x), np.arange(len(x))
        q = reference_mla.rope_adjacent((x @ Wq.T).reshape(T, H, hd).transpose(1, 0, 2), head_freq, pos)
        k = reference_mla.rope_adjacent((x @ Wk.T).reshape(T, G, hd).transpose(1, 0, 2), head_freq, pos)
        s = q @ np.repeat(k, H // G, 0).transpose(0, 2, 1) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
        return s, softmax(s)
    gqa_logits.Wk = rng.standard_normal((G * hd, dim)) / 3

    planted = dict(t0, wk_b=rng.standard_normal((H * dc, hd)), wv_b=rng.standard_normal((H * hd, dc)),
                   wq_rope=mla_tensors()["wq_rope"])
    planted_src = lambda x, pos=None: (logits(planted, x), softmax(logits(planted, x)))
    planted_out = lambda i, x, pos: output(dict(planted, wv_b=planted["wv_b"]), x)
    gqa_out = {i: rng.standard_normal((len(x), dim)) for i, x in enumerate(xs)}
    ridge = ex.MLA_RIDGE
    for name, source, before in [("planted", planted_src, t0), ("gqa", gqa_logits, t0)]:
        ex.MLA_RIDGE = 1e-12 if name == "planted" else ridge  # recovered to rounding, not to the ridge's pull
        after = ex.refit_keys(c, before, Wq, xs, head_freq, lambda x, pos: source(x))
        b, a = key_objective(before, source), key_objective(after, source)
        note(f"refit_keys {name}: objective {b:.4g} -> {a:.4g}", a / b)
        T.check(f"mla_refit_keys_{name}_" + ("recovers_it" if name == "planted" else "lowers_the_score_error"),
                a <= (1e-8 if name == "planted" else 0.9) * b, f"objective {b:.4g} -> {a:.4g}")
        # the values, with the refitted keys' attention
        target = planted_out if name == "planted" else (lambda i, x, pos: gqa_out[i])
        fitted = ex.refit_values(c, after, Wo, xs, model(after), target)
        b, a = value_objective(after, target), value_objective(fitted, target)
        note(f"refit_values {name}: objective {b:.4g} -> {a:.4g}", a / b)
        T.check(f"mla_refit_values_{name}_" + ("recovers_it" if name == "planted" else "lowers_the_output_error"),
                a <= (1e-8 if name == "planted" else 0.9) * b, f"objective {b:.4g} -> {a:.4g}")
    ex.MLA_RIDGE = ridge
    # a layer too big for one system: W_UV by sweeps over the heads reaches the joint solution's error
    limit, ex.MLA_REFIT_MAX_UNKNOWNS = ex.MLA_REFIT_MAX_UNKNOWNS, H * hd * dc - 1
    swept = ex.refit_values(c, after, Wo, xs, model(after), target)
    ex.MLA_REFIT_MAX_UNKNOWNS = limit
    s = value_objective(swept, target)
    note(f"refit_values by head sweeps: objective {s:.4g}, joint {a:.4g}", s / a - 1)
    T.check("mla_refit_values_head_sweeps_reach_the_joint_solution", s <= 1.01 * a, f"objective {s:.4g}, joint {a:.4g}")


# ----------------------------------------------------------------------------
# -m info, and refusals

def info_lines():
    for name, flags in [("native", ["--kv-latent-dim", 24, "--kv-rope-dim", 8, "--n-layers", 3]),
                        ("full", ["--n-heads", 4, "--n-kv-heads", 2, "--mla", "full"])]:
        model = export_ok(path(f"info_{name}.bin"), "--random", *flags)
        h = read_header(model)
        out = engine(model, "-m", "info", "-c", 100)
        kv = dict(re.findall(r"^(\w+): (\S+)", out, re.M))
        want = h["n_layers"] * (h["kv_latent_dim"] + h["kv_rope_dim"]) * 4
        T.check(f"info_{name}_mla_prints_attention_sizes_and_kv_bytes",
                kv.get("attention") == "mla" and int(kv["kv_latent_dim"]) == h["kv_latent_dim"]
                and int(kv["kv_rope_dim"]) == h["kv_rope_dim"] and int(kv["kv_bytes_per_token"]) == want
                and int(kv["kv_bytes_context"]) == want * 100 and re.search(rf"^\* MLA latent\s+-\s+{want}\s", out, re.M),
                f"{ {k: kv.get(k) for k in ('attention', 'kv_latent_dim', 'kv_rope_dim', 'kv_bytes_per_token')} }, want {want}")
    gqa = export_ok(path("info_gqa.bin"), "--random")
    T.check("info_gqa_prints_attention_gqa", "\nattention: gqa\n" in engine(gqa, "-m", "info"), "no 'attention: gqa' line")


def refusals():
    model = export_ok(path("refuse.bin"), "--random", "--n-heads", 4, "--kv-latent-dim", 24, "--kv-rope-dim", 8)
    for K in (1, 2):
        r = subprocess.run([RUN, model, "-m", "info", "--kv-heads", str(K)], capture_output=True, text=True)
        want = ("error: --kv-heads does not apply to an MLA model: its cache is one latent of 24 numbers and a "
                "RoPE key of 8 per position, shared by all 4 query heads")
        T.check(f"engine_refuses_kv_heads_{K}_on_mla", r.returncode == 1 and r.stderr.strip() == want,
                f"exit {r.returncode}: {r.stderr.strip()!r}")
    src = ["--random", "--n-heads", 4, "--n-kv-heads", 2]  # head_dim 16: full = 64
    calib = write_text(TMP, "refuse_calib", TEXT)
    cases = [
        ("with_kv_heads", ["--mla", "full", "--kv-heads", 1],
         "error: --mla and --kv-heads cannot be combined: --mla converts the checkpoint's own 2 KV heads into one latent"),
        ("above_full", ["--mla", 65, "--calib", calib],
         "error: --mla 65 is more than full: this model's full conversion caches 2 x n_kv_heads x head_dim = "
         "2 x 2 x 16 = 64 numbers per token and layer"),
        ("zero", ["--mla", 0], "error: --mla expects a positive number of cached numbers per token and layer, "
                               "or full; got '0'"),
        ("negative", ["--mla", -3], "error: --mla expects a positive number of cached numbers per token and layer, "
                                    "or full; got '-3'"),
        ("not_a_number", ["--mla", "half"], "error: --mla expects a positive number of cached numbers per token and "
                                            "layer, or full; got 'half'"),
        ("lossy_without_calib", ["--mla", 32], "error: --mla 32 is lossy (full is 64): it needs calibration text, "
                                               "--calib TEXT.txt"),
        ("calib_without_mla", ["--calib", calib], "error: --calib and --mla-rope-dim only apply to a conversion "
                                                  "with --mla N"),
        ("odd_rope_dim", ["--mla", 32, "--calib", calib, "--mla-rope-dim", 5],
         "error: --mla-rope-dim 5 must be even, at least 2, less than N (32) and at most n_kv_heads x head_dim (32)"),
        ("native_with_mla", ["--kv-latent-dim", 8, "--kv-rope-dim", 4, "--mla", "full"],
         "error: --kv-latent-dim writes random MLA weights directly: drop --mla / --kv-heads"),
    ]
    for name, flags, want in cases:
        out = path(f"refused_{name}.bin")
        r = export(out, *src, *flags)
        T.check(f"export_mla_{name}_is_refused", r.returncode == 1 and r.stderr.strip() == want
                and not os.path.exists(out) and not os.path.exists(out + ".tmp"),
                f"exit {r.returncode}: {r.stderr.strip()[-300:]!r}")


def main():
    if not engine_built():
        T.fail("engine_built", f"{RUN} or {LOGITS} missing: run `make run tests/logits`")
        return
    try:
        for name, flags in RANDOM_SHAPES:
            T.run(f"mla_{name}_logits_token_by_token_match_reference", engine_matches_reference, name, flags)
        for latent in (512, 64):
            T.run(f"mla_q8_0_latent{latent}_logits_B1_match_reference_on_dequantized_weights", q8_0_matches_reference,
                  latent)
        for latent in (512, 96):
            T.run(f"mla_latent{latent}_kv_types_match_reference", kv_types_match_reference, latent)
        for name, cfg in full_shapes():
            T.run(f"mla_full_{name}_ppl_equals_source", full_is_exact, name, cfg)
        T.run("mla_full_stories260K_ppl_equals_source", full_is_exact_llama2c, "stories260K", "stories260K.bin",
              "tok512.bin", 3000)
        T.run("mla_full_aidreams260K_ppl_equals_source", full_is_exact_llama2c, "aidreams260K", "aidreams260K.bin",
              "aidreams260K-tok512.bin", 1500)
        T.run("mla_full_from_gguf_ppl_equals_source", full_is_exact_gguf)
        T.run("mla_lossy_48_logits_match_reference", lossy_matches_reference)
        T.run("mla_refits_fit_planted_models_and_lower_their_objectives", refits_fit_planted_models_and_lower_their_objectives)
        T.run("info_native_mla_prints_attention_sizes_and_kv_bytes", info_lines)
        T.run("engine_refuses_kv_heads_1_on_mla", refusals)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
