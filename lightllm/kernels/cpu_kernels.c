/* Fused CPU kernels for the decode path (see lightllm/kernels/cpu.py for how they are built and called).
 *
 * PyTorch eager runs a decode layer as ~60 small ops; at batch 1 their dispatch costs more than the
 * memory-bound matmuls, and the batched decode attention has to gather K/V into a padded copy first.
 * These kernels do the elementwise work of a layer in four calls and read the paged KV pool in place.
 *
 * Conventions: all tensors are contiguous; dtype codes are 0 = float32, 1 = bfloat16, 2 = float16;
 * activations and the residual stream are float32, matmul inputs/outputs may be bf16 (the weight-only
 * quantized matmuls take and return bf16). Threads come from the process's OpenMP runtime, which is the
 * libgomp that PyTorch loaded, so torch.set_num_threads governs these kernels too.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "cpu_common.h"

/* exp(x) for x <= 88: Cody-Waite reduction and a degree-6 polynomial (Cephes expf), ~1 ulp, in plain
 * arithmetic so loops over it vectorise (libm's expf does not without -ffast-math). */
static inline float lk_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)k + 127) << 23;
    return p * scale.f;
}

#define ROW_BUF 16384 /* largest row handled with stack buffers */

/* hidden[r] += delta[r] (when delta is given), then out[r] = rms_norm(hidden[r]) * weight. */
int lk_add_rms_norm(float *hidden, const void *delta, int delta_dtype, const float *weight, void *out,
                    int out_dtype, int64_t rows, int64_t dim, float eps) {
    if (dim > ROW_BUF) return -1;
#pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float buf[ROW_BUF];
        float *h = hidden + r * dim;
        if (delta) {
            load_f32((const char *)delta + (size_t)(r * dim) * dtype_size(delta_dtype), delta_dtype, buf, dim);
            for (int64_t i = 0; i < dim; i++) h[i] += buf[i];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += h[i] * h[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) buf[i] = h[i] * inv * weight[i];
        store_f32(buf, (char *)out + (size_t)(r * dim) * dtype_size(out_dtype), out_dtype, dim);
    }
    return 0;
}

static void silu_mul_row(float *restrict g, const float *restrict u, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + lk_expf(-g[i])) * u[i];
}

/* silu(gate) * up where each row of gate_up is [gate (inter) | up (inter)]. */
int lk_silu_mul(const void *gate_up, int in_dtype, void *out, int out_dtype, int64_t rows, int64_t inter) {
    if (inter > ROW_BUF) return -1;
#pragma omp parallel for schedule(static) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        float g[ROW_BUF], u[ROW_BUF];
        const char *row = (const char *)gate_up + (size_t)(r * 2 * inter) * dtype_size(in_dtype);
        load_f32(row, in_dtype, g, inter);
        load_f32(row + (size_t)inter * dtype_size(in_dtype), in_dtype, u, inter);
        silu_mul_row(g, u, inter);
        store_f32(g, (char *)out + (size_t)(r * inter) * dtype_size(out_dtype), out_dtype, inter);
    }
    return 0;
}

static inline void rotate_half(const float *x, const float *c, const float *s, float *dst, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) dst[i] = x[i] * c[i] - x[i + half] * s[i];
    for (int64_t i = half; i < hd; i++) dst[i] = x[i] * c[i] + x[i - half] * s[i];
}

/* Rotary embedding ("rotate half" layout) for q and k, then K/V written into the pools at their slots.
 * qkv rows: [H*D q | KVH*D k | KVH*D v]; q_out: float32 [T, H, D]; pools: [P, KVH, D] of kv_dtype;
 * cos/sin: float32 [max_pos, D]. */
int lk_rope_store(const void *qkv, int qkv_dtype, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t hd,
                  const int64_t *positions, const float *cos_table, const float *sin_table, const int64_t *slots,
                  void *k_pool, void *v_pool, int kv_dtype, float *q_out) {
    const int64_t width = (heads + 2 * kv_heads) * hd;
    if (width > ROW_BUF || hd > 1024) return -1;
    const size_t kv_el = dtype_size(kv_dtype);
#pragma omp parallel for schedule(static) if (tokens * width >= 65536)
    for (int64_t t = 0; t < tokens; t++) {
        float row[ROW_BUF], rot[1024];
        load_f32((const char *)qkv + (size_t)(t * width) * dtype_size(qkv_dtype), qkv_dtype, row, width);
        const float *c = cos_table + positions[t] * hd, *s = sin_table + positions[t] * hd;
        for (int64_t h = 0; h < heads; h++)
            rotate_half(row + h * hd, c, s, q_out + (t * heads + h) * hd, hd);
        for (int64_t h = 0; h < kv_heads; h++) {
            rotate_half(row + (heads + h) * hd, c, s, rot, hd);
            store_f32(rot, (char *)k_pool + (size_t)((slots[t] * kv_heads + h) * hd) * kv_el, kv_dtype, hd);
        }
        store_f32(row + (heads + kv_heads) * hd, (char *)v_pool + (size_t)(slots[t] * kv_heads * hd) * kv_el,
                  kv_dtype, kv_heads * hd);
    }
    return 0;
}

#define PREFETCH_AHEAD 8

