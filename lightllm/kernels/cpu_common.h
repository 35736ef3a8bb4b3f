/* Helpers shared by the CPU kernel sources: dtype codes and float16/bfloat16 <-> float32 conversion. */
#ifndef LIGHTLLM_CPU_COMMON_H
#define LIGHTLLM_CPU_COMMON_H
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { LK_F32 = 0, LK_BF16 = 1, LK_F16 = 2 };

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) { u = sign; }
        else {  /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) { u = sign | 0x7f800000u | (man << 13); }
    else { u = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, 0);  /* round to nearest even */
#else
    /* portable path: via the compiler's _Float16 where available */
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#endif
}

/* Convert n values of `dtype` at src into float32 dst (vectorisable loops, one per dtype). */
static inline void load_f32(const void *src, int dtype, float *dst, int64_t n) {
    if (dtype == LK_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == LK_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;  /* built with -fno-strict-aliasing */
        for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    } else {
        const uint16_t *s = (const uint16_t *)src;
#if defined(__F16C__)
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
#else
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
#endif
    }
}

static inline void store_f32(const float *src, void *dst, int dtype, int64_t n) {
    if (dtype == LK_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == LK_BF16) {
        const uint32_t *s = (const uint32_t *)src;
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) {  /* round to nearest even; NaN stays a (quiet) NaN; branch-free */
            uint32_t u = s[i];
            uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
            d[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
        }
    } else {
        uint16_t *d = (uint16_t *)dst;
#if defined(__F16C__)
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), 0));
        for (; i < n; i++) d[i] = f32_to_f16(src[i]);
#else
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_f16(src[i]);
#endif
    }
}

/* Quantize 32 activations to int8 as llama.cpp's Q8_0 does: d = max|v| / 127, q = round(v / d) to nearest
 * even. Returns d; the sums of q over values 0-15 and 16-31 go to sum_lo / sum_hi. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(LK_PORTABLE)
static inline float quantize_group32(const float *v, int8_t *q, int *sum_lo, int *sum_hi) {
    /* the same arithmetic as the plain version below, in two registers (vcvtps2dq rounds to nearest even) */
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    *sum_lo = _mm512_reduce_add_epi32(qa);
    *sum_hi = _mm512_reduce_add_epi32(qb);
    return amax / 127.0f;
}
#else
static inline float quantize_group32(const float *v, int8_t *q, int *sum_lo, int *sum_hi) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    int lo = 0, hi = 0;
    for (int j = 0; j < 32; j++) {
        const int qj = (int)nearbyintf(v[j] * id);
        q[j] = (int8_t)qj;
        if (j < 16) lo += qj; else hi += qj;
    }
    *sum_lo = lo;
    *sum_hi = hi;
    return amax / 127.0f;
}
#endif

static inline size_t dtype_size(int dtype) { return dtype == LK_F32 ? 4 : 2; }

#endif
