#!/usr/bin/env python3
"""test_malformed.py - malformed model files: every one must end with exit
status 1 and exactly one stderr line, the exact "error: ..." message; a
corruption the format allows must load and run cleanly instead.

The corpus is generated from five small valid exports (f32 llama3 tied;
q8_0 untied with llama3 rope scaling; MLA in f32 and in q8_0 untied; f32 with
the llama2.c tok512 vocabulary):
  - truncated at every section boundary (header, tokenizer section, each
    tensor's start, start + 1 and middle) and at a spread of offsets; the same
    with the header's file_bytes patched to the new length, so the checks
    behind that one (section placement, implied size) are reached; extended;
  - each header field set to zero, -1, huge, INT_MIN, just outside its range
    and to in-range but inconsistent values;
  - tokenizer sections with bad counts, lengths, missing byte tokens, extra bytes;
  - a NaN or an Inf in each kind of tensor (f32 matrix, norm, q8_0 scale), and
    finite weights whose arithmetic overflows (a non-finite logit at run time);
  - the seeds and the regression inputs of the loader fuzzer (tests/fuzz/).
The expected message comes from expected_error(), which restates the checks
of run.c (check_header, load_checkpoint, check_weights_finite) and tokenizer.c
(tokenizer_build) in order; a test fails when the engine's stderr differs by one character."""
import concurrent.futures
import math
import os
import struct
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testlib  # noqa: E402
from testlib import HEADER_FIELDS, MODEL_VERSION, ROOT  # noqa: E402

T = testlib.Checks()
TMP = testlib.scratch("malformed_")
MAGIC, HEADER_BYTES = 0x4B43334C, 256
INT_MIN, INT_MAX, U64_MAX = -2**31, 2**31 - 1, 2**64 - 1
TOKEN_SPECIAL = 1

# Byte offset and struct code of each header field (model.h)
FIELD = {}
_off = 0
for _name, _code in HEADER_FIELDS:
    FIELD[_name] = (_off, "<" + _code)
    _off += struct.calcsize("<" + _code)

def mla(h):
    return int(h["attention"] == 1)


# check_header's range table, in its order: (name, lo, hi); bos_id's hi is vocab_size - 1; a string is
# another field's value, a function one of the header (MLA's sizes: 0 for GQA)
RANGES = [("dim", 1, 1 << 16), ("hidden_dim", 1, 1 << 18), ("n_layers", 1, 1024), ("n_heads", 1, 1024),
          ("n_kv_heads", 1, 1024), ("head_dim", 2, 1 << 12), ("vocab_size", 1, 1 << 22),
          ("max_seq_len", 1, 1 << 24), ("n_stop_ids", 0, 8), ("dtype", 0, 2), ("rope_scaling", 0, 1),
          ("tied_classifier", 0, 1), ("tokenizer_kind", 1, 2), ("bos_id", -1, None),
          ("attention", 0, 1), ("kv_latent_dim", mla, lambda h: mla(h) << 16),
          ("kv_rope_dim", lambda h: 2 * mla(h), lambda h: mla(h) << 12), ("embedding_dtype", 0, 2)]
DTYPE_NAMES = {0: "f32", 1: "q8_0", 2: "q4_0"}  # model.h DTYPE_*


def bound(h, b, default=None):
    """A RANGES bound's value for header h."""
    return default if b is None else h[b] if isinstance(b, str) else b(h) if callable(b) else b
OLDEST_VERSION = 3  # model.h MODEL_VERSION_OLDEST: version 3 reads as 4 with GQA, 0, 0, embedding_dtype = dtype


def header_of(raw):
    """The header fields as a dict (stop_ids: all 8 slots)."""
    h = {}
    for name, (off, code) in FIELD.items():
        v = struct.unpack_from(code, raw, off)
        h[name] = list(v) if len(v) > 1 else v[0]
    return h


def g(x):
    return "%g" % x  # C's printf %g, for the float fields


def g_signed(x, sign):
    return "-nan" if math.isnan(x) and sign else g(x)  # glibc prints a NaN's sign bit


