// Unit tests of run.c's internals: kernels against their scalar references,
// the thread split, the grouped KV cache, the sampler.
#pragma GCC diagnostic ignored "-Wunused-function" // main() and its helpers are compiled out
#include "run.c"

static int n_failed = 0;
static void check(int ok, const char *name, const char *fmt, ...) {
    if (ok) { printf("ok %s\n", name); return; }
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL %s: ", name);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    n_failed++;
}

static float frand(uint64_t *s) { return random_f32(s) * 2 - 1; }

static void test_dot_matches_scalar(void) {
    uint64_t rng = 42;
    float a[1031], b[1031], worst = 0;
    for (int i = 0; i < 1031; i++) { a[i] = frand(&rng); b[i] = frand(&rng); }
    for (int n = 0; n <= 1031; n += (n < 70 ? 1 : 37)) {
        float ref = dot_scalar(a, b, n), got = dot(a, b, n), scale = 0;
        for (int i = 0; i < n; i++) scale += fabsf(a[i] * b[i]);
        float err = fabsf(got - ref) / (scale > 0 ? scale : 1);
        if (err > worst) worst = err;
    }
    check(worst < 1e-6f, "simd_dot_matches_scalar_dot", "worst relative error %g", worst);
}

// The vector exponential against expf over the range softmax feeds it
// (x - max <= 0) and beyond, and softmax against the formula in double.
static void test_vexp_and_softmax(void) {
    float worst = 0;
    for (float x = -100.0f; x <= 88.0f; x += 0.0137f) {
        vfloat v = vexp(vbroadcast(x));
        double ref = exp((double)x);
        if (ref < 1e-37) continue; // below the clamp: denormals are not needed
        float e = (float)fabs(v[0] - ref) / (float)ref;
        if (e > worst) worst = e;
    }
    check(worst < 4e-7f, "vexp_matches_exp_within_a_few_ulp", "worst relative error %g", worst);
    uint64_t rng = 5;
    float x[37], worst_sm = 0;
    for (int n = 1; n <= 37; n += 4) {
        for (int i = 0; i < n; i++) x[i] = 20 * frand(&rng);
        double max = x[0], sum = 0, ref[37];
        for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
        for (int i = 0; i < n; i++) sum += ref[i] = exp(x[i] - max);
        softmax(x, n);
        for (int i = 0; i < n; i++) worst_sm = fmaxf(worst_sm, (float)fabs(x[i] - ref[i] / sum));
    }
    check(worst_sm < 1e-6f, "softmax_matches_double_formula", "worst error %g", worst_sm);
}

// weighted_sum (attention's values) and tile_scores (its scores), for every
// KV element type, against their scalar references and against double-precision
// sums of the stored numbers, for head sizes that use each of their paths
// (8 and 16: the tiny models'; 72 and 136: q8_0 groups of 32 and a short
// last one); heads handled together give bit for bit what one head at a time
// gives (so the split of heads among threads cannot change the results).
static void test_attention_kernels(void) {
    enum { N = 300, HD = 136, H = ATT_HEADS };
    static const char *names[] = {"f32", "f16", "q8_0"};
    uint64_t rng = 9;
    static float a[H * N], x[N * HD];
    static uint8_t v[N * HD * 4], tile[VEC_LEN * HD * 4];
    for (int i = 0; i < H * N; i++) a[i] = frand(&rng);
    for (int i = 0; i < N * HD; i++) x[i] = frand(&rng) * (i % 41 == 0 ? 8 : 1); // a few outliers per group
    int sizes[] = {2, 6, 8, 16, 24, 64, 72, 128, 136};
    for (int type = KV_F32; type <= KV_Q8_0; type++) {
        float worst = 0, worst_ref = 0, worst_s = 0, worst_s_ref = 0;
        int same = 1, as_f32 = 1;
        for (int k = 0; k < 9; k++) {
            int hd = sizes[k];
            size_t rb = kv_row_bytes(type, hd);
            for (int p = 0; p < N; p++) kv_store(v + p * rb, 1, 0, x + p * hd, hd, type);         // value rows
            for (int i = 0; i < VEC_LEN; i++) kv_store(tile, VEC_LEN, i, x + i * hd, hd, type);    // a key tile
            float out[H * HD], one[H * HD], init[H * HD] = {0}, ref[HD];
            for (int d = 0; d < H * hd; d++) init[d] = frand(&rng);
            memcpy(out, init, sizeof out);
            memcpy(one, init, sizeof one);
            weighted_sum(out, a, N, v, N, hd, H, type);
            for (int h = 0; h < H; h++) weighted_sum(one + h * hd, a + h * N, N, v, N, hd, 1, type);
            same &= memcmp(out, one, (size_t)H * hd * sizeof(float)) == 0;
            for (int h = 0; h < H; h++) {
                memcpy(ref, init + h * hd, hd * sizeof(float));
                weighted_sum_scalar(ref, a + h * N, v, N, hd, type);
                for (int d = 0; d < hd; d++) {
                    double r = init[h * hd + d];
                    for (int p = 0; p < N; p++) r += (double)a[h * N + p] * kv_number(v + p * rb, 1, 0, d, hd, type);
                    worst = fmaxf(worst, (float)fabs(out[h * hd + d] - r));
                    worst_ref = fmaxf(worst_ref, fabsf(out[h * hd + d] - ref[d]));
                }
            }
            // scores of H heads (q: a's first H * hd numbers) against the key tile
            float att[H * VEC_LEN], att1[H * VEC_LEN], att_ref[VEC_LEN];
            tile_scores(att, VEC_LEN, a, tile, hd, 0.5f, H, type);
            for (int h = 0; h < H; h++) tile_scores(att1 + h * VEC_LEN, VEC_LEN, a + h * hd, tile, hd, 0.5f, 1, type);
            same &= memcmp(att, att1, sizeof att) == 0;
            // the same bits from the f32 kernels on the numbers converted to float32 (kv_to_f32)
            static float fk[VEC_LEN * HD], fv[N * HD];
            float attf[H * VEC_LEN], outf[H * HD];
            kv_to_f32(fk, tile, VEC_LEN, hd, type, 1);
            kv_to_f32(fv, v, N, hd, type, 0);
            tile_scores(attf, VEC_LEN, a, (const uint8_t *)fk, hd, 0.5f, H, KV_F32);
            memcpy(outf, init, sizeof outf);
            weighted_sum(outf, a, N, (const uint8_t *)fv, N, hd, H, KV_F32);
            as_f32 &= !memcmp(att, attf, sizeof att) && !memcmp(out, outf, (size_t)H * hd * sizeof(float));
            for (int h = 0; h < H; h++) {
                tile_scores_scalar(att_ref, a + h * hd, tile, hd, 0.5f, type);
                for (int i = 0; i < VEC_LEN; i++) {
                    double r = 0;
                    for (int d = 0; d < hd; d++) r += (double)a[h * hd + d] * kv_number(tile, VEC_LEN, i, d, hd, type);
                    worst_s = fmaxf(worst_s, (float)fabs(att[h * VEC_LEN + i] - 0.5 * r));
                    worst_s_ref = fmaxf(worst_s_ref, fabsf(att[h * VEC_LEN + i] - att_ref[i]));
                }
            }
        }
        char name[96];
        snprintf(name, sizeof name, "weighted_sum_%s_matches_double_sums", names[type]);
        check(worst < 1e-4f * (type == KV_F32 ? 1 : 8), name, "worst error %g", worst); // |x| up to 8: sums up to ~8 x 300
        snprintf(name, sizeof name, "weighted_sum_%s_matches_scalar_reference", names[type]);
        check(worst_ref < 1e-4f * (type == KV_F32 ? 1 : 8), name, "worst error %g", worst_ref);
        snprintf(name, sizeof name, "tile_scores_%s_match_double_dot_products", names[type]);
        check(worst_s < 1e-4f * (type == KV_F32 ? 1 : 8), name, "worst error %g", worst_s);
        snprintf(name, sizeof name, "tile_scores_%s_match_scalar_reference", names[type]);
        check(worst_s_ref < 1e-4f * (type == KV_F32 ? 1 : 8), name, "worst error %g", worst_s_ref);
        snprintf(name, sizeof name, "attention_%s_heads_together_equal_heads_one_by_one", names[type]);
        check(same, name, "a result differs");
        snprintf(name, sizeof name, "attention_%s_equals_f32_kernels_on_its_numbers_bit_for_bit", names[type]);
        check(as_f32, name, "a result differs");
    }
}

