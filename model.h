/* model.h - the checkpoint format of this engine, version 4.

   One file holds everything needed to run a model: the config, the tokenizer
   and the weights. It is mmapped and used in place (no copies), so every
   tensor starts at a 64-byte aligned offset. All numbers are little-endian.

   Layout
     [0, 256)                  ModelHeader (below), zero padded
     [tokenizer_offset, +tokenizer_bytes)   tokenizer section (below)
     [weights_offset, file_bytes)           tensors, in this order, each at
                                            a 64-byte aligned offset:
       token_embedding (vocab_size, dim)          embedding_dtype
       for each layer l = 0 .. n_layers-1:
         attn_norm  (dim)                         always f32
         wq         (n_heads * head_dim, dim)
         wk         (n_kv_heads * head_dim, dim)
         wv         (n_kv_heads * head_dim, dim)
         wo         (dim, n_heads * head_dim)
         ffn_norm   (dim)                         always f32
         w1 (gate)  (hidden_dim, dim)
         w2 (down)  (dim, hidden_dim)
         w3 (up)    (hidden_dim, dim)
       final_norm (dim)                           always f32
       classifier (vocab_size, dim)               embedding_dtype; only if tied_classifier == 0
     With attention == ATTENTION_MLA, wq wk wv of each layer are replaced by
     (attn_norm first and wo after them, as above; dc = kv_latent_dim,
     dr = kv_rope_dim, H = n_heads):
         rope_pairs (dr / 2)             int32: the pair of a head (0 ..
                                         head_dim/2 - 1) whose RoPE frequency
                                         each pair of k_R turns at
         wq         (H * head_dim, dim)  q_C: each head's query without RoPE
         wq_rope    (H * dr, dim)        q_R: each head's RoPE query
         wkv_a      (dc + dr, dim)       W_DKV then W_KR: the latent c = W_DKV x
                                         and the shared key k_R = RoPE(W_KR x)
         wk_b       (H * dc, head_dim)   W_UK_h^T of each head h
         wv_b       (H * head_dim, dc)   W_UV_h of each head h
     Matrices are row-major (out_features, in_features), as in PyTorch: y = W x.
     Zero bytes pad each tensor up to the next multiple of 64; the file ends
     right after the last tensor's padding, at file_bytes.

   Weight types (dtype: the matrices but token_embedding and classifier,
   which have embedding_dtype; norm vectors are always f32)
     DTYPE_F32:  float32 values.
     DTYPE_Q8_0: a matrix (rows, cols) in groups of 32 consecutive values of
                a row that share one scale: value = q * scale, q an int8 in
                [-127, 127], scale an IEEE float16 (as GGML's Q8_0). A row
                has ceil(cols / 32) groups; when cols % 32 != 0 its last
                group is short, stored as a whole one whose values past cols
                are q = 0 (stories260K's FFN is 172 = 5 x 32 + 12 wide).
                Rows follow each other with no padding between them. A row
                is cut into blocks of up to 32 groups (1024 values); a block
                of g groups is
                    int8    q[32 * g]      its values, interleaved (below)
                    float16 scale[g]       one per group, in group order
                g = 32 for every block but maybe a row's last, which has the
                remaining groups. A row takes 34 bytes per group (cols * 17
                / 16 for whole groups); with cols % 1024 == 0 (the models'
                usual widths), a block is 1088 bytes = 17 cache lines and
                every row starts 64-byte aligned. The values of a block are interleaved 4 at a
                time: its groups are taken 16 at a time (the last chunk of a
                short block has the g % 16 left, m), and a chunk of m groups
                is stored as 8 rows of m x 4 bytes, values 4r .. 4r+3 of each
                of its groups in turn: value i of group j of the chunk lies at
                chunk_start + (i / 4) * 4 * m + j * 4 + i % 4.
                Why this layout: decode reads each row once, front to back,
                and a scale next to the values it scales keeps that one
                stream (all values, then all scales, as in version 1, decoded
                about 25 % slower per byte); float16 scales take 1 cache line
                per 16 of values instead of 2; and with the interleave, a
                64-byte load holds 4 values of each of 16 groups, so the
                integer dot product instructions (4 byte products summed per
                32-bit lane) leave one group's sum per lane, ready for a
                vector of 16 scales (version 2, groups one after the other,
                needed a lane shuffle per group).
                Quantizing a group (export.py): scale = max|x| / 127 in float32,
                rounded to the nearest float16 (an error if it overflows);
                q = round(x / scale) to nearest even, clamped to [-127, 127];
                a group with scale 0 has q = 0. group_size in the header is 32
                (whenever dtype or embedding_dtype is not f32).
     DTYPE_Q4_0: the same groups, rows and blocks with 4-bit values: value =
                q * scale, q in [-8, 7] stored as u = q + 8 in 4 bits (GGML's
                Q4_0: value = (u - 8) * d), scale an IEEE float16; a short
                last group's padding is q = 0 (u = 8). A block of g groups is
                    uint8   u[16 * g]      its values, two per byte (below)
                    float16 scale[g]       one per group, in group order
                18 bytes per group; a full block is 576 bytes = 9 cache lines.
                The bytes are q8_0's interleave with two of its rows in one:
                a chunk of m groups (16, or the g % 16 left) is 4 rows of
                m x 4 bytes, and byte k of row r holds byte k of the q8_0
                chunk's row 2r in its low 4 bits, of row 2r + 1 in its high
                4 bits: value i of group j of the chunk lies in byte
                chunk_start + (i / 8) * 4 * m + j * 4 + i % 4, in its low 4
                bits if i % 8 < 4, else its high 4 bits (chunk_start = 16 x
                the groups before the chunk). Why: one 64-byte load, masked
                (u & 15) and shifted (u >> 4 & 15), gives the two vectors
                q8_0's kernel loads, lane for lane against the same quantized
                activations, and u is already the unsigned operand of the
                integer dot product instructions (the kernel subtracts 8 x
                sum x once per group). GGML's own order (values j and j + 16
                in byte j of a group) would need a shuffle per group.
                Quantizing a group (export.py quantize_q4_0): m = its value of
                largest |x|; for each c of -8, -7.5, -7, 7, 7.5, scale = m / c
                rounded to float16, q = round(x / scale) to nearest even
                clamped to [-8, 7], then scale refit by least squares to
                sum x q / sum q^2 (rounded to float16); the scale of the
                smallest squared error wins (GGML: scale = m / -8 only; the
                search leaves 6.8 % less squared error on stories260K's
                weights, perplexity 9.137 instead of 9.224).
     embedding_dtype: export.py stores token_embedding and the classifier
                in q8_0 when the matrices are q4_0, else in dtype; any
                DTYPE_* loads. Measured (experiments/quant_quality.md): a
                4-bit embedding/classifier adds 26 % to stories260K's KL from
                f32 (0.186 -> 0.234 nats/token; aidreams260K 0.063 -> 0.073)
                and saves 16 % of a Llama-3.2-1B-shape file (827 -> 696 MB),
                the classifier being the most sensitive matrix (llama.cpp
                keeps it at 6-8 bits too).

   Multi-head latent attention (attention = ATTENTION_MLA; DeepSeek-V2,
   section 2.1, without the query's compression)
     Per token and layer the cache holds the latent c (kv_latent_dim numbers)
     and one RoPE key k_R (kv_rope_dim) shared by all heads; n_kv_heads is 1.
     Head h scores position p with
         (q_C,h . W_UK_h c_p + q_R,h . k_R,p) / sqrt(head_dim + kv_rope_dim)
     and reads the value W_UV_h c_p; q_R and k_R are rotated like a head's
     pairs, pair j at the frequency of a head's pair rope_pairs[j]. No norm on
     c (DeepSeek-V2 has one), so that export.py --mla full converts a GQA
     model exactly. Why W_UK is stored transposed per head: the engine
     absorbs it into the query (W_UK_h^T q_C,h, rows of the matrix times
     q_C,h) and W_UV into the output (W_UV_h times the weighted sum of the
     c_p), so attention runs over the latent itself: MQA with key [c; k_R]
     and value c. Absorbing them into wq and wo in the file instead would
     make those n_heads x kv_latent_dim wide, 9x Llama-3.2-1B's wq at
     kv_latent_dim 512; decode reads every weight once per token.

   RoPE convention
     Rotation pairs are adjacent elements (2i, 2i+1) of each head, as in Meta's
     original checkpoints and llama2.c. Hugging Face checkpoints permute the
     rows of wq and wk for rotate_half (pairs (i, i + head_dim/2)); export.py
     undoes that permutation once, on the way in.

   Tokenizer section
     uint32 n_tokens         (== vocab_size)
     uint32 max_token_bytes  (longest token, in bytes)
     then for each token id 0 .. n_tokens-1:
       float32 score    merge priority, higher merges first. llama2c kind: the
                        SentencePiece score; llama3 kind: -rank (= -id), so
                        the lowest rank merges first, as in tiktoken
       uint32  flags    TOKEN_SPECIAL: a control token (<|eot_id|>, <s>, ...),
                        never produced by merging, never printed as text
       uint32  len      number of bytes that follow
       uint8   bytes[len]   the token's raw bytes (llama3: the byte-level BPE
                        string mapped back to bytes; llama2c: as in tokenizer.bin,
                        e.g. " the", "<0x0A>", "\n<s>\n")
*/
#ifndef MODEL_H
#define MODEL_H

