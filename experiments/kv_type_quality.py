#!/usr/bin/env python3
"""kv_type_quality.py - what an f16 or q8_0 KV cache (--kv-type) costs in
quality, on the two tiny llama2.c checkpoints of ../shared/models.

For stories260K and aidreams260K, and each cache type f32 / f16 / q8_0:
  perplexity   ./run MODEL -m ppl -f tinystories-valid.txt --kv-type T (the whole file)
  KL, top-1    the next-token distributions against the f32 cache's at the first
               KL_TOKENS token positions of the same text (tests/logits -k T, windows
               of the context, each after BOS): mean KL(f32 || T) in nats per token,
               and how often the two agree on the most likely token.
Prints a markdown table. Needs ./run and tests/logits built (make run tests/logits)
and numpy.

usage: python3 experiments/kv_type_quality.py [--shared ../shared] [--threads 2]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN, LOGITS = os.path.join(ROOT, "run"), os.path.join(ROOT, "tests", "logits")
KL_TOKENS = 2048
TYPES = ("f32", "f16", "q8_0")
MODELS = (("stories260K", "stories260K.bin", "tok512.bin"), ("aidreams260K", "aidreams260K.bin", "aidreams260K-tok512.bin"))


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        sys.exit("kv_type_quality: %s failed: %s" % (" ".join(map(str, cmd)), r.stderr.strip()[-500:]))
    return r.stdout


def key_values(text):
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in text.splitlines()) if sep}


def logits(model, ids, kv_type, tmp, np):
    out = os.path.join(tmp, "logits.f32")
    run([LOGITS, model, out] + list(ids) + ["-k", kv_type, "-T", "1", "-B", "32"])
    return np.fromfile(out, dtype="<f4").reshape(len(ids), -1).astype(np.float64)


def log_softmax(x, np):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    corpus = os.path.join(args.shared, "corpora", "tinystories-valid.txt")
    tmp = tempfile.mkdtemp(prefix="kvq-")
    lines = ["| model | KV cache | bytes/token | perplexity | vs f32 | KL(f32 ‖ T) nats/token | same top token |",
             "|---|---|---|---|---|---|---|"]
    for name, ckpt, tok in MODELS:
        model = os.path.join(tmp, name + ".bin")
        run([sys.executable, os.path.join(ROOT, "export", "export.py"), model, "--llama2c",
             os.path.join(args.shared, "models", ckpt), "--tokenizer", os.path.join(args.shared, "models", tok)])
        tokens = run([RUN, model, "-m", "tokenize", "-f", corpus, "-T", 1]).split()
        bos, text = tokens[0], tokens[1:KL_TOKENS + 1]
        step = int(key_values(run([RUN, model, "-m", "info"]))["context"]) - 1
        windows = [[bos] + text[i:i + step] for i in range(0, len(text), step)]
        ref = [log_softmax(logits(model, ids, "f32", tmp, np), np) for ids in windows]
        base = None
        for t in TYPES:
            t0 = time.time()
            ppl = float(key_values(run([RUN, model, "-m", "ppl", "-f", corpus, "--kv-type", t, "-T", args.threads]))["perplexity"])
            kv_bytes = int(key_values(run([RUN, model, "-m", "info", "--kv-type", t]))["kv_bytes_per_token"])
            base = base or ppl
            kl, agree, n = 0.0, 0, 0
            for w, ids in enumerate(windows):
                lq = ref[w] if t == "f32" else log_softmax(logits(model, ids, t, tmp, np), np)
                lp = ref[w]
                kl += float((np.exp(lp) * (lp - lq)).sum())
                agree += int((lp.argmax(axis=-1) == lq.argmax(axis=-1)).sum())
                n += len(ids)
            lines.append("| %s | %s | %d | %.4f | %+.2e | %.2e | %.2f %% |" % (
                name, t, kv_bytes, ppl, (ppl - base) / base, max(kl / n, 0.0), 100 * agree / n))
            print("%s %s: perplexity %.6f, KL %.3g, top-1 %.2f %% (%.0f s)" % (name, t, ppl, kl / n, 100 * agree / n,
                                                                          time.time() - t0), file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