// What the cache keeps of a row: f32 exactly; f16 each number rounded to the
// nearest float16; q8_0 within half a step of its group's scale, the group's
// largest |x| at 127 (or 126: the scale rounded up to a float16), the bytes
// where kernels.h puts them (values, then one float16 scale per group of 32,
// the last group short).
static void test_kv_store_rounding(void) {
    enum { W = 72 }; // two groups of 32 and one of 8
    uint64_t rng = 21;
    float x[W];
    uint8_t row[W * 4], tile[VEC_LEN * W * 4];
    int f32_exact = 1, f16_nearest = 1, q8_ok = 1;
    float worst_q = 0;
    for (int trial = 0; trial < 200; trial++) {
        float mag = ldexpf(1.0f, trial % 20 - 3); // 2^-3 .. 2^16: q8_0 scales are normal float16s
        for (int d = 0; d < W; d++) x[d] = frand(&rng) * mag;
        for (int type = KV_F32; type <= KV_Q8_0; type++) {
            int lane = trial % VEC_LEN;
            kv_store(row, 1, 0, x, W, type);
            kv_store(tile, VEC_LEN, lane, x, W, type);
            for (int d = 0; d < W; d++) {
                float r = kv_number(row, 1, 0, d, W, type), t = kv_number(tile, VEC_LEN, lane, d, W, type);
                if (r != t) q8_ok = f16_nearest = f32_exact = 0; // a tile row holds the same numbers as a plain row
                if (type == KV_F32) f32_exact &= r == x[d];
                if (type == KV_F16) f16_nearest &= r == f16_to_f32(f32_to_f16(x[d]));
            }
            if (type != KV_Q8_0) continue;
            for (int g = 0; g * KV_GROUP < W; g++) {
                uint16_t h;
                memcpy(&h, row + W + 2 * g, 2);
                float scale = f16_to_f32(h);
                int qmax = 0;
                for (int d = g * KV_GROUP; d < W && d < (g + 1) * KV_GROUP; d++) {
                    worst_q = fmaxf(worst_q, fabsf(kv_number(row, 1, 0, d, W, type) - x[d]) / scale);
                    qmax = abs((int8_t)row[d]) > qmax ? abs((int8_t)row[d]) : qmax;
                }
                q8_ok &= qmax == 127 || qmax == 126;
            }
        }
    }
    check(kv_row_bytes(KV_F32, W) == 288 && kv_row_bytes(KV_F16, W) == 144 && kv_row_bytes(KV_Q8_0, W) == 78 &&
          kv_row_bytes(KV_Q8_0, 8) == 10 && kv_row_bytes(KV_Q8_0, 64) == 68, "kv_row_bytes_match_the_formats",
          "f32 %zu, f16 %zu, q8_0 %zu", kv_row_bytes(KV_F32, W), kv_row_bytes(KV_F16, W), kv_row_bytes(KV_Q8_0, W));
    check(f32_exact, "kv_f32_cache_is_exact", "a number changed");
    check(f16_nearest, "kv_f16_cache_rounds_to_nearest_float16", "a number differs");
    check(q8_ok && worst_q <= 0.5001f, "kv_q8_0_cache_within_half_a_step_of_its_group_scale",
          "error %g steps, full range and layout %d", worst_q, q8_ok);
    float bad[KV_GROUP] = {NAN, 1.0f, -INFINITY};
    kv_store(row, 1, 0, bad, KV_GROUP, KV_Q8_0);
    check((int8_t)row[0] == 0 && (int8_t)row[2] == -127, "kv_q8_0_of_nan_is_zero_and_inf_saturates", "q %d %d", (int8_t)row[0],
          (int8_t)row[2]);
    // beyond float16's range, numbers saturate at +-65504 (f16) and scales at 65504 (q8_0): large, never inf or NaN
    float huge[KV_GROUP] = {1e9f, -7e4f, 3.0f};
    int finite = 1;
    for (int type = KV_F16; type <= KV_Q8_0; type++) {
        kv_store(row, 1, 0, huge, KV_GROUP, type);
        for (int d = 0; d < 3; d++) finite &= isfinite(kv_number(row, 1, 0, d, KV_GROUP, type));
        finite &= kv_number(row, 1, 0, 0, KV_GROUP, type) >= 65504.0f && kv_number(row, 1, 0, 1, KV_GROUP, type) <= -65504.0f;
    }
    check(finite, "kv_cache_saturates_beyond_float16_range", "a number is not finite or not saturated");
    // the vector conversions of the kernels against the scalar f16_to_f32, for every float16
    static uint8_t all[65536 * 2];
    int exact = 1;
    for (uint32_t h = 0; h < 65536; h++) { uint16_t b = (uint16_t)h; memcpy(all + 2 * h, &b, 2); }
    for (uint32_t h = 0; h < 65536; h += VEC_LEN) {
        vfloat got = f16_vec(all + 2 * h);
        for (int j = 0; j < VEC_LEN; j++) {
            float want = f16_to_f32((uint16_t)(h + j)), one = f16_at(all + 2 * (h + j));
            exact &= isnan(want) ? isnan(got[j]) && isnan(one)
                                 : !memcmp(&got[j], &want, sizeof want) && !memcmp(&one, &want, sizeof want);
        }
    }
    check(exact, "f16_vector_conversion_matches_scalar_for_every_float16", "a value differs");
    uint8_t bytes[256 + VEC_LEN];
    for (int i = 0; i < 256 + VEC_LEN; i++) bytes[i] = (uint8_t)i;
    exact = 1;
    for (int i = 0; i < 256; i += VEC_LEN) {
        vfloat got = i8_vec(bytes + i);
        for (int j = 0; j < VEC_LEN; j++) exact &= got[j] == (float)(int8_t)bytes[i + j];
    }
    check(exact, "int8_vector_conversion_is_exact_for_every_int8", "a value differs");
}

