#!/usr/bin/env python3
"""mla.py - multi-head latent attention next to MHA / GQA / MQA: what each
KV-cache size costs in quality when a trained checkpoint is converted.

  python3 experiments/mla.py            (about 10-15 minutes on a busy 2-core machine)
  python3 experiments/mla.py --replot   mla.md and mla.svg again from mla.json

For the two real tiny checkpoints, stories260K (8 query heads, 4 KV heads)
and aidreams260K (4 / 4, MHA), on $SHARED/corpora/tinystories-valid.txt cut
in two at the first line break after its middle character (calibration: the
first half; evaluation: the second, which no conversion has seen):
  - the file, and every ./run --kv-heads K (mean-pooled or repeated heads);
  - export.py --mla full (exact) and --mla N --calib FIRST_HALF for several
    N, among them exactly the bytes of pooled GQA-2 and pooled MQA;
and for each: perplexity on the second half (./run -m ppl -T 1), and the KL
divergence of its next-token distribution from the file's own and how often
their top tokens agree, over the first 2048 tokens of the second half
(tests/logits, windows of the context each after BOS).

Writes experiments/mla.json (raw), mla.md (the table) and mla.svg
(perplexity against KV bytes per token, every configuration of both models).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN, LOGITS = os.path.join(ROOT, "run"), os.path.join(ROOT, "tests", "logits")
EXPORT = os.path.join(ROOT, "export", "export.py")
OUT_JSON, OUT_MD, OUT_SVG = (os.path.join(HERE, "mla." + e) for e in ("json", "md", "svg"))
KL_TOKENS = 2048
MODELS = [  # name, checkpoint, tokenizer (in $SHARED/models), MLA sizes N to convert to besides full
    ("stories260K", "stories260K.bin", "tok512.bin", [48, 32, 24, 16, 8]),
    ("aidreams260K", "aidreams260K.bin", "aidreams260K-tok512.bin", [96, 64, 48, 32, 16]),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd))}: {r.stderr.strip()[-300:]}")
    return r.stdout


def info(model, *extra):
    return dict(line.split(": ", 1) for line in run([RUN, model, "-m", "info", *extra]).splitlines() if ": " in line)


def split_corpus(corpus, tmp):
    """(calibration path, evaluation path, character where the second half starts)."""
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    cut = text.index("\n", len(text) // 2) + 1
    paths = os.path.join(tmp, "calib.txt"), os.path.join(tmp, "eval.txt")
    for p, part in zip(paths, (text[:cut], text[cut:])):
        with open(p, "w", encoding="utf-8") as f:
            f.write(part)
    return paths[0], paths[1], cut, len(text)


def ppl(model, text, *extra):
    out = run([RUN, model, "-m", "ppl", "-f", text, "-T", 1, *extra])
    return {k: float(v) for k, v in (line.split(": ") for line in out.splitlines())}


def logits(model, ids, tmp, *extra):
    out = os.path.join(tmp, "logits.f32")
    extra = ["-K" if e == "--kv-heads" else e for e in extra]  # tests/logits' name for it
    run([LOGITS, model, out, *ids, "-T", 1, "-B", 64, *extra])
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1).astype(np.float64)


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def windows_of(model, text):
    """Windows of the context over the first KL_TOKENS tokens of text, each after BOS."""
    tokens = [int(t) for t in run([RUN, model, "-m", "tokenize", "-f", text]).split()]
    bos, ids = tokens[0], tokens[1:KL_TOKENS + 1]
    ctx = int(info(model)["max_seq_len"])
    return [[bos] + ids[i:i + ctx - 1] for i in range(0, len(ids), ctx - 1)]


def divergence(ref_rows, model, windows, tmp, *extra):
    kl, same, n = 0.0, 0, 0
    for ref, ids in zip(ref_rows, windows):
        p, q = log_softmax(ref), log_softmax(logits(model, ids, tmp, *extra))
        kl += float(np.sum(np.exp(p) * (p - q)))
        same += int(np.sum(p.argmax(1) == q.argmax(1)))
        n += len(ids)
    return kl / n, same / n


def measure(shared, tmp):
    calib, evalp, cut, total = split_corpus(os.path.join(shared, "corpora", "tinystories-valid.txt"), tmp)
    data = {"split": {"characters": total, "second_half_starts_at": cut}, "models": []}
    for name, ckpt, tok, sizes in MODELS:
        src = os.path.join(tmp, name + ".bin")
        run([sys.executable, EXPORT, src, "--llama2c", os.path.join(shared, "models", ckpt),
             "--tokenizer", os.path.join(shared, "models", tok)])
        h = info(src)
        n_heads, n_kv, hd = int(h["n_heads"]), int(h["n_kv_heads"]), int(h["head_dim"])
        windows = windows_of(src, evalp)
        ref_rows = [logits(src, ids, tmp) for ids in windows]
        rows = []

        def add(config, conversion, model, kind, *extra):
            i = info(model, *extra)
            p = ppl(model, evalp, *extra)
            kl, same = divergence(ref_rows, model, windows, tmp, *extra)
            rows.append(dict(config=config, conversion=conversion, kind=kind,
                             kv_bytes_per_token=int(i["kv_bytes_per_token"]), tokens=int(p["tokens"]),
                             perplexity=p["perplexity"], kl=kl, same_top=same,
                             kv_latent_dim=int(i.get("kv_latent_dim", 0)), kv_rope_dim=int(i.get("kv_rope_dim", 0))))
            log(f"{name} {config} ({conversion}): {rows[-1]['kv_bytes_per_token']} B/token, perplexity "
                f"{p['perplexity']:.4f}, KL {kl:.4f}, same top token {100 * same:.1f} %")

        for K in [k for k in range(n_heads, 0, -1) if (n_kv % k == 0 if k <= n_kv else k % n_kv == 0 and n_heads % k == 0)]:
            config = "MHA" if K == n_heads else "MQA" if K == 1 else f"GQA-{K}"
            conversion = "the file" if K == n_kv else f"mean-pool {n_kv // K} -> 1" if K < n_kv else f"repeat x{K // n_kv}"
            add(config, conversion, src, "file" if K == n_kv else "pool" if K < n_kv else "repeat", "--kv-heads", K)
        for N in ["full"] + sizes:
            out = os.path.join(tmp, f"{name}_mla_{N}.bin")
            t0 = time.time()
            run([sys.executable, EXPORT, out, "--llama2c", os.path.join(shared, "models", ckpt),
                 "--tokenizer", os.path.join(shared, "models", tok), "--mla", N]
                + ([] if N == "full" else ["--calib", calib]))
            log(f"{name} --mla {N}: exported in {time.time() - t0:.0f} s")
            n = 2 * n_kv * hd if N == "full" else N
            add(f"MLA-{n}", "exact (--mla full)" if N == "full" else f"--mla {N} --calib", out,
                "mla_full" if N == "full" else "mla", )
            os.remove(out)
        data["models"].append(dict(name=name, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                                   n_layers=int(h["n_layers"]), rows=rows))
    return data


# ----------------------------------------------------------------------------
# Reports

def markdown(data):
    L = ["# MLA next to MHA / GQA / MQA: quality of converted checkpoints (generated by experiments/mla.py)", "",
         f"Command: `python3 experiments/mla.py` — {data['date']}, git {data['git']}, total run time "
         f"{data['seconds']:.0f} s.", "",
         f"Text: `tinystories-valid.txt` ({data['split']['characters']} characters) cut at the first line break "
         f"after its middle: characters [0, {data['split']['second_half_starts_at']}) calibrate the lossy MLA "
         "conversions (`--calib`), the rest is the held-out text every row is measured on: perplexity "
         "(`./run M -m ppl -f SECOND_HALF`), and over its first 2048 tokens the KL divergence of each model's "
         "next-token distribution from the file's own and how often their top tokens agree (tests/logits, "
         "windows of the context after BOS). KV bytes per token with an f32 cache: n_layers x 2 x K x head_dim x 4 "
         "(MHA / GQA / MQA), n_layers x (kv_latent_dim + kv_rope_dim) x 4 (MLA).", "",
         "| model | config | conversion | KV bytes/token | latent + RoPE key per layer | perplexity | vs the file "
         "| KL(file ‖ it) nats/token | same top token |",
         "|---|---|---|---|---|---|---|---|---|"]
    for m in data["models"]:
        base = next(r["perplexity"] for r in m["rows"] if r["kind"] == "file")
        for r in sorted(m["rows"], key=lambda r: (-r["kv_bytes_per_token"], r["kind"])):
            lat = f"{r['kv_latent_dim']} + {r['kv_rope_dim']}" if r["kind"].startswith("mla") else "-"
            L.append(f"| {m['name']} | {r['config']} | {r['conversion']} | {r['kv_bytes_per_token']} | {lat} | "
                     f"{r['perplexity']:.4f} | {100 * (r['perplexity'] / base - 1):+.1f} % | {r['kl']:.4f} | "
                     f"{100 * r['same_top']:.1f} % |")
    return "\n".join(L) + "\n"


def svg(data):
    W, H, x0, x1, y0, y1 = 760, 420, 70, 730, 40, 360
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         '<text x="380" y="18" text-anchor="middle" font-size="14">Perplexity on held-out TinyStories vs KV-cache '
         'bytes per token (f32): converted checkpoints, no training</text>']
    allr = [r for m in data["models"] for r in m["rows"]]
    bx = [math.log2(r["kv_bytes_per_token"]) for r in allr]
    by = [math.log10(r["perplexity"]) for r in allr]
    lo_x, hi_x = math.floor(min(bx)), math.ceil(max(bx))
    lo_y, hi_y = math.floor(min(by) * 2) / 2, math.ceil(max(by) * 2) / 2
    X = lambda b: x0 + (math.log2(b) - lo_x) / (hi_x - lo_x) * (x1 - x0)
    Y = lambda p: y1 - (math.log10(p) - lo_y) / (hi_y - lo_y) * (y1 - y0)
    s.append(f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>')
    for e in range(lo_x, hi_x + 1):
        s.append(f'<text x="{X(2 ** e):.0f}" y="{y1 + 16}" text-anchor="middle">{2 ** e}</text>')
    for v in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]:
        if lo_y <= math.log10(v) <= hi_y:
            s.append(f'<text x="{x0 - 6}" y="{Y(v) + 4:.0f}" text-anchor="end">{v}</text>'
                     f'<line x1="{x0}" y1="{Y(v):.0f}" x2="{x1}" y2="{Y(v):.0f}" stroke="#eee"/>')
    s.append(f'<text x="{(x0 + x1) / 2}" y="{H - 25}" text-anchor="middle">KV bytes per token (log scale)</text>')
    s.append(f'<text x="16" y="{(y0 + y1) / 2}" transform="rotate(-90 16 {(y0 + y1) / 2})" text-anchor="middle">'
             'perplexity (log scale)</text>')
    colors = {"stories260K": "#1f77b4", "aidreams260K": "#d62728"}
    for m in data["models"]:
        col = colors.get(m["name"], "black")
        mla = sorted([r for r in m["rows"] if r["kind"].startswith("mla")], key=lambda r: r["kv_bytes_per_token"])
        pts = " ".join(f"{X(r['kv_bytes_per_token']):.1f},{Y(r['perplexity']):.1f}" for r in mla)
        s.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.5"/>')
        gqa = sorted([r for r in m["rows"] if not r["kind"].startswith("mla")], key=lambda r: r["kv_bytes_per_token"])
        pts = " ".join(f"{X(r['kv_bytes_per_token']):.1f},{Y(r['perplexity']):.1f}" for r in gqa)
        s.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-dasharray="4,3"/>')
        for r in m["rows"]:
            x, y = X(r["kv_bytes_per_token"]), Y(r["perplexity"])
            if r["kind"].startswith("mla"):
                s.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{col}"/>')
            else:
                s.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="white" stroke="{col}"/>')
            below = r["kind"] == "mla_full"  # on top of the file's point: its label below it
            s.append(f'<text x="{x + 6:.1f}" y="{y + (14 if below else -6):.1f}" font-size="10" fill="{col}">'
                     f'{r["config"]}</text>')
    s.append(f'<text x="{x0}" y="{H - 8}" font-size="11">dots: MLA (--mla N, calibrated on the first half); '
             'squares: the file and --kv-heads K (mean-pooled / repeated heads).</text>')
    s.append(f'<text x="{x1}" y="{y0 + 14}" font-size="11" text-anchor="end">blue: stories260K; red: aidreams260K '
             '(out of domain: see the KL in mla.md)</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--shared", default=os.environ.get("SHARED", os.path.join(ROOT, "..", "shared")))
    args = ap.parse_args()
    if args.replot:
        with open(OUT_JSON) as f:
            data = json.load(f)
    else:
        for tool in (RUN, LOGITS):
            if not os.access(tool, os.X_OK):
                sys.exit(f"error: {tool} is not built (make run tests/logits)")
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            data = measure(args.shared, tmp)
        data["seconds"] = time.time() - t0
        data["date"] = time.strftime("%Y-%m-%d %H:%M")
        data["git"] = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
        with open(OUT_JSON, "w") as f:
            json.dump(data, f, indent=1)
    with open(OUT_MD, "w") as f:
        f.write(markdown(data))
    with open(OUT_SVG, "w") as f:
        f.write(svg(data))
    log(f"wrote {OUT_MD} and {OUT_SVG}")


if __name__ == "__main__":
    main()
