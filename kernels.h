/* kernels.h - the arithmetic under run.c: every loop that touches a vector.

   Included once, by run.c (and by the tests through it): all functions are
   static, so the compiler inlines them into the forward pass. Each kernel
   has one definition for every vector width -- GCC vector extensions sized
   by the build's -march (AVX-512, AVX2 or NEON/SSE), with intrinsics only
   where integer dot products need them -- and the scalar references
   (marked REFERENCE) that tests/test_engine.c checks the kernels against.

   In order: the vector type; f32 dot products; float16 conversions; the KV
   cache's element types (f32, f16, q8_0: storing a row, reading it back) and
   the attention kernels that read them (scores against a transposed key tile,
   weighted sums of value rows); rmsnorm, exp,
   softmax, SwiGLU; the GEMM register tile of prefill; the q8_0 and q4_0
   formats (quantization) and their integer dot products (AVX-512 VNNI,
   AVX2, Arm NEON sdot). */

#ifndef KERNELS_H
#define KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// The vector width of this build: 64 bytes with AVX-512, 32 with AVX, else 16
// (SSE, NEON, or plain scalar code the compiler maps onto 4-wide registers).
#if defined(__AVX512F__)
#define VEC_BYTES 64
#elif defined(__AVX__)
#define VEC_BYTES 32
#else
#define VEC_BYTES 16
#endif
#define VEC_LEN (VEC_BYTES / 4)
typedef float vfloat __attribute__((vector_size(VEC_BYTES), aligned(4)));

// Scalar references, in the order of the math: the SIMD kernels are tested
// against them (tests/test_engine.c), and they document what the kernels compute.
#define REFERENCE __attribute__((unused))

static REFERENCE float dot_scalar(const float *a, const float *b, int n) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Sum of a vector's lanes: add its 4-lane quarters as vectors, then 4 scalars.
typedef float vfloat4 __attribute__((vector_size(16), aligned(4)));
static float vsum(vfloat v) {
    vfloat4 s = {0};
    for (int i = 0; i < VEC_LEN; i += 4) {
        vfloat4 part;
        memcpy(&part, (const float *)&v + i, sizeof part);
        s += part;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}

// f in every lane. (f - 0 is f exactly, even for -0, so compilers emit one broadcast.)
static inline vfloat vbroadcast(float f) { return f - (vfloat){0}; }

// Pins a loaded vector in a register: otherwise compilers fold the load into
// each multiply-add that uses it, reading the same value several times.
#if defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

// Decode reads each weight row once, front to back, and the hardware
// prefetchers follow such a stream only within a 4 KiB page: at every page
// boundary they start over, and the cores wait for memory. So the decode
// kernels also ask, for each cache line they load, for the line
// PREFETCH_AHEAD bytes further on (Xeon, 2 threads, into L1: f32 decode 5.6
// -> 6.2 tok/s, q8_0 19.5 -> 20.9; 4096 bytes ahead was slower than none:
// the line then falls in the L1 set of the one being loaded).
// PREFETCH_STREAM(p, light): into L2 when the kernel does little arithmetic
// per byte (`light`: f32 numbers; q8_0 weights on AVX-512 VNNI), else into
// L1. A light kernel reads faster than the L1's few slots for misses in
// flight allow, and a prefetch into L1 that waits for one holds up the loads
// behind it; a kernel with more arithmetic per byte waits on its loads'
// latency instead, and gains from finding them in L1. On the AMD EPYC VM,
// one thread, from memory: a 2048-wide q8_0 row 87-91 ns into L2, 98-101 ns
// into L1, 90-93 ns with none (f32: 292 / 330-430 / 318 ns); whole decode,
// into L2 rather than L1: q8_0 +19 %, f32 +11 %, but the AVX2 build's q8_0
// (maddubs) 27 % slower and q4_0's matrices 10-25 % slower; one MHA layer's
// attention at depth 4000 (bench/attention): f32 cache 1.9-2.2 ms against
// 2.5-2.6, f16 1.5 against 1.2-1.25, q8_0 1.2 against 1.0.
// One stream asks for nothing: q4_0's rows on AVX-512 VNNI, whose file
// sits in 2 MiB pages (README: Memory). Its prefetches into L1 held its
// loads up, and into L2 lost too: whole decode of a 1B q4_0 file, A/B of
// alternating runs, none against L1: one thread 35.8 against 33.5 tok/s,
// two threads 66-68 against 60-61 when the host gave ~60 GB/s, equal
// (41 tok/s) at ~35 GB/s; into L2: 33.1 (one thread).
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 3072
#endif
#if defined(__SSE__)
#define PREFETCH_L1(p) _mm_prefetch((const char *)(p), _MM_HINT_T0) // GCC drops __builtin_prefetch under some -march=native
#define PREFETCH_L2(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#else
#define PREFETCH_L1(p) __builtin_prefetch((p), 0, 3)
#define PREFETCH_L2(p) __builtin_prefetch((p), 0, 2)
#endif
#define PREFETCH_STREAM(p, light) do { if (light) PREFETCH_L2(p); else PREFETCH_L1(p); } while (0)

// Dot product with eight vector accumulators: independent multiply-add
// chains hide the FMA latency (four would do that), and eight vectors per
// step keep more loads in flight (f32 decode, which is all dot products,
// measured 2 % faster than with four). The summation order differs from
// dot_scalar, so results agree to rounding. a: a weight row, read ahead.
static float dot(const float *a, const float *b, int n) {
    vfloat acc[8] = {0};
    int i = 0;
    for (; i + 8 * VEC_LEN <= n; i += 8 * VEC_LEN)
        for (int j = 0; j < 8; j++) {
            if (j % (64 / VEC_BYTES) == 0) PREFETCH_STREAM((const char *)(a + i + j * VEC_LEN) + PREFETCH_AHEAD, 1);
            acc[j] += *(const vfloat *)(a + i + j * VEC_LEN) * *(const vfloat *)(b + i + j * VEC_LEN);
        }
    for (; i + VEC_LEN <= n; i += VEC_LEN) acc[0] += *(const vfloat *)(a + i) * *(const vfloat *)(b + i);
    float sum = vsum(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// IEEE float16 (the scales of q8_0 weights, the numbers of an f16 or q8_0
// KV cache) to float32, exactly.
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, em = h & 0x7fff, bits;
    if (em < 0x400) { float v = em * 0x1p-24f; return sign ? -v : v; } // zero, subnormal: em x 2^-24
    if (em < 0x7c00) bits = sign | (em + ((127 - 15) << 10)) << 13;     // normal: the exponent rebiased
    else bits = sign | 0x7f800000 | (em & 0x3ff) << 13;                  // inf, NaN
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// float32 to the nearest float16 (ties to even), as numpy's astype(float16).
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = x >> 16 & 0x8000, ax = x & 0x7fffffff;
    if (ax > 0x7f800000) return (uint16_t)(sign | 0x7e00);                  // NaN
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);                 // >= 65520: inf
    if (ax < 0x38800000) return (uint16_t)(sign | (uint32_t)rintf(fabsf(f) * 0x1p24f)); // < 2^-14: steps of 2^-24
    uint32_t r = ax + 0xfff + (ax >> 13 & 1); // drop 13 mantissa bits, to nearest even (a carry bumps the exponent)
    return (uint16_t)(sign | ((r >> 13) - ((127 - 15) << 10)));
}

// The KV cache's element type (--kv-type): how each cached number is stored.
//   KV_F32   float32: exact, 4 bytes a number (the default)
//   KV_F16   IEEE float16, rounded to nearest even: 2 bytes
//   KV_Q8_0  groups of KV_GROUP consecutive numbers of a row (a position's
//            key or value in one head) share one float16 scale, value = q x
//            scale, q an int8 in [-127, 127], as q8_0 weights (model.h): a
//            row of width numbers is its width int8 values, then its
//            ceil(width / KV_GROUP) scales; a width that is not a multiple of
//            32 (the tiny models' head_dim 8 and 16) ends in a short group.
//            34 bytes per 32 numbers.
// A row is stored by kv_store and read back, converted to float32, by the
// attention kernels below (kv_load, with F16C / AVX-512 conversions where the
// build has them); kv_number is the scalar reference they are tested against.
// The type is a property of one cache and the kernels that read it -- any
// width, whatever attention kind fills it.
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8_0 = 2 };
#define KV_GROUP 32

static inline size_t kv_number_bytes(int type) { return type == KV_F32 ? 4 : type == KV_F16 ? 2 : 1; }

// Bytes of one row of `width` numbers (scales included).
static inline size_t kv_row_bytes(int type, int width) {
    return (size_t)width * kv_number_bytes(type) + (type == KV_Q8_0 ? (size_t)(width + KV_GROUP - 1) / KV_GROUP * 2 : 0);
}

// A row's numbers lie `stride` slots apart from `base` (1 for a plain row;
// VEC_LEN in a key tile, where VEC_LEN rows are interleaved, row `lane` in
// slot lane): number d in slot d * stride + lane, and for q8_0 the scale of
// group j in slot j * stride + lane of the float16 array after all the values.
static inline size_t kv_slot(size_t stride, int lane, int d) { return (size_t)d * stride + lane; }
static inline const uint8_t *kv_scales(const uint8_t *base, size_t stride, int width) { return base + (size_t)width * stride; }

// VEC_LEN float16 at p, converted: one instruction with AVX-512, F16C or NEON.
static inline vfloat f16_vec(const uint8_t *p) {
#if VEC_BYTES == 64
    return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif VEC_BYTES == 32 && defined(__F16C__)
    return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#elif VEC_BYTES == 16 && defined(__F16C__)
    return (vfloat)_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
#elif VEC_BYTES == 16 && defined(__ARM_NEON) && defined(__aarch64__)
    return (vfloat)vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p)));
#else
    vfloat v;
    for (int j = 0; j < VEC_LEN; j++) { uint16_t h; memcpy(&h, p + 2 * j, 2); v[j] = f16_to_f32(h); }
    return v;
#endif
}

