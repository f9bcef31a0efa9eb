#!/usr/bin/env python3
"""vs_llamacpp.py - this engine and llama.cpp side by side, on the same weights.

Both engines run the same random-weight model of the Llama-3.2-1B shape (dim
2048, FFN 8192, 16 layers, 32 query heads, 8 KV heads, vocab 128256, tied
embeddings), 2 threads:

  llama1b-F16.gguf     written here (tests/gguf_writer.py; normal weights of std
                       0.02, norms 1 + 0.05 N(0, 1), Llama 3.1 RoPE scaling, the
                       real Llama 3 vocabulary from ../shared: llama.cpp needs one)
  llama1b-Q8_0.gguf    llama-quantize F16 -> Q8_0: every matrix Q8_0
  llama1b-Q4_0.gguf    llama-quantize F16 -> Q4_0 with llama.cpp's default rules:
                       the tied token_embd (its classifier) becomes Q6_K
  llama1b-Q4_0-pure.gguf   llama-quantize --pure: every matrix Q4_0
and ours, exported FROM those GGUF files (export/export.py --gguf):
  q8_0       <- Q8_0 GGUF, --dtype q8_0: repacked bit for bit
  q4_0       <- Q4_0 GGUF, --dtype q4_0: the matrices repacked bit for bit, the
                embedding/classifier q8_0 (our default rule) requantized from
                llama.cpp's Q6_K values
  q4_0-e4    <- Q4_0-pure GGUF, --dtype q4_0 --embedding-dtype q4_0: every
                tensor repacked bit for bit (the same bytes as llama.cpp's file)

Missing files are made once into ${XDG_CACHE_HOME:-~/.cache}/l3bench/peer/
(--cache): a few minutes; llama-quantize is looked for next to llama-bench
unless --llama-quantize says where it is.

Measured in interleaved rounds (each round: bandwidth and FMA peak, then for each
pair: ours, theirs) until each pair has --rounds (default 3) quiet ones: rounds in
which other programs used more than --max-others (default 25 %) of the machine
during one of the pair's runs are made again (up to --retries more, default
--rounds) and left out while quiet ones exist; medians over the quiet rounds:
  ours    decode: ./run -T 2 -t 0 on a short prompt, then 64 decoded tokens
          (the "decode:" line: tok/s over those 64); prefill: ./run on a
          128-token prompt (BOS included) cut from prose.txt (the "prefill:" line),
          as bench/bench.py measures them (its functions, imported).
  theirs  llama-bench -m GGUF -t 2 -p 128 -n 64 -r 1 -o json: pp128 (a batch of 128
          random tokens) and tg64 (64 tokens one at a time from an empty cache),
          each after its own warm-up run; llama.cpp's KV cache is f16 (its
          default), ours f32 (ours): at these depths it is < 0.1 % of the bytes.
  machine bench/bandwidth (read GB/s) and bench/fma_peak (f32 GFLOP/s) in each
          round, the best of the rounds kept (other programs only lower them);
          % roofline = decode tok/s x bytes of weights per token / bandwidth
          (ours: -m info's weight_bytes; theirs: llama-bench's model_size),
          % FMA peak = prefill tok/s x 2 x matmul params / FMA peak.
  ratio   ours / theirs within each round (the two ran seconds apart), median
          over the rounds, with its range.

usage: python3 bench/vs_llamacpp.py --llama-bench PATH [--llama-quantize PATH]
                                    [--pairs q8_0,q4_0,q4_0-e4] [--rounds 3] [--threads 2]
                                    [--max-others 0.25] [--retries N] [--cache DIR] [--wait-idle SECONDS]
       python3 bench/vs_llamacpp.py --report RESULTS.json
Python 3 standard library only (the GGUF writer and the exporter run under the
first python3 that can import numpy). Results: <cache>/vs-llamacpp-DATE.json,
written after each round.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import bench as B  # noqa: E402  (bench.py: building, running children, prompts, models)

ROOT = B.ROOT
DECODE_TOKENS = 64
PREFILL_TOKENS = 128
KV_TYPE = ["--kv-type", "f16"]  # ours with llama.cpp's default KV cache type (f16 keys and values)
CHECK_TOKENS = 12  # greedy tokens compared between the engines
# pair -> (GGUF file stem, llama-quantize arguments, export.py arguments for ours)
PAIRS = {
    "q8_0": ("llama1b-Q8_0", ["Q8_0"], ["--dtype", "q8_0"]),
    "q4_0": ("llama1b-Q4_0", ["Q4_0"], ["--dtype", "q4_0"]),
    "q4_0-e4": ("llama1b-Q4_0-pure", ["--pure", "Q4_0"], ["--dtype", "q4_0", "--embedding-dtype", "q4_0"]),
}
SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
         "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
         "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}  # export.py's --preset llama3.2-1b


def fail(msg):
    print("error: " + msg, file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------
# The F16 GGUF (run under a python3 with numpy: --write-gguf)


def write_random_gguf(path, tokenizer_json, seed=0):
    """A random Llama of SHAPE as an F16 GGUF, streamed tensor by tensor; each tensor from
    its own generator seeded by (seed, name), matrices N(0, 0.02^2), norms 1 + 0.05 N(0, 1)."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import gguf_writer as gw
    c = SHAPE
    meta, rope = gw.hf_to_gguf(c, {}, "F16", gw.llama3_tokenizer(tokenizer_json))
    meta = [m for m in meta if m[0] != "general.file_type"] + [("general.file_type", gw.UINT32, 1)]  # MOSTLY_F16
    dim, hidden = c["hidden_size"], c["intermediate_size"]
    kv_dim = dim // c["num_attention_heads"] * c["num_key_value_heads"]

    def values(name, shape):
        def raw():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            if len(shape) == 1:
                return gw.encode(1 + 0.05 * rng.standard_normal(shape, dtype=np.float32), "F32")
            out = []
            for r0 in range(0, shape[0], 8192):  # ~64 MiB of float32 at a time
                x = rng.standard_normal((min(8192, shape[0] - r0), shape[1]), dtype=np.float32)
                out.append(gw.encode(x * np.float32(0.02), "F16"))
            return b"".join(out)
        return (name, "F32" if len(shape) == 1 else "F16", shape, raw)

    tensors = rope + [values("token_embd.weight", (c["vocab_size"], dim))]
    for l in range(c["num_hidden_layers"]):
        for kind, shape in (("attn_norm", (dim,)), ("attn_q", (dim, dim)), ("attn_k", (kv_dim, dim)),
                            ("attn_v", (kv_dim, dim)), ("attn_output", (dim, dim)), ("ffn_norm", (dim,)),
                            ("ffn_gate", (hidden, dim)), ("ffn_up", (hidden, dim)), ("ffn_down", (dim, hidden))):
            tensors.append(values(f"blk.{l}.{kind}.weight", shape))
    tensors.append(values("output_norm.weight", (dim,)))
    gw.write_gguf(path + ".tmp", meta, tensors)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Making the files


