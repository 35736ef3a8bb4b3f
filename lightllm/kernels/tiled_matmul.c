/* Batched matrix multiplication for quantized weights held as small unsigned integers in 16-row tiles:
 * y[m, n] = sum_k x[m, k] * W[n, k] with W[n, k] = ws * u[n, k] + wc, (ws, wc) constant over a group of 16
 * or 32 weights of a row. GGUF blocks (Q4_0 ... Q6_K) and int4 groups decode exactly into this form once at
 * load time (lk_gguf_decode), so the weights are exact; activations are int8 per 32 values as in the GGUF
 * kernel.
 *
 * Why a second kernel: gguf_matmul.c unpacks each weight row for every call and applies it to at most four
 * activation rows with a float scale step per 32 weights and row; from ~4 rows it is compute-bound. Here a
 * 512-bit register holds 4 consecutive weights of 16 rows, an activation quad is broadcast to it
 * (vpdpbusd's embedded broadcast), so one instruction does 64 multiply-adds for one activation row with no
 * unpacking (4-bit weights: one and/shift per 128), and the float work is one convert and two FMAs per
 * 16 x 32 weights and activation row. Each tile is read from memory once per call and from cache for each
 * further batch of 8 activation rows.
 *
 * Layout (built by lightllm.models.tiled.TiledWeights; tile t covers rows 16t .. 16t + 15, rows past n are
 * zero):
 *   q, plain:   byte [t][j][r][b]  = u[16t + r][4j + b]                            (16 k bytes per tile)
 *   q, 4 bits:  byte [t][p][r][b]  = u[16t + r][8p + b] | u[16t + r][8p + 4 + b] << 4   (8 k bytes)
 *   q, 5 bits:  per pair p an 80-byte record: the 4-bit bytes above (of u & 15), then two 64-bit masks whose
 *               bit 4r + b is bit 4 of u[16t + r][8p + b], resp. u[16t + r][8p + 4 + b]      (10 k bytes)
 *   scales:     float [t][g][0][r] = ws, [t][g][1][r] = wc of group g (group weights) of row 16t + r;
 *               with a zero point z (zero > 0: w = ws * (u - z), Q4_0/Q5_0/Q8_0/Q6_K and int8 rows) only ws is
 *               stored, and the offset enters the integer dot product as its start value -z * sum(xq).
 *               float32, or float16 where every scale is a float16 value (the legacy types' scales are:
 *               one row then reads 5/8 instead of 6/8 bytes per 4-bit weight, and a single row is bound by
 *               the weight reads).
 * The AVX512-VNNI build runs the vector path; others run the same arithmetic in plain C (lk_tiled_fast()
 * tells the caller which, so it only prefers this kernel where it is fast).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "cpu_common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(LK_PORTABLE)
#define LK_TILED_AVX512 1
#endif

/* Quantized activations of one call: xq [m][k], xd [m][k / 32] scale per 32, xs [m][k / group] = the group's
 * scale * sum(xq). */
typedef struct {
    const int8_t *xq;
    const float *xd;
    const float *xs;
    const int32_t *xz; /* [m][k / group] = -zero * sum(xq) of the group, with a zero point */
    int64_t k;
} TiledActs;

#if LK_TILED_AVX512
static inline __m512i broadcast_quad(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);  /* folds into vpdpbusd's {1to16} memory operand */
}

/* 16 scales from st + i (elements): float16 when `half`, else float32. */
static inline __attribute__((always_inline)) __m512 load_scales(const void *st, int64_t i, const int half) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)st + i)));
    return _mm512_loadu_ps((const float *)st + i);
}