// VEC_LEN int8 at p as float32: sign-extend, convert (GCC's
// __builtin_convertvector does this one lane at a time, 6x slower in attention).
static inline vfloat i8_vec(const uint8_t *p) {
#if VEC_BYTES == 64
    return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif VEC_BYTES == 32 && defined(__AVX2__)
    return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif VEC_BYTES == 16 && defined(__SSE2__)
    int32_t w;
    memcpy(&w, p, 4);
    __m128i b = _mm_cvtsi32_si128(w);
    b = _mm_unpacklo_epi16(_mm_unpacklo_epi8(b, b), _mm_unpacklo_epi8(b, b)); // each byte in the top of a lane
    return (vfloat)_mm_cvtepi32_ps(_mm_srai_epi32(b, 24));
#elif VEC_BYTES == 16 && defined(__ARM_NEON) && defined(__aarch64__)
    int32_t w;
    memcpy(&w, p, 4);
    int16x4_t h = vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)))); // 4 bytes widened twice
    return (vfloat)vcvtq_f32_s32(vmovl_s16(h));
#else
    vfloat v;
    for (int j = 0; j < VEC_LEN; j++) v[j] = (int8_t)p[j];
    return v;
#endif
}

// One float16 at p, converted (F16C: one instruction).
static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
#else
    return f16_to_f32(h);
#endif
}

// Stores x (width) as row `lane` of base. f16: x rounded to the nearest
// float16, saturating at +-65504 (not inf). q8_0: scale = max|x| / 127 of each
// group rounded to float16 (at most 65504), q = round(x / scale) to nearest
// even, clamped to [-127, 127] (0 when the scale is 0, or x is NaN), as
// export.py quantizes weights. A group whose max|x| is below ~2^-7 gets a
// subnormal scale, below ~2^-18 a zero one: such numbers are noise next to the
// rest of a key or value.
static void kv_store(uint8_t *base, size_t stride, int lane, const float *x, int width, int type) {
    for (int d0 = 0; d0 < width; d0 += KV_GROUP) {
        const int d1 = d0 + KV_GROUP < width ? d0 + KV_GROUP : width;
        float scale = 0;
        if (type == KV_Q8_0) {
            float amax = 0;
            for (int d = d0; d < d1; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
            uint16_t h = f32_to_f16(amax / 127.0f < 65504.0f ? amax / 127.0f : 65504.0f); // (NaN: a NaN scale)
            memcpy((uint8_t *)kv_scales(base, stride, width) + 2 * kv_slot(stride, lane, d0 / KV_GROUP), &h, 2);
            scale = f16_to_f32(h);
        }
        for (int d = d0; d < d1; d++) {
            const size_t i = kv_slot(stride, lane, d);
            if (type == KV_F32) memcpy(base + 4 * i, &x[d], 4);
            else if (type == KV_F16) {
                uint16_t h = f32_to_f16(x[d] > 65504.0f ? 65504.0f : x[d] < -65504.0f ? -65504.0f : x[d]);
                memcpy(base + 2 * i, &h, 2);
            }
            else {
                float q = scale > 0 ? rintf(x[d] / scale) : 0;
                q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                base[i] = (uint8_t)(int8_t)(q == q ? (int)q : 0);
            }
        }
    }
}

// Number d of row `lane` of base as float32: the scalar reference of the
// kernels' reads (f16_at is held to f16_to_f32 for every float16 by the tests).
static REFERENCE float kv_number(const uint8_t *base, size_t stride, int lane, int d, int width, int type) {
    const size_t i = kv_slot(stride, lane, d);
    float f;
    if (type == KV_F32) { memcpy(&f, base + 4 * i, 4); return f; }
    if (type == KV_F16) return f16_at(base + 2 * i);
    return (int8_t)base[i] * f16_at(kv_scales(base, stride, width) + 2 * kv_slot(stride, lane, d / KV_GROUP));
}

// VEC_LEN consecutive numbers from slot i of base as float32; q8_0: the int8
// values times s, the VEC_LEN scales that go with them (a product of an int8
// and a float16 is exact in float32). Every number comes out exactly as
// kv_number gives it, so the kernels below compute on an f16 or q8_0 cache
// bit for bit what they compute on an f32 cache holding the same numbers.
static inline vfloat kv_load(const uint8_t *base, size_t i, int type, vfloat s) {
    if (type == KV_F16) return f16_vec(base + 2 * i);
    if (type == KV_Q8_0) return i8_vec(base + i) * s;
    vfloat v;
    memcpy(&v, base + 4 * i, sizeof v);
    return v;
}

// The scale of number d of a value row, in every lane (q8_0; 1 otherwise).
static inline vfloat row_scale(const uint8_t *row, int d, int hd, int type) {
    return vbroadcast(type == KV_Q8_0 ? f16_at(kv_scales(row, 1, hd) + 2 * (d / KV_GROUP)) : 1.0f);
}

// Attention handles up to ATT_HEADS query heads of a group at once, so
// that they share each load of a key or value row (the registers hold
// their 4 x ATT_HEADS accumulators: 32 with AVX-512, 16 with AVX2/NEON).
#define ATT_HEADS (VEC_BYTES == 64 ? 4 : 2)

// out_h (hd) += sum over p < n of a_h[p] * v_p for nh <= ATT_HEADS heads h,
// out_h = out + h * hd, a_h = a + h * a_stride, v_p the value row p (hd
// numbers of the cache type, kv_row_bytes apart from v): the rows weighted
// and summed, with four vector accumulators per head (independent
// multiply-add chains) held in registers across all n rows. A head's sums
// run in the same order whatever nh is. (Inlined by force: callers pass nh
// and type as constants, so the loops over heads unroll and the type's
// branches go.)
static inline __attribute__((always_inline)) void weighted_sum(float *out, const float *a, size_t a_stride,
                                                               const uint8_t *v, int n, int hd, int nh, int type) {
    const size_t rb = kv_row_bytes(type, hd), nb = kv_number_bytes(type);
    int d = 0;
    for (; d + 4 * VEC_LEN <= hd; d += 4 * VEC_LEN) {
        vfloat acc[ATT_HEADS][4];
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < 4; i++) acc[h][i] = *(vfloat *)(out + h * hd + d + i * VEC_LEN);
        for (int p = 0; p < n; p++) {
            const uint8_t *row = v + (size_t)p * rb;
            vfloat x[4];
            for (int i = 0; i < 4; i++) {
                if (i * VEC_LEN * nb % 64 == 0) PREFETCH_STREAM(row + (d + i * VEC_LEN) * nb + PREFETCH_AHEAD, type == KV_F32);
                x[i] = kv_load(row, d + i * VEC_LEN, type, row_scale(row, d + i * VEC_LEN, hd, type));
                IN_REGISTER(x[i]);
            }
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < 4; i++) acc[h][i] += a[h * a_stride + p] * x[i];
        }
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < 4; i++) *(vfloat *)(out + h * hd + d + i * VEC_LEN) = acc[h][i];
    }
    for (int h = 0; h < nh; h++) {
        int e = d;
        for (; e + VEC_LEN <= hd; e += VEC_LEN) {
            vfloat acc = *(vfloat *)(out + h * hd + e);
            for (int p = 0; p < n; p++) {
                const uint8_t *row = v + (size_t)p * rb;
                acc += a[h * a_stride + p] * kv_load(row, e, type, row_scale(row, e, hd, type));
            }
            *(vfloat *)(out + h * hd + e) = acc;
        }
        if (e == hd) continue;
        vfloat acc = {0}; // the last hd - e < VEC_LEN numbers, in zero-padded vectors: the same
        for (int i = e; i < hd; i++) acc[i - e] = out[h * hd + i]; // vector arithmetic for every type
        for (int p = 0; p < n; p++) {
            vfloat x = {0};
            for (int i = e; i < hd; i++) x[i - e] = kv_number(v + (size_t)p * rb, 1, 0, i, hd, type);
            acc += a[h * a_stride + p] * x;
        }
        for (int i = e; i < hd; i++) out[h * hd + i] = acc[i - e];
    }
}

// Its scalar reference, for one head: out (hd) += sum over p < n of a[p] * v_p.
static REFERENCE void weighted_sum_scalar(float *out, const float *a, const uint8_t *v, int n, int hd, int type) {
    for (int p = 0; p < n; p++)
        for (int d = 0; d < hd; d++) out[d] += a[p] * kv_number(v + (size_t)p * kv_row_bytes(type, hd), 1, 0, d, hd, type);
}

// att_h[i] = q_h . k_(p+i) * scale for the VEC_LEN positions of one key
// tile and nh <= ATT_HEADS query heads h, q_h = q + h * hd, att_h = att + h
// * att_stride. A tile holds VEC_LEN key rows transposed, (hd, VEC_LEN)
// numbers (and for q8_0 then their scales, (groups, VEC_LEN)), so each
// vector load holds number d of all VEC_LEN keys: each is loaded once for all
// nh heads, and no score needs a horizontal sum. Four multiply-add chains
// per head (numbers d = 0, 1, 2, 3 mod 4) hide their latency; a head's sums
// run in the same order whatever nh is. (q8_0 walks the tile group by group
// for the groups' VEC_LEN scales; groups of 32 keep the chains' order.)
static inline __attribute__((always_inline)) void tile_scores(float *att, size_t att_stride, const float *q,
                                                              const uint8_t *tile, int hd, float scale, int nh, int type) {
    const int group = type == KV_Q8_0 ? KV_GROUP : hd; // f32, f16: one group, no scale
    const size_t nb = kv_number_bytes(type);
    vfloat acc[ATT_HEADS][4];
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < 4; i++) acc[h][i] = (vfloat){0};
    for (int d0 = 0; d0 < hd; d0 += group) {
        const int d1 = d0 + group < hd ? d0 + group : hd;
        const vfloat s = type == KV_Q8_0 ? f16_vec(kv_scales(tile, VEC_LEN, hd) + 2 * (size_t)(d0 / KV_GROUP) * VEC_LEN)
                                         : vbroadcast(1.0f);
        int d = d0;
        for (; d + 4 <= d1; d += 4)
            for (int i = 0; i < 4; i++) {
                if ((d + i) * VEC_LEN * nb % 64 == 0) PREFETCH_STREAM(tile + (size_t)(d + i) * VEC_LEN * nb + PREFETCH_AHEAD, type == KV_F32);
                vfloat k = kv_load(tile, (size_t)(d + i) * VEC_LEN, type, s);
                IN_REGISTER(k);
                for (int h = 0; h < nh; h++) acc[h][i] += q[h * hd + d + i] * k;
            }
        for (; d < d1; d++)
            for (int h = 0; h < nh; h++) acc[h][0] += q[h * hd + d] * kv_load(tile, (size_t)d * VEC_LEN, type, s);
    }
    for (int h = 0; h < nh; h++) *(vfloat *)(att + h * att_stride) = ((acc[h][0] + acc[h][1]) + (acc[h][2] + acc[h][3])) * scale;
}