static inline void prefetch_row(const char *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

static inline const char *pool_row(const void *pool, int64_t slot, int64_t kv_heads, int64_t kvh, int64_t hd,
                                   size_t kv_el) {
    return (const char *)pool + (size_t)((slot * kv_heads + kvh) * hd) * kv_el;
}

/* A pool row as float32: in place for an fp32 pool, converted into buf otherwise. */
static inline const float *row_f32(const char *row, int kv_dtype, float *buf, int64_t hd) {
    if (kv_dtype == LK_F32) return (const float *)row;
    load_f32(row, kv_dtype, buf, hd);
    return buf;
}

/* Per query head g: scores[g*n ...] become exp(score - max); m[g] = max, l[g] = sum of the exps. */
static inline void softmax_rows(float *scores, int64_t group, int64_t n, float *m, float *l) {
    for (int64_t g = 0; g < group; g++) {
        float *sc = scores + g * n, mx = sc[0], sum = 0.0f;
        for (int64_t t = 1; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) { sc[t] = lk_expf(sc[t] - mx); sum += sc[t]; }
        m[g] = mx;
        l[g] = sum;
    }
}

/* Attention of the `group` query heads at qg (each hd floats, consecutive) over n context tokens whose pool
 * slots are ctx[0..n), one kv head. Leaves the unnormalised result: per head the running max m[g], the
 * sum of exp(score - m) l[g] and acc[g * hd ...] = sum of exp(score - m) * v. */
static inline __attribute__((always_inline)) int attend_range_impl(
        const float *qg, int64_t group, int64_t hd, const void *k_pool, const void *v_pool, int kv_dtype,
        int64_t kv_heads, int64_t kvh, const int64_t *ctx, int64_t n, float scale, float *m, float *l, float *acc) {
    const size_t kv_el = dtype_size(kv_dtype), row_bytes = (size_t)hd * kv_el;
    float *scores = (float *)malloc((size_t)(group * n + 1) * sizeof(float));
    if (!scores) return -1;
    float kbuf[256];
    for (int64_t t = 0; t < n; t++) {
        if (t + PREFETCH_AHEAD < n)  /* token slots are scattered: keep several row loads in flight */
            prefetch_row(pool_row(k_pool, ctx[t + PREFETCH_AHEAD], kv_heads, kvh, hd, kv_el), row_bytes);
        const float *k = row_f32(pool_row(k_pool, ctx[t], kv_heads, kvh, hd, kv_el), kv_dtype, kbuf, hd);
        for (int64_t g = 0; g < group; g++) {
            const float *qq = qg + g * hd;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < hd; i++) dot += qq[i] * k[i];
            scores[g * n + t] = dot * scale;
        }
    }
    softmax_rows(scores, group, n, m, l);
    memset(acc, 0, (size_t)(group * hd) * sizeof(float));
    for (int64_t t = 0; t < n; t++) {
        if (t + PREFETCH_AHEAD < n)
            prefetch_row(pool_row(v_pool, ctx[t + PREFETCH_AHEAD], kv_heads, kvh, hd, kv_el), row_bytes);
        const float *v = row_f32(pool_row(v_pool, ctx[t], kv_heads, kvh, hd, kv_el), kv_dtype, kbuf, hd);
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * n + t];
            float *a = acc + g * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) a[i] += p * v[i];
        }
    }
    free(scores);
    return 0;
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LK_HAVE_AVX2_F16 1

static inline float hsum256(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* attend_range for head size 64 and an fp16 cache, in AVX2 registers: each K row is converted once and
 * dotted with the G query heads (two FMA chains each); V is accumulated in passes over VP*8 of the 64
 * dims so that all G accumulators stay in registers (G*VP + VP <= 16 ymm registers). */
static inline __attribute__((always_inline)) int attend_h64_f16(
        const float *qg, const int G, const int VP, const uint16_t *k_pool, const uint16_t *v_pool,
        int64_t kv_heads, int64_t kvh, const int64_t *ctx, int64_t n, float scale, float *m, float *l, float *acc) {
    float *scores = (float *)malloc((size_t)(G * n + 1) * sizeof(float));
    if (!scores) return -1;
    for (int64_t t = 0; t < n; t++) {
        if (t + PREFETCH_AHEAD < n) prefetch_row((const char *)(k_pool + (ctx[t + PREFETCH_AHEAD] * kv_heads + kvh) * 64), 128);
        const uint16_t *kp = k_pool + (ctx[t] * kv_heads + kvh) * 64;
        __m256 k[8];
        for (int i = 0; i < 8; i++) k[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kp + 8 * i)));
        for (int g = 0; g < G; g++) {
            const float *qq = qg + g * 64;
            __m256 a0 = _mm256_mul_ps(k[0], _mm256_loadu_ps(qq)), a1 = _mm256_mul_ps(k[1], _mm256_loadu_ps(qq + 8));
            for (int i = 2; i < 8; i += 2) {
                a0 = _mm256_fmadd_ps(k[i], _mm256_loadu_ps(qq + 8 * i), a0);
                a1 = _mm256_fmadd_ps(k[i + 1], _mm256_loadu_ps(qq + 8 * i + 8), a1);
            }
            scores[g * n + t] = hsum256(_mm256_add_ps(a0, a1)) * scale;
        }
    }
    softmax_rows(scores, G, n, m, l);
    for (int d0 = 0; d0 < 64; d0 += 8 * VP) {
        __m256 a[8][8];
        for (int g = 0; g < G; g++)
            for (int i = 0; i < VP; i++) a[g][i] = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            if (d0 == 0 && t + PREFETCH_AHEAD < n)
                prefetch_row((const char *)(v_pool + (ctx[t + PREFETCH_AHEAD] * kv_heads + kvh) * 64), 128);
            const uint16_t *vp = v_pool + (ctx[t] * kv_heads + kvh) * 64 + d0;
            __m256 v[8];
            for (int i = 0; i < VP; i++) v[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vp + 8 * i)));
            for (int g = 0; g < G; g++) {
                const __m256 p = _mm256_set1_ps(scores[g * n + t]);
                for (int i = 0; i < VP; i++) a[g][i] = _mm256_fmadd_ps(p, v[i], a[g][i]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int i = 0; i < VP; i++) _mm256_storeu_ps(acc + g * 64 + d0 + 8 * i, a[g][i]);
    }
    free(scores);
    return 0;
}
#endif

