/* run.c - inference for Llama-3-style models in one file of plain C.

   Read top to bottom: the model (config, weights, KV cache), loading a
   checkpoint by mmap, the matrix products across the threads, the forward
   pass with grouped-query attention, the sampler, then generation,
   perplexity, chat and the command line. The arithmetic kernels under them
   (dot products in f32 and int8, softmax, the attention and GEMM inner
   loops, the q8_0 and q4_0 formats) are in kernels.h; the thread pool is in pool.h.

   Build: make        Run: ./run model.bin -i "Once upon a time"
   The file format is documented in model.h; export/export.py writes it. */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"
#include "model.h"
#include "pool.h"
#include "tokenizer.h"

// ----------------------------------------------------------------------------
// Errors: one line on stderr, a non-zero exit. Used for every user-facing error.

#ifdef FUZZING
#include <setjmp.h>
static jmp_buf die_jump; // tests/fuzz: die() returns to the harness's setjmp instead of exiting
#endif

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
#ifdef FUZZING
    longjmp(die_jump, 1);
#endif
    exit(1);
}

// Zeroed and 64-byte aligned: the kernels' 64-byte loads of activations
// (quantized x, scales, scores) then never straddle two cache lines. calloc's
// large blocks start 16 bytes into a page, which made every such load a split
// one: the q4_0 row kernel took 25 % longer in cache.
static void *xcalloc(size_t n, size_t size, const char *what) {
    size_t bytes = n * size;
    if (size && bytes / size != n) bytes = SIZE_MAX;
    void *p = bytes > SIZE_MAX - 64 ? NULL : aligned_alloc(64, (bytes + 64) / 64 * 64);
    if (!p) die("out of memory allocating %s (%zu x %zu bytes); try a smaller -c", what, n, size);
    return memset(p, 0, bytes);
}

// ----------------------------------------------------------------------------
// The model: config, weights (pointers into the mmapped file), run state

typedef struct {
    int dim;         // residual stream width
    int hidden_dim;  // SwiGLU inner width
    int n_layers;
    int n_heads;     // query heads
    int n_kv_heads;  // key/value heads, each shared by kv_mul query heads
    int head_dim;
    int kv_mul;      // n_heads / n_kv_heads: query heads per KV head
    int q_dim;       // n_heads * head_dim
    int kv_dim;      // n_kv_heads * head_dim: what one position adds to the cache (GQA)
    int attention;   // ATTENTION_GQA (MHA, GQA, MQA) or ATTENTION_MLA
    int kv_latent_dim, kv_rope_dim; // MLA: the latent c and the shared RoPE key k_R of a position
    int key_dim;     // numbers per position and KV head in the key cache: head_dim, or MLA's kv_rope_dim
    int value_dim;   // ... in the value cache: head_dim, or MLA's kv_latent_dim (c: value and key at once)
    int vocab_size;
    int max_seq_len; // trained context
    int seq_len;     // context in use (-c), <= max_seq_len
    int kv_type;     // KV_* element type of the cache (--kv-type; 0 = KV_F32)
    float norm_eps;
} Config;

// A weight matrix (rows, cols), y = W x: f or q is set, by its dtype.
typedef struct {
    const float *f;    // DTYPE_F32: (rows, cols)
    const uint8_t *q;  // DTYPE_Q8_0, DTYPE_Q4_0: rows of blocks of values and float16 scales (model.h)
    int dtype;         // DTYPE_*
    int rows, cols;
} Matrix;

// A matrix of `heads` blocks of R rows and C columns, kept column by column
// (kernels.h, column_matvec): MLA's W_UK_h^T, whose rows are head_dim short.
typedef struct {
    const float *f;        // f32: (heads, C x padded) numbers, head h's number (i, r) at column_slot(C, i, r)
    const int8_t *q;       // q8_0, q4_0: (heads, C x padded) the int8 values, as f ...
    const uint16_t *scale; // ... and (heads, n_groups(C) x padded) float16 scales of the rows' groups
    int heads, R, C;
    size_t padded;         // R rounded up to whole blocks of COLUMN_BLOCK rows (kernels.h)
} Columns;

typedef struct {
    const float *attn_norm; // (dim)
    Matrix wq;              // (q_dim, dim); MLA: the query's part without RoPE, q_C
    Matrix wk;              // (kv_dim, dim)                          GQA only
    Matrix wv;              // (kv_dim, dim)                          GQA only
    // MLA only (model.h): dc = kv_latent_dim, dr = kv_rope_dim
    const int32_t *rope_pairs; // (dr / 2) the RoPE frequency (pair of a head) of each pair of k_R
    Matrix wq_rope;         // (n_heads * dr, dim) the query's RoPE part, q_R
    Matrix wkv_a;           // (dc + dr, dim) W_DKV then W_KR: the latent c and the shared key k_R
    Matrix wk_b;            // (n_heads * dc, head_dim) W_UK_h^T per head: absorbed into the query ...
    Columns uk;             // ... and as decode reads it: transposed at load (make_columns)
    Matrix wv_b;            // (n_heads * head_dim, dc) W_UV_h per head: absorbed into the output
    Matrix wo;              // (dim, q_dim)
    const float *ffn_norm;  // (dim)
    Matrix w1;              // (hidden_dim, dim)  gate
    Matrix w2;              // (dim, hidden_dim)  down
    Matrix w3;              // (hidden_dim, dim)  up
} Layer;

typedef struct {
    Matrix token_embedding; // (vocab_size, dim)
    Layer *layers;          // (n_layers)
    const float *final_norm;// (dim)
    Matrix classifier;      // (vocab_size, dim); the embedding when tied
} Weights;

// A thread's share of a matmul's row chunks [first, end), taken from the
// front by its owner and from the back by threads that are done with theirs.
typedef struct { _Alignas(64) _Atomic uint64_t range; } Share; // end << 32 | first; a cache line each

#define MAX_BATCH 128 // tokens per forward call during prefill (a multiple of GEMM_TOKENS)
#define ATT_BLOCK 32 // positions whose V rows (8 KB at head_dim 64) stay in L1 cache while the group's query heads use them
_Static_assert(ATT_BLOCK >= VEC_LEN, "kv_f32 holds a key tile or a value block");
#define KV_F32_WIDTH(c) ((c)->key_dim > (c)->value_dim ? (c)->key_dim : (c)->value_dim)

// A key or value cache: for each layer and KV head, `len` positions of
// `width` numbers stored as `type` (kernels.h), one contiguous stream of len x
// row_bytes bytes per head, in position order. Keys are stored in tiles of
// VEC_LEN positions (`tiled`), each tile's rows interleaved (kv_slot), so
// that attention scores a whole tile with vector multiply-adds along the
// width; values row by row.
typedef struct {
    uint8_t *data;    // (n_layers, heads, len, row_bytes)
    int type, width, heads, tiled;
    int q8_rows;      // MLA's latent rows of a q8_0 cache, stored as q8_0 weight rows (kernels.h, kv_store_q8_row)
    size_t len;       // positions: the context rounded up to whole tiles
    size_t row_bytes; // of one position's width numbers: kv_row_bytes(type, width)
    size_t bytes;     // of the whole cache
} KVCache;

// A thread's query heads quantized as matmul activations (quantize_q8):
// (kv_mul, padded_len(value_dim)) values, (kv_mul, n_groups(value_dim)) scales and sums.
typedef struct { int8_t *q; float *s; int32_t *sum128; } LatentQuery;

// Activations for a block of up to MAX_BATCH tokens, and the KV cache.
typedef struct {
    float *x;       // (B, dim) residual stream
    float *xb;      // (B, max(dim, q_dim)) normed input / attention output
    float *xb2;     // (B, dim)
    float *q;       // (B, q_dim)
    float *k, *v;   // (B, kv_dim) before they go into the cache
    float *q_rope;  // MLA: (B, n_heads * kv_rope_dim) the query's RoPE part
    float *kv_a;    // MLA: (B, kv_latent_dim + kv_rope_dim) the latent c and k_R, before the cache
    float *q_lat;   // MLA: (B, n_heads * kv_latent_dim) the query absorbed into the latent: W_UK_h^T q_C
    float *o_lat;   // MLA: (B, n_heads * kv_latent_dim) each head's attention output, in the latent
    float *hb;      // (B, hidden_dim)
    float *hb2;     // (B, hidden_dim)
    float *att;     // (n_threads, kv_mul, cache_len) attention scores
    float *kv_f32;  // (n_threads, ATT_BLOCK, max(key_dim, value_dim)) an f16 / q8_0 key tile or value block as float32
    LatentQuery *lat_q; // (n_threads) MLA with a q8_0 cache: the heads' latent queries quantized (q8_row_scores)
    int *lat_order;     // (value_dim) where each latent number lies in a q8_rows row's stored order
    float *logits;  // (B, vocab_size)
    int8_t *xq;     // (B + Q8_TILE_T - 1, padded_len(max_cols)) matmul input quantized to q8_0 ...
    float *xs;      // (B + Q8_TILE_T - 1, n_groups(max_cols)) ... its scales ...
    int32_t *sum128; // (B + Q8_TILE_T - 1, n_groups(max_cols)) ... and 128 x its groups' sums (quantize_q8)
    float *xT;      // (B / GEMM_TOKENS, max_cols, GEMM_TOKENS) a block's matmul input, transposed in panels
    float *outT;    // (max_rows, B) a block's matmul output, transposed (all matrices of a matmuls() call)
    float *scratch; // (n_threads, scratch_stride) dequantized weights: a tile, or a row
    Share *shares;  // (n_threads) decode matmul work still to do
    size_t scratch_stride;
    // The grouped KV cache: only n_kv_heads heads per position, never n_heads.
    // MLA: one KV head, its key tiles hold k_R and its value rows the latent c.
    KVCache key_cache;   // (n_layers, n_kv_heads, cache_len / VEC_LEN, tile of VEC_LEN rows of key_dim)
    KVCache value_cache; // (n_layers, n_kv_heads, cache_len, row of value_dim)
    float *rope_freq;   // (head_dim / 2) rotation frequency of each pair
    float *mla_freq;    // MLA: (n_layers, kv_rope_dim / 2) rotation frequency of each pair of k_R
} RunState;


typedef struct {
    Config c;
    ModelHeader h;
    Weights w;
    RunState s;
    Tokenizer *tok;
    ThreadPool *pool;
    int n_threads;
    const char *path; // of the model file, for error messages
    void *map;        // the mmapped file
    size_t map_bytes;
    void **owned;     // weights the engine computed itself (--kv-heads), freed at the end
    int n_owned;
} Transformer;

// ----------------------------------------------------------------------------
// Loading: mmap the file, check every header field, point the weights into it

static size_t align_up(size_t n) { return (n + MODEL_ALIGN - 1) / MODEL_ALIGN * MODEL_ALIGN; }

// Bytes of one row of cols values of type dtype: f32 values, or groups of
// 32 values (the last zero-padded) as int8 or 4-bit numbers with a float16 scale each.
static size_t dtype_row_bytes(int dtype, size_t cols) {
    size_t groups = (cols + Q8_GROUP - 1) / Q8_GROUP;
    if (dtype == DTYPE_Q8_0) return groups * (Q8_GROUP + sizeof(uint16_t));
    if (dtype == DTYPE_Q4_0) return groups * (Q8_GROUP / 2 + sizeof(uint16_t));
    return cols * sizeof(float);
}

// Bytes a (rows, cols) tensor occupies in the file, padding included.
static size_t tensor_bytes(size_t rows, size_t cols, int dtype) { return align_up(rows * dtype_row_bytes(dtype, cols)); }

// Walks the tensors in file order (model.h); with m != NULL, points them into the map.
static size_t layout_weights(const ModelHeader *h, Transformer *m) {
    size_t dim = h->dim, hid = h->hidden_dim, qd = (size_t)h->n_heads * h->head_dim;
    size_t kvd = (size_t)h->n_kv_heads * h->head_dim, V = h->vocab_size;
    size_t dc = h->kv_latent_dim, dr = h->kv_rope_dim, nh = h->n_heads, hd = h->head_dim;
    size_t off = h->weights_offset;
    const uint8_t *base = m ? m->map : NULL;
#define TYPED_MATRIX(dst, R, C, DTYPE) do { \
        if (m) { Matrix *mt = (dst); mt->rows = (int)(R); mt->cols = (int)(C); mt->dtype = (DTYPE); \
            if (mt->dtype == DTYPE_F32) mt->f = (const float *)(base + off); \
            else mt->q = base + off; } \
        off += tensor_bytes((R), (C), (DTYPE)); } while (0)