/* Output columns n0 .. n0 + valid - 1 of activation rows m0 .. m0 + R - 1, from tile (qt, st). */
static inline __attribute__((always_inline)) void tile_rows(const uint8_t *qt, const void *st, const int half,
                                                            const int group, const int bits, const int sym,
                                                            const TiledActs *a, int64_t m0,
                                                            const int R, float *y, int64_t ldy, int64_t n0,
                                                            int valid, const uint8_t *next_q, const char *next_s) {
    const int64_t k = a->k, groups = k / group, ss = sym ? 16 : 32; /* scales per group */
    const int64_t scale_bytes = half ? 2 : 4;
    const __m512i m4 = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10);
    __m512 acc[8];
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t k0 = g * group;
        if (next_q) {  /* fetch the next tile's group while this one computes: the passes over a tile
                        * after its first hit the cache and would leave the memory bus idle */
            const int64_t bytes = group * bits * 2;
            for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch((const char *)(next_q + g * bytes + l), _MM_HINT_T0);
            _mm_prefetch(next_s + scale_bytes * ss * g, _MM_HINT_T0);
            if (!sym && !half) _mm_prefetch(next_s + scale_bytes * (ss * g + 16), _MM_HINT_T0);
        }
        __m512i dot[8];
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            dot[r] = sym ? _mm512_set1_epi32(a->xz[(m0 + r) * groups + g]) : _mm512_setzero_si512();
        if (bits != 8) {
            #pragma GCC unroll 8
            for (int p = 0; p < group / 8; p++) {
                const uint8_t *rec = qt + (bits == 5 ? 80 : 64) * (k0 / 8 + p);
                const __m512i v = _mm512_loadu_si512((const void *)rec);
                __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                if (bits == 5) {
                    uint64_t top_lo, top_hi;
                    memcpy(&top_lo, rec + 64, 8);
                    memcpy(&top_hi, rec + 72, 8);
                    lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(_cvtu64_mask64(top_lo), b4));
                    hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(_cvtu64_mask64(top_hi), b4));
                }
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const int8_t *x = a->xq + (m0 + r) * k + k0 + 8 * p;
                    dot[r] = _mm512_dpbusd_epi32(dot[r], lo, broadcast_quad(x));
                    dot[r] = _mm512_dpbusd_epi32(dot[r], hi, broadcast_quad(x + 4));
                }
            }
        } else {
            #pragma GCC unroll 8
            for (int j = 0; j < group / 4; j++) {
                const __m512i w = _mm512_loadu_si512((const void *)(qt + 64 * (k0 / 4 + j)));
                #pragma GCC unroll 8
                for (int r = 0; r < R; r++)
                    dot[r] = _mm512_dpbusd_epi32(dot[r], w, broadcast_quad(a->xq + (m0 + r) * k + k0 + 4 * j));
            }
        }
        const __m512 ws = load_scales(st, ss * g, half);
        #pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512 xd = _mm512_set1_ps(a->xd[(m0 + r) * (k / 32) + k0 / 32]);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), xd), ws, acc[r]);
        }
        if (!sym) {
            const __m512 wc = load_scales(st, ss * g + 16, half);
            #pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(wc, _mm512_set1_ps(a->xs[(m0 + r) * groups + g]), acc[r]);
        }
    }
    const __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1u);
    #pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + (m0 + r) * ldy + n0, mask, acc[r]);
}

static void tile(const uint8_t *qt, const void *st, int half, int group, int bits, int sym, const TiledActs *a,
                 int64_t m0, int R, float *y, int64_t ldy, int64_t n0, int valid, const uint8_t *next_q,
                 const char *next_s) {
#define LK_TILE_CASE(G, BITS, SYM, HALF, RR)                                                       \
    if (group == G && bits == BITS && sym == SYM && half == HALF && R == RR) {                     \
        tile_rows(qt, st, HALF, G, BITS, SYM, a, m0, RR, y, ldy, n0, valid, next_q, next_s);       \
        return;                                                                                   \
    }
#define LK_TILE_ROWS(G, BITS, SYM, HALF)                                                                     \
    LK_TILE_CASE(G, BITS, SYM, HALF, 8) LK_TILE_CASE(G, BITS, SYM, HALF, 7)                                \
    LK_TILE_CASE(G, BITS, SYM, HALF, 6) LK_TILE_CASE(G, BITS, SYM, HALF, 5)                                \
    LK_TILE_CASE(G, BITS, SYM, HALF, 4) LK_TILE_CASE(G, BITS, SYM, HALF, 3)                                \
    LK_TILE_CASE(G, BITS, SYM, HALF, 2) LK_TILE_CASE(G, BITS, SYM, HALF, 1)
    /* the forms the loaders produce: Q4_1/Q4_K/int4 (4, offsets), Q4_0 (4, zero 8), Q5_1/Q5_K, Q5_0,
     * Q8_0 and int8 (8, zero 128), Q6_K (group 16, zero 32); float16 scales for the legacy types (Q4_0,
     * Q4_1, Q5_0, Q5_1, Q8_0), whose scales are float16 in the file */
    LK_TILE_ROWS(32, 4, 0, 0)
    LK_TILE_ROWS(32, 4, 1, 0)
    LK_TILE_ROWS(32, 5, 0, 0)
    LK_TILE_ROWS(32, 5, 1, 0)
    LK_TILE_ROWS(32, 8, 1, 0)
    LK_TILE_ROWS(16, 8, 1, 0)
    LK_TILE_ROWS(32, 4, 0, 1)
    LK_TILE_ROWS(32, 4, 1, 1)
    LK_TILE_ROWS(32, 5, 0, 1)
    LK_TILE_ROWS(32, 5, 1, 1)
    LK_TILE_ROWS(32, 8, 1, 1)
#undef LK_TILE_ROWS
#undef LK_TILE_CASE
}
#else
static inline float scale_at(const void *st, int64_t i, int half) {
    return half ? f16_to_f32(((const uint16_t *)st)[i]) : ((const float *)st)[i];
}

