/* Plain C kernels: run on any x86-64 and are the reference for the AVX512 and AMX paths.
 * They read the same packed panels (see moe.h) element by element. */
#include <math.h>
#include <string.h>

#include "kernels.h"

float kt_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31) v.u = sign | 0x7f800000u | (man << 13);
    else v.u = sign | ((exp + 112) << 23) | (man << 13);
    return v.f;
}

uint16_t kt_f32_to_fp16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint16_t sign = (v.u >> 16) & 0x8000;
    float a = fabsf(f);
    if (a != a) return sign | 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00;
    if (a < 6.103515625e-05f) return sign | (uint16_t)lrintf(a * 16777216.0f); /* subnormal */
    union { float f; uint32_t u; } w = {a};
    uint32_t exp = ((w.u >> 23) & 0xff) - 112, man = w.u & 0x7fffff;
    uint32_t r = (exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++; /* round to nearest even */
    return sign | (uint16_t)r;
}

static inline int8_t int8_at(const uint8_t *panel, int k, int n) {
    return (int8_t)panel[(k >> 2) * 64 + n * 4 + (k & 3)];
}

static inline int int4_at(const uint8_t *panel, int k, int n) {
    int q = k >> 2; /* int8 row */
    uint8_t b = panel[(q >> 1) * 64 + n * 4 + (k & 3)];
    return (q & 1) ? (b >> 4) : (b & 15);
}

void kt_gemm_generic(const kt_gemm_args *g) {
    const kt_mat_layout *L = g->L;
    const int K = L->k_pad, G = L->group_size, ng = K / (G > 0 ? G : 1);
    for (int p = g->p0; p < g->p1; p++) {
        const uint8_t *panel = g->w + (int64_t)p * L->panel_bytes;
        for (int m = 0; m < g->m; m++) {
            const uint8_t *arow = g->a + (int64_t)m * g->a_stride;
            float *crow = g->c + (int64_t)m * g->ldc + p * 16;
            for (int n = 0; n < 16; n++) {
                int col = p * 16 + n;
                float acc = 0.0f;
                if (L->fmt == KT_FP32) {
                    const float *x = (const float *)arow, *w = (const float *)panel;
                    for (int k = 0; k < K; k++) acc += w[k * 16 + n] * x[k];
                } else if (L->fmt == KT_BF16) {
                    const uint16_t *x = (const uint16_t *)arow, *w = (const uint16_t *)panel;
                    for (int k = 0; k < K; k++)
                        acc += kt_bf16_to_f32(w[(k >> 1) * 32 + n * 2 + (k & 1)]) * kt_bf16_to_f32(x[k]);
                } else if (L->fmt == KT_INT8) {
                    const int8_t *x = (const int8_t *)arow;
                    int32_t iacc = 0;
                    for (int k = 0; k < K; k++) iacc += int8_at(panel, k, n) * x[k];
                    acc = (float)iacc * g->a_scale[m] * ((const float *)g->s)[col];
                } else { /* int4 */
                    const int8_t *x = (const int8_t *)arow;
                    const uint16_t *sc = (const uint16_t *)g->s + (int64_t)p * ng * 16;
                    const uint8_t *zp = g->z ? g->z + (int64_t)p * ng * 16 : NULL;
                    const int32_t *gsum = g->a_gsum + (int64_t)m * ng;
                    for (int gi = 0; gi < ng; gi++) {
                        int32_t iacc = 0;
                        for (int k = gi * G; k < (gi + 1) * G; k++) iacc += int4_at(panel, k, n) * x[k];
                        int zero = zp ? zp[gi * 16 + n] : 8;
                        iacc -= zero * gsum[gi];
                        acc += (float)iacc * kt_fp16_to_f32(sc[gi * 16 + n]);
                    }
                    acc *= g->a_scale[m];
                }
                crow[n] = acc;
            }
        }
    }
}

void kt_silu_mul16_generic(const float *g, const float *u, float *out_f32, uint16_t *out_bf16) {
    for (int n = 0; n < 16; n++) {
        float v = g[n] / (1.0f + expf(-g[n])) * u[n];
        if (out_f32) out_f32[n] = v;
        else out_bf16[n] = kt_f32_to_bf16(v);
    }
}

void kt_combine_row_generic(const float *const *y, const float *w, int n, int H, float *acc,
                            float *out_f32, uint16_t *out_bf16) {
    for (int h = 0; h < H; h++) acc[h] = 0.0f;
    for (int j = 0; j < n; j++)
        for (int h = 0; h < H; h++) acc[h] += w[j] * y[j][h];
    if (out_f32) memcpy(out_f32, acc, 4 * (size_t)H);
    else
        for (int h = 0; h < H; h++) out_bf16[h] = kt_f32_to_bf16(acc[h]);
}