// MLA's latent scores (row_scores): H heads against n float rows, added to
// what att holds, against the scalar reference; heads together equal one by one.
static void test_row_scores(void) {
    enum { N = 16, HD = 136, H = ATT_HEADS };
    uint64_t rng = 19;
    static float a[H * HD], v[N * HD];
    for (int i = 0; i < H * HD; i++) a[i] = frand(&rng);
    for (int i = 0; i < N * HD; i++) v[i] = frand(&rng);
    int sizes[] = {2, 6, 16, 24, 64, 72, 128, 136}, same = 1;
    float worst_r = 0;
    for (int k = 0; k < 8; k++) {
        int hd = sizes[k], n = 7 + k; // a tile of 4 positions and a rest
        float att[H * 16], att1[H * 16], ref[H * 16];
        for (int i = 0; i < H * 16; i++) att[i] = att1[i] = ref[i] = frand(&rng);
        row_scores(att, 16, a, v, n, hd, 0.5f, H);
        for (int h = 0; h < H; h++) row_scores(att1 + h * 16, 16, a + h * hd, v, n, hd, 0.5f, 1);
        row_scores_scalar(ref, 16, a, v, n, hd, 0.5f, H);
        same &= memcmp(att, att1, sizeof att) == 0;
        for (int i = 0; i < H * 16; i++) worst_r = fmaxf(worst_r, fabsf(att[i] - ref[i]));
    }
    check(worst_r < 1e-4f, "row_scores_match_scalar_dot_products", "worst error %g", worst_r);
    check(same, "row_scores_heads_together_equal_heads_one_by_one", "a result differs");
}

// MLA's W_UK^T kept column by column (make_columns, column_matvec): for
// f32, q8_0 and q4_0 matrices of several heads, short and odd shapes, each
// head's W_h x against the scalar reference and against dot products in
// double of x with the rows as the file holds them (matrix_slice).
static void test_column_matvec(void) {
    enum { HEADS = 3, MAX_R = 520, MAX_C = 72 };
    uint64_t rng = 23;
    static float w[HEADS * MAX_R * MAX_C], x[HEADS * MAX_C], got[HEADS * MAX_R], ref[HEADS * MAX_R], row[MAX_C];
    static uint8_t wq[HEADS * MAX_R * (MAX_C / Q8_GROUP + 1) * (Q8_GROUP + 2)]; // q8_0 rows of up to MAX_C
    const int shapes[][2] = {{512, 64}, {520, 72}, {40, 8}, {7, 33}, {16, 48}, {130, 1}};
    const int dtypes[] = {DTYPE_F32, DTYPE_Q8_0, DTYPE_Q4_0};
    float worst_ref = 0, worst_exact = 0;
    for (int k = 0; k < (int)(sizeof shapes / sizeof shapes[0]); k++)
        for (int d = 0; d < 3; d++) {
            const int R = shapes[k][0], C = shapes[k][1];
            for (int i = 0; i < HEADS * R * C; i++) w[i] = frand(&rng);
            for (int i = 0; i < HEADS * C; i++) x[i] = frand(&rng);
            Matrix mw = {.f = w, .dtype = dtypes[d], .rows = HEADS * R, .cols = C};
            if (dtypes[d] != DTYPE_F32) {
                mw.f = NULL, mw.q = wq;
                for (int r = 0; r < HEADS * R; r++)
                    (dtypes[d] == DTYPE_Q8_0 ? quantize_q8_row : quantize_q4_row)(wq + r * row_bytes(&mw), w + r * C, C);
            }
            Transformer m;
            memset(&m, 0, sizeof m);
            Columns cw = make_columns(&m, &mw, HEADS);
            for (int h = 0; h < HEADS; h++) {
                size_t at = (size_t)h * C * cw.padded;
                const float *f = cw.f ? cw.f + at : NULL;
                const int8_t *q = cw.q ? cw.q + at : NULL;
                const uint16_t *sc = cw.q ? cw.scale + (size_t)h * n_groups(C) * cw.padded : NULL;
                column_matvec(got + h * R, x + h * C, f, q, sc, R, C);
                column_matvec_scalar(ref + h * R, x + h * C, f, q, sc, R, C);
                for (int r = 0; r < R; r++) {
                    matrix_slice(&mw, h * R + r, 0, C, row);
                    double exact = 0, mag = 0;
                    for (int i = 0; i < C; i++) exact += (double)row[i] * x[h * C + i], mag += fabs((double)row[i] * x[h * C + i]);
                    mag = mag > 0 ? mag : 1;
                    worst_ref = fmaxf(worst_ref, (float)(fabs(got[h * R + r] - ref[h * R + r]) / mag));
                    worst_exact = fmaxf(worst_exact, (float)(fabs(got[h * R + r] - exact) / mag));
                }
            }
            for (int i = 0; i < m.n_owned; i++) free(m.owned[i]);
            free(m.owned);
        }
    check(worst_ref < 1e-6f, "column_matvec_matches_scalar_reference", "worst relative error %g", worst_ref);
    check(worst_exact < 1e-6f, "column_matvec_matches_the_files_rows_in_double", "worst relative error %g", worst_exact);
}

// MLA's latent rows in a q8_0 cache (kv_store_q8_row): the numbers kv_store
// keeps, bit for bit; read back as float32 in their stored order
// (kv_q8_rows_to_f32, kv_q8_rows_order); scored against quantized query
// heads (q8_row_scores: VNNI tiles and dot_q8) as the scalar reference does
// and within rounding of double dot products of the same numbers.
static void test_q8_rows(void) {
    enum { MAX_W = 2080, N = 13, H = 7 };
    uint64_t rng = 29;
    static float x[N * MAX_W], conv[N * MAX_W], qf[H * MAX_W], att[H * N], ref[H * N], init[H * N];
    static uint8_t rows[N * (MAX_W + MAX_W / 16)], plain[MAX_W + MAX_W / 16];
    static int8_t xq[H * MAX_W];
    static float xs[H * MAX_W / Q8_GROUP];
    static int32_t sum[H * MAX_W / Q8_GROUP];
    static int order[MAX_W];
    const int widths[] = {32, 96, 512, 544, 1024, MAX_W};
    int same_numbers = 1, same_f32 = 1, untouched = 1;
    float worst_ref = 0, worst_exact = 0;
    for (int k = 0; k < (int)(sizeof widths / sizeof widths[0]); k++) {
        const int w = widths[k];
        const size_t rb = kv_row_bytes(KV_Q8_0, w);
        for (int i = 0; i < N * w; i++) x[i] = frand(&rng) * (i % 41 == 0 ? 6 : 1);
        for (int i = 0; i < H * w; i++) qf[i] = frand(&rng);
        for (int r = 0; r < N; r++) {
            kv_store_q8_row(rows + r * rb, x + r * w, w);
            kv_store(plain, 1, 0, x + r * w, w, KV_Q8_0);
            for (int d = 0; d < w; d++) same_numbers &= kv_q8_row_number(rows + r * rb, d, w) == kv_number(plain, 1, 0, d, w, KV_Q8_0);
        }
        kv_q8_rows_order(order, w);
        kv_q8_rows_to_f32(conv, rows, N, w);
        for (int r = 0; r < N; r++)
            for (int d = 0; d < w; d++) same_f32 &= conv[r * w + order[d]] == kv_q8_row_number(rows + r * rb, d, w);
        for (int h = 0; h < H; h++)
            quantize_q8(xq + h * padded_len(w), xs + h * n_groups(w), sum + h * n_groups(w), qf + h * w, w);
        for (int nh = 1; nh <= H; nh += 2)
            for (int n = 1; n <= N; n += 4) {
                for (int i = 0; i < H * N; i++) init[i] = att[i] = ref[i] = frand(&rng);
                q8_row_scores(att, N, xq, xs, sum, rows, n, w, 0.5f, nh);
                q8_row_scores_scalar(ref, N, xq, xs, rows, n, w, 0.5f, nh);
                for (int h = 0; h < nh; h++)
                    for (int p = 0; p < n; p++) {
                        double exact = 0, mag = 0; // the query's numbers (int8 x scale) . the cache's, in double
                        for (int d = 0; d < w; d++) {
                            double qd = xq[h * padded_len(w) + order[d]] * (double)xs[h * n_groups(w) + d / Q8_GROUP];
                            double cd = kv_q8_row_number(rows + p * rb, d, w);
                            exact += qd * cd, mag += fabs(qd * cd);
                        }
                        mag = 0.5 * mag + fabs(init[h * N + p]);
                        worst_ref = fmaxf(worst_ref, (float)(fabs(att[h * N + p] - ref[h * N + p]) / mag));
                        worst_exact = fmaxf(worst_exact, (float)(fabs(att[h * N + p] - (init[h * N + p] + 0.5 * exact)) / mag));
                    }
                for (int i = 0; i < H * N; i++) // positions and heads past n and nh untouched
                    untouched &= (i / N < nh && i % N < n) || att[i] == init[i];
            }
    }
    check(same_numbers, "kv_q8_rows_keep_kv_stores_numbers", "a number differs");
    check(same_f32, "kv_q8_rows_to_f32_gives_every_number_in_its_stored_order", "a number differs");
    check(worst_ref < 1e-6f, "q8_row_scores_match_scalar_reference", "worst relative error %g", worst_ref);
    check(worst_exact < 1e-6f, "q8_row_scores_match_double_dot_products", "worst relative error %g", worst_exact);
    check(untouched, "q8_row_scores_leave_other_heads_and_positions_alone", "a score outside changed");
}

