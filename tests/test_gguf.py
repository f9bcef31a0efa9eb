"""test_gguf.py - export.py --gguf on GGUF files written by tests/gguf_writer.py
(from the specification, as llama.cpp's convert_hf_to_gguf.py lays out a
Llama; no llama.cpp needed):
  - a random HF checkpoint with the real Llama 3 vocabulary and Llama 3.1
    RoPE scaling, as an F32 GGUF, exports to the very bytes --hf writes (so
    the q/k row order, the rope parameters derived from rope_freqs and the
    tokenizer section are right), and ./run's perplexity is the same;
    F16 / BF16 GGUFs of values they hold exactly give the same file too;
  - Q8_0 -> q8_0 is a repack: the bytes --hf --dtype q8_0 writes for the same
    weights, and a GGUF quantized with ggml's own rounding keeps its int8
    values and float16 scales; Q4_0 and the k-quants (Q4_K, Q5_K, Q6_K) are
    dequantized exactly as a loop-by-loop reference of the block formats
    written here (random blocks, extreme scales);
  - every golden Llama 3 tokenization through ./run -m tokenize on the
    GGUF-exported model; stories260K as a GGUF with its SentencePiece
    vocabulary gives the llama2.c export's tokenizer, weights and perplexity;
  - refusals by name (architecture, tensor type, tokenizer), and a corpus of
    malformed GGUFs (truncated at every section boundary, corrupted counts,
    types, offsets, alignment, string and array lengths up to 2^64 - 1): each
    one "error:" line, exit status 1, in bounded time and address space."""
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "export"))
import gguf  # noqa: E402  (the exporter's reader, for the block-format test)
import gguf_writer as gw  # noqa: E402
import make_hf  # noqa: E402
from testlib import (EXPORT, Checks, engine, engine_built, engine_ppl, export, export_ok, llama2c_to_hf,  # noqa: E402
                     read_header, read_llama2c, read_tensors, read_tokenizer_section, sanitized_sample, scratch, shared_file,
                     SANITIZER)

T = Checks()
TMP = scratch("gguf-")
LLAMA3_TOK = shared_file("models/llama3-tokenizer.json")
STORIES, TOK512 = shared_file("models/stories260K.bin"), shared_file("models/tok512.bin")
TINYSTORIES = shared_file("corpora/tinystories-valid.txt")
GOLDEN = [shared_file("corpora/llama3-tokenizer-golden.jsonl"),
          shared_file("corpora/llama3-tokenizer-golden-special.jsonl")]
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}


def path(*parts):
    return os.path.join(TMP, *parts)


def same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def write(name, cfg, W, mat_type, tokenizer, **kw):
    p = path(name + ".gguf")
    meta, tensors = gw.hf_to_gguf(cfg, W, mat_type, tokenizer, **kw)
    gw.write_gguf(p, meta, tensors)
    return p


# ----------------------------------------------------------------------------
# A Hugging Face checkpoint through GGUF and directly