#if defined(__AVX512F__) && defined(__F16C__) && !defined(LK_PORTABLE)
#define LK_HAVE_AVX512_F16 1

/* v[0..15] -> one vector whose lane j is the sum of v[j]'s 16 lanes (a transpose-and-add tree: ~3 instructions
 * per input instead of a horizontal sum each). */
static inline __m512 lane_sums16(const __m512 *v) {
    __m512 s[8], r[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = v[2i], y = v[2i+1] */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the partial sums of inputs 4i .. 4i + 3 */
        const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
        r[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* fold the four 128-bit lanes: inputs 4i .. 4i + 3 end in lane i */
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(r[2], r[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline __m512 half16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* attend_range for head size 64 and an fp16 cache in AVX-512 registers. Scores go 16 tokens at a time: each
 * head's 16 dot products stay as vectors (4 FMAs per token) and are summed by one lane_sums16; V is
 * accumulated in passes over VP * 16 of the 64 dims, all G heads' accumulators in registers. */
static inline __attribute__((always_inline)) int attend_h64_f16_avx512(
        const float *qg, const int G, const int VP, const uint16_t *k_pool, const uint16_t *v_pool,
        int64_t kv_heads, int64_t kvh, const int64_t *ctx, int64_t n, float scale, float *m, float *l, float *acc) {
    float *scores = (float *)malloc((size_t)(G * n + 16) * sizeof(float));
    if (!scores) return -1;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int cnt = n - t0 < 16 ? (int)(n - t0) : 16;
        const uint16_t *rows[16];
        for (int i = 0; i < 16; i++) {  /* a short last block repeats its first row in the unused lanes */
            rows[i] = k_pool + (ctx[t0 + (i < cnt ? i : 0)] * kv_heads + kvh) * 64;
            /* memory latency is several blocks' work: K rows are fetched two blocks ahead (the first call
             * also the next block), and this block's V rows now, for the V pass after the softmax */
            for (int64_t ahead = t0 == 0 ? 16 : 32; ahead <= 32; ahead += 16)
                if (t0 + ahead + i < n)
                    prefetch_row((const char *)(k_pool + (ctx[t0 + ahead + i] * kv_heads + kvh) * 64), 128);
            if (i < cnt) prefetch_row((const char *)(v_pool + (ctx[t0 + i] * kv_heads + kvh) * 64), 128);
        }
        for (int g = 0; g < G; g++) {
            const float *qq = qg + g * 64;
            const __m512 q0 = _mm512_loadu_ps(qq), q1 = _mm512_loadu_ps(qq + 16), q2 = _mm512_loadu_ps(qq + 32),
                         q3 = _mm512_loadu_ps(qq + 48);
            __m512 d[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                const __m512 a = _mm512_fmadd_ps(half16(rows[i] + 16), q1, _mm512_mul_ps(half16(rows[i]), q0));
                const __m512 b = _mm512_fmadd_ps(half16(rows[i] + 48), q3, _mm512_mul_ps(half16(rows[i] + 32), q2));
                d[i] = _mm512_add_ps(a, b);
            }
            _mm512_mask_storeu_ps(scores + g * n + t0, (__mmask16)((1u << cnt) - 1u),
                                  _mm512_mul_ps(lane_sums16(d), vscale));
        }
    }
    softmax_rows(scores, G, n, m, l);
    for (int d0 = 0; d0 < 64; d0 += 16 * VP) {
        __m512 a[8][4];
        for (int g = 0; g < G; g++)
            for (int i = 0; i < VP; i++) a[g][i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++) {
            if (d0 == 0 && t + PREFETCH_AHEAD < n)
                prefetch_row((const char *)(v_pool + (ctx[t + PREFETCH_AHEAD] * kv_heads + kvh) * 64), 128);
            const uint16_t *vp = v_pool + (ctx[t] * kv_heads + kvh) * 64 + d0;
            __m512 v[4];
            for (int i = 0; i < VP; i++) v[i] = half16(vp + 16 * i);
            for (int g = 0; g < G; g++) {
                const __m512 p = _mm512_set1_ps(scores[g * n + t]);
                for (int i = 0; i < VP; i++) a[g][i] = _mm512_fmadd_ps(p, v[i], a[g][i]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int i = 0; i < VP; i++) _mm512_storeu_ps(acc + g * 64 + d0 + 16 * i, a[g][i]);
    }
    free(scores);
    return 0;
}
#endif

/* Specialised for the common head sizes and GQA groups (and their kv dtypes) so the compiler unrolls the
 * per-token dot products and updates fully; other shapes take the generic instance. */
static int attend_range(const float *qg, int64_t group, int64_t hd, const void *k_pool, const void *v_pool,
                        int kv_dtype, int64_t kv_heads, int64_t kvh, const int64_t *ctx, int64_t n, float scale,
                        float *m, float *l, float *acc) {
#ifdef LK_HAVE_AVX512_F16
#define LK_ATTEND_AVX512(G, VP) \
    if (group == G && hd == 64 && kv_dtype == LK_F16) \
        return attend_h64_f16_avx512(qg, G, VP, (const uint16_t *)k_pool, (const uint16_t *)v_pool, kv_heads, kvh, \
                                     ctx, n, scale, m, l, acc);
    LK_ATTEND_AVX512(1, 4) LK_ATTEND_AVX512(2, 4) LK_ATTEND_AVX512(3, 4) LK_ATTEND_AVX512(4, 4)
    LK_ATTEND_AVX512(5, 4) LK_ATTEND_AVX512(6, 4) LK_ATTEND_AVX512(7, 2) LK_ATTEND_AVX512(8, 2)
#undef LK_ATTEND_AVX512
#endif
#ifdef LK_HAVE_AVX2_F16
#define LK_ATTEND_AVX2(G, VP) \
    if (group == G && hd == 64 && kv_dtype == LK_F16) \
        return attend_h64_f16(qg, G, VP, (const uint16_t *)k_pool, (const uint16_t *)v_pool, kv_heads, kvh, ctx, n, \
                              scale, m, l, acc);
    LK_ATTEND_AVX2(1, 8) LK_ATTEND_AVX2(2, 4) LK_ATTEND_AVX2(3, 4) LK_ATTEND_AVX2(4, 2) LK_ATTEND_AVX2(5, 2)
    LK_ATTEND_AVX2(6, 2) LK_ATTEND_AVX2(7, 1) LK_ATTEND_AVX2(8, 1)
#undef LK_ATTEND_AVX2
#endif
#define LK_ATTEND(G, HD, DT) \
    if (group == G && hd == HD && kv_dtype == DT) \
        return attend_range_impl(qg, G, HD, k_pool, v_pool, DT, kv_heads, kvh, ctx, n, scale, m, l, acc);
    LK_ATTEND(1, 64, LK_F16) LK_ATTEND(2, 64, LK_F16) LK_ATTEND(3, 64, LK_F16) LK_ATTEND(4, 64, LK_F16)
    LK_ATTEND(7, 64, LK_F16) LK_ATTEND(8, 64, LK_F16) LK_ATTEND(1, 128, LK_F16) LK_ATTEND(2, 128, LK_F16)
    LK_ATTEND(4, 128, LK_F16) LK_ATTEND(8, 128, LK_F16) LK_ATTEND(3, 64, LK_F32) LK_ATTEND(4, 128, LK_F32)
#undef LK_ATTEND
    return attend_range_impl(qg, group, hd, k_pool, v_pool, kv_dtype, kv_heads, kvh, ctx, n, scale, m, l, acc);
}

#define SPLIT_MIN_TOKENS 64

#ifdef LK_HAVE_AVX512_F16
static int decode_fixed_h64(const float *q, const uint16_t *k_pool, const uint16_t *v_pool, const int64_t *table,
                            int64_t table_stride, const int64_t *req_slots, const int64_t *lens, const int64_t *rows,
                            int64_t window, int64_t batch, int64_t heads, int64_t kv_heads, float scale, void *out,
                            int out_dtype);
#endif

/* One query token per sequence attends to its cached context, read from the pools in place.
 * q: float32 [*, H, D]; rows[b] (or b when rows is NULL) is the row of q and out for sequence b;
 * the context of sequence b is table[req_slots[b] * table_stride + i] for i < lens[b] (only the last
 * `window` positions when window > 0); out: [*, H, D] of out_dtype. Work is split over (sequence, kv head):
 * the G = H / KVH query heads sharing a kv head reuse each K/V row they load. When there are fewer such
 * items than threads can share evenly (small batches), each context is also split into chunks whose
 * partial softmax results are merged afterwards (flash-decoding). */
int lk_decode_attention(const float *q, const void *k_pool, const void *v_pool, int kv_dtype,
                        const int64_t *table, int64_t table_stride, const int64_t *req_slots, const int64_t *lens,
                        const int64_t *rows, int64_t window, int64_t batch, int64_t heads, int64_t kv_heads,
                        int64_t hd, float scale, void *out, int out_dtype) {
    const int64_t group = heads / kv_heads;
    if (hd > 256 || group > 64 || group * kv_heads != heads) return -1;
    int64_t total = 0, max_len = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (lens[b] <= 0) return -1;
        total += lens[b];
        max_len = lens[b] > max_len ? lens[b] : max_len;
    }
#ifdef LK_HAVE_AVX512_F16
    if (hd == 64 && kv_dtype == LK_F16)  /* the prefill kernel's reduction: see decode_fixed_h64 */
        return decode_fixed_h64(q, (const uint16_t *)k_pool, (const uint16_t *)v_pool, table, table_stride, req_slots,
                                lens, rows, window, batch, heads, kv_heads, scale, out, out_dtype);
#endif
    const int threads = omp_get_max_threads();
    const int64_t pairs = batch * kv_heads;
    int64_t splits = 1;
    if (pairs < 2 * threads) {
        splits = (2 * threads + pairs - 1) / pairs;
        int64_t by_length = max_len / SPLIT_MIN_TOKENS;
        splits = splits < by_length ? splits : (by_length > 1 ? by_length : 1);
    }
    const size_t out_el = dtype_size(out_dtype);
    /* partial results per (pair, split): m and l per head, acc per head */
    float *part = (float *)malloc((size_t)(pairs * splits * group * (hd + 2)) * sizeof(float));
    if (!part) return -2;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (total * kv_heads * hd >= 32768) reduction(| : failed)
    for (int64_t item = 0; item < pairs * splits; item++) {
        const int64_t pair = item / splits, split = item % splits, b = pair / kv_heads, kvh = pair % kv_heads;
        const int64_t len = lens[b], start = (window > 0 && len > window) ? len - window : 0, n = len - start;
        const int64_t chunk = (n + splits - 1) / splits, lo = split * chunk, hi = lo + chunk < n ? lo + chunk : n;
        const int64_t row = rows ? rows[b] : b;
        float *pm = part + (size_t)item * group * (hd + 2), *pl = pm + group, *pacc = pl + group;
        if (hi <= lo) {  /* an empty tail chunk contributes nothing */
            for (int64_t g = 0; g < group; g++) { pm[g] = -INFINITY; pl[g] = 0.0f; }
            memset(pacc, 0, (size_t)(group * hd) * sizeof(float));
            continue;
        }
        const int64_t *ctx = table + req_slots[b] * table_stride + start + lo;
        if (attend_range(q + (row * heads + kvh * group) * hd, group, hd, k_pool, v_pool, kv_dtype, kv_heads, kvh,
                         ctx, hi - lo, scale, pm, pl, pacc) != 0)
            failed = 1;
    }
    if (!failed) {
        for (int64_t pair = 0; pair < pairs; pair++) {
            const int64_t b = pair / kv_heads, kvh = pair % kv_heads, row = rows ? rows[b] : b;
            for (int64_t g = 0; g < group; g++) {
                float mx = -INFINITY, denom = 0.0f, res[256];
                for (int64_t sp = 0; sp < splits; sp++) {
                    float pm = part[(size_t)(pair * splits + sp) * group * (hd + 2) + g];
                    mx = pm > mx ? pm : mx;
                }
                memset(res, 0, (size_t)hd * sizeof(float));
                for (int64_t sp = 0; sp < splits; sp++) {
                    const float *base = part + (size_t)(pair * splits + sp) * group * (hd + 2);
                    if (base[group + g] == 0.0f) continue;
                    const float w = splits == 1 ? 1.0f : expf(base[g] - mx);
                    const float *pacc = base + 2 * group + g * hd;
                    denom += w * base[group + g];
                    for (int64_t i = 0; i < hd; i++) res[i] += w * pacc[i];
                }
                const float inv = 1.0f / denom;
                for (int64_t i = 0; i < hd; i++) res[i] *= inv;
                store_f32(res, (char *)out + (size_t)((row * heads + kvh * group + g) * hd) * out_el, out_dtype, hd);
            }
        }
    }
    free(part);
    return failed ? -2 : 0;
}

/* out[t * k + j] = rows[(t * k + j) * d ...] . x[t * d ...] in float32, for t < T, j < k: each dot product in
 * one fixed order (16 lanes, then a fixed tree), whatever T is, so a row's results do not depend on the
 * others (torch's batched matmul picks its blocking by shape). */
int lk_row_dots(const float *rows, const float *x, int64_t T, int64_t k, int64_t d, float *out) {
#pragma omp parallel for schedule(static) if (T * k * d >= 262144)
    for (int64_t i = 0; i < T * k; i++) {
        const float *a = rows + i * d, *b = x + (i / k) * d;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 16 <= d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
        if (c < d) {
            const __mmask16 m = (__mmask16)((1u << (d - c)) - 1u);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, b + c), acc);
        }
        out[i] = _mm512_reduce_add_ps(acc);
#else
        float lanes[8] = {0};
        for (int64_t c = 0; c < d; c++) lanes[c % 8] = fmaf(a[c], b[c], lanes[c % 8]);
        out[i] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
#endif
    }
    return 0;
}

/* Whether candidate (va, ia) ranks below (vb, ib): NaN ranks highest (as in torch.argmax), then larger values,
 * then, among equals, the lower index. */
static inline int ranks_below(float va, int64_t ia, float vb, int64_t ib) {
    const int na = va != va, nb = vb != vb;
    if (na != nb) return nb;
    if (!na && va != vb) return va < vb;
    return ia > ib;
}

/* Per row of `rows` rows (n floats each, ld apart): the indices of its k highest-ranking values (ranks_below;
 * 1 <= k <= 64), unordered, written to idx[row * k ...]; k = 1 is torch's argmax (first maximum, NaN first).
 * One pass per row: the candidates' lowest value is a threshold nearly all values fail (a 16-wide compare on
 * AVX-512), so the cost is reading the row once, where torch's topk and argmax run ~10x slower here.
 * Returns 0, or -1 for a bad k. */
int lk_topk_rows(const float *x, int64_t rows, int64_t n, int64_t ld, int k, int64_t *idx) {
    if (k < 1 || k > 64 || k > n) return -1;
#pragma omp parallel for schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * ld;
        float vals[64];
        int64_t ids[64];
        int low = 0; /* the slot of the lowest-ranking candidate */
        for (int c = 0; c < k; c++) {
            vals[c] = row[c];
            ids[c] = c;
            if (ranks_below(vals[c], c, vals[low], ids[low])) low = c;
        }
        int64_t i = k;
#define LK_TOPK_OFFER(J)                                                                  \
    do {                                                                                  \
        if (ranks_below(vals[low], ids[low], row[J], (J))) {                              \
            vals[low] = row[J];                                                           \
            ids[low] = (J);                                                               \
            for (int c = 0; c < k; c++)                                                   \
                if (ranks_below(vals[c], ids[c], vals[low], ids[low])) low = c;           \
        }                                                                                 \
    } while (0)
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) {
            /* later values tie-lose, so only strictly greater ones (or NaN: unordered) can enter */
            __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_set1_ps(vals[low]), _CMP_NLE_UQ);
            while (hit) {
                LK_TOPK_OFFER(i + __builtin_ctz(hit));
                hit &= (__mmask16)(hit - 1);
            }
        }
#endif
        for (; i < n; i++) LK_TOPK_OFFER(i);
#undef LK_TOPK_OFFER
        memcpy(idx + r * k, ids, (size_t)k * sizeof(int64_t));
    }
    return 0;
}