// A key tile (tiled) or n value rows of any type as float32, in an f32
// cache's layout: tile_scores and weighted_sum with type KV_F32 give the same
// bits on it as with the cache's type on the cache. (For groups of many query
// heads, which would convert each number once per pass of ATT_HEADS heads.)
static void kv_to_f32(float *out, const uint8_t *base, int n, int hd, int type, int tiled) {
    if (tiled) {
        for (int d = 0; d < hd; d++) {
            vfloat s = type == KV_Q8_0 ? f16_vec(kv_scales(base, VEC_LEN, hd) + 2 * (size_t)(d / KV_GROUP) * VEC_LEN)
                                       : vbroadcast(1.0f);
            vfloat k = kv_load(base, (size_t)d * VEC_LEN, type, s);
            memcpy(out + (size_t)d * VEC_LEN, &k, sizeof k);
        }
        return;
    }
    const size_t rb = kv_row_bytes(type, hd);
    for (int r = 0; r < n; r++) {
        const uint8_t *row = base + (size_t)r * rb;
        int d = 0;
        for (; d + VEC_LEN <= hd; d += VEC_LEN) {
            vfloat x = kv_load(row, d, type, row_scale(row, d, hd, type));
            memcpy(out + (size_t)r * hd + d, &x, sizeof x);
        }
        for (; d < hd; d++) out[(size_t)r * hd + d] = kv_number(row, 1, 0, d, hd, type);
    }
}

// Its scalar reference, for one head: att[i] = q . k_i * scale, k_i row i of the tile.
static REFERENCE void tile_scores_scalar(float *att, const float *q, const uint8_t *tile, int hd, float scale, int type) {
    for (int i = 0; i < VEC_LEN; i++) {
        float sum = 0;
        for (int d = 0; d < hd; d++) sum += q[d] * kv_number(tile, VEC_LEN, i, d, hd, type);
        att[i] = sum * scale;
    }
}

// att_h[p] += q_h . row_p * scale for n positions whose keys are stored as
// rows (n, width), and nh <= ATT_HEADS query heads h, q_h = q + h * width,
// att_h = att + h * att_stride: MLA's latent keys, which are its value rows
// too (run.c, attention_task). A register tile of up to 4 positions x nh
// heads: each vector of a row is loaded once for the nh heads, each of a
// query once for the 4 positions (4 x ATT_HEADS accumulators, as
// tile_scores); one horizontal sum per (position, head), next to width /
// VEC_LEN multiply-adds (32 or 64 at MLA's 512). A score's sum runs in the
// same order whatever nh and the positions beside it.
static inline __attribute__((always_inline)) void row_scores_tile(float *att, size_t att_stride, const float *q,
                                                                  const float *r, int width, float scale, int nh, int np) {
    vfloat acc[ATT_HEADS][4];
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < np; i++) acc[h][i] = (vfloat){0};
    int d = 0;
    for (; d + VEC_LEN <= width; d += VEC_LEN) {
        vfloat row[4];
        for (int i = 0; i < np; i++) {
            row[i] = *(const vfloat *)(r + (size_t)i * width + d);
            IN_REGISTER(row[i]);
        }
        for (int h = 0; h < nh; h++) {
            vfloat qv = *(const vfloat *)(q + h * width + d);
            IN_REGISTER(qv);
            for (int i = 0; i < np; i++) acc[h][i] += qv * row[i];
        }
    }
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < np; i++) {
            float sum = vsum(acc[h][i]);
            for (int e = d; e < width; e++) sum += q[h * width + e] * r[(size_t)i * width + e];
            att[h * att_stride + i] += sum * scale;
        }
}

static inline __attribute__((always_inline)) void row_scores(float *att, size_t att_stride, const float *q,
                                                             const float *rows, int n, int width, float scale, int nh) {
    int p = 0;
    for (; p + 4 <= n; p += 4) row_scores_tile(att + p, att_stride, q, rows + (size_t)p * width, width, scale, nh, 4);
    for (; p < n; p++) row_scores_tile(att + p, att_stride, q, rows + (size_t)p * width, width, scale, nh, 1);
}

static REFERENCE void row_scores_scalar(float *att, size_t att_stride, const float *q, const float *rows, int n,
                                        int width, float scale, int nh) {
    for (int h = 0; h < nh; h++)
        for (int p = 0; p < n; p++) att[h * att_stride + p] += dot_scalar(q + h * width, rows + (size_t)p * width, width) * scale;
}

// RMSNorm: out = x / sqrt(mean(x^2) + eps) * weight
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    double ss = 0; // in double: for wide models the mean of squares loses digits in float
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

// e^x for every lane, to about 1 ulp (tests/test_engine.c checks it against
// expf): e^x = 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2)/2, e^r by
// its Taylor polynomial to degree 7. Attention takes one exponential per
// (query head, position), a million per token at depth 2000 with 32 heads:
// a libm call each would cost as much as reading the cache.
typedef int32_t vint __attribute__((vector_size(VEC_BYTES), aligned(4)));
static inline vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)((mask & (vint)a) | (~mask & (vint)b)); }
static vfloat vexp(vfloat x) {
    const float round_magic = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
    x = vselect(x < -87.0f, vbroadcast(-87.0f), x); // e^-87: near the smallest normal float
    x = vselect(x > 88.0f, vbroadcast(88.0f), x);   // e^88: near the largest
    vfloat t = x * 1.44269504f + round_magic;
    vfloat n = t - round_magic;
    vfloat r = x - n * 0.693145752f - n * 1.42860677e-6f; // ln 2 in two parts: n * hi is exact
    vfloat p = 1.0f / 5040 + r * 0.0f;
    p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    vint two_n = ((vint)t - (vint)vbroadcast(round_magic) + 127) << 23; // 2^n as float bits
    return p * (vfloat)two_n;
}

static void softmax(float *x, int n) {
    // the max (exp's arguments <= 0), lane by lane first: a scalar max is one
    // long chain of dependent compares (it was a fifth of attention's time at depth 4000)
    vfloat max_v = vbroadcast(x[0]);
    int i = 0;
    for (; i + VEC_LEN <= n; i += VEC_LEN) {
        vfloat v = *(const vfloat *)(x + i);
        max_v = vselect(v > max_v, v, max_v);
    }
    float max = max_v[0];
    for (int j = 1; j < VEC_LEN; j++) max = max_v[j] > max ? max_v[j] : max;
    for (; i < n; i++) max = x[i] > max ? x[i] : max;
    vfloat sum_v = {0};
    i = 0;
    for (; i + VEC_LEN <= n; i += VEC_LEN) {
        vfloat e = vexp(*(vfloat *)(x + i) - max);
        *(vfloat *)(x + i) = e;
        sum_v += e;
    }
    float sum = vsum(sum_v);
    if (i < n) { // the last n % VEC_LEN, through a zero-padded vector
        vfloat tail = vbroadcast(-INFINITY);
        memcpy(&tail, x + i, (n - i) * sizeof(float));
        vfloat e = vexp(tail - max);
        for (int j = 0; j < n - i; j++) { x[i + j] = e[j]; sum += e[j]; }
    }
    float inv = 1.0f / sum;
    for (i = 0; i < n; i++) x[i] *= inv;
}

// SwiGLU's gate: h = silu(h) * up, silu(x) = x * sigmoid(x) = x / (1 + e^-x);
// vectorized, with vexp, since it runs on one thread between two matmuls.
static void swiglu(float *h, const float *up, size_t n) {
    size_t i = 0;
    for (; i + VEC_LEN <= n; i += VEC_LEN) {
        vfloat x = *(vfloat *)(h + i);
        *(vfloat *)(h + i) = x / (1.0f + vexp(-x)) * *(const vfloat *)(up + i);
    }
    for (; i < n; i++) h[i] = h[i] / (1.0f + vexp(vbroadcast(-h[i]))[0]) * up[i];
}

// Matrix multiplication is where all the time goes: decode is one matrix-
// vector product per weight matrix (memory-bound: every weight is read once
// per token), prefill is one matrix-matrix product per block of tokens
// (compute-bound: each weight row is reused for all tokens of the block).

// The block kernel (prefill) computes outT = W x^T one register tile at a
// time: GEMM_R weight rows x GEMM_V vectors of tokens. Tokens lie along the
// vector lanes, so each step broadcasts one weight per row and multiplies it
// into GEMM_V vectors of x^T: 2 * GEMM_R vector multiply-adds for
// GEMM_R + GEMM_V loads, and no horizontal sums. AVX-512: 12 x 2 tiles hold
// 24 accumulators of 16 tokens (f32 prefill 4.5 % faster than with 8 x 2 in an
// A/B); AVX2 and NEON: 4 x 2 tiles.
#if VEC_BYTES == 64
#define GEMM_R 12
#else
#define GEMM_R 4
#endif
#define GEMM_V 2
#define GEMM_TOKENS (GEMM_V * VEC_LEN) // tokens per tile; blocks are padded to a multiple
// The k dimension is walked in blocks of K_BLOCK so that a tile's weight rows
// stay in L1 cache while all the token vectors of the block pass over them.
#define K_BLOCK 1024

