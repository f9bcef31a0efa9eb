#!/usr/bin/env python3
"""quant_quality.py - what the weight types cost in quality, on the real tiny
checkpoints (stories260K, aidreams260K; ../shared/models):

  f32, q8_0, q4_0 with a q8_0 embedding/classifier (export.py's default for
  q4_0), q4_0 everywhere (--embedding-dtype q4_0), and q4_0 rounded with
  GGML's rule instead of the exporter's scale search (d = m / -8 only;
  export.py patched in this process: a measurement, not an option).

For each: perplexity of ./run -m ppl on the whole of
../shared/corpora/tinystories-valid.txt, the file's bytes, and against the
f32 export the mean KL(f32 || quantized) in nats per token and how often the
two agree on the most likely token, over the first KL_TOKENS tokens of the
same text (tests/logits, windows of the context after BOS).

  /usr/bin/python3 experiments/quant_quality.py [--shared ../shared] [-j 2]

Writes experiments/quant_quality.md (and .json). Needs numpy, ./run and tests/logits built."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "export"))
import export as ex  # noqa: E402

RUN, LOGITS = os.path.join(ROOT, "run"), os.path.join(ROOT, "tests", "logits")
KL_TOKENS = 2048
TINY = [("stories260K", "stories260K.bin", "tok512.bin"), ("aidreams260K", "aidreams260K.bin", "aidreams260K-tok512.bin")]
VARIANTS = [  # (name, --dtype, --embedding-dtype, GGML's rounding)
    ("f32", "f32", None, False), ("q8_0", "q8_0", None, False), ("q4_0 (q8_0 embedding)", "q4_0", None, False),
    ("q4_0 everywhere", "q4_0", "q4_0", False), ("q4_0, GGML's rounding (q8_0 embedding)", "q4_0", None, True)]


def quantize_q4_0_ggml(x, name="tensor", row0=0):
    """GGML's Q4_0 rule, for comparison: d = m / -8 (m the value of largest |x|), q = round(x / d)."""
    groups = ex.pad_groups(x)
    m = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    d16 = (m / np.float32(-8)).astype(np.float16)
    d = d16.astype(np.float32)
    q = np.clip(np.rint(np.divide(groups, d[:, :, None], out=np.zeros_like(groups), where=d[:, :, None] != 0)), -8, 7)
    return q.astype(np.int8).reshape(x.shape[0], -1), d16


def export(out, src, tok, dtype, emb, ggml):
    saved = ex.quantize_q4_0
    if ggml:
        ex.quantize_q4_0 = quantize_q4_0_ggml
    try:
        ex.export_llama2c(out, src, tok, ex.DTYPE_NAMES[dtype], None, None if emb is None else ex.DTYPE_NAMES[emb])
    finally:
        ex.quantize_q4_0 = saved
    return os.path.getsize(out)


def ppl(model, corpus):
    t0 = time.time()
    r = subprocess.run([RUN, model, "-m", "ppl", "-f", corpus, "-T", "1"], capture_output=True, text=True, check=True)
    return (int(re.search(r"^tokens: (\d+)", r.stdout, re.M).group(1)),
            float(re.search(r"^perplexity: (\S+)", r.stdout, re.M).group(1)), time.time() - t0)


def logits(model, windows, tmp):
    out = []
    for k, ids in enumerate(windows):
        path = os.path.join(tmp, "logits-%d-%d.f32" % (os.getpid(), k))
        subprocess.run([LOGITS, model, path] + [str(i) for i in ids] + ["-T", "1", "-B", "32"], check=True)
        out.append(np.fromfile(path, "<f4").reshape(len(ids), -1).astype(np.float64))
        os.remove(path)
    return np.concatenate(out)


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("-j", type=int, default=2, help="./run -m ppl processes at a time (-T 1 each)")
    args = ap.parse_args()
    corpus = os.path.join(args.shared, "corpora", "tinystories-valid.txt")
    tmp = tempfile.mkdtemp(prefix="quant_quality_")
    jobs = []
    for name, mfile, tfile in TINY:
        src, tok = (os.path.join(args.shared, "models", f) for f in (mfile, tfile))
        for vname, dtype, emb, ggml in VARIANTS:
            path = os.path.join(tmp, "%s-%d.bin" % (name, len(jobs)))
            jobs.append({"model": name, "variant": vname, "path": path, "file_bytes": export(path, src, tok, dtype, emb, ggml)})
    with ThreadPoolExecutor(args.j) as pool:
        for job, (n, p, secs) in zip(jobs, pool.map(lambda j: ppl(j["path"], corpus), jobs)):
            job.update(tokens=n, perplexity=p, seconds=round(secs, 1))
            print("%s %s: perplexity %.4f over %d tokens (%.0f s)" % (job["model"], job["variant"], p, n, secs), flush=True)
    for name, _, _ in TINY:
        mine = [j for j in jobs if j["model"] == name]
        ids = [int(t) for t in subprocess.run([RUN, mine[0]["path"], "-m", "tokenize", "-f", corpus],
                                              capture_output=True, text=True, check=True).stdout.split()]
        ctx = int(re.search(r"^max_seq_len: (\d+)", subprocess.run([RUN, mine[0]["path"], "-m", "info"], capture_output=True,
                                                                     text=True, check=True).stdout, re.M).group(1))
        text, step = ids[1:KL_TOKENS + 1], ctx - 1
        windows = [[ids[0]] + text[i:i + step] for i in range(0, len(text), step)]
        ref = log_softmax(logits(mine[0]["path"], windows, tmp))
        for j in mine:
            lq = ref if j is mine[0] else log_softmax(logits(j["path"], windows, tmp))
            j["kl_nats"] = float(max(0.0, (np.exp(ref) * (ref - lq)).sum(axis=1).mean()))
            j["top1_agreement"] = float((ref.argmax(axis=1) == lq.argmax(axis=1)).mean())
            j["kl_positions"] = int(ref.shape[0])
    for j in jobs:
        os.remove(j.pop("path"))
    os.rmdir(tmp)
    lines = ["| model | weights | file bytes | perplexity | vs f32 | KL(f32 ‖ it), nats/token | same top token as f32 |",
             "|---|---|---|---|---|---|---|"]
    for j in jobs:
        f32 = next(k for k in jobs if k["model"] == j["model"] and k["variant"] == "f32")
        lines.append("| %s | %s | %d | %.4f | %+.2f %% | %.5f | %.1f %% |" % (
            j["model"], j["variant"], j["file_bytes"], j["perplexity"], 100 * (j["perplexity"] / f32["perplexity"] - 1),
            j["kl_nats"], 100 * j["top1_agreement"]))
    md = "\n".join(["# Weight types: what they cost in quality", "",
                    "`/usr/bin/python3 experiments/quant_quality.py`: perplexity of `./run -m ppl` on the whole of "
                    "tinystories-valid.txt (%d / %d tokens); KL and top token against the f32 export over the first %d "
                    "token positions (tests/logits, windows of the context)." % (
                        jobs[0]["tokens"], jobs[-1]["tokens"], jobs[0]["kl_positions"]), ""] + lines) + "\n"
    with open(os.path.join(ROOT, "experiments", "quant_quality.md"), "w") as f:
        f.write(md)
    with open(os.path.join(ROOT, "experiments", "quant_quality.json"), "w") as f:
        json.dump(jobs, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