static void test_split_range_partitions_rows(void) {
    int ok = 1;
    for (int n = 0; n < 200 && ok; n += 7)
        for (int nth = 1; nth <= 5 && ok; nth++)
            for (int quantum = 1; quantum <= 16 && ok; quantum *= 4) {
                int next = 0;
                for (int ith = 0; ith < nth; ith++) {
                    int lo, hi;
                    split_range(n, ith, nth, quantum, &lo, &hi);
                    if (lo != next || hi < lo || (lo % quantum && lo != n)) ok = 0;
                    next = hi;
                }
                if (next != n) ok = 0;
            }
    check(ok, "split_range_covers_every_row_once", "a split left a gap or an overlap");
}

// xcalloc's blocks, small and large (calloc gives large ones 16 bytes into a
// page), start on a cache line, zeroed: the kernels' 64-byte activation loads
// would otherwise straddle two lines (README: Activations 64-byte aligned).
static void test_xcalloc_aligns_to_cache_lines(void) {
    int ok = 1;
    size_t sizes[] = {0, 1, 100, 4096, 1 << 20, 3 << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        unsigned char *p = xcalloc(sizes[i], 1, "test");
        if ((uintptr_t)p % 64) ok = 0;
        for (size_t j = 0; j < sizes[i]; j += 4093) if (p[j]) ok = 0;
        if (sizes[i] && p[sizes[i] - 1]) ok = 0;
        free(p);
    }
    check(ok, "xcalloc_aligns_to_cache_lines", "a block not 64-byte aligned or not zeroed");
}

// Builds an f32 matrix of random values (rows, cols).
static Matrix random_matrix(int rows, int cols, uint64_t *rng, float **storage) {
    *storage = xcalloc((size_t)rows * cols, sizeof(float), "test");
    for (size_t i = 0; i < (size_t)rows * cols; i++) (*storage)[i] = frand(rng);
    Matrix w = {.f = *storage, .rows = rows, .cols = cols};
    return w;
}

// Both matmul paths (dot products for T = 5, register tiles for T = 37 with
// padding and edge rows) against scalar dot products, and the same bits for
// any thread count.
static void test_matmul_paths(void) {
    enum { ROWS = 131, COLS = 300, TMAX = 37 };
    uint64_t rng = 7;
    float *wf, *x = xcalloc(TMAX * COLS, sizeof(float), "x");
    Matrix w = random_matrix(ROWS, COLS, &rng, &wf);
    for (int i = 0; i < TMAX * COLS; i++) x[i] = frand(&rng);
    Transformer m = {0};
    m.n_threads = 3; // shares for up to 3 threads
    m.s.shares = aligned_alloc(64, 3 * sizeof(Share));
    m.s.scratch_stride = GEMM_R * K_BLOCK > COLS ? GEMM_R * K_BLOCK : COLS;
    m.s.scratch = xcalloc(3 * m.s.scratch_stride, sizeof(float), "scratch");
    m.s.xT = xcalloc((size_t)COLS * MAX_BATCH, sizeof(float), "xT");
    m.s.outT = xcalloc((size_t)ROWS * MAX_BATCH, sizeof(float), "outT");
    float *out1 = xcalloc(TMAX * ROWS, sizeof(float), "out"), *out3 = xcalloc(TMAX * ROWS, sizeof(float), "out");
    int Ts[2] = {5, TMAX};
    for (int k = 0; k < 2; k++) {
        int T = Ts[k];
        char name[64];
        m.pool = pool_create(1);
        matmul(&m, out1, x, &w, T);
        pool_free(m.pool);
        m.pool = pool_create(3);
        matmul(&m, out3, x, &w, T);
        snprintf(name, sizeof name, "matmul_T%d_1_and_3_threads_bit_identical", T);
        check(!memcmp(out1, out3, (size_t)T * ROWS * sizeof(float)), name, "outputs differ");
        // three products sharing x in one call (q, k, v) give what three calls give
        float *fused = xcalloc(3 * TMAX * ROWS, sizeof(float), "out");
        Matrix top = w, bottom = w;
        top.rows = 64, bottom.f += (size_t)64 * COLS, bottom.rows = ROWS - 64;
        matmuls(&m, x, T, (Product[]){{fused, &top}, {fused + TMAX * 64, &bottom}, {fused + 2 * TMAX * ROWS, &w}}, 3);
        int same = 1;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < ROWS; r++) {
                float part = r < 64 ? fused[t * 64 + r] : fused[TMAX * 64 + t * (ROWS - 64) + r - 64];
                same &= part == out3[t * ROWS + r] && fused[2 * TMAX * ROWS + t * ROWS + r] == out3[t * ROWS + r];
            }
        snprintf(name, sizeof name, "matmuls_T%d_three_products_equal_separate_calls", T);
        check(same, name, "outputs differ");
        free(fused);
        pool_free(m.pool);
        float worst = 0;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < ROWS; r++)
                worst = fmaxf(worst, fabsf(out1[t * ROWS + r] - dot_scalar(wf + r * COLS, x + t * COLS, COLS)));
        snprintf(name, sizeof name, "matmul_T%d_matches_scalar_dot_products", T);
        check(worst < 1e-5f, name, "max abs error %g", worst);
    }
    free(wf); free(x); free(out1); free(out3); free(m.s.xT); free(m.s.outT); free(m.s.scratch); free(m.s.shares);
}

static void test_sampler(void) {
    float logits[6] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f, 0.5f};
    ProbIndex cand[6];
    Sampler sp = {6, 0.0f, 0.9f, 1, cand};
    float l[6];
    memcpy(l, logits, sizeof l);
    check(sample(&sp, l) == 1, "greedy_picks_argmax", "wrong token");
    // top-p 0.01 keeps only the most likely token, whatever the coin
    int all_top = 1;
    sp.temperature = 1.0f; sp.topp = 0.01f;
    for (int i = 0; i < 50; i++) { memcpy(l, logits, sizeof l); all_top &= sample(&sp, l) == 1; }
    check(all_top, "topp_tiny_keeps_only_the_top_token", "sampled another token");
    // plain sampling follows softmax(logits): compare frequencies
    sp.topp = 1.0f;
    int counts[6] = {0}, N = 60000;
    for (int i = 0; i < N; i++) { memcpy(l, logits, sizeof l); counts[sample(&sp, l)]++; }
    memcpy(l, logits, sizeof l);
    softmax(l, 6);
    float worst = 0;
    for (int i = 0; i < 6; i++) { float d = fabsf(counts[i] / (float)N - l[i]); if (d > worst) worst = d; }
    check(worst < 0.01f, "temperature_sampling_follows_softmax", "max frequency error %g", worst);
}

