/* AMX kernels: the prefill path (many tokens per expert), compute-bound, bf16, int8 and int4.
 *
 * Computes what kt_gemm_generic computes (kernels.h). A 16-row block of a panel is an AMX B
 * tile as packed (moe.h), so weights load straight from the panels; activation rows (tokens
 * of one expert, gathered contiguously by moe.c) are the A tiles. 2x2 register blocking:
 * two 16-token tiles x two panels = four C tiles per k step, so each A and B tile loaded is
 * used twice. C tiles are stored straight into the fp32 output; int8 results (int32) are
 * converted in place with the token and column scales.
 * Rows: the caller guarantees that rows up to m rounded up to 16 are readable (a) and
 * writable (c), and belong to this call alone (the tail tile writes garbage there, which
 * nobody reads; C row i depends on A row i only, so garbage never reaches rows < m).
 * Tiles: 0-3 C, 4-5 A, 6-7 B; every tile 16 rows x 64 bytes.
 * int4 (groups of 64 or 128 along k): each panel pair is first unpacked to int8 panels of
 * q - zero (in [-15, 15]: the same integer dot products as kt_gemm_generic), then each group's
 * int32 C tiles are scaled by the group's column scales into fp32 accumulators.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd_avx512.h"

#define TGT \
    __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,f16c,fma")))

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

#define DP(c, a, b)                                            \
    do {                                                       \
        if (is_int8) _tile_dpbssd(c, a, b);                    \
        else _tile_dpbf16ps(c, a, b);                          \
    } while (0)

/* The gate/up epilogue (kt_gemm_args.act) on one 16-row group: cg, cu are the gate and up C
 * tiles of panels p, p + 1 for rows m0.. (16 x 16, 64-byte rows), in L1. */
TGT static inline __attribute__((always_inline)) void silu_tiles(const kt_gemm_args *g, const float *cg,
                                                                 const float *cu, int m0, int p,
                                                                 const int is_int8) {
    const int rows = g->m - m0 < 16 ? g->m - m0 : 16;
    uint8_t *out = g->act + (int64_t)m0 * g->act_stride + (int64_t)(p / 2) * 16 * (g->act_bf16 ? 2 : 4);
    __m512 ws0 = _mm512_setzero_ps(), ws1 = ws0;
    if (is_int8) {
        ws0 = _mm512_loadu_ps((const float *)g->s + p * 16);
        ws1 = _mm512_loadu_ps((const float *)g->s + p * 16 + 16);
    }
    for (int i = 0; i < rows; i++, out += g->act_stride) {
        __m512 gv = _mm512_load_ps(cg + i * 16), uv = _mm512_load_ps(cu + i * 16);
        if (is_int8) { /* as the in-place conversion below: acc * token scale * column scale */
            __m512 xs = _mm512_set1_ps(g->a_scale[m0 + i]);
            gv = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(gv)), xs), ws0);
            uv = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_castps_si512(uv)), xs), ws1);
        }
        __m512 v = kt_silu_mul512(gv, uv);
        if (g->act_bf16) _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(v));
        else _mm512_storeu_ps((float *)out, v);
    }
}

