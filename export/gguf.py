"""gguf.py - reads GGUF files (llama.cpp's format, versions 2 and 3) for
export.py: the container, its metadata, its tensors dequantized (or, for
Q8_0 / Q4_0, split into integer values and float16 scales for repacking).

The container (llama.cpp docs/gguf.md), all little-endian:
  uint32 magic "GGUF", uint32 version, uint64 tensor_count,
  uint64 metadata_kv_count,
  metadata_kv_count x { string key, uint32 value_type, value },
  tensor_count x { string name, uint32 n_dims, uint64 dims[n_dims],
                   uint32 ggml_type, uint64 offset },
  zero padding up to a multiple of general.alignment (default 32),
  the data section: each tensor at data_start + its offset (a multiple of
  the alignment).
A string is a uint64 length and that many UTF-8 bytes; an array a uint32
element type, a uint64 count and the elements (arrays may nest). dims[0] is
the fastest-varying dimension: a (rows, cols) matrix has dims [cols, rows],
and its rows lie one after the other, each cols / block_size blocks.

Everything is checked before it is used: a length or count is compared with
the bytes left in the file before anything of that size is read or
allocated, so a corrupt file costs neither time nor memory. Any problem
raises GGUFError (a ValueError) with one line saying what is wrong.

Block formats dequantized (ggml-common.h / ggml-quants.c), in float32 with
the operations in llama.cpp's order (a product of two float32 is rounded
before a subtraction: no fused multiply-add):
  Q8_0  (34 bytes / 32 values)  f16 d, int8 q[32]:          x = q * d
  Q4_0  (18 bytes / 32 values)  f16 d, uint8 qs[16]: value j < 16 is the low
        nibble of qs[j], value j + 16 its high nibble:      x = (nibble - 8) * d
  Q4_K (144 bytes / 256 values) f16 d, f16 dmin, uint8 scales[12], uint8 qs[128]:
        8 sub-blocks of 32 with 6-bit scale sc and min m packed in scales[12]
        (sub-block j < 4: sc = scales[j] & 63, m = scales[j + 4] & 63; j >= 4:
        sc = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4,
        m = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4); sub-blocks 2i and
        2i + 1 are the low and high nibbles of qs[32i .. 32i + 31]:
        x = (d * sc) * nibble - (dmin * m)
  Q5_K (176 bytes / 256 values) f16 d, f16 dmin, scales[12], uint8 qh[32],
        uint8 qs[128]: as Q4_K, plus 16 when bit t of qh[l] is set for value l
        of sub-block t
  Q6_K (210 bytes / 256 values) uint8 ql[128], uint8 qh[64], int8 scales[16],
        f16 d: 16 sub-blocks of 16; value e of a half n (128 values) at
        l = e % 32, quarter g = (e % 128) / 32: 4 low bits from
        ql[64n + l + 32 (g & 1)] (low nibble for g < 2, high for g >= 2),
        2 high bits from qh[32n + l] >> 2g:  x = (d * scales[e / 16]) * (q6 - 32)
"""
import array
import mmap
import os
import struct
import sys

np = None  # numpy, imported by the first tensor read

GGUF_MAGIC = 0x46554747  # "GGUF" as a little-endian uint32
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_NESTING = 8          # arrays of arrays: deeper is refused, not recursed into

# Metadata value types: (name, struct code or None for string / array)
VALUE_TYPES = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
               4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
               8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
               12: ("float64", "d")}
MIN_VALUE_BYTES = {8: 8, 9: 12}  # the least bytes one string / array element takes