// float16 <-> float32 (q8_0 weight scales) against the compiler's _Float16.
static void test_f16_conversions(void) {
#if defined(__FLT16_MAX__)
    int exact = 1;
    for (uint32_t h = 0; h < 0x10000; h++) { // every float16: exact, NaNs stay NaN
        _Float16 ref;
        uint16_t bits = (uint16_t)h;
        memcpy(&ref, &bits, sizeof ref);
        float got = f16_to_f32(bits), want = (float)ref;
        exact &= isnan(want) ? isnan(got) : memcmp(&got, &want, sizeof got) == 0;
    }
    check(exact, "f16_to_f32_exact_for_every_float16", "a value differs");
    int rounded = 1;
    uint64_t rng = 5;
    for (uint32_t x = 0; x < 0xff800000u; x += 997 + random_u32(&rng) % 1024) { // f32 bit patterns, both signs
        float f;
        memcpy(&f, &x, sizeof f);
        _Float16 want = (_Float16)f;
        uint16_t w;
        memcpy(&w, &want, sizeof w);
        rounded &= isnan(f) ? (f32_to_f16(f) & 0x7fff) > 0x7c00 : f32_to_f16(f) == w;
    }
    float ties[] = {65504.0f, 65519.99f, 65520.0f, 0x1p-25f, 0x1.8p-24f, 1.0f + 0x1p-11f, 1.0f + 0x3p-11f, 6.1e-5f};
    for (int i = 0; i < 8; i++) {
        _Float16 want = (_Float16)ties[i];
        uint16_t w;
        memcpy(&w, &want, sizeof w);
        rounded &= f32_to_f16(ties[i]) == w && f32_to_f16(-ties[i]) == (w | 0x8000);
    }
    check(rounded, "f32_to_f16_rounds_to_nearest_even_as_the_compiler", "a value differs");
#else
    printf("FAIL f16_conversions: this compiler has no _Float16 to compare with\n");
    n_failed++;
#endif
}

// sum of |a_i b_i|: the size of a dot product's terms, which rounding errors scale with
static float abs_dot(const float *a, const float *b, int n) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += fabsf(a[i] * b[i]);
    return sum;
}

// The matmul's paths for q8_0 or q4_0 weights (ROWS x len, w quantized) and
// inputs x (T, len), at each of the lengths: integer dots for one token; for a
// block of T >= VEC_LEN tokens, integer tiles (AVX-512 VNNI) or dequantized
// float tiles, the same bits with 1 and 2 threads. ROWS and T leave a partial
// tile each way; lengths that end in a short block, chunk or group exercise those.
enum { ROWS = 37, T = 20 };
static void check_int_matmul_paths(int dtype, const float *x, const float *w, const int *lengths, int n_len, float exact_tol) {
    const char *type = dtype == DTYPE_Q8_0 ? "q8" : "q4";
    int max_len = 0;
    for (int i = 0; i < n_len; i++) max_len = lengths[i] > max_len ? lengths[i] : max_len;
    const size_t xn = padded_len(max_len), xg = n_groups(max_len);
    uint8_t *wq = xcalloc((size_t)ROWS * xn * 2, 1, "wq"); // >= ROWS rows of either type
    int8_t *xq = xcalloc((size_t)T * xn, 1, "xq");
    float *xs = xcalloc((size_t)T * xg, sizeof(float), "xs"), *deq = xcalloc(xn, sizeof(float), "deq");
    int32_t *xsum = xcalloc((size_t)T * xg, sizeof(int32_t), "xsum");
    Transformer m = {0};
    m.n_threads = 2;
    m.pool = pool_create(2);
    m.s.shares = aligned_alloc(64, 2 * sizeof(Share));
    m.s.xq = xcalloc((size_t)(T + Q8_TILE_T) * xn, 1, "xq"); // matmul quantizes x (and padding tokens) into these
    m.s.xs = xcalloc((size_t)(T + Q8_TILE_T) * xg, sizeof(float), "xs");
    m.s.sum128 = xcalloc((size_t)(T + Q8_TILE_T) * xg, sizeof(int32_t), "sum128");
    m.s.scratch_stride = GEMM_R * K_BLOCK > max_len ? GEMM_R * K_BLOCK : max_len;
    m.s.scratch = xcalloc(2 * m.s.scratch_stride, sizeof(float), "scratch");
    m.s.xT = xcalloc((size_t)max_len * MAX_BATCH, sizeof(float), "xT");
    m.s.outT = xcalloc((size_t)ROWS * MAX_BATCH, sizeof(float), "outT");
    float worst_int = 0, worst_exact = 0, worst_block = 0;
    int same_threads = 1;
    for (int li = 0; li < n_len; li++) {
        int len = lengths[li];
        Matrix mw = {.q = wq, .dtype = dtype, .rows = ROWS, .cols = len};
        for (int r = 0; r < ROWS; r++)
            (dtype == DTYPE_Q8_0 ? quantize_q8_row : quantize_q4_row)(wq + r * row_bytes(&mw), w + r * len, len);
        for (int t = 0; t < T; t++)
            quantize_q8(xq + t * padded_len(len), xs + t * n_groups(len), xsum + t * n_groups(len), x + t * len, len);
        float out1[ROWS], outT[T * ROWS], outT1[T * ROWS];
        matmul(&m, out1, x, &mw, 1);
        matmul(&m, outT, x, &mw, T);
        ThreadPool *two = m.pool;
        m.pool = pool_create(1), m.n_threads = 1;
        matmul(&m, outT1, x, &mw, T);
        pool_free(m.pool);
        m.pool = two, m.n_threads = 2;
        same_threads &= !memcmp(outT, outT1, sizeof outT);
        for (int r = 0; r < ROWS; r++) {
            matrix_slice(&mw, r, 0, len, deq);
            const uint8_t *row = matrix_row(&mw, r);
            for (int t = 0; t < T; t++) {
                const float *xt = x + t * len, scale = abs_dot(w + r * len, xt, len) + 1e-30f; // sum |w x|
                const int8_t *q = xq + t * padded_len(len);
                const float *s = xs + t * n_groups(len);
                float exact = dot_scalar(deq, xt, len);
                float integer = dtype == DTYPE_Q8_0 ? dot_q8_scalar(row, q, s, len) : dot_q4_scalar(row, q, s, len);
                if (t == 0) {
                    worst_int = fmaxf(worst_int, fabsf(out1[r] - integer) / scale);
                    worst_exact = fmaxf(worst_exact, fabsf(out1[r] - exact) / scale);
                }
                worst_block = fmaxf(worst_block, fabsf(outT[t * ROWS + r] - (Q8_GEMM ? integer : exact)) / scale);
            }
        }
    }
    char name[96];
    snprintf(name, sizeof name, "%s_matvec_equals_scalar_integer_dots", type);
    check(worst_int < 1e-6f, name, "error %g of sum |w x|", worst_int);
    snprintf(name, sizeof name, "%s_matvec_close_to_dequantized_math", type);
    check(worst_exact < exact_tol, name, "error %g of sum |w x|", worst_exact);
    snprintf(name, sizeof name, "%s_block_matmul_equals_%s", type, Q8_GEMM ? "scalar_integer_dots" : "dequantized_math");
    check(worst_block < 1e-6f, name, "error %g of sum |w x|", worst_block);
    snprintf(name, sizeof name, "%s_block_matmul_1_and_2_threads_bit_identical", type);
    check(same_threads, name, "outputs differ");
    pool_free(m.pool);
    free(m.s.scratch); free(m.s.xT); free(m.s.outT); free(m.s.shares); free(m.s.xq); free(m.s.xs); free(m.s.sum128);
    free(wq); free(xq); free(xs); free(deq); free(xsum);
}