TGT static void gemm_amx(const kt_gemm_args *g, const int is_int8) {
    const kt_mat_layout *L = g->L;
    const int ksteps = is_int8 ? L->k_pad / 64 : L->k_pad / 32; /* 64 bytes of k per step */
    const int mt = (g->m + 15) / 16;
    const int64_t as = g->a_stride, cs = g->ldc * 4;
    /* Weights come from DRAM once per call; tile loads do not wake the hardware prefetcher
     * well, so while one panel pair is computed the next one is prefetched into L2. */
    const int iters = ((mt + 1) / 2) * ksteps;
    float ct[4][256] __attribute__((aligned(64))); /* C tiles for the epilogue */
    const int64_t pf_lines = 2 * L->panel_bytes / 64;
    const int pf_per_iter = (int)((pf_lines + iters - 1) / iters);
    for (int p = g->p0; p < g->p1; p += 2) {
        const uint8_t *b0 = g->w + (int64_t)p * L->panel_bytes, *b1 = b0 + L->panel_bytes;
        const uint8_t *pf = b1 + L->panel_bytes, *pf_end = p + 2 < g->p1 ? pf + 2 * L->panel_bytes : pf;
#define PREFETCH_NEXT()                                                      \
    for (int j = 0; j < pf_per_iter && pf < pf_end; j++, pf += 64)           \
        _mm_prefetch((const char *)pf, _MM_HINT_T1)
        int mi = 0;
        for (; mi + 2 <= mt; mi += 2) {
            const uint8_t *a0 = g->a + (int64_t)mi * 16 * as, *a1 = a0 + 16 * as;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int ks = 0; ks < ksteps; ks++) {
                _tile_loadd(4, a0 + ks * 64, as);
                _tile_loadd(6, b0 + ks * 1024, 64);
                _tile_loadd(7, b1 + ks * 1024, 64);
                _tile_loadd(5, a1 + ks * 64, as);
                PREFETCH_NEXT();
                DP(0, 4, 6);
                DP(1, 4, 7);
                DP(2, 5, 6);
                DP(3, 5, 7);
            }
            if (g->act) {
                _tile_stored(0, ct[0], 64);
                _tile_stored(1, ct[1], 64);
                _tile_stored(2, ct[2], 64);
                _tile_stored(3, ct[3], 64);
                silu_tiles(g, ct[0], ct[1], mi * 16, p, is_int8);
                if (mi * 16 + 16 < g->m) silu_tiles(g, ct[2], ct[3], mi * 16 + 16, p, is_int8);
                continue;
            }
            float *c0 = g->c + (int64_t)mi * 16 * g->ldc + p * 16;
            _tile_stored(0, c0, cs);
            _tile_stored(1, c0 + 16, cs);
            _tile_stored(2, c0 + 16 * g->ldc, cs);
            _tile_stored(3, c0 + 16 * g->ldc + 16, cs);
        }
        if (mi < mt) {
            const uint8_t *a0 = g->a + (int64_t)mi * 16 * as;
            _tile_zero(0);
            _tile_zero(1);
            for (int ks = 0; ks < ksteps; ks++) {
                _tile_loadd(4, a0 + ks * 64, as);
                _tile_loadd(6, b0 + ks * 1024, 64);
                _tile_loadd(7, b1 + ks * 1024, 64);
                PREFETCH_NEXT();
                DP(0, 4, 6);
                DP(1, 4, 7);
            }
            if (g->act) {
                _tile_stored(0, ct[0], 64);
                _tile_stored(1, ct[1], 64);
                silu_tiles(g, ct[0], ct[1], mi * 16, p, is_int8);
            } else {
                float *c0 = g->c + (int64_t)mi * 16 * g->ldc + p * 16;
                _tile_stored(0, c0, cs);
                _tile_stored(1, c0 + 16, cs);
            }
        }
        if (is_int8 && !g->act) { /* int32 -> fp32 in place: acc * token scale * column scale */
            __m512 ws0 = _mm512_loadu_ps((const float *)g->s + p * 16);
            __m512 ws1 = _mm512_loadu_ps((const float *)g->s + p * 16 + 16);
            for (int m = 0; m < g->m; m++) {
                float *row = g->c + (int64_t)m * g->ldc + p * 16;
                __m512 xs = _mm512_set1_ps(g->a_scale[m]);
                __m512 v0 = _mm512_cvtepi32_ps(_mm512_loadu_si512(row));
                __m512 v1 = _mm512_cvtepi32_ps(_mm512_loadu_si512(row + 16));
                _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_mul_ps(v0, xs), ws0));
                _mm512_storeu_ps(row + 16, _mm512_mul_ps(_mm512_mul_ps(v1, xs), ws1));
            }
        }
    }
}

/* Panel src (int4, moe.h: int4 row c holds int8 rows 2c and 2c + 1 in its low and high
 * nibbles) as an int8 panel of q - zero: zero per (group, column) from zp [ng][16], or 8. */
TGT static void unpack_int4(const kt_mat_layout *L, const uint8_t *src, const uint8_t *zp, int8_t *dst) {
    const int G = L->group_size, rows = L->k_pad / 8; /* 8 k per int4 row */
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512i z = _mm512_set1_epi8(8);
    for (int c = 0; c < rows; c++) {
        if (zp && (c * 8) % G == 0) /* byte n * 4 + j of a row is column n: zero[n] x 4 */
            z = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zp + c * 8 / G * 16))),
                                   _mm512_set1_epi32(0x01010101));
        const __m512i v = _mm512_loadu_si512(src + (int64_t)c * 64);
        _mm512_store_si512(dst + (int64_t)c * 128, _mm512_sub_epi8(_mm512_and_si512(v, nibble), z));
        _mm512_store_si512(dst + (int64_t)c * 128 + 64,
                           _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), z));
    }
}

/* This thread's unpacked panel pair: grown as needed and kept for its later calls (not freed
 * when the thread ends: 2 x k_pad x 16 bytes, a few hundred KiB at most). */
static __thread int8_t *int4_scratch;
static __thread int64_t int4_scratch_bytes;