#include <stdint.h>
#include <stddef.h>

#define MODEL_MAGIC 0x4B43334Cu /* "L3CK" read as a little-endian uint32 */
#define MODEL_VERSION 4 /* 4: attention kind, MLA sizes, embedding dtype in the header (q4_0 and rows of any length are version 4 files too); 3: q8_0 values interleaved within a block; 2: blocks with float16 scales; 1: values, then float32 scales */
#define MODEL_VERSION_OLDEST 3 /* version 3 files load as version 4 with attention GQA and embedding_dtype = dtype */
#define MODEL_HEADER_BYTES 256
#define MODEL_ALIGN 64
#define MODEL_MAX_STOP_IDS 8

enum { DTYPE_F32 = 0, DTYPE_Q8_0 = 1, DTYPE_Q4_0 = 2 };
enum { ATTENTION_GQA = 0, ATTENTION_MLA = 1 };
enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_LLAMA3 = 1 };
enum { TOKENIZER_LLAMA2C = 1, TOKENIZER_LLAMA3 = 2 };
enum { TOKEN_SPECIAL = 1 };

typedef struct {
    uint32_t magic;            // MODEL_MAGIC
    uint32_t version;          // MODEL_VERSION
    int32_t dim;               // width of the residual stream
    int32_t hidden_dim;        // inner width of the SwiGLU feed-forward
    int32_t n_layers;
    int32_t n_heads;           // query heads
    int32_t n_kv_heads;        // key/value heads; n_heads % n_kv_heads == 0
    int32_t head_dim;          // per head; may differ from dim / n_heads; even
    int32_t vocab_size;
    int32_t max_seq_len;       // longest context the model was trained for
    float rope_theta;          // RoPE base (10000 Llama 2, 500000 Llama 3)
    int32_t rope_scaling;      // ROPE_SCALING_*
    float rope_factor;         // Llama 3.1 scaling: factor (8),
    float rope_low_freq_factor;   //   low_freq_factor (1),
    float rope_high_freq_factor;  //   high_freq_factor (4),
    int32_t rope_original_max_pos; //  original_max_position_embeddings (8192)
    float norm_eps;            // RMSNorm epsilon
    int32_t tied_classifier;   // 1: logits use token_embedding; 0: own classifier
    int32_t dtype;             // DTYPE_* of the matrices
    int32_t group_size;        // DTYPE_Q8_0: values per scale; DTYPE_F32: 0
    int32_t bos_id;            // prepended to every prompt; -1: none
    int32_t n_stop_ids;        // 0 .. MODEL_MAX_STOP_IDS
    int32_t stop_ids[MODEL_MAX_STOP_IDS]; // generation ends at any of these
    int32_t tokenizer_kind;    // TOKENIZER_*
    int32_t reserved;          // 0
    uint64_t tokenizer_offset; // start of the tokenizer section
    uint64_t tokenizer_bytes;
    uint64_t weights_offset;   // start of token_embedding, 64-byte aligned
    uint64_t file_bytes;       // total file length
    // version 4 (a version 3 file reads as attention GQA, 0, 0, dtype)
    int32_t attention;         // ATTENTION_*: GQA (MHA, GQA, MQA) or MLA
    int32_t kv_latent_dim;     // MLA: numbers of the latent c cached per token and layer; GQA: 0
    int32_t kv_rope_dim;       // MLA: numbers of the shared RoPE key cached per token and layer; GQA: 0
    int32_t embedding_dtype;   // DTYPE_* of token_embedding and classifier
    uint8_t pad[MODEL_HEADER_BYTES - 176];
} ModelHeader;

_Static_assert(sizeof(ModelHeader) == MODEL_HEADER_BYTES, "header is 256 bytes");

#endif
