/* AVX512 kernels: the decode path (few tokens per expert), memory-bound.
 *
 * Computes what kt_gemm_generic computes (kernels.h) on the same panels. Why it is fast:
 * a panel row is 64 bytes = 16 output columns x kpack k-values, so each load feeds one
 * instruction per token against a broadcast of that token's kpack activations
 * (fp32: vfmadd231ps, bf16: vdpbf16ps, int8/int4: vpdpbusd), with no horizontal sums and
 * up to 8 tokens sharing one load. An item's panels are one contiguous stream, read once,
 * with software prefetch PF_DIST bytes ahead on top of the hardware streamer.
 * int8: x is signed int8 per token; VNNI multiplies u8 x s8, so we feed x ^ 0x80 (= x + 128)
 * and subtract 128 * column sum (packed with the weights). int4: weights are the unsigned
 * operand (q in 0..15), x the signed one; the zero point comes off per group as zero * sum(x).
 */
#include <immintrin.h>
#include <string.h>

#include "kernels.h"
#include "simd_avx512.h"

#define TGT KT_AVX512_TGT
#define INLINE KT_INLINE
#define PF_DIST 1024
#define MAX_NT 8

INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

TGT INLINE void panel_fp32(const uint8_t *w, int K, const uint8_t *const *x, int nt,
                           __m512 *out) {
    __m512 a0[MAX_NT], a1[MAX_NT];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 2) {
        _mm_prefetch((const char *)w + k * 64 + PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)w + k * 64 + 64 + PF_DIST, _MM_HINT_T0);
        __m512 w0 = _mm512_load_ps(w + k * 64), w1 = _mm512_load_ps(w + k * 64 + 64);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const float *xt = (const float *)x[t];
            a0[t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xt[k]), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xt[k + 1]), a1[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) out[t] = _mm512_add_ps(a0[t], a1[t]);
}

TGT INLINE void panel_bf16(const uint8_t *w, int K, const uint8_t *const *x, int nt,
                           __m512 *out) {
    __m512 a0[MAX_NT], a1[MAX_NT];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    const int rows = K / 2;
    for (int r = 0; r < rows; r += 2) {
        _mm_prefetch((const char *)w + r * 64 + PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)w + r * 64 + 64 + PF_DIST, _MM_HINT_T0);
        __m512bh w0 = (__m512bh)_mm512_load_si512(w + r * 64);
        __m512bh w1 = (__m512bh)_mm512_load_si512(w + r * 64 + 64);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512bh x0 = (__m512bh)_mm512_set1_epi32(load_i32(x[t] + r * 4));
            __m512bh x1 = (__m512bh)_mm512_set1_epi32(load_i32(x[t] + r * 4 + 4));
            a0[t] = _mm512_dpbf16_ps(a0[t], w0, x0);
            a1[t] = _mm512_dpbf16_ps(a1[t], w1, x1);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) out[t] = _mm512_add_ps(a0[t], a1[t]);
}

TGT INLINE void panel_int8(const uint8_t *w, int K, const uint8_t *const *x, int nt,
                           const int32_t *colsum, const float *wscale, const float *xs,
                           __m512 *out) {
    __m512i a0[MAX_NT], a1[MAX_NT];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_si512();
    const int rows = K / 4;
    for (int r = 0; r < rows; r += 2) {
        _mm_prefetch((const char *)w + r * 64 + PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)w + r * 64 + 64 + PF_DIST, _MM_HINT_T0);
        __m512i w0 = _mm512_load_si512(w + r * 64), w1 = _mm512_load_si512(w + r * 64 + 64);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i x0 = _mm512_set1_epi32(load_i32(x[t] + r * 4) ^ (int32_t)0x80808080u);
            __m512i x1 = _mm512_set1_epi32(load_i32(x[t] + r * 4 + 4) ^ (int32_t)0x80808080u);
            a0[t] = _mm512_dpbusd_epi32(a0[t], x0, w0);
            a1[t] = _mm512_dpbusd_epi32(a1[t], x1, w1);
        }
    }
    __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(colsum), 7); /* 128 * column sum */
    __m512 ws = _mm512_loadu_ps(wscale);
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        __m512i acc = _mm512_sub_epi32(_mm512_add_epi32(a0[t], a1[t]), corr);
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs[t]));
        out[t] = _mm512_mul_ps(f, ws);
    }
}

