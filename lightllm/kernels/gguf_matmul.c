/* Matrix multiplication straight from GGUF quantized blocks: y[m, n] = sum_k x[m, k] * W[n, k], where each
 * row of W is a run of blocks exactly as stored in the file (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
 * Nothing is re-quantized: decode speed is set by the bytes read per weight (4.5-6.6 bits), so reading the
 * file's own blocks is what lets a Q4_K_M model decode faster than its int8 re-quantization.
 *
 * How (the approach llama.cpp's CPU backend takes):
 *   - every weight block is an affine map of small unsigned integers: w = ws * u + wc with u in 0..63
 *     (Q8_0 in the non-VNNI builds: signed q, wc = 0), ws and wc constant over 16 or 32 weights;
 *   - activations are quantized per 32 values to int8 (x ~= xd * xq, round to nearest even), so a group's
 *     sum(w * x) = xd * (ws * sum(u * xq)) + wc * (xd * sum(xq)), an integer dot product (AVX-VNNI / AVX512-VNNI
 *     vpdpbusd, else AVX2 vpmaddubsw + vpmaddwd) plus a per-16 correction;
 *   - each weight row is unpacked once and applied to up to four activation rows, so batched decode reads
 *     the weights once: on AVX512-VNNI in registers, two groups at a time (the fused path below), elsewhere
 *     through an L1-resident decoded row (DecodedRow).
 * The weights are exact (the decode is bit-identical to gguf's dequantization); the only approximation is
 * the int8 activations, as in llama.cpp. A portable C path computes the same values on any CPU
 * (-DLK_PORTABLE forces it, for tests).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#include "cpu_common.h"

#if defined(__AVX2__) && !defined(LK_PORTABLE)
#define LK_SIMD 1
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LK_AVX512 1 /* two groups per instruction */
#endif
#if defined(LK_AVX512) || defined(__AVXVNNI__)
#define LK_VNNI 1 /* vpdpbusd does not saturate: Q8_0 runs as u = q + 128 with an offset, like the others */
#endif
#endif

/* Block types, numbered as ggml's GGMLQuantizationType. */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

/* A decoded weight row: u[k] (unsigned, or signed for Q8_0), ws8[8 g .. 8 g + 7] the scale of each of the
 * 8 int32 lanes of group g's dot product (lanes 0-3 cover weights 0-15, lanes 4-7 weights 16-31) and
 * wc16[j] the offset of weights 16 j .. 16 j + 15. */
typedef struct {
    uint8_t *u;
    float *ws8;
    float *wc16;
} DecodedRow;

/* Quantized activations: per row, xq[K] int8, xd8[K / 4] the scale of each group repeated for its 8 lanes,
 * xs16[K / 16] = scale * sum(xq) per 16, and xs8[K / 4] the same sums spread over the lanes of their group
 * (lanes 0-3 share the first 16's, lanes 4-7 the second's: sum(wc lanes * xs8) = the group's offset term);
 * xu = xq + 128 as unsigned bytes, for the fused path. */
typedef struct {
    const int8_t *xq;
    const uint8_t *xu; /* xq + 128 */
    const float *xd8;
    const float *xs16;
    const float *xs8;
    int64_t k;
} Activations;

static int block_size(int type) { return (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) ? 256 : 32; }

static int block_bytes(int type) {
    switch (type) {
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_Q5_0: return 22;
        case T_Q5_1: return 24;
        case T_Q8_0: return 34;
        case T_Q4_K: return 144;
        case T_Q5_K: return 176;
        case T_Q6_K: return 210;
        default: return 0;
    }
}

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* Sets the scales of group g: ws for weights 0-15 and 16-31 of the group, and their offsets. */
static inline void set_group(DecodedRow *r, int64_t g, float ws_lo, float ws_hi, float wc_lo, float wc_hi) {
#if LK_SIMD
    _mm256_storeu_ps(r->ws8 + 8 * g, _mm256_set_m128(_mm_set1_ps(ws_hi), _mm_set1_ps(ws_lo)));
#else
    for (int i = 0; i < 4; i++) {
        r->ws8[8 * g + i] = ws_lo;
        r->ws8[8 * g + 4 + i] = ws_hi;
    }
#endif
    r->wc16[2 * g] = wc_lo;
    r->wc16[2 * g + 1] = wc_hi;
}