def llama3_model():
    if not os.path.exists(LLAMA3_TOK):
        return T.missing("gguf_f32_exports_the_same_bytes_as_hf", LLAMA3_TOK)
    # head_dim 64 at theta 500000: several frequencies between the scaling's bands
    cfg = make_hf.hf_config(dim=64, hidden=96, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, vocab=128256,
                            bos=128000, eos=[128001, 128009], theta=500000.0, max_pos=512, rope_scaling=SCALING)
    W = make_hf.random_weights(cfg, 3, exact=True)  # values F16 and BF16 hold exactly
    hf = path("hf_llama3")
    make_hf.write_hf_dir(hf, cfg, W, tokenizer=LLAMA3_TOK)
    tok = gw.llama3_tokenizer(LLAMA3_TOK)
    via_hf = export_ok(path("hf.bin"), "--hf", hf)
    via_gguf = export_ok(path("gguf_F32.bin"), "--gguf", write("llama3_F32", cfg, W, "F32", tok))
    T.check("gguf_f32_exports_the_same_bytes_as_hf", same_file(via_gguf, via_hf),
            "header, tokenizer section or weights differ from the --hf export")
    h = read_header(via_gguf)
    rope = (h["rope_scaling"], h["rope_factor"], h["rope_low_freq_factor"], h["rope_high_freq_factor"],
            h["rope_original_max_pos"])
    T.check("gguf_rope_scaling_derived_from_rope_freqs", rope == (1, 8.0, 1.0, 4.0, 64), f"{rope}")
    if engine_built() and os.path.exists(TINYSTORIES):
        text = path("ppl.txt")
        with open(TINYSTORIES, encoding="utf-8") as f, open(text, "w", encoding="utf-8") as o:
            o.write(f.read(500 if SANITIZER else 2000))  # under a sanitizer, 17 s a perplexity at 2000 (128256 logits a token)
        a, b = engine_ppl(via_gguf, text), engine_ppl(via_hf, text)
        T.check("gguf_f32_perplexity_equals_hf_within_1e-6", abs(a - b) <= 1e-6 * b, f"gguf {a}, hf {b}")
    # q/k rows: the GGUF holds them in Meta's adjacent-pair order, the HF file in rotate_half order
    g = gguf.GGUFFile(path("llama3_F32.gguf"))
    wq = g.rows_f32(g.tensors["blk.0.attn_q.weight"], 0, 128)
    T.check("gguf_attn_q_rows_are_hf_rows_permuted_to_adjacent_pairs",
            np.array_equal(wq, gw.permute_to_meta(W["model.layers.0.self_attn.q_proj.weight"], 2))
            and not np.array_equal(wq, W["model.layers.0.self_attn.q_proj.weight"]), "")
    same = {t: same_file(export_ok(path(f"gguf_{t}.bin"), "--gguf", write(f"llama3_{t}", cfg, W, t, tok)), via_hf)
            for t in ("F16", "BF16")}
    T.check("gguf_f16_bf16_of_exact_values_export_the_same_bytes_as_hf", all(same.values()), f"{same}")
    direct = export_ok(path("hf_q8.bin"), "--hf", hf, "--dtype", "q8_0")
    repacked = export_ok(path("gguf_q8.bin"), "--gguf", write("llama3_Q8_0", cfg, W, "Q8_0", tok))
    T.check("gguf_q8_0_to_q8_0_is_bit_identical_to_quantizing_directly", same_file(repacked, direct),
            "the --gguf export of Q8_0 (default type for a quantized GGUF: q8_0) differs from --hf --dtype q8_0")
    _, E = read_tensors(export_ok(path("gguf_q4.bin"), "--gguf", write("llama3_Q4_0", cfg, W, "Q4_0", tok),
                                  "--dtype", "f32"))
    x = W["model.layers.1.mlp.down_proj.weight"]
    T.check("gguf_q4_0_dequantizes_exactly", np.array_equal(
        E["layers.1.w2"], ref_dequantize("Q4_0", gw.encode(x, "Q4_0")).reshape(x.shape)), "")
    golden_tokenization(via_gguf)


def small_model(exact=False, seed=4):
    bos = make_hf.synthetic_bos(300)  # synthetic vocabulary: <|begin_of_text|>; + 1 <|end_of_text|>, + 4 <|eot_id|>
    cfg = make_hf.hf_config(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, tied=False, eos=[bos + 1, bos + 4])
    W = make_hf.random_weights(cfg, seed, exact=exact)
    tok = make_hf.synthetic_tokenizer(cfg["vocab_size"])
    return cfg, W, tok, gw.llama3_tokenizer(tok, bos=bos, eos=bos + 1, eot=None)  # <|eot_id|> a stop by its name