#define MATRIX(dst, R, C) TYPED_MATRIX(dst, R, C, h->dtype)
#define VECTOR(dst, N) do { if (m) (dst) = (const float *)(base + off); \
        off += tensor_bytes((N), 1, DTYPE_F32); } while (0)
    TYPED_MATRIX(m ? &m->w.token_embedding : NULL, V, dim, h->embedding_dtype);
    for (int l = 0; l < h->n_layers; l++) {
        Layer *L = m ? &m->w.layers[l] : NULL;
        VECTOR(L->attn_norm, dim);
        if (h->attention == ATTENTION_MLA) {
            if (m) L->rope_pairs = (const int32_t *)(base + off);
            off += tensor_bytes(dr / 2, 1, DTYPE_F32); // int32, as wide as f32
            MATRIX(L ? &L->wq : NULL, qd, dim);
            MATRIX(L ? &L->wq_rope : NULL, nh * dr, dim);
            MATRIX(L ? &L->wkv_a : NULL, dc + dr, dim);
            MATRIX(L ? &L->wk_b : NULL, nh * dc, hd);
            MATRIX(L ? &L->wv_b : NULL, nh * hd, dc);
        } else {
            MATRIX(L ? &L->wq : NULL, qd, dim);
            MATRIX(L ? &L->wk : NULL, kvd, dim);
            MATRIX(L ? &L->wv : NULL, kvd, dim);
        }
        MATRIX(L ? &L->wo : NULL, dim, qd);
        VECTOR(L->ffn_norm, dim);
        MATRIX(L ? &L->w1 : NULL, hid, dim);
        MATRIX(L ? &L->w2 : NULL, dim, hid);
        MATRIX(L ? &L->w3 : NULL, hid, dim);
    }
    VECTOR(m->w.final_norm, dim);
    if (h->tied_classifier) { if (m) m->w.classifier = m->w.token_embedding; }
    else TYPED_MATRIX(m ? &m->w.classifier : NULL, V, dim, h->embedding_dtype);
#undef TYPED_MATRIX
#undef MATRIX
#undef VECTOR
    return off;
}

static const char *dtype_name(int dtype) {
    return dtype == DTYPE_F32 ? "f32" : dtype == DTYPE_Q8_0 ? "q8_0" : dtype == DTYPE_Q4_0 ? "q4_0" : "unknown";
}

// Range checks of the header, before any size is computed from it.
static void check_header(const ModelHeader *h, const char *path, size_t file_bytes) {
    if (h->magic != MODEL_MAGIC) {
        const int32_t *legacy = (const int32_t *)h; // llama2.c: dim, hidden, layers, heads, kv heads, vocab, seq
        if (legacy[0] > 0 && legacy[0] < 65536 && legacy[2] > 0 && legacy[2] < 1024 && legacy[3] > 0)
            die("%s: not a model file of this engine (it looks like a llama2.c checkpoint); convert it: "
                "python3 export/export.py out.bin --llama2c %s --tokenizer tokenizer.bin", path, path);
        die("%s: not a model file of this engine (bad magic); convert a checkpoint with export/export.py", path);
    }
    if (h->version < MODEL_VERSION_OLDEST || h->version > MODEL_VERSION)
        die("%s: format version %u, this engine reads versions %d to %d; re-export the model", path, h->version,
            MODEL_VERSION_OLDEST, MODEL_VERSION);
    const int mla = h->attention == ATTENTION_MLA; // the MLA sizes are 0 for GQA
    struct { const char *name; long long v, lo, hi; } f[] = { // long long: vocab_size - 1 cannot overflow
        {"dim", h->dim, 1, 1 << 16}, {"hidden_dim", h->hidden_dim, 1, 1 << 18},
        {"n_layers", h->n_layers, 1, 1024}, {"n_heads", h->n_heads, 1, 1024},
        {"n_kv_heads", h->n_kv_heads, 1, 1024}, {"head_dim", h->head_dim, 2, 1 << 12},
        {"vocab_size", h->vocab_size, 1, 1 << 22}, {"max_seq_len", h->max_seq_len, 1, 1 << 24},
        {"n_stop_ids", h->n_stop_ids, 0, MODEL_MAX_STOP_IDS}, {"dtype", h->dtype, DTYPE_F32, DTYPE_Q4_0},
        {"rope_scaling", h->rope_scaling, ROPE_SCALING_NONE, ROPE_SCALING_LLAMA3},
        {"tied_classifier", h->tied_classifier, 0, 1},
        {"tokenizer_kind", h->tokenizer_kind, TOKENIZER_LLAMA2C, TOKENIZER_LLAMA3},
        {"bos_id", h->bos_id, -1, h->vocab_size - 1LL},
        {"attention", h->attention, ATTENTION_GQA, ATTENTION_MLA},
        {"kv_latent_dim", h->kv_latent_dim, mla, mla << 16}, {"kv_rope_dim", h->kv_rope_dim, 2 * mla, mla << 12},
        {"embedding_dtype", h->embedding_dtype, DTYPE_F32, DTYPE_Q4_0},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v < f[i].lo || f[i].v > f[i].hi)
            die("%s: header field %s = %lld is out of range [%lld, %lld]; corrupt file?", path, f[i].name, f[i].v, f[i].lo, f[i].hi);
    if (h->n_heads % h->n_kv_heads != 0)
        die("%s: n_heads (%d) is not a multiple of n_kv_heads (%d)", path, h->n_heads, h->n_kv_heads);
    if (h->head_dim % 2 != 0) die("%s: head_dim (%d) must be even for RoPE", path, h->head_dim);
    if (mla && h->n_kv_heads != 1)
        die("%s: an MLA model has one KV head (the latent all query heads share), the header says n_kv_heads = %d",
            path, h->n_kv_heads);
    if (h->kv_rope_dim % 2 != 0) die("%s: kv_rope_dim (%d) must be even for RoPE", path, h->kv_rope_dim);
    const int grouped = h->dtype != DTYPE_F32 ? h->dtype : h->embedding_dtype; // a quantized dtype, if any
    if (grouped != DTYPE_F32 && h->group_size != 32)
        die("%s: %s group_size is %d; this engine reads groups of 32", path, dtype_name(grouped), h->group_size);
    if (grouped == DTYPE_F32 && h->group_size != 0)
        die("%s: f32 weights with group_size %d (must be 0); corrupt file?", path, h->group_size);
    if (h->reserved != 0) die("%s: header field reserved = %d (must be 0); corrupt file?", path, h->reserved);
    for (int i = 0; i < h->n_stop_ids; i++)
        if (h->stop_ids[i] < 0 || h->stop_ids[i] >= h->vocab_size)
            die("%s: stop id %d is outside the vocabulary (%d)", path, h->stop_ids[i], h->vocab_size);
    if (!(h->norm_eps > 0 && h->norm_eps < 1)) die("%s: norm_eps %g is out of range (0, 1)", path, h->norm_eps);
    if (!(h->rope_theta > 1 && isfinite(h->rope_theta))) die("%s: rope_theta %g must be finite and > 1", path, h->rope_theta);
    if (h->rope_scaling == ROPE_SCALING_LLAMA3 &&
        !(h->rope_factor >= 1 && isfinite(h->rope_factor) && h->rope_low_freq_factor > 0
          && h->rope_high_freq_factor > h->rope_low_freq_factor && isfinite(h->rope_high_freq_factor)
          && h->rope_original_max_pos > 0))
        die("%s: inconsistent llama3 rope scaling parameters", path);
    if (h->file_bytes != file_bytes)
        die("%s: file is %zu bytes, header says %llu; truncated download or corrupt file? re-export it",
            path, file_bytes, (unsigned long long)h->file_bytes);
    if (h->tokenizer_offset < MODEL_HEADER_BYTES || h->tokenizer_bytes > file_bytes
        || h->tokenizer_offset > file_bytes - h->tokenizer_bytes
        || h->tokenizer_offset + h->tokenizer_bytes > h->weights_offset)
        die("%s: the tokenizer section [%llu, +%llu) is outside its place in the file", path,
            (unsigned long long)h->tokenizer_offset, (unsigned long long)h->tokenizer_bytes);
    if (h->weights_offset % MODEL_ALIGN || h->weights_offset > file_bytes)
        die("%s: weights_offset %llu is not 64-byte aligned inside the file", path, (unsigned long long)h->weights_offset);
    size_t end = layout_weights(h, NULL); // all factors < 2^24, so no size_t overflow
    if (end != file_bytes)
        die("%s: the header implies %zu bytes of file, the file has %zu; corrupt or truncated", path, end, file_bytes);
}

// Checks the checkpoint at m->map (m->map_bytes >= MODEL_HEADER_BYTES bytes)
// and points the config, the weights and the tokenizer into it. Apart from
// the file handling so that tests/fuzz/fuzz_loader.c can feed it bytes.
static void load_checkpoint(Transformer *m, const char *path) {
    m->path = path;
    memcpy(&m->h, m->map, sizeof m->h);
    if (m->h.version == 3) { // before the version 4 fields: GQA, every matrix of one dtype
        m->h.attention = ATTENTION_GQA; m->h.kv_latent_dim = m->h.kv_rope_dim = 0;
        m->h.embedding_dtype = m->h.dtype;
    }
    const ModelHeader *h = &m->h;
    check_header(h, path, m->map_bytes);

    Config *c = &m->c;
    c->dim = h->dim; c->hidden_dim = h->hidden_dim; c->n_layers = h->n_layers;
    c->n_heads = h->n_heads; c->n_kv_heads = h->n_kv_heads; c->head_dim = h->head_dim;
    c->kv_mul = h->n_heads / h->n_kv_heads;
    c->q_dim = h->n_heads * h->head_dim;
    c->kv_dim = h->n_kv_heads * h->head_dim;
    c->vocab_size = h->vocab_size;
    c->max_seq_len = c->seq_len = h->max_seq_len;
    c->norm_eps = h->norm_eps;

    c->attention = h->attention;
    c->kv_latent_dim = h->kv_latent_dim; c->kv_rope_dim = h->kv_rope_dim;
    c->key_dim = h->attention == ATTENTION_MLA ? h->kv_rope_dim : h->head_dim;
    c->value_dim = h->attention == ATTENTION_MLA ? h->kv_latent_dim : h->head_dim;

    m->w.layers = xcalloc(c->n_layers, sizeof(Layer), "layers");
    layout_weights(h, m);
    for (int l = 0; l < c->n_layers && c->attention == ATTENTION_MLA; l++)
        for (int j = 0; j < c->kv_rope_dim / 2; j++) {
            int32_t i = m->w.layers[l].rope_pairs[j];
            if (i < 0 || i >= c->head_dim / 2)
                die("%s: layer %d: rope_pairs[%d] = %d is not a pair of a head (0 .. %d); corrupt file?",
                    path, l, j, i, c->head_dim / 2 - 1);
        }

    char err[256];
    m->tok = tokenizer_build(h->tokenizer_kind, (const uint8_t *)m->map + h->tokenizer_offset,
                             h->tokenizer_bytes, err, sizeof err);
    if (!m->tok) die("%s: bad tokenizer section: %s", path, err);
    if (tokenizer_n_tokens(m->tok) != c->vocab_size)
        die("%s: the tokenizer has %d tokens, the model %d", path, tokenizer_n_tokens(m->tok), c->vocab_size);
}

static void build_transformer(Transformer *m, const char *path) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    if ((size_t)st.st_size < MODEL_HEADER_BYTES)
        die("%s: file is %lld bytes, too short for a model header (%d); truncated?", path, (long long)st.st_size, MODEL_HEADER_BYTES);
    m->map_bytes = (size_t)st.st_size;
    m->map = mmap(NULL, m->map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) die("cannot mmap %s: %s", path, strerror(errno));
    load_checkpoint(m, path);
}

// RoPE frequency of each pair i of a head: theta^(-2i/head_dim), with Llama 3.1's
// rescaling: long wavelengths (low frequencies) are slowed by `factor`, short
// ones kept, and the band between interpolated smoothly.
static void rope_frequencies(const ModelHeader *h, float *freq) {
    for (int i = 0; i < h->head_dim / 2; i++) {
        double f = pow(h->rope_theta, -2.0 * i / h->head_dim);
        if (h->rope_scaling == ROPE_SCALING_LLAMA3) {
            double wavelen = 2 * M_PI / f, old_ctx = h->rope_original_max_pos;
            double low_wavelen = old_ctx / h->rope_low_freq_factor;   // longer than this: scaled
            double high_wavelen = old_ctx / h->rope_high_freq_factor; // shorter than this: kept
            if (wavelen > low_wavelen) f /= h->rope_factor;
            else if (wavelen >= high_wavelen) {
                double smooth = (old_ctx / wavelen - h->rope_low_freq_factor)
                              / (h->rope_high_freq_factor - h->rope_low_freq_factor);
                f = (1 - smooth) * f / h->rope_factor + smooth * f;
            }
        }
        freq[i] = (float)f;
    }
}

// ----------------------------------------------------------------------------
// Matrix products: the building blocks (dot products in f32 and q8_0, the
// attention kernels, rmsnorm, softmax, the GEMM tile) are in kernels.h;
// here they are put to work on the model's matrices, across the threads.
// The scheduling (shares, chunks, tiles, tasks) is in matmul.h: matmul(m, out,
// x, w, T) is out (T, w->rows) = x (T, w->cols) @ w^T, and matmuls() runs up
// to MAX_PRODUCTS of them on the same input in one pass over the threads.
#include "matmul.h"

