#!/usr/bin/env python3
"""kv_heads.py - the MHA <-> GQA <-> MQA trade-off, measured on this machine.

  python3 experiments/kv_heads.py            full run (about 4 minutes on a quiet
                                             2-core machine, 5-8 on a busy one)
  python3 experiments/kv_heads.py --quick    one decode repeat, no ./run check at depth 1024
  python3 experiments/kv_heads.py --replot   kv_heads.md and kv_heads.svg again from kv_heads.json

1. Quality. Perplexity of the two real tiny checkpoints on
   $SHARED/corpora/tinystories-valid.txt (the whole file) at every valid
   --kv-heads K, against the KV-cache bytes per token:
     ./run M -m ppl -f tinystories-valid.txt --kv-heads K -T 1
   (two such runs at a time on 2 cores: the same numbers as -T 2, and no
   thread barriers to stall when other programs share the machine).
   stories260K (8 query heads, 4 KV heads: GQA) and aidreams260K (4 / 4: MHA).
   K below the file's n_kv_heads mean-pools heads (no uptraining), K above
   repeats them (same model, bigger cache). Also the KL divergence of each
   converted model's next-token distributions from the file's own (via
   tests/logits), which unlike perplexity needs no in-domain text.

2. Speed. Decode tok/s at depth 1 / 1024 / 4000 (tokens already in the KV
   cache) on random Llama-3.2-1B-shape models with 32, 8 and 1 KV heads, f32
   and q8_0 weights, with the bytes each decoded token reads: all the weights
   plus depth x kv_bytes_per_token of cache. Prefilling 4000 tokens through a
   1B model takes one to several minutes per run on 2 cores, far over the
   budget for 6 models x 3 depths x several repeats, so the decode is timed
   by bench/decode_at_depth.c: it #includes run.c, writes the cache
   positions 0..D-1 directly and times the very forward() calls ./run's
   generate loop makes after a prefill (median of 5 measurements of 8 tokens
   for q8_0, 4 for f32; the three models of a weight type in one process,
   measured in turn, so that load from other programs hits them alike).
   To check that shortcut, real ./run runs (a D-token prompt cut from
   prose.txt, -n D+32 -t 0, stderr "decode: N tokens, X tok/s") are made at
   depth 1 for every q8_0 model and the f32 one with 8 KV heads, and at depth
   1024 for the 32-KV-head q8_0 one.

The 1B models are made once (export.py --random --preset llama3.2-1b) in
${XDG_CACHE_HOME:-~/.cache}/l3bench/ under bench/bench.py's names
(llama1b-{f32,q8_0}.bin for 8 KV heads, llama1b-kv{32,1}-{f32,q8_0}.bin):
about 19 GB, a minute or two each (bench.py's ensure_model: a cached file
whose header's format version is not model.h's is exported again). Each
weight file is dropped from the page cache and read back sequentially before
it is timed, so that all are cached alike (in huge pages: a file cached in
4 KiB pages, as some were after earlier runs, streams slower, whatever its KV heads). Timings are noisy when other programs run: the tables give
every measurement and the fraction of the cores others kept busy.

Writes experiments/kv_heads.json (raw), kv_heads.md (tables) and
kv_heads.svg (the plot). Python 3 standard library only; export.py runs
under the first python3 that has numpy. The ./run binary is copied first,
so a rebuild during the run does not change the engine under measurement.
"""
import argparse
import array
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench import Prompts, level_page_cache, ensure_model as bench_ensure_model  # noqa: E402  (shared with make bench: same model names)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN = os.path.join(ROOT, "run")
EXPORT = os.path.join(ROOT, "export", "export.py")
OUT_JSON, OUT_MD, OUT_SVG = (os.path.join(HERE, "kv_heads." + e) for e in ("json", "md", "svg"))
T0 = time.time()

TINY = [  # name, model, tokenizer (in $SHARED/models)
    ("stories260K", "stories260K.bin", "tok512.bin"),
    ("aidreams260K", "aidreams260K.bin", "aidreams260K-tok512.bin"),
]
KV_HEADS = (32, 8, 1)
DTYPES = ("q8_0", "f32")
DEPTHS = (1, 1024, 4000)
DECODE_TOKENS = {"q8_0": 8, "f32": 4}  # timed decode steps per measurement (harness): ~1 s each
KL_TOKENS = 2048     # corpus tokens over which converted and original predictions are compared
RUN_TOKENS = 32      # decoded tokens of a real ./run cross-check (-n depth + 32)
CFLAGS = ["-O3", "-march=native", "-std=c11", "-D_GNU_SOURCE", "-ffp-contract=fast"]  # the Makefile's


CHILDREN = set()  # running child processes, ended if we are terminated


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, universal_newlines=True, **kw)
    CHILDREN.add(p)
    return p


def terminated(*_):
    for p in list(CHILDREN):
        if p.returncode is None:
            p.kill()
    sys.exit("kv_heads.py: terminated")


