#!/usr/bin/env python3
"""bench.py - how close ./run comes to this machine's limits.

On random-weight models of the Llama-3.2-1B shape (dim 2048, FFN 8192, 16
layers, 32 query heads, vocab 128256, tied embeddings), with N threads:

  decode tok/s    Each decoded token reads every weight once, so the memory
                  roofline is  bandwidth / weight_bytes.
                  % roofline = tok/s x weight_bytes / bandwidth.
                  (weight_bytes from `-m info` counts the tied embedding once:
                  the lookup reads one row, the classifier the whole matrix.)
                  On a VM the bandwidth on offer moves by up to 2x within
                  minutes (neighbours share the memory bus), so decode is also
                  timed by bench/decode_at_depth, which measures the bandwidth
                  in the same process milliseconds before and after each
                  measurement: "% of bw then" = tok/s x bytes / that bandwidth.
  prefill tok/s   A prompt token costs 2 flops per matmul parameter (the
                  classifier included, the norm vectors not), so the compute
                  roofline is  FMA peak / (2 x matmul params).
                  % FMA peak = tok/s x 2 x matmul params / FMA peak.
  decode at depth After a prompt of D tokens every new token also reads the KV
                  cache up to its position:
                  predicted tok/s = bandwidth then / (weight_bytes + D' x kv_bytes_per_token),
                  for each KV cache element type (--kv-types, default f32,f16,q8_0: the
                  bytes per token of each),
                  D' = the mean number of positions attended to, for MHA (32 KV
                  heads), GQA (8), MQA (1) and MLA (a latent of 512 and a RoPE
                  key of 64 per token and layer, DeepSeek-V2's 576) models;
                  bench/decode_at_depth fills the cache instead of prefilling D
                  tokens, and one real ./run at depth 2000 per model (but MLA)
                  checks it. Next to it the compute-aware model:
                  time = weight_bytes / bw + max(D' x kv_bytes_per_token / bw,
                  attention flops / FMA peak), for MLA's attention is bound by
                  its multiply-adds, not its bytes (1088 per position and
                  query head, all heads reading the one latent row).
                  --mla-depth (make bench-mla): this table alone, MLA 512 + 64
                  against GQA-8, q8_0 weights, KV types f32 and q8_0.
  peak RSS        of each run (os.wait4 on the child), next to a budget of
                  file size + KV cache + 100 MiB.
  tokenizer MB/s  from bench/bench_tokenizer, if there is one.

Bandwidth (bench/bandwidth.c) and FMA peak (bench/fma_peak.c) are measured in
the same run, the best of 3 (ceilings: disturbances only lower them). Engine
figures are medians of 3 runs. The machine may be shared: for every run we note
how much of all cores other programs used meanwhile ("others"); runs above
--max-others are retried (--retries) and left out of the medians while quiet
runs exist. Models are exported once into ${XDG_CACHE_HOME:-~/.cache}/l3bench/
and reused (a cached file of another format version than model.h's, or an
incomplete one, is exported again); results go there as JSON. ./run is copied
before use, since others may rebuild it meanwhile. Python 3 standard library
only; export/export.py runs under the first python3 that can import numpy.

usage: python3 bench/bench.py [--quick] [--threads N] [--skip-depth | --mla-depth] [--only f32|q8_0|q4_0|q4_0-e4]
                              [--kv-types f32,f16,q8_0]
                              [--wait-idle SECONDS] [--report RESULTS.json]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RUN = os.path.join(ROOT, "run")
MIB = 1 << 20
SHORT_PROMPT = "The quick brown fox jumps over the lazy dog, and then"
PREFILL_TOKENS = 128  # prompt length for the prefill test, BOS included (as in PEERS.md)
DECODE_POSITIONS = 64  # -n for the decode test
DEPTH_TOKENS = 16      # tokens decoded per depth measurement
CHECK_DEPTH = 2000     # depth of the real ./run check of the depth test
VERBOSE = sys.stderr.isatty()


def log(msg):
    if VERBOSE:
        print(msg, file=sys.stderr, flush=True)


def warn(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------
# Building


def build(cc):
    """./run through the Makefile (its flags), the microbenchmarks with cc -O3 -march=native."""
    log("building ./run and the microbenchmarks")
    if subprocess.run(["make", "-C", ROOT, "run", "bench/decode_at_depth"], stdout=sys.stderr).returncode != 0:
        sys.exit("bench: `make run bench/decode_at_depth` failed")
    for name in ("bandwidth", "fma_peak"):
        src, exe = os.path.join(BENCH, name + ".c"), os.path.join(BENCH, name)
        if os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(src):
            continue
        cmd = [cc, "-O3", "-march=native", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra",
               "-o", exe, src, "-lpthread", "-lm"]
        if subprocess.run(cmd).returncode != 0:
            sys.exit("bench: building %s failed: %s" % (name, " ".join(cmd)))


def key_values(text):
    """`key: value` lines -> dict of strings."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def run_tool(cmd):
    """A microbenchmark's `key: value` output, plus the others' share of the machine while it ran."""
    r = run_child(cmd, stdout=True)
    if r["rc"] != 0:
        sys.exit("bench: %s failed (exit %d)" % (" ".join(cmd), r["rc"]))
    return dict(key_values(r["stdout"]), others=r["others"])