/* The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4). */
static inline void k4_scale_min(int j, const uint8_t *s, int32_t *sc, int32_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

#if LK_SIMD
static inline __m256i nibbles_lo_hi(const uint8_t *qs16) {  /* [qs & 15 (16 bytes) | qs >> 4 (16 bytes)] */
    const __m128i v = _mm_loadu_si128((const __m128i *)qs16), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

static inline __m256i bits_to_0x10(uint32_t bits) {  /* byte j = 0x10 where bit j of `bits` is set */
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    b = _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(b, _mm256_set1_epi8(0x10));
}

static inline __m256i shift_bytes_mask(__m256i v, int shift, int mask) {  /* (v >> shift) & mask per byte */
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8((char)mask));
}
#endif

/* Decode one block (of block_size(type) weights) at `b` into r at group index g0. */
static inline void decode_block(int type, const uint8_t *b, DecodedRow *r, int64_t g0) {
    uint8_t *u = r->u + 32 * g0;
    switch (type) {
        case T_Q4_0:
        case T_Q4_1: {
            const float d = half_at(b);
            const float wc = type == T_Q4_0 ? -8.0f * d : half_at(b + 2);
            const uint8_t *qs = b + (type == T_Q4_0 ? 2 : 4);
#if LK_SIMD
            _mm256_storeu_si256((__m256i *)u, nibbles_lo_hi(qs));
#else
            for (int j = 0; j < 16; j++) {
                u[j] = qs[j] & 0x0F;
                u[j + 16] = qs[j] >> 4;
            }
#endif
            set_group(r, g0, d, d, wc, wc);
            break;
        }
        case T_Q5_0:
        case T_Q5_1: {
            const float d = half_at(b);
            const float wc = type == T_Q5_0 ? -16.0f * d : half_at(b + 2);
            const uint8_t *hp = b + (type == T_Q5_0 ? 2 : 4);
            uint32_t qh;
            memcpy(&qh, hp, 4);
            const uint8_t *qs = hp + 4;
#if LK_SIMD
            _mm256_storeu_si256((__m256i *)u, _mm256_or_si256(nibbles_lo_hi(qs), bits_to_0x10(qh)));
#else
            for (int j = 0; j < 16; j++) {
                u[j] = (qs[j] & 0x0F) | (((qh >> j) & 1u) << 4);
                u[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4);
            }
#endif
            set_group(r, g0, d, d, wc, wc);
            break;
        }
        case T_Q8_0: {
            const float d = half_at(b);
#if LK_VNNI
            _mm256_storeu_si256((__m256i *)u, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b + 2)),
                                                               _mm256_set1_epi8((char)0x80)));
            set_group(r, g0, d, d, -128.0f * d, -128.0f * d);
#else
            memcpy(u, b + 2, 32);  /* signed: the dot product uses the sign trick */
            set_group(r, g0, d, d, 0.0f, 0.0f);
#endif
            break;
        }
        case T_Q4_K:
        case T_Q5_K: {
            const float d = half_at(b), dmin = half_at(b + 2);
            const uint8_t *scales = b + 4;
            const uint8_t *qh = b + 16;  /* Q5_K only: bit 2j / 2j+1 of qh[l] is the fifth bit of pair j */
            const uint8_t *qs = b + (type == T_Q4_K ? 16 : 48);
            for (int j = 0; j < 4; j++) {  /* 32 bytes: low nibbles = sub-block 2j, high = 2j + 1 */
                uint8_t *u0 = u + 64 * j, *u1 = u0 + 32;
#if LK_SIMD
                const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
                __m256i lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0F)), hi = shift_bytes_mask(q, 4, 0x0F);
                if (type == T_Q5_K) {
                    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(shift_bytes_mask(h, 2 * j, 1), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(shift_bytes_mask(h, 2 * j + 1, 1), 4));
                }
                _mm256_storeu_si256((__m256i *)u0, lo);
                _mm256_storeu_si256((__m256i *)u1, hi);
#else
                for (int l = 0; l < 32; l++) {
                    const uint8_t q = qs[32 * j + l];
                    u0[l] = q & 0x0F;
                    u1[l] = q >> 4;
                    if (type == T_Q5_K) {
                        u0[l] |= ((qh[l] >> (2 * j)) & 1u) << 4;
                        u1[l] |= ((qh[l] >> (2 * j + 1)) & 1u) << 4;
                    }
                }