static void rope(float *vec, int n_heads, int head_dim, int pos, const float *freq) {
    for (int i = 0; i < head_dim / 2; i++) {
        double angle = (double)pos * freq[i];
        float c = (float)cos(angle), s = (float)sin(angle);
        for (int h = 0; h < n_heads; h++) {
            float *v = vec + h * head_dim + 2 * i;
            float v0 = v[0], v1 = v[1];
            v[0] = v0 * c - v1 * s;
            v[1] = v0 * s + v1 * c;
        }
    }
}

// ----------------------------------------------------------------------------
// Changing the number of KV heads at load time (--kv-heads K)
//   K < n_kv_heads: each new KV head is the mean of n_kv_heads / K adjacent
//     old ones (mean-pooled rows of wk and wv: the GQA paper's conversion of a
//     checkpoint, without its uptraining), so the model changes a little;
//   K > n_kv_heads: each old KV head is repeated K / n_kv_heads times, an
//     MHA-like model with exactly the same outputs and a bigger cache.
// RoPE is linear and the same for every head, so pooling before it is pooling after it.

static void *owned_alloc(Transformer *m, size_t n, size_t size, const char *what) {
    m->owned = realloc(m->owned, (m->n_owned + 1) * sizeof(void *));
    if (!m->owned) die("out of memory");
    return m->owned[m->n_owned++] = xcalloc(n, size, what);
}

// The valid K: divisors of n_kv_heads, and multiples of it that divide n_heads.
static int valid_kv_heads(const Config *c, int K) {
    if (K <= 0) return 0;
    return K <= c->n_kv_heads ? c->n_kv_heads % K == 0 : K % c->n_kv_heads == 0 && c->n_heads % K == 0;
}

// w (n_kv_heads * head_dim, dim) -> (K * head_dim, dim), in engine-owned memory.
static void regroup_matrix(Transformer *m, Matrix *w, int K) {
    const int old = m->c.n_kv_heads, hd = m->c.head_dim, cols = w->cols;
    const size_t rb = row_bytes(w); // the same for the new matrix: same dtype and cols
    Matrix out = {.rows = K * hd, .cols = cols};
    uint8_t *rows = owned_alloc(m, (size_t)out.rows, rb, "--kv-heads weights");
    out.dtype = w->dtype;
    if (w->q) out.q = rows;
    else out.f = (const float *)rows;
    float *acc = xcalloc(cols, sizeof(float), "row"), *row = xcalloc(cols, sizeof(float), "row");
    for (int j = 0; j < K; j++)
        for (int d = 0; d < hd; d++) {
            uint8_t *dst = rows + (size_t)(j * hd + d) * rb;
            if (K > old) { // repeat: copy the row as stored, so the outputs stay bit-identical
                memcpy(dst, matrix_row(w, (j / (K / old)) * hd + d), rb);
                continue;
            }
            int group = old / K; // pool: the mean of the same row of `group` adjacent heads
            memset(acc, 0, cols * sizeof(float));
            for (int i = 0; i < group; i++) {
                matrix_slice(w, (j * group + i) * hd + d, 0, cols, row);
                for (int k = 0; k < cols; k++) acc[k] += row[k] / group;
            }
            if (w->dtype == DTYPE_Q8_0) quantize_q8_row(dst, acc, cols);
            else if (w->dtype == DTYPE_Q4_0) quantize_q4_row(dst, acc, cols);
            else memcpy(dst, acc, cols * sizeof(float));
        }
    free(acc); free(row);
    *w = out;
}

static void set_kv_heads(Transformer *m, int K) {
    Config *c = &m->c;
    if (c->attention == ATTENTION_MLA)
        die("--kv-heads does not apply to an MLA model: its cache is one latent of %d numbers and a RoPE key of %d "
            "per position, shared by all %d query heads", c->kv_latent_dim, c->kv_rope_dim, c->n_heads);
    if (K == c->n_kv_heads) return;
    if (!valid_kv_heads(c, K)) {
        char list[512] = "";
        for (int k = 1; k <= c->n_heads; k++)
            if (valid_kv_heads(c, k)) snprintf(list + strlen(list), sizeof list - strlen(list), "%s%d", *list ? ", " : "", k);
        die("--kv-heads %d is not possible for this model (%d query heads, %d KV heads); valid: %s",
            K, c->n_heads, c->n_kv_heads, list);
    }
    for (int l = 0; l < c->n_layers; l++) {
        regroup_matrix(m, &m->w.layers[l].wk, K);
        regroup_matrix(m, &m->w.layers[l].wv, K);
    }
    c->n_kv_heads = K;
    c->kv_mul = c->n_heads / K;
    c->kv_dim = K * c->head_dim;
}

// ----------------------------------------------------------------------------
// The forward pass

// Positions the cache has room for: seq_len rounded up to whole key tiles.
static size_t cache_len(const Config *c) { return ((size_t)c->seq_len + VEC_LEN - 1) / VEC_LEN * VEC_LEN; }

// The KV cache is mapped with huge pages where the kernel allows: attention
// reads one row of head_dim numbers per position and head, kv_dim apart, and
// with 4 KiB pages nearly every row would cost a TLB miss. Pages are zero
// and become resident only when a position is written.
static void alloc_cache(KVCache *kc, const Config *c, int width, int tiled, const char *what) {
    *kc = (KVCache){.type = c->kv_type, .width = width, .heads = c->n_kv_heads, .tiled = tiled,
                    .len = cache_len(c), .row_bytes = kv_row_bytes(c->kv_type, width)};
    size_t n = kc->bytes = (size_t)c->n_layers * kc->heads * kc->len * kc->row_bytes;
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("out of memory allocating %s (%zu bytes); try a smaller -c or --kv-type", what, n);
    kc->data = p;
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
#ifdef MADV_POPULATE_WRITE
    // Fault the pages in now, at load, rather than during the first forward
    // pass (every head's rows start at position 0, so the first token would
    // touch all of them); not when the cache is over half of physical memory,
    // where committing it up front could fail where lazy allocation would not.
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && n <= (size_t)pages * page / 2)
        madvise(p, n, MADV_POPULATE_WRITE);
#endif
}

static void free_cache(KVCache *kc) {
    if (kc->data) munmap(kc->data, kc->bytes);
}

// The cache of one layer and KV head: len positions, in position order, so
// attention streams it front to back (one KV head's rows are not
// interleaved with the other heads').
static uint8_t *cache_head(const KVCache *kc, int layer, int kv_head) {
    return kc->data + ((size_t)layer * kc->heads + kv_head) * kc->len * kc->row_bytes;
}

// Writes x (width numbers) as position pos of a head's cache: a row of
// values, or row pos % VEC_LEN of a key tile. (Key tiles: q . k for VEC_LEN
// positions at once is then `width` vector multiply-adds, q[d] times number d
// of every key of the tile, with no horizontal sum per score.)
static void cache_store(KVCache *kc, int layer, int kv_head, int pos, const float *x) {
    uint8_t *head = cache_head(kc, layer, kv_head);
    if (kc->tiled) kv_store(head + (size_t)pos / VEC_LEN * VEC_LEN * kc->row_bytes, VEC_LEN, pos % VEC_LEN, x, kc->width, kc->type);
    else if (kc->q8_rows) kv_store_q8_row(head + (size_t)pos * kc->row_bytes, x, kc->width);
    else kv_store(head + (size_t)pos * kc->row_bytes, 1, 0, x, kc->width, kc->type);
}

// MLA with a q8_0 cache whose latent width is a multiple of Q8_GROUP: the
// latent rows as q8_0 weight rows, scored with integer dot products
// (kernels.h, q8_row_scores), and each thread's buffers for its quantized
// query heads. (Allocated for every model: small.)
static void alloc_latent_queries(RunState *s, const Config *c, int n_threads) {
    const int vd = c->value_dim;
    s->value_cache.q8_rows = c->attention == ATTENTION_MLA && c->kv_type == KV_Q8_0 && vd % Q8_GROUP == 0;
    s->lat_order = xcalloc(vd, sizeof(int), "attention scratch");
    if (s->value_cache.q8_rows) kv_q8_rows_order(s->lat_order, vd);
    s->lat_q = xcalloc(n_threads, sizeof(LatentQuery), "attention scratch");
    const size_t nq = (size_t)c->kv_mul * padded_len(vd), ng = (size_t)c->kv_mul * n_groups(vd);
    int8_t *q = xcalloc(n_threads * nq, 1, "attention scratch");
    float *sc = xcalloc(n_threads * ng, sizeof(float), "attention scratch");
    int32_t *sum = xcalloc(n_threads * ng, sizeof(int32_t), "attention scratch");
    for (int i = 0; i < n_threads; i++) s->lat_q[i] = (LatentQuery){q + i * nq, sc + i * ng, sum + i * ng};
}

static void malloc_run_state(Transformer *m) {
    const Config *c = &m->c;
    RunState *s = &m->s;
    int xb_dim = c->dim > c->q_dim ? c->dim : c->q_dim;
    s->x = xcalloc((size_t)MAX_BATCH * c->dim, sizeof(float), "activations");
    s->xb = xcalloc((size_t)MAX_BATCH * xb_dim, sizeof(float), "activations");
    s->xb2 = xcalloc((size_t)MAX_BATCH * c->dim, sizeof(float), "activations");
    s->q = xcalloc((size_t)MAX_BATCH * c->q_dim, sizeof(float), "activations");
    s->k = xcalloc((size_t)MAX_BATCH * c->kv_dim, sizeof(float), "activations");
    s->v = xcalloc((size_t)MAX_BATCH * c->kv_dim, sizeof(float), "activations");
    const size_t lat = (size_t)c->n_heads * c->kv_latent_dim, dr = c->kv_rope_dim; // MLA; 0 for GQA
    s->q_rope = xcalloc((size_t)MAX_BATCH * c->n_heads * dr, sizeof(float), "activations");
    s->kv_a = xcalloc((size_t)MAX_BATCH * (c->kv_latent_dim + dr), sizeof(float), "activations");
    s->q_lat = xcalloc((size_t)MAX_BATCH * lat, sizeof(float), "activations");
    s->o_lat = xcalloc((size_t)MAX_BATCH * lat, sizeof(float), "activations");
    s->hb = xcalloc((size_t)MAX_BATCH * c->hidden_dim, sizeof(float), "activations");
    s->hb2 = xcalloc((size_t)MAX_BATCH * c->hidden_dim, sizeof(float), "activations");
    s->att = xcalloc((size_t)m->n_threads * c->kv_mul * cache_len(c), sizeof(float), "attention scores");
    s->kv_f32 = xcalloc((size_t)m->n_threads * ATT_BLOCK * KV_F32_WIDTH(c), sizeof(float), "attention scratch");
    // The two vocab-sized buffers (65 MiB each at Llama 3's 128256 tokens) come from calloc, unaligned but
    // untouched: a page is only resident once a block of that many tokens writes it (xcalloc's memset would
    // make them all resident, +130 MiB of RSS for decode, which writes one row).
    s->logits = calloc((size_t)MAX_BATCH * c->vocab_size, sizeof(float));
    if (!s->logits) die("out of memory allocating logits");
    int max_cols = c->dim > c->q_dim ? c->dim : c->q_dim;
    if (c->hidden_dim > max_cols) max_cols = c->hidden_dim;
    if (c->attention == ATTENTION_MLA) { // MLA: every head's query or latent output, quantized head by head
        int widest = c->head_dim > c->kv_latent_dim ? c->head_dim : c->kv_latent_dim;
        if (c->n_heads * padded_len(widest) > max_cols) max_cols = c->n_heads * padded_len(widest);
    }
    const size_t q8_tokens = MAX_BATCH + Q8_TILE_T - 1; // a block and the integer tile's padding tokens
    s->xq = xcalloc(q8_tokens * padded_len(max_cols), 1, "activations");
    s->xs = xcalloc(q8_tokens * n_groups(max_cols), sizeof(float), "activations");
    s->sum128 = xcalloc(q8_tokens * n_groups(max_cols), sizeof(int32_t), "activations");
    // rows of one matmuls() call: the classifier, gate + up, q + k + v, or wo / w2
    size_t max_rows = c->vocab_size;
    size_t rows_of[] = {2 * (size_t)c->hidden_dim, (size_t)c->q_dim + 2 * (size_t)c->kv_dim, (size_t)c->dim,
                        (size_t)c->q_dim + c->n_heads * dr + c->kv_latent_dim + dr}; // MLA: q, q_rope, [c; k_R]
    for (int i = 0; i < 4; i++) if (rows_of[i] > max_rows) max_rows = rows_of[i];
    s->xT = xcalloc((size_t)max_cols * MAX_BATCH, sizeof(float), "activations");
    s->outT = calloc((size_t)max_rows * MAX_BATCH, sizeof(float));
    if (!s->outT) die("out of memory allocating activations");
    s->scratch_stride = max_cols > GEMM_R * K_BLOCK ? max_cols : GEMM_R * K_BLOCK;
    s->scratch = xcalloc(m->n_threads * s->scratch_stride, sizeof(float), "matmul scratch");
    s->shares = xcalloc(m->n_threads, sizeof(Share), "the thread shares"); // a cache line each (xcalloc aligns)
    alloc_cache(&s->key_cache, c, c->key_dim, 1, "the key cache");
    alloc_cache(&s->value_cache, c, c->value_dim, 0, "the value cache");
    alloc_latent_queries(s, c, m->n_threads);
    s->rope_freq = xcalloc(c->head_dim / 2, sizeof(float), "rope");
    rope_frequencies(&m->h, s->rope_freq);
    s->mla_freq = xcalloc((size_t)c->n_layers * dr / 2 + 1, sizeof(float), "rope");
    for (int l = 0; l < c->n_layers && c->attention == ATTENTION_MLA; l++) // k_R's pair j turns as a head's pair rope_pairs[j]
        for (size_t j = 0; j < dr / 2; j++) s->mla_freq[l * dr / 2 + j] = s->rope_freq[m->w.layers[l].rope_pairs[j]];
}

