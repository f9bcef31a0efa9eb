"""testlib.py - shared plumbing of the Python tests: the ok/FAIL/skip
protocol of tests/run_tests.sh, running export.py and the engine, and
reading an exported file back (header and tensors, from model.h's rules)."""
import os
import struct
import subprocess
import sys
import tempfile
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(ROOT, "export", "export.py")


def _from_root(path):
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


RUN = _from_root(os.environ.get("RUN", "./run"))
LOGITS = _from_root(os.environ.get("LOGITS", "tests/logits"))
SHARED = _from_root(os.environ.get("SHARED", "../shared"))
CI = os.environ.get("CI") == "true"
# "asan" or "tsan" when make test-asan / test-tsan runs the suite against a
# sanitizer build (10-50x slower): the checks that repeat one code path over
# much data then take a sample of it (sanitized_sample); the plain `make test`
# runs it all.
SANITIZER = os.environ.get("SANITIZER", "")


def sanitized_sample(items, keep):
    """items, or under a sanitizer about `keep` of them, evenly spaced."""
    items = list(items)
    if not SANITIZER or len(items) <= keep:
        return items
    return items[::-(-len(items) // keep)]


def scratch(prefix):
    base = os.environ.get("TMPDIR_TESTS") or None
    if base:
        os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def in_dir(folder):
    """path(*parts): a path in folder."""
    return lambda *parts: os.path.join(folder, *parts)


def write_text(folder, name, text):
    """folder/name.txt holding text (UTF-8); returns its path."""
    p = os.path.join(folder, name + ".txt")
    with open(p, "w", encoding="utf-8") as f:
        f.write(text)
    return p


def note(what, err):
    """With VERBOSE=1, one line per measured error (for tuning tolerances)."""
    if os.environ.get("VERBOSE") == "1":
        print(f"# {what:<56} {err:.3g}")


# ----------------------------------------------------------------------------
# Protocol: one line per check


class Checks:
    def __init__(self):
        self.failed = 0

    def ok(self, name):
        print(f"ok {name}", flush=True)

    def fail(self, name, why):
        self.failed += 1
        print(f"FAIL {name}: {why}", flush=True)

    def check(self, name, cond, why=""):
        if cond:
            self.ok(name)
        else:
            self.fail(name, why)
        return cond

    def missing(self, name, path):
        """A ../shared file is missing: skip, or FAIL under CI."""
        if CI:
            self.fail(name, f"{path} is missing (CI=true)")
        else:
            print(f"skip {name}: {path} is missing", flush=True)

    def run(self, name, fn, *args, **kwargs):
        """Calls fn; an exception becomes one FAIL line instead of a crash."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            self.fail(name, f"{type(e).__name__}: {e} (at {os.path.basename(tb.filename)}:{tb.lineno})")
            return None


def shared_file(rel):
    return os.path.join(SHARED, rel)


def llama2c_files(model_file, tok_file):
    """((checkpoint, tokenizer, tinystories-valid.txt) paths in ../shared, the first of them missing or None)."""
    paths = (shared_file("models/" + model_file), shared_file("models/" + tok_file),
             shared_file("corpora/tinystories-valid.txt"))
    return paths, next((p for p in paths if not os.path.exists(p)), None)


# ----------------------------------------------------------------------------
# Running things


def export(out, *args, python=None):
    """Runs export.py; returns the CompletedProcess (text)."""
    cmd = [python or sys.executable, EXPORT, out] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True)


def export_ok(out, *args):
    r = export(out, *args)
    if r.returncode != 0:
        raise RuntimeError(f"export failed: {r.stderr.strip()[-300:]}")
    return out


def engine_built():
    return os.access(RUN, os.X_OK) and os.access(LOGITS, os.X_OK)


def engine_logits(model, ids, *extra):
    """(len(ids), vocab) float32 logits from tests/logits."""
    fd, out = tempfile.mkstemp(suffix=".f32", dir=os.environ.get("TMPDIR_TESTS") or None)
    os.close(fd)
    try:
        r = subprocess.run([LOGITS, model, out] + [str(i) for i in ids] + [str(e) for e in extra],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"tests/logits failed: {r.stderr.strip()[-300:]}")
        x = np.fromfile(out, dtype="<f4")
    finally:
        os.remove(out)
    return x.reshape(len(ids), -1)


def engine(*args):
    r = subprocess.run([RUN] + [str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(RUN)} {' '.join(map(str, args[1:]))} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def engine_tokens(model, text_path):
    """BOS + ids of the text, as the engine tokenizes it."""
    return [int(t) for t in engine(model, "-m", "tokenize", "-f", text_path, "-T", 1).split()]


def engine_ppl(model, text_path, *extra):
    out = engine(model, "-m", "ppl", "-f", text_path, "-T", 1, *extra)
    for line in out.splitlines():
        if line.startswith("perplexity:"):
            return float(line.split()[1])
    raise RuntimeError(f"no 'perplexity:' line in {out!r}")


def rel_err(a, b):
    """max|a - b| / max|b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------
# Reading an exported file back (model.h)

MODEL_MAGIC, MODEL_VERSION = 0x4B43334C, 4  # model.h: "L3CK"; version 4 (3 + attention kind, MLA sizes, embedding dtype)

HEADER_FIELDS = [  # (name, struct code), in order
    ("magic", "I"), ("version", "I"), ("dim", "i"), ("hidden_dim", "i"), ("n_layers", "i"),
    ("n_heads", "i"), ("n_kv_heads", "i"), ("head_dim", "i"), ("vocab_size", "i"), ("max_seq_len", "i"),
    ("rope_theta", "f"), ("rope_scaling", "i"), ("rope_factor", "f"), ("rope_low_freq_factor", "f"),
    ("rope_high_freq_factor", "f"), ("rope_original_max_pos", "i"), ("norm_eps", "f"),
    ("tied_classifier", "i"), ("dtype", "i"), ("group_size", "i"), ("bos_id", "i"), ("n_stop_ids", "i"),
    ("stop_ids", "8i"), ("tokenizer_kind", "i"), ("reserved", "i"), ("tokenizer_offset", "Q"),
    ("tokenizer_bytes", "Q"), ("weights_offset", "Q"), ("file_bytes", "Q"),
    ("attention", "i"), ("kv_latent_dim", "i"), ("kv_rope_dim", "i"), ("embedding_dtype", "i")]
HEADER_FIELDS_BYTES = 176


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(256)
    values = struct.unpack("<" + "".join(code for _, code in HEADER_FIELDS), raw[:HEADER_FIELDS_BYTES])
    h, i = {}, 0
    for name, code in HEADER_FIELDS:
        if code == "8i":
            h[name] = list(values[i:i + 8])
            i += 8
        else:
            h[name] = values[i]
            i += 1
    h["stop_ids"] = h["stop_ids"][:h["n_stop_ids"]]
    h["pad_is_zero"] = raw[HEADER_FIELDS_BYTES:] == bytes(256 - HEADER_FIELDS_BYTES)
    return h


def align64(n):
    return (n + 63) // 64 * 64


def tensor_dtype(h, name):
    """model.h: token_embedding and classifier have embedding_dtype, the other matrices dtype."""
    return h["embedding_dtype"] if name in ("token_embedding", "classifier") else h["dtype"]


def tensor_layout(h):
    """[(name, shape, offset, nbytes)] as model.h places the tensors."""
    d, hid, V, hd = h["dim"], h["hidden_dim"], h["vocab_size"], h["head_dim"]
    q, kv = h["n_heads"] * hd, h["n_kv_heads"] * hd
    dc, dr = h.get("kv_latent_dim", 0), h.get("kv_rope_dim", 0)
    if h.get("attention", 0) == 1:  # MLA: rope_pairs (int32), q_C, q_R, [W_DKV; W_KR], W_UK^T and W_UV per head
        attention = [("rope_pairs", (dr // 2,)), ("wq", (q, d)), ("wq_rope", (h["n_heads"] * dr, d)),
                     ("wkv_a", (dc + dr, d)), ("wk_b", (h["n_heads"] * dc, hd)), ("wv_b", (q, dc))]
    else:
        attention = [("wq", (q, d)), ("wk", (kv, d)), ("wv", (kv, d))]
    names = [("token_embedding", (V, d))]
    for l in range(h["n_layers"]):
        names += [(f"layers.{l}.{n}", s) for n, s in [("attn_norm", (d,))] + attention + [
            ("wo", (d, q)), ("ffn_norm", (d,)), ("w1", (hid, d)), ("w2", (d, hid)), ("w3", (hid, d))]]
    names.append(("final_norm", (d,)))
    if not h["tied_classifier"]:
        names.append(("classifier", (V, d)))
    out, off = [], h["weights_offset"]
    for name, shape in names:
        n = int(np.prod(shape))
        dtype = tensor_dtype(h, name)
        if dtype in (1, 2) and len(shape) == 2:  # groups of 32 (the last zero-padded): values + a float16 scale
            groups = -(-shape[1] // Q8_GROUP)
            nbytes = align64(shape[0] * groups * ((32 if dtype == 1 else 16) + 2))
        else:
            nbytes = align64(4 * n)
        out.append((name, shape, off, nbytes))
        off += nbytes
    return out


Q8_GROUP, Q8_BLOCK_GROUPS, Q8_CHUNK_GROUPS = 32, 32, 16  # values per scale; groups per block; interleaved together


def deinterleave_q8_0(vb, g):
    """A block's stored values (rows, 32 * g) -> group order. model.h: chunks
    of up to 16 groups, value i of group j of a chunk of m groups at
    (i // 4) * 4 * m + j * 4 + i % 4 from the chunk's start."""
    rows = vb.shape[0]
    out = np.empty((rows, g, Q8_GROUP), vb.dtype)
    for c0 in range(0, g, Q8_CHUNK_GROUPS):
        m = min(Q8_CHUNK_GROUPS, g - c0)
        chunk = vb[:, c0 * Q8_GROUP:(c0 + m) * Q8_GROUP]
        for j in range(m):
            for i in range(Q8_GROUP):
                out[:, c0 + j, i] = chunk[:, (i // 4) * 4 * m + j * 4 + i % 4]
    return out.reshape(rows, g * Q8_GROUP)


def unpack_q4_0(vb, g):
    """A q4_0 block's stored bytes (rows, 16 * g) -> q8_0's interleaved order
    (rows, 32 * g) of q in [-8, 7]. model.h: in a chunk of m groups, byte k of
    row r (4 rows of 4 * m bytes) holds q8_0's row 2r byte k + 8 in its low
    4 bits, row 2r + 1 byte k + 8 in its high 4 bits."""
    rows, parts = vb.shape[0], []
    for c0 in range(0, g, Q8_CHUNK_GROUPS):
        m = min(Q8_CHUNK_GROUPS, g - c0)
        chunk = vb[:, c0 * Q8_GROUP // 2:(c0 + m) * Q8_GROUP // 2].reshape(rows, 4, 1, 4 * m)
        parts.append(np.concatenate([chunk & 15, chunk >> 4], axis=2).reshape(rows, -1).astype(np.int8) - 8)
    return np.concatenate(parts, axis=1)


def read_q8_0_rows(raw, rows, cols, bits=8):
    """(int8 q (rows, 32 * groups), float16 scale (rows, groups)) of a q8_0
    (bits 8) or q4_0 (bits 4) matrix from its bytes (model.h): rows back to
    back; a row is ceil(cols / 32) groups (the last zero-padded) in blocks of
    up to 32 groups, a block of g groups being its values (interleaved; q8_0:
    32 * g int8, q4_0: 16 * g bytes), then g little-endian float16 scales."""
    n_groups = -(-cols // Q8_GROUP)
    per_group = Q8_GROUP * bits // 8
    rb = raw[:rows * n_groups * (per_group + 2)].reshape(rows, n_groups * (per_group + 2))
    q = np.empty((rows, n_groups * Q8_GROUP), np.int8)
    scale = np.empty((rows, n_groups), np.float16)
    pos = 0
    for g0 in range(0, n_groups, Q8_BLOCK_GROUPS):
        g = min(Q8_BLOCK_GROUPS, n_groups - g0)
        vb = rb[:, pos:pos + g * per_group]
        vb = vb.view(np.int8) if bits == 8 else unpack_q4_0(vb, g)
        q[:, g0 * Q8_GROUP:(g0 + g) * Q8_GROUP] = deinterleave_q8_0(vb, g)
        pos += g * per_group
        scale[:, g0:g0 + g] = np.ascontiguousarray(rb[:, pos:pos + 2 * g]).view("<f2")
        pos += 2 * g
    assert pos == rb.shape[1]
    return q, scale


def read_tensors(path):
    """(header, {name: float32 array}) of an exported file; q8_0 and q4_0
    matrices are dequantized (q * float32(scale) per group of 32, in float32),
    and also returned raw as name + ".q" (int8, (rows, 32 * groups), a short
    last group's padding included) and name + ".scale" (float16, (rows, groups))."""
    h = read_header(path)
    if h["magic"] != MODEL_MAGIC or h["version"] != MODEL_VERSION:
        raise ValueError(f"{path}: magic {h['magic']:#x}, format version {h['version']}; "
                         f"expected {MODEL_MAGIC:#x}, version {MODEL_VERSION} (model.h)")
    data = np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, shape, off, nbytes in tensor_layout(h):
        n = int(np.prod(shape))
        dtype = tensor_dtype(h, name)
        if dtype in (1, 2) and len(shape) == 2:
            if h["group_size"] != Q8_GROUP:
                raise ValueError(f"{path}: group_size {h['group_size']}, expected {Q8_GROUP}")
            rows, cols = shape
            q, scale = read_q8_0_rows(data[off:off + nbytes], rows, cols, 8 if dtype == 1 else 4)
            out[name + ".q"], out[name + ".scale"] = q, scale
            with np.errstate(invalid="ignore"):  # a corrupt (inf, NaN) scale times q = 0
                deq = q.reshape(rows, -1, Q8_GROUP).astype(np.float32) * scale.astype(np.float32)[:, :, None]
            out[name] = np.ascontiguousarray(deq.reshape(rows, -1)[:, :cols])
        else:  # f32; MLA's rope_pairs int32
            out[name] = data[off:off + 4 * n].view("<i4" if name.endswith("rope_pairs") else "<f4").reshape(shape)
    return h, out


def read_tokenizer_section(path):
    """[(score, flags, bytes)] of the tokenizer section."""
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h["tokenizer_offset"])
        sec = f.read(h["tokenizer_bytes"])
    n, _max_len = struct.unpack_from("<II", sec, 0)
    pos, toks = 8, []
    for _ in range(n):
        score, flags, length = struct.unpack_from("<fII", sec, pos)
        toks.append((score, flags, sec[pos + 12:pos + 12 + length]))
        pos += 12 + length
    return toks


# ----------------------------------------------------------------------------
# llama2.c checkpoints, read independently of export.py


def read_llama2c(path):
    """(header dict, {kind: float32 array}) of a legacy llama2.c checkpoint:
    7 x int32, then token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1,
    w2, w3, rms_final, freq_cis_real, freq_cis_imag, [wcls] (vocab < 0)."""
    raw = np.fromfile(path, dtype=np.uint8)
    dim, hidden, L, nh, nkv, V, S = struct.unpack("<7i", raw[:28].tobytes())
    h = dict(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=nh, n_kv_heads=nkv,
             vocab_size=abs(V), seq_len=S, tied=V > 0, head_dim=dim // nh)
    flat, pos = raw[28:].view("<f4"), 0
    hd, kv, V = dim // nh, nkv * (dim // nh), abs(V)

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos:pos + n].reshape(shape)
        pos += n
        return out

    W = {}
    for kind, shape in [("token_embedding", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
                        ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim)),
                        ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)),
                        ("w3", (L, hidden, dim)), ("rms_final", (dim,)), ("freq_cis_real", (S, hd // 2)),
                        ("freq_cis_imag", (S, hd // 2))] + ([] if h["tied"] else [("wcls", (V, dim))]):
        W[kind] = take(*shape)
    if pos != len(flat):
        raise ValueError(f"{path}: {len(flat) - pos} floats left over")
    return h, W


def hf_permute(w, n_heads):
    """Meta/llama2.c adjacent-pair rows -> HF rotate_half rows, as HF's
    conversion script does: within each head, row 2i + j goes to j*hd/2 + i."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def llama2c_to_hf(h, W):
    """(HF config dict, {HF name: float32 array}) of a llama2.c checkpoint."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h["dim"],
           "intermediate_size": h["hidden_dim"], "num_hidden_layers": h["n_layers"],
           "num_attention_heads": h["n_heads"], "num_key_value_heads": h["n_kv_heads"],
           "vocab_size": h["vocab_size"], "max_position_embeddings": h["seq_len"], "rope_theta": 10000.0,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": h["tied"], "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2}
    hf = {"model.embed_tokens.weight": W["token_embedding"], "model.norm.weight": W["rms_final"]}
    for l in range(h["n_layers"]):
        p = f"model.layers.{l}."
        hf.update({p + "input_layernorm.weight": W["rms_att"][l],
                   p + "self_attn.q_proj.weight": hf_permute(W["wq"][l], h["n_heads"]),
                   p + "self_attn.k_proj.weight": hf_permute(W["wk"][l], h["n_kv_heads"]),
                   p + "self_attn.v_proj.weight": W["wv"][l], p + "self_attn.o_proj.weight": W["wo"][l],
                   p + "post_attention_layernorm.weight": W["rms_ffn"][l],
                   p + "mlp.gate_proj.weight": W["w1"][l], p + "mlp.down_proj.weight": W["w2"][l],
                   p + "mlp.up_proj.weight": W["w3"][l]})
    if not h["tied"]:
        hf["lm_head.weight"] = W["wcls"]
    return cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}