#ifdef LK_HAVE_AVX512_F16
/* lk_expf's arithmetic on 16 lanes (2^k applied with vscalefps). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

/* Attention reduced the same way for every query row, whatever else runs with it.
 *
 * A query at context position pos attends to the keys at positions (pos - window, pos] (window 0: [0, pos])
 * in blocks of 16 keys aligned at positions 0, 16, 32, ...: per block, its 16 scores (two FMA chains over
 * the even and odd dimensions), the mask, an online-softmax update of the query's state (O[64], running max
 * m, sum l) and the V accumulation, block after block in position order. A block the query sees none of
 * leaves the state exactly as it was (its rescale factor is exp(0) = 1), so which blocks a kernel visits
 * beyond the query's own does not matter. The prefill kernel (16 queries of one sequence per work item) and
 * the decode kernel (the query heads of one token) both run this per query, so a token's attention output
 * is bit-identical whether its row was computed in a prefill chunk of any size and start, after a prefix
 * cache hit, as a speculative verify row, or in a decode step of any batch. */

/* The rest of a block's update for QB queries whose 16 scores are s[r][0] + s[r][1] (the even and odd
 * dimensions' FMA chains): scale, mask, online-softmax update of each query's state (O[64], m, l; 66 floats
 * apart) and the V accumulation. V rows come as float32 (vb, 64 apart) or, when vb is NULL, straight from
 * the fp16 pool rows vr[j]: the same values either way. */