#endif
                for (int s = 0; s < 2; s++) {
                    int32_t sc, mn;
                    k4_scale_min(2 * j + s, scales, &sc, &mn);
                    const float ws = d * (float)sc, wc = -dmin * (float)mn;
                    set_group(r, g0 + 2 * j + s, ws, ws, wc, wc);
                }
            }
            break;
        }
        case T_Q6_K: {
            const uint8_t *ql = b, *qh = b + 128;
            const int8_t *sc = (const int8_t *)(b + 192);
            const float d = half_at(b + 208);
            for (int h = 0; h < 2; h++) {  /* each half: 128 weights from ql[64], qh[32] */
                const uint8_t *l6 = ql + 64 * h, *h6 = qh + 32 * h;
                uint8_t *uh = u + 128 * h;
#if LK_SIMD
                const __m256i a = _mm256_loadu_si256((const __m256i *)l6);
                const __m256i c = _mm256_loadu_si256((const __m256i *)(l6 + 32));
                const __m256i hb = _mm256_loadu_si256((const __m256i *)h6);
                const __m256i m4 = _mm256_set1_epi8(0x0F);
                _mm256_storeu_si256((__m256i *)uh, _mm256_or_si256(_mm256_and_si256(a, m4),
                                    _mm256_slli_epi16(shift_bytes_mask(hb, 0, 3), 4)));
                _mm256_storeu_si256((__m256i *)(uh + 32), _mm256_or_si256(_mm256_and_si256(c, m4),
                                    _mm256_slli_epi16(shift_bytes_mask(hb, 2, 3), 4)));
                _mm256_storeu_si256((__m256i *)(uh + 64), _mm256_or_si256(shift_bytes_mask(a, 4, 0x0F),
                                    _mm256_slli_epi16(shift_bytes_mask(hb, 4, 3), 4)));
                _mm256_storeu_si256((__m256i *)(uh + 96), _mm256_or_si256(shift_bytes_mask(c, 4, 0x0F),
                                    _mm256_slli_epi16(shift_bytes_mask(hb, 6, 3), 4)));
#else
                for (int l = 0; l < 32; l++) {
                    uh[l] = (l6[l] & 0x0F) | ((h6[l] & 3u) << 4);
                    uh[l + 32] = (l6[l + 32] & 0x0F) | (((h6[l] >> 2) & 3u) << 4);
                    uh[l + 64] = (l6[l] >> 4) | (((h6[l] >> 4) & 3u) << 4);
                    uh[l + 96] = (l6[l + 32] >> 4) | (((h6[l] >> 6) & 3u) << 4);
                }
#endif
                for (int gi = 0; gi < 4; gi++) {  /* w = d * sc[16-run] * (u - 32) */
                    const float lo = d * (float)sc[8 * h + 2 * gi], hi = d * (float)sc[8 * h + 2 * gi + 1];
                    set_group(r, g0 + 4 * h + gi, lo, hi, -32.0f * lo, -32.0f * hi);
                }
            }
            break;
        }
    }
}

/* Per 32 values: d = max|x| / 127, xq = round(x / d) (nearest even), xs16 = d * sum(xq) per 16. */
static void quantize_activations(const float *x, int64_t k, int8_t *xq, uint8_t *xu, float *xd8, float *xs16,
                                 float *xs8) {
    for (int64_t g = 0; g < k / 32; g++) {
        int sum_lo, sum_hi;
        const float d = quantize_group32(x + 32 * g, xq + 32 * g, &sum_lo, &sum_hi);
        for (int j = 0; j < 32; j++) xu[32 * g + j] = (uint8_t)(xq[32 * g + j] + 128);
        for (int i = 0; i < 8; i++) xd8[8 * g + i] = d;
        xs16[2 * g] = d * (float)sum_lo;
        xs16[2 * g + 1] = d * (float)sum_hi;
        for (int i = 0; i < 8; i++) xs8[8 * g + i] = xs16[2 * g + i / 4] * 0.25f;
    }
}

#if LK_SIMD
static inline __m256i dot_u8s8(__m256i u, __m256i x) {  /* 8 lanes, lane i = sum of bytes 4i..4i+3 */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));  /* u <= 128: no saturation */
#endif
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* sum(a[i] * b[i]) in vector lanes (a plain loop would be one serial chain of scalar adds: float addition
 * is not reassociated without -ffast-math). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float tail = 0.0f;