// outT[r * ldo + t] (+)= sum over k < kn of w[r * ldw + k] * xT[k * ldx + t]
// for the GEMM_R rows r of a tile and its GEMM_TOKENS tokens t; `accumulate`
// adds to outT (k blocks after the first).
static void gemm_tile(float *outT, size_t ldo, const float *w, size_t ldw, const float *xT, size_t ldx,
                      int kn, int accumulate) {
    vfloat acc[GEMM_R][GEMM_V];
    for (int r = 0; r < GEMM_R; r++)
        for (int v = 0; v < GEMM_V; v++)
            acc[r][v] = accumulate ? *(const vfloat *)(outT + r * ldo + v * VEC_LEN) : (vfloat){0};
    for (int k = 0; k < kn; k++) {
        vfloat x[GEMM_V];
        for (int v = 0; v < GEMM_V; v++) { x[v] = *(const vfloat *)(xT + k * ldx + v * VEC_LEN); IN_REGISTER(x[v]); }
        for (int r = 0; r < GEMM_R; r++) {
            vfloat wk = vbroadcast(w[r * ldw + k]); // (a broadcast load: pinning it in a register measured 3 % slower)
            for (int v = 0; v < GEMM_V; v++) acc[r][v] += wk * x[v];
        }
    }
    for (int r = 0; r < GEMM_R; r++)
        for (int v = 0; v < GEMM_V; v++) *(vfloat *)(outT + r * ldo + v * VEC_LEN) = acc[r][v];
}

// Q8_0 and Q4_0 (model.h): each group of Q8_GROUP consecutive values of a
// row shares one scale, value = q * scale (q8_0: q an int8; q4_0: q = u - 8,
// u a 4-bit unsigned), so a dot product is a sum over groups of (integer dot)
// x scales. A weight row is a sequence of blocks of Q8_BLOCK groups: their
// values, then their float16 scales, so decode reads it in one stream, front
// to back. Within a block the values are interleaved (q8_offset, q4_offset)
// so that one vector of integer products holds one partial sum per group. A
// row whose length is not a multiple of Q8_GROUP ends with a short group,
// stored zero-padded to a whole one (q8_0: q = 0; q4_0: u = 8). Activations
// are quantized to q8_0 at run time into plain arrays (values in the same
// interleaved order, zero-padded too, float32 scales): made for one matmul,
// never stored; the same activations meet q8_0 and q4_0 weights.
#define Q8_GROUP 32
#define Q8_BLOCK 32                                    // groups per block
#define Q8_BLOCK_BYTES (Q8_BLOCK * (Q8_GROUP + sizeof(uint16_t))) // 1088: 17 cache lines
#define Q4_BLOCK_BYTES (Q8_BLOCK * (Q8_GROUP / 2 + sizeof(uint16_t))) // 576: 9 cache lines
#define Q8_CHUNK 16                                    // groups interleaved together

// Groups of a row of n values (the last may be short), and n rounded up to them.
static inline int n_groups(int n) { return (n + Q8_GROUP - 1) / Q8_GROUP; }
static inline int padded_len(int n) { return n_groups(n) * Q8_GROUP; }

// NaN or Inf: the exponent bits all ones (float32, float16).
static int nonfinite_f32(float x) { uint32_t u; memcpy(&u, &x, 4); return (u & 0x7F800000u) == 0x7F800000u; }
static int nonfinite_f16(uint16_t h) { return (h & 0x7C00u) == 0x7C00u; }

// Index of the first NaN or Inf of v[0..n), or n. (Exponent bits all ones;
// an OR over a block, which compilers vectorize, then a search in the block.)
static size_t find_nonfinite_f32(const float *v, size_t n) {
    for (size_t i0 = 0; i0 < n; i0 += 4096) {
        size_t i1 = n - i0 < 4096 ? n : i0 + 4096;
        uint32_t bad = 0;
        for (size_t i = i0; i < i1; i++) { uint32_t u; memcpy(&u, v + i, 4); bad |= (u & 0x7F800000u) == 0x7F800000u; }
        if (bad) for (size_t i = i0; i < i1; i++) if (nonfinite_f32(v[i])) return i;
    }
    return n;
}

// Block b of a q8_0 row of n values: its groups' values and scales.
typedef struct { const int8_t *q; const uint16_t *scale; int groups; } Q8Block;

static int block_groups(int n, int b) { // all blocks are full but maybe the last
    int groups = n_groups(n) - b * Q8_BLOCK;
    return groups > Q8_BLOCK ? Q8_BLOCK : groups;
}

static Q8Block q8_block(const uint8_t *row, int n, int b) {
    int groups = block_groups(n, b);
    const uint8_t *p = row + (size_t)b * Q8_BLOCK_BYTES;
    return (Q8Block){(const int8_t *)p, (const uint16_t *)(p + groups * Q8_GROUP), groups};
}

// Where value i of group g lies among the values of a block of `groups`
// groups (model.h): the groups are taken Q8_CHUNK at a time (the last chunk
// of a short block may hold fewer, m), and a chunk is stored as 8 rows of
// m x 4 bytes: values 4r .. 4r+3 of each of its groups in turn. A 64-byte
// load then holds 4 values of each of 16 groups, the integer dot product
// instructions sum 4 byte products into each 32-bit lane, and after 8 loads
// lane j holds group j's whole dot product: the 16 groups' sums come out in
// one vector, in group order, ready for their 16 scales.
static inline size_t q8_offset(int groups, int g, int i) {
    int c0 = g / Q8_CHUNK * Q8_CHUNK, m = groups - c0 < Q8_CHUNK ? groups - c0 : Q8_CHUNK;
    return (size_t)c0 * Q8_GROUP + (size_t)(i / 4 * m + g - c0) * 4 + i % 4;
}

// Group j of block k, its Q8_GROUP values in order (the interleave undone):
// they lie 4 by 4, one chunk row (4 x the chunk's groups) apart.
static inline void q8_group_values(int8_t *q, Q8Block k, int j) {
    const int8_t *src = k.q + q8_offset(k.groups, j, 0);
    const size_t stride = q8_offset(k.groups, j, 4) - q8_offset(k.groups, j, 0);
    for (int i = 0; i < Q8_GROUP; i += 4) memcpy(q + i, src + i / 4 * stride, 4);
}

// Q4_0: a block of g groups is 16 g bytes of 4-bit values, then g float16
// scales. The values follow q8_0's interleave with two of its rows in one:
// byte k of row r of a chunk holds, in its low 4 bits, byte k of the q8_0
// chunk's row 2r, in its high 4 bits byte k of row 2r + 1. So one 64-byte
// load, masked and shifted, gives the two vectors that q8_0 would have
// loaded, in the same lanes as the activations they meet.
typedef struct { const uint8_t *q; const uint16_t *scale; int groups; } Q4Block;

static Q4Block q4_block(const uint8_t *row, int n, int b) {
    int groups = block_groups(n, b);
    const uint8_t *p = row + (size_t)b * Q4_BLOCK_BYTES;
    return (Q4Block){p, (const uint16_t *)(p + groups * Q8_GROUP / 2), groups};
}

// Byte holding value i of group g in a block of `groups` groups; the value
// is its low 4 bits for i % 8 < 4, its high 4 bits otherwise.
static inline size_t q4_offset(int groups, int g, int i) {
    int c0 = g / Q8_CHUNK * Q8_CHUNK, m = groups - c0 < Q8_CHUNK ? groups - c0 : Q8_CHUNK;
    return (size_t)c0 * Q8_GROUP / 2 + (size_t)(i / 8 * m + g - c0) * 4 + i % 4;
}

static inline int q4_value(Q4Block k, int g, int i) { // q = u - 8, in [-8, 7]
    return (k.q[q4_offset(k.groups, g, i)] >> (i % 8 / 4 * 4) & 15) - 8;
}

static inline void q4_group_values(int8_t *q, Q4Block k, int j) {
    for (int i = 0; i < Q8_GROUP; i++) q[i] = (int8_t)q4_value(k, j, i);
}

// Rounds x's group of Q8_GROUP values to q (int8) with the largest |x| at
// 127, given the scale that the group's amax rounded to; NaN (corrupt
// weights upstream) gives 0 rather than an undefined float-to-int conversion.
// q: the values of a block of `groups` groups, where value i goes to
// q[q8_offset(groups, g, i)]. Returns the sum of the group's q.
static int32_t round_group_q8(int8_t *q, int groups, int g, const float *x, float scale) {
    float inv = scale > 0 ? 1.0f / scale : 0;
    int8_t r[Q8_GROUP];
    int32_t sum = 0;
#if defined(__AVX2__) // the same numbers, 8 at a time (GCC's vectorization of the loop below shuffled
                      // every byte through mask registers: 1 ns a value); cvtps rounds to nearest even, as rintf
    __m256i n[Q8_GROUP / 8], total = _mm256_setzero_si256();
    for (int k = 0; k < Q8_GROUP / 8; k++) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), _mm256_set1_ps(inv));
        __m256 number = _mm256_cmp_ps(v, v, _CMP_ORD_Q); // NaN -> 0
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        n[k] = _mm256_and_si256(_mm256_cvtps_epi32(v), _mm256_castps_si256(number));
        total = _mm256_add_epi32(total, n[k]);
    }
    // to bytes: packs work within 128-bit halves, so the 4-byte pieces come out as values 0-3 of n[0], n[1],
    // n[2], n[3], then values 4-7 of each; the permute puts them in order
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256((__m256i *)r, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
#else
    for (int i = 0; i < Q8_GROUP; i++) { // (written so that compilers vectorize it: no lrintf call)
        float v = rintf(x[i] * inv);     // to nearest even, as lrintf
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        r[i] = (int8_t)(v == v ? (int)v : 0);
        sum += r[i];
    }
#endif
    for (int i = 0; i < Q8_GROUP; i += 4) memcpy(q + q8_offset(groups, g, i), r + i, 4);
    return sum;
}