static inline __attribute__((always_inline)) void block_update(const int QB, __m512 s[4][2], int64_t pos0,
                                                               const int pos_step, int64_t window, int64_t k0,
                                                               int64_t cnt, const float *vb,
                                                               const uint16_t *const *vr, float scale,
                                                               float *state) {
    float pb[4][16];
    __m512 o[4][4];
    int64_t visible_max = 0;
    for (int r = 0; r < QB; r++) {
        const int64_t pos = pos0 + r * pos_step, left = pos - k0 + 1;
        const int64_t hi = left < 0 ? 0 : (left < cnt ? left : cnt);
        int64_t lo = window > 0 ? pos - window + 1 - k0 : 0;
        lo = lo < 0 ? 0 : (lo > hi ? hi : lo);
        visible_max = hi > visible_max ? hi : visible_max;
        const __mmask16 live = (__mmask16)(((hi >= 16 ? 0xFFFFu : (1u << hi) - 1u)) & ~((1u << lo) - 1u));
        const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live,
                                             _mm512_mul_ps(_mm512_add_ps(s[r][0], s[r][1]), _mm512_set1_ps(scale)));
        float *st = state + r * 66;
        const float m_old = st[64], m_new = fmaxf(m_old, _mm512_reduce_max_ps(sc));
        /* exp16, not the scalar lk_expf: one instruction sequence wherever this is inlined */
        const float keep = m_old == -INFINITY ? 0.0f : _mm512_cvtss_f32(exp16(_mm512_set1_ps(m_old - m_new)));
        const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
        st[64] = m_new;
        st[65] = st[65] * keep + _mm512_reduce_add_ps(p);
        _mm512_storeu_ps(pb[r], p);
        for (int c = 0; c < 4; c++) o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(st + 16 * c), _mm512_set1_ps(keep));
    }
    for (int64_t j = 0; j < visible_max; j++) { /* p is 0 where a query does not see key j */
        __m512 v[4];
        for (int c = 0; c < 4; c++) v[c] = vb ? _mm512_loadu_ps(vb + j * 64 + 16 * c) : half16(vr[j] + 16 * c);
        for (int r = 0; r < QB; r++) {
            const __m512 pj = _mm512_set1_ps(pb[r][j]);
            for (int c = 0; c < 4; c++) o[r][c] = _mm512_fmadd_ps(pj, v[c], o[r][c]);
        }
    }
    for (int r = 0; r < QB; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(state + r * 66 + 16 * c, o[r][c]);
}