static void tile(const uint8_t *qt, const void *st, int half, int group, int bits, int sym, const TiledActs *a,
                 int64_t m0, int R, float *y, int64_t ldy, int64_t n0, int valid, const uint8_t *next_q,
                 const char *next_s) {
    (void)next_q;
    (void)next_s;
    const int64_t k = a->k, groups = k / group;
    for (int r = 0; r < R; r++) {
        const int8_t *x = a->xq + (m0 + r) * k;
        for (int c = 0; c < valid; c++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                int32_t dot = 0;
                for (int64_t i = g * group; i < (g + 1) * group; i++) {
                    const int64_t j = i / 4, b = i % 4;
                    uint8_t u;
                    if (bits == 8) {
                        u = qt[64 * j + 4 * c + b];
                    } else {
                        const uint8_t *rec = qt + (bits == 5 ? 80 : 64) * (j / 2);
                        u = (uint8_t)((rec[4 * c + b] >> (4 * (j % 2))) & 0x0F);
                        if (bits == 5) u |= (uint8_t)(((rec[64 + 8 * (j % 2) + (4 * c + b) / 8] >> ((4 * c + b) % 8)) & 1) << 4);
                    }
                    dot += (int32_t)u * (int32_t)x[i];
                }
                const int64_t ss = sym ? 16 : 32;
                if (sym) dot += a->xz[(m0 + r) * groups + g];
                acc = fmaf((float)dot * a->xd[(m0 + r) * (k / 32) + g * group / 32], scale_at(st, ss * g + c, half), acc);
                if (!sym) acc = fmaf(scale_at(st, ss * g + 16 + c, half), a->xs[(m0 + r) * groups + g], acc);
            }
            y[(m0 + r) * ldy + n0 + c] = acc;
        }
    }
}
#endif

enum { ROW_BLOCK = 64 };

int lk_tiled_fast(void) {
#if LK_TILED_AVX512
    return 1;
#else
    return 0;
#endif
}

/* The forms the vector path is instantiated for (see tile()); every build accepts the same ones. */
static int supported(int group, int bits, int zero, int half) {
    if (group == 32 && (bits == 4 || bits == 5)) return 1;
    return zero > 0 && bits == 8 && (group == 32 || (group == 16 && !half));
}

/* Quantize activation group g (32 values at v) into virtual row `row` of the buffers: xq, its scale xd and
 * the per-group sums xs / xz the kernel needs. Returns the scale. */
