/* AVX512 helpers shared by kernels_avx512.c and kernels_amx.c (inlined into both, so the
 * fused AMX epilogue computes exactly what the AVX512 functions compute, bit for bit).
 * Include only from files that compile these with the targets below (they are a subset of
 * the AMX file's targets). */
#ifndef KT_SIMD_AVX512_H
#define KT_SIMD_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#define KT_AVX512_TGT \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,f16c,fma")))
#define KT_INLINE static inline __attribute__((always_inline))

/* exp(x) for x in [-88, 88]: 2^n * 2^f, f in [-0.5, 0.5], degree-6 polynomial (rel. err ~2e-7) */
KT_AVX512_TGT KT_INLINE __m512 kt_exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.540353e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* silu(g) * u = g / (1 + exp(-g)) * u */
KT_AVX512_TGT KT_INLINE __m512 kt_silu_mul512(__m512 g, __m512 u) {
    __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), kt_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    return _mm512_mul_ps(_mm512_div_ps(g, den), u);
}

/* kt_f32_to_bf16 (kernels.h) on 16 lanes, bit for bit: round to nearest even on the bits,
 * NaN kept NaN (quiet bit set). Not vcvtneps2bf16: that one flushes denormal inputs. */
KT_AVX512_TGT KT_INLINE __m256i kt_f32_to_bf16_512(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

#endif
