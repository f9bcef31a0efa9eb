"""test_kv_heads.py - changing the number of KV heads: ./run --kv-heads K at
load time and export.py --kv-heads K on the way out.

  repeat   K > n_kv_heads repeats each KV head: the logits equal the
           original model's (relative 1e-6), token by token and in blocks;
  pool     K < n_kv_heads mean-pools adjacent KV heads: ./run -m ppl equals
           reference.py on a pooled HF model, pooled here in HF's own row
           layout (rotate_half order; whole heads, so it commutes with the
           export's un-permutation): relative 1e-4, for random GQA models and
           the two real llama2.c checkpoints (GQA 8/4 and MHA 4/4);
  export   a file exported with --kv-heads K gives the logits of ./run
           --kv-heads K on the original (f32: relative 1e-6; q8_0: repeat
           exact, pooling close), from --hf, --random and --llama2c; q8_0
           pools in f32, then quantizes once;
  refuse   an impossible K is the same one-line error from both;
  bytes    kv_bytes_per_token = n_layers x 2 x n_kv_heads x head_dim x 4
           (f32 cache) for MHA, GQA, MQA and head_dim != dim / n_heads,
           before and after --kv-heads, and the kv_cache_table's rows.
Set VERBOSE=1 to print the measured errors.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf  # noqa: E402
import reference  # noqa: E402
from testlib import (Checks, EXPORT, LOGITS, RUN, engine, engine_built, engine_logits, engine_ppl,  # noqa: E402
                     engine_tokens, export, export_ok, in_dir, llama2c_files, llama2c_to_hf, note,
                     read_header, read_llama2c, read_tensors, rel_err, scratch, shared_file, write_text)

T = Checks()
TMP = scratch("kv-heads-")
EXACT, REF_TOL = 1e-6, 1e-4

TEXT = ("Tom had a red ball. He liked to throw it high in the sky and catch it. One day the ball went over "
        "the fence. Tom was sad. His friend Lily said, \"Let's ask Mr. Brown to help.\" Mr. Brown found the ball "
        "under a big tree and gave it back. Tom said thank you, and they played until the sun went down.")


path = in_dir(TMP)


def pool_hf(cfg, W, K):
    """(cfg, weights) with K KV heads, converted in HF layout: k_proj/v_proj
    (n_kv * hd, dim) -> heads (n_kv, hd, dim); K < n_kv: the mean of each
    group of n_kv / K adjacent heads; K > n_kv: each head repeated."""
    n_kv, hd = cfg["num_key_value_heads"], reference.head_dim_of(cfg)
    out = dict(W)
    for name, w in W.items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            heads = w.reshape(n_kv, hd, -1)
            if K < n_kv:
                heads = heads.reshape(K, n_kv // K, hd, -1).mean(axis=1)
            else:
                heads = np.repeat(heads, K // n_kv, axis=0)
            out[name] = heads.reshape(K * hd, -1)
    return dict(cfg, num_key_value_heads=K), out


def gqa_hf(name, n_heads=8, n_kv=4, dim=64, seed=3, **kw):
    cfg = make_hf.hf_config(dim=dim, hidden=128, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, **kw)
    d = path(name)
    make_hf.write_hf_dir(d, cfg, make_hf.random_weights(cfg, seed))
    return d, cfg


def random_ids(cfg, n, seed):
    return [cfg["bos_token_id"]] + list(np.random.default_rng(seed).integers(0, cfg["vocab_size"], n - 1))


# ----------------------------------------------------------------------------
# Repeat: the same model with a bigger cache

def repeat_is_exact():
    d, cfg = gqa_hf("rep", n_heads=8, n_kv=2)
    model = export_ok(path("rep.bin"), "--hf", d)
    ids = random_ids(cfg, 24, 5)
    base = engine_logits(model, ids)
    for K, label in [(4, "twice_the_kv_heads"), (8, "kv_heads_equal_query_heads")]:
        for block in (1, 7):
            got = engine_logits(model, ids, "-K", K, "-B", block)
            err = rel_err(got, base)
            note(f"repeat K={K} B={block} vs original", err)
            T.check(f"repeat_{label}_logits_equal_original_B{block}", err <= EXACT, f"relative error {err:.3g}")


# ----------------------------------------------------------------------------
# Pool: the engine against the reference's pooled HF model

def pool_matches_reference_random():
    text = write_text(TMP, "pool", TEXT)
    for name, n_heads, n_kv, Ks in [("gqa8_4", 8, 4, (2, 1)), ("mha4_4", 4, 4, (2, 1))]:
        d, cfg = gqa_hf("pool_" + name, n_heads=n_heads, n_kv=n_kv, seed=11)
        model = export_ok(path(f"pool_{name}.bin"), "--hf", d)
        rcfg, W = reference.load_hf_dir(d)
        tokens = engine_tokens(model, text)
        for K in Ks:
            pcfg, PW = pool_hf(rcfg, W, K)
            for ctx in (None, 40):  # whole text, and in chunks
                want = reference.perplexity(pcfg, PW, tokens[0], tokens[1:], ctx or rcfg["max_position_embeddings"])
                got = engine_ppl(model, text, "--kv-heads", K, *(["-c", ctx] if ctx else []))
                err = abs(got - want) / want
                label = f"pool_{name}_to_{K}_ppl{'_chunked' if ctx else ''}_matches_reference"
                note(label, err)
                T.check(label, err <= REF_TOL, f"engine {got:.6f}, reference {want:.6f} (relative {err:.3g})")
            # pooling really changes the model (or the test would prove nothing)
            base = reference.perplexity(rcfg, W, tokens[0], tokens[1:], rcfg["max_position_embeddings"])
            T.check(f"pool_{name}_to_{K}_changes_the_model", abs(want - base) / base > 1e-3,
                    f"pooled {want:.6f} vs original {base:.6f}")


def pool_matches_reference_llama2c(name, model_file, tok_file, Ks, text_chars):
    (mpath, tpath, corpus), missing = llama2c_files(model_file, tok_file)
    if missing:
        return T.missing(f"pool_{name}_ppl_matches_reference", missing)
    model = export_ok(path(name + ".bin"), "--llama2c", mpath, "--tokenizer", tpath)
    cfg, hf = llama2c_to_hf(*read_llama2c(mpath))
    W = {k: v.astype(np.float64) for k, v in hf.items()}
    with open(corpus, encoding="utf-8") as f:
        text = write_text(TMP, name, f.read(text_chars))
    tokens = engine_tokens(model, text)
    for K in Ks:
        pcfg, PW = pool_hf(cfg, W, K)
        want = reference.perplexity(pcfg, PW, tokens[0], tokens[1:], cfg["max_position_embeddings"])
        got = engine_ppl(model, text, "--kv-heads", K)
        err = abs(got - want) / want
        note(f"pool {name} to {K}: ppl {got:.4f}", err)
        T.check(f"pool_{name}_to_{K}_ppl_matches_reference", err <= REF_TOL,
                f"engine {got:.6f}, reference {want:.6f} (relative {err:.3g})")


# ----------------------------------------------------------------------------
# export.py --kv-heads K: the same conversion, written to a file

def export_matches_engine_hf():
    d, cfg = gqa_hf("exp", n_heads=8, n_kv=4, seed=21, tied=False)
    ids = random_ids(cfg, 20, 21)
    orig = export_ok(path("exp.bin"), "--hf", d)
    _, E = read_tensors(orig)
    for K in (1, 2, 8):
        conv = export_ok(path(f"exp_kv{K}.bin"), "--hf", d, "--kv-heads", K)
        h, C = read_tensors(conv)
        want_w = pool_rows(E["layers.1.wk"], 4, K, 8), pool_rows(E["layers.0.wv"], 4, K, 8)
        werr = max(rel_err(C["layers.1.wk"], want_w[0]), rel_err(C["layers.0.wv"], want_w[1]))
        T.check(f"export_hf_kv_heads_{K}_header_and_weights", h["n_kv_heads"] == K and werr <= EXACT,
                f"n_kv_heads {h['n_kv_heads']}, weights vs numpy mean/repeat of heads {werr:.3g}")
        a, b = engine_logits(conv, ids), engine_logits(orig, ids, "-K", K)
        err = rel_err(a, b)
        note(f"export --kv-heads {K} vs ./run --kv-heads {K} (f32)", err)
        T.check(f"export_hf_kv_heads_{K}_logits_equal_engine_kv_heads_f32", err <= EXACT,
                f"relative error {err:.3g}{' (bit-identical)' if np.array_equal(a, b) else ''}")
    same = export_ok(path("exp_kv4.bin"), "--hf", d, "--kv-heads", 4)
    with open(orig, "rb") as f1, open(same, "rb") as f2:
        T.check("export_kv_heads_equal_to_n_kv_heads_changes_nothing", f1.read() == f2.read(), "files differ")

    # q8_0: repeat copies quantized rows (exact); pooling quantizes the f32 mean once
    orig8 = export_ok(path("exp_q8.bin"), "--hf", d, "--dtype", "q8_0")
    for K in (1, 8):
        conv8 = export_ok(path(f"exp_q8_kv{K}.bin"), "--hf", d, "--dtype", "q8_0", "--kv-heads", K)
        a, b = engine_logits(conv8, ids), engine_logits(orig8, ids, "-K", K)
        f32 = engine_logits(orig, ids, "-K", K)
        err, q_err, e_err = rel_err(a, b), rel_err(a, f32), rel_err(b, f32)
        note(f"export q8_0 --kv-heads {K} vs ./run q8_0 --kv-heads {K}", err)
        note(f"export q8_0 --kv-heads {K} vs f32 --kv-heads {K}", q_err)
        note(f"./run q8_0 --kv-heads {K} vs f32 --kv-heads {K}", e_err)
        if K > 4:
            T.check(f"export_hf_kv_heads_{K}_q8_0_repeat_equals_engine", err <= EXACT, f"relative error {err:.3g}")
        else:
            # the engine pools the dequantized q8_0 rows and requantizes (two roundings, not
            # one): both are q8_0 versions of the f32 pooled model, ~2e-2 from it and each other
            T.check(f"export_hf_kv_heads_{K}_q8_0_pool_close_to_engine", max(err, q_err, e_err) <= 5e-2,
                    f"vs engine q8_0 {err:.3g}; vs f32: export {q_err:.3g}, engine {e_err:.3g}")
            _, Q = read_tensors(conv8)
            _, F = read_tensors(path("exp_kv1.bin"))
            scale = Q["layers.0.wk.scale"].astype(np.float64)  # float16, (rows, cols / 32)
            bound = np.repeat(scale, 32, axis=1) / 2 * (1 + 1e-5) + 1e-12
            T.check(f"export_hf_kv_heads_{K}_q8_0_quantizes_the_f32_pooled_rows_once",
                    np.all(np.abs(Q["layers.0.wk"] - F["layers.0.wk"]) <= bound),
                    f"max |q8_0 - f32 pooled| / half step {np.max(np.abs(Q['layers.0.wk'] - F['layers.0.wk']) / bound):.3g}")


    # q4_0 the same way: repeat exact; pooling by the engine (dequantize, mean, quantize_q4_row) and by
    # the exporter (f32 mean, quantize_q4_0) are two q4_0 versions of the f32 pooled model
    orig4 = export_ok(path("exp_q4.bin"), "--hf", d, "--dtype", "q4_0")
    for K in (1, 8):
        conv4 = export_ok(path(f"exp_q4_kv{K}.bin"), "--hf", d, "--dtype", "q4_0", "--kv-heads", K)
        a, b = engine_logits(conv4, ids), engine_logits(orig4, ids, "-K", K)
        f32 = engine_logits(orig, ids, "-K", K)
        err, q_err, e_err = rel_err(a, b), rel_err(a, f32), rel_err(b, f32)
        note(f"export q4_0 --kv-heads {K} vs ./run q4_0 --kv-heads {K}", err)
        note(f"export q4_0 --kv-heads {K} vs f32 --kv-heads {K}", q_err)
        note(f"./run q4_0 --kv-heads {K} vs f32 --kv-heads {K}", e_err)
        if K > 4:
            T.check(f"export_hf_kv_heads_{K}_q4_0_repeat_equals_engine", err <= EXACT, f"relative error {err:.3g}")
        else:
            T.check(f"export_hf_kv_heads_{K}_q4_0_pool_close_to_engine", max(err, q_err, e_err) <= Q4_POOL_TOL,
                    f"vs engine q4_0 {err:.3g}; vs f32: export {q_err:.3g}, engine {e_err:.3g}")


Q4_POOL_TOL = 0.4  # max relative logit error of this 4-bit model vs f32: measured 0.18 (repeat) to 0.25 (pooled)


def pool_rows(w, old, K, hd):
    """Independent of export.py: float64 mean (or repeat) of whole heads."""
    heads = np.asarray(w, np.float64).reshape(old, hd, -1)
    heads = heads.reshape(K, old // K, hd, -1).mean(axis=1) if K < old else np.repeat(heads, K // old, axis=0)
    return heads.reshape(K * hd, -1)


def export_matches_engine_random():
    orig = export_ok(path("rnd.bin"), "--random", "--n-heads", 4, "--n-kv-heads", 2)
    ids = [1, 70, 300, 5, 99, 256, 17, 3]
    for K in (1, 4):
        conv = export_ok(path(f"rnd_kv{K}.bin"), "--random", "--n-heads", 4, "--n-kv-heads", 2, "--kv-heads", K)
        a, b = engine_logits(conv, ids), engine_logits(orig, ids, "-K", K)
        T.check(f"export_random_kv_heads_{K}_logits_equal_engine_kv_heads", rel_err(a, b) <= EXACT,
                f"relative error {rel_err(a, b):.3g}")


def export_matches_engine_llama2c():
    mpath, tpath = shared_file("models/stories260K.bin"), shared_file("models/tok512.bin")
    for p in (mpath, tpath):
        if not os.path.exists(p):
            return T.missing("export_llama2c_kv_heads_2_logits_equal_engine_kv_heads", p)
    orig = export_ok(path("st.bin"), "--llama2c", mpath, "--tokenizer", tpath)
    conv = export_ok(path("st_kv2.bin"), "--llama2c", mpath, "--tokenizer", tpath, "--kv-heads", 2)
    ids = [1, 403, 407, 261, 378, 429, 307, 265, 280, 350, 46, 347, 262]
    a, b = engine_logits(conv, ids), engine_logits(orig, ids, "-K", 2)
    T.check("export_llama2c_kv_heads_2_logits_equal_engine_kv_heads", rel_err(a, b) <= EXACT,
            f"relative error {rel_err(a, b):.3g}")
    # with --kv-heads, numpy is needed (without it, the llama2c path stays numpy-free: test_export.py)
    code = ("import sys, runpy; sys.modules['numpy'] = None; "
            f"sys.argv = {[EXPORT, path('st_nonp.bin'), '--llama2c', mpath, '--tokenizer', tpath, '--kv-heads', '2']!r}; "
            f"runpy.run_path({EXPORT!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    T.check("export_llama2c_kv_heads_without_numpy_says_numpy_is_required",
            r.returncode == 1 and r.stderr.startswith("error: numpy is required for --kv-heads"),
            r.stderr.strip()[-200:])


# ----------------------------------------------------------------------------
# Refusals: the same message from both

def invalid_k_refused():
    d, _ = gqa_hf("bad", n_heads=8, n_kv=4, seed=2)
    model = export_ok(path("bad.bin"), "--hf", d)
    for K in (3, 16, 0):
        want = (f"error: --kv-heads {K} is not possible for this model (8 query heads, 4 KV heads); "
                f"valid: 1, 2, 4, 8")
        out = path(f"bad_kv{K}.bin")
        r = export(out, "--hf", d, "--kv-heads", K)
        T.check(f"export_kv_heads_{K}_is_refused_naming_valid_values",
                r.returncode == 1 and r.stderr.strip() == want and not os.path.exists(out)
                and not os.path.exists(out + ".tmp"), f"exit {r.returncode}: {r.stderr.strip()[-200:]}")
        if K:
            e = subprocess.run([RUN, model, "-m", "info", "--kv-heads", str(K)], capture_output=True, text=True)
            T.check(f"engine_and_export_refuse_kv_heads_{K}_alike", e.returncode == 1 and e.stderr.strip() == want,
                    f"engine says {e.stderr.strip()!r}")


# ----------------------------------------------------------------------------
# KV-cache bytes per token

def info(model, *extra):
    out = engine(model, "-m", "info", *extra)
    kv = dict(re.findall(r"^(\w+): (\S+)", out, re.M))
    rows = re.findall(r"^([* ]) (MHA|MQA|GQA-\d+)\s+(\d+)\s+(\d+)\s", out, re.M)
    return kv, rows


def kv_bytes_formula():
    shapes = [("mha", ["--n-heads", 4, "--n-kv-heads", 4]), ("gqa", ["--n-heads", 8, "--n-kv-heads", 2]),
              ("mqa", ["--n-heads", 4, "--n-kv-heads", 1]),
              ("head_dim_32", ["--n-heads", 4, "--n-kv-heads", 2, "--head-dim", 32, "--n-layers", 3])]
    for name, flags in shapes:
        model = export_ok(path(f"kvb_{name}.bin"), "--random", *flags)
        h = read_header(model)
        for K in sorted({1, h["n_kv_heads"], h["n_heads"]}):
            kv, rows = info(model, "--kv-heads", K, "-c", 100)
            want = h["n_layers"] * 2 * K * h["head_dim"] * 4
            table_ok = len(rows) > 0 and all(
                int(per) == h["n_layers"] * 2 * int(g) * h["head_dim"] * 4 and (mark == "*") == (int(g) == K)
                for mark, _, g, per in rows)
            T.check(f"kv_bytes_per_token_{name}_kv{K}_matches_formula",
                    int(kv["n_kv_heads"]) == K and int(kv["kv_bytes_per_token"]) == want
                    and int(kv["kv_bytes_context"]) == want * 100 and table_ok,
                    f"n_kv_heads {kv.get('n_kv_heads')}, {kv.get('kv_bytes_per_token')} bytes/token "
                    f"(want {want}), context {kv.get('kv_bytes_context')}, table {rows}")


def main():
    if not engine_built():
        T.fail("engine_built", f"{RUN} or {LOGITS} missing: run `make run tests/logits`")
        return
    try:
        T.run("repeat_twice_the_kv_heads_logits_equal_original_B1", repeat_is_exact)
        T.run("pool_gqa8_4_to_2_ppl_matches_reference", pool_matches_reference_random)
        T.run("pool_stories260K_ppl_matches_reference", pool_matches_reference_llama2c,
              "stories260K", "stories260K.bin", "tok512.bin", (2, 1), 1500)
        T.run("pool_aidreams260K_ppl_matches_reference", pool_matches_reference_llama2c,
              "aidreams260K", "aidreams260K.bin", "aidreams260K-tok512.bin", (2, 1), 700)
        T.run("export_hf_kv_heads_1_logits_equal_engine_kv_heads_f32", export_matches_engine_hf)
        T.run("export_random_kv_heads_1_logits_equal_engine_kv_heads", export_matches_engine_random)
        T.run("export_llama2c_kv_heads_2_logits_equal_engine_kv_heads", export_matches_engine_llama2c)
        T.run("export_kv_heads_3_is_refused_naming_valid_values", invalid_k_refused)
        T.run("kv_bytes_per_token_mha_kv1_matches_formula", kv_bytes_formula)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