TGT static void gemm_amx_int4(const kt_gemm_args *g) {
    const kt_mat_layout *L = g->L;
    const int G = L->group_size, ng = L->k_pad / G, steps = G / 64; /* 64 k per step */
    const int mt = (g->m + 15) / 16;
    const int64_t as = g->a_stride, pb = (int64_t)L->k_pad * 16; /* bytes of an unpacked panel */
    if (int4_scratch_bytes < 2 * pb) {
        free(int4_scratch);
        int4_scratch = aligned_alloc(64, 2 * pb);
        int4_scratch_bytes = int4_scratch ? 2 * pb : 0;
        if (!int4_scratch) abort(); /* 2 x k_pad x 16 bytes: a few hundred KiB at most */
    }
    const uint8_t *b0 = (const uint8_t *)int4_scratch, *b1 = b0 + pb;
    float ct[4][256] __attribute__((aligned(64))), acc[4][256] __attribute__((aligned(64)));
    /* As in gemm_amx: the next panel pair's packed weights are prefetched into L2 while this
     * pair is computed, so that its unpacking reads them from L2, not from DRAM */
    const int iters = ((mt + 1) / 2) * ng;
    const int64_t pf_lines = 2 * L->panel_bytes / 64;
    const int pf_per_iter = (int)((pf_lines + iters - 1) / iters);
    for (int p = g->p0; p < g->p1; p += 2) {
        for (int q = 0; q < 2; q++)
            unpack_int4(L, g->w + (int64_t)(p + q) * L->panel_bytes,
                        g->z ? g->z + (int64_t)(p + q) * ng * 16 : NULL, int4_scratch + q * pb);
        const uint16_t *s0 = (const uint16_t *)g->s + (int64_t)p * ng * 16, *s1 = s0 + ng * 16;
        const uint8_t *pf = g->w + (int64_t)(p + 2) * L->panel_bytes;
        const uint8_t *pf_end = p + 2 < g->p1 ? pf + 2 * L->panel_bytes : pf;
        for (int mi = 0; mi < mt; mi += 2) {
            const int tiles = mi + 1 < mt ? 4 : 2; /* two row tiles, or the last one alone */
            const uint8_t *a0 = g->a + (int64_t)mi * 16 * as, *a1 = a0 + 16 * as;
            for (int gi = 0; gi < ng; gi++) {
                PREFETCH_NEXT();
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int ks = gi * steps; ks < (gi + 1) * steps; ks++) {
                    _tile_loadd(4, a0 + ks * 64, as);
                    _tile_loadd(6, b0 + ks * 1024, 64);
                    _tile_loadd(7, b1 + ks * 1024, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 4, 7);
                    if (tiles == 4) {
                        _tile_loadd(5, a1 + ks * 64, as);
                        _tile_dpbssd(2, 5, 6);
                        _tile_dpbssd(3, 5, 7);
                    }
                }
                _tile_stored(0, ct[0], 64);
                _tile_stored(1, ct[1], 64);
                if (tiles == 4) {
                    _tile_stored(2, ct[2], 64);
                    _tile_stored(3, ct[3], 64);
                }
                /* acc += int32 dot of the group x its column scales (tiles 0, 2: panel p) */
                const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s0 + gi * 16)));
                const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s1 + gi * 16)));
                for (int t = 0; t < tiles; t++) {
                    const __m512 w = t & 1 ? w1 : w0;
                    for (int i = 0; i < 16; i++) {
                        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(ct[t] + 16 * i));
                        const __m512 prev = gi ? _mm512_load_ps(acc[t] + 16 * i) : _mm512_setzero_ps();
                        _mm512_store_ps(acc[t] + 16 * i, _mm512_fmadd_ps(v, w, prev));
                    }
                }
            }
            for (int t = 0; t < tiles; t++) { /* x the token scales; rows past m are left */
                const int m0 = (mi + t / 2) * 16;
                for (int i = 0; i < 16 && m0 + i < g->m; i++)
                    _mm512_store_ps(acc[t] + 16 * i, _mm512_mul_ps(_mm512_load_ps(acc[t] + 16 * i),
                                                                   _mm512_set1_ps(g->a_scale[m0 + i])));
            }
            for (int r = 0; r < tiles / 2; r++) {
                const int m0 = (mi + r) * 16;
                if (m0 >= g->m) break;
                if (g->act) {
                    silu_tiles(g, acc[2 * r], acc[2 * r + 1], m0, p, 0);
                    continue;
                }
                for (int i = 0; i < 16 && m0 + i < g->m; i++) {
                    float *row = g->c + (int64_t)(m0 + i) * g->ldc + p * 16;
                    _mm512_storeu_ps(row, _mm512_load_ps(acc[2 * r] + 16 * i));
                    _mm512_storeu_ps(row + 16, _mm512_load_ps(acc[2 * r + 1] + 16 * i));
                }
            }
        }
    }
}

/* Each function that uses the tiles loads the configuration itself: loaded by a separate
 * call (shared with gemm_bench.c), it did not survive the return here (the next tile op
 * faulted). */
TGT void kt_gemm_amx(const kt_gemm_args *g) {
    tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    if (g->L->fmt == KT_INT4) gemm_amx_int4(g);
    else if (g->L->fmt == KT_INT8) gemm_amx(g, 1);
    else gemm_amx(g, 0);
    _tile_release();
}