/* One block of 16 keys (kt: transposed K, vb: V rows, cnt valid) for QB queries of one head whose positions
 * are pos0 + r * pos_step (pos_step 1: consecutive tokens of a prefill; 0: the query heads of one decode
 * token) and q rows ldq apart: each query's 16 scores as two FMA chains over the even and odd dimensions in
 * order, then block_update. The QB queries' chains interleave, so the loop is bound by FMA throughput rather
 * than latency; each query's arithmetic is the same whatever QB is. */
static inline __attribute__((always_inline)) void attend_block(const float *q, int64_t ldq, const int QB,
                                                               int64_t pos0, const int pos_step, int64_t window,
                                                               int64_t k0, int64_t cnt, float kt[64][16],
                                                               float vb[16][64], float scale, float *state) {
    __m512 s[4][2];
    for (int r = 0; r < QB; r++) s[r][0] = s[r][1] = _mm512_setzero_ps();
    for (int d = 0; d < 64; d += 2) {
        const __m512 k0v = _mm512_loadu_ps(kt[d]), k1v = _mm512_loadu_ps(kt[d + 1]);
        for (int r = 0; r < QB; r++) {
            s[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * ldq + d]), k0v, s[r][0]);
            s[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * ldq + d + 1]), k1v, s[r][1]);
        }
    }
    block_update(QB, s, pos0, pos_step, window, k0, cnt, vb[0], NULL, scale, state);
}

/* attend_block for qb = 1 .. 4 queries (QB must be a constant for the registers to stay registers). */
static inline void attend_blocks(const float *q, int64_t ldq, int qb, int64_t pos0, const int pos_step,
                                 int64_t window, int64_t k0, int64_t cnt, float kt[64][16], float vb[16][64],
                                 float scale, float *state) {
    switch (qb) {
        case 4: attend_block(q, ldq, 4, pos0, pos_step, window, k0, cnt, kt, vb, scale, state); break;
        case 3: attend_block(q, ldq, 3, pos0, pos_step, window, k0, cnt, kt, vb, scale, state); break;
        case 2: attend_block(q, ldq, 2, pos0, pos_step, window, k0, cnt, kt, vb, scale, state); break;
        default: attend_block(q, ldq, 1, pos0, pos_step, window, k0, cnt, kt, vb, scale, state); break;
    }
}