static void free_run_state(RunState *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v); free(s->hb); free(s->hb2);
    free(s->q_rope); free(s->kv_a); free(s->q_lat); free(s->o_lat); free(s->mla_freq);
    if (s->lat_q) { free(s->lat_q[0].q); free(s->lat_q[0].s); free(s->lat_q[0].sum128); }
    free(s->lat_q); free(s->lat_order);
    free(s->att); free(s->kv_f32); free(s->logits); free(s->xq); free(s->xs); free(s->sum128); free(s->xT); free(s->outT); free(s->scratch); free(s->shares); free(s->rope_freq);
    free_cache(&s->key_cache);
    free_cache(&s->value_cache);
}

// Position p's key (key_dim) and value (value_dim) of KV head g, into layer l's cache.
static void cache_append(Transformer *m, int l, int g, int p, const float *key, const float *value) {
    cache_store(&m->s.key_cache, l, g, p, key);
    cache_store(&m->s.value_cache, l, g, p, value);
}

// Causal self-attention of T tokens at positions pos .. pos+T-1, whose keys
// and values are already in the cache. A task is one (token, KV head) pair:
// the kv_mul query heads that share the KV head are handled together, so each
// cached K and V row is read from memory once per group, not once per query
// head. (With fewer pairs than threads, as in MQA decoding, a group's query
// heads are split into `parts` so every thread has work.)
// MLA is the same loop with one KV head shared by all query heads, whose key
// is [c; k_R] and whose value is c: k_R is in the key tiles, and c, kept once,
// in the value rows, which the scores then read too (q_row . c_p).
typedef struct {
    Transformer *m; int layer, pos, T, parts;
    const float *q;     // (T, n_heads, key_dim) scored against the key tiles
    const float *q_row; // MLA: (T, n_heads, value_dim) scored against the value rows (the latent c); GQA: NULL
    float *out;         // (T, n_heads, value_dim) each query head's weighted sum of the values
    float scale;        // of the scores: 1 / sqrt(the query head's width)
} AttentionTask;

// Scores of query heads j0 <= j < j1 against one key tile, ATT_HEADS heads per
// pass: att[j][p .. p + VEC_LEN) = q_j . k / sqrt(head_dim).
static inline __attribute__((always_inline)) void score_tile(float *att, size_t L, const float *q, const uint8_t *tile,
                                                             int hd, float scale, int p, int j0, int j1, int type) {
    int j = j0;
    for (; j + ATT_HEADS <= j1; j += ATT_HEADS) tile_scores(att + j * L + p, L, q + j * hd, tile, hd, scale, ATT_HEADS, type);
    for (; j < j1; j++) tile_scores(att + j * L + p, L, q + j * hd, tile, hd, scale, 1, type);
}

// out_j += sum over the n value rows vb of block p0 of att[j][p] * v_p, for j0 <= j < j1.
static inline __attribute__((always_inline)) void add_values(float *out, const float *att, size_t L, const uint8_t *vb,
                                                             int n, int hd, int p0, int j0, int j1, int type) {
    int j = j0;
    for (; j + ATT_HEADS <= j1; j += ATT_HEADS) weighted_sum(out + j * hd, att + j * L + p0, L, vb, n, hd, ATT_HEADS, type);
    for (; j < j1; j++) weighted_sum(out + j * hd, att + j * L + p0, L, vb, n, hd, 1, type);
}

// One (token, KV head) pair for query heads j0 <= j < j1 of the group, with
// the cache's element type as a constant (each type its own copy of the
// loops). An f16 or q8_0 cache is read as float32 in registers; when the
// heads take several passes over each tile or block (kv_mul > ATT_HEADS, as
// in MQA), the tile or block is converted once into buf (the same numbers,
// so the same bits) and read as f32 by every pass; MLA's scores against the
// latent value rows read them converted too, but with a q8_0 cache (q8_rows):
// its latent rows are q8_0 weight rows, scored against the query heads
// quantized in integer dot products (q8_row_scores), and read converted, in
// their stored order, by the weighted sums, which are then put back in order.
static inline __attribute__((always_inline)) void attend_pair(const AttentionTask *a, float *att, float *buf,
                                                              const LatentQuery *lq, int t, int g, int j0, int j1, int type) {
    const Config *c = &a->m->c;
    RunState *s = &a->m->s;
    const float scale = a->scale;
    const int kd = c->key_dim, vd = c->value_dim, q8_rows = a->q_row && s->value_cache.q8_rows;
    const int convert = type != KV_F32 && (j1 - j0 > ATT_HEADS || q8_rows); // (q8_rows: its values only as f32)
    const size_t L = cache_len(c); // size_t: j * L passes 2^31 at kv_mul 128 and -c 2^24
    const size_t krow = s->key_cache.row_bytes, vrow = s->value_cache.row_bytes;
    int n_pos = a->pos + t + 1;                                    // attends to positions 0 .. pos+t
    size_t head0 = (size_t)t * c->n_heads + (size_t)g * c->kv_mul; // the group's first query head
    const uint8_t *k = cache_head(&s->key_cache, a->layer, g);     // (cache_len / VEC_LEN, tile of VEC_LEN keys)
    const uint8_t *v = cache_head(&s->value_cache, a->layer, g);   // (cache_len, value row)
    const float *q = a->q + head0 * kd;                             // (kv_mul, key_dim)
    // scores: att[j][p] = q_j . k_p * scale, tile by tile of
    // positions (a tile's lanes past n_pos are computed and never used)
    for (int p = 0; p < n_pos; p += VEC_LEN) {
        const uint8_t *tile = k + (size_t)p * krow;
        if (!convert) { score_tile(att, L, q, tile, kd, scale, p, j0, j1, type); continue; }
        kv_to_f32(buf, tile, VEC_LEN, kd, type, 1);
        score_tile(att, L, q, (const uint8_t *)buf, kd, scale, p, j0, j1, KV_F32);
    }
    if (q8_rows) { // MLA, q8_0 cache: the same, each query head quantized, in integer dot products
        const float *qr = a->q_row + head0 * vd;
        const size_t xn = padded_len(vd), xg = n_groups(vd);
        for (int j = j0; j < j1; j++)
            quantize_q8(lq->q + (j - j0) * xn, lq->s + (j - j0) * xg, lq->sum128 + (j - j0) * xg, qr + j * vd, vd);
        q8_row_scores(att + j0 * L, L, lq->q, lq->s, lq->sum128, v, n_pos, vd, scale, j1 - j0);
    } else if (a->q_row) { // MLA: att[j][p] += q_row_j . c_p * scale, the latent half of the key
        const float *qr = a->q_row + head0 * vd;
        for (int p0 = 0; p0 < n_pos; p0 += ATT_BLOCK) {
            int n = n_pos - p0 < ATT_BLOCK ? n_pos - p0 : ATT_BLOCK, j = j0;
            const float *rows = (const float *)(v + (size_t)p0 * vrow);
            if (type != KV_F32) { kv_to_f32(buf, v + (size_t)p0 * vrow, n, vd, type, 0); rows = buf; }
            for (; j + ATT_HEADS <= j1; j += ATT_HEADS) row_scores(att + j * L + p0, L, qr + j * vd, rows, n, vd, scale, ATT_HEADS);
            for (; j < j1; j++) row_scores(att + j * L + p0, L, qr + j * vd, rows, n, vd, scale, 1);
        }
    }
    for (int j = j0; j < j1; j++) softmax(att + j * L, n_pos);
    // out_j = sum over p of att[j][p] * v_p
    float *out = a->out + head0 * vd;
    memset(out + j0 * vd, 0, (size_t)(j1 - j0) * vd * sizeof(float));
    for (int p0 = 0; p0 < n_pos; p0 += ATT_BLOCK) {
        int n = n_pos - p0 < ATT_BLOCK ? n_pos - p0 : ATT_BLOCK;
        const uint8_t *vb = v + (size_t)p0 * vrow;
        if (!convert) { add_values(out, att, L, vb, n, vd, p0, j0, j1, type); continue; }
        if (q8_rows) kv_q8_rows_to_f32(buf, vb, n, vd); // each row in its stored order ...
        else kv_to_f32(buf, vb, n, vd, type, 0);
        add_values(out, att, L, (const uint8_t *)buf, n, vd, p0, j0, j1, KV_F32);
    }
    for (int j = j0; j < j1 && q8_rows; j++) { // ... and so the sums: back in the latent's order
        for (int d = 0; d < vd; d++) buf[d] = out[j * vd + s->lat_order[d]];
        memcpy(out + j * vd, buf, vd * sizeof(float));
    }
}

static void attention_task(void *arg, int ith, int nth) {
    const AttentionTask *a = arg;
    const Config *c = &a->m->c;
    float *att = a->m->s.att + (size_t)ith * c->kv_mul * cache_len(c); // (kv_mul, cache_len)
    float *buf = a->m->s.kv_f32 + (size_t)ith * ATT_BLOCK * KV_F32_WIDTH(c); // (ATT_BLOCK, max(key_dim, value_dim))
    const LatentQuery *lq = &a->m->s.lat_q[ith];
    int lo, hi;
    split_range(a->T * c->n_kv_heads * a->parts, ith, nth, 1, &lo, &hi);
    for (int item = lo; item < hi; item++) {
        int t = item / (c->n_kv_heads * a->parts);      // token t
        int g = item / a->parts % c->n_kv_heads;         // KV head g
        int j0, j1;                                      // its query heads g*kv_mul + j, j0 <= j < j1
        split_range(c->kv_mul, item % a->parts, a->parts, 1, &j0, &j1);
        switch (a->m->s.key_cache.type) {
        case KV_F16: attend_pair(a, att, buf, lq, t, g, j0, j1, KV_F16); break;
        case KV_Q8_0: attend_pair(a, att, buf, lq, t, g, j0, j1, KV_Q8_0); break;
        default: attend_pair(a, att, buf, lq, t, g, j0, j1, KV_F32);
        }
    }
}

// Every query head of T tokens attends over the cache (attention_task).
static void attend(Transformer *m, int l, int T, int pos, const float *q, const float *q_row, float *out, float scale) {
    const Config *c = &m->c;
    int pairs = T * c->n_kv_heads, parts = (m->n_threads + pairs - 1) / pairs;
    AttentionTask at = {m, l, pos, T, parts < c->kv_mul ? parts : c->kv_mul, q, q_row, out, scale};
    size_t score_width = c->key_dim + (q_row ? c->value_dim : 0); // multiply-adds per score
    if ((size_t)T * c->n_heads * score_width * (pos + T) < SMALL_WORK) attention_task(&at, 0, 1);
    else pool_run(m->pool, attention_task, &at);
}

// Grouped-query attention (MHA, GQA, MQA) of the normed input xb (T, dim),
// into xb (T, q_dim): q, k, v = wq, wk, wv @ xb; RoPE on q and k; k and v
// appended to the cache; every query head attends with its group's KV head.
static void gqa_attention(Transformer *m, int l, int T, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layers[l];
    RunState *s = &m->s;
    matmuls(m, s->xb, T, (Product[]){{s->q, &L->wq}, {s->k, &L->wk}, {s->v, &L->wv}}, 3);
    for (int t = 0; t < T; t++) {
        rope(s->q + (size_t)t * c->q_dim, c->n_heads, c->head_dim, pos + t, s->rope_freq);
        rope(s->k + (size_t)t * c->kv_dim, c->n_kv_heads, c->head_dim, pos + t, s->rope_freq);
        for (int g = 0; g < c->n_kv_heads; g++) { // into the cache: head g's row at position pos + t
            size_t from = (size_t)t * c->kv_dim + (size_t)g * c->head_dim;
            cache_append(m, l, g, pos + t, s->k + from, s->v + from);
        }
    }
    attend(m, l, T, pos, s->q, NULL, s->xb, 1.0f / sqrtf((float)c->head_dim));
}