// The largest |x| of a group (NaN ignored, as by the comparisons' order),
// lane by lane first: a scalar max is one chain of dependent compares, and
// with it quantizing decode's activations took a nanosecond per value, on one
// thread while the other waited.
static float group_amax(const float *x) {
    vfloat m = {0};
    for (int i = 0; i < Q8_GROUP; i += VEC_LEN) {
        vfloat a = *(const vfloat *)(x + i); // (vfloat is aligned(4): any float address)
        a = (vfloat)((vint)a & 0x7fffffff);   // |a|
        m = vselect(a > m, a, m);
    }
#if VEC_BYTES == 64 // (no lane is NaN: any order of the lanes' max is the same)
    return _mm512_reduce_max_ps((__m512)m);
#elif VEC_BYTES == 32 && defined(__AVX__)
    __m128 h = _mm_max_ps(_mm256_castps256_ps128((__m256)m), _mm256_extractf128_ps((__m256)m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    float amax = 0;
    for (int j = 0; j < VEC_LEN; j++) amax = m[j] > amax ? m[j] : amax;
    return amax;
#endif
}

// Group g of a row of n values, zero-padded to Q8_GROUP values in buf if it
// is the short last one.
static const float *group_of(const float *x, int n, int g, float *buf) {
    const float *xg = x + (size_t)g * Q8_GROUP;
    if ((g + 1) * Q8_GROUP <= n) return xg;
    memset(buf, 0, Q8_GROUP * sizeof(float));
    memcpy(buf, xg, (size_t)(n - g * Q8_GROUP) * sizeof(float));
    return buf;
}

// Activations: x (n) -> q (padded_len(n), blocks interleaved as a weight
// row's), s (n_groups(n)) float32 scales, and sum128 (n_groups(n)): 128 x
// the sum of each group's q (what the AVX-512 kernel's offset w + 128 adds
// to a dot product; a sixteenth of it is the offset u = q + 8 of q4_0's).
static void quantize_q8(int8_t *q, float *s, int32_t *sum128, const float *x, int n) {
    float buf[Q8_GROUP];
    for (int g = 0; g < n_groups(n); g++) {
        int b = g / Q8_BLOCK;
        const float *xg = group_of(x, n, g, buf);
        s[g] = group_amax(xg) / 127.0f;
        sum128[g] = 128 * round_group_q8(q + (size_t)b * Q8_BLOCK * Q8_GROUP, block_groups(n, b), g % Q8_BLOCK, xg, s[g]);
    }
}

// Weights: x (n) -> one q8_0 row (model.h), float16 scales, as export.py writes it.
static void quantize_q8_row(uint8_t *row, const float *x, int n) {
    float buf[Q8_GROUP];
    for (int b = 0; b * Q8_BLOCK < n_groups(n); b++) {
        Q8Block k = q8_block(row, n, b);
        for (int j = 0; j < k.groups; j++) {
            const float *xg = group_of(x, n, b * Q8_BLOCK + j, buf);
            uint16_t h = f32_to_f16(group_amax(xg) / 127.0f);
            memcpy((uint8_t *)(k.scale + j), &h, sizeof h);
            round_group_q8((int8_t *)k.q, k.groups, j, xg, f16_to_f32(h));
        }
    }
}

// Rounding a q4_0 group (as export.py's quantize_q4_0): GGML's rule takes
// the value m of largest magnitude and the scale d = m / -8, so m becomes q
// = -8 exactly; here each candidate d = m / c for c in Q4_DIVISORS is rounded
// to float16, the group rounded with it (to nearest even, clamped to [-8, 7]),
// and d then refit by least squares for those q (sum x q / sum q^2, rounded
// to float16); the d with the smallest squared error wins, the first on a tie.
// On stories260K's weights: 6.8 % less squared error than GGML's rule.
static const float Q4_DIVISORS[] = {-8.0f, -7.5f, -7.0f, 7.0f, 7.5f};

// The group x rounded with scale d (to nearest even, clamped to [-8, 7]) into q.
static void q4_round_with(const float *x, float d, int8_t *q) {
    float inv = d != 0 ? 1.0f / d : 0;
    for (int i = 0; i < Q8_GROUP; i++) {
        float v = rintf(x[i] * inv);
        v = v > 7.0f ? 7.0f : v < -8.0f ? -8.0f : v;
        q[i] = (int8_t)(v == v ? (int)v : 0);
    }
}

static float q4_error(const float *x, const int8_t *q, float d) { // squared error of q * d against x
    float err = 0;
    for (int i = 0; i < Q8_GROUP; i++) err += (x[i] - q[i] * d) * (x[i] - q[i] * d);
    return err;
}

// One group: its float16 scale, and q (Q8_GROUP values in [-8, 7]).
static uint16_t quantize_q4_group(const float *x, int8_t *q) {
    float m = 0, best = INFINITY;
    for (int i = 0; i < Q8_GROUP; i++) m = fabsf(x[i]) > fabsf(m) ? x[i] : m;
    uint16_t best_h = 0;
    memset(q, 0, Q8_GROUP);
    for (size_t c = 0; c < sizeof Q4_DIVISORS / sizeof Q4_DIVISORS[0]; c++) {
        int8_t t[Q8_GROUP];
        uint16_t h[2] = {f32_to_f16(m / Q4_DIVISORS[c])};
        q4_round_with(x, f16_to_f32(h[0]), t);
        float xq = 0, qq = 0; // the least-squares scale for these q: sum x q / sum q^2
        for (int i = 0; i < Q8_GROUP; i++) { xq += x[i] * t[i]; qq += (float)(t[i] * t[i]); }
        h[1] = f32_to_f16(qq > 0 ? xq / qq : 0);
        for (int k = 0; k < 2; k++) {
            float err = q4_error(x, t, f16_to_f32(h[k]));
            if (err < best) { best = err; best_h = h[k]; memcpy(q, t, Q8_GROUP); }
        }
    }
    return best_h;
}

// Weights: x (n) -> one q4_0 row (model.h).
static void quantize_q4_row(uint8_t *row, const float *x, int n) {
    float buf[Q8_GROUP];
    for (int b = 0; b * Q8_BLOCK < n_groups(n); b++) {
        Q4Block k = q4_block(row, n, b);
        memset((uint8_t *)k.q, 0, (size_t)k.groups * Q8_GROUP / 2);
        for (int j = 0; j < k.groups; j++) {
            int8_t q[Q8_GROUP];
            uint16_t h = quantize_q4_group(group_of(x, n, b * Q8_BLOCK + j, buf), q);
            memcpy((uint8_t *)(k.scale + j), &h, sizeof h);
            for (int i = 0; i < Q8_GROUP; i++)
                ((uint8_t *)k.q)[q4_offset(k.groups, j, i)] |= (uint8_t)((q[i] + 8) << (i % 8 / 4 * 4));
        }
    }
}

// Sum over groups g0 <= g < k.groups of block k of (integer dot) x w scale
// x x scale; xq, xs: the block's part of x.
static float dot_q8_groups(Q8Block k, const int8_t *xq, const float *xs, int g0) {
    float sum = 0;
    for (int g = g0; g < k.groups; g++) {
        int32_t isum = 0;
        for (int i = 0; i < Q8_GROUP; i++) {
            size_t o = q8_offset(k.groups, g, i);
            isum += k.q[o] * xq[o];
        }
        sum += (float)isum * (f16_to_f32(k.scale[g]) * xs[g]);
    }
    return sum;
}

static float dot_q4_groups(Q4Block k, const int8_t *xq, const float *xs, int g0) {
    float sum = 0;
    for (int g = g0; g < k.groups; g++) {
        int32_t isum = 0;
        for (int i = 0; i < Q8_GROUP; i++) isum += q4_value(k, g, i) * xq[q8_offset(k.groups, g, i)];
        sum += (float)isum * (f16_to_f32(k.scale[g]) * xs[g]);
    }
    return sum;
}

// A q8_0 or q4_0 weight row (n values) . x quantized (xq, xs).
static REFERENCE float dot_q8_scalar(const uint8_t *w, const int8_t *xq, const float *xs, int n) {
    float sum = 0;
    for (int b = 0; b * Q8_BLOCK < n_groups(n); b++)
        sum += dot_q8_groups(q8_block(w, n, b), xq + (size_t)b * Q8_BLOCK * Q8_GROUP, xs + b * Q8_BLOCK, 0);
    return sum;
}

static REFERENCE float dot_q4_scalar(const uint8_t *w, const int8_t *xq, const float *xs, int n) {
    float sum = 0;
    for (int b = 0; b * Q8_BLOCK < n_groups(n); b++)
        sum += dot_q4_groups(q4_block(w, n, b), xq + (size_t)b * Q8_BLOCK * Q8_GROUP, xs + b * Q8_BLOCK, 0);
    return sum;
}

// out (R) = W x for a matrix W of R rows and only C columns: MLA's absorbed
// key up-projection W_UK_h^T (kv_latent_dim x head_dim, 512 x 64 per head),
// whose rows are too short for a dot product each (a horizontal sum per 64
// multiply-adds; no SIMD path for a q8_0 row of 2 groups). W is kept
// transposed instead (run.c, make_columns), as its C columns, and out = sum
// over i of x[i] x column i, R numbers along the vector lanes. The columns
// are cut into blocks of COLUMN_BLOCK rows (four vectors: four independent
// chains in registers), each block's C column pieces stored one after the
// other (column_slot), so that the whole matrix is read once, front to back,
// in one stream (stored plainly by column, each block walked the matrix in
// strides of R: 2x slower from memory). R is padded with zero rows to whole
// blocks. A quantized W keeps its file's numbers: int8 values q and the
// float16 scale of group g of row r at scale[column_slot(groups, g, r)]:
//   out[r] = sum over groups g of scale[g][r] x (sum over i in g of x[i] q[i][r]);
// an f32 W: f, one group. Sums over i run in order, per lane.
#define COLUMN_BLOCK (4 * VEC_LEN)
static inline size_t column_slot(int C, int i, int r) {
    return (size_t)(r / COLUMN_BLOCK) * C * COLUMN_BLOCK + (size_t)i * COLUMN_BLOCK + r % COLUMN_BLOCK;
}
static inline size_t column_padded(int R) { return ((size_t)R + COLUMN_BLOCK - 1) / COLUMN_BLOCK * COLUMN_BLOCK; }

static void column_matvec(float *out, const float *x, const float *f, const int8_t *q, const uint16_t *scale, int R, int C) {
    const int group = q ? Q8_GROUP : C;
    for (int r = 0; r < R; r += COLUMN_BLOCK) {
        const size_t block = column_slot(C, 0, r); // the block's first number
        vfloat total[4] = {{0}, {0}, {0}, {0}};
        for (int i0 = 0; i0 < C; i0 += group) {
            const int i1 = i0 + group < C ? i0 + group : C;
            vfloat acc[4] = {{0}, {0}, {0}, {0}};
            for (int i = i0; i < i1; i++) {
                const vfloat xi = vbroadcast(x[i]);
                const size_t at = block + (size_t)i * COLUMN_BLOCK;
                for (int k = 0; k < 4; k++)
                    acc[k] += xi * (q ? i8_vec((const uint8_t *)(q + at + k * VEC_LEN)) : *(const vfloat *)(f + at + k * VEC_LEN));
            }
            for (int k = 0; k < 4; k++)
                total[k] += q ? acc[k] * f16_vec((const uint8_t *)(scale + column_slot(n_groups(C), i0 / Q8_GROUP, r) + k * VEC_LEN))
                              : acc[k];
        }
        for (int k = 0; k < 4; k++) {
            const int lanes = R - r - k * VEC_LEN < VEC_LEN ? R - r - k * VEC_LEN : VEC_LEN;
            if (lanes > 0) memcpy(out + r + k * VEC_LEN, &total[k], (size_t)lanes * sizeof(float));
        }
    }
}

static REFERENCE void column_matvec_scalar(float *out, const float *x, const float *f, const int8_t *q,
                                           const uint16_t *scale, int R, int C) {
    const int group = q ? Q8_GROUP : C;
    for (int r = 0; r < R; r++) {
        float sum = 0;
        for (int i0 = 0; i0 < C; i0 += group) {
            float part = 0;
            for (int i = i0; i < C && i < i0 + group; i++) part += x[i] * (q ? q[column_slot(C, i, r)] : f[column_slot(C, i, r)]);
            sum += q ? part * f16_to_f32(scale[column_slot(n_groups(C), i0 / Q8_GROUP, r)]) : part;
        }
        out[r] = sum;
    }
}

// The SIMD paths, for whole chunks of 16 groups (a short block's last chunk,
// if any, goes through dot_q8_groups / dot_q4_groups): AVX-512 with VNNI, or
// AVX2 with F16C. Each is written once for both weight types: `bits` (8 or
// 4) is a constant wherever they are inlined.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_AVX512 1
#define Q8_AVX2 0
#define Q8_NEON 0
#elif defined(__AVX2__) && defined(__F16C__)
#define Q8_AVX512 0
#define Q8_AVX2 1
#define Q8_NEON 0
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
#define Q8_AVX512 0
#define Q8_AVX2 0
#define Q8_NEON 1
#else
#define Q8_AVX512 0
#define Q8_AVX2 0
#define Q8_NEON 0
#endif

// The tile of the integer prefill kernel (gemm_tile_q8, AVX-512 VNNI only).
#define Q8_TILE_R 4 // weight rows
#define Q8_TILE_T 3 // tokens

// A compiler barrier: loads before it are emitted before loads after it.
// Decode kernels use it to keep the weight loads in address order, which
// the compiler would otherwise shuffle (measured: GCC hoisting a few loads
// some lines ahead made the q8_0 kernel 20-50 % slower; the hardware
// prefetchers follow a plainly ascending stream best).
#define LOAD_IN_ORDER() __asm__ volatile("" ::: "memory")

// Bytes of values of a chunk of 16 groups, of a block of g groups.
#define CHUNK_BYTES_OF(bits) (Q8_CHUNK * Q8_GROUP * (bits) / 8)
#define BLOCK_BYTES_OF(bits) ((bits) == 8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES)

#if Q8_AVX512
// Both weight types meet vpdpbusd, which multiplies unsigned by signed bytes,
// as unsigned u = q + offset: q8_0 as q + 128 (q xor 0x80), q4_0 as stored
// (q + 8). Then sum u x = sum q x + offset sum x, whose second term the
// caller subtracts: sum128 (computed once per x), or a sixteenth of it.
static inline __m512i offset_sums_512(const int32_t *sum128, int bits) {
    __m512i s = _mm512_loadu_si512(sum128);
    return bits == 8 ? s : _mm512_srai_epi32(s, 4);
}

// q8_0's rows 2i and 2i + 1 (of 8) of a chunk of weights, as u.
static inline __attribute__((always_inline)) void weight_rows_512(const uint8_t *chunk, int i, int bits, __m512i *a,
                                                                  __m512i *b) {
    if (bits == 8) {
        *a = _mm512_xor_si512(_mm512_loadu_si512(chunk + 128 * i), _mm512_set1_epi8((char)0x80));
        *b = _mm512_xor_si512(_mm512_loadu_si512(chunk + 128 * i + 64), _mm512_set1_epi8((char)0x80));
    } else {
        __m512i v = _mm512_loadu_si512(chunk + 64 * i);
        *a = _mm512_and_si512(v, _mm512_set1_epi8(15));
        *b = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15));
    }
}