/* In-register transpose of 16 vectors of 16 floats: r[i][j] -> r[j][i]. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
}

/* attend_block for the QB (<= 4) query heads of one decode token (rows 64 apart, one position), K rows read
 * from the pool rows kr[j] (NULL past cnt) and transposed in registers 16 dimensions at a time, V read from
 * the pool rows: the same scores (each dimension's FMA in the same order), the same update. */
static inline __attribute__((always_inline)) void attend_block_rows(const float *q, const int QB, int64_t pos,
                                                                    int64_t window, int64_t k0, int64_t cnt,
                                                                    const uint16_t *const *kr,
                                                                    const uint16_t *const *vr, float scale,
                                                                    float *state) {
    __m512 s[4][2];
    for (int r = 0; r < QB; r++) s[r][0] = s[r][1] = _mm512_setzero_ps();
    for (int c = 0; c < 4; c++) {
        __m512 kt[16];
        for (int j = 0; j < 16; j++) kt[j] = kr[j] ? half16(kr[j] + 16 * c) : _mm512_setzero_ps();
        transpose16(kt);
        for (int dd = 0; dd < 16; dd += 2) {
            const int d = 16 * c + dd;
            for (int r = 0; r < QB; r++) {
                s[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * 64 + d]), kt[dd], s[r][0]);
                s[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * 64 + d + 1]), kt[dd + 1], s[r][1]);
            }
        }
    }
    block_update(QB, s, pos, 0, window, k0, cnt, NULL, vr, scale, state);
}

/* Keys k0 .. k0 + cnt - 1 of a context (pool slots kv[...]) for one kv head as float32: K transposed
 * (kt[d][j]) and V rows (vb[j][d]); rows past cnt are zero. */
static inline void load_kv_block(const uint16_t *k_pool, const uint16_t *v_pool, const int64_t *kv, int64_t k0,
                                 int64_t cnt, int64_t kv_heads, int64_t kvh, float kt[64][16], float vb[16][64]) {
    const uint16_t *kr[16];
    for (int64_t j = 0; j < 16; j++) {
        if (j < cnt) {
            kr[j] = k_pool + (kv[k0 + j] * kv_heads + kvh) * 64;
            const uint16_t *vr = v_pool + (kv[k0 + j] * kv_heads + kvh) * 64;
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(vb[j] + 16 * c, half16(vr + 16 * c));
        } else {
            kr[j] = NULL;
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(vb[j] + 16 * c, _mm512_setzero_ps());
        }
    }
    for (int c = 0; c < 4; c++) {
        __m512 r[16];
        for (int j = 0; j < 16; j++) r[j] = kr[j] ? half16(kr[j] + 16 * c) : _mm512_setzero_ps();
        transpose16(r);
        for (int d = 0; d < 16; d++) _mm512_storeu_ps(kt[16 * c + d], r[d]);
    }
}

static inline void reset_states(float *state, int64_t count) {
    for (int64_t s = 0; s < count; s++) {
        memset(state + s * 66, 0, 64 * sizeof(float));
        state[s * 66 + 64] = -INFINITY;
        state[s * 66 + 65] = 0.0f;
    }
}

/* out[0 .. 64) = a query state's O / l, as out_dtype. */
static inline void finish_state(const float *st, void *out, int out_dtype) {
    const __m512 inv = _mm512_set1_ps(1.0f / st[65]);
    float res[64];
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(res + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(st + 16 * c), inv));
    store_f32(res, out, out_dtype, 64);
}

/* Causal prefill attention of one sequence, head size 64, fp16 pools: its n new tokens are the last n of its
 * L context positions (the first L - n come from the prefix cache or earlier chunks) and attend to the
 * positions (own - window, own] (window 0: 0 .. own). q: float32 [n][heads][64] with token rows ldq floats
 * apart; out the same shape (ldo); kv[0 .. L) the pool slots of the context. Work items are (kv head, block
 * of 16 queries); each block of 16 keys is converted once and serves the G query heads of its kv head.
 * Returns 0, -1 for a bad shape, -2 out of memory. */
int lk_prefill_attention(const float *q, int64_t ldq, const uint16_t *k_pool, const uint16_t *v_pool,
                         const int64_t *kv, int64_t L, int64_t n, int64_t heads, int64_t kv_heads, int64_t window,
                         float scale, float *out, int64_t ldo) {
    if (n < 1 || n > L || heads % kv_heads != 0 || window < 0) return -1;
    const int64_t G = heads / kv_heads, qblocks = (n + 15) / 16, items = kv_heads * qblocks;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        const int64_t kvh = item % kv_heads, i0 = (item / kv_heads) * 16;
        const int64_t rows = n - i0 < 16 ? n - i0 : 16, first_pos = L - n + i0, last_pos = first_pos + rows - 1;
        float *state = (float *)malloc(sizeof(float) * (size_t)(G * 16 * 66)); /* per query: O[64], m, l */
        if (!state) { failed = 1; continue; }
        reset_states(state, G * 16);
        float kt[64][16], vb[16][64];
        const int64_t first_key = window > 0 && first_pos - window + 1 > 0 ? first_pos - window + 1 : 0;
        for (int64_t kb = first_key / 16; kb * 16 <= last_pos; kb++) {
            const int64_t k0 = kb * 16, cnt = L - k0 < 16 ? L - k0 : 16;
            load_kv_block(k_pool, v_pool, kv, k0, cnt, kv_heads, kvh, kt, vb);
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kvh * G + g;
                for (int64_t i = 0; i < rows; i += 4)
                    attend_blocks(q + (i0 + i) * ldq + h * 64, ldq, rows - i < 4 ? (int)(rows - i) : 4, first_pos + i,
                                  1, window, k0, cnt, kt, vb, scale, state + (g * 16 + i) * 66);
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t i = 0; i < rows; i++)
                finish_state(state + (g * 16 + i) * 66, out + (i0 + i) * ldo + (kvh * G + g) * 64, LK_F32);
        free(state);
    }
    return failed ? -2 : 0;
}

