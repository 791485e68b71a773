/* The expert GEMM timed alone, and the bare AMX peak beside it (bench/amx_gemm.py). */
#define _GNU_SOURCE
#include "gemm_bench.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

double kt_time_gemm(const kt_store *s, int which, int path, int m, int e0, int n_experts, int reps) {
    const kt_mat_layout *L = which ? &s->down : &s->gu;
    static const int esz[] = {4, 2, 1, 1};
    const int64_t a_stride = L->k_pad * esz[s->fmt] + 64, rows = (m + 15) / 16 * 16;
    const int64_t ldc = L->n_pad + 16;
    uint8_t *a = aligned_alloc(64, rows * a_stride);
    float *a_scale = aligned_alloc(64, 4 * rows), *c = aligned_alloc(64, 4 * rows * ldc);
    int32_t *a_gsum = calloc(rows * (L->k_pad / 32 + 1), 4);
    if (!a || !a_scale || !c || !a_gsum) return -1;
    srand(1);
    for (int64_t i = 0; i < rows * a_stride; i++) a[i] = (uint8_t)(rand() & 0x3f); /* small */
    for (int64_t r = 0; r < rows; r++) a_scale[r] = 1.0f / 64;
    kt_gemm_fn fn = path == KT_PATH_AMX ? kt_gemm_amx
                    : path == KT_PATH_AVX512 ? kt_gemm_avx512 : kt_gemm_generic;
    uint8_t *w = which ? s->down_w : s->gu_w, *sc = which ? s->down_s : s->gu_s;
    uint8_t *z = which ? s->down_z : s->gu_z;
    double t0 = 0;
    for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
        if (r == 0) t0 = now();
        const int e = e0 + (r < 0 ? 0 : r) % n_experts;
        kt_gemm_args g = {L, w + e * L->w_bytes, sc + e * L->s_bytes, z ? z + e * L->z_bytes : NULL,
                          0, L->n_pad / 16, a, a_stride, a_scale, a_gsum, m, c, ldc};
        fn(&g);
    }
    double dt = (now() - t0) / reps;
    free(a);
    free(a_scale);
    free(c);
    free(a_gsum);
    return dt;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) peak_cfg;

__attribute__((target("amx-tile,amx-bf16,amx-int8"))) double kt_amx_peak_tflops(int int8) {
    peak_cfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    const long n = 1 << 20;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        if (int8) {
            _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
        } else {
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
    }
    double dt = now() - t0;
    _tile_release();
    return 4.0 * n * 16 * 16 * (int8 ? 64 : 32) * 2 / dt / 1e12;
}
