/* matmul.h - the matrix products of run.c, put to work on the model's
   matrices across the threads: decode's matrix-vector products in row chunks
   that threads take from each other's shares, prefill's GEMM in register
   tiles (kernels.h), the quantization of activations for the integer
   kernels, and MLA's per-head products (head_matmul, column_matmul).
   Included once, by run.c, after the model's structs: it is part of
   that file, kept apart so that run.c reads as the model. */

_Static_assert(MAX_BATCH % GEMM_TOKENS == 0, "prefill blocks are whole tiles");

static size_t row_bytes(const Matrix *w) { return dtype_row_bytes(w->dtype, w->cols); }

static const uint8_t *matrix_row(const Matrix *w, int r) {
    return (w->q ? w->q : (const uint8_t *)w->f) + (size_t)r * row_bytes(w);
}

// Group g of row r of a q8_0 or q4_0 matrix: its Q8_GROUP values q (as
// int8), and its float16 scale, returned.
static uint16_t row_group(const Matrix *w, int r, int g, int8_t *q) {
    const uint8_t *row = matrix_row(w, r);
    if (w->dtype == DTYPE_Q8_0) {
        Q8Block k = q8_block(row, w->cols, g / Q8_BLOCK);
        q8_group_values(q, k, g % Q8_BLOCK);
        return k.scale[g % Q8_BLOCK];
    }
    Q4Block k = q4_block(row, w->cols, g / Q8_BLOCK);
    q4_group_values(q, k, g % Q8_BLOCK);
    return k.scale[g % Q8_BLOCK];
}

// Columns [k0, k1) of row r of w as floats (k0 a multiple of Q8_GROUP, k1
// too or the row's end, for q8_0 and q4_0). For them this is the only
// dequantization there is: an embedding lookup, a slice of a prefill tile,
// a row of --kv-heads.
static void matrix_slice(const Matrix *w, int r, int k0, int k1, float *out) {
    const uint8_t *row = matrix_row(w, r);
    if (!w->q) { memcpy(out, (const float *)row + k0, (size_t)(k1 - k0) * sizeof(float)); return; }
    for (int g = k0 / Q8_GROUP; g * Q8_GROUP < k1; g++, out += Q8_GROUP) {
        int8_t q[Q8_GROUP]; // gathered first, then converted in one vector loop
        float scale = f16_to_f32(row_group(w, r, g, q));
        float v[Q8_GROUP];
        for (int i = 0; i < Q8_GROUP; i++) v[i] = q[i] * scale;
        memcpy(out, v, (size_t)(k1 - g * Q8_GROUP < Q8_GROUP ? k1 - g * Q8_GROUP : Q8_GROUP) * sizeof(float));
    }
}

// Asks the memory system for rows [r, r + nr), columns [k0, k0 + kn) of w,
// to arrive while the current tile computes: a tile's row slices are too
// scattered for the hardware prefetchers to guess.
// (Inlined by force: on its own, GCC judges a function that only prefetches to have no effect and drops the call.)
static inline __attribute__((always_inline)) void prefetch_block(const Matrix *w, int r, int nr, int k0, int kn) {
    size_t lo = (size_t)k0 * sizeof(float), hi = (size_t)(k0 + kn) * sizeof(float);
    if (w->q) { // the whole q8_0 / q4_0 blocks that hold the columns
        const size_t block_cols = Q8_BLOCK * Q8_GROUP, end = row_bytes(w);
        const size_t block_bytes = w->dtype == DTYPE_Q8_0 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
        lo = k0 / block_cols * block_bytes;
        hi = (k0 + kn + block_cols - 1) / block_cols * block_bytes;
        hi = hi < end ? hi : end;
    }
    for (int i = 0; i < nr; i++)
        for (size_t b = lo; b < hi; b += 64) PREFETCH_L2(matrix_row(w, r + i) + b);
}