def tokenizer_error(kind, sec):
    """tokenizer_build's one-line reason for section bytes `sec`, or None if it builds."""
    if len(sec) < 8:
        return f"tokenizer section is {len(sec)} bytes, too short"
    n, max_bytes = struct.unpack_from("<II", sec, 0)
    if n == 0 or n > (len(sec) - 8) // 12 or n > INT_MAX:
        return f"tokenizer section claims {n} tokens but has {len(sec)} bytes (truncated or corrupt?)"
    p, ordinary = 8, set()
    for i in range(n):
        if len(sec) - p < 12:
            return f"tokenizer section ends inside token {i} of {n} (truncated?)"
        flags, length = struct.unpack_from("<II", sec, p + 4)
        left = len(sec) - p - 12
        if length > max_bytes or length > left:
            return (f"token {i} claims {length} bytes (max_token_bytes {max_bytes}, {left} left in "
                    "the section): corrupt tokenizer section")
        if not flags & TOKEN_SPECIAL:
            ordinary.add(sec[p + 12:p + 12 + length])
        p += 12 + length
    if p != len(sec):
        return f"{len(sec) - p} bytes follow the last token of the tokenizer section (corrupt?)"
    for b in range(256):
        want = bytes([b]) if kind == 2 else b"<0x%02X>" % b
        if want not in ordinary:
            return (f"the vocabulary has no token for byte 0x{b:02X}, so it cannot encode every text "
                    "(wrong tokenizer kind?)")
    return None


def layout_end(h):
    return testlib.tensor_layout(h)[-1][2] + testlib.tensor_layout(h)[-1][3]


def expected_error(path, raw):
    """The first stderr line of `run path` for the file bytes raw, or None if it loads."""
    size = len(raw)
    if size < HEADER_BYTES:
        return f"error: {path}: file is {size} bytes, too short for a model header (256); truncated?"
    h = header_of(raw)

    def err(msg):
        return f"error: {path}: {msg}"
    if h["magic"] != MAGIC:
        legacy = struct.unpack_from("<7i", raw, 0)
        if 0 < legacy[0] < 65536 and 0 < legacy[2] < 1024 and legacy[3] > 0:
            return err("not a model file of this engine (it looks like a llama2.c checkpoint); convert it: "
                       f"python3 export/export.py out.bin --llama2c {path} --tokenizer tokenizer.bin")
        return err("not a model file of this engine (bad magic); convert a checkpoint with export/export.py")
    if not OLDEST_VERSION <= h["version"] <= MODEL_VERSION:
        return err(f"format version {h['version']}, this engine reads versions {OLDEST_VERSION} to {MODEL_VERSION}; "
                   "re-export the model")
    if h["version"] == 3:
        h.update(attention=0, kv_latent_dim=0, kv_rope_dim=0, embedding_dtype=h["dtype"])
    for name, lo, hi in RANGES:
        lo, hi = bound(h, lo), bound(h, hi, h["vocab_size"] - 1)
        if not lo <= h[name] <= hi:
            return err(f"header field {name} = {h[name]} is out of range [{lo}, {hi}]; corrupt file?")
    if h["n_heads"] % h["n_kv_heads"]:
        return err(f"n_heads ({h['n_heads']}) is not a multiple of n_kv_heads ({h['n_kv_heads']})")
    if h["head_dim"] % 2:
        return err(f"head_dim ({h['head_dim']}) must be even for RoPE")
    if mla(h) and h["n_kv_heads"] != 1:
        return err("an MLA model has one KV head (the latent all query heads share), the header says "
                   f"n_kv_heads = {h['n_kv_heads']}")
    if h["kv_rope_dim"] % 2:
        return err(f"kv_rope_dim ({h['kv_rope_dim']}) must be even for RoPE")
    grouped = h["dtype"] if h["dtype"] else h["embedding_dtype"]  # a quantized dtype, if any
    if grouped and h["group_size"] != 32:
        return err(f"{DTYPE_NAMES[grouped]} group_size is {h['group_size']}; this engine reads groups of 32")
    if not grouped and h["group_size"] != 0:
        return err(f"f32 weights with group_size {h['group_size']} (must be 0); corrupt file?")
    if h["reserved"] != 0:
        return err(f"header field reserved = {h['reserved']} (must be 0); corrupt file?")
    for sid in h["stop_ids"][:h["n_stop_ids"]]:
        if not 0 <= sid < h["vocab_size"]:
            return err(f"stop id {sid} is outside the vocabulary ({h['vocab_size']})")
    if not 0 < h["norm_eps"] < 1:
        return err(f"norm_eps {g(h['norm_eps'])} is out of range (0, 1)")
    if not (h["rope_theta"] > 1 and math.isfinite(h["rope_theta"])):
        return err(f"rope_theta {g(h['rope_theta'])} must be finite and > 1")
    if h["rope_scaling"] == 1 and not (
            1 <= h["rope_factor"] < math.inf and h["rope_low_freq_factor"] > 0
            and h["rope_low_freq_factor"] < h["rope_high_freq_factor"] < math.inf and h["rope_original_max_pos"] > 0):
        return err("inconsistent llama3 rope scaling parameters")
    if h["file_bytes"] != size:
        return err(f"file is {size} bytes, header says {h['file_bytes']}; truncated download or corrupt file? re-export it")
    to, tb, wo = h["tokenizer_offset"], h["tokenizer_bytes"], h["weights_offset"]
    if to < HEADER_BYTES or tb > size or to > size - tb or to + tb > wo:
        return err(f"the tokenizer section [{to}, +{tb}) is outside its place in the file")
    if wo % 64 or wo > size:
        return err(f"weights_offset {wo} is not 64-byte aligned inside the file")
    end = layout_end(h)
    if end != size:
        return err(f"the header implies {end} bytes of file, the file has {size}; corrupt or truncated")
    for name, shape, off, _ in testlib.tensor_layout(h) if mla(h) else []:
        if name.endswith("rope_pairs"):
            for j, i in enumerate(struct.unpack_from(f"<{shape[0]}i", raw, off)):
                if not 0 <= i < h["head_dim"] // 2:
                    return err(f"layer {name.split('.')[1]}: rope_pairs[{j}] = {i} is not a pair of a head "
                               f"(0 .. {h['head_dim'] // 2 - 1}); corrupt file?")
    reason = tokenizer_error(h["tokenizer_kind"], raw[to:to + tb])
    if reason:
        return err(f"bad tokenizer section: {reason}")
    n_tokens = struct.unpack_from("<I", raw, to)[0]
    if n_tokens != h["vocab_size"]:
        return err(f"the tokenizer has {n_tokens} tokens, the model {h['vocab_size']}")
    return nonfinite_error(raw, h, err)