def other_types():
    cfg, W, tok, gtok = small_model(exact=True)  # values F16 and BF16 hold exactly
    hf = path("hf_small")
    make_hf.write_hf_dir(hf, cfg, W, tokenizer=tok)
    via_hf = export_ok(path("hf_small.bin"), "--hf", hf)
    same = {t: same_file(export_ok(path(f"small_{t}.bin"), "--gguf", write(f"small_{t}", cfg, W, t, gtok)), via_hf)
            for t in ("F32", "F16", "BF16")}
    T.check("gguf_synthetic_vocab_f32_f16_bf16_export_the_same_bytes_as_hf", all(same.values()), f"{same}")
    cfg, W, tok, gtok = small_model()
    # ggml's own Q8_0 rounding (x * (1 / d), half away from zero): the file keeps those values and scales
    _, E = read_tensors(export_ok(path("small_q8_ggml.bin"), "--gguf",
                                  write("small_Q8_0_ggml", cfg, W, "Q8_0", gtok, q8_rule="ggml")))
    x = gw.permute_to_meta(W["model.layers.1.self_attn.k_proj.weight"], 2)
    raw = np.frombuffer(gw.encode(x, "Q8_0", "ggml"), np.uint8).reshape(-1, 34)
    q = raw[:, 2:].copy().view(np.int8).reshape(x.shape)
    d = raw[:, :2].copy().view("<u2").reshape(x.shape[0], -1)
    T.check("gguf_q8_0_with_ggml_rounding_keeps_its_values_and_scales",
            np.array_equal(E["layers.1.wk.q"], q) and np.array_equal(E["layers.1.wk.scale"].view("<u2"), d)
            and q.any(), "q or scales changed in the repack")
    g4 = write("small_Q4_0", cfg, W, "Q4_0", gtok)
    h = read_header(export_ok(path("small_q4_default.bin"), "--gguf", g4))
    T.check("gguf_quantized_source_defaults_to_q8_0", h["dtype"] == 1, f"dtype {h['dtype']}")
    # Q4_0 -> q4_0 is a repack too: GGML's nibbles u hold q = u - 8, its d the scale
    h, E = read_tensors(export_ok(path("small_q4_repack.bin"), "--gguf", g4, "--dtype", "q4_0",
                                  "--embedding-dtype", "q4_0"))
    x = gw.permute_to_meta(W["model.layers.1.self_attn.k_proj.weight"], 2)
    raw = np.frombuffer(gw.encode(x, "Q4_0"), np.uint8).reshape(-1, 18)
    d = raw[:, :2].copy().view("<u2").reshape(x.shape[0], -1)
    q = (np.concatenate([raw[:, 2:] & 15, raw[:, 2:] >> 4], axis=1).astype(np.int8) - 8).reshape(x.shape)
    T.check("gguf_q4_0_to_q4_0_keeps_its_values_and_scales_bit_for_bit",
            h["dtype"] == 2 and np.array_equal(E["layers.1.wk.q"], q)
            and np.array_equal(E["layers.1.wk.scale"].view("<u2"), d) and q.any(), "q or scales changed in the repack")
    # --kv-heads 1 from Q8_0: the pooled wk / wv are the mean of the dequantized heads, then requantized
    g8 = path("small_Q8_0_ggml.gguf")
    h, E = read_tensors(export_ok(path("small_kv1.bin"), "--gguf", g8, "--kv-heads", "1", "--dtype", "f32"))
    wk = gw.permute_to_meta(W["model.layers.0.self_attn.k_proj.weight"], 2)
    deq = ref_dequantize("Q8_0", gw.encode(wk, "Q8_0", "ggml")).reshape(2, -1, wk.shape[1])
    T.check("gguf_kv_heads_pools_the_dequantized_heads", h["n_kv_heads"] == 1
            and np.array_equal(E["layers.0.wk"], deq[0] / np.float32(2) + deq[1] / np.float32(2)), "")
    h = read_header(export_ok(path("small_kv1_q8.bin"), "--gguf", g8, "--kv-heads", "1"))
    T.check("gguf_kv_heads_with_q8_0_output", h["n_kv_heads"] == 1 and h["dtype"] == 1, f"{h['n_kv_heads']}")
    # GGUF version 2 with general.alignment 64: the same model as version 3 with the default 32
    meta, tensors = gw.hf_to_gguf(cfg, W, "Q8_0", gtok, q8_rule="ggml")
    gw.write_gguf(path("small_v2.gguf"), meta, tensors, version=2, alignment=64)
    T.check("gguf_version_2_with_alignment_64_reads_as_version_3",
            same_file(export_ok(path("small_v2.bin"), "--gguf", path("small_v2.gguf")),
                      export_ok(path("small_v3.bin"), "--gguf", g8)), "")
    # The writer streams tensors given as functions (bench/vs_llamacpp.py's 1B GGUF): the same bytes
    # as the tensors given whole, padding included; a function returning the wrong size is refused
    gw.write_gguf(path("small_v2_lazy.gguf"), meta, [(n, t, s, lambda r=r: r) for n, t, s, r in tensors],
                  version=2, alignment=64)
    T.check("gguf_writer_streams_tensors_given_as_functions",
            same_file(path("small_v2_lazy.gguf"), path("small_v2.gguf")), "")
    n, t, s, r = tensors[-1]
    try:
        gw.write_gguf(path("short.gguf"), meta, tensors[:-1] + [(n, t, s, lambda: r[:-1])])
        refused = "no error"
    except ValueError as e:
        refused = str(e)
    T.check("gguf_writer_refuses_a_tensor_of_the_wrong_size",
            refused == f"{n}: {len(r) - 1} bytes, its shape and type make {len(r)}", refused)


def real_llama_rope_scaling():
    """Llama 3.1 8B's and Llama 3.2 1B's scaling (head_dim 128 / 64, theta 500000, factor 8 / 32, low 1,
    high 4, original context 8192) come back exactly from the rope_freqs convert_hf_to_gguf.py writes."""
    sys.path.insert(0, os.path.dirname(EXPORT))
    import export as ex
    ex.need_numpy("the test")
    for name, hd, factor in [("llama31_8b", 128, 8.0), ("llama32_1b", 64, 32.0)]:
        scaling = dict(SCALING, factor=factor, original_max_position_embeddings=8192)
        cfg = make_hf.hf_config(dim=hd * 4, hidden=64, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=hd,
                                theta=500000.0, rope_scaling=scaling)
        c = ex.Config(dim=hd * 4, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=hd, vocab_size=300,
                      max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tied_classifier=True)
        ex.gguf_rope_scaling(c, gw.llama3_rope_freqs(cfg), None)
        got = (c.rope_scaling, c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_pos)
        T.check(f"gguf_rope_scaling_of_{name}_derived_exactly", got == (1, factor, 1.0, 4.0, 8192), f"{got}")