// q8_0 rows shorter than one chunk of Q8_CHUNK groups (512 values) have no
// SIMD path in dot_q8 (q4_0 alike): W_UV's rows are kv_latent_dim long, and
// when that is under 512 (small models) its per-head matrices are
// dequantized to f32 once, at load (in engine-owned memory; weight_bytes
// counts them as f32, which decode then reads).
static void dequantize_short_rows(Transformer *m, Matrix *w) {
    if (!w->q || w->cols >= Q8_CHUNK * Q8_GROUP) return;
    float *f = owned_alloc(m, (size_t)w->rows * w->cols, sizeof(float), "MLA up-projections");
    for (int r = 0; r < w->rows; r++) matrix_slice(w, r, 0, w->cols, f + (size_t)r * w->cols);
    w->q = NULL;
    w->dtype = DTYPE_F32;
    w->f = f;
}

// W (heads * R, C) as `heads` blocks of C columns of R numbers (Columns), in
// engine-owned memory: MLA's W_UK^T, whose rows are head_dim long (64 in
// Llama-3.2-1B's shape: 16384 rows per layer). The numbers are the file's:
// the int8 values of a q8_0 or q4_0 W and its rows' scales, or f32.
static Columns make_columns(Transformer *m, const Matrix *w, int heads) {
    const int R = w->rows / heads, C = w->cols, G = n_groups(C);
    Columns t = {.heads = heads, .R = R, .C = C, .padded = column_padded(R)};
    const size_t per_head = (size_t)C * t.padded; // the padding rows stay 0 (owned_alloc zeroes)
    if (!w->q) {
        float *f = owned_alloc(m, heads * per_head, sizeof(float), "MLA up-projections");
        for (int h = 0; h < heads; h++)
            for (int r = 0; r < R; r++)
                for (int i = 0; i < C; i++) f[h * per_head + column_slot(C, i, r)] = w->f[((size_t)h * R + r) * C + i];
        t.f = f;
        return t;
    }
    int8_t *q = owned_alloc(m, heads * per_head, 1, "MLA up-projections");
    uint16_t *scale = owned_alloc(m, (size_t)heads * G * t.padded, sizeof(uint16_t), "MLA up-projections");
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < R; r++)
            for (int g = 0; g < G; g++) {
                int8_t v[Q8_GROUP];
                scale[(size_t)h * G * t.padded + column_slot(G, g, r)] = row_group(w, h * R + r, g, v);
                for (int i = g * Q8_GROUP; i < C && i < (g + 1) * Q8_GROUP; i++)
                    q[h * per_head + column_slot(C, i, r)] = v[i - g * Q8_GROUP];
            }
    t.q = q, t.scale = scale;
    return t;
}

static size_t columns_bytes(const Columns *w) {
    size_t n = (size_t)w->heads * w->C * w->padded;
    return w->f ? n * sizeof(float) : n + (size_t)w->heads * n_groups(w->C) * w->padded * sizeof(uint16_t);
}

// Multi-head latent attention (DeepSeek-V2, section 2.1, without the query's
// compression) of the normed input xb (T, dim), into xb (T, q_dim). Head h
// scores position p with q_C_h . (W_UK_h c_p) + q_R_h . k_R_p and reads the
// value W_UV_h c_p, where c = W_DKV x is the latent (kv_latent_dim) and
// k_R = RoPE(W_KR x) one key shared by all heads (kv_rope_dim): the cache
// holds only c and k_R. The up-projections are absorbed, per token:
//   q_C_h . (W_UK_h c_p) = (W_UK_h^T q_C_h) . c_p   the query moves into the latent,
//   sum_p a_p W_UV_h c_p = W_UV_h (sum_p a_p c_p)   the output leaves it after the sum,
// so the attention itself is MQA over a learned latent: one KV head for all
// query heads, key [c; k_R], value c. (Absorbed per token rather than into
// wq and wo at load: those would grow to n_heads x kv_latent_dim rows or
// columns, 9x Llama-3.2-1B's wq at kv_latent_dim 512, and decode reads every
// weight once per token, while W_UK and W_UV are n_heads x head_dim x
// kv_latent_dim each.)
static void mla_attention(Transformer *m, int l, int T, int pos) {
    const Config *c = &m->c;
    const Layer *L = &m->w.layers[l];
    RunState *s = &m->s;
    const int dc = c->kv_latent_dim, dr = c->kv_rope_dim;
    const float *freq = s->mla_freq + (size_t)l * dr / 2;
    matmuls(m, s->xb, T, (Product[]){{s->q, &L->wq}, {s->q_rope, &L->wq_rope}, {s->kv_a, &L->wkv_a}}, 3);
    for (int t = 0; t < T; t++) {
        float *kv = s->kv_a + (size_t)t * (dc + dr); // [c; k_R]
        rope(s->q_rope + (size_t)t * c->n_heads * dr, c->n_heads, dr, pos + t, freq);
        rope(kv + dc, 1, dr, pos + t, freq);
        cache_append(m, l, 0, pos + t, kv + dc, kv); // key tiles: k_R; value rows: c
    }
    column_matmul(m, s->q_lat, s->q, &L->uk, T);                  // W_UK_h^T q_C_h
    attend(m, l, T, pos, s->q_rope, s->q_lat, s->o_lat, 1.0f / sqrtf((float)(c->head_dim + dr)));
    head_matmul(m, s->xb, s->o_lat, &L->wv_b, T);                // W_UV_h o_h
}

// Finite weights can still overflow (weights of 1e30 are finite): a NaN or
// Inf logit ends the run rather than print nothing or "perplexity: nan".
static void check_logits(const Transformer *m, const float *logits, int T, int pos) {
    size_t n = (size_t)T * m->c.vocab_size, i = find_nonfinite_f32(logits, n);
    if (i < n)
        die("non-finite logit %g at position %d (token %zu of the vocabulary): the arithmetic overflowed; "
            "are the weights sane?", logits[i], pos + (int)(i / m->c.vocab_size), i % m->c.vocab_size);
}

// Runs T tokens (T <= MAX_BATCH) at positions pos .. pos+T-1 through the
// model, appending their keys and values to the cache. Returns the logits of
// the last token (vocab_size), or with all_logits those of every token (T, vocab_size).
static float *forward(Transformer *m, const int *tokens, int T, int pos, int all_logits) {
    const Config *c = &m->c;
    const Weights *w = &m->w;
    RunState *s = &m->s;
    int dim = c->dim, hid = c->hidden_dim;

    for (int t = 0; t < T; t++) matrix_slice(&w->token_embedding, tokens[t], 0, dim, s->x + (size_t)t * dim);

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &w->layers[l];
        // attention: x += wo @ attention(rope(wq @ norm(x)), cache)   (GQA, or MLA: absorbed, over the latent)
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, L->attn_norm, dim, c->norm_eps);
        (c->attention == ATTENTION_MLA ? mla_attention : gqa_attention)(m, l, T, pos);
        matmul(m, s->xb2, s->xb, &L->wo, T);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb2[i];

        // feed-forward: x += w2 @ (silu(w1 @ norm(x)) * (w3 @ norm(x)))
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, L->ffn_norm, dim, c->norm_eps);
        matmuls(m, s->xb, T, (Product[]){{s->hb, &L->w1}, {s->hb2, &L->w3}}, 2);
        swiglu(s->hb, s->hb2, (size_t)T * hid);
        matmul(m, s->xb2, s->hb, &L->w2, T);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb2[i];
    }

    int first = all_logits ? 0 : T - 1; // tokens whose logits are wanted
    for (int t = first; t < T; t++)
        rmsnorm(s->xb + (size_t)(t - first) * dim, s->x + (size_t)t * dim, w->final_norm, dim, c->norm_eps);
    matmul(m, s->logits, s->xb, &w->classifier, T - first);
    check_logits(m, s->logits, T - first, pos + first);
    return s->logits;
}

// ----------------------------------------------------------------------------
// The sampler: greedy (temperature 0), or temperature + top-p (nucleus)

typedef struct { float p; int id; } ProbIndex;

typedef struct {
    int vocab_size;
    float temperature, topp;
    uint64_t rng;
    ProbIndex *cand; // (vocab_size) top-p candidates
} Sampler;

static uint32_t random_u32(uint64_t *state) { // xorshift*
    *state ^= *state >> 12; *state ^= *state << 25; *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; } // [0, 1)

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int compare_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->p, pb = ((const ProbIndex *)b)->p;
    return (pa < pb) - (pa > pb);
}

// Samples from the smallest set of tokens whose probabilities add up to topp.
static int sample_topp(const float *probs, int n, float topp, ProbIndex *cand, float coin) {
    // tokens below (1 - topp) / (n - 1) cannot be in the nucleus: skip sorting them
    const float cutoff = (1.0f - topp) / (n - 1);
    int n0 = 0;
    for (int i = 0; i < n; i++)
        if (probs[i] >= cutoff) { cand[n0].p = probs[i]; cand[n0].id = i; n0++; }
    if (n0 == 0) return argmax(probs, n); // a tiny topp over a flat distribution
    qsort(cand, n0, sizeof(ProbIndex), compare_prob_desc);
    float cum = 0;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) { cum += cand[i].p; if (cum > topp) { last = i; break; } }
    float r = coin * cum, acc = 0;
    for (int i = 0; i <= last; i++) { acc += cand[i].p; if (r < acc) return cand[i].id; }
    return cand[last].id;
}

static int sample(Sampler *sp, float *logits) {
    if (sp->temperature == 0) return argmax(logits, sp->vocab_size);
    for (int i = 0; i < sp->vocab_size; i++) logits[i] /= sp->temperature;
    softmax(logits, sp->vocab_size);
    float coin = random_f32(&sp->rng);
    if (sp->topp <= 0 || sp->topp >= 1) { // plain sampling from the distribution
        float acc = 0;
        for (int i = 0; i < sp->vocab_size; i++) { acc += logits[i]; if (coin < acc) return i; }
        return sp->vocab_size - 1;
    }
    return sample_topp(logits, sp->vocab_size, sp->topp, sp->cand, coin);
}

// ----------------------------------------------------------------------------
// Text in, text out

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// A failed write to stdout (disk full) is an error; a reader that has gone
// (| head, with SIGPIPE ignored) is not: the output just ends.
static void output_failed(void) {
    if (errno == EPIPE) exit(0);
    die("cannot write the output: %s", strerror(errno));
}

// Writes out to stdout.
static void emit(const char *text, size_t n) {
    if (n && fwrite(text, 1, n, stdout) != n) output_failed();
}

// Flushes stdout; ferror catches a failed write of an earlier printf, whose
// buffered bytes a later fflush no longer has.
static void emit_flush(void) {
    if (fflush(stdout) != 0 || ferror(stdout)) output_failed();
}

// Prints the text of token `id` (UTF-8 safe: see tokenizer.h) and flushes.
static void emit_token(Transformer *m, Utf8Stream *us, int prev, int id, char *buf) {
    size_t n = tokenizer_decode(m->tok, us, prev, id, buf, tokenizer_max_decode_bytes(m->tok));
    emit(buf, n);
}

// Reads all of f (a file, a pipe, a FIFO), NUL-terminated, if it holds at most
// max bytes; more is refused (`what` says why), so /dev/zero cannot fill the memory.
static char *read_all(FILE *f, const char *path, size_t max, const char *what, size_t *len) {
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && (uintmax_t)st.st_size > max)
        die("%s is %lld bytes, more than %s", path, (long long)st.st_size, what);
    size_t cap = 1 << 16, n = 0;
    char *buf = xcalloc(cap, 1, "the input");
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        if (n > max) die("%s holds more than %zu bytes, more than %s", path, max, what);
        buf = realloc(buf, cap *= 2);
        if (!buf) die("out of memory reading %s", path);
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    if (n > max) die("%s holds more than %zu bytes, more than %s", path, max, what);
    buf[n] = 0; // n < cap: a C string too
    *len = n;
    return buf;
}

#define TOKENIZE_MAX_BYTES (64 << 20)

// The most text a prompt or a chat message can use: a text of n bytes has
// at least n / max_token_bytes tokens, so more than this cannot fit the context.
static size_t input_limit(const Transformer *m) {
    return (size_t)m->c.seq_len * tokenizer_max_token_bytes(m->tok);
}

static FILE *open_input(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    return f;
}

#ifdef TESTING
static char *read_path(const char *path, size_t *len) { // the tests' files, whole
    FILE *f = open_input(path);
    char *data = read_all(f, path, SIZE_MAX - 1, "", len);
    fclose(f);
    return data;
}
#endif