// Value j of a vector of n values quantized by quantize_q8 (blocks of Q8_BLOCK groups, interleaved).
static int q8_value(const int8_t *q, int n, int j) {
    int g = j / Q8_GROUP, b = g / Q8_BLOCK, groups = n / Q8_GROUP - b * Q8_BLOCK;
    return q[(size_t)b * Q8_BLOCK * Q8_GROUP + q8_offset(groups < Q8_BLOCK ? groups : Q8_BLOCK, g % Q8_BLOCK, j % Q8_GROUP)];
}

// quantize_q8 (vectorized where the machine allows) against the rule written
// out plainly, one group at a time: the largest |x| to 127, to nearest even,
// clamped, NaN to 0; bit for bit, on random groups and on groups of ties
// (x.5), infinities, NaN, tiny and huge values.
static void test_quantize_q8_rounding(void) {
    enum { GROUPS = 40, N = GROUPS * Q8_GROUP };
    static float x[N], xs[GROUPS];
    static int8_t xq[N];
    static int32_t xsum[GROUPS];
    uint64_t rng = 31;
    for (int i = 0; i < N; i++) x[i] = frand(&rng);
    for (int i = 0; i < Q8_GROUP; i++) x[i] = (float)(i - 16) + 0.5f; // group 0: ties, amax 15.5
    x[Q8_GROUP] = 127.0f;                                              // group 1: ties at scale 1
    for (int i = 1; i < Q8_GROUP; i++) x[Q8_GROUP + i] = (float)(i - 16) + 0.5f;
    x[2 * Q8_GROUP] = NAN, x[2 * Q8_GROUP + 1] = INFINITY, x[2 * Q8_GROUP + 2] = -INFINITY; // group 2
    x[3 * Q8_GROUP] = NAN;                                                                      // group 3
    for (int i = 0; i < Q8_GROUP; i++) x[4 * Q8_GROUP + i] = (i - 16) * 1e-40f; // group 4: denormals
    for (int i = 0; i < Q8_GROUP; i++) x[5 * Q8_GROUP + i] = (i - 16) * 2e37f;  // group 5: near the float max
    for (int i = 0; i < Q8_GROUP; i++) x[6 * Q8_GROUP + i] = 0;                 // group 6: zeros
    quantize_q8(xq, xs, xsum, x, N);
    int same = 1;
    for (int g = 0; g < GROUPS; g++) {
        const float *xg = x + g * Q8_GROUP;
        float amax = 0;
        for (int i = 0; i < Q8_GROUP; i++) amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax;
        float scale = amax / 127.0f, inv = scale > 0 ? 1.0f / scale : 0;
        int32_t sum = 0;
        for (int i = 0; i < Q8_GROUP; i++) {
            float v = rintf(xg[i] * inv);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            int q = v == v ? (int)v : 0;
            sum += q;
            same &= q8_value(xq, N, g * Q8_GROUP + i) == q;
        }
        same &= memcmp(&xs[g], &scale, sizeof scale) == 0 && xsum[g] == 128 * sum;
    }
    check(same, "quantize_q8_matches_the_plain_rounding_rule", "a value, scale or sum differs");
}

static void test_q8_kernels(void) {
    uint64_t rng = 11;
    enum { N = 512, LONG = 2144 }; // LONG: two full blocks and 3 groups
    static float x[T * LONG], w[ROWS * LONG], xs[T * LONG / Q8_GROUP];
    static int8_t xq[T * LONG];
    static int32_t xsum[T * LONG / Q8_GROUP];
    static uint8_t wq[ROWS * LONG * 17 / 16];
    for (int i = 0; i < T * LONG; i++) x[i] = frand(&rng);
    for (int i = 0; i < ROWS * LONG; i++) w[i] = frand(&rng) * (i % 97 == 0 ? 8 : 1); // a few outliers
    for (int t = 0; t < T; t++) quantize_q8(xq + t * N, xs + t * N / Q8_GROUP, xsum + t * N / Q8_GROUP, x + t * N, N);
    Matrix m8 = {.q = wq, .dtype = DTYPE_Q8_0, .rows = ROWS, .cols = N};
    for (int r = 0; r < ROWS; r++) quantize_q8_row(wq + r * row_bytes(&m8), w + r * N, N);
    // weights: the error is at most half a step of the group's float16 scale, the largest |w| maps to 127
    float worst_q = 0, deq[LONG];
    int full_range = 1;
    for (int r = 0; r < ROWS; r++) {
        matrix_slice(&m8, r, 0, N, deq);
        for (int g = 0; g < N / Q8_GROUP; g++) {
            Q8Block k = q8_block(matrix_row(&m8, r), N, g / Q8_BLOCK);
            float scale = f16_to_f32(k.scale[g % Q8_BLOCK]);
            int qmax = 0;
            for (int i = 0; i < Q8_GROUP; i++) {
                int j = g * Q8_GROUP + i, q = k.q[q8_offset(k.groups, g % Q8_BLOCK, i)];
                worst_q = fmaxf(worst_q, fabsf(deq[j] - w[r * N + j]) / scale);
                qmax = abs(q) > qmax ? abs(q) : qmax;
            }
            full_range &= qmax == 127 || qmax == 126; // 126: amax / 127 rounded up to the next float16
        }
    }
    check(worst_q <= 0.5001f && full_range, "q8_quantization_error_within_half_a_step", "error %g steps, full range %d",
          worst_q, full_range);
    // activations: the same, with float32 scales
    float worst_x = 0;
    int sums_ok = 1;
    for (int i = 0; i < T * N; i++) {
        int q = q8_value(xq + i / N * N, N, i % N);
        worst_x = fmaxf(worst_x, fabsf(q * xs[i / Q8_GROUP] - x[i]) / xs[i / Q8_GROUP]);
        if (i % Q8_GROUP == 0) { // 128 x the group's sum, for the kernel's offset w + 128
            int32_t sum = 0;
            for (int j = 0; j < Q8_GROUP; j++) sum += q8_value(xq + i / N * N, N, i % N + j);
            sums_ok &= xsum[i / Q8_GROUP] == 128 * sum;
        }
    }
    check(worst_x <= 0.5001f && sums_ok, "q8_activation_error_within_half_a_step", "error %g steps, sums %d", worst_x, sums_ok);
    float worst = 0;
    for (int r = 0; r < ROWS; r++) {
        float ref = dot_q8_scalar(matrix_row(&m8, r), xq, xs, N), got = dot_q8(matrix_row(&m8, r), xq, xs, xsum, N);
        worst = fmaxf(worst, fabsf(got - ref) / abs_dot(w + r * N, x, N));
    }
    check(worst < 1e-6f, "simd_q8_dot_matches_scalar_q8_dot", "worst error %g of sum |w x|", worst);
    // lengths that end in every part of the kernel: whole 16-group chunks, short chunks, single groups,
    // a second block, a short last block (x quantized for each length: its blocks must match the row's)
    int lengths[] = {32, 96, 256, 288, 512, 736, 1024, 1056, 1312, 1536, 1568, 2048, LONG}, all_close = 1;
    for (int i = 0; i < 13; i++) {
        quantize_q8(xq, xs, xsum, x, lengths[i]);
        quantize_q8_row(wq, w, lengths[i]);
        float ref = dot_q8_scalar(wq, xq, xs, lengths[i]), got = dot_q8(wq, xq, xs, xsum, lengths[i]);
        all_close &= fabsf(got - ref) <= 1e-6f * abs_dot(w, x, lengths[i]);
    }
    check(all_close, "simd_q8_dot_matches_scalar_for_any_group_count", "a length differs");
    // the bytes where model.h puts them: a row's last block holds its remaining groups, values then
    // scales; value i of group j of a chunk of m groups at (i / 4) * 4 * m + j * 4 + i % 4
    quantize_q8_row(wq, w, LONG);
    Matrix long_row = {.q = wq, .dtype = DTYPE_Q8_0, .rows = 1, .cols = LONG};
    Q8Block first = q8_block(wq, LONG, 0), last = q8_block(wq, LONG, 2);
    float deq_first[1024];
    matrix_slice(&long_row, 0, 0, 1024, deq_first);
    matrix_slice(&long_row, 0, 2048, LONG, deq);
    check(row_bytes(&long_row) == LONG + LONG / Q8_GROUP * 2 && last.groups == 3 &&
          (const uint8_t *)last.q == wq + 2 * 1088 && (const uint8_t *)last.scale == wq + 2 * 1088 + 96 &&
          deq[32 + 5] == last.q[1 * 4 * 3 + 1 * 4 + 1] * f16_to_f32(last.scale[1]) &&         // group 1, value 5 (m = 3)
          deq_first[17 * 32 + 6] == first.q[16 * 32 + 1 * 4 * 16 + 1 * 4 + 2] * f16_to_f32(first.scale[17]) && // 2nd chunk
          deq_first[31] == first.q[7 * 4 * 16 + 3] * f16_to_f32(first.scale[0]),              // group 0, value 31
          "q8_row_layout_is_interleaved_blocks_then_float16_scales", "last block of %d groups", last.groups);
    quantize_q8(xq, xs, xsum, x, N);
    // NaN activations (from corrupt weights) quantize to 0 instead of an undefined float-to-int conversion
    float bad[Q8_GROUP] = {NAN, 1.0f, -INFINITY};
    int8_t bq[Q8_GROUP];
    float bs;
    int32_t bsum;
    quantize_q8(bq, &bs, &bsum, bad, Q8_GROUP);
    check(bq[0] == 0 && bq[2] == 0, "q8_quantization_of_nan_and_inf_is_defined", "q %d %d", bq[0], bq[2]);
    check_int_matmul_paths(DTYPE_Q8_0, x, w, (int[]){N, LONG}, 2, 0.02f);
}