def golden_tokenization(model):
    """Every golden line through ./run -m tokenize (BOS first) on the model
    exported from the GGUF: the tokenizer built from tokenizer.ggml.*."""
    if not engine_built():
        return T.fail("gguf_tokenizer_matches_golden", "./run not built")
    for g in GOLDEN:
        if not os.path.exists(g):
            return T.missing("gguf_tokenizer_matches_golden", g)
    import concurrent.futures
    lines = []
    for g in GOLDEN:
        with open(g, encoding="utf-8") as f:
            lines += [json.loads(ln) for ln in f if ln.strip()]

    def one(k):
        p = path(f"golden_{k}.txt")
        with open(p, "w", encoding="utf-8", newline="") as f:
            f.write(lines[k]["text"])
        return [int(t) for t in engine(model, "-m", "tokenize", "-f", p, "-T", 1).split()]

    ks = sanitized_sample(range(len(lines)), 12)  # under a sanitizer, each load of the 128256-token vocabulary costs ~1.5 s
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        got = dict(zip(ks, pool.map(one, ks)))
    bad = [k for k in ks if got[k] != [128000] + lines[k]["ids"]]
    name = "all_448_golden_lines" if len(ks) == len(lines) else f"{len(ks)}_of_448_golden_lines_sanitized"
    T.check("gguf_tokenizer_matches_" + name, len(lines) == 448 and not bad,
            f"{len(lines)} lines, {len(bad)} differ, first {lines[bad[0]]['text'][:60]!r}" if bad
            else f"{len(ks)} lines")


# ----------------------------------------------------------------------------
# stories260K as a GGUF with its SentencePiece vocabulary