#if LK_SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    tail = hsum_ps(acc);
#endif
    for (; i < n; i++) tail += a[i] * b[i];
    return tail;
}

/* The decoded-row path (AVX2 and portable builds): sum over groups of ws * sum(u * xq) * xd, plus the
 * offsets, for R activation rows (R constant after inlining). */
static inline __attribute__((always_inline)) void dot_rows(const DecodedRow *w, int64_t groups, int is_signed,
                                                          int has_offsets, const Activations *a, int64_t m0,
                                                          int R, float *out) {
    const int64_t lanes = a->k / 4;  /* xd8 entries per row */
#if LK_SIMD
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(w->u + 32 * g));
        const __m256i sign_src = u;
        if (is_signed) u = _mm256_sign_epi8(u, u);
        const __m256 ws = _mm256_loadu_ps(w->ws8 + 8 * g);
        for (int r = 0; r < R; r++) {
            const int64_t m = m0 + r;
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->xq + m * a->k + 32 * g));
            if (is_signed) x = _mm256_sign_epi8(x, sign_src);
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(u, x));
            acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(ws, _mm256_loadu_ps(a->xd8 + m * lanes + 8 * g)), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        const int64_t m = m0 + r;
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            int32_t lo = 0, hi = 0;
            const int8_t *x = a->xq + m * a->k + 32 * g;
            for (int j = 0; j < 32; j++) {
                const int32_t uj = is_signed ? (int32_t)(int8_t)w->u[32 * g + j] : (int32_t)w->u[32 * g + j];
                if (j < 16) lo += uj * x[j]; else hi += uj * x[j];
            }
            total += ((float)lo * w->ws8[8 * g] + (float)hi * w->ws8[8 * g + 4]) * a->xd8[m * lanes + 8 * g];
        }
        out[r] = total;
    }
#endif
    if (!has_offsets) return;
    for (int r = 0; r < R; r++) out[r] += dot_f32(w->wc16, a->xs16 + (m0 + r) * (a->k / 16), 2 * groups);
}

#if LK_AVX512
/* Fused path on AVX512-VNNI: a pair of 32-weight groups is unpacked in registers and applied to up to four
 * activation rows; no decode buffer. Activations enter unsigned (xu = xq + 128) and weights signed
 * (s = u - offset, e.g. Q5_0: u - 16), so a group's dot product is vpdpbusd(xu, s) - 128 * sum(s), and the
 * correction, which depends on the weights only, is computed once per pair rather than once per row.
 * Types whose offset is a per-group min (Q4_1, Q5_1, Q4_K, Q5_K) keep u unsigned, take the signed
 * activations as they are (vpdpbusd(u, xq), no correction) and add sum(wc lanes * xs8) per row. */

typedef struct {
    __m512i s;     /* 64 weights, signed (or unsigned u for min types) */
    __m512i corr;  /* -128 * sum(s) per int32 lane */
    __m512 ws;     /* scale per lane */
    __m512 wc;     /* min per lane (min types only) */
} Pair;

static inline __m512 halves_x8(const uint8_t *h0, const uint8_t *h1) {  /* [f16 at h0 x 8 | f16 at h1 x 8] */
    uint16_t a, b;
    memcpy(&a, h0, 2);
    memcpy(&b, h1, 2);
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a)));
}

static inline __m512i nibbles_x2(const uint8_t *q0, const uint8_t *q1) {  /* [q0 & 15 | q0 >> 4 | q1 & 15 | q1 >> 4] */
    const __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)q1), _mm_loadu_si128((const __m128i *)q0));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    return _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11),
                                     _mm512_castsi256_si512(hi));
}

static inline __m512i correction(__m512i s) {  /* -128 * (sum of each lane's 4 signed weights) */
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), s));
}