// The q4_0 weight row of w quantized, dequantized again (value i of row r in out).
static void q4_dequantized(float *out, const uint8_t *row, int n) {
    Matrix m4 = {.q = row, .dtype = DTYPE_Q4_0, .rows = 1, .cols = n};
    matrix_slice(&m4, 0, 0, n, out);
}

// q4_0 and rows of any length: quantization no worse than GGML's rule,
// every SIMD dot product against its scalar reference at lengths that end in
// each part of the kernels (short groups, short chunks, short blocks), the
// bytes where model.h puts them, and the matmul paths (decode; block of
// tokens in integer tiles or dequantized float tiles) against scalar dots.
static void test_q4_kernels(void) {
    uint64_t rng = 13;
    enum { LONG = 2149 }; // LONG: two full blocks, 3 groups and 5 values
    static float x[T * LONG], w[ROWS * LONG], xs[T * LONG / Q8_GROUP + T], deq[LONG];
    static int8_t xq[(T + 1) * LONG + 64];
    static int32_t xsum[T * LONG / Q8_GROUP + T];
    static uint8_t wq[ROWS * LONG + 64 * ROWS];
    for (int i = 0; i < T * LONG; i++) x[i] = frand(&rng);
    for (int i = 0; i < ROWS * LONG; i++) w[i] = frand(&rng) * (i % 97 == 0 ? 8 : 1); // a few outliers
    int lengths[] = {5, 32, 40, 96, 172, 256, 300, 512, 736, 1024, 1056, 1060, 1312, 1568, 2048, LONG};
    int n_len = sizeof lengths / sizeof lengths[0], no_worse = 1, in_range = 1, q4_close = 1, q8_close = 1;
    float worst_step = 0;
    for (int li = 0; li < n_len; li++) {
        int n = lengths[li];
        quantize_q4_row(wq, w, n);
        q4_dequantized(deq, wq, n);
        for (int g = 0; g < n_groups(n); g++) { // against GGML's d = m / -8 (rounded to float16, nearest q)
            Q4Block k = q4_block(wq, n, g / Q8_BLOCK);
            float pad[Q8_GROUP], m = 0, err = 0, ggml = 0, d = f16_to_f32(k.scale[g % Q8_BLOCK]);
            const float *xg = group_of(w, n, g, pad);
            for (int i = 0; i < Q8_GROUP; i++) m = fabsf(xg[i]) > fabsf(m) ? xg[i] : m;
            float dg = f16_to_f32(f32_to_f16(m / -8));
            for (int i = 0; i < Q8_GROUP; i++) {
                int q = q4_value(k, g % Q8_BLOCK, i), qg = dg != 0 ? (int)rintf(xg[i] / dg) : 0;
                qg = qg > 7 ? 7 : qg < -8 ? -8 : qg;
                err += (xg[i] - q * d) * (xg[i] - q * d);
                ggml += (xg[i] - qg * dg) * (xg[i] - qg * dg);
                in_range &= g * Q8_GROUP + i < n ? deq[g * Q8_GROUP + i] == q * d : q == 0; // padding: u = 8
                if (g * Q8_GROUP + i < n) worst_step = fmaxf(worst_step, fabsf(xg[i] - q * d) / fabsf(d));
            }
            no_worse &= err <= ggml * (1 + 1e-6f);
        }
        quantize_q8(xq, xs, xsum, x, n);
        float ref = dot_q4_scalar(wq, xq, xs, n), got = dot_q4(wq, xq, xs, xsum, n);
        q4_close &= fabsf(got - ref) <= 1e-6f * abs_dot(w, x, n) + 1e-30f;
        quantize_q8_row(wq, w, n);
        ref = dot_q8_scalar(wq, xq, xs, n), got = dot_q8(wq, xq, xs, xsum, n);
        q8_close &= fabsf(got - ref) <= 1e-6f * abs_dot(w, x, n) + 1e-30f;
    }
    check(no_worse && in_range, "q4_quantization_no_worse_than_ggml_rule_and_padding_is_zero",
          "no worse %d, values and padding %d", no_worse, in_range);
    check(worst_step <= 1.5f, "q4_quantization_error_within_a_step_and_a_half", "worst %g steps", worst_step); // clamped outliers
    check(q4_close, "simd_q4_dot_matches_scalar_for_any_length", "a length differs");
    check(q8_close, "simd_q8_dot_matches_scalar_for_any_length", "a length differs");
    // short last groups of activations: zero padding, and the scale of the values present only
    quantize_q8(xq, xs, xsum, x, 40);
    int pad_zero = 1;
    for (int i = 8; i < Q8_GROUP; i++) pad_zero &= xq[q8_offset(2, 1, i)] == 0;
    check(pad_zero && xs[1] == group_amax((float[Q8_GROUP]){x[32], x[33], x[34], x[35], x[36], x[37], x[38], x[39]}) / 127.0f,
          "q8_activation_short_group_is_zero_padded", "padding %d, scale %g", pad_zero, xs[1]);
    // the bytes where model.h puts them: a block of g groups is 16 g bytes of values, then g scales;
    // in a chunk of m groups, value i of group j is in byte (i / 8) * 4m + 4j + i % 4, its low 4 bits
    // for i % 8 < 4, stored as q + 8 (and one more check of a low nibble: value 2 of group 0)
    quantize_q4_row(wq, w, LONG);
    Q4Block first = q4_block(wq, LONG, 0), last = q4_block(wq, LONG, 2);
    const uint8_t *lq = last.q, *fq = first.q;
    q4_dequantized(deq, wq, LONG);
    Matrix long_row = {.q = wq, .dtype = DTYPE_Q4_0, .rows = 1, .cols = LONG};
    check(row_bytes(&long_row) == 68 * 18 && last.groups == 4 && lq == wq + 2 * 576 && (const uint8_t *)last.scale == lq + 64 &&
          deq[2048 + 32 + 13] == ((lq[1 * 4 * 4 + 1 * 4 + 1] >> 4) - 8) * f16_to_f32(last.scale[1]) &&  // group 1, value 13 (m = 4)
          deq[17 * 32 + 6] == ((fq[16 * 16 + 0 * 64 + 1 * 4 + 2] >> 4) - 8) * f16_to_f32(first.scale[17]) && // 2nd chunk
          deq[31] == ((fq[3 * 64 + 3] >> 4) - 8) * f16_to_f32(first.scale[0]) &&                       // group 0, value 31
          deq[2] == ((fq[2] & 15) - 8) * f16_to_f32(first.scale[0]),
          "q4_row_layout_is_nibble_pairs_of_the_q8_interleave_then_float16_scales", "last block of %d groups", last.groups);
    int every_third[16], n_third = 0;
    for (int li = 0; li < n_len; li += 3) every_third[n_third++] = lengths[li];
    check_int_matmul_paths(DTYPE_Q4_0, x, w, every_third, n_third, 0.05f);
}