# ggml types: id -> (name, values per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
              10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
              16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
              22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
              26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
              30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
              39: ("MXFP4", 32, 17)}
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
QUANTIZED = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file: one line, no traceback."""


def need_numpy():
    global np
    if np is None:
        try:
            import numpy
        except ImportError:
            raise GGUFError("numpy is required to read GGUF tensors (apt-get install python3-numpy)") from None
        np = numpy
    return np


# ----------------------------------------------------------------------------
# The container


class _Cursor:
    """Reads the header region front to back, never past the file's end."""

    def __init__(self, mm, size):
        self.mm, self.size, self.pos = mm, size, 0

    def left(self):
        return self.size - self.pos

    def take(self, n, what):
        if n > self.left():
            raise GGUFError(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.left()} left "
                            "(truncated or corrupt file)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code, what):
        n = struct.calcsize("<" + code)
        return struct.unpack_from("<" + code, self.mm, self.take(n, what))[0]

    def string(self, what):
        n = self.scalar("Q", what + " length")
        start = self.take(n, f"{what} ({n} bytes)")
        try:
            return bytes(self.mm[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} at offset {start} is not valid UTF-8 (corrupt file?)") from None

    def value(self, vtype, what, depth=0):
        if vtype not in VALUE_TYPES:
            raise GGUFError(f"{what}: unknown metadata value type {vtype} (corrupt file?)")
        name, code = VALUE_TYPES[vtype]
        if code is not None:
            return self.scalar(code, what)
        if name == "string":
            return self.string(what)
        if depth >= MAX_NESTING:
            raise GGUFError(f"{what}: arrays nested more than {MAX_NESTING} deep (corrupt file?)")
        etype = self.scalar("I", what + " element type")
        count = self.scalar("Q", what + " element count")
        if etype not in VALUE_TYPES:
            raise GGUFError(f"{what}: unknown array element type {etype} (corrupt file?)")
        ename, ecode = VALUE_TYPES[etype]
        least = struct.calcsize("<" + ecode) if ecode else MIN_VALUE_BYTES[etype]
        if count > self.left() // least:  # before allocating anything of that size
            raise GGUFError(f"{what}: array of {count} {ename} values cannot fit in the {self.left()} bytes "
                            "left in the file (truncated or corrupt file)")
        if ecode is not None:  # numbers: as compact as in the file (an array.array, a list for bools)
            start = self.take(count * least, what)
            if ecode == "?":
                return [b != 0 for b in self.mm[start:start + count]]
            values = array.array(ecode)
            if values.itemsize != least:  # a platform whose C types differ: plain Python numbers
                return list(struct.unpack_from(f"<{count}{ecode}", self.mm, start))
            values.frombytes(self.mm[start:start + count * least])
            if sys.byteorder == "big":
                values.byteswap()
            return values
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


class TensorInfo:
    def __init__(self, name, shape, ggml_type, offset, nbytes):
        self.name = name          # as in the file, e.g. "blk.0.attn_q.weight"
        self.shape = shape        # numpy order: (rows, cols) for a matrix, (n,) for a vector
        self.ggml_type = ggml_type
        self.type_name, self.block_values, self.block_bytes = GGML_TYPES[ggml_type]
        self.offset = offset      # absolute, in the file
        self.nbytes = nbytes


class GGUFFile:
    """A GGUF file, mmapped. .version, .metadata {key: value} (arrays of
    numbers as array.array, others as lists), .tensors {name: TensorInfo},
    .alignment, .data_start."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"file is {size} bytes, too short for a GGUF header (24)")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(self.mm, size)
        magic, version = c.scalar("I", "magic"), c.scalar("I", "version")
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (magic {magic:#010x}, expected 'GGUF')")
        if version in (0x02000000, 0x03000000):
            raise GGUFError("a big-endian GGUF file; only little-endian files are supported")
        if version == 1:
            raise GGUFError("GGUF version 1 (2023, 32-bit counts) is not supported; re-convert the model")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version}; this reader knows versions 2 and 3")
        self.version = version
        n_tensors, n_kv = c.scalar("Q", "tensor_count"), c.scalar("Q", "metadata_kv_count")
        # Each key-value pair takes at least 8 + 4 + 1 bytes, each tensor info 8 + 4 + 4 + 8.
        if n_kv > c.left() // 13 or n_tensors > c.left() // 24:
            raise GGUFError(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than the "
                            f"{size}-byte file can hold (truncated or corrupt file)")
        self.metadata = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            vtype = c.scalar("I", f"type of metadata {key!r}")
            if key in self.metadata:
                raise GGUFError(f"metadata key {key!r} appears twice (corrupt file?)")
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) \
                or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"general.alignment {self.alignment!r} is not a power of two")
        infos = [self._tensor_info(c, i) for i in range(n_tensors)]
        self.data_start = (c.pos + self.alignment - 1) // self.alignment * self.alignment
        if infos and self.data_start > size:
            raise GGUFError(f"the data section would start at {self.data_start}, past the end of the "
                            f"{size}-byte file (truncated file)")
        self.tensors = {}
        for name, shape, gtype, offset, nbytes in infos:
            if name in self.tensors:
                raise GGUFError(f"tensor {name!r} appears twice (corrupt file?)")
            if offset % self.alignment:
                raise GGUFError(f"tensor {name!r}: offset {offset} is not a multiple of the alignment "
                                f"{self.alignment} (corrupt file?)")
            if offset > size - self.data_start or nbytes > size - self.data_start - offset:
                raise GGUFError(f"tensor {name!r}: {nbytes} bytes at data offset {offset} run past the end of "
                                f"the file ({size - self.data_start} data bytes; truncated file?)")
            self.tensors[name] = TensorInfo(name, shape, gtype, self.data_start + offset, nbytes)

    def _tensor_info(self, c, i):
        name = c.string(f"name of tensor {i}")
        n_dims = c.scalar("I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r}: {n_dims} dimensions (1 to {MAX_DIMS} allowed; corrupt file?)")
        dims = [c.scalar("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        gtype = c.scalar("I", f"type of tensor {name!r}")
        offset = c.scalar("Q", f"offset of tensor {name!r}")
        if gtype not in GGML_TYPES:
            raise GGUFError(f"tensor {name!r}: unknown ggml type {gtype} (corrupt file, or a newer type)")
        tname, bvalues, bbytes = GGML_TYPES[gtype]
        if dims[0] % bvalues:
            raise GGUFError(f"tensor {name!r}: {dims[0]} values per row is not a multiple of {tname}'s "
                            f"block of {bvalues} (corrupt file?)")
        count = 1
        for d in dims:
            count *= d
        return name, tuple(reversed(dims)), gtype, offset, count // bvalues * bbytes

    # ------------------------------------------------------------------------
    # Tensor data

    def rows_raw(self, t, r0, r1):
        """Rows r0..r1 of tensor t as a uint8 array (r1 - r0, bytes per row)."""
        need_numpy()
        cols = t.shape[-1]
        row_bytes = cols // t.block_values * t.block_bytes
        raw = np.frombuffer(self.mm, dtype=np.uint8, count=(r1 - r0) * row_bytes, offset=t.offset + r0 * row_bytes)
        return raw.reshape(r1 - r0, row_bytes)

    def rows_f32(self, t, r0, r1):
        """Rows r0..r1 of tensor t (a vector is one row) as float32 (r1 - r0, cols)."""
        if t.type_name not in SUPPORTED:
            raise GGUFError(f"tensor {t.name!r} has type {t.type_name}; this exporter reads "
                            f"{', '.join(SUPPORTED)}")
        raw = self.rows_raw(t, r0, r1)
        return dequantize(t.type_name, raw).reshape(r1 - r0, t.shape[-1])


# ----------------------------------------------------------------------------
# Block formats (see the top comment)


def _f16(b):
    """(n, 2) uint8 -> (n, 1) float32 of the little-endian float16 they hold."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def q8_0_parts(raw):
    """Q8_0 bytes (rows, blocks * 34) -> int8 q (rows, blocks * 32), float16 d (rows, blocks)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 34)
    d = np.ascontiguousarray(b[:, :, 0:2]).view("<f2").reshape(rows, -1)
    q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(rows, -1)
    return q, d


def q4_0_parts(raw):
    """Q4_0 bytes (rows, blocks * 18) -> values in [-8, 7] as int8 (rows, blocks * 32)
    in order, float16 d (rows, blocks)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 18)
    d = np.ascontiguousarray(b[:, :, 0:2]).view("<f2").reshape(rows, -1)
    qs = b[:, :, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int8) - np.int8(8)
    return q.reshape(rows, -1), d