/* Blocks b0, b1 of a 32-weight type as one pair. */
static inline __attribute__((always_inline)) Pair pair_32(const int type, const uint8_t *b0, const uint8_t *b1) {
    Pair p;
    const int has_min = type == T_Q4_1 || type == T_Q5_1;
    p.ws = halves_x8(b0, b1);
    p.wc = has_min ? halves_x8(b0 + 2, b1 + 2) : _mm512_setzero_ps();
    if (type == T_Q8_0) {
        p.s = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                 _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
    } else {
        const int five_bit = type == T_Q5_0 || type == T_Q5_1;
        const int qs_at = (has_min ? 4 : 2) + (five_bit ? 4 : 0);
        p.s = nibbles_x2(b0 + qs_at, b1 + qs_at);
        if (five_bit) {
            uint32_t h0, h1;
            memcpy(&h0, b0 + qs_at - 4, 4);
            memcpy(&h1, b1 + qs_at - 4, 4);
            p.s = _mm512_mask_add_epi8(p.s, (__mmask64)h0 | ((__mmask64)h1 << 32), p.s, _mm512_set1_epi8(16));
        }
        if (!has_min) p.s = _mm512_sub_epi8(p.s, _mm512_set1_epi8(type == T_Q4_0 ? 8 : 16));
    }
    p.corr = has_min ? _mm512_setzero_si512() : correction(p.s);
    return p;
}

/* The lanes of pair j from 8 (one per group) or 16 (one per 16 weights) values of a super-block. */
static inline __m512 pair_lanes8(__m256 per_group, int j) {
    const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
    return _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(per_group));
}

static inline __m512 pair_lanes16(__m512 per_16, int j) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(4 * j),
                                         _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    return _mm512_permutexvar_ps(idx, per_16);
}

/* Scales (d * sc) and offsets (-dmin * m) of the 8 groups of a Q4_K / Q5_K super-block: the 12 bytes of
 * 6-bit fields rearranged word-wise into 8 scale bytes and 8 min bytes (the layout k4_scale_min reads). */
static inline void k4_group_scales(const uint8_t *b, __m256 *ws, __m256 *wc) {
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, top2 = 0x03030303u;
    uint32_t w[3], sc[2], mn[2];
    memcpy(w, b + 4, 12);
    sc[0] = w[0] & low6;
    sc[1] = (w[2] & low4) | (((w[0] >> 6) & top2) << 4);
    mn[0] = w[1] & low6;
    mn[1] = ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4);
    uint64_t sc8, mn8;
    memcpy(&sc8, sc, 8);
    memcpy(&mn8, mn, 8);
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc8)));
    const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8)));
    *ws = _mm256_mul_ps(_mm256_set1_ps(half_at(b)), scf);
    *wc = _mm256_mul_ps(_mm256_set1_ps(-half_at(b + 2)), mnf);
}

/* Pair j (0..3) of a Q4_K / Q5_K super-block: sub-blocks 2j and 2j + 1. */
static inline __attribute__((always_inline)) Pair pair_k4(const int type, const uint8_t *b, int j, __m256 ws,
                                                          __m256 wc) {
    Pair p;
    p.ws = pair_lanes8(ws, j);
    p.wc = pair_lanes8(wc, j);
    const uint8_t *qs = b + (type == T_Q4_K ? 16 : 48) + 32 * j;
    const __m256i q = _mm256_loadu_si256((const __m256i *)qs), m = _mm256_set1_epi8(0x0F);
    p.s = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m)),
                             _mm256_and_si256(_mm256_srli_epi16(q, 4), m), 1);
    if (type == T_Q5_K) {  /* bit 2j (first sub-block) / 2j + 1 (second) of qh[l] */
        const __m256i h = _mm256_loadu_si256((const __m256i *)(b + 16));
        const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
        const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * j)), _mm256_set1_epi16((short)(2 * j + 1)), 1);
        const __m512i bits = _mm512_and_si512(_mm512_srlv_epi16(hh, shift), _mm512_set1_epi8(1));
        p.s = _mm512_or_si512(p.s, _mm512_slli_epi16(bits, 4));
    }
    p.corr = _mm512_setzero_si512();  /* a min type: no correction (see accumulate) */
    return p;
}

/* d * sc of the 16 runs of 16 weights of a Q6_K super-block. */
static inline __m512 q6k_scales(const uint8_t *b) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 192))));
    return _mm512_mul_ps(sc, _mm512_set1_ps(half_at(b + 208)));
}

/* Pair j (0..3) of a Q6_K super-block: half j / 2, groups 2 (j % 2) and 2 (j % 2) + 1 of that half, whose
 * scales are runs 4j .. 4j + 3. */