// out (T, W.rows) = x (T, W.cols) @ W^T, for one or several matrices W that
// share the input x (q, k and v; gate and up), in one task: one hand-off to
// the threads, x quantized or transposed once.
//  T < VEC_LEN (decode): one dot product per (row, token), the row read from
//    memory once; q8_0 and q4_0 weights use integer dot products with x
//    quantized to q8_0 (xq, xs). The rows are cut into chunks of about CHUNK_BYTES of
//    weights; each thread works through its own contiguous share of chunks
//    (one stream for the hardware prefetcher), and one that finishes early
//    takes chunks from the back of the others' shares, so a core slowed by a
//    neighbour on the machine does not leave the other waiting. (A row's
//    result does not depend on which thread computes it.)
//  T >= VEC_LEN (prefill): register tiles over x^T into outT, transposed back
//    at the end. xT holds the block transposed, in panels of GEMM_TOKENS
//    tokens (the last padded with zeros): panel j is (cols, GEMM_TOKENS), so
//    a tile reads its tokens' inputs in one contiguous stream. With AVX-512
//    VNNI, q8_0 and q4_0 weights meet the block quantized, in integer tiles
//    (gemm_rows_int: as decode's arithmetic, at four times float32's
//    multiply-adds per instruction); elsewhere their rows are dequantized into
//    a small per-thread buffer, cheap next to the T multiply-adds each value feeds.
#define SMALL_WORK (1 << 16) // multiply-adds below which a matmul runs on the calling thread
#define ROW_QUANTUM 16       // thread shares start at multiples of this
#define CHUNK_BYTES (256 << 10)
#define MAX_PRODUCTS 3

typedef struct { float *out; const Matrix *w; } Product; // out (T, w->rows) = x @ w^T

typedef struct {
    Product p[MAX_PRODUCTS]; int n_products; int T; // all w have the same cols
    const float *x;                    // (T, cols)
    const int8_t *xq; const float *xs; const int32_t *sum128; // x quantized (q8_0, q4_0 weights): token t at
                                                              // t * padded_len(cols), t * n_groups(cols)
    const float *xT; float *outT;      // (Tpad / GEMM_TOKENS, cols, GEMM_TOKENS), (rows of all products, Tpad) (T >= VEC_LEN)
    int Tpad;
    float *scratch;                    // (n_threads, scratch_stride) dequantized weights
    size_t scratch_stride;
    int chunk_rows[MAX_PRODUCTS];      // decode: rows per chunk, about CHUNK_BYTES of weights ...
    int n_chunks[MAX_PRODUCTS];        // ... and chunks per product
    Share *shares;                     // decode: (n_threads) each thread's chunks still to do
    int n_shares;
} MatmulTask;

// Rows [r0, r1) of w for the T < VEC_LEN tokens of x, one loop per weight
// type with its kernel inlined in it (the type a constant). Decode is
// nearly all this loop. (With dot_q8 called once per row, 2048-wide q8_0
// rows took 125 ns each instead of 90, and whole-model decode was 26 % slower
// on one thread, 31 % on two: each call's entry and exit, and the spills
// around it, stall the stream of loads that should run ahead into the next
// row. Rows of 8192 barely noticed it.)
static inline __attribute__((always_inline)) void matvec_rows_of(const MatmulTask *a, const Product *p, int r0,
                                                                 int r1, int dtype) {
    const Matrix *w = p->w;
    const int n = w->cols;
    const size_t rb = row_bytes(w), xn = padded_len(n), xg = n_groups(n);
    const uint8_t *row = matrix_row(w, r0);
    for (int r = r0; r < r1; r++, row += rb)
        for (int t = 0; t < a->T; t++)
            p->out[(size_t)t * w->rows + r] =
                dtype == DTYPE_F32 ? dot((const float *)row, a->x + (size_t)t * n, n)
                                   : dot_int(row, a->xq + t * xn, a->xs + t * xg, a->sum128 + t * xg, n,
                                             dtype == DTYPE_Q8_0 ? 8 : 4);
}

static void matvec_rows(const MatmulTask *a, const Product *p, int r0, int r1) {
    switch (p->w->dtype) {
    case DTYPE_Q8_0: matvec_rows_of(a, p, r0, r1, DTYPE_Q8_0); break;
    case DTYPE_Q4_0: matvec_rows_of(a, p, r0, r1, DTYPE_Q4_0); break;
    default: matvec_rows_of(a, p, r0, r1, DTYPE_F32);
    }
}

// Takes the first (front) or the last chunk of a share; -1 when it is empty.
static int take_chunk(Share *sh, int front) {
    uint64_t v = atomic_load_explicit(&sh->range, memory_order_relaxed);
    for (;;) {
        uint32_t first = (uint32_t)v, end = (uint32_t)(v >> 32);
        if (first >= end) return -1;
        uint64_t next = front ? v + 1 : (uint64_t)(end - 1) << 32 | first;
        if (atomic_compare_exchange_weak_explicit(&sh->range, &v, next, memory_order_relaxed, memory_order_relaxed))
            return front ? (int)first : (int)end - 1;
    }
}