// Row i (of 8) of q8_0's interleave of a chunk of weights, as u: the tile
// loads q4_0's bytes once per row it takes from them (the second load hits
// L1), which leaves more registers for its accumulators than holding both.
static inline __attribute__((always_inline)) __m512i weight_row_512(const uint8_t *chunk, int i, int bits) {
    if (bits == 8) return _mm512_xor_si512(_mm512_loadu_si512(chunk + 64 * i), _mm512_set1_epi8((char)0x80));
    __m512i v = _mm512_loadu_si512(chunk + 64 * (i / 2));
    if (i & 1) v = _mm512_srli_epi16(v, 4);
    return _mm512_and_si512(v, _mm512_set1_epi8(15));
}

// The 16 groups' integer dot products u . x of one chunk (decode: the
// weights read once, prefetched ahead, in address order).
static inline __attribute__((always_inline)) __m512i chunk_512(const uint8_t *wq, const int8_t *xq, int bits) {
    __m512i acc[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}; // two chains hide the latency
    for (int i = 0; i < Q8_GROUP / 8; i++) {
        if (bits == 8) { // light; q4_0 asks for none (PREFETCH_STREAM above)
            PREFETCH_STREAM(wq + 128 * i + PREFETCH_AHEAD, 1);
            PREFETCH_STREAM(wq + 128 * i + 64 + PREFETCH_AHEAD, 1);
        }
        __m512i a, b;
        weight_rows_512(wq, i, bits, &a, &b);
        acc[0] = _mm512_dpbusd_epi32(acc[0], a, _mm512_loadu_si512(xq + 128 * i));
        acc[1] = _mm512_dpbusd_epi32(acc[1], b, _mm512_loadu_si512(xq + 128 * i + 64));
        LOAD_IN_ORDER();
    }
    return _mm512_add_epi32(acc[0], acc[1]);
}

// The first `chunks` chunks of a block (values q, scales) into acc: values, then scales.
// (Inlined by force: called with a constant for full blocks, so d stays in registers.)
static inline __attribute__((always_inline)) void block_512(__m512 *acc, const uint8_t *q, const uint16_t *scale,
                                                            const int8_t *xq, const float *xs, const int32_t *sum128,
                                                            int chunks, int bits) {
    __m512i d[Q8_BLOCK / Q8_CHUNK];
    for (int c = 0; c < chunks; c++) d[c] = chunk_512(q + c * CHUNK_BYTES_OF(bits), xq + c * Q8_CHUNK * Q8_GROUP, bits);
    for (int c = 0; c < chunks; c++) {
        const int o = c * Q8_CHUNK;
        __m512 s = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + o))), _mm512_loadu_ps(xs + o));
        __m512i dots = _mm512_sub_epi32(d[c], offset_sums_512(sum128 + o, bits));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), s, *acc);
    }
}

// The sums of the lanes of a, b, c and d, in lanes 0, 4, 8 and 12: halves
// of a and b (c and d) added in one vector, then quarters of those, then
// lanes within each quarter: 13 instructions for the four, where summing
// one vector alone takes 8.
static inline __m512 lane_sums_4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee)); // a a b b
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee)); // c c d d
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd)); // a b c d
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4e)); // within each quarter: lanes (0 1 2 3) + (2 3 0 1)
    return _mm512_add_ps(q, _mm512_permute_ps(q, 0xb1)); // + (1 0 3 2)
}

// Prefill with q8_0 or q4_0 weights on AVX-512 VNNI: the block's tokens are
// quantized as decode's are, and a register tile of Q8_TILE_R weight rows x
// Q8_TILE_T tokens runs the same integer dot products for all its pairs at
// once: each weight vector loaded meets Q8_TILE_T token vectors, each token
// vector Q8_TILE_R weight vectors. One vpdpbusd is 64 multiply-adds, four
// times a float32 FMA's 16, so this beats dequantizing the weights into a
// float tile. 4 x 3 pairs: 12 integer and 12 float accumulators, the most
// that leave registers for the operands.
#define Q8_GEMM 1