static inline __attribute__((always_inline)) Pair pair_q6k(const uint8_t *b, int j, __m512 scales) {
    Pair p;
    const int h = j / 2, upper = j % 2;  /* upper: the groups taken from the high nibbles */
    const __m512i ql = _mm512_loadu_si512(b + 64 * h);  /* [ql[0:32] | ql[32:64]] of the half */
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i low = upper ? _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4) : _mm512_and_si512(ql, m4);
    const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16((short)(4 * upper)), _mm256_set1_epi16((short)(4 * upper + 2)), 1);
    const __m512i high = _mm512_and_si512(_mm512_srlv_epi16(hh, shift), _mm512_set1_epi8(3));
    p.s = _mm512_sub_epi8(_mm512_or_si512(low, _mm512_slli_epi16(high, 4)), _mm512_set1_epi8(32));
    p.ws = pair_lanes16(scales, j);
    p.wc = _mm512_setzero_ps();
    p.corr = correction(p.s);
    return p;
}

static inline int has_min_offsets(int type) {
    return type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K;
}

/* Adds pair p (groups g, g + 1 of the row) to the accumulators of R activation rows. */
static inline __attribute__((always_inline)) void accumulate(const Pair *p, const int with_min, const Activations *a,
                                                            int64_t m0, const int R, int64_t g, __m512 *acc,
                                                            __m512 *off) {
    const int64_t lanes = a->k / 4;
    for (int r = 0; r < R; r++) {
        const int64_t m = m0 + r;
        /* min types: unsigned weights times signed activations need no correction */
        const __m512 dot = _mm512_cvtepi32_ps(
            with_min ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), p->s, _mm512_loadu_si512(a->xq + m * a->k + 32 * g))
                     : _mm512_dpbusd_epi32(p->corr, _mm512_loadu_si512(a->xu + m * a->k + 32 * g), p->s));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(p->ws, _mm512_loadu_ps(a->xd8 + m * lanes + 8 * g)), acc[r]);
        if (with_min) off[r] = _mm512_fmadd_ps(p->wc, _mm512_loadu_ps(a->xs8 + m * lanes + 8 * g), off[r]);
    }
}