def measure_machine(threads, runs):
    """Read bandwidth (GB/s) and FMA peak (GFLOP/s), the best of `runs` runs (each the best of its
    passes): these are ceilings, and on a shared machine every disturbance only lowers them, so
    the best run is the closest to the hardware (the medians are kept in the results too)."""
    bw, fma, unit, others = [], [], None, []
    for i in range(runs):
        log("machine: bandwidth run %d/%d" % (i + 1, runs))
        quiet_machine()
        kv = run_tool([os.path.join(BENCH, "bandwidth"), "-t", str(threads)])
        bw.append(float(kv["bandwidth_gbs"]))
        others.append(kv["others"])
        log("machine: FMA peak run %d/%d" % (i + 1, runs))
        quiet_machine()
        kv = run_tool([os.path.join(BENCH, "fma_peak"), "-t", str(threads)])
        fma.append(float(kv["fma_peak_gflops"]))
        others.append(kv["others"])
        unit = kv["vector_unit"]
    return {"threads": threads, "bandwidth_gbs": max(bw), "bandwidth_gbs_median": median(bw),
            "bandwidth_gbs_samples": bw, "fma_peak_gflops": max(fma), "fma_peak_gflops_median": median(fma),
            "fma_peak_gflops_samples": fma, "vector_unit": unit,
            "others": others}


# ----------------------------------------------------------------------------
# Running a child: its own peak RSS and CPU time from wait4, and how much of
# the machine other programs used meanwhile (the machine is shared: a run that
# lost its cores to someone else's tests measures them, not the engine).


def cpu_times():
    """(busy, total) seconds of all CPUs together from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v) - idle) / hz, sum(v) / hz


def machine_busy(seconds=0.3):
    """Fraction of all cores busy, sampled while we sleep."""
    a = cpu_times()
    time.sleep(seconds)
    b = cpu_times()
    if not a or not b or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


WAIT_IDLE = 0  # --wait-idle: seconds to wait for other programs to quiet down before each run


def quiet_machine():
    """Waits up to WAIT_IDLE s for the machine to be less than 25 % busy."""
    deadline = time.time() + WAIT_IDLE
    while time.time() < deadline:
        busy = machine_busy()
        if busy is None or busy < 0.25:
            return
        time.sleep(2)


def run_child(cmd, stdout=False, **popen_args):
    """Runs cmd -> dict: rc, stderr (text), stdout (if asked), rss_bytes (its peak RSS), wall_s,
    cpu_s (its user + system time), others (fraction of all cores other programs used meanwhile)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        c0, t0 = cpu_times(), time.time()
        p = subprocess.Popen(cmd, stdout=out if stdout else subprocess.DEVNULL, stderr=err, **popen_args)
        _, status, usage = os.wait4(p.pid, 0)
        wall, c1 = time.time() - t0, cpu_times()
        p.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.seek(0)
        err.seek(0)
        r = {"rc": p.returncode, "stdout": out.read().decode("utf-8", "replace"),
             "stderr": err.read().decode("utf-8", "replace")}
    r["wall_s"] = wall
    r["cpu_s"] = usage.ru_utime + usage.ru_stime
    r["rss_bytes"] = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    r["others"] = None
    if c0 and c1 and c1[1] > c0[1]:
        r["others"] = max(0.0, (c1[0] - c0[0] - r["cpu_s"]) / (c1[1] - c0[1]))
    return r


PREFILL_RE = re.compile(r"^prefill: (\d+) tokens, ([0-9.]+) tok/s$", re.M)
DECODE_RE = re.compile(r"^decode: (\d+) tokens, ([0-9.]+) tok/s$", re.M)


def generate(model, threads, n, prompt=None, prompt_file=None, context=None, extra=()):
    """One `./run MODEL -i/-f PROMPT -n N -t 0 -T threads [extra]` run -> dict, or None on failure."""
    cmd = [RUN, model] + (["-f", prompt_file] if prompt_file else ["-i", prompt])
    cmd += ["-n", str(n), "-t", "0", "-T", str(threads)] + (["-c", str(context)] if context else []) + list(extra)
    quiet_machine()
    r = run_child(cmd)
    pre, dec = PREFILL_RE.search(r["stderr"]), DECODE_RE.search(r["stderr"])
    if r["rc"] != 0 or not pre or not dec:
        warn("%s failed (exit %d):\n%s" % (" ".join(cmd), r["rc"], r["stderr"].strip()[-1000:]))
        return None
    del r["stdout"], r["stderr"], r["rc"]
    r.update(cmd=" ".join(cmd), prefill_tokens=int(pre.group(1)), prefill_tps=float(pre.group(2)),
             decode_tokens=int(dec.group(1)), decode_tps=float(dec.group(2)))
    return r


HARNESS = os.path.join(BENCH, "decode_at_depth")
HARNESS_RE = re.compile(r"^model (\d+) depth (\d+): (\d+) tokens, ([0-9.]+) tok/s, cpu share ([0-9.]+), "
                        r"bandwidth ([0-9.]+) GB/s$", re.M)
HUGE_RE = re.compile(r"^model (\d+): (.*), (\d+) of (\d+) MiB mapped in huge pages(?:, kv type (\w+), "
                     r"kv_bytes_per_token (\d+))?$", re.M)