// The cache is allocated for n_kv_heads, not n_heads: GQA's memory saving.
static void test_kv_cache_is_grouped(const char *model) {
    if (!model) { printf("FAIL kv_cache_holds_only_kv_heads: no test model\n"); n_failed++; return; }
    Transformer m;
    build_transformer(&m, model);
    setup_transformer(&m, 100, 1, 0);
    size_t ctx = (100 + VEC_LEN - 1) / VEC_LEN * VEC_LEN; // whole key tiles
    size_t expect = (size_t)m.c.n_layers * ctx * 2 * m.c.n_kv_heads * m.c.head_dim * sizeof(float);
    size_t bytes = m.s.key_cache.bytes + m.s.value_cache.bytes;
    check(m.c.n_kv_heads < m.c.n_heads && bytes == expect, "kv_cache_holds_only_kv_heads",
          "%zu bytes, expected n_layers*ctx*2*n_kv_heads*head_dim*4 = %zu", bytes, expect);
    // one forward step writes exactly one head_dim row per layer and KV head, at position 0
    int tok = 1;
    forward(&m, &tok, 1, 0, 0);
    int written = 0, beyond = 0, hd = m.c.head_dim;
    for (int l = 0; l < m.c.n_layers; l++)
        for (int g = 0; g < m.c.n_kv_heads; g++)
            for (int p = 0; p < (int)ctx; p++)
                for (int d = 0; d < hd; d++) {
                    const uint8_t *kh = cache_head(&m.s.key_cache, l, g), *vh = cache_head(&m.s.value_cache, l, g);
                    float k = kv_number(kh + (size_t)p / VEC_LEN * VEC_LEN * m.s.key_cache.row_bytes, VEC_LEN, p % VEC_LEN, d, hd, KV_F32);
                    float v = kv_number(vh + (size_t)p * m.s.value_cache.row_bytes, 1, 0, d, hd, KV_F32);
                    if (p == 0) written += (k != 0) + (v != 0); else beyond += (k != 0) + (v != 0);
                }
    check(written > m.c.n_layers * m.c.n_kv_heads && beyond == 0, "forward_writes_one_kv_row_per_layer_and_head",
          "written %d, beyond %d", written, beyond);
    // a block forward equals token-by-token forwards
    int toks[7] = {5, 9, 2, 77, 3, 3, 100};
    float *block = xcalloc((size_t)7 * m.c.vocab_size, sizeof(float), "t");
    memcpy(block, forward(&m, toks, 7, 0, 1), (size_t)7 * m.c.vocab_size * sizeof(float));
    float worst = 0;
    for (int t = 0; t < 7; t++) {
        float *one = forward(&m, toks + t, 1, t, 0);
        for (int i = 0; i < m.c.vocab_size; i++) {
            float e = fabsf(one[i] - block[(size_t)t * m.c.vocab_size + i]);
            if (e > worst) worst = e;
        }
    }
    check(worst < 1e-4f, "block_forward_equals_token_by_token", "max abs difference %g", worst);
    free(block);
    free_transformer(&m);
    // f16 and q8_0 caches: the same rows in fewer bytes, and each KV head's cache one stream of rows
    int sizes_ok = 1;
    for (int type = KV_F16; type <= KV_Q8_0; type++) {
        build_transformer(&m, model);
        m.c.kv_type = type;
        setup_transformer(&m, 100, 1, 0);
        size_t row = type == KV_F16 ? 2 * (size_t)hd : hd + 2 * (size_t)((hd + 31) / 32);
        sizes_ok &= m.s.key_cache.bytes == (size_t)m.c.n_layers * m.c.n_kv_heads * ctx * row
                 && m.s.value_cache.bytes == m.s.key_cache.bytes && kv_bytes_per_token(&m) == 2 * (size_t)m.c.n_layers * m.c.n_kv_heads * row
                 && cache_head(&m.s.value_cache, 1, 1) - cache_head(&m.s.value_cache, 1, 0) == (ptrdiff_t)(ctx * row);
        free_transformer(&m);
    }
    check(sizes_ok, "kv_f16_and_q8_0_caches_take_their_bytes_per_row", "a size differs");
}

int main(void) {
    test_dot_matches_scalar();
    test_vexp_and_softmax();
    test_attention_kernels();
    test_row_scores();
    test_column_matvec();
    test_q8_rows();
    test_kv_store_rounding();
    test_split_range_partitions_rows();
    test_xcalloc_aligns_to_cache_lines();
    test_matmul_paths();
    test_sampler();
    test_f16_conversions();
    test_quantize_q8_rounding();
    test_q8_kernels();
    test_q4_kernels();
    // a random GQA model: 8 query heads sharing 2 KV heads
    const char *tmp = getenv("TMPDIR_TESTS"), *py = getenv("PYTHON");
    char path[4096], cmd[8192];
    snprintf(path, sizeof path, "%s/engine_gqa.bin", tmp ? tmp : "/tmp");
    snprintf(cmd, sizeof cmd, "%s export/export.py %s --random --dim 64 --hidden-dim 96 --n-layers 2 "
             "--n-heads 8 --n-kv-heads 2 --vocab-size 300 --max-seq-len 128 --seed 3 >/dev/null 2>&1",
             py ? py : "python3", path);
    test_kv_cache_is_grouped(system(cmd) == 0 ? path : NULL);
    return n_failed ? 1 : 0;
}