// BOS (if the model has one) followed by the tokens of text.
static int *encode_with_bos(Transformer *m, const char *text, size_t len, int *n_tokens) {
    size_t n = 0;
    int *ids = tokenizer_encode(m->tok, text, len, 1, &n);
    if (!ids) die("out of memory tokenizing the input");
    if (n > (size_t)INT_MAX - 1) die("the input is too long (%zu tokens)", n);
    int bos = m->h.bos_id >= 0;
    int *out = xcalloc(n + bos, sizeof(int), "tokens");
    if (bos) out[0] = m->h.bos_id;
    memcpy(out + bos, ids, n * sizeof(int));
    free(ids);
    *n_tokens = (int)n + bos;
    return out;
}

static int is_stop(const Transformer *m, int id) {
    for (int i = 0; i < m->h.n_stop_ids; i++) if (m->h.stop_ids[i] == id) return 1;
    return 0;
}

// Feeds tokens[0..n) at positions pos.. in blocks of MAX_BATCH; returns the
// logits of the last one.
static float *prefill(Transformer *m, const int *tokens, int n, int pos) {
    float *logits = NULL;
    for (int i = 0; i < n; i += MAX_BATCH) {
        int T = n - i < MAX_BATCH ? n - i : MAX_BATCH;
        logits = forward(m, tokens + i, T, pos + i, 0);
    }
    return logits;
}

// ----------------------------------------------------------------------------
// Generation: print the prompt, then sample until a stop token or until
// `steps` positions have run through the model (BOS and prompt included, as
// in llama2.c, which then prints the token sampled at the last position).

static void generate(Transformer *m, Sampler *sp, const char *prompt, size_t prompt_len, int steps) {
    int n_prompt;
    int *tokens = encode_with_bos(m, prompt, prompt_len, &n_prompt);
    if (n_prompt == 0) die("empty prompt and the model has no BOS token to start from");
    if (n_prompt > m->c.seq_len)
        die("the prompt is %d tokens, longer than the context of %d (-c)", n_prompt, m->c.seq_len);
    if (steps < n_prompt) die("-n %d is less than the prompt's %d tokens (BOS included)", steps, n_prompt);

    char *buf = xcalloc(tokenizer_max_decode_bytes(m->tok), 1, "decode buffer");
    Utf8Stream us = {0};
    for (int i = 0; i < n_prompt; i++) emit_token(m, &us, i ? tokens[i - 1] : -1, tokens[i], buf);
    emit_flush();

    double t0 = now_seconds();
    float *logits = prefill(m, tokens, n_prompt, 0);
    double t1 = now_seconds();
    // token i is fed at position i; the one sampled after the last position is printed, not fed
    int prev = tokens[n_prompt - 1], n_decoded = 0;
    for (int pos = n_prompt; pos <= steps; pos++) {
        int next = sample(sp, logits);
        if (is_stop(m, next)) break;
        emit_token(m, &us, prev, next, buf);
        emit_flush();
        n_decoded++;
        prev = next;
        if (pos < steps) logits = forward(m, &next, 1, pos, 0);
    }
    double t2 = now_seconds();
    emit(buf, tokenizer_decode_flush(&us, buf, 8));
    emit("\n", 1);
    emit_flush();
    fprintf(stderr, "prefill: %d tokens, %.2f tok/s\n", n_prompt, n_prompt / (t1 - t0));
    fprintf(stderr, "decode: %d tokens, %.2f tok/s\n", n_decoded, n_decoded > 0 ? n_decoded / (t2 - t1) : 0.0);
    free(buf);
    free(tokens);
}

// ----------------------------------------------------------------------------
// Perplexity: exp(mean negative log-likelihood) of tokens 1..N-1 of BOS + text.
// A text longer than the context is scored in chunks of (seq_len - 1) tokens,
// each after its own BOS.

static double nll_of(const float *logits, int n, int target) { // -log softmax(logits)[target]
    float max = logits[0];
    for (int i = 1; i < n; i++) if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) sum += exp((double)logits[i] - max);
    return log(sum) - ((double)logits[target] - max);
}

// Reading a text of any length in bounded memory: read_bytes at a time, cut
// where tokenizer_cut allows (a newline, or a space between words), each
// part tokenized as it comes; the tokens are those of the whole text.
#define PPL_READ_BYTES (1 << 20)  // what -m ppl -f reads at a time
#define MAX_UNCUT (64 << 20)      // text without a place to cut that is still read on

typedef void (*TokenSink)(void *ctx, const int *ids, size_t n);

// Feeds the tokens of all of f to sink, part by part; returns the bytes read.
static size_t stream_tokens(const Tokenizer *tok, FILE *f, size_t read_bytes, TokenSink sink, void *ctx) {
    size_t cap = 2 * read_bytes, have = 0, total = 0;
    char *buf = xcalloc(cap, 1, "the text");
    for (int first = 1, eof = 0; !eof;) {
        if (cap - have < read_bytes) {
            if (cap >= MAX_UNCUT)
                die("the text has no line break or space between words in %d MiB; it is cut there "
                    "to be read in bounded memory", MAX_UNCUT >> 20);
            buf = realloc(buf, cap *= 2);
            if (!buf) die("out of memory reading the text");
        }
        size_t got = fread(buf + have, 1, read_bytes, f);
        if (got < read_bytes) {
            if (ferror(f)) die("cannot read the text: %s", strerror(errno));
            eof = 1;
        }
        have += got;
        total += got;
        size_t cut = eof ? have : tokenizer_cut(tok, buf, have), n;
        if (cut == 0) continue; // no place to cut yet: read on
        int *ids = first ? tokenizer_encode(tok, buf, cut, 1, &n) : tokenizer_encode_continued(tok, buf, cut, 1, &n);
        if (!ids) die("out of memory tokenizing the text");
        sink(ctx, ids, n);
        free(ids);
        first = 0;
        memmove(buf, buf + cut, have - cut);
        have -= cut;
    }
    free(buf);
    return total;
}

typedef struct {
    Transformer *m;
    int *window, len_w; // BOS (if any), then the text's next tokens: seq_len at most
    double nll;         // summed over the scored tokens
    long scored;
    FILE *f;            // the text, if read from a file ...
    size_t bytes_total; // ... and its length, for the progress line (0: unknown, a pipe)
} Perplexity;

static void score_window(Perplexity *p) {
    Transformer *m = p->m;
    int V = m->c.vocab_size;
    // logits at window position i predict window[i + 1]
    for (int i = 0; i < p->len_w - 1; i += MAX_BATCH) {
        int T = p->len_w - 1 - i < MAX_BATCH ? p->len_w - 1 - i : MAX_BATCH;
        float *logits = forward(m, p->window + i, T, i, 1);
        for (int t = 0; t < T; t++) p->nll += nll_of(logits + (size_t)t * V, V, p->window[i + t + 1]);
        p->scored += T;
    }
    p->len_w = m->h.bos_id >= 0;
    if (isatty(STDERR_FILENO)) {
        fprintf(stderr, "\rppl: %ld tokens", p->scored);
        if (p->bytes_total) fprintf(stderr, ", %.0f %% of the text", 100.0 * ftell(p->f) / p->bytes_total);
        fprintf(stderr, ", running perplexity %.4f", exp(p->nll / p->scored));
    }
}

// The sink of stream_tokens: each window is scored as it fills.
static void score_tokens(void *ctx, const int *ids, size_t n) {
    Perplexity *p = ctx;
    for (size_t i = 0; i < n; i++) {
        p->window[p->len_w++] = ids[i];
        if (p->len_w == p->m->c.seq_len) score_window(p);
    }
}

// Scores the text of f (any length, a pipe too) or, with f NULL, text[0..len):
// exp(nll / scored) is its perplexity.
static Perplexity perplexity(Transformer *m, FILE *f, const char *text, size_t len, size_t read_bytes) {
    if (m->c.seq_len < 2) die("-m ppl needs a context of at least 2 tokens, this one is %d (-c)", m->c.seq_len);
    Perplexity p = {m, xcalloc(m->c.seq_len, sizeof(int), "window"), 0, 0, 0, f, 0};
    p.len_w = m->h.bos_id >= 0;
    if (p.len_w) p.window[0] = m->h.bos_id;
    if (f) {
        struct stat st;
        if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode)) p.bytes_total = (size_t)st.st_size;
        stream_tokens(m->tok, f, read_bytes, score_tokens, &p);
    } else {
        size_t n;
        int *ids = tokenizer_encode(m->tok, text, len, 1, &n);
        if (!ids) die("out of memory tokenizing the text");
        score_tokens(&p, ids, n);
        free(ids);
    }
    if (p.len_w > 1) score_window(&p);
    if (isatty(STDERR_FILENO) && p.scored) fputc('\n', stderr);
    if (p.scored == 0) die("the text has too few tokens to score");
    free(p.window);
    p.window = NULL;
    return p;
}

// ----------------------------------------------------------------------------
// Chat: the Llama 3 instruct template, multi-turn, keeping the KV cache
//   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
//   <|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>
//   <|start_header_id|>assistant<|end_header_id|>\n\n  ...the model's reply... <|eot_id|>

static int special_id(const Transformer *m, const char *name) {
    int id = tokenizer_find(m->tok, name);
    if (id < 0 || !tokenizer_is_special(m->tok, id))
        die("chat needs a Llama 3 instruct tokenizer; this one has no %s token", name);
    return id;
}

typedef struct { int *ids; int n, cap; } TokenList;

static void push_id(TokenList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->ids = realloc(l->ids, l->cap * sizeof(int));
        if (!l->ids) die("out of memory");
    }
    l->ids[l->n++] = id;
}

// Ordinary text: special-token literals in it are not parsed, so a user
// message cannot forge a turn.
static void push_text(Transformer *m, TokenList *l, const char *text) {
    size_t n = 0;
    int *ids = tokenizer_encode(m->tok, text, strlen(text), 0, &n);
    if (!ids) die("out of memory tokenizing the chat");
    for (size_t i = 0; i < n; i++) push_id(l, ids[i]);
    free(ids);
}

// <|start_header_id|>role<|end_header_id|>, then "\n\n" and the message as
// one span of text (as when the whole template is tokenized), then <|eot_id|>.
// A NULL message leaves the turn open for the model to write.
static void push_turn(Transformer *m, TokenList *l, const char *role, const char *message) {
    push_id(l, special_id(m, "<|start_header_id|>"));
    push_text(m, l, role);
    push_id(l, special_id(m, "<|end_header_id|>"));
    char *body = xcalloc(strlen(message ? message : "") + 3, 1, "chat message");
    strcpy(body, "\n\n");
    if (message) strcat(body, message);
    push_text(m, l, body);
    free(body);
    if (message) push_id(l, special_id(m, "<|eot_id|>"));
}

// The tokens of one user turn: BOS and the system message first if the chat
// starts here, then the message and the assistant's open turn.
static TokenList chat_turn_tokens(Transformer *m, const char *system, const char *user, int first) {
    TokenList l = {0};
    if (first && m->h.bos_id >= 0) push_id(&l, m->h.bos_id);
    if (first && system) push_turn(m, &l, "system", system);
    push_turn(m, &l, "user", user);
    push_turn(m, &l, "assistant", NULL);
    return l;
}

// One line of f without its line end, or NULL at the end of f; a line longer
// than max bytes (more than the context can hold) is an error.
static char *read_line(FILE *f, size_t max) {
    size_t cap = 256, len = 0;
    char *line = xcalloc(cap, 1, "a line");
    int ch;
    while ((ch = getc(f)) != EOF && ch != '\n') {
        if (len + 1 == cap) {
            if (len >= max) die("an input line is longer than %zu bytes, more than the context can hold", max);
            line = realloc(line, cap *= 2);
            if (!line) die("out of memory reading a line");
        }
        line[len++] = (char)ch;
    }
    if (ch == EOF && len == 0) { free(line); return NULL; }
    while (len > 0 && line[len - 1] == '\r') len--;
    line[len] = 0;
    return line;
}

static void chat(Transformer *m, Sampler *sp, const char *system, const char *first_message) {
    int eot = special_id(m, "<|eot_id|>");
    int tty = isatty(STDIN_FILENO);
    char *buf = xcalloc(tokenizer_max_decode_bytes(m->tok), 1, "decode buffer");
    int pos = 0;
    for (int turn = 0;; turn++) {
        char *msg = NULL;
        if (turn == 0 && first_message) msg = strdup(first_message);
        else {
            if (tty) { fputs("> ", stderr); fflush(stderr); }
            msg = read_line(stdin, input_limit(m));
        }
        if (!msg) break;
        TokenList turn_ids = chat_turn_tokens(m, system, msg, turn == 0);
        free(msg);
        if (pos + turn_ids.n >= m->c.seq_len) {
            fprintf(stderr, "chat: the context of %d tokens is full; start a new chat (or raise -c)\n", m->c.seq_len);
            free(turn_ids.ids);
            break;
        }
        float *logits = prefill(m, turn_ids.ids, turn_ids.n, pos);
        pos += turn_ids.n;
        free(turn_ids.ids);
        Utf8Stream us = {0};
        int prev = -1;
        for (;;) { // the reply, until <|eot_id|> (fed back: it closes the turn) or a stop token
            int next = sample(sp, logits);
            if (pos >= m->c.seq_len) {
                emit("\n", 1); emit_flush();
                fprintf(stderr, "chat: the context of %d tokens is full; start a new chat (or raise -c)\n", m->c.seq_len);
                free(buf);
                return;
            }
            logits = forward(m, &next, 1, pos++, 0);
            if (next == eot || is_stop(m, next)) break;
            emit_token(m, &us, prev, next, buf);
            emit_flush();
            prev = next;
        }
        emit(buf, tokenizer_decode_flush(&us, buf, 8));
        emit("\n", 1);
        emit_flush();
    }
    free(buf);
}