def run_logged(cmd, what):
    B.log("%s: %s" % (what, " ".join(cmd)))
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if r.returncode != 0:
        fail("%s failed (exit %d): %s\n%s" % (what, r.returncode, " ".join(cmd), r.stdout.strip()[-2000:]))
    B.log("%s: %.0f s" % (what, time.time() - t0))
    return r.stdout


def ensure_files(args, pairs):
    """{pair: (gguf path, our .bin path)}, making whatever is missing."""
    cache = args.cache
    f16 = os.path.join(cache, "llama1b-F16.gguf")
    need = [p for p in pairs if not os.path.exists(os.path.join(cache, PAIRS[p][0] + ".gguf"))]
    python = None
    if need and not os.path.exists(f16):
        python = B.numpy_python() or fail("no python3 with numpy to write the GGUF (apt-get install python3-numpy)")
        tok = os.path.join(args.shared, "models", "llama3-tokenizer.json")
        if not os.path.exists(tok):
            fail("%s: no such file (the Llama 3 vocabulary the GGUF needs; --shared DIR)" % tok)
        run_logged([python, os.path.abspath(__file__), "--write-gguf", f16, "--tokenizer", tok], "writing the F16 GGUF")
    quantize = args.llama_quantize or os.path.join(os.path.dirname(args.llama_bench), "llama-quantize")
    out = {}
    for p in pairs:
        stem, qargs, eargs = PAIRS[p]
        gguf = os.path.join(cache, stem + ".gguf")
        if not os.path.exists(gguf):
            if not os.access(quantize, os.X_OK):
                fail("%s: no llama-quantize there to make %s (--llama-quantize PATH)" % (quantize, gguf))
            log = run_logged([quantize] + qargs[:-1] + [f16, gguf + ".tmp", qargs[-1], str(args.threads)],
                             "llama-quantize " + " ".join(qargs))
            with open(os.path.join(cache, stem + ".quantize.log"), "w") as f:
                f.write(log)  # which type each tensor got
            os.replace(gguf + ".tmp", gguf)
        ours = os.path.join(cache, "%s-%s.bin" % (stem, p))
        problem = B.model_problem(ours)
        if problem:
            python = python or B.numpy_python() or fail("no python3 with numpy to run export/export.py")
            if problem != "missing":
                B.warn("%s: %s; exporting it again" % (ours, problem))
            run_logged([python, os.path.join(ROOT, "export", "export.py"), ours, "--gguf", gguf] + eargs,
                       "export.py --gguf " + os.path.basename(gguf))
        out[p] = (gguf, ours)
    return out