def scale_offset(off, cols, dtype, r, gi):
    """Where model.h puts the float16 scale of group gi of row r of a q8_0 (dtype 1) or q4_0 (2) matrix
    at off: rows of ceil(cols / 32) groups of 34 (18) bytes, blocks of up to 32 groups, values then scales."""
    groups, per_group = -(-cols // 32), 34 if dtype == 1 else 18
    b, j = divmod(gi, 32)
    return off + r * groups * per_group + b * 32 * per_group + min(32, groups - 32 * b) * (per_group - 2) + 2 * j


def nonfinite_error(raw, h, err):
    """The loader's finite check: the first NaN/Inf f32 value or float16 scale, in file order."""
    for name, shape, off, _ in testlib.tensor_layout(h):
        n = int(np.prod(shape))
        if name.endswith("rope_pairs"):  # MLA's int32 vector: range-checked before
            continue
        dtype = testlib.tensor_dtype(h, name)
        if dtype and len(shape) == 2:
            rows, cols = shape
            for r in range(rows):
                for gi in range(-(-cols // 32)):
                    bits = struct.unpack_from("<H", raw, scale_offset(off, cols, dtype, r, gi))[0]
                    if bits & 0x7C00 == 0x7C00:
                        v = float(np.frombuffer(struct.pack("<H", bits), "<f2")[0])
                        return err(f"non-finite {DTYPE_NAMES[dtype]} scale {g_signed(v, bits >> 15)} in {where(name)}, "
                                   f"row {r}, group {gi}; {FIX}")
            continue
        v = np.frombuffer(raw, "<f4", n, off)
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            i = int(bad[0])
            at = f"element {i}" if len(shape) == 1 else f"row {i // shape[1]}, column {i % shape[1]}"
            sign = struct.unpack_from("<I", raw, off + 4 * i)[0] >> 31
            return err(f"non-finite weight {g_signed(float(v[i]), sign)} in {where(name)}, {at}; {FIX}")
    return None


# ----------------------------------------------------------------------------
# Running one case

SANITIZER_WORDS = ("Sanitizer", "runtime error", "LeakSanitizer", "Segmentation", "core dumped")


def run_case(name, raw, want=None):
    """Queues a case: raw is written to a file, the engine run on it (see run_queued)."""
    QUEUE.append((name, raw, want))


def check_case(name, raw, want):
    """Runs the engine on raw; returns (ok, why). want overrides expected_error."""
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(raw)
    expected = want if want is not None else expected_error(path, raw)
    h = header_of(raw) if len(raw) >= HEADER_BYTES else {}
    runs = expected is None and h.get("max_seq_len", 0) >= 4
    args = ["-i", "a", "-n", "4", "-t", "0", "-T", "1"] if runs else ["-m", "info"]
    env = os.environ
    if expected is not None:  # die() exits without freeing, by design: LeakSanitizer's exit scan is moot
        env = dict(env, ASAN_OPTIONS=env.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    try:
        r = subprocess.run([testlib.RUN, path] + args, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                           env=env)
    except subprocess.TimeoutExpired:
        return False, "timed out after 120 s (a hang)"
    finally:
        os.remove(path)
    err = r.stderr.decode("utf-8", "replace")
    lines = err.splitlines()
    if expected is None:
        extra = [ln for ln in lines if not ln.startswith(("prefill:", "decode:"))]
        return (r.returncode == 0 and not extra,
                f"expected to load and run; status {r.returncode}, stderr {err.strip()[:300]!r}")
    return (r.returncode == 1 and lines == [expected],
            f"status {r.returncode}, stderr {err.strip()[:400]!r}, expected {expected!r}")


QUEUE = []


def run_queued():
    """Runs the queued cases, one engine per core at a time, and reports them in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda c: check_case(*c), QUEUE))
    for (name, _raw, _want), (ok, why) in zip(QUEUE, results):
        T.check(name, ok, why)
    QUEUE.clear()


def with_field(raw, name, value, index=None):
    """raw with header field name set to value (stop_ids: slot index), as C
    would store it: integers wrap to the field's width."""
    off, code = FIELD[name]
    out = bytearray(raw)
    if index is not None:
        off, code = off + 4 * index, "<i"
    if code == "<i":
        value = (value + 2**31) % 2**32 - 2**31
    elif code == "<I":
        value %= 2**32
    elif code == "<Q":
        value %= 2**64
    struct.pack_into(code, out, off, value)
    return bytes(out)


def fixed_size(raw):
    """raw with file_bytes set to its own length."""
    return with_field(raw, "file_bytes", len(raw))


# ----------------------------------------------------------------------------
# The base models


def export(name, *args):
    path = os.path.join(TMP, name + ".base")
    testlib.export_ok(path, "--random", *args)
    with open(path, "rb") as f:
        raw = f.read()
    os.remove(path)
    return raw


SMALL = ["--vocab-size", "261", "--max-seq-len", "16", "--seed", "1"]
BASES = {}


def build_bases():
    BASES["f32"] = export("f32", "--dim", "32", "--hidden-dim", "32", "--n-layers", "2", "--n-heads", "4",
                          "--n-kv-heads", "2", *SMALL)
    BASES["q8"] = export("q8", "--dim", "32", "--hidden-dim", "64", "--n-layers", "1", "--n-heads", "2",
                         "--n-kv-heads", "1", "--untied", "--rope-scaling", "llama3", "--dtype", "q8_0", *SMALL)
    BASES["mla"] = export("mla", "--dim", "32", "--hidden-dim", "32", "--n-layers", "2", "--n-heads", "4",
                          "--head-dim", "8", "--kv-latent-dim", "12", "--kv-rope-dim", "4", *SMALL)
    BASES["mla_q8"] = export("mla_q8", "--dim", "64", "--hidden-dim", "32", "--n-layers", "1", "--n-heads", "2",
                             "--head-dim", "32", "--kv-latent-dim", "32", "--kv-rope-dim", "6", "--untied",
                             "--dtype", "q8_0", *SMALL)
    # q4_0 matrices (the default q8_0 embedding and classifier), every row ending in a short group
    BASES["q4"] = export("q4", "--dim", "40", "--hidden-dim", "44", "--n-layers", "1", "--n-heads", "2",
                         "--n-kv-heads", "1", "--untied", "--dtype", "q4_0", *SMALL)
    BASES["l2c"] = export("l2c", "--tokenizer", os.path.join(ROOT, "models", "tok512.bin"), "--vocab-size", "512",
                          "--dim", "16", "--hidden-dim", "16", "--n-layers", "1", "--n-heads", "2",
                          "--n-kv-heads", "2", "--max-seq-len", "8", "--seed", "2")


def boundaries(raw):
    """(label, offset) of every section boundary and a spread of offsets."""
    h = header_of(raw)
    size = len(raw)
    to, tb = h["tokenizer_offset"], h["tokenizer_bytes"]
    cuts = [("empty", 0), ("one_byte", 1), ("inside_magic", 3), ("inside_header", 128), ("header_minus_1", 255),
            ("header_only", 256), ("header_plus_1", 257), ("tokenizer_counts", to + 4), ("first_token", to + 8),
            ("inside_first_token", to + 14), ("tokenizer_minus_1", to + tb - 1), ("tokenizer_end", to + tb),
            ("weights_minus_1", h["weights_offset"] - 1)]
    for tname, _shape, off, nbytes in testlib.tensor_layout(h):
        cuts += [(tname + "_start", off), (tname + "_start_plus_1", off + 1), (tname + "_middle", off + nbytes // 2)]
    cuts += [("end_minus_64", size - 64), ("end_minus_1", size - 1)]
    cuts += [(f"at_{k}_of_8", size * k // 8) for k in range(1, 8)]
    seen, out = set(), []
    for label, off in cuts:
        if 0 <= off < size and off not in seen:
            seen.add(off)
            out.append((label, off))
    return out


def truncation_cases():
    for base, raw in BASES.items():
        for label, off in boundaries(raw):
            run_case(f"truncated_{base}_{label}", raw[:off])
            if off >= HEADER_BYTES:  # the same with a header that agrees: the later checks must catch it
                run_case(f"truncated_{base}_{label}_size_patched", fixed_size(raw[:off]))
        run_case(f"extended_{base}_by_1", raw + b"\0")
        run_case(f"extended_{base}_by_64", raw + bytes(64))
        run_case(f"extended_{base}_by_64_size_patched", fixed_size(raw + bytes(64)))


def header_cases():
    raw, q8, q4, l2c = BASES["f32"], BASES["q8"], BASES["q4"], BASES["l2c"]
    h = header_of(raw)
    cases = []  # (name, bytes)
    for name, lo, hi in RANGES:
        lo, hi = bound(h, lo), bound(h, hi, h["vocab_size"] - 1)
        values = {"zero": 0, "minus_1": -1, "int_max": INT_MAX, "int_min": INT_MIN, "below_range": lo - 1,
                  "above_range": hi + 1}
        for label, v in values.items():
            cases.append((f"header_{name}_{label}", with_field(raw, name, v)))
    inconsistent = [  # in range, but not this file's
        ("dim", 33), ("dim", 64), ("hidden_dim", 31), ("n_layers", 1), ("n_layers", 3), ("n_heads", 3),
        ("n_heads", 8), ("n_kv_heads", 3), ("n_kv_heads", 4), ("head_dim", 7), ("head_dim", 16),
        ("vocab_size", 262), ("vocab_size", 260), ("tied_classifier", 0), ("dtype", 1), ("tokenizer_kind", 1),
        ("rope_scaling", 1), ("group_size", 32), ("group_size", -1), ("reserved", 1), ("n_stop_ids", 3),
        ("max_seq_len", 1), ("max_seq_len", 1 << 24), ("bos_id", -1), ("bos_id", 260)]
    for name, v in inconsistent:
        cases.append((f"header_{name}_set_to_{v}".replace("-", "minus_"), with_field(raw, name, v)))
    for label, v in [("vocab_size", h["vocab_size"]), ("minus_1", -1), ("int_max", INT_MAX)]:
        cases.append((f"header_stop_id_{label}", with_field(raw, "stop_ids", v, index=0)))
    floats = [("norm_eps", [0.0, -1e-5, 1.0, math.inf, math.nan, 0.5]),
              ("rope_theta", [0.0, 1.0, -10000.0, math.inf, -math.inf, math.nan, 2.0])]
    for name, vals in floats:
        for v in vals:
            cases.append((f"header_{name}_{v!r}".replace("-", "minus_").replace(".", "_"), with_field(raw, name, v)))
    for name, vals in [("rope_factor", [0.5, math.inf, math.nan, 1.0]), ("rope_low_freq_factor", [0.0, -1.0, 4.0]),
                       ("rope_high_freq_factor", [1.0, math.inf, 0.5]), ("rope_original_max_pos", [0, -1, INT_MAX])]:
        for v in vals:
            cases.append((f"header_q8_{name}_{v!r}".replace("-", "minus_").replace(".", "_"), with_field(q8, name, v)))
    for name, v in [("group_size", 0), ("group_size", 64), ("group_size", 16), ("dtype", 0), ("dim", 48),
                    ("tied_classifier", 1), ("hidden_dim", 48), ("head_dim", 8)]:
        cases.append((f"header_q8_{name}_set_to_{v}", with_field(q8, name, v)))
    for name, v in [("group_size", 0), ("group_size", 16), ("dtype", 1), ("dtype", 0), ("embedding_dtype", 2),
                    ("embedding_dtype", 0), ("embedding_dtype", 3), ("dim", 48), ("hidden_dim", 45), ("hidden_dim", 32),
                    ("head_dim", 16)]:
        cases.append((f"header_q4_{name}_set_to_{v}", with_field(q4, name, v)))
    cases.append(("header_q4_f32_everywhere_group_size_32", with_field(with_field(q4, "dtype", 0), "embedding_dtype", 0)))
    size, to, tb, wo = len(raw), h["tokenizer_offset"], h["tokenizer_bytes"], h["weights_offset"]
    for name, vals in [("magic", [0, 0x46554747, MAGIC + 1]),
                       ("version", [0, OLDEST_VERSION - 1, MODEL_VERSION + 1, 0xFFFFFFFF]),
                       ("tokenizer_offset", [0, 255, to + 1, wo, size, U64_MAX]),
                       ("tokenizer_bytes", [0, 7, tb - 1, tb + 1, wo - to + 1, size, U64_MAX]),
                       ("weights_offset", [0, wo + 1, wo - 64, wo + 64, size + 64, U64_MAX - 63]),
                       ("file_bytes", [0, size - 1, size + 1, U64_MAX])]:
        for v in vals:
            cases.append((f"header_{name}_{v}", with_field(raw, name, v)))
    cases.append(("header_q8_version_1", with_field(q8, "version", 1)))  # a q8_0 file of the old layout
    cases.append(("header_q8_version_2", with_field(q8, "version", 2)))
    # a version 3 file loads whatever its (then padding) version 4 bytes hold
    cases.append(("header_q8_version_3_loads", with_field(with_field(q8, "version", 3), "embedding_dtype", 7)))
    cases.append(("header_q8_embedding_dtype_f32", with_field(q8, "embedding_dtype", 0)))
    cases.append(("header_l2c_tokenizer_kind_llama3", with_field(l2c, "tokenizer_kind", 2)))
    cases.append(("header_l2c_bos_id_512", with_field(l2c, "bos_id", 512)))
    cases += mla_header_cases()
    legacy = struct.pack("<7i", 288, 768, 6, 6, 6, 32000, 256) + bytes(4000)
    cases.append(("llama2c_checkpoint_says_how_to_convert", legacy))
    cases.append(("zeros", bytes(4096)))
    cases.append(("text_file", b"The quick brown fox jumps over the lazy dog.\n" * 20))
    for name, data in cases:
        run_case(name, data)


def mla_header_cases():
    """MLA's fields and tensors: the attention kind flipped either way, its
    sizes out of range or inconsistent with the file, rope_pairs outside a head."""
    gqa, m, m8 = BASES["f32"], BASES["mla"], BASES["mla_q8"]
    cases = [("mla_header_gqa_file_says_mla", with_field(gqa, "attention", 1)),
             ("mla_header_gqa_file_says_mla_with_sizes", with_field(with_field(with_field(gqa, "attention", 1),
                                                                   "kv_latent_dim", 8), "kv_rope_dim", 4)),
             ("mla_header_gqa_file_with_latent", with_field(gqa, "kv_latent_dim", 8)),
             ("mla_header_says_gqa", with_field(m, "attention", 0)),
             ("mla_header_attention_2", with_field(m, "attention", 2))]
    for name, vals in [("n_kv_heads", [2, 4, 0]), ("kv_latent_dim", [0, 11, 13, 65536, 65537, -1]),
                       ("kv_rope_dim", [0, 2, 3, 6, 4096, 4097, 4098]), ("head_dim", [6, 10]), ("n_heads", [2, 8])]:
        for v in vals:
            cases.append((f"mla_header_{name}_{v}".replace("-", "minus_"), with_field(m, name, v)))
    for name, v in [("kv_latent_dim", 48), ("kv_latent_dim", 16), ("head_dim", 16), ("kv_rope_dim", 8)]:
        cases.append((f"mla_q8_header_{name}_{v}", with_field(m8, name, v)))
    for base, raw in [("mla", m), ("mla_q8", m8)]:  # rope_pairs: int32 pair indices of a head
        h = header_of(raw)
        layout = [(n, off) for n, _s, off, _b in testlib.tensor_layout(h) if n.endswith("rope_pairs")]
        name, off = layout[-1]
        for j, v in [(0, -1), (0, h["head_dim"] // 2), (h["kv_rope_dim"] // 2 - 1, INT_MAX), (0, INT_MIN)]:
            cases.append((f"{base}_{name}_{j}_set_to_{v}".replace("-", "minus_"), put(raw, off + 4 * j, "<i", v)))
        cases.append((f"{base}_{name}_last_pair_loads", put(raw, off, "<i", h["head_dim"] // 2 - 1)))
    return cases


def token_offsets(raw):
    """Offsets of each token entry (score, flags, len, bytes) in the file."""
    h = header_of(raw)
    p, n = h["tokenizer_offset"] + 8, struct.unpack_from("<I", raw, h["tokenizer_offset"])[0]
    out = []
    for _ in range(n):
        out.append(p)
        p += 12 + struct.unpack_from("<I", raw, p + 8)[0]
    return out


def put(raw, off, fmt, *values):
    out = bytearray(raw)
    struct.pack_into(fmt, out, off, *values)
    return bytes(out)


def tokenizer_cases():
    for base in ("f32", "l2c"):
        raw = BASES[base]
        h = header_of(raw)
        to, tb = h["tokenizer_offset"], h["tokenizer_bytes"]
        n = struct.unpack_from("<I", raw, to)[0]
        toks = token_offsets(raw)
        cases = [("n_tokens_zero", put(raw, to, "<I", 0)), ("n_tokens_huge", put(raw, to, "<I", 0xFFFFFFFF)),
                 ("n_tokens_minus_one", put(raw, to, "<I", n - 1)), ("n_tokens_plus_one", put(raw, to, "<I", n + 1)),
                 ("max_token_bytes_zero", put(raw, to + 4, "<I", 0)),
                 ("first_len_huge", put(raw, toks[0] + 8, "<I", 0xFFFFFFFF)),
                 ("last_len_past_end", put(raw, toks[-1] + 8, "<I", tb)),
                 ("last_len_short", put(raw, toks[-1] + 8, "<I", max(0, struct.unpack_from("<I", raw, toks[-1] + 8)[0] - 1))),
                 ("score_nan", put(raw, toks[10], "<f", math.nan)),
                 ("score_minus_inf_everywhere", b"".join([raw[:toks[0]]] + [
                     struct.pack("<f", -math.inf) + raw[t + 4:u] for t, u in zip(toks, toks[1:] + [to + tb])]) + raw[to + tb:]),
                 ("token_marked_special", put(raw, toks[100] + 4, "<I", 1))]
        if base == "f32":  # the byte tokens are ids 0..255, one byte each
            cases += [("byte_token_A_missing", put(raw, toks[0x41] + 12, "B", 0x42)),
                      ("byte_token_FF_special", put(raw, toks[0xFF] + 4, "<I", 1))]
        else:  # "<0x00>" .. "<0xFF>" are ids 3..258
            cases += [("byte_token_41_missing", put(raw, toks[3 + 0x41] + 12 + 4, "B", ord("G"))),
                      ("byte_token_00_special", put(raw, toks[3] + 4, "<I", 1))]
        for name, data in cases:
            run_case(f"tokenizer_{base}_{name}", data)


# ----------------------------------------------------------------------------
# Non-finite numbers: the loader checks every f32 value and float16 scale


FIX = "the file is damaged; re-export or re-download it"
F32_BITS = {"nan": 0x7FC00000, "inf": 0x7F800000, "-inf": 0xFF800000}
F16_BITS = {"nan": 0x7E00, "inf": 0x7C00, "-inf": 0xFC00}


def tensor_at(raw, name):
    h = header_of(raw)
    return next((shape, off, testlib.tensor_dtype(h, name)) for n, shape, off, _ in testlib.tensor_layout(h) if n == name)


def where(name):
    if name.startswith("layers."):
        _, layer, tensor = name.split(".")
        return f"layer {layer} {tensor}"
    return name


def with_f32(raw, name, index, kind):
    """raw with element `index` (flat) of f32 tensor `name` set to NaN/Inf; and the error it must give."""
    shape, off, _ = tensor_at(raw, name)
    at = (f"element {index}" if len(shape) == 1 else f"row {index // shape[1]}, column {index % shape[1]}")
    return (put(raw, off + 4 * index, "<I", F32_BITS[kind]),
            f"error: {{path}}: non-finite weight {kind} in {where(name)}, {at}; {FIX}")


def with_q8_scale(raw, name, row, group, kind):
    """raw with the float16 scale of group `group` of row `row` of q8_0 or q4_0 matrix `name` set to NaN/Inf."""
    (rows, cols), off, dtype = tensor_at(raw, name)
    return (put(raw, scale_offset(off, cols, dtype, row, group), "<H", F16_BITS[kind]),
            f"error: {{path}}: non-finite {DTYPE_NAMES[dtype]} scale {kind} in {where(name)}, row {row}, group {group}; {FIX}")


def nonfinite_cases():
    f32, q8 = BASES["f32"], BASES["q8"]
    cases = [("f32_matrix_wq_nan", with_f32(f32, "layers.0.wq", 2 * 32 + 5, "nan")),
             ("f32_matrix_w2_inf", with_f32(f32, "layers.1.w2", 31 * 32 + 31, "inf")),
             ("f32_embedding_minus_inf", with_f32(f32, "token_embedding", 260 * 32 + 7, "-inf")),
             ("f32_norm_attn_nan", with_f32(f32, "layers.1.attn_norm", 3, "nan")),
             ("f32_norm_final_inf", with_f32(f32, "final_norm", 31, "inf")),
             ("q8_norm_ffn_nan", with_f32(q8, "layers.0.ffn_norm", 0, "nan")),
             ("q8_scale_w1_nan", with_q8_scale(q8, "layers.0.w1", 63, 0, "nan")),
             ("q8_scale_w2_inf", with_q8_scale(q8, "layers.0.w2", 5, 1, "inf")),
             ("q8_scale_classifier_minus_inf", with_q8_scale(q8, "classifier", 260, 0, "-inf")),
             ("q8_scale_embedding_inf", with_q8_scale(q8, "token_embedding", 0, 0, "inf")),
             ("mla_wq_rope_nan", with_f32(BASES["mla"], "layers.0.wq_rope", 17, "nan")),
             ("mla_wkv_a_inf", with_f32(BASES["mla"], "layers.1.wkv_a", 15 * 32 + 3, "inf")),
             ("mla_wk_b_minus_inf", with_f32(BASES["mla"], "layers.1.wk_b", 47 * 8 + 7, "-inf")),
             ("mla_q8_scale_wk_b_nan", with_q8_scale(BASES["mla_q8"], "layers.0.wk_b", 63, 0, "nan")),
             ("mla_q8_scale_wv_b_inf", with_q8_scale(BASES["mla_q8"], "layers.0.wv_b", 0, 0, "inf")),
             ("q4_scale_w2_short_group_nan", with_q8_scale(BASES["q4"], "layers.0.w2", 39, 1, "nan")),
             ("q4_scale_w1_inf", with_q8_scale(BASES["q4"], "layers.0.w1", 43, 0, "inf")),
             ("q4_model_q8_scale_classifier_nan", with_q8_scale(BASES["q4"], "classifier", 100, 1, "nan"))]
    for name, (raw, want) in cases:
        run_case(f"nonfinite_{name}", raw, want.format(path=os.path.join(TMP, f"nonfinite_{name}")))


def overflow_cases():
    """Finite weights whose arithmetic overflows: a clear error at the first non-finite logit, not
    empty output or "perplexity: nan"."""
    raw = BASES["f32"]
    shape, off, _ = tensor_at(raw, "final_norm")
    big = put(raw, off, f"<{shape[0]}f", *[3e38] * shape[0])  # rmsnorm(x) * 3e38 . embedding overflows
    path = os.path.join(TMP, "overflow.bin")
    with open(path, "wb") as f:
        f.write(big)
    for mode in (["-i", "a b", "-n", "4", "-t", "0"], ["-m", "ppl", "-i", "a b c"]):
        r = subprocess.run([testlib.RUN, path, *mode], capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                           env=dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0"))
        lines = r.stderr.decode("utf-8", "replace").splitlines()
        T.check(f"overflowing_weights_{mode[0].strip('-')}_end_with_a_nonfinite_logit_error",
                r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: non-finite logit ")
                and " at position " in lines[0] and b"perplexity" not in r.stdout,
                f"status {r.returncode}, stdout {r.stdout[:200]!r}, stderr {lines[:3]}")
    os.remove(path)


def fuzz_inputs():
    """The loader fuzzer's seeds (valid: they must load and run) and its
    regression inputs (whatever the outcome, the expected one)."""
    for sub in ("corpus_loader", "regressions/loader"):
        d = os.path.join(ROOT, "tests", "fuzz", sub)
        for fname in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, fname), "rb") as f:
                raw = f.read()
            run_case(f"fuzz_{sub.replace('/', '_')}_{fname}", raw)


def self_check():
    """expected_error() must accept the valid bases, or every case above is moot."""
    for base, raw in BASES.items():
        T.check(f"expected_error_accepts_the_valid_{base}_export", expected_error("x", raw) is None,
                expected_error("x", raw))


if not os.access(testlib.RUN, os.X_OK):
    T.fail("malformed_setup", f"{testlib.RUN} is not built")
else:
    T.run("malformed_setup", build_bases)  # a failure prints its FAIL line
    if len(BASES) == 6:
        self_check()
        for fn in (truncation_cases, header_cases, tokenizer_cases, nonfinite_cases, overflow_cases, fuzz_inputs):
            T.run(fn.__name__, fn)
            run_queued()
sys.exit(1 if T.failed else 0)
