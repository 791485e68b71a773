/* The packed weight layout of the CPU experts: layout sizes, packing a layer from checkpoint
 * tensors (on the pool), and dequantizing one expert back (tests, dynamic placement). The
 * layout itself is described in moe.h and docs/cpu_kernels.md. */
#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "moe_internal.h"

/* ---------------------------------------------------------------- layout */

static int k_unit(int fmt, int group) { return fmt == KT_INT4 ? imax(64, group) : 64; }

int kt_mat_layout_init(kt_mat_layout *L, int fmt, int group_size, int asym, int n, int k) {
    memset(L, 0, sizeof(*L));
    if (fmt < KT_FP32 || fmt > KT_INT4) return -1;
    if (fmt == KT_INT4 && group_size != 32 && group_size != 64 && group_size != 128) return -1;
    static const int bits[] = {32, 16, 8, 4};
    L->fmt = fmt;
    L->group_size = fmt == KT_INT4 ? group_size : 0;
    L->asym = fmt == KT_INT4 ? asym : 0;
    L->n = n;
    L->k = k;
    L->n_pad = (int)roundup(n, 64);
    L->k_pad = (int)roundup(k, k_unit(fmt, group_size));
    L->panel_bytes = (int64_t)L->k_pad * 16 * bits[fmt] / 8;
    L->w_bytes = (int64_t)(L->n_pad / 16) * L->panel_bytes;
    if (fmt == KT_INT8) {
        L->s_bytes = (int64_t)L->n_pad * 4;
        L->z_bytes = (int64_t)L->n_pad * 4;
    } else if (fmt == KT_INT4) {
        L->s_bytes = (int64_t)L->n_pad * (L->k_pad / group_size) * 2;
        L->z_bytes = asym ? (int64_t)L->n_pad * (L->k_pad / group_size) : 0;
    }
    return 0;
}

void kt_store_init(kt_store *s, int fmt, int group_size, int asym, int E, int H, int I) {
    memset(s, 0, sizeof(*s));
    s->fmt = fmt;
    s->group_size = group_size;
    s->asym = asym;
    s->num_experts = E;
    s->hidden = H;
    s->inter = I;
    int i_pad = (int)roundup(I, k_unit(fmt, group_size)); /* I is the k of down */
    kt_mat_layout_init(&s->gu, fmt, group_size, asym, 2 * i_pad, H);
    kt_mat_layout_init(&s->down, fmt, group_size, asym, H, I); /* k_pad == i_pad */
}

/* ---------------------------------------------------------------- packing */




/* Packs one matrix of one expert. Column c of the packed matrix is row src_row(c) of
 * src0 (or of src1 for the odd panels when interleave), which has k values. */
static void pack_matrix(const kt_mat_layout *L, uint8_t *w, uint8_t *s, uint8_t *z,
                        const void *src0, const void *src1, int interleave, int src_rows,
                        int dtype, float *row) {
    const int K = L->k_pad, G = L->group_size;
    for (int c = 0; c < L->n_pad; c++) {
        int p = c / 16, n = c % 16;
        const void *src = src0;
        int r = c;
        if (interleave) {
            src = (p & 1) ? src1 : src0;
            r = (p / 2) * 16 + n;
        }
        memset(row, 0, sizeof(float) * K);
        if (r < src_rows)
            for (int k = 0; k < L->k; k++) row[k] = src_at(src, dtype, (int64_t)r * L->k + k);
        uint8_t *panel = w + (int64_t)p * L->panel_bytes;
        if (L->fmt == KT_FP32) {
            for (int k = 0; k < K; k++) ((float *)panel)[k * 16 + n] = row[k];
        } else if (L->fmt == KT_BF16) {
            for (int k = 0; k < K; k++)
                ((uint16_t *)panel)[(k >> 1) * 32 + n * 2 + (k & 1)] = kt_f32_to_bf16(row[k]);
        } else if (L->fmt == KT_INT8) {
            float amax = 0.0f;
            for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
            float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int k = 0; k < K; k++) {
                int q = (int)round_even(row[k] * inv);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                panel[(k >> 2) * 64 + n * 4 + (k & 3)] = (uint8_t)(int8_t)q;
                sum += q;
            }
            ((float *)s)[c] = scale;
            ((int32_t *)z)[c] = sum;
        } else { /* int4, per group of G along k */
            const int ng = K / G;
            for (int gi = 0; gi < ng; gi++) {
                const float *v = row + gi * G;
                float lo = 0.0f, hi = 0.0f, amax = 0.0f;
                for (int k = 0; k < G; k++) {
                    lo = fminf(lo, v[k]);
                    hi = fmaxf(hi, v[k]);
                    amax = fmaxf(amax, fabsf(v[k]));
                }
                float scale = L->asym ? (hi - lo) / 15.0f : amax / 7.0f;
                uint16_t scale16 = kt_f32_to_fp16(scale);
                scale = kt_fp16_to_f32(scale16); /* quantize against the scale we store */
                float inv = scale > 0 ? 1.0f / scale : 0.0f;
                int zero = 8;
                if (L->asym) {
                    zero = (int)round_even(-lo * inv);
                    zero = zero < 0 ? 0 : (zero > 15 ? 15 : zero);
                }
                int64_t idx = ((int64_t)p * ng + gi) * 16 + n;
                ((uint16_t *)s)[idx] = scale16;
                if (L->asym) z[idx] = (uint8_t)zero;
                for (int k = 0; k < G; k++) {
                    int kk = gi * G + k;
                    int q = (int)round_even(v[k] * inv) + zero;
                    q = q < 0 ? 0 : (q > 15 ? 15 : q);
                    int qr = kk >> 2;
                    uint8_t *b = panel + (qr >> 1) * 64 + n * 4 + (kk & 3);
                    *b = (qr & 1) ? (uint8_t)((*b & 0x0f) | (q << 4)) : (uint8_t)((*b & 0xf0) | q);
                }
            }
        }
    }
}

