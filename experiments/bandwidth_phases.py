#!/usr/bin/env python3
"""bandwidth_phases.py - two of issue 15's lines in the same rounds, against the host's bandwidth.

  python3 experiments/bandwidth_phases.py --llama-bench PATH [--rounds 30] [--cache DIR]

The shared VMs this project runs on give a process ~30-35 GB/s of read
bandwidth at some moments and ~55-65 GB/s at others, switching within
seconds. Two acceptance lines pull in opposite directions:
  - q4_0 decode >= 1.5x llama.cpp Q4_0's tg64: llama.cpp is bound by its
    arithmetic (~35-42 tok/s in both phases), ours by the bytes, so the
    ratio follows the bandwidth;
  - an f16 / q8_0 KV cache within 10 % of the bytes model at depth 4000 for
    MQA: 32 query heads over one KV head are 262 M multiply-adds per token
    (2.2 ms at this CPU's FMA peak), which the 10 % covers only when the
    bytes take long, i.e. at low bandwidth.
Each round measures, seconds apart:
  bandwidth   bench/bandwidth -t 2 -g 1 -p 3 (GB/s)
  q4_0        ./run llama1b-Q4_0-q4_0.bin (vs_llamacpp.py's file) -n 64 -t 0 -T 2: decode tok/s,
              and llama-bench -m llama1b-Q4_0.gguf -t 2 -p 0 -n 64 -r 1: tg64; their ratio
  MQA         bench/decode_at_depth llama1b-kv1-q8_0.bin (bench.py's) -d 4000 -n 16 -r 1
              -k f16,q8_0 -b 1: tok/s x (weight_bytes + 4008.5 x kv_bytes_per_token) /
              the bandwidth sampled between its tokens (bench.py's "measured / bytes")
and the summary splits the rounds at 45 GB/s. Needs the bench files (make
bench, bench/vs_llamacpp.py) in --cache. Python 3 standard library only.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH, TOKENS = 4000, 16


def out(cmd):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        sys.exit("error: %s failed: %s" % (" ".join(cmd), r.stderr.strip()[-300:]))
    return r.stdout, r.stderr


def info(model, kv_type):
    text = out([os.path.join(ROOT, "run"), model, "-m", "info", "--kv-type", kv_type])[0]
    return {k: int(re.search(r"^%s: (\d+)$" % k, text, re.M).group(1)) for k in ("weight_bytes", "kv_bytes_per_token")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "l3bench"))
    args = ap.parse_args()
    ours, theirs = os.path.join(args.cache, "peer", "llama1b-Q4_0-q4_0.bin"), os.path.join(args.cache, "peer", "llama1b-Q4_0.gguf")
    mqa, prompt = os.path.join(args.cache, "llama1b-kv1-q8_0.bin"), os.path.join(args.cache, "peer", "prompt-short.txt")
    for f in (ours, theirs, mqa, prompt):
        if not os.path.exists(f):
            sys.exit("error: %s is missing: run make bench and bench/vs_llamacpp.py first" % f)
    kv = {t: info(mqa, t) for t in ("f16", "q8_0")}
    rows = []
    for r in range(args.rounds):
        bw = float(re.search(r"^bandwidth_gbs: ([\d.]+)$", out([os.path.join(ROOT, "bench", "bandwidth"), "-t", "2", "-g", "1", "-p", "3"])[0], re.M).group(1))
        err = out([os.path.join(ROOT, "run"), ours, "-f", prompt, "-n", "64", "-t", "0", "-T", "2"])[1]
        q4 = float(re.search(r"^decode: \d+ tokens, ([\d.]+) tok/s$", err, re.M).group(1))
        tg = [x["avg_ts"] for x in json.loads(out([args.llama_bench, "-m", theirs, "-t", "2", "-p", "0", "-n", "64", "-r", "1", "-o", "json"])[0])
              if x["n_gen"] == 64][0]
        text = out([os.path.join(ROOT, "bench", "decode_at_depth"), mqa, "-d", str(DEPTH), "-n", str(TOKENS), "-r", "1", "-k", "f16,q8_0", "-b", "1"])[0]
        row = {"time": time.strftime("%H:%M:%S"), "bw": bw, "ours": q4, "theirs": tg, "ratio": q4 / tg}
        for j, t in enumerate(("f16", "q8_0")):
            m = re.search(r"^model %d depth %d: \d+ tokens, ([\d.]+) tok/s.*bandwidth ([\d.]+) GB/s$" % (j, DEPTH), text, re.M)
            tps, b = float(m.group(1)), float(m.group(2))
            row[t] = tps * (kv[t]["weight_bytes"] + (DEPTH + (TOKENS + 1) / 2) * kv[t]["kv_bytes_per_token"]) / (b * 1e9)
            row[t + "_bw"] = b
        rows.append(row)
        print("%(time)s  bw %(bw)5.1f GB/s | q4_0 ours %(ours)5.1f, llama.cpp %(theirs)5.1f tok/s: %(ratio).2fx | "
              "MQA depth 4000: f16 %(f16).2f (%(f16_bw).1f GB/s), q8_0 %(q8_0).2f (%(q8_0_bw).1f GB/s)" % row, flush=True)
    print("\n| phase | rounds | q4_0 ours / llama.cpp | MQA f16 measured / bytes | MQA q8_0 measured / bytes |")
    print("|---|---|---|---|---|")
    for name, test in (("< 45 GB/s", lambda b: b < 45), (">= 45 GB/s", lambda b: b >= 45)):
        ratios = [x["ratio"] for x in rows if test(x["bw"])]
        cells = {t: [x[t] for x in rows if test(x[t + "_bw"])] for t in ("f16", "q8_0")}
        fmt = lambda v: "%.2f (%.2f-%.2f)" % (statistics.median(v), min(v), max(v)) if v else "-"
        print("| %s | %d / %d / %d | %s | %s | %s |" % (name, len(ratios), len(cells["f16"]), len(cells["q8_0"]),
                                                    fmt(ratios), fmt(cells["f16"]), fmt(cells["q8_0"])))
    print("(each cell: median (min-max) over the rounds whose own bandwidth sample falls in the phase)")


if __name__ == "__main__":
    main()