// ----------------------------------------------------------------------------
// Tokenize and info

static void print_tokens(Transformer *m, const char *text, size_t len) {
    int n;
    int *tokens = encode_with_bos(m, text, len, &n);
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", tokens[i]);
    printf("\n");
    free(tokens);
}

static size_t matrix_bytes(const Matrix *w) { return (size_t)w->rows * row_bytes(w); }

// Bytes of all weights in use (after --kv-heads); a tied classifier counts once.
static size_t weight_bytes(const Transformer *m) {
    const Config *c = &m->c;
    size_t bytes = matrix_bytes(&m->w.token_embedding) + (size_t)(2 * c->n_layers + 1) * c->dim * sizeof(float);
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->w.layers[l];
        const Matrix *mats[] = {&L->wq, &L->wk, &L->wv, &L->wq_rope, &L->wkv_a, &L->wv_b, // GQA or MLA: the others have 0 rows
                                &L->wo, &L->w1, &L->w2, &L->w3};
        for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++) bytes += matrix_bytes(mats[i]);
        bytes += L->uk.C ? columns_bytes(&L->uk) : matrix_bytes(&L->wk_b); // MLA: as decode reads it
    }
    if (!m->h.tied_classifier) bytes += matrix_bytes(&m->w.classifier);
    return bytes;
}

static const char *const kv_type_names[] = {"f32", "f16", "q8_0"}; // by KV_*
static const char *kv_type_name(int type) { return kv_type_names[type]; }

static int parse_kv_type(const char *s) {
    for (int t = 0; t < (int)(sizeof kv_type_names / sizeof kv_type_names[0]); t++)
        if (!strcmp(s, kv_type_names[t])) return t;
    die("--kv-type expects f32, f16 or q8_0, got '%s'", s);
    return KV_F32;
}

// Bytes one position adds to the cache: keys and values of every layer and KV head.
static size_t kv_bytes_per_token(const Transformer *m) {
    return (size_t)m->c.n_layers * m->c.n_kv_heads * (m->s.key_cache.row_bytes + m->s.value_cache.row_bytes);
}

static void print_bytes(size_t b) {
    if (b >= (1ull << 30)) printf("%10.2f GiB", b / (double)(1ull << 30));
    else if (b >= (1u << 20)) printf("%10.2f MiB", b / (double)(1u << 20));
    else printf("%10.2f KiB", b / 1024.0);
}

// The KV cache of one model shape under every head configuration:
// bytes = layers x 2 (K and V) x kv_heads x head_dim x positions x bytes per element.
// MLA (DeepSeek-V2) caches instead one compressed latent per token and layer,
// plus a decoupled RoPE key shared by all heads: those of an MLA model
// (latent, rope > 0; marked), or else as DeepSeek-V2's proportions, 4 x
// head_dim and head_dim / 2 (512 + 64 = 576 elements at head_dim 128).
// Elements of elem_bytes bytes, or (elem_bytes 0) of the engine's KV type kv_type.
static void print_kv_table(long layers, long n_heads, long head_dim, long positions, long elem_bytes, int kv_type,
                           long current, long latent, long rope) {
#define ROW_BYTES(width) (elem_bytes ? (size_t)(width) * elem_bytes : kv_row_bytes(kv_type, (int)(width)))
    if (elem_bytes) printf("kv_cache_table: %ld layers, %ld query heads, head_dim %ld, %ld positions, %ld bytes per element\n",
                           layers, n_heads, head_dim, positions, elem_bytes);
    else printf("kv_cache_table: %ld layers, %ld query heads, head_dim %ld, %ld positions, %s elements (%zu bytes per row of %ld)\n",
                layers, n_heads, head_dim, positions, kv_type_name(kv_type), ROW_BYTES(head_dim), head_dim);
    printf("  %-12s %8s %14s %14s\n", "config", "kv_heads", "bytes/token", "total");
    for (long g = n_heads; g >= 1; g--) {
        if (n_heads % g) continue;
        char name[32];
        if (g == n_heads) snprintf(name, sizeof name, "MHA");
        else if (g == 1) snprintf(name, sizeof name, "MQA");
        else snprintf(name, sizeof name, "GQA-%ld", g);
        size_t per_token = (size_t)layers * 2 * g * ROW_BYTES(head_dim);
        printf("%c %-12s %8ld %14zu ", g == current ? '*' : ' ', name, g, per_token);
        print_bytes(per_token * positions);
        printf("\n");
    }
    int is_mla = latent > 0;
    if (!is_mla) latent = 4 * head_dim, rope = head_dim / 2;
    size_t mla = (size_t)layers * (ROW_BYTES(latent) + ROW_BYTES(rope));
#undef ROW_BYTES
    printf("%c %-12s %8s %14zu ", is_mla ? '*' : ' ', "MLA latent", "-", mla);
    print_bytes(mla * positions);
    printf("   (%ld + %ld elements per layer)\n", latent, rope);
}

static void print_info(Transformer *m, const char *path) {
    const Config *c = &m->c;
    const ModelHeader *h = &m->h;
    const Layer *L0 = &m->w.layers[0]; // every layer has the same shapes
    const Matrix *mats[] = {&L0->wq, &L0->wk, &L0->wv, &L0->wq_rope, &L0->wkv_a, &L0->wk_b, &L0->wv_b, &L0->wo};
    size_t per_layer = 2 * (size_t)c->dim + 3 * (size_t)c->hidden_dim * c->dim;
    for (int i = 0; i < 8; i++) per_layer += (size_t)mats[i]->rows * mats[i]->cols;
    size_t params = (size_t)c->vocab_size * c->dim * (h->tied_classifier ? 1 : 2)
                  + c->n_layers * per_layer + c->dim;
    // what one position adds to the cache: n_kv_heads x (a key row + a value row) per layer, GQA's
    // 2 x kv_dim numbers, MLA's kv_latent_dim + kv_rope_dim, of the cache's type
    size_t kv_per_token = kv_bytes_per_token(m);
    printf("model: %s\n", path);
    printf("dim: %d\nhidden_dim: %d\nn_layers: %d\nn_heads: %d\nn_kv_heads: %d\nkv_mul: %d\nhead_dim: %d\n",
           c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->kv_mul, c->head_dim);
    if (c->n_kv_heads != h->n_kv_heads) printf("n_kv_heads_in_file: %d\n", h->n_kv_heads);
    printf("attention: %s\n", c->attention == ATTENTION_MLA ? "mla" : "gqa");
    if (c->attention == ATTENTION_MLA) printf("kv_latent_dim: %d\nkv_rope_dim: %d\n", c->kv_latent_dim, c->kv_rope_dim);
    printf("vocab_size: %d\nmax_seq_len: %d\nrope_theta: %g\n", c->vocab_size, c->max_seq_len, h->rope_theta);
    if (h->rope_scaling == ROPE_SCALING_LLAMA3)
        printf("rope_scaling: llama3 factor %g, low_freq_factor %g, high_freq_factor %g, original_max_pos %d\n",
               h->rope_factor, h->rope_low_freq_factor, h->rope_high_freq_factor, h->rope_original_max_pos);
    else printf("rope_scaling: none\n");
    printf("norm_eps: %g\ntied_classifier: %d\ndtype: %s\nembedding_dtype: %s\n", h->norm_eps, h->tied_classifier,
           dtype_name(h->dtype), dtype_name(h->embedding_dtype));
    printf("tokenizer: %s, %d tokens, bos %d, stop", h->tokenizer_kind == TOKENIZER_LLAMA3 ? "llama3" : "llama2c",
           tokenizer_n_tokens(m->tok), h->bos_id);
    for (int i = 0; i < h->n_stop_ids; i++) printf(" %d", h->stop_ids[i]);
    printf("\nparams: %zu\nweight_bytes: %zu\n", params, weight_bytes(m));
    printf("context: %d\nkv_cache_dtype: %s\nkv_bytes_per_token: %zu\nkv_bytes_context: %zu\n",
           c->seq_len, kv_type_name(c->kv_type), kv_per_token, kv_per_token * c->seq_len);
    int mla = c->attention == ATTENTION_MLA;
    print_kv_table(c->n_layers, c->n_heads, c->head_dim, c->seq_len, 0, c->kv_type, mla ? -1 : c->n_kv_heads,
                   mla ? c->kv_latent_dim : 0, mla ? c->kv_rope_dim : 0);
}

// -m kv l=96,n=96,h=128,s=1024,bytes=2: the table for any model shape
// (l layers, n query heads, head_dim h, s positions, bytes per element, g KV heads to mark).
static void kv_calculator(const char *spec) {
    long v[6] = {0, 0, 0, 0, 2, 0};
    const char *keys[6] = {"l", "n", "h", "s", "bytes", "g"};
    char *copy = strdup(spec), *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        int k = 0;
        if (eq) { *eq = 0; while (k < 6 && strcmp(item, keys[k])) k++; }
        if (!eq || k == 6) die("-m kv: '%s' is not one of l=, n=, h=, s=, bytes=, g= (e.g. l=96,n=96,h=128,s=1024,bytes=2)", item);
        char *end;
        errno = 0;
        v[k] = strtol(eq + 1, &end, 10);
        if (errno || end == eq + 1 || *end || v[k] < 1 || v[k] > (1L << 24)) die("-m kv: %s=%s is not an integer in [1, 2^24]", item, eq + 1);
    }
    free(copy);
    if (!v[0] || !v[1] || !v[2] || !v[3]) die("-m kv needs l=, n=, h= and s= (e.g. l=96,n=96,h=128,s=1024,bytes=2)");
    print_kv_table(v[0], v[1], v[2], v[3], v[4], KV_F32, v[5], 0, 0);
}

// ----------------------------------------------------------------------------
// Lifecycle

#define DEFAULT_MAX_CONTEXT 4096 // default -c: the model's context, capped here

// No silent wrong answers: one NaN or Inf in the weights (a damaged download,
// a bad conversion) turns every logit into NaN, and the output into nothing.
// Every f32 value and every float16 scale is checked once at load, by all
// threads. The same pass maps every page of the file (each page holds f32
// values or q8_0 / q4_0 scales; the tokenizer's were read at load) instead of letting
// the first forward pass fault them in one by one, where the faults would
// stall the matmuls and defeat their prefetching: the check costs no read of
// its own.

typedef struct {
    const char *name; int layer;  // "wq", layer 3; layer -1: not in a layer
    const float *v; size_t n;     // an f32 tensor (vector, or matrix of cols values a row) ...
    const Matrix *w;              // ... or a quantized matrix: its scales are checked
    size_t cols;
} TensorRef;

// The model's tensors, in file order; returns their count (out may be NULL).
static int list_tensors(const Transformer *m, TensorRef *out) {
    int n = 0;
#define REF(NAME, L, W) do { const Matrix *w_ = (W); if (w_->rows == 0) break; /* not of this attention kind */ \
        if (out) out[n] = w_->q ? (TensorRef){NAME, L, NULL, (size_t)w_->rows, w_, (size_t)w_->cols} \
                                 : (TensorRef){NAME, L, w_->f, (size_t)w_->rows * w_->cols, NULL, (size_t)w_->cols}; \
        n++; } while (0)
#define VEC(NAME, L, V) do { if (out) out[n] = (TensorRef){NAME, L, (V), (size_t)m->c.dim, NULL, (size_t)m->c.dim}; n++; } while (0)
    REF("token_embedding", -1, &m->w.token_embedding);
    for (int l = 0; l < m->c.n_layers; l++) {
        const Layer *L = &m->w.layers[l];
        VEC("attn_norm", l, L->attn_norm);
        REF("wq", l, &L->wq); REF("wk", l, &L->wk); REF("wv", l, &L->wv); // GQA, or MLA's:
        REF("wq_rope", l, &L->wq_rope); REF("wkv_a", l, &L->wkv_a); REF("wk_b", l, &L->wk_b); REF("wv_b", l, &L->wv_b);
        REF("wo", l, &L->wo);
        VEC("ffn_norm", l, L->ffn_norm);
        REF("w1", l, &L->w1); REF("w2", l, &L->w2); REF("w3", l, &L->w3);
    }
    VEC("final_norm", -1, m->w.final_norm);
    if (!m->h.tied_classifier) REF("classifier", -1, &m->w.classifier);
