/* LoRA adapter products of a batch whose rows use different adapters, one call per fused linear (Punica's
 * BGMV: every row gets its own adapter's pair, whatever the mix). For each row t of adapter g:
 *     v = A_g x_t                          (A_g: [R_g, in], row-major; every part's ranks stacked)
 *     y_t[c:c + w] += v[part] Bt_part      per part (q, k, v of a fused qkv): its ranks r, columns c .. c + w,
 *                                          Bt_part [r, w] row-major (B's transpose, scaling folded in)
 * The rows come grouped by adapter (row_index, offsets: CSR), and each adapter's weights are read once for all of
 * its rows (decode is bound by reading weights). A matmul pair per adapter and linear instead would cost a call
 * and its dispatch per adapter, linear and layer. Float32 throughout; a row's result depends on that row only
 * (the same operations in the same order whatever else is in the batch). Threads over adapters (OpenMP, the
 * runtime PyTorch loaded). The weights are float32 or bfloat16 (--lora_dtype): bfloat16 halves the bytes each
 * decode step reads; each weight is widened to float32 as it is read, so the arithmetic stays float32. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "cpu_common.h"

#define LORA_MAX_RANK 4096

/* Four accumulators over 64-float blocks: one chain would wait on each FMA's latency (a dot of 576 is 36 FMAs). */
static inline float lora_dot(const float *a, const float *x, int64_t n) {
#if defined(__AVX512F__) && !defined(LK_PORTABLE)
    __m512 acc = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(x + c), acc);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(x + c + 16), acc1);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 32), _mm512_loadu_ps(x + c + 32), acc2);
        acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 48), _mm512_loadu_ps(x + c + 48), acc3);
    }
    acc = _mm512_add_ps(_mm512_add_ps(acc, acc1), _mm512_add_ps(acc2, acc3));
    for (; c + 16 <= n; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(x + c), acc);
    if (c < n) {
        const __mmask16 m = (__mmask16)((1u << (n - c)) - 1u);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, x + c), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float lanes[8] = {0};
    for (int64_t c = 0; c < n; c++) lanes[c % 8] = fmaf(a[c], x[c], lanes[c % 8]);
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
#endif
}

static inline float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* lora_dot with bfloat16 weights a (widened exactly to float32; lora_dot's accumulators and order, the tail summed apart). */
static inline float lora_dot_bf16(const uint16_t *a, const float *x, int64_t n) {
#if defined(__AVX512F__) && !defined(LK_PORTABLE)
#define LK_BF16X16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    __m512 acc = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) {
        acc = _mm512_fmadd_ps(LK_BF16X16(a + c), _mm512_loadu_ps(x + c), acc);
        acc1 = _mm512_fmadd_ps(LK_BF16X16(a + c + 16), _mm512_loadu_ps(x + c + 16), acc1);
        acc2 = _mm512_fmadd_ps(LK_BF16X16(a + c + 32), _mm512_loadu_ps(x + c + 32), acc2);
        acc3 = _mm512_fmadd_ps(LK_BF16X16(a + c + 48), _mm512_loadu_ps(x + c + 48), acc3);
    }
    acc = _mm512_add_ps(_mm512_add_ps(acc, acc1), _mm512_add_ps(acc2, acc3));
    for (; c + 16 <= n; c += 16) acc = _mm512_fmadd_ps(LK_BF16X16(a + c), _mm512_loadu_ps(x + c), acc);
#undef LK_BF16X16
    float tail = 0.0f;
    for (; c < n; c++) tail = fmaf(bf16_value(a[c]), x[c], tail);
    return _mm512_reduce_add_ps(acc) + tail;
#else
    float lanes[8] = {0};
    for (int64_t c = 0; c < n; c++) lanes[c % 8] = fmaf(bf16_value(a[c]), x[c], lanes[c % 8]);
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
#endif
}