def quantized_parts(type_name, raw):
    """Q8_0 / Q4_0 bytes (rows, bytes per row) -> (integer values (rows, cols), float16 scales (rows, cols / 32))."""
    need_numpy()
    return {"Q8_0": q8_0_parts, "Q4_0": q4_0_parts}[type_name](raw)


def _k_scales_mins(sc):
    """Q4_K / Q5_K packed scales (n, 12) -> 6-bit scales (n, 8), mins (n, 8)."""
    lo, hi = sc[:, 0:4], sc[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([sc[:, 4:8] & 63, (hi >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return scales, mins


def _dequantize_k(b, qs, high_bits):
    """Q4_K / Q5_K super-blocks: b (n, bytes), qs (n, 128) nibbles, high_bits
    (n, 8, 32) values 0 or 16 (Q5_K) or None (Q4_K) -> float32 (n, 256)."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scales, mins = _k_scales_mins(b[:, 4:16])
    d_sub = d * scales.astype(np.float32)    # (n, 8), each product rounded to float32
    m_sub = dmin * mins.astype(np.float32)
    pairs = qs.reshape(-1, 4, 1, 32)
    q = np.concatenate([pairs & 0x0F, pairs >> 4], axis=2).reshape(-1, 8, 32)
    if high_bits is not None:
        q = q + high_bits
    y = d_sub[:, :, None] * q.astype(np.float32)
    y -= m_sub[:, :, None]
    return y.reshape(-1, 256)


def _dequantize_q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)    # (n, half, ql[l] / ql[l + 32], l)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(b[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # quarters g = 0..3: (n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).astype(np.float32) - np.float32(32)
    scale = d * sc                             # (n, 16), rounded to float32
    y = np.repeat(scale, 16, axis=1) * q.reshape(-1, 256)
    return y


def dequantize(type_name, raw):
    """Bytes of whole blocks (any leading shape) -> float32 values, flat. A
    scale that is inf or NaN gives what llama.cpp's arithmetic gives (inf,
    NaN), silently: the exporter's quantizer or the engine's loader refuses
    those numbers with a message naming the tensor."""
    need_numpy()
    with np.errstate(all="ignore"):
        return _dequantize(type_name, raw)


def _dequantize(type_name, raw):
    raw = np.ascontiguousarray(raw).reshape(-1)
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if type_name == "Q8_0":
        q, d = q8_0_parts(raw.reshape(1, -1))
        return (q.reshape(-1, 32).astype(np.float32) * d.reshape(-1, 1).astype(np.float32)).reshape(-1)
    if type_name == "Q4_0":
        q, d = q4_0_parts(raw.reshape(1, -1))
        return (q.reshape(-1, 32).astype(np.float32) * d.reshape(-1, 1).astype(np.float32)).reshape(-1)
    if type_name == "Q4_K":
        b = raw.reshape(-1, 144)
        return _dequantize_k(b, b[:, 16:144], None).reshape(-1)
    if type_name == "Q5_K":
        b = raw.reshape(-1, 176)
        qh = b[:, 16:48].reshape(-1, 1, 32)
        bits = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        high = ((qh >> bits) & 1) * np.uint8(16)  # (n, 8, 32): bit t of qh[l] for sub-block t
        return _dequantize_k(b, b[:, 48:176], high).reshape(-1)
    if type_name == "Q6_K":
        return _dequantize_q6_k(raw.reshape(-1, 210)).reshape(-1)
    raise GGUFError(f"type {type_name} cannot be dequantized; supported: {', '.join(SUPPORTED)}")


# ----------------------------------------------------------------------------
# Metadata helpers


def get(meta, key, kind, default=None, required=False):
    """meta[key] checked to be of `kind` ("int", "float", "str", "list");
    default when absent (or an error when required)."""
    if key not in meta:
        if required:
            raise GGUFError(f"metadata {key} is missing")
        return default
    v = meta[key]
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": isinstance(v, str), "list": isinstance(v, (list, array.array)),
          "bool": isinstance(v, bool)}[kind]
    if not ok:
        raise GGUFError(f"metadata {key} is {v!r:.60}, expected a {kind}")
    return float(v) if kind == "float" else v