# ----------------------------------------------------------------------------
# Measuring


def llama_bench(args, gguf):
    """One llama-bench run (pp128 and tg64, one repetition each) -> {"pp": row, "tg": row, "others": ...}."""
    cmd = [args.llama_bench, "-m", gguf, "-t", str(args.threads), "-p", str(PREFILL_TOKENS), "-n", str(DECODE_TOKENS),
           "-r", "1", "-o", "json"]
    B.quiet_machine()
    r = B.run_child(cmd, stdout=True)
    try:
        rows = json.loads(r["stdout"]) if r["rc"] == 0 else None
    except ValueError:
        rows = None
    if not rows:
        B.warn("%s failed (exit %d):\n%s" % (" ".join(cmd), r["rc"], r["stderr"].strip()[-1000:]))
        return None
    out = {"cmd": " ".join(cmd), "others": r["others"], "rss_bytes": r["rss_bytes"], "wall_s": r["wall_s"]}
    for row in rows:
        out["pp" if row.get("n_gen") == 0 else "tg"] = row
    return out


def ours(model, threads, decode_prompt, prompt_file):
    """./run's decode and prefill. -n prompt + 64 runs 64 forward passes after the prompt's
    and samples 65 tokens (the last one printed, not fed): its "decode: 65 tokens" line's
    tok/s is rescaled to the 64 passes, llama-bench's tg64."""
    dec = B.generate(model, threads, decode_prompt[1] + DECODE_TOKENS, prompt=decode_prompt[0], extra=KV_TYPE)
    pre = B.generate(model, threads, prompt_file[1], prompt_file=prompt_file[0], extra=KV_TYPE)
    if not (dec and pre):
        return None
    if dec["decode_tokens"] == DECODE_TOKENS + 1:
        dec["forward_tps"] = dec["decode_tps"] * DECODE_TOKENS / (DECODE_TOKENS + 1)
    else:  # a stop token came first: as many passes as tokens printed
        B.warn("%s: decoded %d tokens, not %d (a stop token)" % (model, dec["decode_tokens"], DECODE_TOKENS + 1))
        dec["forward_tps"] = dec["decode_tps"]
    return {"decode": dec, "prefill": pre}


def tokenize(model, text):
    r = subprocess.run([B.RUN, model, "-m", "tokenize", "-i", text], stdout=subprocess.PIPE, universal_newlines=True)
    return r.stdout.split() if r.returncode == 0 else None