TGT INLINE void panel_int4(const uint8_t *w, int K, int G, const uint8_t *const *x, int nt,
                           const uint16_t *scale, const uint8_t *zero,
                           const int32_t *const *gsum, const float *xs, __m512 *out) {
    __m512 facc[MAX_NT];
    __m512i a0[MAX_NT], a1[MAX_NT];
    const __m512i mask = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) facc[t] = _mm512_setzero_ps();
    const int ng = K / G, cpg = G / 8; /* 64-byte chunks (8 k) per group */
    for (int gi = 0; gi < ng; gi++) {
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_si512();
        for (int c = gi * cpg; c < (gi + 1) * cpg; c++) {
            _mm_prefetch((const char *)w + c * 64 + PF_DIST, _MM_HINT_T0);
            __m512i v = _mm512_load_si512(w + c * 64);
            __m512i lo = _mm512_and_si512(v, mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                a0[t] = _mm512_dpbusd_epi32(a0[t], lo, _mm512_set1_epi32(load_i32(x[t] + c * 8)));
                a1[t] = _mm512_dpbusd_epi32(a1[t], hi, _mm512_set1_epi32(load_i32(x[t] + c * 8 + 4)));
            }
        }
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + gi * 16)));
        __m512i z = zero ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zero + gi * 16)))
                         : _mm512_set1_epi32(8);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i acc = _mm512_add_epi32(a0[t], a1[t]);
            acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32(gsum[t][gi])));
            facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) out[t] = _mm512_mul_ps(facc[t], _mm512_set1_ps(xs[t]));
}

/* One panel for nt (<= MAX_NT) tokens starting at row m0. */
TGT INLINE void panel_nt(const kt_gemm_args *g, int p, int m0, int nt) {
    const kt_mat_layout *L = g->L;
    const uint8_t *w = g->w + (int64_t)p * L->panel_bytes;
    const uint8_t *x[MAX_NT];
    __m512 out[MAX_NT];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) x[t] = g->a + (int64_t)(m0 + t) * g->a_stride;
    switch (L->fmt) {
    case KT_FP32: panel_fp32(w, L->k_pad, x, nt, out); break;
    case KT_BF16: panel_bf16(w, L->k_pad, x, nt, out); break;
    case KT_INT8:
        panel_int8(w, L->k_pad, x, nt, (const int32_t *)g->z + p * 16,
                   (const float *)g->s + p * 16, g->a_scale + m0, out);
        break;
    default: {
        const int ng = L->k_pad / L->group_size;
        const int32_t *gs[MAX_NT];
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) gs[t] = g->a_gsum + (int64_t)(m0 + t) * ng;
        panel_int4(w, L->k_pad, L->group_size, x, nt, (const uint16_t *)g->s + (int64_t)p * ng * 16,
                   g->z ? g->z + (int64_t)p * ng * 16 : NULL, gs, g->a_scale + m0, out);
    }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) _mm512_storeu_ps(g->c + (int64_t)(m0 + t) * g->ldc + p * 16, out[t]);
}

TGT void kt_gemm_avx512(const kt_gemm_args *g) {
    for (int p = g->p0; p < g->p1; p++) {
        int m0 = 0;
        for (; m0 + MAX_NT <= g->m; m0 += MAX_NT) panel_nt(g, p, m0, MAX_NT);
        switch (g->m - m0) {
        case 1: panel_nt(g, p, m0, 1); break;
        case 2: panel_nt(g, p, m0, 2); break;
        case 3: panel_nt(g, p, m0, 3); break;
        case 4: panel_nt(g, p, m0, 4); break;
        case 5: panel_nt(g, p, m0, 5); break;
        case 6: panel_nt(g, p, m0, 6); break;
        case 7: panel_nt(g, p, m0, 7); break;
        default: break;
        }
    }
}