// Chunk c counts through the products in order: which product, which rows.
static void matvec_chunk(const MatmulTask *a, int c) {
    int i = 0;
    for (; c >= a->n_chunks[i]; i++) c -= a->n_chunks[i];
    int r0 = c * a->chunk_rows[i], rows = a->p[i].w->rows;
    matvec_rows(a, &a->p[i], r0, r0 + a->chunk_rows[i] < rows ? r0 + a->chunk_rows[i] : rows);
}

// Rows [lo, hi) of w for a block of T >= VEC_LEN tokens, into outT (w->rows, Tpad).
static void gemm_rows(const MatmulTask *a, const Matrix *w, float *outT, int lo, int hi, float *buf) {
    const int n = w->cols, Tp = a->Tpad;
    // k blocks outermost: a block of x^T (K_BLOCK, Tpad) stays in L2 cache
    // while every row tile of this thread passes over it
    const int tiled_hi = lo + (hi - lo) / GEMM_R * GEMM_R, rest = hi - tiled_hi;
    float rest_out[GEMM_R * MAX_BATCH]; // (GEMM_R, Tp) the last rows' tile, padded with zero rows
    for (int k0 = 0; k0 < n; k0 += K_BLOCK) {
        int kn = n - k0 < K_BLOCK ? n - k0 : K_BLOCK;
        const float *xT = a->xT + (size_t)k0 * GEMM_TOKENS; // (Tp / GEMM_TOKENS panels of (kn, GEMM_TOKENS))
        for (int r = lo; r < tiled_hi; r += GEMM_R) {
            if (r + GEMM_R < tiled_hi) prefetch_block(w, r + GEMM_R, GEMM_R, k0, kn);
            const float *rows = w->f + (size_t)r * n + k0; // the tile's (GEMM_R, kn) block
            size_t ldw = n;
            if (w->q) {
                for (int i = 0; i < GEMM_R; i++) matrix_slice(w, r + i, k0, k0 + kn, buf + (size_t)i * kn);
                rows = buf, ldw = kn;
            }
            for (int t = 0; t < Tp; t += GEMM_TOKENS)
                gemm_tile(outT + (size_t)r * Tp + t, Tp, rows, ldw, xT + (size_t)t * n, GEMM_TOKENS, kn, k0 > 0);
        }
        if (rest) { // the share's last rows, fewer than GEMM_R: one more tile, so that every row is
                    // summed in the same order wherever the thread shares begin (-T 1 == -T 2)
            for (int i = 0; i < GEMM_R; i++)
                if (i < rest) matrix_slice(w, tiled_hi + i, k0, k0 + kn, buf + (size_t)i * kn);
                else memset(buf + (size_t)i * kn, 0, kn * sizeof(float));
            for (int t = 0; t < Tp; t += GEMM_TOKENS)
                gemm_tile(rest_out + t, Tp, buf, kn, xT + (size_t)t * n, GEMM_TOKENS, kn, k0 > 0);
        }
    }
    if (rest) memcpy(outT + (size_t)tiled_hi * Tp, rest_out, (size_t)rest * Tp * sizeof(float));
}

// Rows [lo, hi) of p for a block of T >= VEC_LEN tokens quantized (q8_0 or
// q4_0 weights, AVX-512 VNNI), straight into p->out: integer register tiles
// over whole rows, Q8_TILE_R rows meeting every token in turn.
static void gemm_rows_int(const MatmulTask *a, const Product *p, int lo, int hi) {
    int r = lo;
#if Q8_GEMM
    const Matrix *w = p->w;
    const int n = w->cols;
    const size_t xg = n_groups(n), xn = padded_len(n);
    float tile[Q8_TILE_T * Q8_TILE_R]; // (token, row)
    // the next tile's rows (contiguous bytes) are prefetched a few lines per token tile
    const size_t tile_bytes = Q8_TILE_R * row_bytes(w), per_tile = tile_bytes / ((a->T + Q8_TILE_T - 1) / Q8_TILE_T) + 64;
    for (; r + Q8_TILE_R <= hi; r += Q8_TILE_R)
        for (int t = 0; t < a->T; t += Q8_TILE_T) { // the last tile may reach into the zero padding tokens
            if (r + 2 * Q8_TILE_R <= hi) {
                const uint8_t *next = matrix_row(w, r + Q8_TILE_R);
                size_t from = t / Q8_TILE_T * per_tile, to = from + per_tile < tile_bytes ? from + per_tile : tile_bytes;
                for (size_t b = from; b < to; b += 64) PREFETCH_L2(next + b);
            }
            (w->dtype == DTYPE_Q8_0 ? gemm_tile_q8 : gemm_tile_q4)(tile, Q8_TILE_R, matrix_row(w, r), row_bytes(w),
                                                                   a->xq + t * xn, a->xs + t * xg, a->sum128 + t * xg, n);
            for (int i = 0; i < Q8_TILE_T && t + i < a->T; i++)
                memcpy(p->out + (size_t)(t + i) * w->rows + r, tile + i * Q8_TILE_R, sizeof(float) * Q8_TILE_R);
        }
#endif
    matvec_rows(a, p, r, hi); // the matrix's last few rows
}