/* One weight row (TYPE and R constant after inlining) against R activation rows. */
static inline __attribute__((always_inline)) void fused_rows(const int type, const uint8_t *wr, int64_t groups,
                                                            const Activations *a, int64_t m0, const int R,
                                                            float *out) {
    const int with_min = has_min_offsets(type);
    __m512 acc[4], off[4];
    for (int r = 0; r < R; r++) acc[r] = off[r] = _mm512_setzero_ps();
    if (block_size(type) == 256) {
        const int bb = block_bytes(type);
        for (int64_t blk = 0; blk < groups / 8; blk++) {
            const uint8_t *b = wr + blk * bb;
            if (type == T_Q6_K) {
                const __m512 scales = q6k_scales(b);
                for (int j = 0; j < 4; j++) {
                    const Pair p = pair_q6k(b, j, scales);
                    accumulate(&p, with_min, a, m0, R, 8 * blk + 2 * j, acc, off);
                }
            } else {
                __m256 ws, wc;
                k4_group_scales(b, &ws, &wc);
                for (int j = 0; j < 4; j++) {
                    const Pair p = pair_k4(type, b, j, ws, wc);
                    accumulate(&p, with_min, a, m0, R, 8 * blk + 2 * j, acc, off);
                }
            }
        }
    } else {
        const int bb = block_bytes(type);
        for (int64_t g = 0; g < groups; g += 2) {
            const int lone = g + 1 == groups;  /* a last block without a partner: paired with itself, masked */
            const uint8_t *b0 = wr + g * bb;
            Pair p = pair_32(type, b0, lone ? b0 : b0 + bb);
            if (lone) {
                p.s = _mm512_maskz_mov_epi8(0xFFFFFFFFULL, p.s);
                p.corr = _mm512_maskz_mov_epi32(0xFF, p.corr);
                p.ws = _mm512_maskz_mov_ps(0xFF, p.ws);
                p.wc = _mm512_maskz_mov_ps(0xFF, p.wc);
            }
            accumulate(&p, with_min, a, m0, R, g, acc, off);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(with_min ? _mm512_add_ps(acc[r], off[r]) : acc[r]);
}

static void fused_row(int type, const uint8_t *wr, int64_t groups, const Activations *a, int64_t m0, int R,
                      float *out) {
#define LK_FUSED_CASE(T)                                                    \
    case T:                                                                 \
        switch (R) {                                                        \
            case 4: fused_rows(T, wr, groups, a, m0, 4, out); break;        \
            case 3: fused_rows(T, wr, groups, a, m0, 3, out); break;        \
            case 2: fused_rows(T, wr, groups, a, m0, 2, out); break;        \
            default: fused_rows(T, wr, groups, a, m0, 1, out); break;       \
        }                                                                   \
        break;
    switch (type) {
        LK_FUSED_CASE(T_Q4_0)
        LK_FUSED_CASE(T_Q4_1)
        LK_FUSED_CASE(T_Q5_0)
        LK_FUSED_CASE(T_Q5_1)
        LK_FUSED_CASE(T_Q8_0)
        LK_FUSED_CASE(T_Q4_K)
        LK_FUSED_CASE(T_Q5_K)
        LK_FUSED_CASE(T_Q6_K)
        default: break;
    }
#undef LK_FUSED_CASE
}
#endif

#if LK_AVX512
static void fused_matmul(int type, const uint8_t *w, int64_t n_rows, int64_t k, const Activations *acts,
                         int64_t m_rows, float *y, int64_t ldy) {
    const int64_t groups = k / 32, row_bytes = (k / block_size(type)) * block_bytes(type);
#pragma omp parallel for schedule(static) if (n_rows * k * (m_rows < 4 ? m_rows : 4) >= 65536)
    for (int64_t n = 0; n < n_rows; n++) {
        float res[4];
        for (int64_t m = 0; m < m_rows; m += 4) {
            const int rows = m_rows - m < 4 ? (int)(m_rows - m) : 4;
            fused_row(type, w + n * row_bytes, groups, acts, m, rows, res);
            for (int r = 0; r < rows; r++) y[(m + r) * ldy + n] = res[r];
        }
    }
}
#else
/* Each weight row decoded into a per-thread DecodedRow, then applied to the activation rows four at a time.
 * Returns 0, or -2 when a thread's buffer could not be allocated. */
static int decoded_matmul(int type, const uint8_t *w, int64_t n_rows, int64_t k, const Activations *acts,
                          int64_t m_rows, float *y, int64_t ldy) {
    const int bs = block_size(type), bb = block_bytes(type);
    const int64_t groups = k / 32, row_bytes = (k / bs) * bb;
#if LK_VNNI
    const int is_signed = 0, has_offsets = 1;
#else
    const int is_signed = type == T_Q8_0, has_offsets = type != T_Q8_0;
#endif
    int failed = 0;
#pragma omp parallel if (n_rows * k * (m_rows < 4 ? m_rows : 4) >= 65536)
    {
        DecodedRow dec = {malloc((size_t)k), malloc(sizeof(float) * (size_t)(groups * 8)),
                          malloc(sizeof(float) * (size_t)(groups * 2))};
        const int usable = dec.u && dec.ws8 && dec.wc16;
        if (!usable) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < n_rows; n++) {
            if (!usable) continue;
            const uint8_t *wr = w + n * row_bytes;
            float res[4];
            for (int64_t blk = 0; blk < k / bs; blk++) decode_block(type, wr + blk * bb, &dec, blk * (bs / 32));
            int64_t m = 0;
            for (; m + 4 <= m_rows; m += 4) {
                dot_rows(&dec, groups, is_signed, has_offsets, acts, m, 4, res);
                for (int r = 0; r < 4; r++) y[(m + r) * ldy + n] = res[r];
            }
            switch (m_rows - m) {
                case 3: dot_rows(&dec, groups, is_signed, has_offsets, acts, m, 3, res); break;
                case 2: dot_rows(&dec, groups, is_signed, has_offsets, acts, m, 2, res); break;
                case 1: dot_rows(&dec, groups, is_signed, has_offsets, acts, m, 1, res); break;
                default: break;
            }
            for (int r = 0; r < m_rows - m; r++) y[(m + r) * ldy + n] = res[r];
        }
        free(dec.u);
        free(dec.ws8);
        free(dec.wc16);
    }
    return failed ? -2 : 0;
}
#endif

/* y[m * ldy + n] = x[m] . W[n] for the n rows of W (row-major runs of blocks); x: [m_rows, k] of x_dtype;
 * y: float32, written (not added to). Returns 0, -1 for an unknown type or k not a multiple of the block
 * size, -2 when out of memory. */
int lk_gguf_matmul(int type, const uint8_t *w, int64_t n_rows, int64_t k, const void *x, int x_dtype,
                   int64_t m_rows, float *y, int64_t ldy) {
    const int bs = block_size(type), bb = block_bytes(type);
    if (bb == 0 || k % bs != 0 || k % 32 != 0) return -1;
    const int64_t groups = k / 32;
    /* padded by one group (zeros) at the end: the fused path's paired loads may run past a lone last group */
    int8_t *xq = calloc((size_t)(m_rows * k + 64), 1);
    uint8_t *xu = calloc((size_t)(m_rows * k + 64), 1);
    float *xd8 = calloc((size_t)(m_rows * groups * 8 + 16), sizeof(float));
    float *xs16 = malloc(sizeof(float) * (size_t)(m_rows * groups * 2));
    float *xs8 = calloc((size_t)(m_rows * groups * 8 + 16), sizeof(float));
    float *converted = x_dtype == LK_F32 ? NULL : malloc(sizeof(float) * (size_t)(m_rows * k));
    int rc = 0;
    if (!xq || !xu || !xd8 || !xs16 || !xs8 || (x_dtype != LK_F32 && !converted)) { rc = -2; goto done; }
    const float *xf = x_dtype == LK_F32 ? (const float *)x : converted;
#pragma omp parallel for schedule(static) if (m_rows * k >= 32768)
    for (int64_t m = 0; m < m_rows; m++) {
        if (converted) load_f32((const char *)x + (size_t)(m * k) * dtype_size(x_dtype), x_dtype, converted + m * k, k);
        quantize_activations(xf + m * k, k, xq + m * k, xu + m * k, xd8 + m * groups * 8, xs16 + m * groups * 2,
                             xs8 + m * groups * 8);
    }
    const Activations acts = {xq, xu, xd8, xs16, xs8, k};
#if LK_AVX512
    fused_matmul(type, w, n_rows, k, &acts, m_rows, y, ldy);
#else
    rc = decoded_matmul(type, w, n_rows, k, &acts, m_rows, y, ldy);
#endif
done:
    free(xq);
    free(xu);
    free(xd8);
    free(xs16);
    free(xs8);
    free(converted);
    return rc;
}

/* Decode n_rows rows of GGUF blocks into the affine form w = ws * u + wc the tiled kernel runs
 * (tiled_matmul.c): u[n * k + i] unsigned (Q8_0 as q + 128), ws16 / wc16[n * k / 16 + j] per 16 weights.
 * Exact: ws * u + wc is gguf's dequantization. Returns 0, -1 for an unknown type or k, -2 out of memory. */
int lk_gguf_decode(int type, const uint8_t *w, int64_t n_rows, int64_t k, uint8_t *u, float *ws16, float *wc16) {
    const int bs = block_size(type), bb = block_bytes(type);
    if (bb == 0 || k % bs != 0) return -1;
    const int64_t groups = k / 32, row_bytes = (k / bs) * bb;
    float *ws8 = malloc(sizeof(float) * (size_t)(groups * 8));
    if (!ws8) return -2;
    for (int64_t n = 0; n < n_rows; n++) {
        DecodedRow r = {u + n * k, ws8, wc16 + n * (k / 16)};
        for (int64_t blk = 0; blk < k / bs; blk++) decode_block(type, w + n * row_bytes + blk * bb, &r, blk * (bs / 32));
        float *ws = ws16 + n * (k / 16);
        for (int64_t g = 0; g < groups; g++) {
            ws[2 * g] = ws8[8 * g];
            ws[2 * g + 1] = ws8[8 * g + 4];
        }
#if !LK_VNNI
        if (type == T_Q8_0) {  /* this build decodes Q8_0 signed: shift to unsigned with an offset */
            for (int64_t i = 0; i < k; i++) r.u[i] ^= 0x80;
            for (int64_t j = 0; j < k / 16; j++) r.wc16[j] = -128.0f * ws[j];
        }
#endif
    }
    free(ws8);
    return 0;
}