static inline float quantize_into(const float *v, int64_t row, int64_t g, int64_t k, int group, int zero,
                                  int8_t *xq, float *xd, float *xs, int32_t *xz) {
    const int64_t groups = k / group;
    int lo, hi;
    const float d = quantize_group32(v, xq + row * k + 32 * g, &lo, &hi);
    xd[row * (k / 32) + g] = d;
    if (group == 16) {
        xs[row * groups + 2 * g] = d * (float)lo;
        xs[row * groups + 2 * g + 1] = d * (float)hi;
        xz[row * groups + 2 * g] = -zero * lo;
        xz[row * groups + 2 * g + 1] = -zero * hi;
    } else {
        xs[row * groups + g] = d * (float)(lo + hi);
        xz[row * groups + g] = -zero * (lo + hi);
    }
    return d;
}

/* One weight in the layout above, described once by the caller (lightllm.kernels.cpu.TiledWeightDesc) so a
 * call passes one pointer for it: a single-row decode step makes ~120 of these calls, and each argument
 * costs the Python side a conversion. zero: 0 when the scales hold ws and wc per group, else the zero point
 * z of w = ws * (u - z) (only ws held); half_scales: float16 scales, else float32. */
typedef struct {
    const uint8_t *q;
    const void *scales;
    int64_t n_rows, k;
    int32_t group, bits, zero, half_scales;
} TiledWeight;

/* y[m * ldy + n] = x[m] . W[n] for the n_rows rows of W; x: [m_rows, k] of x_dtype; y: float32, written.
 * Returns 0, -1 for a form or k the kernel does not take, -2 out of memory.
 * levels: 1 quantizes each activation row to int8 per 32 values (llama.cpp's Q8 activations); 2 adds a
 * second int8 row holding that rounding's residual, so x = d1 * q1 + d2 * q2 to ~1/127^2 of each group's
 * largest value (better than bf16) for twice the integer dot products and the same weight reads: the
 * rounding of 8-bit activations is what makes a quantized model's greedy output diverge from the float
 * one at near-ties, and small batches, bound by the weight reads, pay little for it. */
int lk_tiled_matmul(const TiledWeight *w, const void *x, int x_dtype, int64_t m_rows, float *y, int64_t ldy,
                    int levels) {
    const uint8_t *q = w->q;
    const void *scales = w->scales;
    const int64_t n_rows = w->n_rows, k = w->k;
    const int group = w->group, bits = w->bits, zero = w->zero, half = w->half_scales != 0;
    if (!supported(group, bits, zero, half) || zero < 0 || zero > 128 || k % 32 != 0 || levels < 1 || levels > 2)
        return -1;
    const int sym = zero > 0;
    const int64_t groups = k / group, tiles = (n_rows + 15) / 16, rows = levels * m_rows;
    const int64_t tile_bytes = 2 * bits * k, tile_scale_bytes = (sym ? 16 : 32) * groups * (half ? 2 : 4);
    const char *scale_bytes = (const char *)scales;
    int8_t *xq = malloc((size_t)(rows * k));
    float *xd = malloc(sizeof(float) * (size_t)(rows * (k / 32)));
    float *xs = malloc(sizeof(float) * (size_t)(rows * groups));
    int32_t *xz = malloc(sizeof(int32_t) * (size_t)(rows * groups));
    float *converted = x_dtype == LK_F32 ? NULL : malloc(sizeof(float) * (size_t)(m_rows * k));
    /* with two levels each level's products go to their own row here and are summed at the end */
    float *parts = levels == 1 ? NULL : malloc(sizeof(float) * (size_t)(rows * n_rows));
    int rc = 0;
    if (!xq || !xd || !xs || !xz || (x_dtype != LK_F32 && !converted) || (levels > 1 && !parts)) {
        rc = -2;
        goto done;
    }
    const float *xf = x_dtype == LK_F32 ? (const float *)x : converted;
#pragma omp parallel for schedule(static) if (m_rows * k >= 32768)
    for (int64_t m = 0; m < m_rows; m++) {
        if (converted) load_f32((const char *)x + (size_t)(m * k) * dtype_size(x_dtype), x_dtype, converted + m * k, k);
        for (int64_t g = 0; g < k / 32; g++) {
            const float *v = xf + m * k + 32 * g;
            const float d = quantize_into(v, levels * m, g, k, group, zero, xq, xd, xs, xz);
            if (levels == 2) {
                const int8_t *q1 = xq + levels * m * k + 32 * g;
                float residual[32];
                for (int j = 0; j < 32; j++) residual[j] = v[j] - d * (float)q1[j];
                quantize_into(residual, 2 * m + 1, g, k, group, zero, xq, xd, xs, xz);
            }
        }
    }
    float *out = levels == 1 ? y : parts;
    const int64_t ldo = levels == 1 ? ldy : n_rows;
    const TiledActs acts = {xq, xd, xs, xz, k};
    /* Long inputs (prefill) go in blocks of rows so a block's activations stay in cache while every tile
     * passes over them; within a block each tile stays cached across its batches of 8 rows. */
#pragma omp parallel if (tiles * k * rows >= 65536)
    for (int64_t mb = 0; mb < rows; mb += ROW_BLOCK) {
        const int64_t m_end = mb + ROW_BLOCK < rows ? mb + ROW_BLOCK : rows;
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            const int valid = n_rows - 16 * t < 16 ? (int)(n_rows - 16 * t) : 16;
            for (int64_t m0 = mb; m0 < m_end; m0 += 8) {
                const int R = m_end - m0 < 8 ? (int)(m_end - m0) : 8;
                const int last = t + 1 == tiles;
                tile(q + t * tile_bytes, scale_bytes + t * tile_scale_bytes, half, group, bits, sym, &acts, m0, R,
                     out, ldo, 16 * t, valid, last ? NULL : q + (t + 1) * tile_bytes,
                     last ? NULL : scale_bytes + (t + 1) * tile_scale_bytes);
            }
        }
    }
    if (levels == 2)
        for (int64_t m = 0; m < m_rows; m++)
            for (int64_t c = 0; c < n_rows; c++) y[m * ldy + c] = parts[2 * m * n_rows + c] + parts[(2 * m + 1) * n_rows + c];