static void matmul_task(void *arg, int ith, int nth) {
    MatmulTask *a = arg;
    if (a->T < VEC_LEN) {
        int c;
        if (ith < a->n_shares)
            while ((c = take_chunk(&a->shares[ith], 1)) >= 0) matvec_chunk(a, c);
        for (int k = 1; k < a->n_shares; k++) // then help the others, from the back of their shares
            while ((c = take_chunk(&a->shares[(ith + k) % a->n_shares], 0)) >= 0) matvec_chunk(a, c);
        return;
    }
    float *buf = a->scratch + (size_t)ith * a->scratch_stride, *outT = a->outT;
    for (int i = 0; i < a->n_products; i++) {
        const Product *p = &a->p[i];
        int lo, hi;
        split_range(p->w->rows, ith, nth, ROW_QUANTUM, &lo, &hi); // tiles start at the same rows for any thread count
        if (Q8_GEMM && p->w->q) { gemm_rows_int(a, p, lo, hi); continue; }
        gemm_rows(a, p->w, outT, lo, hi, buf);
        for (int t = 0; t < a->T; t++)
            for (int r = lo; r < hi; r++) p->out[(size_t)t * p->w->rows + r] = outT[(size_t)r * a->Tpad + t];
        outT += (size_t)p->w->rows * a->Tpad;
    }
}

// The T tokens of x (T, n) quantized into xq, xs, sum128, and tokens T ..
// Tq - 1 zero (the integer tile's padding).
typedef struct { RunState *s; const float *x; int n, T, Tq; } QuantizeTask;

static void quantize_task(void *arg, int ith, int nth) {
    QuantizeTask *a = arg;
    RunState *s = a->s;
    const int n = a->n;
    int lo, hi;
    split_range(a->Tq, ith, nth, 1, &lo, &hi);
    const size_t xn = padded_len(n), xg = n_groups(n);
    for (int t = lo; t < hi; t++) {
        if (t < a->T) quantize_q8(s->xq + t * xn, s->xs + t * xg, s->sum128 + t * xg, a->x + (size_t)t * n, n);
        else {
            memset(s->xq + t * xn, 0, xn);
            memset(s->xs + t * xg, 0, xg * sizeof(float));
            memset(s->sum128 + t * xg, 0, xg * sizeof(int32_t));
        }
    }
}

static void matmuls(Transformer *m, const float *x, int T, const Product *p, int n_products) {
    RunState *s = &m->s;
    const int n = p[0].w->cols, Tpad = (T + GEMM_TOKENS - 1) / GEMM_TOKENS * GEMM_TOKENS;
    MatmulTask task = {.n_products = n_products, .T = T, .x = x, .xq = s->xq, .xs = s->xs, .sum128 = s->sum128, .xT = s->xT,
                       .outT = s->outT, .Tpad = Tpad, .scratch = s->scratch, .scratch_stride = s->scratch_stride};
    size_t work = 0;
    for (int i = 0; i < n_products; i++) {
        task.p[i] = p[i];
        work += (size_t)p[i].w->rows * n * T;
        task.chunk_rows[i] = CHUNK_BYTES / row_bytes(p[i].w) / ROW_QUANTUM * ROW_QUANTUM + ROW_QUANTUM;
        task.n_chunks[i] = (p[i].w->rows + task.chunk_rows[i] - 1) / task.chunk_rows[i];
    }
    if (T < VEC_LEN) { // decode: each thread's share of the chunks
        int chunks = 0;
        for (int i = 0; i < n_products; i++) chunks += task.n_chunks[i];
        task.shares = s->shares, task.n_shares = m->n_threads;
        for (int t = 0; t < m->n_threads; t++) {
            uint64_t first = (uint64_t)chunks * t / m->n_threads, end = (uint64_t)chunks * (t + 1) / m->n_threads;
            atomic_store_explicit(&s->shares[t].range, end << 32 | first, memory_order_relaxed);
        }
    }
    const int integer = p[0].w->q && (T < VEC_LEN || Q8_GEMM); // x quantized, else (prefill) x^T
    if (integer) { // a block's tokens are quantized by all threads
        QuantizeTask q = {s, x, n, T, T < VEC_LEN ? T : (T + Q8_TILE_T - 1) / Q8_TILE_T * Q8_TILE_T};
        if (T < VEC_LEN) quantize_task(&q, 0, 1);
        else pool_run(m->pool, quantize_task, &q);
    } else if (T >= VEC_LEN) // x^T, zero-padded to Tpad tokens
        for (int k = 0; k < n; k++)
            for (int t = 0; t < Tpad; t++) // panel t / GEMM_TOKENS, row k, lane t % GEMM_TOKENS
                s->xT[(size_t)t / GEMM_TOKENS * n * GEMM_TOKENS + (size_t)k * GEMM_TOKENS + t % GEMM_TOKENS] =
                    t < T ? x[(size_t)t * n + k] : 0;
    // waking the workers costs microseconds: not worth it for a tiny product
    if (work < SMALL_WORK) matmul_task(&task, 0, 1);
    else pool_run(m->pool, matmul_task, &task);
}