// out[t * ldo + r] = row r of w . token t of x, for the tile's rows (q8_0 or
// q4_0, w_stride bytes apart) and tokens (quantized rows of n values:
// xq + t * padded_len(n), xs and sum128 + t * n_groups(n)).
static inline __attribute__((always_inline)) void gemm_tile_int(float *out, size_t ldo, const uint8_t *w,
                                                                size_t w_stride, const int8_t *xq, const float *xs,
                                                                const int32_t *sum128, int n, int bits) {
    enum { R = Q8_TILE_R, T = Q8_TILE_T };
    _Static_assert(Q8_TILE_R == 4, "the lanes are summed 4 rows at a time");
    const size_t xg = n_groups(n), xn = padded_len(n); // groups and values per token
    __m512 acc[R][T];         // lane j: group j of each chunk, summed over the chunks
    float tail[R][T] = {{0}}; // groups of a short block's last chunk
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b = 0; b * Q8_BLOCK < (int)xg; b++) {
        const uint8_t *q[R];
        const uint16_t *sc[R];
        const int groups = block_groups(n, b), g0 = b * Q8_BLOCK; // the block's first group
        for (int r = 0; r < R; r++) {
            q[r] = w + r * w_stride + (size_t)b * BLOCK_BYTES_OF(bits);
            sc[r] = (const uint16_t *)(q[r] + groups * Q8_GROUP * bits / 8);
        }
        for (int c = 0; c < groups / Q8_CHUNK; c++) {
            const int o = c * Q8_CHUNK * Q8_GROUP, g = g0 + c * Q8_CHUNK;
            __m512i d[R][T]; // the chunk's 16 integer dots per pair, less the offset (see offset_sums_512)
            for (int t = 0; t < T; t++) {
                __m512i minus = _mm512_sub_epi32(_mm512_setzero_si512(), offset_sums_512(sum128 + t * xg + g, bits));
                for (int r = 0; r < R; r++) d[r][t] = minus;
            }
#pragma GCC unroll 8
            for (int i = 0; i < Q8_GROUP / 4; i++) { // row i of q8_0's interleave (q4_0: half a row)
                __m512i x[T];
                for (int t = 0; t < T; t++) { // (in registers: GCC folds the load into each of the R vpdpbusd
                    x[t] = _mm512_loadu_si512(xq + t * xn + g0 * Q8_GROUP + o + 64 * i); // that use it, and the
                    IN_REGISTER(x[t]);                                                     // loads bound the tile)
                }
                for (int r = 0; r < R; r++) {
                    __m512i wv = weight_row_512(q[r] + c * CHUNK_BYTES_OF(bits), i, bits);
                    for (int t = 0; t < T; t++) d[r][t] = _mm512_dpbusd_epi32(d[r][t], wv, x[t]);
                }
            }
            for (int r = 0; r < R; r++) {
                __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc[r] + c * Q8_CHUNK)));
                for (int t = 0; t < T; t++)
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r][t]), _mm512_mul_ps(ws, _mm512_loadu_ps(xs + t * xg + g)),
                                                acc[r][t]);
            }
        }
        if (groups % Q8_CHUNK)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++) {
                    const int8_t *xb = xq + t * xn + g0 * Q8_GROUP;
                    const float *sb = xs + t * xg + g0;
                    const int gc = groups / Q8_CHUNK * Q8_CHUNK;
                    tail[r][t] += bits == 8 ? dot_q8_groups((Q8Block){(const int8_t *)q[r], sc[r], groups}, xb, sb, gc)
                                            : dot_q4_groups((Q4Block){q[r], sc[r], groups}, xb, sb, gc);
                }
    }
    for (int t = 0; t < T; t++) { // each pair's 16 lanes summed, 4 rows at a time
        float sums[16];
        _mm512_storeu_ps(sums, lane_sums_4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
        for (int r = 0; r < R; r++) out[t * ldo + r] = sums[4 * r] + tail[r][t];
    }
}

static void gemm_tile_q8(float *out, size_t ldo, const uint8_t *w, size_t w_stride, const int8_t *xq, const float *xs,
                         const int32_t *sum128, int n) {
    gemm_tile_int(out, ldo, w, w_stride, xq, xs, sum128, n, 8);
}

static void gemm_tile_q4(float *out, size_t ldo, const uint8_t *w, size_t w_stride, const int8_t *xq, const float *xs,
                         const int32_t *sum128, int n) {
    gemm_tile_int(out, ldo, w, w_stride, xq, xs, sum128, n, 4);
}
#else
#define Q8_GEMM 0
#endif

#if Q8_AVX2
// Groups 0-7 (half 0) or 8-15 (half 1) of one chunk: their products summed
// into one int32 lane per group. maddubs multiplies unsigned by signed bytes
// (and would saturate on w + 128), so a q8_0 weight's sign moves onto x:
// w x = |w| (x sign(w)); pairs reach 2 x 127^2 < 2^15. q8_0: values 4r ..
// 4r + 3 of each group (row r of the chunk).
static inline __m256i q8_quad_256(const int8_t *wq, const int8_t *xq, int r, int half) {
    __m256i w = _mm256_loadu_si256((const __m256i *)(wq + 64 * r + 32 * half));
    __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 64 * r + 32 * half));
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// q4_0: values 8i .. 8i + 7 of each group (q8_0's rows 2i and 2i + 1), from
// one load; u = q + 8 is unsigned as stored (the caller subtracts 8 sum x),
// and the four products of a lane's pairs reach 4 x 15 x 128 < 2^15.
static inline __m256i q4_quad_256(const uint8_t *wq, const int8_t *xq, int i, int half) {
    __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 64 * i + 32 * half)), m = _mm256_set1_epi8(15);
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 128 * i + 32 * half));
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 128 * i + 64 + 32 * half));
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m), x0),
                                     _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), x1));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The first `chunks` chunks of a block (values q, scales) into acc[2]: values, then scales.
static inline __attribute__((always_inline)) void block_256(__m256 acc[2], const uint8_t *q, const uint16_t *scale,
                                                            const int8_t *xq, const float *xs, const int32_t *sum128,
                                                            int chunks, int bits) {
    __m256i d[2 * Q8_BLOCK / Q8_CHUNK]; // (chunk, half): 8 groups' sums each
    for (int c = 0; c < chunks; c++) {
        const uint8_t *wc = q + c * CHUNK_BYTES_OF(bits);
        const int8_t *xc = xq + c * Q8_CHUNK * Q8_GROUP;
        d[2 * c] = d[2 * c + 1] = _mm256_setzero_si256();
        for (int r = 0; r < (bits == 8 ? Q8_GROUP / 4 : Q8_GROUP / 8); r++) {
            PREFETCH_STREAM(wc + 64 * r + PREFETCH_AHEAD, 0); // into L1: more arithmetic per byte than VNNI
            for (int h = 0; h < 2; h++)
                d[2 * c + h] = _mm256_add_epi32(d[2 * c + h], bits == 8 ? q8_quad_256((const int8_t *)wc, xc, r, h)
                                                                        : q4_quad_256(wc, xc, r, h));
            LOAD_IN_ORDER();
        }
        if (bits == 4)
            for (int h = 0; h < 2; h++)
                d[2 * c + h] = _mm256_sub_epi32(d[2 * c + h],
                    _mm256_srai_epi32(_mm256_loadu_si256((const __m256i *)(sum128 + c * Q8_CHUNK + 8 * h)), 4));
    }
    for (int h = 0; h < 2 * chunks; h++) {
        __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + 8 * h))),
                                 _mm256_loadu_ps(xs + 8 * h));
        acc[h & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[h]), s, acc[h & 1]);
    }
}
#endif

#if Q8_NEON
// Arm NEON with the dot-product extension (Armv8.2-A sdot: 16 multiply-adds
// of signed bytes per instruction). A 16-byte quarter k of a 64-byte row of
// the interleave holds 4 values of each of groups 4k .. 4k + 3, so sdot
// leaves one group's sum in each 32-bit lane, and four accumulators hold a
// chunk's 16 groups, as one vpdpbusd vector does. q8_0 values are signed as
// stored; q4_0's u = q + 8 (0..15) is a signed byte too, and the caller's
// 8 x sum x per group (a sixteenth of sum128) is subtracted.
static inline __attribute__((always_inline)) void block_neon(float32x4_t acc[4], const uint8_t *q,
                                                             const uint16_t *scale, const int8_t *xq, const float *xs,
                                                             const int32_t *sum128, int chunks, int bits) {
    for (int c = 0; c < chunks; c++) {
        const uint8_t *wc = q + c * CHUNK_BYTES_OF(bits);
        const int8_t *xc = xq + c * Q8_CHUNK * Q8_GROUP;
        int32x4_t d[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)}; // groups 4k .. 4k + 3
        for (int r = 0; r < Q8_GROUP * bits / 32; r++) { // 64-byte rows of the chunk: 8 (q8_0) or 4 (q4_0)
            PREFETCH_STREAM(wc + 64 * r + PREFETCH_AHEAD, 0); // into L1: more arithmetic per byte than VNNI
            for (int k = 0; k < 4; k++) {
                if (bits == 8) {
                    d[k] = vdotq_s32(d[k], vld1q_s8((const int8_t *)wc + 64 * r + 16 * k), vld1q_s8(xc + 64 * r + 16 * k));
                } else { // low nibbles: q8_0's row 2r, high nibbles: row 2r + 1
                    uint8x16_t v = vld1q_u8(wc + 64 * r + 16 * k);
                    d[k] = vdotq_s32(d[k], vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), vld1q_s8(xc + 128 * r + 16 * k));
                    d[k] = vdotq_s32(d[k], vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vld1q_s8(xc + 128 * r + 64 + 16 * k));
                }
            }
            LOAD_IN_ORDER();
        }
        for (int k = 0; k < 4; k++) {
            const int o = c * Q8_CHUNK + 4 * k;
            if (bits == 4) d[k] = vsubq_s32(d[k], vshrq_n_s32(vld1q_s32(sum128 + o), 4));
            float32x4_t s = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scale + o))), vld1q_f32(xs + o));
            acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(d[k]), s);
        }
    }
}
#endif