def log(msg):
    sys.stderr.write("[%5.0f s] %s\n" % (time.time() - T0, msg))
    sys.stderr.flush()


def fail(msg):
    sys.exit("kv_heads.py: error: " + msg)


# ----------------------------------------------------------------------------
# Running things

def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def machine_busy(seconds=0.5):
    """Fraction of all cores busy (other programs) while we sleep."""
    try:
        a = cpu_times()
        time.sleep(seconds)
        b = cpu_times()
        return round((b[0] - a[0]) / max(1, b[1] - a[1]), 2)
    except (OSError, ValueError, IndexError):
        return None


def wait_idle(limit):
    busy, deadline = machine_busy(), time.time() + limit
    while busy is not None and busy > 0.25 and time.time() < deadline:
        time.sleep(2)
        busy = machine_busy()
    return busy


def run(cmd):
    """(stdout, stderr, wall s) of a command that must succeed."""
    t0 = time.time()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    CHILDREN.discard(p)
    wall = time.time() - t0
    if p.returncode != 0:
        fail("%s failed (exit %d): %s" % (" ".join(cmd), p.returncode, err.strip()[-500:]))
    return out, err, wall


def run_timed(cmd, threads):
    """(stdout, stderr, wall s, others): run() plus the fraction of the
    machine's cores that other programs kept busy meanwhile (all CPU time
    from /proc/stat minus the child's own, from wait4's rusage)."""
    t0, before = time.time(), cpu_times()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = spawn(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = status
        CHILDREN.discard(p)
        wall = time.time() - t0
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if rc != 0:
        fail("%s failed (exit %d): %s" % (" ".join(cmd), rc, e.strip()[-500:]))
    after = cpu_times()
    ncpu = os.cpu_count() or 1
    busy = (after[0] - before[0]) / max(1, after[1] - before[1])  # of all cores
    mine = (usage.ru_utime + usage.ru_stime) / (wall * ncpu) if wall > 0 else 0
    return o, e, wall, round(min(1.0, max(0.0, busy - mine)), 2)


def info(model, *extra):
    out, _, _ = run([RUN, model, "-m", "info"] + [str(x) for x in extra])
    kv = dict(re.findall(r"^(\w+): (.*)$", out, re.M))
    return {k: (int(v) if re.fullmatch(r"-?\d+", v) else v) for k, v in kv.items()}


# ----------------------------------------------------------------------------
# 1. Perplexity against KV bytes per token

def valid_kv_heads(n_heads, n_kv):
    """As run.c: divisors of n_kv_heads, and multiples of it that divide n_heads."""
    return [k for k in range(1, n_heads + 1)
            if (n_kv % k == 0 if k <= n_kv else k % n_kv == 0 and n_heads % k == 0)]


def measure_ppl(args, tmp):
    """Every (model, K) run of ./run -m ppl, args.threads of them at a time
    with -T 1 each: perplexity does not depend on the thread count, and on a
    shared machine single-threaded runs never wait on each other's barriers."""
    corpus = os.path.join(args.shared, "corpora", "tinystories-valid.txt")
    jobs = []
    for name, model_file, tok_file in TINY:
        src, tok = (os.path.join(args.shared, "models", f) for f in (model_file, tok_file))
        for p in (src, tok, corpus):
            if not os.path.exists(p):
                fail(p + " is missing")
        model = os.path.join(tmp, name + ".bin")
        run([sys.executable, EXPORT, model, "--llama2c", src, "--tokenizer", tok])
        base = info(model)
        for K in sorted(valid_kv_heads(base["n_heads"], base["n_kv_heads"]), reverse=True):
            i = info(model, "--kv-heads", K)
            jobs.append(({"model": name, "n_heads": base["n_heads"], "n_kv_heads_file": base["n_kv_heads"],
                          "kv_heads": K, "n_layers": base["n_layers"], "head_dim": base["head_dim"],
                          "context": i["context"], "kv_bytes_per_token": i["kv_bytes_per_token"]},
                         [RUN, model, "-m", "ppl", "-f", corpus, "--kv-heads", str(K), "-T", "1"]))
    rows, running = [], []
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < max(1, args.threads):
            row, cmd = pending.pop(0)
            out = tempfile.TemporaryFile("w+")
            running.append((row, cmd, out, time.time(), spawn(cmd, stdout=out, stderr=subprocess.STDOUT)))
        pid, status, usage = os.wait4(-1, 0)
        for job in running:
            if job[4].pid == pid:
                break
        else:
            continue
        running.remove(job)
        row, cmd, out, t0, p = job
        p.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        CHILDREN.discard(p)
        out.seek(0)
        text = out.read()
        out.close()
        if p.returncode != 0:
            fail("%s failed (exit %d): %s" % (" ".join(cmd), p.returncode, text.strip()[-500:]))
        wall = time.time() - t0
        row.update({"tokens": int(re.search(r"^tokens: (\d+)", text, re.M).group(1)),
                    "perplexity": float(re.search(r"^perplexity: (\S+)", text, re.M).group(1)),
                    "seconds": round(wall, 1), "cpu_share": round((usage.ru_utime + usage.ru_stime) / wall, 2)})
        rows.append(row)
        log("%s --kv-heads %d: perplexity %.4f over %d tokens, %d KV bytes/token (%.0f s)"
            % (row["model"], row["kv_heads"], row["perplexity"], row["tokens"], row["kv_bytes_per_token"], wall))
    order = [id(j[0]) for j in jobs]
    rows.sort(key=lambda r: order.index(id(r)))
    divergence(args, tmp, rows, corpus)
    return rows


def logits_rows(tool, model, ids, K, tmp):
    """[[vocab floats] per position] from tests/logits (built by build_tools)."""
    out = os.path.join(tmp, "logits.f32")
    run([tool, model, out] + [str(i) for i in ids] + ["-K", str(K), "-T", "1", "-B", "32"])
    a = array.array("f")
    with open(out, "rb") as f:
        a.frombytes(f.read())
    if sys.byteorder != "little":
        a.byteswap()
    n = len(a) // len(ids)
    return [a[i * n:(i + 1) * n] for i in range(len(ids))]


def log_softmax(x):
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def divergence(args, tmp, rows, corpus):
    """How far each converted model's next-token distributions are from the
    file's own, on the first KL_TOKENS tokens of the corpus (in windows of the
    context, each after BOS): mean KL(original || converted) in nats per token,
    and how often the two agree on the most likely token. Unlike perplexity
    this does not need the text to be in the model's domain."""
    tool = build_tools(args)["logits"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        model = os.path.join(tmp, name + ".bin")
        tokens = [int(t) for t in run([RUN, model, "-m", "tokenize", "-f", corpus, "-T", "1"])[0].split()]
        bos, text = tokens[0], tokens[1:KL_TOKENS + 1]
        step = mine[0]["context"] - 1
        windows = [[bos] + text[i:i + step] for i in range(0, len(text), step)]
        K0 = mine[0]["n_kv_heads_file"]
        ref = [logits_rows(tool, model, ids, K0, tmp) for ids in windows]
        for r in mine:
            kl, agree, n = 0.0, 0, 0
            for w, ids in enumerate(windows):
                rows_k = ref[w] if r["kv_heads"] == K0 else logits_rows(tool, model, ids, r["kv_heads"], tmp)
                for p_row, q_row in zip(ref[w], rows_k):
                    lp, lq = log_softmax(p_row), log_softmax(q_row)
                    kl += sum(math.exp(x) * (x - y) for x, y in zip(lp, lq))
                    agree += max(range(len(lp)), key=lp.__getitem__) == max(range(len(lq)), key=lq.__getitem__)
                    n += 1
            r.update({"kl_tokens": n, "kl_nats": max(0.0, kl / n), "top1_agreement": agree / n})
            log("%s --kv-heads %d: KL(file || converted) %.4f nats/token, same top token %.1f %% (%d positions)"
                % (name, r["kv_heads"], r["kl_nats"], 100 * r["top1_agreement"], n))


# ----------------------------------------------------------------------------
# 2. Decode speed at depth

def ensure_model(args, dtype, kv):
    path = bench_ensure_model(args, dtype, kv)  # exported once into args.cache, as make bench does
    if not path:
        fail("cannot export the %s model with %d KV heads" % (dtype, kv))
    return path


TOOLS = {}


def build_tools(args):
    """bench/decode_at_depth.c and tests/logits.c, which #include run.c,
    built into the cache folder with the Makefile's flags (once per run)."""
    if not TOOLS:
        for name, src in (("decode_at_depth", os.path.join(ROOT, "bench", "decode_at_depth.c")),
                          ("logits", os.path.join(ROOT, "tests", "logits.c"))):
            exe = os.path.join(args.cache, name)
            run([os.environ.get("CC", "cc")] + CFLAGS + ["-DTESTING", "-I", ROOT, "-o", exe, src,
                                                         os.path.join(ROOT, "tokenizer.c"), "-lm", "-lpthread"])
            TOOLS[name] = exe
    return TOOLS


def measure_decode(args, tmp):
    """Per weight type, one harness process holding the three models, which
    measures them in turn (repeat, depth, model), a second or two each: load
    from other programs hits the three alike. Then the real ./run checks."""
    harness = build_tools(args)["decode_at_depth"]
    rows, checks, pages = [], [], {}
    models = {(dtype, kv): ensure_model(args, dtype, kv) for dtype in DTYPES for kv in KV_HEADS}
    infos = {key: info(path) for key, path in models.items()}
    prompts = Prompts(models[(DTYPES[0], 8)], os.path.join(args.shared, "corpora", "prose.txt"), tmp)
    for dtype in DTYPES:
        t0 = time.time()
        for kv in KV_HEADS:
            level_page_cache(models[(dtype, kv)])
        log("%s: page cache levelled (%.0f s); harness: %d repeats x %d depths x %d models, %d tokens each"
            % (dtype, time.time() - t0, args.repeats, len(DEPTHS), len(KV_HEADS), DECODE_TOKENS[dtype]))
        before = wait_idle(args.wait_idle) if args.wait_idle else machine_busy()
        cmd = [harness] + [models[(dtype, kv)] for kv in KV_HEADS] + [
            "-d", ",".join(map(str, DEPTHS)), "-n", str(DECODE_TOKENS[dtype]), "-r", str(args.repeats),
            "-T", str(args.threads)]
        out, _, wall, others = run_timed(cmd, args.threads)
        runs = {(kv, d): [] for kv in KV_HEADS for d in DEPTHS}
        for j, d, t in re.findall(r"^model (\d+) depth (\d+): \d+ tokens, (\S+) tok/s", out, re.M):
            runs[(KV_HEADS[int(j)], int(d))].append(float(t))
        for j, huge, total in re.findall(r"^model (\d+): .*, (-?\d+) of (\d+) MiB mapped in huge pages", out, re.M):
            pages[(dtype, KV_HEADS[int(j)])] = (int(huge), int(total))
        for kv in KV_HEADS:
            i = infos[(dtype, kv)]
            for d in DEPTHS:
                rows.append({"weights": dtype, "kv_heads": kv, "depth": d, "tokens": DECODE_TOKENS[dtype],
                             "weight_bytes": i["weight_bytes"], "kv_bytes_per_token": i["kv_bytes_per_token"],
                             "kv_read_bytes": d * i["kv_bytes_per_token"],
                             "tok_s": statistics.median(runs[(kv, d)]), "runs": runs[(kv, d)],
                             "others": others, "others_before": before,
                             "huge_mib": pages.get((dtype, kv), (None, None))[0],
                             "file_mib": pages.get((dtype, kv), (None, None))[1]})
            log("%s, %d KV heads: %s tok/s at depth %s (median of %d; %s of %s MiB in huge pages)"
                % (dtype, kv, " / ".join("%.2f" % statistics.median(runs[(kv, d)]) for d in DEPTHS),
                   " / ".join(map(str, DEPTHS)), args.repeats, *pages.get((dtype, kv), ("?", "?"))))
        log("%s: harness %.0f s; other programs kept %.2f of the cores busy meanwhile" % (dtype, wall, others))
        # the shortcut against real ./run runs: depth 1 for every q8_0 model and
        # the f32 one with 8 KV heads, depth 1024 for q8_0 with 32 KV heads
        for kv in KV_HEADS:
            for depth in (1, 1024):
                if (depth == 1 and dtype == "f32" and kv != 8) or \
                        (depth == 1024 and (args.quick or dtype != "q8_0" or kv != 32)):
                    continue
                prompt, n = prompts.make(depth)
                b = machine_busy(0.3)
                _, err, wall, others = run_timed([RUN, models[(dtype, kv)], "-f", prompt, "-n", str(n + RUN_TOKENS),
                                                  "-t", "0", "-T", str(args.threads),
                                                  "-c", str(max(4096, n + RUN_TOKENS))], args.threads)
                pre = re.search(r"^prefill: (\d+) tokens, (\S+) tok/s", err, re.M)
                dec = re.search(r"^decode: (\d+) tokens, (\S+) tok/s", err, re.M)
                harness_tps = statistics.median(runs[(kv, depth)])
                checks.append({"weights": dtype, "kv_heads": kv, "depth": int(pre.group(1)),
                               "prefill_tok_s": float(pre.group(2)), "decode_tokens": int(dec.group(1)),
                               "tok_s": float(dec.group(2)), "harness_tok_s": harness_tps,
                               "seconds": round(wall, 1), "others": others, "others_before": b})
                log("%s, %d KV heads: ./run at depth %d: decode %.2f tok/s (harness %.2f), prefill %.2f tok/s (%.0f s)"
                    % (dtype, kv, int(pre.group(1)), float(dec.group(2)), harness_tps, float(pre.group(2)), wall))
    return rows, checks


# ----------------------------------------------------------------------------
# Report: markdown

def config_name(K, n_heads):
    return "MHA" if K == n_heads else "MQA" if K == 1 else "GQA-%d" % K


def fmt_bytes(b):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return "%.2f %s" % (b / size, unit)
    return "%d B" % b


def markdown(data):
    L = ["# KV heads: quality and speed (generated by experiments/kv_heads.py)", "",
         "Command: `%s` — %s, git %s, %d threads, total run time %.0f s." % (
             data["command"], data["date"], data["git"], data["threads"], data["seconds"]), ""]
    if data.get("ppl"):
        L += ["## Perplexity vs KV-cache bytes per token", "",
              "`./run M -m ppl -f tinystories-valid.txt --kv-heads K -T 1` on the whole file (%d runs at a "
              "time; f32 cache: bytes/token = n_layers x 2 x K x head_dim x 4). K below the file's KV heads = "
              "mean-pooled heads, no uptraining; above = repeated heads." % data["threads"], "",
              "| model | query heads | KV heads K | config | conversion | KV bytes/token | KV cache at full context "
              "| tokens scored | perplexity | vs the file | KL(file ‖ K) nats/token | same top token |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["ppl"]:
            orig = next(x["perplexity"] for x in data["ppl"] if x["model"] == r["model"]
                        and x["kv_heads"] == x["n_kv_heads_file"])
            conv = ("the file" if r["kv_heads"] == r["n_kv_heads_file"] else
                    "repeat x%d" % (r["kv_heads"] // r["n_kv_heads_file"]) if r["kv_heads"] > r["n_kv_heads_file"]
                    else "mean-pool %d -> 1" % (r["n_kv_heads_file"] // r["kv_heads"]))
            L.append("| %s | %d | %d | %s | %s | %d | %s (%d positions) | %d | %.4f | %+.1f %% | %s | %s |" % (
                r["model"], r["n_heads"], r["kv_heads"], config_name(r["kv_heads"], r["n_heads"]), conv,
                r["kv_bytes_per_token"], fmt_bytes(r["kv_bytes_per_token"] * r["context"]), r["context"],
                r["tokens"], r["perplexity"], 100 * (r["perplexity"] / orig - 1),
                "%.4f" % r["kl_nats"] if "kl_nats" in r else "", "%.1f %%" % (100 * r["top1_agreement"])
                if "top1_agreement" in r else ""))
        L += ["", "KL and top token: the converted model's next-token distribution against the file's own at "
              "the first %d token positions of the same text (tests/logits, windows of the context). Perplexity "
              "needs in-domain text; the KL does not: aidreams260K was trained on AI-generated dreams, so on "
              "TinyStories its perplexity is near-random for every K (uniform over its 512 tokens = 512), "
              "while the KL shows how far pooling moved it." % KL_TOKENS, ""]
    if data.get("decode"):
        L += ["## Decode speed at depth (Llama-3.2-1B shape, random weights)", "",
              "Decode tok/s with `depth` tokens already in the cache: median of %d measurements of %s decoded "
              "tokens by bench/decode_at_depth.c (the engine's own forward(); see the cross-check below), "
              "which holds the three models of a weight type and measures them in turn, so load from other "
              "programs hits them alike. Every weight file is first dropped from the page cache and read back "
              "sequentially, so all are mapped with huge pages alike (column \"huge pages\"). "
              "Bytes read per token = weights + depth x KV bytes/token. \"vs depth 1\": tok/s at this depth / "
              "tok/s at depth 1 in the same measurement (seconds apart, so about the same load elsewhere; median "
              "over the measurements); \"if bandwidth-bound\": that ratio if a token cost only its bytes read, "
              "(weights + 1 x KV) / (weights + depth x KV)." % (
                  data["repeats"], " / ".join("%d (%s)" % (n, d) for d, n in DECODE_TOKENS.items())), "",
              "| weights | KV heads | config | weight bytes | KV bytes/token | depth | KV bytes read/token "
              "| KV share of bytes read | decode tok/s | ms/token | vs depth 1 | if bandwidth-bound | runs "
              "| huge pages |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["decode"]:
            d1 = next(x for x in data["decode"] if x["weights"] == r["weights"] and x["kv_heads"] == r["kv_heads"]
                      and x["depth"] == DEPTHS[0])
            total = r["weight_bytes"] + r["kv_read_bytes"]
            pred = (d1["weight_bytes"] + d1["kv_read_bytes"]) / total
            # the same measurement's depth-1 speed: both saw about the same load
            ratio = statistics.median(a / b for a, b in zip(r["runs"], d1["runs"]))
            L.append("| %s | %d | %s | %s | %d | %d | %s | %.1f %% | **%.2f** | %.0f | %.2f | %.2f | %s | %s |" % (
                r["weights"], r["kv_heads"], config_name(r["kv_heads"], 32), fmt_bytes(r["weight_bytes"]),
                r["kv_bytes_per_token"], r["depth"], fmt_bytes(r["kv_read_bytes"]), 100 * r["kv_read_bytes"] / total,
                r["tok_s"], 1000 / r["tok_s"], ratio, pred, " ".join("%.2f" % x for x in r["runs"]),
                "%d %%" % (100 * r["huge_mib"] / r["file_mib"]) if r.get("file_mib") else "?"))
        others = {r["weights"]: r.get("others") for r in data["decode"]}
        L += ["", "Other programs kept %s of the machine's cores busy during the measurements." % ", ".join(
            "%s (%s)" % (v, k) for k, v in others.items())]
        L.append("")
    if data.get("checks"):
        L += ["### Cross-check: real `./run` prefill + decode", "",
              "`./run M -f PROMPT -n depth+%d -t 0 -T %d -c 4096` with a prompt of `depth` tokens (BOS "
              "included) from prose.txt, one run each; decode tok/s from its stderr." % (RUN_TOKENS, data["threads"]),
              "", "| weights | KV heads | depth | ./run decode tok/s | harness tok/s | ./run prefill tok/s | wall s "
              "| others' CPU |", "|---|---|---|---|---|---|---|---|"]
        for c in data["checks"]:
            L.append("| %s | %d | %d | %.2f | %.2f | %.2f | %.0f | %.2f |" % (
                c["weights"], c["kv_heads"], c["depth"], c["tok_s"], c["harness_tok_s"], c["prefill_tok_s"],
                c["seconds"], c["others"]))
        L.append("")
    L += ["others' CPU = the fraction of the machine's cores that other programs kept busy during the "
          "measurement (/proc/stat minus our own CPU time; median over the harness runs): 0 = a quiet machine, "
          "0.5 = one of the 2 cores taken. Load average at the start: %s. %s" % (
              data.get("loadavg_start"), data.get("build", "")), ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------
# Report: the SVG (hand-written, no plotting library)

COLORS = {"stories260K": "#9467bd", "aidreams260K": "#ff7f0e", 32: "#d62728", 8: "#1f77b4", 1: "#2ca02c"}


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Panel:
    """A plot area at (x0, y0) of size (w, h) with linear or log axes."""

    def __init__(self, svg, x0, y0, w, h, xr, yr, xlog=False, ylog=False):
        self.svg, self.x0, self.y0, self.w, self.h = svg, x0, y0, w, h
        self.xr, self.yr, self.xlog, self.ylog = xr, yr, xlog, ylog

    def _t(self, v, r, log_):
        if log_:
            return (math.log(v) - math.log(r[0])) / (math.log(r[1]) - math.log(r[0]))
        return (v - r[0]) / (r[1] - r[0])

    def px(self, x):
        return self.x0 + self.w * self._t(x, self.xr, self.xlog)

    def py(self, y):
        return self.y0 + self.h * (1 - self._t(y, self.yr, self.ylog))

    def axes(self, xticks, yticks, xlabel, ylabel, title):
        s = self.svg
        s.append('<rect x="%g" y="%g" width="%g" height="%g" fill="none" stroke="#333"/>'
                 % (self.x0, self.y0, self.w, self.h))
        for v, label in xticks:
            x = self.px(v)
            s.append('<line x1="%.1f" y1="%g" x2="%.1f" y2="%g" stroke="#ddd"/>' % (x, self.y0, x, self.y0 + self.h))
            s.append('<text x="%.1f" y="%g" text-anchor="middle" class="tick">%s</text>'
                     % (x, self.y0 + self.h + 16, esc(label)))
        for v, label in yticks:
            y = self.py(v)
            s.append('<line x1="%g" y1="%.1f" x2="%g" y2="%.1f" stroke="#ddd"/>' % (self.x0, y, self.x0 + self.w, y))
            s.append('<text x="%g" y="%.1f" text-anchor="end" class="tick">%s</text>' % (self.x0 - 6, y + 4, esc(label)))
        s.append('<text x="%g" y="%g" text-anchor="middle" class="label">%s</text>'
                 % (self.x0 + self.w / 2, self.y0 + self.h + 38, esc(xlabel)))
        s.append('<text transform="translate(%g,%g) rotate(-90)" text-anchor="middle" class="label">%s</text>'
                 % (self.x0 - 48, self.y0 + self.h / 2, esc(ylabel)))
        s.append('<text x="%g" y="%g" class="title">%s</text>' % (self.x0, self.y0 - 12, esc(title)))

    def line(self, pts, color, dash=None, marker="circle", width=2):
        s = self.svg
        d = " ".join("%.1f,%.1f" % (self.px(x), self.py(y)) for x, y in pts)
        s.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="%g"%s/>'
                 % (d, color, width, ' stroke-dasharray="%s"' % dash if dash else ""))
        for x, y in pts:
            self.marker(self.px(x), self.py(y), color, marker)

    def marker(self, x, y, color, kind):
        if kind == "square":
            self.svg.append('<rect x="%.1f" y="%.1f" width="8" height="8" fill="%s"/>' % (x - 4, y - 4, color))
        else:
            self.svg.append('<circle cx="%.1f" cy="%.1f" r="4.5" fill="%s"/>' % (x, y, color))

    def text(self, x, y, s, color="#333", anchor="start", dx=0, dy=0, cls="small"):
        self.svg.append('<text x="%.1f" y="%.1f" fill="%s" text-anchor="%s" class="%s">%s</text>'
                        % (self.px(x) + dx, self.py(y) + dy, color, anchor, cls, esc(s)))


def svg(data):
    W, H = 1100, 505
    s = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
         'font-family="Helvetica, Arial, sans-serif">' % (W, H, W, H),
         '<style>.tick{font-size:11px;fill:#444}.label{font-size:13px;fill:#222}'
         '.title{font-size:15px;font-weight:bold;fill:#111}.small{font-size:11.5px;fill:#333}'
         '.note{font-size:11.5px;fill:#666}</style>',
         '<rect width="100%" height="100%" fill="white"/>']

    def legend_line(x, y, color, text, dash=None, marker=None):
        s.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>'
                 % (x, y - 4, x + 24, y - 4, color, ' stroke-dasharray="%s"' % dash if dash else ""))
        if marker == "circle":
            s.append('<circle cx="%d" cy="%d" r="4" fill="%s"/>' % (x + 12, y - 4, color))
        elif marker == "square":
            s.append('<rect x="%d" y="%d" width="8" height="8" fill="%s"/>' % (x + 8, y - 8, color))
        s.append('<text x="%d" y="%d" class="small">%s</text>' % (x + 30, y, esc(text)))

    # Panel 1: perplexity (log) vs KV bytes per token (log)
    ppl = data.get("ppl") or []
    if ppl:
        xs = [r["kv_bytes_per_token"] for r in ppl]
        ys = [r["perplexity"] for r in ppl]
        uniform = 512  # both tiny checkpoints have a 512-token vocabulary
        xr = (min(xs) / 1.5, max(xs) * 1.5)
        yr = (min(ys) / 1.5, max(max(ys), uniform) * 1.6)
        p = Panel(s, 75, 50, 400, 330, xr, yr, xlog=True, ylog=True)
        xt = [(2 ** k, "%d" % 2 ** k) for k in range(math.ceil(math.log2(xr[0])), math.floor(math.log2(xr[1])) + 1)]
        yt = [(v, "%g" % v) for v in (2, 5, 10, 20, 50, 100, 200, 500, 1000) if yr[0] <= v <= yr[1]]
        p.axes(xt, yt, "KV-cache bytes per token (f32 cache, log scale)", "perplexity (log scale)",
               "Quality vs KV-cache size: every --kv-heads K")
        y = p.py(uniform)
        s.append('<line x1="75" y1="%.1f" x2="475" y2="%.1f" stroke="#999" stroke-dasharray="3,3"/>' % (y, y))
        s.append('<text x="470" y="%.1f" text-anchor="end" class="note">uniform guess over 512 tokens</text>' % (y - 5))
        for k, (name, _, _) in enumerate(TINY):
            rows = sorted((r for r in ppl if r["model"] == name), key=lambda r: r["kv_bytes_per_token"])
            if not rows:
                continue
            color, marker = COLORS[name], ("circle", "square")[k]
            p.line([(r["kv_bytes_per_token"], r["perplexity"]) for r in rows], color, marker=marker)
            for r in rows:
                tag = "K=%d%s" % (r["kv_heads"], " (file)" if r["kv_heads"] == r["n_kv_heads_file"] else "")
                p.text(r["kv_bytes_per_token"], r["perplexity"], tag, color, "middle", 0, 18 if k == 0 else -10)
            legend_line(88, 310 + 18 * k, color, "%s (%d query heads, file has %d KV)"
                        % (name, rows[0]["n_heads"], rows[0]["n_kv_heads_file"]), marker=marker)
        s.append('<text x="75" y="445" class="note">tinystories-valid.txt, whole file. K below the file\'s KV '
                 'heads: mean-pooled,</text>')
        s.append('<text x="75" y="460" class="note">no uptraining; K above: heads repeated (same model, bigger '
                 'cache).</text>')
        s.append('<text x="75" y="475" class="note">aidreams260K is out of domain on TinyStories: see the KL in '
                 'kv_heads.md.</text>')
    # Panel 2: decode tok/s vs depth
    dec = data.get("decode") or []
    if dec:
        ymax = max(max(r.get("runs") or [r["tok_s"]]) for r in dec) * 1.08
        p = Panel(s, 600, 50, 330, 330, (0, 4200), (0, ymax))
        step = 1 if ymax <= 8 else 2 if ymax <= 16 else 5 if ymax <= 40 else 10
        p.axes([(d, str(d)) for d in (0, 1000, 2000, 3000, 4000)],
               [(v, str(v)) for v in range(0, int(ymax) + 1, step)],
               "depth: tokens already in the KV cache", "decode tokens / s",
               "Decode speed at depth (Llama-3.2-1B shape)")
        for kv in KV_HEADS:
            for dtype, dash, marker in (("q8_0", None, "circle"), ("f32", "6,4", "square")):
                rows = sorted((r for r in dec if r["kv_heads"] == kv and r["weights"] == dtype), key=lambda r: r["depth"])
                if rows:
                    for r in rows:  # whisker: slowest to fastest run
                        if len(r.get("runs", [])) > 1:
                            x = p.px(r["depth"]) + {32: -5, 8: 0, 1: 5}[kv]
                            s.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="1.2" '
                                     'opacity="0.7"/>' % (x, p.py(min(r["runs"])), x, p.py(max(r["runs"])), COLORS[kv]))
                    p.line([(r["depth"], r["tok_s"]) for r in rows], COLORS[kv], dash, marker)
        for k, kv in enumerate(KV_HEADS):
            legend_line(945, 70 + 18 * k, COLORS[kv], "%d KV heads (%s)" % (kv, config_name(kv, 32)))
        legend_line(945, 134, "#555", "q8_0 weights", marker="circle")
        legend_line(945, 152, "#555", "f32 weights", "6,4", marker="square")
        s.append('<text x="945" y="186" class="note">KV bytes per token</text>')
        s.append('<text x="945" y="201" class="note">(f32 cache, 16 layers):</text>')
        for k, kv in enumerate(KV_HEADS):
            s.append('<text x="945" y="%d" class="note">%d heads: %s</text>'
                     % (218 + 15 * k, kv, fmt_bytes(16 * 2 * kv * 64 * 4)))
        s.append('<text x="600" y="445" class="note">Each decoded token reads all weights + depth x KV bytes/token '
                 'of cache,</text>')
        s.append('<text x="600" y="460" class="note">and scores 32 query heads x depth positions, whatever the '
                 'KV heads.</text>')
        s.append('<text x="600" y="475" class="note">2 threads, shared 2-core machine: median of %d runs, '
                 'whiskers min..max.</text>' % data.get("repeats", 1))
    s.append('<text x="12" y="%d" class="note" font-size="10">experiments/kv_heads.py, %s, git %s</text>'
             % (H - 8, esc(data.get("date", "")), esc(data.get("git", ""))))
    s.append("</svg>")
    return "\n".join(s) + "\n"


# ----------------------------------------------------------------------------

def write_reports(data):
    with open(OUT_MD, "w", encoding="utf-8") as f:
        f.write(markdown(data))
    with open(OUT_SVG, "w", encoding="utf-8") as f:
        f.write(svg(data))
    log("wrote %s, %s" % (os.path.relpath(OUT_MD, ROOT), os.path.relpath(OUT_SVG, ROOT)))


def main():
    default_cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "l3bench")
    ap = argparse.ArgumentParser(description="Perplexity vs KV bytes/token, and decode speed at depth, "
                                             "for every KV-head configuration.")
    ap.add_argument("--quick", action="store_true", help="1 repeat instead of 5; no ./run check at depth 1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="decode measurements per point (default 5, --quick 1)")
    ap.add_argument("--shared", default=os.environ.get("SHARED", os.path.join(ROOT, "..", "shared")))
    ap.add_argument("--cache", default=default_cache, help="where the 1B models live (default %(default)s)")
    ap.add_argument("--only", choices=["ppl", "decode"], help="run one half (the JSON keeps the other)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before the decode runs of each weight type, wait up to S seconds for an idle machine")
    ap.add_argument("--replot", action="store_true", help="rewrite the .md and .svg from kv_heads.json")
    args = ap.parse_args()
    if args.replot:
        with open(OUT_JSON) as f:
            write_reports(json.load(f))
        return
    global RUN
    if not os.access(RUN, os.X_OK):
        fail("%s not found: run `make` first" % RUN)
    stale = os.path.getmtime(RUN) < max(os.path.getmtime(os.path.join(ROOT, f)) for f in ("run.c", "tokenizer.c"))
    if stale:
        log("warning: ./run is older than run.c or tokenizer.c (run `make`); the harness is built from the sources")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    os.makedirs(args.cache, exist_ok=True)
    data = {}
    if args.only and os.path.exists(OUT_JSON):
        with open(OUT_JSON) as f:
            data = json.load(f)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout.strip()
    data.update({"command": " ".join(["python3", "experiments/kv_heads.py"] + sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d %H:%M"), "git": git, "threads": args.threads,
                 "repeats": args.repeats, "loadavg_start": " ".join(open("/proc/loadavg").read().split()[:3])})
    tmp = tempfile.mkdtemp(prefix="kv_heads-")
    signal.signal(signal.SIGTERM, terminated)  # end the children, still clean up tmp
    # a snapshot: a colleague's `make` during the run must not swap the engine under us
    shutil.copy2(RUN, os.path.join(tmp, "run"))
    RUN = os.path.join(tmp, "run")
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "run.c", "tokenizer.c", "model.h"],
                           stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    data["build"] = "Engine: git %s%s%s." % (git, ", run.c/tokenizer.c modified in the working tree" if dirty else "",
                                             ", ./run older than its sources" if stale else "")
    try:
        if args.only != "decode":
            data["ppl"] = measure_ppl(args, tmp)
        if args.only != "ppl":
            data["decode"], data["checks"] = measure_decode(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data["seconds"] = round(time.time() - T0)
    with open(OUT_JSON, "w") as f:
        json.dump(data, f, indent=1)
    write_reports(data)
    log("done in %.0f s" % (time.time() - T0))


if __name__ == "__main__":
    main()
