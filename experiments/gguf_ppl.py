#!/usr/bin/env python3
"""gguf_ppl.py - what a GGUF's weight type costs in perplexity, on the real
tiny checkpoints: stories260K and aidreams260K written as GGUFs by
tests/gguf_writer.py (as llama.cpp lays them out; quantized with ggml's
reference rounding: Q8_0 d = max|x| / 127, q = round(x / d); Q4_0 d = the
signed max / -8), each exported with `export.py --gguf ... --dtype f32` (so
the only loss is the GGUF's own) and scored by `./run -m ppl` on
tinystories-valid.txt. ffn_down's rows have 172 values, not whole blocks of
32, so that matrix stays F16 in the Q8_0 and Q4_0 files; the k-quants need
rows of 256 and cannot hold any matrix of these models.

  python3 experiments/gguf_ppl.py [--shared ../shared] [--chars N] [--dtypes q8_0,q4_0]
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import gguf_writer as gw  # noqa: E402
from testlib import llama2c_to_hf, read_llama2c  # noqa: E402


def ppl(model, text):
    out = subprocess.run([os.path.join(ROOT, "run"), model, "-m", "ppl", "-f", text, "-T", "2"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("perplexity:")[1].split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--chars", type=int, default=0, help="score only the first N characters (0: all)")
    ap.add_argument("--dtypes", default="", help="also export stories260K's GGUFs as these --dtype (e.g. q8_0,q4_0)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gguf_ppl_")
    text = os.path.join(args.shared, "corpora", "tinystories-valid.txt")
    if args.chars:
        with open(text, encoding="utf-8") as f, open(os.path.join(tmp, "text.txt"), "w", encoding="utf-8") as o:
            o.write(f.read(args.chars))
        text = os.path.join(tmp, "text.txt")
    print("| model | GGUF type | bits / weight of the matrices | exported as | perplexity | vs F32 |")
    print("|---|---|---|---|---|---|")
    for model, tok in [("stories260K", "tok512.bin"), ("aidreams260K", "aidreams260K-tok512.bin")]:
        h, W2 = read_llama2c(os.path.join(args.shared, "models", model + ".bin"))
        cfg, hf = llama2c_to_hf(h, W2)
        meta_tok = gw.sentencepiece_tokenizer(os.path.join(args.shared, "models", tok), h["vocab_size"])
        base = None
        for t, bits in [("F32", 32), ("F16", 16), ("BF16", 16), ("Q8_0", 8.5), ("Q4_0", 4.5)]:
            types = {f"blk.{l}.ffn_down.weight": "F16" for l in range(h["n_layers"])} if t.startswith("Q") else {}
            meta, tensors = gw.hf_to_gguf(cfg, hf, t, meta_tok, q8_rule="ggml", types=types)
            g = os.path.join(tmp, f"{model}_{t}.gguf")
            gw.write_gguf(g, meta, tensors)
            out = os.path.join(tmp, f"{model}_{t}.bin")
            subprocess.run([sys.executable, os.path.join(ROOT, "export", "export.py"), out, "--gguf", g,
                            "--dtype", "f32"], check=True, capture_output=True)
            p = ppl(out, text)
            base = base or p
            print(f"| {model} | {t} | {bits}{' (ffn_down F16)' if t.startswith('Q') else ''} | f32 | {p:.4f} | "
                  f"{100 * (p / base - 1):+.2f} % |", flush=True)
            for dtype in args.dtypes.split(",") if model == "stories260K" and t != "BF16" else []:
                r = subprocess.run([sys.executable, os.path.join(ROOT, "export", "export.py"), out, "--gguf", g,
                                    "--dtype", dtype], capture_output=True, text=True)
                if r.returncode:
                    print(f"| {model} | {t} | | {dtype} | {r.stderr.strip()[:80]} | |", flush=True)
                    continue
                p = ppl(out, text)
                print(f"| {model} | {t} | | {dtype} | {p:.4f} | {100 * (p / base - 1):+.2f} % |", flush=True)


if __name__ == "__main__":
    main()