typedef struct {
    const kt_store *s;
    const void *gate, *up, *down;
    int dtype;
    _Atomic int next;
} pack_job;

static void pack_job_run(void *ctx, int tid, int nthreads) {
    (void)tid;
    (void)nthreads;
    pack_job *j = ctx;
    const kt_store *s = j->s;
    const int H = s->hidden, I = s->inter;
    const int esz = j->dtype == KT_DT_FP32 ? 4 : 2;
    float *row = aligned_alloc(64, roundup(sizeof(float) * imax(s->gu.k_pad, s->down.k_pad), 64));
    for (;;) {
        int item = atomic_fetch_add(&j->next, 1);
        if (item >= 2 * s->num_experts) break;
        int e = item / 2;
        if (item % 2 == 0) {
            const uint8_t *g = (const uint8_t *)j->gate + (int64_t)e * I * H * esz;
            const uint8_t *u = (const uint8_t *)j->up + (int64_t)e * I * H * esz;
            pack_matrix(&s->gu, s->gu_w + e * s->gu.w_bytes, s->gu_s + e * s->gu.s_bytes,
                        s->gu_z + e * s->gu.z_bytes, g, u, 1, I, j->dtype, row);
        } else {
            const uint8_t *d = (const uint8_t *)j->down + (int64_t)e * H * I * esz;
            pack_matrix(&s->down, s->down_w + e * s->down.w_bytes, s->down_s + e * s->down.s_bytes,
                        s->down_z + e * s->down.z_bytes, d, NULL, 0, H, j->dtype, row);
        }
    }
    free(row);
}

void kt_pack_layer(kt_pool *pool, const kt_store *s, const void *gate, const void *up,
                   const void *down, int src_dtype) {
    pack_job j = {s, gate, up, down, src_dtype, 0};
    kt_pool_run(pool, pack_job_run, &j);
}

/* Packed matrix value at (column c, k). */
static float packed_at(const kt_mat_layout *L, const uint8_t *w, const uint8_t *s,
                       const uint8_t *z, int c, int k) {
    const int p = c / 16, n = c % 16;
    const uint8_t *panel = w + (int64_t)p * L->panel_bytes;
    switch (L->fmt) {
    case KT_FP32: return ((const float *)panel)[k * 16 + n];
    case KT_BF16: return kt_bf16_to_f32(((const uint16_t *)panel)[(k >> 1) * 32 + n * 2 + (k & 1)]);
    case KT_INT8: return (int8_t)panel[(k >> 2) * 64 + n * 4 + (k & 3)] * ((const float *)s)[c];
    default: {
        const int ng = L->k_pad / L->group_size, gi = k / L->group_size, qr = k >> 2;
        uint8_t b = panel[(qr >> 1) * 64 + n * 4 + (k & 3)];
        int q = (qr & 1) ? b >> 4 : b & 15;
        int64_t idx = ((int64_t)p * ng + gi) * 16 + n;
        int zero = L->asym ? z[idx] : 8;
        return (float)(q - zero) * kt_fp16_to_f32(((const uint16_t *)s)[idx]);
    }
    }
}

void kt_dequant_expert(const kt_store *s, int e, float *gate, float *up, float *down) {
    const int H = s->hidden, I = s->inter;
    const uint8_t *w = s->gu_w + e * s->gu.w_bytes, *sc = s->gu_s + e * s->gu.s_bytes;
    const uint8_t *z = s->gu_z + e * s->gu.z_bytes;
    for (int i = 0; i < I; i++) {
        int cg = (i / 16) * 32 + i % 16; /* gate panel 2q, up panel 2q+1 */
        for (int h = 0; h < H; h++) {
            gate[(int64_t)i * H + h] = packed_at(&s->gu, w, sc, z, cg, h);
            up[(int64_t)i * H + h] = packed_at(&s->gu, w, sc, z, cg + 16, h);
        }
    }
    w = s->down_w + e * s->down.w_bytes;
    sc = s->down_s + e * s->down.s_bytes;
    z = s->down_z + e * s->down.z_bytes;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < I; i++) down[(int64_t)h * I + i] = packed_at(&s->down, w, sc, z, h, i);
}