TGT void kt_silu_mul16_avx512(const float *g, const float *u, float *out_f32, uint16_t *out_bf16) {
    __m512 v = kt_silu_mul512(_mm512_loadu_ps(g), _mm512_loadu_ps(u));
    if (out_f32) _mm512_storeu_ps(out_f32, v);
    else _mm256_storeu_si256((__m256i *)out_bf16, (__m256i)_mm512_cvtneps_pbh(v));
}

/* kt_quantize_row_generic's result, bit for bit: the same max, the same 127 / max and the same
 * round-to-nearest-even (cvtps2dq under the default MXCSR rounding; |v * inv| <= 127). */
TGT void kt_quantize_row_avx512(const float *v, int k_pad, int8_t *q, float *scale) {
    __m512 amax = _mm512_setzero_ps();
    for (int k = 0; k < k_pad; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(v + k)));
    const float m = _mm512_reduce_max_ps(amax);
    const float inv = m > 0 ? 127.0f / m : 0.0f;
    *scale = m / 127.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    for (int k = 0; k < k_pad; k += 16) {
        __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + k), vi));
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(x));
    }
}

/* kt_combine_row_generic's result, bit for bit: per element acc = 0, then acc = acc + w_j * y_j
 * for j = 0..n-1 (a rounded multiply, then a rounded add: no FMA, as the generic C, built
 * with -std=c11, i.e. -ffp-contract=off), then the same bf16 rounding. Here the accumulators
 * stay in registers across the n rows, 64 columns at a time (four independent add chains). */
TGT INLINE void combine_store(__m512 a, int h, __mmask16 mask, float *of, uint16_t *ob) {
    if (of) _mm512_mask_storeu_ps(of + h, mask, a);
    else _mm256_mask_storeu_epi16(ob + h, mask, kt_f32_to_bf16_512(a));
}

TGT void kt_combine_row_avx512(const float *const *y, const float *w, int n, int H,
                               float *out_f32, uint16_t *out_bf16) {
    int h = 0;
    for (; h + 64 <= H; h += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n; j++) {
            const __m512 wj = _mm512_set1_ps(w[j]);
            const float *p = y[j] + h;
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(wj, _mm512_loadu_ps(p)));
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(wj, _mm512_loadu_ps(p + 16)));
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(wj, _mm512_loadu_ps(p + 32)));
            a3 = _mm512_add_ps(a3, _mm512_mul_ps(wj, _mm512_loadu_ps(p + 48)));
        }
        combine_store(a0, h, 0xffff, out_f32, out_bf16);
        combine_store(a1, h + 16, 0xffff, out_f32, out_bf16);
        combine_store(a2, h + 32, 0xffff, out_f32, out_bf16);
        combine_store(a3, h + 48, 0xffff, out_f32, out_bf16);
    }
    for (; h < H; h += 16) {
        const __mmask16 mask = H - h >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (H - h)) - 1);
        __m512 a = _mm512_setzero_ps();
        for (int j = 0; j < n; j++)
            a = _mm512_add_ps(a, _mm512_mul_ps(_mm512_set1_ps(w[j]), _mm512_maskz_loadu_ps(mask, y[j] + h)));
        combine_store(a, h, mask, out_f32, out_bf16);
    }
}

/* out[h] = the fp32 value of the bf16 in[h] (exact), h < n */
TGT void kt_bf16_to_f32_row_avx512(const uint16_t *in, int n, float *out) {
    for (int h = 0; h < n; h += 16) {
        const __mmask16 mask = n - h >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - h)) - 1);
        __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, in + h));
        _mm512_mask_storeu_ps(out + h, mask, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
}