/* Decode attention by the same per-query reduction (head size 64, fp16 pools; see lk_decode_attention for
 * the arguments): work items are (sequence, kv head, part of its query heads), a part's (up to 4) heads
 * interleaved in one pass over each key block; more parts spread small batches over the threads. */
static int decode_fixed_h64(const float *q, const uint16_t *k_pool, const uint16_t *v_pool, const int64_t *table,
                            int64_t table_stride, const int64_t *req_slots, const int64_t *lens, const int64_t *rows,
                            int64_t window, int64_t batch, int64_t heads, int64_t kv_heads, float scale, void *out,
                            int out_dtype) {
    const int64_t G = heads / kv_heads, pairs = batch * kv_heads;
    const int threads = omp_get_max_threads();
    int64_t parts = pairs < 2 * threads ? (2 * threads + pairs - 1) / pairs : 1;
    parts = parts > (G + 3) / 4 ? parts : (G + 3) / 4;  /* at most 4 heads a part: the one-pass path below */
    parts = parts < G ? parts : G;
    const int64_t per_part = (G + parts - 1) / parts;
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) total += lens[b];
    const size_t out_el = dtype_size(out_dtype);
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (total * kv_heads >= 512) reduction(| : failed)
    for (int64_t item = 0; item < pairs * parts; item++) {
        const int64_t pair = item / parts, part = item % parts, b = pair / kv_heads, kvh = pair % kv_heads;
        const int64_t g0 = part * per_part, g1 = g0 + per_part < G ? g0 + per_part : G;
        if (g0 >= g1) continue;
        const int64_t len = lens[b], pos = len - 1, row = rows ? rows[b] : b;
        const int64_t first_key = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
        const int64_t *ctx = table + req_slots[b] * table_stride;
        float *state = (float *)malloc(sizeof(float) * (size_t)((g1 - g0) * 66));
        if (!state) { failed = 1; continue; }
        reset_states(state, g1 - g0);
        const float *qh = q + (row * heads + kvh * G) * 64;
        float kt[64][16], vb[16][64];
        for (int64_t kb = first_key / 16; kb * 16 <= pos; kb++) {
            const int64_t k0 = kb * 16, cnt = len - k0 < 16 ? len - k0 : 16;
            /* scattered slots: the next two blocks' rows are fetched while this one computes */
            for (int64_t j = k0 + 32; j < k0 + 48 && j < len; j++) {
                prefetch_row((const char *)(k_pool + (ctx[j] * kv_heads + kvh) * 64), 128);
                prefetch_row((const char *)(v_pool + (ctx[j] * kv_heads + kvh) * 64), 128);
            }
            if (kb == first_key / 16)
                for (int64_t j = k0 + 16; j < k0 + 32 && j < len; j++) {
                    prefetch_row((const char *)(k_pool + (ctx[j] * kv_heads + kvh) * 64), 128);
                    prefetch_row((const char *)(v_pool + (ctx[j] * kv_heads + kvh) * 64), 128);
                }
            if (g1 - g0 <= 4) {  /* one pass over the block: transpose K in registers, read V from the pool */
                const uint16_t *kr[16], *vr[16];
                for (int64_t j = 0; j < 16; j++) {
                    kr[j] = j < cnt ? k_pool + (ctx[k0 + j] * kv_heads + kvh) * 64 : NULL;
                    vr[j] = j < cnt ? v_pool + (ctx[k0 + j] * kv_heads + kvh) * 64 : NULL;
                }
                switch (g1 - g0) {
                    case 4: attend_block_rows(qh + g0 * 64, 4, pos, window, k0, cnt, kr, vr, scale, state); break;
                    case 3: attend_block_rows(qh + g0 * 64, 3, pos, window, k0, cnt, kr, vr, scale, state); break;
                    case 2: attend_block_rows(qh + g0 * 64, 2, pos, window, k0, cnt, kr, vr, scale, state); break;
                    default: attend_block_rows(qh + g0 * 64, 1, pos, window, k0, cnt, kr, vr, scale, state); break;
                }
                continue;
            }
            load_kv_block(k_pool, v_pool, ctx, k0, cnt, kv_heads, kvh, kt, vb);
            for (int64_t g = g0; g < g1; g += 4)
                attend_blocks(qh + g * 64, 64, g1 - g < 4 ? (int)(g1 - g) : 4, pos, 0, window, k0, cnt, kt, vb, scale,
                              state + (g - g0) * 66);
        }
        for (int64_t g = g0; g < g1; g++)
            finish_state(state + (g - g0) * 66, (char *)out + (size_t)((row * heads + kvh * G + g) * 64) * out_el,
                         out_dtype);
        free(state);
    }
    return failed ? -2 : 0;
}

int lk_prefill_attention_available(void) { return 1; }
#else
int lk_prefill_attention(const float *q, int64_t ldq, const uint16_t *k_pool, const uint16_t *v_pool,
                         const int64_t *kv, int64_t L, int64_t n, int64_t heads, int64_t kv_heads, int64_t window,
                         float scale, float *out, int64_t ldo) {
    (void)q; (void)ldq; (void)k_pool; (void)v_pool; (void)kv; (void)L; (void)n; (void)heads; (void)kv_heads;
    (void)window; (void)scale; (void)out; (void)ldo;
    return -1;
}

int lk_prefill_attention_available(void) { return 0; }
#endif