/* x [T, in] and y [T, out] float32. Per adapter g: a_ptrs[g], bt_ptrs[g] (addresses of A_g and of its parts'
 * Bt one after the other), meta_ptrs[g] (int64: parts, then rank, first column, width per part) and ranks[g]
 * (0: no pair for this linear, its rows are left alone); its rows are row_index[offsets[g] .. offsets[g + 1]).
 * weight_dtype: LK_F32 or LK_BF16, the element type of every adapter's A and Bt in this call. */
int lk_lora_bgmv(const float *x, float *y, int64_t T, int64_t in, int64_t out, const int64_t *a_ptrs,
                 const int64_t *bt_ptrs, const int64_t *meta_ptrs, const int64_t *ranks, int64_t n_adapters,
                 const int64_t *row_index, const int64_t *offsets, int64_t weight_dtype) {
    if (weight_dtype != LK_F32 && weight_dtype != LK_BF16) return 5;
    const int bf16 = weight_dtype == LK_BF16;
    const int64_t elem = bf16 ? 2 : 4;
    for (int64_t g = 0; g < n_adapters; g++) {
        if (ranks[g] < 0 || ranks[g] > LORA_MAX_RANK || offsets[g] > offsets[g + 1]) return 1;
        for (int64_t j = offsets[g]; j < offsets[g + 1]; j++)
            if (row_index[j] < 0 || row_index[j] >= T) return 2;
        if (ranks[g] == 0) continue;
        const int64_t *meta = (const int64_t *)(intptr_t)meta_ptrs[g];
        int64_t total = 0;
        for (int64_t p = 0; p < meta[0]; p++) {
            if (meta[2 + 3 * p] < 0 || meta[2 + 3 * p] + meta[3 + 3 * p] > out) return 4;
            total += meta[1 + 3 * p];
        }
        if (total != ranks[g]) return 4;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) if (n_adapters > 1)
    for (int64_t g = 0; g < n_adapters; g++) {
        const int64_t R = ranks[g], n = offsets[g + 1] - offsets[g];
        if (R == 0 || n == 0) continue;
        const char *A = (const char *)(intptr_t)a_ptrs[g], *Bt = (const char *)(intptr_t)bt_ptrs[g];
        const int64_t *meta = (const int64_t *)(intptr_t)meta_ptrs[g];
        const int64_t *rows = row_index + offsets[g];
        float *v = malloc((size_t)(n * R) * sizeof(float)); /* v[j * R + r] for the adapter's j-th row */
        if (v == NULL) {
            failed = 1;
            continue;
        }
        for (int64_t r = 0; r < R; r++) {
            const char *a = A + r * in * elem;
            for (int64_t j = 0; j < n; j++)
                v[j * R + r] = bf16 ? lora_dot_bf16((const uint16_t *)a, x + rows[j] * in, in)
                                    : lora_dot((const float *)a, x + rows[j] * in, in);
        }
        int64_t r0 = 0;
        for (int64_t p = 0; p < meta[0]; p++) {
            const int64_t rp = meta[1 + 3 * p], col = meta[2 + 3 * p], w = meta[3 + 3 * p];
            for (int64_t r = 0; r < rp; r++) {
                const char *b = Bt + r * w * elem;
                for (int64_t j = 0; j < n; j++) {
                    const float s = v[j * R + r0 + r];
                    float *yt = y + rows[j] * out + col;
                    if (bf16) {
                        const uint16_t *bh = (const uint16_t *)b;
#pragma omp simd
                        for (int64_t o = 0; o < w; o++) yt[o] = fmaf(s, bf16_value(bh[o]), yt[o]);
                    } else {
                        const float *bf = (const float *)b;
#pragma omp simd
                        for (int64_t o = 0; o < w; o++) yt[o] = fmaf(s, bf[o], yt[o]);
                    }
                }
            }
            Bt += rp * w * elem;
            r0 += rp;
        }
        free(v);
    }
    return failed ? 3 : 0;
}