def harness(models, depths, tokens, repeats, threads, kv_types=None):
    """bench/decode_at_depth on these models (loaded together, measured in turn; with kv_types,
    each model once per KV cache type) -> (list of {model, depth, tokens, tps, cpu_share,
    bw_gbs}, the run's dict), or None on failure. The run's "kv" maps each model index of the
    samples to its (kv type, kv_bytes_per_token)."""
    cmd = [HARNESS] + models + ["-d", ",".join(map(str, depths)), "-n", str(tokens), "-r", str(repeats),
                                "-T", str(threads), "-b", "1"] + (["-k", ",".join(kv_types)] if kv_types else [])
    quiet_machine()
    r = run_child(cmd, stdout=True)
    if r["rc"] != 0:
        warn("%s failed (exit %d):\n%s" % (" ".join(cmd), r["rc"], r["stderr"].strip()[-1000:]))
        return None
    rows = [{"model": int(j), "depth": int(d), "tokens": int(n), "tps": float(t), "cpu_share": float(c),
             "bw_gbs": float(b)} for j, d, n, t, c, b in HARNESS_RE.findall(r["stdout"])]
    run = {k: r[k] for k in ("wall_s", "cpu_s", "rss_bytes", "others")}
    run["cmd"] = " ".join(cmd)
    # A model in 4 KiB pages decodes up to 2x slower (TLB misses): say so next to its figures.
    run["huge_page_fraction"], run["kv"] = {}, {}
    for j, path, huge, total, kv_type, kv_bytes in HUGE_RE.findall(r["stdout"]):
        if kv_type:
            run["kv"][int(j)] = (kv_type, int(kv_bytes))
        run["huge_page_fraction"][path] = int(huge) / max(int(total), 1)
        if int(huge) < 0.9 * int(total):
            warn("%s: only %s of %s MiB mapped in 2 MiB pages during the harness run: its decode figures "
                 "are likely low (README: Memory)" % (path, huge, total))
    return rows, run


MAX_OTHERS = 0.25  # --max-others: a run during which other programs used more of the machine is "noisy"
RETRIES = None     # --retries: extra runs allowed to replace noisy ones


def is_quiet(r):
    return r.get("others") is None or r["others"] <= MAX_OTHERS


def quiet(runs):
    """The runs other programs did not disturb, or all of them if there are none."""
    return [r for r in runs if is_quiet(r)] or runs


def repeat(runs, fn, what):
    """Up to `runs` quiet runs of fn, with up to RETRIES (default: runs) extra tries for noisy ones."""
    out, tries = [], runs + (runs if RETRIES is None else RETRIES)
    while len(out) < tries and sum(map(is_quiet, out)) < runs:
        log("%s: run %d (%d quiet of %d wanted)" % (what, len(out) + 1, sum(map(is_quiet, out)), runs))
        r = fn()
        if r is None:
            break
        out.append(r)
    return out


# ----------------------------------------------------------------------------
# Models: <cache>/llama1b-{dtype}.bin (8 KV heads, the preset) and
# <cache>/llama1b-kv{K}-{dtype}.bin for other KV head counts. A weights name
# is an export.py --dtype, or one of WEIGHTS_FLAGS: another choice of flags.
WEIGHTS_FLAGS = {"q4_0-e4": ["--dtype", "q4_0", "--embedding-dtype", "q4_0"]}  # q4_0 embedding/classifier too
WEIGHTS = ("f32", "q8_0", "q4_0", "q4_0-e4")