done:
    free(parts);
    free(xq);
    free(xd);
    free(xs);
    free(xz);
    free(converted);
    return rc;
}

/* out[i * k ...] = row idx[i] of W as float32 (ws * u + wc, or ws * (u - zero) computed as ws * u + (-zero * ws)),
 * read from its tile: what the lm_head refinement needs of a few rows, without a second stored form. A product
 * and a sum, never fused, as torch computes TiledWeights.dequantize. Returns 0, -1 for a bad index. */
__attribute__((optimize("fp-contract=off")))
int lk_tiled_rows(const TiledWeight *w, const int64_t *idx, int64_t count, float *out) {
    const int64_t k = w->k, groups = k / w->group, bits = w->bits;
    const int sym = w->zero > 0, half = w->half_scales != 0;
    const int64_t ss = sym ? 16 : 32, tile_bytes = 2 * bits * k, tile_scales = ss * groups;
    for (int64_t i = 0; i < count; i++) {
        if (idx[i] < 0 || idx[i] >= w->n_rows) return -1;
        const int64_t t = idx[i] / 16, r = idx[i] % 16;
        const uint8_t *qt = w->q + t * tile_bytes;
        const char *st = (const char *)w->scales + t * tile_scales * (half ? 2 : 4);
        float *row = out + i * k;
        for (int64_t g = 0; g < groups; g++) {
            const float ws = half ? f16_to_f32(((const uint16_t *)st)[ss * g + r]) : ((const float *)st)[ss * g + r];
            const float wc = sym ? (float)(-w->zero) * ws
                                 : (half ? f16_to_f32(((const uint16_t *)st)[ss * g + 16 + r])
                                         : ((const float *)st)[ss * g + 16 + r]);
            for (int64_t c = g * w->group; c < (g + 1) * w->group; c++) {
                const int64_t j = c / 4, b = c % 4;
                unsigned u;
                if (bits == 8) {
                    u = qt[64 * j + 4 * r + b];
                } else {
                    const uint8_t *rec = qt + (bits == 5 ? 80 : 64) * (c / 8);
                    u = (rec[4 * r + b] >> (4 * (j % 2))) & 0x0F;
                    if (bits == 5) u |= ((rec[64 + 8 * (j % 2) + (4 * r + b) / 8] >> ((4 * r + b) % 8)) & 1u) << 4;
                }
                const float prod = (float)u * ws;
                row[c] = prod + wc;
            }
        }
    }
    return 0;
}