// A q8_0 or q4_0 weight row (n values) . x quantized (xq, xs, sum128), in
// address order through each block: its values first, the integer dot
// products of its chunks kept in registers, then its scales applied.
// (Reading each block's scales before its values measured 5-20 % slower,
// the more so the more bandwidth the machine had on offer: the hardware
// prefetchers keep up best with one plainly ascending stream.)
static inline __attribute__((always_inline)) float dot_int(const uint8_t *w, const int8_t *xq, const float *xs,
                                                           const int32_t *sum128, int n, int bits) {
    float sum = 0;
#if Q8_AVX512
    __m512 acc = _mm512_setzero_ps();
#elif Q8_AVX2
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; // two chains hide FMA latency
#elif Q8_NEON
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
#else
    (void)sum128; // only the SIMD kernels need it
#endif
    for (int b = 0; b * Q8_BLOCK < n_groups(n); b++) {
        const int groups = block_groups(n, b);
        const uint8_t *q = w + (size_t)b * BLOCK_BYTES_OF(bits);
        const uint16_t *scale = (const uint16_t *)(q + groups * Q8_GROUP * bits / 8);
        const int8_t *x = xq + (size_t)b * Q8_BLOCK * Q8_GROUP;
        const float *s = xs + b * Q8_BLOCK;
        int chunks = Q8_AVX512 || Q8_AVX2 || Q8_NEON ? groups / Q8_CHUNK : 0; // whole chunks: the SIMD path's
#if Q8_AVX512
        if (groups == Q8_BLOCK) block_512(&acc, q, scale, x, s, sum128 + b * Q8_BLOCK, Q8_BLOCK / Q8_CHUNK, bits);
        else block_512(&acc, q, scale, x, s, sum128 + b * Q8_BLOCK, chunks, bits);
#elif Q8_AVX2
        if (groups == Q8_BLOCK) block_256(acc, q, scale, x, s, sum128 + b * Q8_BLOCK, Q8_BLOCK / Q8_CHUNK, bits);
        else block_256(acc, q, scale, x, s, sum128 + b * Q8_BLOCK, chunks, bits);
#elif Q8_NEON
        if (groups == Q8_BLOCK) block_neon(acc, q, scale, x, s, sum128 + b * Q8_BLOCK, Q8_BLOCK / Q8_CHUNK, bits);
        else block_neon(acc, q, scale, x, s, sum128 + b * Q8_BLOCK, chunks, bits);
#endif
        sum += bits == 8 ? dot_q8_groups((Q8Block){(const int8_t *)q, scale, groups}, x, s, chunks * Q8_CHUNK)
                         : dot_q4_groups((Q4Block){q, scale, groups}, x, s, chunks * Q8_CHUNK);
    }
#if Q8_AVX512
    sum += _mm512_reduce_add_ps(acc);
#elif Q8_AVX2
    __m256 a = _mm256_add_ps(acc[0], acc[1]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    sum += _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#elif Q8_NEON
    sum += vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
#endif
    return sum;
}

// One row each, for callers outside decode's row loop (which inlines
// dot_int itself: matvec_rows_of in matmul.h) and for the tests.
static inline float dot_q8(const uint8_t *w, const int8_t *xq, const float *xs, const int32_t *sum128, int n) {
    return dot_int(w, xq, xs, sum128, n, 8);
}

static inline float dot_q4(const uint8_t *w, const int8_t *xq, const float *xs, const int32_t *sum128, int n) {
    return dot_int(w, xq, xs, sum128, n, 4);
}

// MLA's latent rows in a q8_0 KV cache (run.c, KVCache.q8_rows). All query
// heads score every cached latent c (kv_latent_dim numbers: 512 multiply-adds
// per head and position) and then add it up weighted, so at depth MLA's
// attention is bound by the multiply-adds, not by the cache's bytes. The
// scores take the integer path of the weights: the cache keeps exactly the
// numbers kv_store keeps (the same groups of 32 consecutive numbers, scales
// and rounding), laid out as a q8_0 weight row (model.h: values interleaved,
// 16 groups per 64-byte load, scales after each block of groups), and each
// head's query is quantized as matmul activations are (quantize_q8): then
// dot_q8, and with AVX-512 VNNI the prefill tile gemm_tile_q8 (positions as
// its weight rows, heads as its tokens), score them with vpdpbusd, 64 byte
// products per instruction where an f32 FMA does 16. The weighted sum reads
// the rows converted to float32 in their stored order (kv_q8_rows_to_f32):
// each number's sum is the same, only in another lane; run.c puts the sums
// back in the latent's order (kv_q8_rows_order).

// Stores x (width numbers, a multiple of Q8_GROUP) as such a row.
static void kv_store_q8_row(uint8_t *row, const float *x, int width) {
    for (int g = 0; g < width / Q8_GROUP; g++) {
        uint8_t group[Q8_GROUP + 2]; // kv_store's q8_0 row of this group alone: its values, then its scale
        kv_store(group, 1, 0, x + (size_t)g * Q8_GROUP, Q8_GROUP, KV_Q8_0);
        Q8Block k = q8_block(row, width, g / Q8_BLOCK);
        for (int i = 0; i < Q8_GROUP; i += 4) memcpy((uint8_t *)k.q + q8_offset(k.groups, g % Q8_BLOCK, i), group + i, 4);
        memcpy((uint8_t *)(k.scale + g % Q8_BLOCK), group + Q8_GROUP, 2);
    }
}

// Where each number of such a row lies in the stored order that
// kv_q8_rows_to_f32 gives: order[d] for number d of the latent.
static void kv_q8_rows_order(int *order, int width) {
    for (int d = 0; d < width; d++) {
        int g = d / Q8_GROUP, b = g / Q8_BLOCK;
        order[d] = b * Q8_BLOCK * Q8_GROUP + (int)q8_offset(block_groups(width, b), g % Q8_BLOCK, d % Q8_GROUP);
    }
}

// Scalar reference: number d of such a row (kv_number's value for the same numbers stored by kv_store).
static REFERENCE float kv_q8_row_number(const uint8_t *row, int d, int width) {
    int g = d / Q8_GROUP;
    Q8Block k = q8_block(row, width, g / Q8_BLOCK);
    return k.q[q8_offset(k.groups, g % Q8_BLOCK, d % Q8_GROUP)] * f16_to_f32(k.scale[g % Q8_BLOCK]);
}

// n such rows (kv_row_bytes apart) as float32, each in its stored order:
// out[r * width + order[d]] = number d of row r. AVX-512: a whole chunk of
// 16 groups is 8 rows of 64 bytes, 4 numbers of each group in turn, so the
// scales of a vector of 16 numbers are 4 of the chunk's 16, 4 lanes each.
static void kv_q8_rows_to_f32(float *out, const uint8_t *base, int n, int width) {
    const size_t rb = kv_row_bytes(KV_Q8_0, width);
    for (int r = 0; r < n; r++) {
        const uint8_t *row = base + (size_t)r * rb;
        float *o = out + (size_t)r * width;
        for (int b = 0; b * Q8_BLOCK * Q8_GROUP < width; b++) {
            Q8Block k = q8_block(row, width, b);
            float *ob = o + (size_t)b * Q8_BLOCK * Q8_GROUP;
            int g = 0;
#if VEC_BYTES == 64
            for (; g + Q8_CHUNK <= k.groups; g += Q8_CHUNK) {
                const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k.scale + g)));
                for (int m = 0; m < 4; m++) {
                    const __m512 sm = _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_add_epi32(
                        _mm512_set1_epi32(16 * m), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)), 2), s);
                    for (int i = 0; i < 8; i++) { // chunk row i: numbers 4i .. 4i + 3 of each group
                        size_t at = (size_t)g * Q8_GROUP + 64 * i + 16 * m;
                        _mm512_storeu_ps(ob + at, _mm512_mul_ps((__m512)i8_vec((const uint8_t *)k.q + at), sm));
                    }
                }
            }
#endif
            for (; g < k.groups; g++) {
                const float sc = f16_to_f32(k.scale[g]);
                for (int i = 0; i < Q8_GROUP; i++) {
                    size_t at = q8_offset(k.groups, g, i);
                    ob[at] = k.q[at] * sc;
                }
            }
        }
    }
}

// att_h[p * att_step] += (q_h . row p) * scale for positions p < n of such
// rows and heads h < nh, q_h quantized (quantize_q8) at xq + h * padded_len(width),
// xs and sum128 + h * n_groups(width); att_h = att + h * att_stride. With
// VNNI in register tiles of Q8_TILE_R positions x Q8_TILE_T heads.
static void q8_row_scores(float *att, size_t att_stride, const int8_t *xq, const float *xs, const int32_t *sum128,
                          const uint8_t *rows, int n, int width, float scale, int nh) {
    const size_t rb = kv_row_bytes(KV_Q8_0, width), xn = padded_len(width), xg = n_groups(width);
    int p = 0;
#if Q8_GEMM
    for (; p + Q8_TILE_R <= n; p += Q8_TILE_R) {
        int h = 0;
        for (; h + Q8_TILE_T <= nh; h += Q8_TILE_T) {
            float tile[Q8_TILE_T * Q8_TILE_R]; // [head][position]
            gemm_tile_q8(tile, Q8_TILE_R, rows + p * rb, rb, xq + h * xn, xs + h * xg, sum128 + h * xg, width);
            for (int t = 0; t < Q8_TILE_T; t++)
                for (int i = 0; i < Q8_TILE_R; i++) att[(h + t) * att_stride + p + i] += tile[t * Q8_TILE_R + i] * scale;
        }
        for (; h < nh; h++)
            for (int i = 0; i < Q8_TILE_R; i++)
                att[h * att_stride + p + i] += dot_q8(rows + (p + i) * rb, xq + h * xn, xs + h * xg, sum128 + h * xg, width) * scale;
    }
#endif
    for (; p < n; p++)
        for (int h = 0; h < nh; h++)
            att[h * att_stride + p] += dot_q8(rows + p * rb, xq + h * xn, xs + h * xg, sum128 + h * xg, width) * scale;
}

static REFERENCE void q8_row_scores_scalar(float *att, size_t att_stride, const int8_t *xq, const float *xs,
                                           const uint8_t *rows, int n, int width, float scale, int nh) {
    const size_t rb = kv_row_bytes(KV_Q8_0, width);
    for (int h = 0; h < nh; h++)
        for (int p = 0; p < n; p++)
            att[h * att_stride + p] += dot_q8_scalar(rows + p * rb, xq + h * padded_len(width), xs + h * n_groups(width), width) * scale;
}

#endif