def same_output(args, files, prompt):
    """Both engines' greedy continuation of the prompt (CHECK_TOKENS tokens; ours with an f16
    cache as llama.cpp's) -> {pair: {ours, theirs, same_tokens}}: the same weights give the same
    tokens until two candidates are so close that the engines' rounding orders them differently
    (random weights make near-ties common). Needs llama-completion next to llama-bench."""
    completion = os.path.join(os.path.dirname(args.llama_bench), "llama-completion")
    if not os.access(completion, os.X_OK):
        B.warn("no %s: skipping the same-output check" % completion)
        return None
    out = {}
    for p, (gguf, bin_) in files.items():
        n_prompt = len(tokenize(bin_, prompt) or [])  # BOS included: ./run -n counts it, and samples after the last
        r = subprocess.run([completion, "-m", gguf, "-p", prompt, "-n", str(CHECK_TOKENS), "--temp", "0", "-t",
                            str(args.threads), "-c", "256", "-no-cnv", "--simple-io"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        o = subprocess.run([B.RUN, bin_, "-i", prompt, "-n", str(n_prompt + CHECK_TOKENS - 1), "-t", "0", "-T", str(args.threads)] + KV_TYPE,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        theirs, ours_ = tokenize(bin_, r.stdout.strip()), tokenize(bin_, o.stdout.strip())
        if r.returncode != 0 or o.returncode != 0 or not theirs or not ours_:
            out[p] = {"error": "llama-completion exit %d, ./run exit %d" % (r.returncode, o.returncode)}
            continue
        n = 0
        while n < min(len(theirs), len(ours_)) and theirs[n] == ours_[n]:
            n += 1
        out[p] = {"theirs": r.stdout.strip(), "ours": o.stdout.strip()[:len(r.stdout.strip()) + 40],
                  "same_tokens": max(0, min(n - n_prompt, CHECK_TOKENS))}
    return out


def measure(args, files, res, save):
    """Fills res (machine, samples, infos, same_output, prompts), calling save() after each round."""
    machine, samples = res["machine"], res["samples"] = [], {p: [] for p in files}
    infos = res["infos"] = {p: B.model_info(files[p][1]) for p in files}
    if None in infos.values():
        fail("./run -m info failed on one of %s" % [f[1] for f in files.values()])
    first = files[next(iter(files))][1]
    prompts = B.Prompts(first, os.path.join(args.shared, "corpora", "prose.txt"), args.cache)
    prompt_file = prompts.make(PREFILL_TOKENS)
    short = os.path.join(args.cache, "prompt-short.txt")
    with open(short, "w") as f:
        f.write(B.SHORT_PROMPT)
    decode_prompt = (B.SHORT_PROMPT, prompts.count(short))
    res["prompts"] = {"decode_prompt_tokens": decode_prompt[1], "prefill_prompt_tokens": prompt_file[1]}
    B.log("the same-output check")
    res["same_output"] = same_output(args, files, B.SHORT_PROMPT)
    for gguf, bin_ in files.values():
        B.level_page_cache(gguf)
        B.level_page_cache(bin_)
    # Rounds until each pair has args.rounds quiet ones (no run of it disturbed by other programs
    # beyond --max-others), at most args.retries more than args.rounds.
    tries = args.rounds + (args.rounds if args.retries is None else args.retries)
    i = 0
    while i < tries and min(sum(map(quiet_sample, samples[p])) for p in files) < args.rounds:
        B.log("round %d (at most %d): bandwidth and FMA peak" % (i + 1, tries))
        machine.append(B.measure_machine(args.threads, 1))
        for p, (gguf, bin_) in files.items():
            if sum(map(quiet_sample, samples[p])) >= args.rounds:
                continue
            B.log("round %d: %s ours" % (i + 1, p))
            o = ours(bin_, args.threads, decode_prompt, prompt_file)
            B.log("round %d: %s llama.cpp" % (i + 1, p))
            t = llama_bench(args, gguf)
            samples[p].append({"round": i, "ours": o, "theirs": t})
        i += 1
        save()


# ----------------------------------------------------------------------------
# Summary and report


def sample_runs(r):
    return [r["ours"]["decode"], r["ours"]["prefill"], r["theirs"]] if r["ours"] and r["theirs"] else []


def quiet_sample(r):
    """Both engines measured, and no run disturbed by other programs beyond --max-others."""
    runs = sample_runs(r)
    return bool(runs) and all(B.is_quiet(x) for x in runs)


def max_others(runs):
    xs = [r["others"] for r in runs if r.get("others") is not None]
    return max(xs) if xs else None


def summarize(res):
    """Per pair: the medians over its quiet rounds (all rounds if none was quiet), and the
    ours/theirs ratios of each of those rounds."""
    B.MAX_OTHERS = res["args"].get("max_others", B.MAX_OTHERS)
    med = B.median
    # ceilings: other programs only lower them, so the best of the rounds is the closest to the hardware
    bw = max(m["bandwidth_gbs"] for m in res["machine"])
    fma = max(m["fma_peak_gflops"] for m in res["machine"])
    out = {}
    for p, rounds in res["samples"].items():
        info = res["infos"][p]
        for j, r in enumerate(rounds):
            r.setdefault("round", j)
        ok = [r for r in rounds if r["ours"] and r["theirs"] and "pp" in r["theirs"] and "tg" in r["theirs"]]
        if not ok:
            out[p] = None
            continue
        n_ok = len(ok)
        ok = [r for r in ok if quiet_sample(r)] or ok  # the quiet rounds, if there are any
        od = [r["ours"]["decode"]["forward_tps"] for r in ok]
        op = [r["ours"]["prefill"]["prefill_tps"] for r in ok]
        td = [r["theirs"]["tg"]["avg_ts"] for r in ok]
        tp = [r["theirs"]["pp"]["avg_ts"] for r in ok]
        theirs_bytes = ok[0]["theirs"]["tg"].get("model_size")
        s = {"rounds": len(ok), "rounds_measured": n_ok, "quiet": quiet_sample(ok[0]),
             "ours_decode": od, "ours_prefill": op, "theirs_decode": td, "theirs_prefill": tp,
             "decode_ratio": [a / b for a, b in zip(od, td)], "prefill_ratio": [a / b for a, b in zip(op, tp)],
             "ours_weight_bytes": info["weight_bytes"], "theirs_model_size": theirs_bytes,
             "matmul_params": info["matmul_params"],
             "theirs_model_type": ok[0]["theirs"]["tg"].get("model_type"),
             "ours_others": max_others([r["ours"]["decode"] for r in ok] + [r["ours"]["prefill"] for r in ok]),
             "theirs_others": max_others([r["theirs"] for r in ok])}
        s["ours_roofline"] = 100 * med(od) * info["weight_bytes"] / (bw * 1e9)
        s["ours_fma"] = 100 * med(op) * 2 * info["matmul_params"] / (fma * 1e9)
        if theirs_bytes:
            s["theirs_roofline"] = 100 * med(td) * theirs_bytes / (bw * 1e9)
        s["theirs_fma"] = 100 * med(tp) * 2 * info["matmul_params"] / (fma * 1e9)
        out[p] = s
    return out


def spread(xs, spec="%.1f"):
    if len(xs) < 2:
        return spec % xs[0]
    return (spec + " (" + spec + "–" + spec + ")") % (B.median(xs), min(xs), max(xs))


GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0 (token_embd Q6_K)", "q4_0-e4": "Q4_0 --pure"}
OUR_TYPES = {"q8_0": "q8_0", "q4_0": "q4_0, embedding q8_0", "q4_0-e4": "q4_0, embedding q4_0"}


def report(res):
    summ = summarize(res)
    m = res["machine"]
    lines = ["## this engine vs llama.cpp (%d threads; interleaved rounds, medians (range) over the quiet ones)"
             % res["args"]["threads"], "",
             "read bandwidth %s GB/s, f32 FMA peak %s GFLOP/s (%s): the best (all) of the rounds; "
             "load average at start %s; llama.cpp: %s" % (
                 "%.1f (%s)" % (max(x["bandwidth_gbs"] for x in m), " ".join("%.1f" % x["bandwidth_gbs"] for x in m)),
                 "%.0f (%s)" % (max(x["fma_peak_gflops"] for x in m), " ".join("%.0f" % x["fma_peak_gflops"] for x in m)),
                 m[0]["vector_unit"], " ".join("%.2f" % x for x in res["loadavg"]), res.get("llama_version", "?")), "",
             "| engine | weights | MiB read per token | decode tok/s | %% roofline | prefill tok/s (%d tokens) "
             "| %% FMA peak | ours / theirs decode | ours / theirs prefill | others (rounds used/made) |" % PREFILL_TOKENS,
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in summ.items():
        if not s:
            lines.append("| both | %s | measurement failed | | | | | | | |" % p)
            continue
        lines.append("| llama.cpp | %s | %s | %s | %s | %s | %.0f %% | | | %s |" % (
            GGUF_TYPES[p], B.fmt(s["theirs_model_size"] and s["theirs_model_size"] / B.MIB, "%.0f"),
            spread(s["theirs_decode"]), B.fmt(s.get("theirs_roofline"), "%.0f %%"), spread(s["theirs_prefill"], "%.0f"),
            s["theirs_fma"], B.fmt(s["theirs_others"] and 100 * s["theirs_others"], "%.0f %%")))
        lines.append("| this engine | %s | %.0f | %s | %.0f %% | %s | %.0f %% | **%s** | **%s** | %s |" % (
            OUR_TYPES[p], s["ours_weight_bytes"] / B.MIB, spread(s["ours_decode"]), s["ours_roofline"],
            spread(s["ours_prefill"], "%.0f"), s["ours_fma"], spread(s["decode_ratio"], "%.2f"),
            spread(s["prefill_ratio"], "%.2f"), B.fmt(s["ours_others"] and 100 * s["ours_others"], "%.0f %%")
            + " (%d/%d%s)" % (s["rounds"], s["rounds_measured"], "" if s["quiet"] else ", none quiet")))
    checks = []
    if summ.get("q4_0"):
        checks.append(("q4_0 decode >= 1.5x llama.cpp Q4_0's tg64", B.median(summ["q4_0"]["decode_ratio"]), 1.5))
        checks.append(("q4_0 prefill >= llama.cpp Q4_0's pp128", B.median(summ["q4_0"]["prefill_ratio"]), 1.0))
    if summ.get("q8_0"):
        checks.append(("q8_0 prefill >= llama.cpp Q8_0's pp128", B.median(summ["q8_0"]["prefill_ratio"]), 1.0))
    lines += [""] + ["- %s: %.2fx, %s" % (what, r, "holds" if r >= need else "does NOT hold") for what, r, need in checks]
    same = res.get("same_output")
    if same:
        lines += ["", "Same weights, same tokens: greedy continuations of \"%s\" agree for the first %s of %d tokens "
                  "(llama-completion --temp 0; ./run -t 0 --kv-type f16)." % (B.SHORT_PROMPT, ", ".join(
                      "%s %s" % (p, x.get("same_tokens", x.get("error"))) for p, x in same.items()), CHECK_TOKENS)]
    t = res.get("prompts", {})
    lines += ["",
              "- ours: decode = ./run's decode line over %d tokens after a %d-token prompt; prefill = its prefill line "
              "on a %s-token prompt. llama.cpp: llama-bench tg%d / pp%d (avg_ts of 1 repetition after a warm-up)."
              % (DECODE_TOKENS, t.get("decode_prompt_tokens", 0), t.get("prefill_prompt_tokens", "?"),
                 DECODE_TOKENS, PREFILL_TOKENS),
              "- MiB read per token: ours -m info's weight_bytes, llama.cpp's model_size (the tensors); %% roofline = "
              "decode tok/s x those bytes / the bandwidth; %% FMA peak = prefill tok/s x 2 x %.4g / the FMA peak." % next((s["matmul_params"] for s in summ.values() if s), 0),
              "- ratios: ours / theirs within each round (seconds apart), median (range) over the rounds used; others = the "
              "most CPU other programs used during any of the runs used (%% of all cores); a round where any run of a "
              "pair saw more than %.0f %% is noisy: left out while quiet ones exist, and made again (--retries)." %
              (100 * B.MAX_OTHERS),
              "", "took %.0f s; ./run at %s%s" % (res["elapsed_s"], (res["git"].get("commit") or "?")[:7],
                                                  " + uncommitted changes" if res["git"].get("dirty") else "")]
    return "\n".join(lines)


def llama_version(path):
    """"version: 0.7.0 (build 11669, commit Debian)", "built with ...", and the CPU backend it loads."""
    r = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    lines = [l.strip() for l in r.stdout.splitlines()]
    found = [l for l in lines if l.startswith(("version:", "built with"))]
    found += sorted({os.path.basename(l.split()[-1]) for l in lines if l.startswith("load_backend:")})
    return ", ".join(found) or "unknown version"


def main():
    cache_default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "l3bench", "peer")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench (required)")
    ap.add_argument("--llama-quantize", metavar="PATH", help="llama.cpp's llama-quantize (default: next to llama-bench)")
    ap.add_argument("--pairs", default="q8_0,q4_0,q4_0-e4", help="comma-separated, of %s (default %%(default)s)"
                    % ", ".join(PAIRS))
    ap.add_argument("--rounds", type=int, default=3, help="quiet interleaved rounds wanted (default %(default)s)")
    ap.add_argument("--max-others", type=float, default=B.MAX_OTHERS, metavar="FRACTION",
                    help="a round is noisy if other programs used more than this fraction of all cores during one "
                    "of its runs (default %(default)s): left out of the medians while quiet ones exist")
    ap.add_argument("--retries", type=int, help="extra rounds to replace noisy ones (default: as many as --rounds)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default %(default)s)")
    ap.add_argument("--cache", default=cache_default, help="models and results (default %(default)s)")
    ap.add_argument("--shared", default=os.environ.get("SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to this long for the machine to be < 25%% busy (default 0)")
    ap.add_argument("--report", metavar="JSON", help="print the table of an earlier results file and exit")
    ap.add_argument("--write-gguf", metavar="PATH", help=argparse.SUPPRESS)  # internal: under a numpy python3
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true", help="progress lines even when stderr is not a terminal")
    args = ap.parse_args()
    if args.write_gguf:
        write_random_gguf(args.write_gguf, args.tokenizer)
        return
    if args.report:
        try:
            with open(args.report) as f:
                print(report(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            fail("%s: not a results file of vs_llamacpp.py (%s)" % (args.report, e))
        return
    if not args.llama_bench:
        fail("--llama-bench PATH is required: llama.cpp's llama-bench (see the top of bench/vs_llamacpp.py)")
    if not (os.path.isfile(args.llama_bench) and os.access(args.llama_bench, os.X_OK)):
        fail("--llama-bench %s: not an executable file" % args.llama_bench)
    pairs = args.pairs.split(",")
    if not pairs or any(p not in PAIRS for p in pairs):
        fail("--pairs %s: a comma-separated list of %s" % (args.pairs, ", ".join(PAIRS)))
    if args.rounds < 1 or args.threads < 1:
        fail("--rounds and --threads must be at least 1")
    args.llama_bench = os.path.abspath(args.llama_bench)
    B.VERBOSE = B.VERBOSE or args.verbose
    B.WAIT_IDLE, B.MAX_OTHERS = args.wait_idle, args.max_others
    os.makedirs(args.cache, exist_ok=True)
    t0 = time.time()
    B.build(os.environ.get("CC", "cc"))
    B.RUN = os.path.join(args.cache, "run.%d" % os.getpid())  # a copy: others rebuild ./run meanwhile
    shutil.copy2(os.path.join(ROOT, "run"), B.RUN)
    path = os.path.join(args.cache, "vs-llamacpp-%s.json" % time.strftime("%Y%m%d-%H%M%S"))

    def save():  # after each round, so that an interrupted run keeps what it measured (--report reads it)
        res["elapsed_s"] = time.time() - t0
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
    try:
        files = ensure_files(args, pairs)
        res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": B.git_state(), "loadavg": os.getloadavg(),
               "args": vars(args), "llama_version": llama_version(args.llama_bench), "files": files}
        measure(args, files, res, save)
    finally:
        os.remove(B.RUN)
    res["summary"] = summarize(res)
    save()
    print(report(res))
    print("\nresults: %s" % path)


if __name__ == "__main__":
    main()