def numpy_python():
    for p in ("python3", "/usr/bin/python3", "python"):
        exe = shutil.which(p)
        if exe and subprocess.run([exe, "-c", "import numpy"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0:
            return exe
    return None


# The MLA model of the depth test: the 1B shape with one latent of 512 numbers and a
# RoPE key of 64 per token and layer (DeepSeek-V2's 576), random MLA weights
# (export.py --kv-latent-dim 512 --kv-rope-dim 64; decode speed does not depend on the values).
MLA = "mla576"


def kv_label(kv):
    return "MLA 512 + 64" if kv == MLA else str(kv)


def model_path(cache, dtype, kv=8):
    name = ("llama1b-%s.bin" % dtype if kv == 8 else "llama1b-%s-%s.bin" % (MLA, dtype) if kv == MLA
            else "llama1b-kv%d-%s.bin" % (kv, dtype))
    return os.path.join(cache, name)


def format_version():
    """MODEL_VERSION of model.h: the only checkpoint version ./run reads."""
    with open(os.path.join(ROOT, "model.h")) as f:
        m = re.search(r"^#define MODEL_VERSION (\d+)", f.read(), re.M)
    if not m:
        sys.exit("bench: no #define MODEL_VERSION in model.h")
    return int(m.group(1))


def model_problem(path):
    """Why the cached model at path cannot be used (missing, written in another
    format version than model.h's, or incomplete), or None if it can: its
    model.h header's magic and version are right and its file_bytes is the file's size."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
        magic, version = struct.unpack_from("<II", head, 0)
        file_bytes, = struct.unpack_from("<Q", head, 152)
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, struct.error) as e:
        return "unreadable (%s)" % e
    if magic != 0x4B43334C:
        return "not a model.h file (bad magic)"
    if version != format_version():
        return "format version %d, model.h's is %d" % (version, format_version())
    if file_bytes != size:
        return "incomplete (%d bytes, the header says %d)" % (size, file_bytes)
    return None


def ensure_model(args, dtype, kv=8):
    """The model's path, exporting it first if it is missing, incomplete or
    of an older format version (re-exported, never used); None if that fails."""
    path = model_path(args.cache, dtype, kv)
    problem = model_problem(path)
    if problem is None:
        return path
    python = numpy_python()
    if not python:
        warn("no python3 with numpy to run export/export.py (apt-get install python3-numpy)")
        return None
    tokenizer = os.path.join(args.shared, "models", "llama3-tokenizer.json")
    cmd = [python, os.path.join(ROOT, "export", "export.py"), path, "--random", "--preset", "llama3.2-1b",
           "--tokenizer", tokenizer] + WEIGHTS_FLAGS.get(dtype, ["--dtype", dtype])
    if kv == MLA:
        cmd += ["--kv-latent-dim", "512", "--kv-rope-dim", "64"]
    elif kv != 8:
        cmd += ["--n-kv-heads", str(kv)]
    if problem != "missing":
        warn("%s: %s; exporting it again" % (path, problem))
    log("exporting %s (a minute or more)" % path)
    t0 = time.time()
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, universal_newlines=True)
    problem = model_problem(path)
    if r.returncode != 0 or problem:
        warn("export failed: %s\n%s%s" % (" ".join(cmd), r.stderr.strip()[-2000:],
                                          "\nthe file written: %s" % problem if r.returncode == 0 else ""))
        return None
    log("exported in %.0f s" % (time.time() - t0))
    return path


def level_page_cache(path):
    """Drops the file from the page cache and reads it back sequentially, so that
    every model sits in the cache the same way before it is timed: read like
    this, the kernel keeps it in large folios that ./run's map gets as 2 MiB
    pages, while a file just written by the exporter (or partly evicted)
    sits in 4 KiB pages, and decoding it is up to 2x slower from TLB misses
    alone. Pages another program has mapped stay where they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 16 * MIB):
            pass
    finally:
        os.close(fd)


def model_info(path, context=None):
    cmd = [RUN, path, "-m", "info"] + (["-c", str(context)] if context else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        return None
    kv = key_values(r.stdout)
    info = {k: int(kv[k]) for k in ("params", "weight_bytes", "kv_bytes_per_token", "dim", "n_layers", "n_heads",
                                    "n_kv_heads", "head_dim", "kv_latent_dim", "kv_rope_dim", "context") if k in kv}
    info["dtype"] = kv.get("dtype")
    info["file_bytes"] = os.path.getsize(path)
    # Matmul parameters: all but the 2 norm vectors per layer and the final norm.
    info["matmul_params"] = info["params"] - (2 * info["n_layers"] + 1) * info["dim"]
    return info


# ----------------------------------------------------------------------------
# Prompts of an exact token count (BOS included), cut from the prose corpus at
# a word boundary: the longest prefix that tokenizes to at most n tokens.


class Prompts:
    def __init__(self, model, prose_path, cache):
        with open(prose_path, encoding="utf-8") as f:
            text = f.read()
        start = text.find("Call me Ishmael")  # skip the Project Gutenberg front matter
        self.text = text[max(start, 0):]
        self.ends = [m.end() for m in re.finditer(r"\S+", self.text)]
        self.model, self.cache = model, cache

    def count(self, path):
        r = subprocess.run([RUN, self.model, "-m", "tokenize", "-f", path], stdout=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            sys.exit("bench: ./run -m tokenize failed")
        return len(r.stdout.split())

    def write(self, words, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.text[:self.ends[words - 1]] if words else "")
        return self.count(path)

    def make(self, n):
        """(path, token count) of a prompt of about n tokens, BOS included."""
        path = os.path.join(self.cache, "prompt-%d.txt" % n)
        # Every word is at least one token, so at most n words fit; invariant: lo words fit.
        lo, hi = 0, min(n, len(self.ends))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.write(mid, path) <= n:
                lo = mid
            else:
                hi = mid - 1
        return path, self.write(lo, path)


# ----------------------------------------------------------------------------
# The benchmarks


def rss_budget(info, context):
    """File size + the whole KV cache + 100 MiB for activations, logits and code."""
    return info["file_bytes"] + info["kv_bytes_per_token"] * context + 100 * MIB


def bench_weights(args, machine, prompts, dtype):
    row = {"weights": dtype}
    model = ensure_model(args, dtype)
    info = model and model_info(model)
    if not info:
        row["error"] = "no model (export or -m info failed)"
        return row
    row["model"], row["info"] = model, info
    log("%s: levelling the page cache" % dtype)
    level_page_cache(model)

    dec = repeat(args.runs, lambda: generate(model, args.threads, DECODE_POSITIONS, prompt=SHORT_PROMPT),
                 "%s decode" % dtype)
    if not dec:
        row["error"] = "./run failed"
        return row
    prompt_file, n = prompts.make(PREFILL_TOKENS)
    pre = repeat(args.runs, lambda: generate(model, args.threads, n, prompt_file=prompt_file),
                 "%s prefill (%d tokens)" % (dtype, n))
    log("%s: decode with the bandwidth measured around it (bench/decode_at_depth)" % dtype)
    h = harness([model], [1], 32, 2 * args.runs - 1, args.threads)
    row["decode_runs"], row["prefill_runs"] = dec, pre
    row["decode_tps"] = median([r["decode_tps"] for r in quiet(dec)])
    # Memory roofline: every weight byte is read once per decoded token.
    row["roofline_pct"] = 100 * row["decode_tps"] * info["weight_bytes"] / (machine["bandwidth_gbs"] * 1e9)
    if h and h[0]:
        samples, hrun = h
        row["harness_run"], row["harness_samples"] = hrun, samples
        row["harness_tps"] = median([x["tps"] for x in samples])
        row["bw_then_gbs"] = median([x["bw_gbs"] for x in samples])
        row["bw_then_pct"] = median([100 * x["tps"] * info["weight_bytes"] / (x["bw_gbs"] * 1e9) for x in samples])
    if pre:
        row["prefill_prompt_tokens"] = pre[0]["prefill_tokens"]
        row["prefill_tps"] = median([r["prefill_tps"] for r in quiet(pre)])
        # Compute roofline: 2 flops (one FMA) per matmul parameter per token.
        row["fma_pct"] = 100 * row["prefill_tps"] * 2 * info["matmul_params"] / (machine["fma_peak_gflops"] * 1e9)
    row["peak_rss_bytes"] = max(r["rss_bytes"] for r in dec + pre)
    row["rss_budget_bytes"] = rss_budget(info, info["context"])
    return row


def attention_flops(info, positions):
    """Flops of one decoded token's attention over `positions` cached positions: 2 per
    multiply-add; every query head scores every position (GQA: head_dim; MLA: the RoPE key
    and the latent, kv_rope_dim + kv_latent_dim) and adds its value (head_dim; MLA: the
    latent). MLA's 32 heads all read the same latent row: its attention does 1088
    multiply-adds per position and head for 2304 bytes (f32) per position and layer, so on
    a machine with ~8 flops per byte of bandwidth it is bound by the FMAs, not the cache."""
    if info.get("kv_latent_dim"):
        width = info["kv_rope_dim"] + 2 * info["kv_latent_dim"]
    else:
        width = 2 * info["head_dim"]
    return 2.0 * info["n_layers"] * info["n_heads"] * positions * width


def bench_depth(args, machine, prompts, dtype, kvs=(32, 8, 1, MLA)):
    """Decode at each depth on the MHA, GQA, MQA and MLA models with these weights, from
    bench/decode_at_depth (the bandwidth measured around each measurement), and one real
    ./run per model at CHECK_DEPTH (its own prefill, then decode) as a check (not for MLA:
    its prefill runs attention in the absorbed form too, 576 + 512 numbers per head and
    position, minutes for 2000 tokens on 2 cores; none without prompts).
    Two models of a token's time: the bytes model, time = (weight_bytes + KV bytes read) /
    bandwidth then, and the compute-aware one, time = weight_bytes / bandwidth then +
    max(KV bytes read / bandwidth then, attention flops / FMA peak): attention either
    streams the cache or is bound by its multiply-adds (MLA at depth)."""
    models = [ensure_model(args, dtype, kv) for kv in kvs]
    if None in models:
        return {"weights": dtype, "error": "export failed"}
    gen = DEPTH_TOKENS
    infos = [model_info(model, max(args.depths) + gen) for model in models]
    samples, hruns = [], []
    for j, (kv, model) in enumerate(zip(kvs, models)):
        # one model per process (three f32 models would not fit in memory together),
        # loaded once per KV cache type, the types measured in turn
        log("%s kv %s: levelling the page cache; bench/decode_at_depth, %d repeats x %d depths x KV types %s"
            % (dtype, kv_label(kv), args.depth_runs, len(args.depths), ",".join(args.kv_types)))
        level_page_cache(model)
        h = harness([model], args.depths, gen, args.depth_runs, args.threads, args.kv_types)
        if h:
            samples += [dict(x, kv_heads_model=j, kv_type=h[1]["kv"][x["model"]][0],
                             kv_bytes_per_token=h[1]["kv"][x["model"]][1]) for x in h[0]]
            hruns.append(h[1])
    rows = []
    for j, (kv, info) in enumerate(zip(kvs, infos)):
        for kv_type in args.kv_types:
            for depth in args.depths:
                xs = [x for x in samples if x["kv_heads_model"] == j and x["kv_type"] == kv_type and x["depth"] == depth]
                row = {"n_kv_heads": kv, "weights": dtype, "kv_type": kv_type, "depth": depth, "generated": gen,
                       "samples": xs}
                if not xs:
                    row["error"] = "bench/decode_at_depth failed"
                    rows.append(row)
                    continue
                # Bytes read per decoded token: all weights, plus the KV cache up to the
                # token's position (positions depth .. depth+gen-1 attend to depth+1 .. depth+gen).
                positions = depth + (gen + 1) / 2
                kv_read = positions * xs[0]["kv_bytes_per_token"]
                flops, fma = attention_flops(info, positions), machine["fma_peak_gflops"] * 1e9
                row["kv_read_bytes"] = kv_read
                row["attention_gflop"] = flops / 1e9
                row["decode_tps"] = median([x["tps"] for x in xs])
                row["bw_then_gbs"] = median([x["bw_gbs"] for x in xs])
                row["predicted_tps"] = median([x["bw_gbs"] * 1e9 / (info["weight_bytes"] + kv_read) for x in xs])
                row["ratio"] = median([x["tps"] * (info["weight_bytes"] + kv_read) / (x["bw_gbs"] * 1e9) for x in xs])
                def compute_time(x):  # seconds per token, the compute-aware model
                    bw = x["bw_gbs"] * 1e9
                    return info["weight_bytes"] / bw + max(kv_read / bw, flops / fma)
                row["compute_tps"] = median([1 / compute_time(x) for x in xs])
                row["compute_ratio"] = median([x["tps"] * compute_time(x) for x in xs])
                bw = row["bw_then_gbs"] * 1e9  # what bounds the attention, if it is 2 % of the token or more
                cache_s, fma_s = kv_read / bw, flops / fma
                row["limit"] = ("weights" if max(cache_s, fma_s) < 0.02 * (info["weight_bytes"] / bw)
                                else "FMAs" if fma_s > cache_s else "cache bytes")
                rows.append(row)
    checks = []
    prompt_file, n = prompts.make(CHECK_DEPTH) if prompts else (None, 0)
    for kv, model in zip(kvs, models):
        if kv == MLA or not prompts:
            continue
        context = max(4096, n + gen)
        info = model_info(model, context)
        log("%s kv%d: ./run at depth %d" % (dtype, kv, n))
        level_page_cache(model)
        r = generate(model, args.threads, n + gen, prompt_file=prompt_file, context=context)
        check = {"n_kv_heads": kv, "depth": n, "generated": gen, "context": context, "run": r,
                 "rss_budget_bytes": rss_budget(info, context)}
        checks.append(check)
    return {"weights": dtype, "rows": rows, "harness_runs": hruns, "checks": checks}


def bench_tokenizer(args):
    """bench/bench_tokenizer (single-threaded encode of prose.txt), built by the Makefile's rule
    for it or else as the `Build:` line of its header comment says; None if there is none."""
    src, exe = os.path.join(BENCH, "bench_tokenizer.c"), os.path.join(BENCH, "bench_tokenizer")
    if os.path.exists(src):
        with open(os.path.join(ROOT, "Makefile")) as f:
            has_rule = "bench/bench_tokenizer:" in f.read()
        with open(src, encoding="utf-8", errors="replace") as f:
            m = re.search(r"^\W*Build:\s*(.+?)\s*$", f.read(4000), re.M)
        cmd = "make -C %s bench/bench_tokenizer" % ROOT if has_rule else m and m.group(1)
        if cmd:
            log("building bench_tokenizer: " + cmd)
            if subprocess.run(cmd, shell=True, cwd=ROOT, stdout=sys.stderr).returncode != 0:
                warn("building bench/bench_tokenizer failed")
                return None
    if not os.access(exe, os.X_OK):
        return None
    log("tokenizer benchmark")
    quiet_machine()
    r = run_child([exe], stdout=True, cwd=ROOT, env=dict(os.environ, SHARED=args.shared))
    if r["rc"] != 0:
        warn("bench/bench_tokenizer failed (exit %d):\n%s" % (r["rc"], r["stderr"][-1000:]))
        return None
    wall = re.search(r"([0-9.]+)\s*MB/s", r["stdout"])  # the first figure: wall clock
    cpu = re.search(r"([0-9.]+)\s*MB/s CPU time", r["stdout"])
    return {"output": r["stdout"][-2000:], "mb_per_s": float(wall.group(1)) if wall else None,
            "mb_per_s_cpu": float(cpu.group(1)) if cpu else None, "others": r["others"]}


# ----------------------------------------------------------------------------
# Report


def fmt(x, spec="%.1f", missing="n/a"):
    return spec % x if x is not None else missing


def spread(runs, key):
    """median (min-max) of a key over the quiet runs, or the single value."""
    xs = [r[key] for r in quiet(runs)]
    if len(xs) < 2:
        return fmt(median(xs), "%.2f")
    return "%.2f (%.2f-%.2f)" % (median(xs), min(xs), max(xs))


def busy(runs):
    """The most of the machine other programs used during the runs a figure comes from, and
    how many runs those are of all that were made."""
    used = quiet(runs)
    xs = [r["others"] for r in used if r.get("others") is not None]
    return ("%.0f %%" % (100 * max(xs)) if xs else "?") + " (%d/%d)" % (len(used), len(runs))


def report(res):
    global MAX_OTHERS
    MAX_OTHERS = res["args"].get("max_others", MAX_OTHERS)
    m = res["machine"]
    lines = ["## run.c on this machine (%d threads)" % m["threads"], "",
             "read bandwidth %.1f GB/s, f32 FMA peak %.0f GFLOP/s (%s): the best of %d runs (%s GB/s; %s GFLOP/s); "
             "others %s; load average at start %s" % (
                 m["bandwidth_gbs"], m["fma_peak_gflops"], m["vector_unit"], len(m["bandwidth_gbs_samples"]),
                 " ".join("%.1f" % x for x in m["bandwidth_gbs_samples"]),
                 " ".join("%.0f" % x for x in m["fma_peak_gflops_samples"]),
                 fmt(max([100 * b for b in m.get("others", []) if b is not None] or [None]), "up to %.0f %%"),
                 " ".join("%.2f" % x for x in res["loadavg"])), "",
             "| weights | decode tok/s | %% roofline | decode tok/s, harness | bw then GB/s | %% of bw then "
             "| prefill tok/s (%d-token prompt) | %% FMA peak | peak RSS MiB | RSS budget MiB | others |" % PREFILL_TOKENS,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if not res["weights"]:  # --mla-depth: the depth table alone
        lines = lines[:3]
    for r in res["weights"]:
        if "decode_tps" not in r:
            lines.append("| %s | n/a | | | | | | | | | %s |" % (r["weights"], r.get("error", "")))
            continue
        hs = r.get("harness_samples") or []
        lines.append("| %s | %s | %.0f %% | %s | %s | %s | %s | %s | %.0f | %.0f | %s |" % (
            r["weights"], spread(r["decode_runs"], "decode_tps"), r["roofline_pct"],
            spread(hs, "tps") if hs else "n/a", fmt(r.get("bw_then_gbs")), fmt(r.get("bw_then_pct"), "**%.0f %%**"),
            spread(r["prefill_runs"], "prefill_tps") if r["prefill_runs"] else "n/a",
            fmt(r.get("fma_pct"), "**%.0f %%**"), r["peak_rss_bytes"] / MIB, r["rss_budget_bytes"] / MIB,
            busy(r["decode_runs"] + r["prefill_runs"] + ([r["harness_run"]] if r.get("harness_run") else []))))
    for d in res.get("depth") or []:
        if not d.get("rows"):
            lines += ["", "### decode at depth, %s weights: %s" % (d["weights"], d.get("error", "no results"))]
            continue
        r0 = d["rows"][0]
        lines += ["", "### decode after a prompt of D tokens (%s weights, bench/decode_at_depth: "
                  "%d tokens per measurement, medians of %d; the KV types of a model loaded together "
                  "and measured in turn)" % (d["weights"], r0.get("generated", 0), len(r0.get("samples", []))), "",
                  "| KV heads | KV type | depth | decode tok/s | bw then GB/s | KV read MiB/token | predicted tok/s "
                  "| measured / predicted | attention GFLOP/token | predicted, bytes + FMAs | measured / that | limit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            kv_type = r.get("kv_type", "f32")  # results files from before the KV types
            if "decode_tps" not in r:
                lines.append("| %s | %s | %s | n/a | | | | %s | | | | |" % (
                    kv_label(r["n_kv_heads"]), kv_type, r.get("depth", ""), r.get("error", "")))
                continue
            bold = r["depth"] == CHECK_DEPTH or (r["depth"] == max(x["depth"] for x in d["rows"]) and kv_type != "f32")
            lines.append("| %s | %s | %d | %s | %.1f | %.1f | %.2f | %s | %s | %s | %s | %s |" % (
                kv_label(r["n_kv_heads"]), kv_type, r["depth"], spread(r["samples"], "tps"), r["bw_then_gbs"],
                r["kv_read_bytes"] / MIB, r["predicted_tps"], "**%.2f**" % r["ratio"] if bold else "%.2f" % r["ratio"],
                fmt(r.get("attention_gflop"), "%.2f"), fmt(r.get("compute_tps"), "%.2f"),
                fmt(r.get("compute_ratio"), "%.2f"), r.get("limit", "")))
        if d.get("checks"):
            lines += ["", "Check with ./run (its own prefill of the prompt, then %d tokens):" % d["checks"][0]["generated"],
                      "", "| KV heads | depth | decode tok/s | prefill tok/s | peak RSS MiB | RSS budget MiB | others |",
                      "|---|---|---|---|---|---|---|"]
            for c in d["checks"]:
                r = c["run"]
                if not r:
                    lines.append("| %d | %d | ./run failed | | | | |" % (c["n_kv_heads"], c["depth"]))
                    continue
                lines.append("| %d | %d | %.2f | %.1f | %.0f | %.0f | %s |" % (
                    c["n_kv_heads"], c["depth"], r["decode_tps"], r["prefill_tps"], r["rss_bytes"] / MIB,
                    c["rss_budget_bytes"] / MIB, busy([r])))
    tok = res.get("tokenizer")
    lines += ["", "tokenizer (1 thread, encode prose.txt): %s" % (
        "%s wall clock, %s CPU time (others %s)" % (
            fmt(tok["mb_per_s"], "%.1f MB/s"), fmt(tok.get("mb_per_s_cpu"), "%.1f MB/s"),
            fmt(None if tok.get("others") is None else 100 * tok["others"], "%.0f %%"))
        if tok else "n/a (no bench/bench_tokenizer)")]
    matmul_params = next((r["info"]["matmul_params"] for r in res["weights"] if "info" in r), None)
    lines += ["",
              "- % roofline = decode tok/s (./run, -n 64) x weight_bytes / the bandwidth above; % of bw then: "
              "decode tok/s x weight_bytes / the bandwidth measured in the same process just before and after "
              "(bench/decode_at_depth -b 1; neighbours on the host share the memory bus).",
              "- %% FMA peak = prefill tok/s x 2 x matmul params (%s) / FMA peak." % fmt(matmul_params, "%.4g"),
              "- predicted = bandwidth then / (weight_bytes + KV bytes read per token) (the bytes model); "
              "predicted, bytes + FMAs = 1 / (weight_bytes / bandwidth then + max(KV bytes read / bandwidth then, "
              "attention flops / the FMA peak above)); limit: the larger attention term (weights: both under 2 % of the "
              "weights' time; a q8_0 cache's MLA latent scores run on int8 dot products, which AVX-512 VNNI does 4 to an "
              "f32 FMA's 1: counted as f32 FMAs here, so the model is pessimistic for them). MLA's "
              "heads share one latent row, 1088 multiply-adds per (position, head): at depth its attention is "
              "bound by the FMAs, not by the cache's bytes.",
              "- others = the most CPU other programs used during the runs a figure comes from (%% of all cores); "
              "(used/made): runs with others > %.0f %% are retried, and left out while quiet ones exist." %
              (100 * MAX_OTHERS),
              "", "took %.0f s; ./run at %s%s" % (res["elapsed_s"], (res["git"].get("commit") or "?")[:7],
                                                  " + uncommitted changes" if res["git"].get("dirty") else "")]
    return "\n".join(lines)


def git_state():
    def git(*a):
        r = subprocess.run(["git", "-C", ROOT] + list(a), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True)
        return r.stdout.strip() if r.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "run.c", "tokenizer.c")}


def main():
    global VERBOSE, WAIT_IDLE, RUN, HARNESS, MAX_OTHERS, RETRIES
    cache_default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "l3bench")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run each, depths 1 and 1024, 16 generated tokens")
    ap.add_argument("--threads", type=int, default=2, help="threads for ./run and the microbenchmarks (default 2)")
    ap.add_argument("--skip-depth", action="store_true", help="skip the decode-at-depth test")
    ap.add_argument("--mla-depth", action="store_true",
                    help="only the MLA depth table: MLA 512 + 64 against GQA-8 (q8_0 weights, depths 1, 1024, 4000, "
                    "KV types f32,q8_0 unless --kv-types), with the bytes and the compute-aware models")
    ap.add_argument("--only", choices=WEIGHTS, help="benchmark only these weights")
    ap.add_argument("--depth-weights", choices=("both", "f32", "q8_0"), default="both",
                    help="weights of the depth-test models (default: both)")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3, --quick 1)")
    ap.add_argument("--depth-runs", type=int, default=3, help="measurements per depth and model (default 3)")
    ap.add_argument("--kv-types", default="f32,f16,q8_0",
                    help="KV cache element types of the depth test, comma-separated (default %(default)s)")
    ap.add_argument("--cache", default=cache_default, help="model and results directory (default %(default)s)")
    ap.add_argument("--shared", default=os.environ.get("SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to this long for the machine to be < 25%% busy (default 0)")
    ap.add_argument("--max-others", type=float, default=MAX_OTHERS, metavar="FRACTION",
                    help="a run is noisy if other programs used more than this fraction of all cores meanwhile "
                    "(default %(default)s); noisy runs are retried and left out of medians")
    ap.add_argument("--retries", type=int, help="extra runs to replace noisy ones (default: as many as --runs)")
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier results file and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress lines even when stderr is not a terminal")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return
    VERBOSE = VERBOSE or args.verbose
    WAIT_IDLE, MAX_OTHERS, RETRIES = args.wait_idle, args.max_others, args.retries
    args.runs = args.runs or (1 if args.quick else 3)
    args.kv_types = args.kv_types.split(",")
    if not args.kv_types or any(t not in ("f32", "f16", "q8_0") for t in args.kv_types):
        ap.error("--kv-types: a comma-separated list of f32, f16, q8_0")
    args.depths = [1, CHECK_DEPTH] if args.quick else [1, 1024, CHECK_DEPTH, 4000]
    if args.mla_depth:
        args.depths = [1, 1024] if args.quick else [1, 1024, 4000]
        if "--kv-types" not in " ".join(sys.argv):
            args.kv_types = ["f32", "q8_0"]
    os.makedirs(args.cache, exist_ok=True)
    t0 = time.time()

    build(os.environ.get("CC", "cc"))
    # Run a copy: others rebuild ./run in this tree while the benchmark runs.
    RUN = os.path.join(args.cache, "run.%d" % os.getpid())
    HARNESS = os.path.join(args.cache, "decode_at_depth.%d" % os.getpid())
    shutil.copy2(os.path.join(ROOT, "run"), RUN)
    shutil.copy2(os.path.join(BENCH, "decode_at_depth"), HARNESS)
    try:
        bench_all(args, t0)
    finally:
        os.remove(RUN)
        os.remove(HARNESS)


def bench_all(args, t0):
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state(), "loadavg": os.getloadavg(),
           "args": {k: v for k, v in vars(args).items()}}
    res["machine"] = measure_machine(args.threads, 1 if args.quick else 3)
    log("machine: %.1f GB/s, %.0f GFLOP/s %s" % (res["machine"]["bandwidth_gbs"], res["machine"]["fma_peak_gflops"],
                                                  res["machine"]["vector_unit"]))

    if args.mla_depth:  # the depth table of MLA and GQA-8 alone (no ./run checks: no prompts)
        res["weights"], res["tokenizer"] = [], None
        res["depth"] = [bench_depth(args, res["machine"], None, "q8_0", kvs=(8, MLA))]
    else:
        dtypes = [args.only] if args.only else list(WEIGHTS)
        first = ensure_model(args, dtypes[0])
        if not first:
            sys.exit("bench: cannot make the %s model" % dtypes[0])
        prompts = Prompts(first, os.path.join(args.shared, "corpora", "prose.txt"), args.cache)
        res["weights"] = [bench_weights(args, res["machine"], prompts, d) for d in dtypes]

        if not args.skip_depth:
            ok = [r["weights"] for r in res["weights"] if "decode_tps" in r]
            dws = ["f32", "q8_0"] if args.depth_weights == "both" else [args.depth_weights]
            res["depth"] = [bench_depth(args, res["machine"], prompts, dw) for dw in dws if dw in ok]
        res["tokenizer"] = bench_tokenizer(args)
    res["elapsed_s"] = time.time() - t0

    path = os.path.join(args.cache, "results-%s%s.json" % ("mla-" if args.mla_depth else "",
                                                          time.strftime("%Y%m%d-%H%M%S")))
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(report(res))
    print("\nresults: %s" % path)


if __name__ == "__main__":
    main()
