/* The one primitive every path implements, and the small epilogues around it.
 *
 * kt_gemm_*: c[m][p*16 + n] = sum_k W[p*16 + n][k] * a[m][k], for panels p in [p0, p1),
 * m in [0, m), in fp32, dequantized (scales applied). Activation rows a[m] are in the format's
 * row type, k_pad long and zero past k:
 *     fp32: float   bf16: uint16 (bf16 bits)   int8, int4: int8 with a per-row scale a_scale[m]
 * int4 also needs a_gsum[m][g] = sum of the int8 row over group g (for the zero points).
 * The generic C version (kernels_generic.c) is the reference the others are checked against;
 * int8/int4 paths compute the same integer dot products, so they differ only by fp rounding.
 */
#ifndef KT_KERNELS_H
#define KT_KERNELS_H

#include <stdint.h>

#include "moe.h"

typedef struct {
    const kt_mat_layout *L;
    const uint8_t *w;        /* this expert's packed panels */
    const uint8_t *s, *z;    /* this expert's scales, column sums / zeros */
    int p0, p1;              /* panel range */
    const uint8_t *a;        /* activation rows */
    int64_t a_stride;        /* bytes between rows */
    const float *a_scale;    /* [m] (int8, int4) */
    const int32_t *a_gsum;   /* [m][k_pad / group] (int4) */
    int m;
    float *c;                /* row 0, column 0 of the output */
    int64_t ldc;             /* floats between output rows */
    /* gate/up epilogue, kt_gemm_amx only (act NULL: none, c is written as above). The panels
     * are (gate, up) pairs from an even p0 (moe.h), and instead of c, row m < m of act
     * (act_stride bytes apart) gets silu(gate) * up at columns (p / 2) * 16 + n, as fp32 or
     * (act_bf16) bf16: what kt_silu_mul16_avx512 gives on the c rows, bit for bit, computed
     * on each group of C tiles while they are in L1. */
    uint8_t *act;
    int64_t act_stride;
    int act_bf16;
} kt_gemm_args;

typedef void (*kt_gemm_fn)(const kt_gemm_args *g);

void kt_gemm_generic(const kt_gemm_args *g);
void kt_gemm_avx512(const kt_gemm_args *g);
/* AMX: bf16, int8, and int4 with groups of 64 or 128; needs m rows readable/writable rounded
 * up to 16, and the rows past m (up to that) owned by this call: they get garbage. */
void kt_gemm_amx(const kt_gemm_args *g);

/* act[n] = silu(g[n]) * u[n] for n < 16, written as fp32 or bf16 */
void kt_silu_mul16_generic(const float *g, const float *u, float *out_f32, uint16_t *out_bf16);
void kt_silu_mul16_avx512(const float *g, const float *u, float *out_f32, uint16_t *out_bf16);

/* q[k] = round_even(v[k] * 127 / max|v|), *scale = max|v| / 127; k_pad % 16 == 0. The AVX512
 * version gives the same bits as the plain C one in moe.c (the reference). */
void kt_quantize_row_avx512(const float *v, int k_pad, int8_t *q, float *scale);

/* out[h] = sum_j w[j] * y[j][h] for j = 0..n-1 in that order (acc = 0, then acc += w_j * y_j),
 * h < H, written as fp32 (out_f32) or bf16 (out_bf16, round to nearest even). The AVX512
 * version gives the generic one's bits; the generic one uses acc[H] as scratch. */
void kt_combine_row_generic(const float *const *y, const float *w, int n, int H, float *acc,
                            float *out_f32, uint16_t *out_bf16);
void kt_combine_row_avx512(const float *const *y, const float *w, int n, int H,
                           float *out_f32, uint16_t *out_bf16);

/* out[h] = the fp32 value of the bf16 in[h] (exact), h < n */
void kt_bf16_to_f32_row_avx512(const uint16_t *in, int n, float *out);

static inline uint16_t kt_f32_to_bf16(float f) { /* round to nearest even; NaN kept NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1)) >> 16);
}
static inline float kt_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
float kt_fp16_to_f32(uint16_t h);
uint16_t kt_f32_to_fp16(float f);

#endif