static void matmul(Transformer *m, float *out, const float *x, const Matrix *w, int T) {
    matmuls(m, x, T, &(Product){out, w}, 1);
}

// Per-head products of MLA's absorbed up-projections: out (T, heads, R) =
// W_h (R, C) @ x (T, heads, C) for every head h, W = (heads * R, C) the
// heads' matrices stacked. q8_0 weights meet x quantized head by head (a
// q8_0 vector's values are interleaved within blocks of up to 32 groups, so
// each head's C values are quantized as a vector of their own).
typedef struct { Transformer *m; float *out; const float *x; const Matrix *w; int T, heads; } HeadTask;

static void head_task(void *arg, int ith, int nth) {
    const HeadTask *a = arg;
    const RunState *s = &a->m->s;
    const Matrix *w = a->w;
    const int C = w->cols, R = w->rows / a->heads;
    int lo, hi;
    split_range(a->T * a->heads, ith, nth, 1, &lo, &hi);
    for (int item = lo; item < hi; item++) { // item = t * heads + h: rows [h R, (h + 1) R) of W for x_item
        int h = item % a->heads;
        const float *x = a->x + (size_t)item * C;
        int8_t *xq = s->xq + (size_t)item * padded_len(C);
        float *xs = s->xs + (size_t)item * n_groups(C);
        int32_t *sum128 = s->sum128 + (size_t)item * n_groups(C);
        if (w->q) quantize_q8(xq, xs, sum128, x, C); // by the thread that uses it
        MatmulTask one = {.T = 1, .x = x, .xq = xq, .xs = xs, .sum128 = sum128};
        Product p = {a->out + (size_t)(item - h) * R, w}; // row h R + r lands at item R + r
        matvec_rows(&one, &p, h * R, (h + 1) * R);
    }
}

static void head_matmul(Transformer *m, float *out, const float *x, const Matrix *w, int T) {
    const int heads = m->c.n_heads;
    HeadTask task = {m, out, x, w, T, heads};
    if ((size_t)T * w->rows * w->cols < SMALL_WORK) head_task(&task, 0, 1);
    else pool_run(m->pool, head_task, &task);
}

// MLA's W_UK^T, kept as its columns (run.c, make_columns): out (T, heads, R)
// = W_h x_h for every token and head h, x (T, heads, C).
typedef struct { const Columns *w; float *out; const float *x; int items; } ColumnTask;

static void column_task(void *arg, int ith, int nth) {
    const ColumnTask *a = arg;
    const Columns *w = a->w;
    int lo, hi;
    split_range(a->items, ith, nth, 1, &lo, &hi);
    for (int item = lo; item < hi; item++) { // item = t * heads + h
        size_t h = item % w->heads, at = h * w->C * w->padded;
        column_matvec(a->out + (size_t)item * w->R, a->x + (size_t)item * w->C, w->f ? w->f + at : NULL,
                      w->q ? w->q + at : NULL, w->q ? w->scale + h * n_groups(w->C) * w->padded : NULL, w->R, w->C);
    }
}

static void column_matmul(Transformer *m, float *out, const float *x, const Columns *w, int T) {
    ColumnTask task = {w, out, x, T * w->heads};
    if ((size_t)T * w->heads * w->R * w->C < SMALL_WORK) column_task(&task, 0, 1);
    else pool_run(m->pool, column_task, &task);
}

// RoPE: rotate each pair (x[2i], x[2i+1]) of every head by the angle pos * freq[i].