#undef REF
#undef VEC
    return n;
}

// The float16 scales of block b of row r of a q8_0 or q4_0 matrix; *groups: how many.
static const uint16_t *block_scales(const Matrix *w, int r, int b, int *groups) {
    *groups = block_groups(w->cols, b);
    return w->dtype == DTYPE_Q8_0 ? q8_block(matrix_row(w, r), w->cols, b).scale : q4_block(matrix_row(w, r), w->cols, b).scale;
}

// Rows [r0, r1) of a q8_0 or q4_0 matrix: the first non-finite scale's row * groups + group, or SIZE_MAX.
static size_t find_nonfinite_scale(const Matrix *w, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int b = 0; b * Q8_BLOCK < n_groups(w->cols); b++) {
            int groups;
            const uint16_t *scale = block_scales(w, r, b, &groups);
            for (int g = 0; g < groups; g++)
                if (nonfinite_f16(scale[g])) return (size_t)r * n_groups(w->cols) + (size_t)b * Q8_BLOCK + g;
        }
    return SIZE_MAX;
}

// The check is cut into pieces of about CHECK_PIECE elements (f32) or rows (quantized).
#define CHECK_PIECE (1u << 18)
typedef struct { const TensorRef *t; int n_tensors; size_t n_pieces; uint8_t *bad; } FiniteTask;

static size_t pieces_of(const TensorRef *t) { return ((t->v ? t->n : t->n * 16) + CHECK_PIECE - 1) / CHECK_PIECE; }

static void finite_task(void *arg, int ith, int nth) {
    FiniteTask *a = arg;
    size_t piece = 0;
    for (int i = 0; i < a->n_tensors; i++) {
        const TensorRef *t = &a->t[i];
        size_t np = pieces_of(t), per = (t->n + np - 1) / np; // elements or rows a piece
        for (size_t p = 0; p < np; p++, piece++) {
            if (piece % nth != (size_t)ith) continue;
            size_t lo = p * per, hi = lo + per < t->n ? lo + per : t->n;
            a->bad[piece] = t->v ? find_nonfinite_f32(t->v + lo, hi - lo) != hi - lo
                                 : find_nonfinite_scale(t->w, (int)lo, (int)hi) != SIZE_MAX;
        }
    }
}

// Says where the first NaN or Inf of tensor t is, into msg.
static void describe_nonfinite(const TensorRef *t, char *msg, size_t cap) {
    char where[32] = "";
    if (t->layer >= 0) snprintf(where, sizeof where, "layer %d ", t->layer);
    if (t->v) {
        size_t e = find_nonfinite_f32(t->v, t->n);
        if (t->n == t->cols) // a vector
            snprintf(msg, cap, "non-finite weight %g in %s%s, element %zu", t->v[e], where, t->name, e);
        else
            snprintf(msg, cap, "non-finite weight %g in %s%s, row %zu, column %zu", t->v[e], where, t->name,
                     e / t->cols, e % t->cols);
        return;
    }
    size_t e = find_nonfinite_scale(t->w, 0, t->w->rows), groups = n_groups(t->w->cols);
    int in_block;
    const uint16_t *scale = block_scales(t->w, (int)(e / groups), (int)(e % groups / Q8_BLOCK), &in_block);
    snprintf(msg, cap, "non-finite %s scale %g in %s%s, row %zu, group %zu", dtype_name(t->w->dtype),
             f16_to_f32(scale[e % groups % Q8_BLOCK]), where, t->name, e / groups, e % groups);
}

// Dies at the first NaN or Inf of the weights, in file order, naming where it is.
static void check_weights_finite(Transformer *m) {
    int n = list_tensors(m, NULL);
    TensorRef *t = xcalloc(n, sizeof *t, "tensor list");
    list_tensors(m, t);
    FiniteTask a = {t, n, 0, NULL};
    for (int i = 0; i < n; i++) a.n_pieces += pieces_of(&t[i]);
    a.bad = xcalloc(a.n_pieces, 1, "finite check");
    if (a.n_pieces > 1) pool_run(m->pool, finite_task, &a); else finite_task(&a, 0, 1);
    char msg[256] = "";
    for (size_t i = 0, piece = 0; i < (size_t)n && !msg[0]; i++)
        for (size_t p = 0, np = pieces_of(&t[i]); p < np; p++)
            if (a.bad[piece++] && !msg[0]) describe_nonfinite(&t[i], msg, sizeof msg);
    free(a.bad);
    free(t);
    if (msg[0]) die("%s: %s; the file is damaged; re-export or re-download it", m->path, msg);
}

static void setup_transformer(Transformer *m, int seq_len, int n_threads, int kv_heads) {
    m->n_threads = n_threads;
    m->pool = pool_create(n_threads);
    if (!m->pool) die("cannot start %d threads", n_threads);
    check_weights_finite(m); // and maps every page
    if (kv_heads) set_kv_heads(m, kv_heads);
    for (int l = 0; l < m->c.n_layers && m->c.attention == ATTENTION_MLA; l++) {
        m->w.layers[l].uk = make_columns(m, &m->w.layers[l].wk_b, m->c.n_heads);
        dequantize_short_rows(m, &m->w.layers[l].wv_b);
    }
    if (seq_len > m->c.max_seq_len)
        die("-c %d exceeds the model's maximum context of %d", seq_len, m->c.max_seq_len);
    m->c.seq_len = seq_len > 0 ? seq_len
                 : (m->c.max_seq_len < DEFAULT_MAX_CONTEXT ? m->c.max_seq_len : DEFAULT_MAX_CONTEXT);
    malloc_run_state(m);
}

// Everything built on top of the checkpoint's bytes (m->map is left alone).
static void free_model_state(Transformer *m) {
    if (m->pool) pool_free(m->pool);
    free_run_state(&m->s);
    tokenizer_free(m->tok);
    free(m->w.layers);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
}

static void free_transformer(Transformer *m) {
    free_model_state(m);
    munmap(m->map, m->map_bytes);
}

// ----------------------------------------------------------------------------
// Command line

#ifndef TESTING

static void usage(FILE *f) {
    fprintf(f,
        "usage: ./run MODEL.bin [options]\n"
        "  -i TEXT   input text (the prompt)\n"
        "  -f FILE   input text from a file\n"
        "  -m MODE   generate (default) | chat | ppl | tokenize | info | kv\n"
        "  -n N      positions to run, the prompt and BOS included (default 256; 0 = to the end of the context)\n"
        "  -t T      temperature, 0 = greedy (default 1.0)\n"
        "  -p P      top-p (nucleus) sampling, in [0, 1] (default 0.9)\n"
        "  -s SEED   random seed (default: the time)\n"
        "  -T N      threads (default: all cores)\n"
        "  -c N      context length (default: the model's maximum, at most %d, so the KV cache stays small)\n"
        "  -y TEXT   system prompt (chat)\n"
        "  --kv-heads K  regroup the KV heads at load time: K < n_kv_heads mean-pools groups of\n"
        "            heads, K > n_kv_heads repeats them (same outputs, bigger cache)\n"
        "  --kv-type T   KV cache element type: f32 (default, exact), f16 (2 bytes a number) or\n"
        "            q8_0 (groups of 32 int8 with a float16 scale: 34 bytes per 32 numbers)\n"
        "  -h        this help\n"
        "examples:\n"
        "  ./run model.bin -i \"Once upon a time\"\n"
        "  ./run model.bin -m ppl -f text.txt\n"
        "  printf 'Hello!\\n' | ./run model.bin -m chat -y \"You are terse.\"\n"
        "  ./run -m kv l=96,n=96,h=128,s=1024,bytes=2    (KV-cache sizes of any model shape)\n",
        DEFAULT_MAX_CONTEXT);
}

static void usage_error(const char *fmt, const char *arg) {
    fputs("error: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    usage(stderr);
    exit(1);
}

// Whole-argument number parsing with a range: "12x", "", "1e99" are errors.
static long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die("%s expects an integer in [%ld, %ld], got '%s'", flag, lo, hi, s);
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        die("%s expects a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return v;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *input = NULL, *input_file = NULL, *mode = "generate", *system = NULL;
    float temperature = 1.0f, topp = 0.9f;
    long steps = 256, seq_len = 0, kv_heads = 0, n_threads = sysconf(_SC_NPROCESSORS_ONLN);
    int kv_type = KV_F32;
    unsigned long long seed = (unsigned long long)time(NULL);
    if (n_threads < 1) n_threads = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); emit_flush(); return 0; }
        if (a[0] != '-') {
            if (model_path) usage_error("unexpected argument '%s'", a);
            model_path = a;
            continue;
        }
        int kv_flag = !strcmp(a, "--kv-heads"), type_flag = !strcmp(a, "--kv-type");
        if (!kv_flag && !type_flag && (strlen(a) != 2 || !strchr("ifmntpsTcy", a[1]))) usage_error("unknown option '%s'", a);
        if (i + 1 >= argc) usage_error("option %s needs a value", a);
        const char *v = argv[++i];
        if (kv_flag) { kv_heads = parse_long("--kv-heads", v, 1, 1024); continue; }
        if (type_flag) { kv_type = parse_kv_type(v); continue; }
        switch (a[1]) {
        case 'i': input = v; break;
        case 'f': input_file = v; break;
        case 'm': mode = v; break;
        case 'n': steps = parse_long("-n", v, 0, INT_MAX); break;
        case 't': temperature = parse_float("-t", v, 0, 1e6f); break;
        case 'p': topp = parse_float("-p", v, 0, 1); break;
        case 's': seed = (unsigned long long)parse_long("-s", v, 0, LONG_MAX); break;
        case 'T': n_threads = parse_long("-T", v, 1, 1024); break;
        case 'c': seq_len = parse_long("-c", v, 1, INT_MAX); break;
        case 'y': system = v; break;
        }
    }
    if (!model_path) usage_error("%s", "no model file given");
    static const char *modes[] = {"generate", "chat", "ppl", "tokenize", "info", "kv"};
    int mode_ok = 0;
    for (size_t k = 0; k < sizeof modes / sizeof modes[0]; k++) mode_ok |= !strcmp(mode, modes[k]);
    if (!mode_ok) usage_error("unknown mode '%s' (generate, chat, ppl, tokenize, info, kv)", mode);
    if (!strcmp(mode, "kv") && strchr(model_path, '=')) { kv_calculator(model_path); emit_flush(); return 0; }
    if (input && input_file) die("give the input with -i or -f, not both");

    FILE *in = input_file ? open_input(input_file) : NULL; // a missing file is reported before the model loads

    Transformer m;
    build_transformer(&m, model_path);
    m.c.kv_type = kv_type;
    setup_transformer(&m, (int)seq_len, (int)n_threads, (int)kv_heads);
    if (steps == 0 || steps > m.c.seq_len) steps = m.c.seq_len;

    // Input: -m ppl streams a file of any length; the other modes read what
    // they can use: the context's worth of text (a text of n bytes has at least
    // n / max_token_bytes tokens), or for tokenize TOKENIZE_MAX_BYTES.
    char *text = NULL;
    size_t text_len = 0;
    int ppl = !strcmp(mode, "ppl"), tokenize = !strcmp(mode, "tokenize");
    if (input) { text_len = strlen(input); text = strdup(input); }
    else if (in && !ppl) {
        char what[128];
        size_t max = tokenize ? TOKENIZE_MAX_BYTES : input_limit(&m);
        if (tokenize) snprintf(what, sizeof what, "-m tokenize reads (%d MiB; -m ppl reads any length)",
                               TOKENIZE_MAX_BYTES >> 20);
        else snprintf(what, sizeof what, "the context of %d tokens can hold (-c)", m.c.seq_len);
        text = read_all(in, input_file, max, what, &text_len);
    }
    Sampler sp = {m.c.vocab_size, temperature, topp, seed * 0x9E3779B97F4A7C15ull + 1, NULL};
    sp.cand = xcalloc(m.c.vocab_size, sizeof(ProbIndex), "sampler");

    if (!strcmp(mode, "generate")) generate(&m, &sp, text ? text : "", text_len, (int)steps);
    else if (!strcmp(mode, "chat")) chat(&m, &sp, system, text);
    else if (!strcmp(mode, "info") || !strcmp(mode, "kv")) print_info(&m, model_path);
    else {
        if (!text && !in) die("-m %s needs an input: -i TEXT or -f FILE", mode);
        if (ppl) {
            Perplexity p = perplexity(&m, text ? NULL : in, text, text_len, PPL_READ_BYTES);
            printf("tokens: %ld\nperplexity: %.6f\n", p.scored, exp(p.nll / p.scored));
        }
        else print_tokens(&m, text, text_len);
    }
    emit_flush();
    if (in) fclose(in);
    free(sp.cand);
    free(text);
    free_transformer(&m);
    return 0;
}
#endif