def stories():
    for p in (STORIES, TOK512, TINYSTORIES):
        if not os.path.exists(p):
            return T.missing("gguf_stories260K_sentencepiece", p)
    h, W2 = read_llama2c(STORIES)
    cfg, hf = llama2c_to_hf(h, W2)
    g = write("stories_F32", cfg, hf, "F32", gw.sentencepiece_tokenizer(TOK512, 512))
    a = export_ok(path("stories_gguf.bin"), "--gguf", g)
    b = export_ok(path("stories_llama2c.bin"), "--llama2c", STORIES, "--tokenizer", TOK512)
    T.check("gguf_sentencepiece_tokenizer_section_equals_tokenizer_bin",
            read_tokenizer_section(a) == read_tokenizer_section(b) and read_header(a)["tokenizer_kind"] == 1, "")
    ha, hb = read_header(a), read_header(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        same_weights = fa.read()[ha["weights_offset"]:] == fb.read()[hb["weights_offset"]:]
    T.check("gguf_stories260K_weights_equal_llama2c_export", same_weights and ha["bos_id"] == 1
            and sorted(ha["stop_ids"]) == [1, 2], f"bos {ha['bos_id']}, stops {ha['stop_ids']}")
    if engine_built():
        text = path("stories.txt")
        with open(TINYSTORIES, encoding="utf-8") as f, open(text, "w", encoding="utf-8") as o:
            o.write(f.read(2000 if SANITIZER else 20000))  # under a sanitizer, ~30 s a perplexity at 20000
        pa, pb = engine_ppl(a, text), engine_ppl(b, text)
        T.check("gguf_stories260K_perplexity_equals_llama2c_export", abs(pa - pb) <= 1e-6 * pb, f"{pa} vs {pb}")


# ----------------------------------------------------------------------------
# Block formats: a loop-by-loop reference written from the specification


def f16(b):
    return np.float32(np.frombuffer(bytes(b), "<f2")[0])


def ref_block(tname, b):
    """One block's values, one at a time, in float32 (each product rounded)."""
    out = []
    if tname in ("Q8_0", "Q4_0"):
        d = f16(b[0:2])
        for j in range(32):
            if tname == "Q8_0":
                q = b[2 + j] - 256 if b[2 + j] > 127 else b[2 + j]
            else:
                q = (b[2 + j] & 15 if j < 16 else b[2 + j - 16] >> 4) - 8
            out.append(np.float32(q) * d)
    elif tname in ("Q4_K", "Q5_K"):
        d, dmin, sc = f16(b[0:2]), f16(b[2:4]), b[4:16]
        qh, qs = (b[16:48], b[48:176]) if tname == "Q5_K" else (None, b[16:144])
        for j in range(8):
            if j < 4:
                s, m = sc[j] & 63, sc[j + 4] & 63
            else:
                s, m = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
            d1, m1 = d * np.float32(s), dmin * np.float32(m)
            for l in range(32):
                byte = qs[32 * (j // 2) + l]
                q = byte & 15 if j % 2 == 0 else byte >> 4
                if qh is not None and (qh[l] >> j) & 1:
                    q += 16
                out.append(d1 * np.float32(q) - m1)
    elif tname == "Q6_K":
        ql, qh, d = b[0:128], b[128:192], f16(b[208:210])
        sc = [v - 256 if v > 127 else v for v in b[192:208]]
        y = [None] * 256
        for n in range(2):
            for l in range(32):
                h = qh[32 * n + l]
                q1 = ((ql[64 * n + l] & 15) | ((h >> 0) & 3) << 4) - 32
                q2 = ((ql[64 * n + l + 32] & 15) | ((h >> 2) & 3) << 4) - 32
                q3 = ((ql[64 * n + l] >> 4) | ((h >> 4) & 3) << 4) - 32
                q4 = ((ql[64 * n + l + 32] >> 4) | ((h >> 6) & 3) << 4) - 32
                i = 8 * n + l // 16
                for g, q in enumerate((q1, q2, q3, q4)):
                    y[128 * n + 32 * g + l] = (d * np.float32(sc[i + 2 * g])) * np.float32(q)
        out = y
    return out


def ref_dequantize(tname, raw):
    size = gw.BLOCK[tname][1]
    out = []
    for k in range(0, len(raw), size):
        out += ref_block(tname, raw[k:k + size])
    return np.array(out, dtype=np.float32)


EXTREME_F16 = [65504.0, -65504.0, 2.0 ** -14, 2.0 ** -24, -2.0 ** -24, 0.0, -0.0, 1.0, -3.5, 0.0123]


def random_blocks(tname, n, rng, extreme=True):
    """n random blocks; their float16 d (and dmin) run through EXTREME_F16 first."""
    size = gw.BLOCK[tname][1]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scale_at = {"Q8_0": [0], "Q4_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[tname]
    for k in range(n):
        for a in scale_at:
            v = EXTREME_F16[(k + a) % len(EXTREME_F16)] if extreme else rng.uniform(-0.01, 0.01)
            raw[k, a:a + 2] = np.frombuffer(np.float16(v).tobytes(), np.uint8)
    return raw.tobytes()


def block_formats():
    rng = np.random.default_rng(5)
    for tname in ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"):
        raw = random_blocks(tname, 40, rng)
        got = gguf.dequantize(tname, np.frombuffer(raw, np.uint8))
        want = ref_dequantize(tname, raw)
        T.check(f"gguf_{tname.lower()}_dequantizes_as_the_reference_on_random_blocks_with_extreme_scales",
                got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32)),
                f"{np.count_nonzero(got != want)} of {want.size} values differ")


def k_quants_through_export():
    """A model whose matrices are random Q4_K / Q5_K / Q6_K blocks (rows of 256):
    exported --dtype f32, every value is the reference's."""
    cfg = make_hf.hf_config(dim=256, hidden=256, n_layers=1, n_heads=4, n_kv_heads=2, tied=True)
    W = make_hf.random_weights(cfg, 6)
    meta, tensors = gw.hf_to_gguf(cfg, W, "F32", gw.llama3_tokenizer(make_hf.synthetic_tokenizer(300),
                                                                      bos=270, eos=271, eot=274))
    rng = np.random.default_rng(7)
    kinds = {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K", "token_embd.weight": "Q6_K"}
    raws = {}
    for k, (name, tname, shape, raw) in enumerate(tensors):
        if name in kinds:
            n = shape[0] * shape[1] // 256
            raws[name] = random_blocks(kinds[name], n, rng, extreme=False)
            tensors[k] = (name, kinds[name], shape, raws[name])
    p = path("kquants.gguf")
    gw.write_gguf(p, meta, tensors)
    _, E = read_tensors(export_ok(path("kquants.bin"), "--gguf", p, "--dtype", "f32"))
    ok = all(np.array_equal(E[ours], ref_dequantize(kinds[name], raws[name]).reshape(E[ours].shape))
             for name, ours in [("blk.0.attn_q.weight", "layers.0.wq"), ("blk.0.ffn_up.weight", "layers.0.w3"),
                                ("token_embd.weight", "token_embedding")])
    T.check("gguf_k_quant_model_exports_the_reference_values", ok, "a dequantized matrix differs")
    # a super-block scale of inf: q8_0 cannot hold what it gives, and says where (one line, no numpy warning)
    k = [i for i, t in enumerate(tensors) if t[0] == "blk.0.attn_q.weight"][0]
    raw = bytearray(tensors[k][3])
    raw[0:2] = np.float16(np.inf).tobytes()
    tensors[k] = tensors[k][:3] + (bytes(raw),)
    gw.write_gguf(path("kquant_inf.gguf"), meta, tensors)
    expect_refusal("gguf_k_quant_inf_scale_refused_naming_the_tensor", path("kquant_inf.gguf"), "layers.0.wq")


# ----------------------------------------------------------------------------
# Refusals and the malformed corpus


def small_gguf(name, mat_type="Q8_0", edit=None, **kw):
    """A small valid GGUF (Q8_0 matrices, synthetic byte-level vocabulary);
    edit(meta, tensors) may change it. Returns (path, marks)."""
    cfg = make_hf.hf_config(dim=32, hidden=64, n_layers=1, n_heads=4, n_kv_heads=2)
    meta, tensors = gw.hf_to_gguf(cfg, make_hf.random_weights(cfg, 8), mat_type,
                                  gw.llama3_tokenizer(make_hf.synthetic_tokenizer(300), bos=270, eos=271, eot=274))
    if edit:
        edit(meta, tensors)
    p = path(name + ".gguf")
    return p, gw.write_gguf(p, meta, tensors, **kw)


def set_meta(key, vtype, value):
    def edit(meta, tensors):
        meta[:] = [m for m in meta if m[0] != key] + [(key, vtype, value)]
    return edit


def refusals():
    cases = [
        ("other_architecture", set_meta("general.architecture", gw.STRING, "qwen2"), "qwen2"),
        ("mixture_of_experts", set_meta("llama.expert_count", gw.UINT32, 8), "expert"),
        ("partial_rotary", set_meta("llama.rope.dimension_count", gw.UINT32, 4), "rotary"),
        ("yarn_rope_scaling", set_meta("llama.rope.scaling.type", gw.STRING, "yarn"), "yarn"),
        ("tokenizer_model_bert", set_meta("tokenizer.ggml.model", gw.STRING, "bert"), "bert"),
        ("tokenizer_pre_qwen2", set_meta("tokenizer.ggml.pre", gw.STRING, "qwen2"), "qwen2"),
        ("tokenizer_pre_missing", lambda m, t: m.__setitem__(
            slice(None), [x for x in m if x[0] != "tokenizer.ggml.pre"]), "pre-tokenizer"),
        ("other_architecture_even_with_llama_keys", set_meta("general.architecture", gw.STRING, "mistral3"),
         "mistral3"),
        ("missing_feed_forward_length", lambda m, t: m.__setitem__(
            slice(None), [x for x in m if x[0] != "llama.feed_forward_length"]), "feed_forward_length"),
        ("missing_tensor", lambda m, t: t.pop(), "missing tensor"),
        ("bias_tensor", lambda m, t: t.append(("blk.0.attn_q.bias", "F32", (32,), bytes(128))), "bias"),
        ("rope_freqs_not_llama3", lambda m, t: t.append(("rope_freqs.weight", "F32", (4,),
                                                         gw.encode(np.array([1, 3, 2, 5], np.float32), "F32"))),
         "rope_freqs"),
    ]
    for name, edit, mention in cases:
        p, _ = small_gguf("refuse_" + name, edit=edit)
        expect_refusal("gguf_refuses_" + name, p, mention)
    p, marks = small_gguf("q2k_type")  # a known type this exporter does not read: named
    data = bytearray(open(p, "rb").read())
    struct.pack_into("<I", data, marks["tensor_info"][0]["type"], 10)  # Q2_K, on token_embd
    with open(p, "wb") as f:
        f.write(data)
    expect_refusal("gguf_refuses_unsupported_type_by_name", p, "Q2_K")


def expect_refusal(name, p, mention):
    out = path("refused.bin")
    r = export(out, "--gguf", p)
    lines = r.stderr.strip().splitlines()
    ok = r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") \
        and mention.lower() in lines[0].lower() and not os.path.exists(out)
    T.check(name, ok, f"exit {r.returncode}, stderr {r.stderr.strip()[-300:]!r}, wanted a mention of {mention!r}")


def malformed_cases():
    """{name: bytes} of corrupt GGUFs made from a valid one."""
    p, marks = small_gguf("base")
    base = open(p, "rb").read()
    cases = {}

    def put(name, pos, code, value):
        b = bytearray(base)
        struct.pack_into("<" + code, b, pos, value)
        cases[name] = bytes(b)

    # truncated at every section boundary (and one byte after it)
    cuts = {"empty": 0, "magic": 3, "version": 4, "tensor_count": 8, "kv_count": 16, "header": 23}
    for i, kv in enumerate(marks["kv"]):
        cuts[f"kv{i}_start"] = kv["start"]
        cuts[f"kv{i}_type"] = kv["type"]
        cuts[f"kv{i}_value"] = kv["value"] + 1
    for i, ti in enumerate(marks["tensor_info"]):
        for field in ("start", "n_dims", "dims", "type", "offset"):
            cuts[f"tensor_info{i}_{field}"] = ti[field] + (1 if field != "start" else 0)
    cuts["infos_end"] = marks["infos_end"]
    cuts["data_start"] = marks["data_start"]
    for i, t in enumerate(marks["tensor"]):
        cuts[f"tensor{i}_start_plus_1"] = t["start"] + 1
        cuts[f"tensor{i}_middle"] = t["start"] + t["bytes"] // 2
    cuts["last_byte"] = len(base) - 1
    for name, n in cuts.items():
        cases["truncated_" + name] = base[:n]
    # header
    put("bad_magic", 0, "I", 0x46554746)
    put("version_1", 4, "I", 1)
    put("version_4", 4, "I", 4)
    put("big_endian_version_3", 4, "I", 0x03000000)
    for name, v in [("plus_1", len(marks["tensor_info"]) + 1), ("2^32", 2**32), ("2^64-1", 2**64 - 1)]:
        put("tensor_count_" + name, 8, "Q", v)
    for name, v in [("zero", 0), ("plus_1", len(marks["kv"]) + 1), ("2^64-1", 2**64 - 1)]:
        put("kv_count_" + name, 16, "Q", v)
    # metadata: key length, value types, strings, arrays
    kv = {m["key"]: m for m in marks["kv"]}
    for name, v in [("2^64-1", 2**64 - 1), ("past_end", len(base))]:
        put("key_length_" + name, marks["kv"][0]["start"], "Q", v)
    put("key_not_utf8", marks["kv"][0]["start"] + 8, "B", 0xFF)
    for name, v in [("13", 13), ("255", 255), ("2^32-1", 2**32 - 1)]:
        put("value_type_" + name, kv["general.architecture"]["type"], "I", v)
    put("string_value_length_2^64-1", kv["general.name"]["value"], "Q", 2**64 - 1)
    tokens = kv["tokenizer.ggml.tokens"]["value"]
    put("array_element_type_13", tokens, "I", 13)
    for name, v in [("2^64-1", 2**64 - 1), ("2^63", 2**63), ("2^32", 2**32), ("plus_1", 301)]:
        put("tokens_array_length_" + name, tokens + 4, "Q", v)
    put("token_string_length_2^64-1", tokens + 12, "Q", 2**64 - 1)
    put("token_type_array_length_2^64-1", kv["tokenizer.ggml.token_type"]["value"] + 4, "Q", 2**64 - 1)
    put("merges_array_length_2^64-1", kv["tokenizer.ggml.merges"]["value"] + 4, "Q", 2**64 - 1)
    put("tokens_array_of_int32", tokens, "I", gw.INT32)
    put("block_count_is_a_string", kv["llama.block_count"]["type"], "I", gw.STRING)
    # tensor infos
    q_at = [i for i, t in enumerate(marks["tensor_info"]) if t["name"] == "blk.0.attn_q.weight"][0]
    ti = marks["tensor_info"][q_at]  # a Q8_0 matrix
    put("tensor_name_length_2^64-1", ti["start"], "Q", 2**64 - 1)
    for name, v in [("0", 0), ("5", 5), ("2^32-1", 2**32 - 1)]:
        put("n_dims_" + name, ti["n_dims"], "I", v)
    for name, v in [("2^63", 2**63), ("2^64-1", 2**64 - 1), ("not_multiple_of_block", 33)]:
        put("dims0_" + name, ti["dims"], "Q", v)
    put("dims1_2^40", ti["dims"] + 8, "Q", 2**40)
    for name, v in [("4_removed_q4_2", 4), ("99", 99), ("2^32-1", 2**32 - 1)]:
        put("tensor_type_" + name, ti["type"], "I", v)
    off = marks["tensor"][q_at]["offset"]
    for name, v in [("unaligned", off + 1), ("past_end", len(base) - marks["data_start"] + 32),
                    ("2^64-32", 2**64 - 32)]:
        put("tensor_offset_" + name, ti["offset"], "Q", v)
    # duplicates
    p, _ = small_gguf("dup_tensor", edit=lambda m, t: t.__setitem__(2, (t[0][0],) + t[2][1:]))
    cases["tensor_name_twice"] = open(p, "rb").read()
    p, _ = small_gguf("dup_key", edit=lambda m, t: m.append(m[0]))
    cases["metadata_key_twice"] = open(p, "rb").read()
    # alignment (general.alignment)
    for name, v in [("0", 0), ("3", 3), ("2^31", 2**31)]:
        p, _ = small_gguf(f"align_{name}", edit=set_meta("general.alignment", gw.UINT32, v))
        cases["alignment_" + name] = open(p, "rb").read()
    p, _ = small_gguf("align_str", edit=set_meta("general.alignment", gw.STRING, "32"))
    cases["alignment_is_a_string"] = open(p, "rb").read()
    # arrays of arrays, 100 deep
    v = (gw.UINT8, [])
    for _ in range(100):
        v = (gw.ARRAY, [v])
    p, _ = small_gguf("nested", edit=set_meta("x.nested", gw.ARRAY, v))
    cases["arrays_nested_100_deep"] = open(p, "rb").read()
    return cases


def mutated_cases(n=300, seed=11):
    """{name: bytes}: the small GGUF with 1 to 4 random changes (a byte, a
    64-bit field, a cut), mostly in its header and metadata. A change may
    leave a valid file (a weight's byte): each must either export or end in
    one error line, never a traceback."""
    import random
    p, marks = small_gguf("mutation_base")
    base = open(p, "rb").read()
    rng = random.Random(seed)
    cases = {}
    for k in range(n):
        b = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(marks["data_start"], len(b))) if rng.random() < 0.9 else rng.randrange(len(b))
            kind = rng.random()
            if kind < 0.5:
                b[pos] = rng.randrange(256)
            elif kind < 0.85:
                v = rng.choice([0, 1, 2**32 - 1, 2**63, 2**64 - 1, rng.randrange(2**16), rng.randrange(2**40)])
                struct.pack_into("<Q", b, min(pos, len(b) - 8), v)
            else:
                b = b[:max(pos, 24)]
        cases[f"mutation_{k}"] = bytes(b)
    return cases


RUNNER = r"""
import io, json, os, resource, sys, time, traceback
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, sys.argv[2])
import export
results = {}
for name, p in json.loads(sys.stdin.read()):
    err, t0 = io.StringIO(), time.time()
    old, sys.stderr = sys.stderr, err
    try:
        rc = export.main([p + ".out", "--gguf", p])
    except BaseException:
        rc = "exception: " + traceback.format_exc()[-400:]
    sys.stderr = old
    results[name] = [rc, err.getvalue(), time.time() - t0, os.path.exists(p + ".out")]
print(json.dumps(results))
"""
AS_LIMIT = 1 << 30  # 1 GiB of address space for the whole exporter process


def malformed():
    cases = malformed_cases()
    mutations = mutated_cases()
    os.makedirs(path("malformed"), exist_ok=True)
    jobs = []
    for name, data in list(cases.items()) + list(mutations.items()):
        p = path("malformed", name + ".gguf")
        with open(p, "wb") as f:
            f.write(data)
        jobs.append((name, p))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RUNNER, str(AS_LIMIT), os.path.dirname(EXPORT)],
                       input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        return T.fail("gguf_malformed_corpus", f"runner exited {r.returncode}: {r.stderr[-400:]}")
    results = json.loads(r.stdout)
    loaded, bad = 0, []
    for name, _ in jobs:
        rc, err, secs, left = results[name]
        lines = err.strip().splitlines()
        refused = rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and not left
        if name in mutations:
            exported = rc == 0 and len(lines) == 1 and lines[0].startswith("wrote ")
            loaded += exported
            if not (refused or exported) or secs >= 10:
                bad.append(f"{name}: returned {rc!r} in {secs:.1f} s, stderr {err.strip()[-300:]!r}")
            continue
        T.check("gguf_malformed_" + name, refused and secs < 10,
                f"returned {rc!r} in {secs:.1f} s, stderr {err.strip()[-300:]!r}")
    T.check(f"gguf_{len(mutations)}_random_mutations_export_or_give_one_error_line", not bad,
            f"{len(bad)} bad, first {bad[0] if bad else ''} ({loaded} exported)")
    # The same through the command line: exit status 1 and one line, under ulimit -v
    for name in ("tokens_array_length_2^64-1", "truncated_tensor1_middle", "tensor_offset_2^64-32"):
        p = path("malformed", name + ".gguf")
        r = subprocess.run(["bash", "-c", f"ulimit -v {AS_LIMIT // 1024}; exec \"$0\" \"$@\"", sys.executable,
                            EXPORT, p + ".cli", "--gguf", p], capture_output=True, text=True, env=env, timeout=60)
        lines = r.stderr.strip().splitlines()
        T.check("gguf_malformed_cli_" + name, r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "),
                f"exit {r.returncode}, stderr {r.stderr.strip()[-300:]!r}")


def timed(name, fn):
    t0 = time.time()
    T.run(name, fn)
    if os.environ.get("VERBOSE") == "1":
        print(f"# {fn.__name__}: {time.time() - t0:.1f} s")


def main():
    try:
        timed("gguf_f32_exports_the_same_bytes_as_hf", llama3_model)
        timed("gguf_rope_scaling_of_real_llamas", real_llama_rope_scaling)
        timed("gguf_other_types", other_types)
        timed("gguf_stories260K_sentencepiece", stories)
        timed("gguf_block_formats", block_formats)
        timed("gguf_k_quant_model_exports_the_reference_values", k_quants_through_export)
        timed("gguf_refusals", refusals)
        timed("gguf_malformed_corpus", malformed)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
