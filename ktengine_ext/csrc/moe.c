/* The fused MoE call: routing, and the phases run on the pool (packing: pack.c).
 *
 * submit() routes on the calling thread (cheap: T*k pairs), then starts the pool on five
 * phases separated by barriers; every phase hands out items through an atomic counter (and
 * sync() takes items too, when the pool leaves its thread a core):
 *   0 gather   token chunks: x row -> the format's activation row, once per (token, expert)
 *              pair, rows grouped by expert (row_start[e] ...), quantized per token for int
 *   1 gate/up  (expert, block of panel pairs): gu = [gate|up] x, then act = silu(g) * u
 *              (AMX experts: on each group of C tiles while in L1, gu is not written); int
 *              formats with one item per expert (prefill) also quantize the act rows there
 *   2 quant    (int8/int4 only, else) row chunks: act rows -> int8 with a per-row scale
 *   3 down     (expert, block of panels): y = down act, one fp32 row per pair
 *   4 combine  token chunks: out[t] = sum_j w[t,j] y[row(t,j)], cast to out's dtype
 * Items are (expert, block of panels): about 8 per thread in all, each expert's share by its
 * work (its rows plus a fixed part for its weights), so a single token still keeps every
 * worker busy and a hot expert of a skewed prefill is not one item that every other worker
 * waits for at the next barrier; experts with at least amx_min_tokens rows use the AMX kernel.
 * Determinism: every output element is written by exactly one item, in an order fixed by the
 * data (not by the threads or their timing), and phases that read each other's results are
 * separated by barriers (a phase starts once every item of the one before is done). So a call
 * gives bitwise the same result every time and for any thread
 * count. Rows [row_start[e], row_start[e] + span) are expert e's alone, span = count rounded up
 * to 16 for AMX experts (whole tiles), count otherwise; the combine sums a token's experts in
 * top-k order (j = 0..k-1) on the one worker that owns that token.
 */
#define _GNU_SOURCE
#include "moe.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "membw.h"
#include "moe_internal.h"

#define PHASES 5


/* ---------------------------------------------------------------- workspace */

struct kt_workspace {
    int cap_rows, cap_tokens, cap_experts, cap_threads;
    int32_t *count, *row_start, *active, *use_amx; /* [E] */
    int32_t *pre1, *size1, *pre3, *size3; /* [E + 1]: items per active expert (split_items) */
    int32_t *pair_row;                            /* [T * k], -1: not computed here */
    int32_t *row_token;                           /* [rows], -1: padding row */
    uint8_t *xg, *act;
    float *xs, *gu, *actf, *as, *y, *scratch;
    int32_t *xsum, *asum;
    int64_t x_stride, gu_stride, actf_stride, act_stride, y_stride, scratch_stride;
    int ng_h, ng_i; /* int4 groups along H and I */
    int rows, n_active, num_tokens; /* num_tokens: this call's T (live_tokens applied) */
    int fuse_quant; /* int formats, one gate/up item per expert: it quantizes its act rows */
    int items[PHASES], last_phase;
    _Atomic int next[PHASES];
    _Atomic int completed[PHASES]; /* items of each phase done: the barrier before the next */
};

static int64_t stride_bytes(int64_t bytes) {
    bytes = roundup(bytes, 64);
    return bytes % 1024 == 0 ? bytes + 64 : bytes; /* avoid 4 KiB aliasing of tile rows */
}

/* Row buffers of a prefill call run to hundreds of MiB and AMX reads 16 rows per tile load:
 * the big ones get 2 MiB pages (membw.h). */
static void *xalloc(int64_t bytes) {
    const int64_t huge = (int64_t)2 << 20;
    if (bytes < 2 * huge) return aligned_alloc(64, roundup(bytes > 0 ? bytes : 64, 64));
    void *p = aligned_alloc(huge, roundup(bytes, huge));
    if (p) kt_advise_huge_pages(p, roundup(bytes, huge));
    return p;
}

static void ws_free_rows(kt_workspace *ws) {
    free(ws->row_token);
    free(ws->xg);
    free(ws->act);
    free(ws->xs);
    free(ws->gu);
    free(ws->actf);
    free(ws->as);
    free(ws->y);
    free(ws->xsum);
    free(ws->asum);
}

/* Grows the buffers; returns -1 if out of memory. */
static int ws_reserve(kt_workspace *ws, const kt_store *s, int T, int k, int rows, int nthreads) {
    const int E = s->num_experts;
    if (E > ws->cap_experts) {
        free(ws->count);
        free(ws->row_start);
        free(ws->active);
        free(ws->use_amx);
        free(ws->pre1);
        free(ws->size1);
        free(ws->pre3);
        free(ws->size3);
        ws->pre1 = xalloc(4 * (E + 1));
        ws->size1 = xalloc(4 * (E + 1));
        ws->pre3 = xalloc(4 * (E + 1));
        ws->size3 = xalloc(4 * (E + 1));
        ws->count = xalloc(4 * E);
        ws->row_start = xalloc(4 * E);
        ws->active = xalloc(4 * E);
        ws->use_amx = xalloc(4 * E);
        ws->cap_experts = E;
        if (!ws->count || !ws->row_start || !ws->active || !ws->use_amx || !ws->pre1 || !ws->size1
            || !ws->pre3 || !ws->size3)
            return -1;
    }
    if ((int64_t)T * k > ws->cap_tokens) {
        free(ws->pair_row);
        ws->pair_row = xalloc((int64_t)4 * T * k);
        ws->cap_tokens = T * k;
        if (!ws->pair_row) return -1;
    }
    if (nthreads > ws->cap_threads) {
        free(ws->scratch);
        ws->scratch_stride = roundup(imax(s->gu.k_pad, s->down.n_pad), 16);
        ws->scratch = xalloc(4 * ws->scratch_stride * nthreads);
        ws->cap_threads = nthreads;
        if (!ws->scratch) return -1;
    }
    static const int esz[] = {4, 2, 1, 1};
    const int i_pad = s->down.k_pad;
    ws->x_stride = stride_bytes((int64_t)s->gu.k_pad * esz[s->fmt]);
    ws->gu_stride = stride_bytes((int64_t)s->gu.n_pad * 4) / 4;
    ws->actf_stride = stride_bytes((int64_t)i_pad * 4) / 4;
    ws->act_stride = stride_bytes((int64_t)i_pad * esz[s->fmt]);
    ws->y_stride = stride_bytes((int64_t)s->down.n_pad * 4) / 4;
    ws->ng_h = s->fmt == KT_INT4 ? s->gu.k_pad / s->group_size : 1;
    ws->ng_i = s->fmt == KT_INT4 ? i_pad / s->group_size : 1;
    if (rows > ws->cap_rows) {
        ws_free_rows(ws);
        int64_t R = rows;
        ws->row_token = xalloc(4 * R);
        ws->xg = xalloc(R * ws->x_stride);
        ws->xs = xalloc(4 * R);
        ws->xsum = xalloc(4 * R * ws->ng_h);
        ws->gu = xalloc(4 * R * ws->gu_stride);
        ws->actf = s->fmt >= KT_INT8 ? xalloc(4 * R * ws->actf_stride) : NULL;
        ws->act = xalloc(R * ws->act_stride);
        ws->as = xalloc(4 * R);
        ws->asum = xalloc(4 * R * ws->ng_i);
        ws->y = xalloc(4 * R * ws->y_stride);
        ws->cap_rows = rows;
        if (!ws->row_token || !ws->xg || !ws->xs || !ws->xsum || !ws->gu || !ws->act || !ws->as ||
            !ws->asum || !ws->y || (s->fmt >= KT_INT8 && !ws->actf)) {
            ws->cap_rows = 0;
            return -1;
        }
    }
    return 0;
}

void kt_moe_free(kt_moe_task *task) {
    kt_workspace *ws = task->ws;
    if (!ws) return;
    ws_free_rows(ws);
    free(ws->count);
    free(ws->row_start);
    free(ws->active);
    free(ws->use_amx);
    free(ws->pre1);
    free(ws->size1);
    free(ws->pre3);
    free(ws->size3);
    free(ws->pair_row);
    free(ws->scratch);
    free(ws);
    task->ws = NULL;
}

/* ---------------------------------------------------------------- items */

#define SPLIT_FIXED_ROWS 16 /* an expert's weights, in rows of work, when splitting */

/* Splits every active expert's `units` (panel pairs) into blocks of size[a] units, about
 * `target` items in all, each expert's share by its work w = rows + SPLIT_FIXED_ROWS: blocks
 * of units * sum(w) / (target * w), at least 1 and at most all. pre[a] = the first item of
 * active expert a, pre[n_active] = the number of items. With equal rows (uniform routing,
 * decode) every expert gets units * n_active / target, as when the split ignored rows. */
static int split_items(const kt_workspace *ws, int units, int target, int32_t *pre, int32_t *size) {
    int64_t total = 0;
    for (int a = 0; a < ws->n_active; a++) total += ws->count[ws->active[a]] + SPLIT_FIXED_ROWS;
    int items = 0;
    for (int a = 0; a < ws->n_active; a++) {
        const int64_t w = ws->count[ws->active[a]] + SPLIT_FIXED_ROWS;
        size[a] = (int32_t)(units * total / (target * w));
        size[a] = imax(1, imin(units, size[a]));
        pre[a] = items;
        items += (units + size[a] - 1) / size[a];
    }
    pre[ws->n_active] = items;
    return items;
}

/* The active expert whose items hold `item`: the last a with pre[a] <= item. */
static inline int item_owner(const int32_t *pre, int n_active, int item) {
    int lo = 0, hi = n_active;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (pre[mid] <= item) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* ---------------------------------------------------------------- phases */

static void quantize_row_ref(const float *v, int k_pad, int8_t *q, float *scale);

/* int8 row with one scale (max |v| -> 127); int4 also wants the sum of each group. */
static void quantize_row(const float *v, int k_pad, int8_t *q, float *scale, int32_t *gsum, int G,
                         int path) {
    if (path >= KT_PATH_AVX512) kt_quantize_row_avx512(v, k_pad, q, scale);
    else quantize_row_ref(v, k_pad, q, scale);
    if (gsum)
        for (int g = 0; g < k_pad / G; g++) {
            int32_t sum = 0;
            for (int k = g * G; k < (g + 1) * G; k++) sum += q[k];
            gsum[g] = sum;
        }
}

static void quantize_row_ref(const float *v, int k_pad, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int k = 0; k < k_pad; k++) {
        float a = fabsf(v[k]);
        amax = a > amax ? a : amax;
    }
    float inv = amax > 0 ? 127.0f / amax : 0.0f;
    *scale = amax / 127.0f;
    for (int k = 0; k < k_pad; k++) q[k] = (int8_t)(int)round_even(v[k] * inv);
}

static void phase_gather(kt_moe_task *t, int item, int tid) {
    const kt_store *s = t->store;
    kt_workspace *ws = t->ws;
    const int H = s->hidden, K = s->gu.k_pad, k = t->top_k;
    const int t0 = item * 8, t1 = imin(t0 + 8, ws->num_tokens);
    float *tmp = ws->scratch + (int64_t)tid * ws->scratch_stride;
    for (int tok = t0; tok < t1; tok++) {
        int first = -1;
        for (int j = 0; j < k; j++) {
            int r = ws->pair_row[tok * k + j];
            if (r < 0) continue;
            uint8_t *dst = ws->xg + r * ws->x_stride;
            if (first >= 0) { /* same token, another expert: copy the converted row */
                memcpy(dst, ws->xg + first * ws->x_stride, ws->x_stride);
                ws->xs[r] = ws->xs[first];
                memcpy(ws->xsum + (int64_t)r * ws->ng_h, ws->xsum + (int64_t)first * ws->ng_h,
                       4 * ws->ng_h);
                continue;
            }
            first = r;
            const uint8_t *src = (const uint8_t *)t->x + (int64_t)tok * H * (t->x_dtype == KT_DT_FP32 ? 4 : 2);
            if (s->fmt == KT_BF16 && t->x_dtype == KT_DT_BF16) {
                memcpy(dst, src, 2 * H);
                memset(dst + 2 * H, 0, 2 * (K - H));
                continue;
            }
            if (t->x_dtype == KT_DT_FP32) memcpy(tmp, src, 4 * (size_t)H);
            else if (t->x_dtype != KT_DT_BF16)
                for (int h = 0; h < H; h++) tmp[h] = src_at(src, t->x_dtype, h);
            else if (t->path >= KT_PATH_AVX512) kt_bf16_to_f32_row_avx512((const uint16_t *)src, H, tmp);
            else
                for (int h = 0; h < H; h++) tmp[h] = kt_bf16_to_f32(((const uint16_t *)src)[h]);
            for (int h = H; h < K; h++) tmp[h] = 0.0f;
            if (s->fmt == KT_FP32) memcpy(dst, tmp, 4 * K);
            else if (s->fmt == KT_BF16)
                for (int h = 0; h < K; h++) ((uint16_t *)dst)[h] = kt_f32_to_bf16(tmp[h]);
            else
                quantize_row(tmp, K, (int8_t *)dst, ws->xs + r,
                             s->fmt == KT_INT4 ? ws->xsum + (int64_t)r * ws->ng_h : NULL, s->group_size, t->path);
        }
    }
}

static kt_gemm_fn gemm_for(const kt_moe_task *t, int e) {
    if (t->ws->use_amx[e]) return kt_gemm_amx;
    return t->path >= KT_PATH_AVX512 ? kt_gemm_avx512 : kt_gemm_generic;
}

static void phase_gate_up(kt_moe_task *t, int item) {
    const kt_store *s = t->store;
    kt_workspace *ws = t->ws;
    const int a = item_owner(ws->pre1, ws->n_active, item), e = ws->active[a];
    const int r0 = ws->row_start[e], m = ws->count[e];
    const int p0 = 2 * (item - ws->pre1[a]) * ws->size1[a], p1 = imin(p0 + 2 * ws->size1[a], s->gu.n_pad / 16);
    kt_gemm_args g = {&s->gu, s->gu_w + e * s->gu.w_bytes, s->gu_s + e * s->gu.s_bytes,
                      s->gu.z_bytes ? s->gu_z + e * s->gu.z_bytes : NULL, p0, p1,
                      ws->xg + r0 * ws->x_stride, ws->x_stride, ws->xs + r0,
                      ws->xsum + (int64_t)r0 * ws->ng_h, m, ws->gu + r0 * ws->gu_stride, ws->gu_stride};
    if (ws->use_amx[e]) { /* silu(g) * u on each group of C tiles, still in L1 */
        g.act_bf16 = s->fmt == KT_BF16;
        g.act = g.act_bf16 ? ws->act + r0 * ws->act_stride : (uint8_t *)(ws->actf + r0 * ws->actf_stride);
        g.act_stride = g.act_bf16 ? ws->act_stride : 4 * ws->actf_stride;
        kt_gemm_amx(&g);
    } else {
        gemm_for(t, e)(&g);
        void (*silu)(const float *, const float *, float *, uint16_t *) =
            t->path >= KT_PATH_AVX512 ? kt_silu_mul16_avx512 : kt_silu_mul16_generic;
        for (int r = r0; r < r0 + m; r++) {
            const float *gu = ws->gu + r * ws->gu_stride;
            for (int q = p0 / 2; q < p1 / 2; q++) {
                const float *gp = gu + q * 32, *up = gp + 16;
                if (s->fmt == KT_BF16) silu(gp, up, NULL, (uint16_t *)(ws->act + r * ws->act_stride) + q * 16);
                else if (s->fmt == KT_FP32) silu(gp, up, (float *)(ws->act + r * ws->act_stride) + q * 16, NULL);
                else silu(gp, up, ws->actf + r * ws->actf_stride + q * 16, NULL);
            }
        }
    }
    if (ws->fuse_quant) /* this item made whole act rows, still in L2: phase_quant's work */
        for (int r = r0; r < r0 + m; r++)
            quantize_row(ws->actf + r * ws->actf_stride, s->down.k_pad, (int8_t *)(ws->act + r * ws->act_stride),
                         ws->as + r, s->fmt == KT_INT4 ? ws->asum + (int64_t)r * ws->ng_i : NULL,
                         s->group_size, t->path);
}

static void phase_quant(kt_moe_task *t, int item) {
    const kt_store *s = t->store;
    kt_workspace *ws = t->ws;
    const int r1 = imin(item * 16 + 16, ws->rows);
    for (int r = item * 16; r < r1; r++) {
        if (ws->row_token[r] < 0) continue;
        quantize_row(ws->actf + r * ws->actf_stride, s->down.k_pad, (int8_t *)(ws->act + r * ws->act_stride),
                     ws->as + r, s->fmt == KT_INT4 ? ws->asum + (int64_t)r * ws->ng_i : NULL,
                     s->group_size, t->path);
    }
}

static void phase_down(kt_moe_task *t, int item) {
    const kt_store *s = t->store;
    kt_workspace *ws = t->ws;
    const int a = item_owner(ws->pre3, ws->n_active, item), e = ws->active[a];
    const int r0 = ws->row_start[e], m = ws->count[e];
    const int p0 = 2 * (item - ws->pre3[a]) * ws->size3[a], p1 = imin(p0 + 2 * ws->size3[a], s->down.n_pad / 16);
    kt_gemm_args g = {&s->down, s->down_w + e * s->down.w_bytes, s->down_s + e * s->down.s_bytes,
                      s->down.z_bytes ? s->down_z + e * s->down.z_bytes : NULL, p0, p1,
                      ws->act + r0 * ws->act_stride, ws->act_stride, ws->as + r0,
                      ws->asum + (int64_t)r0 * ws->ng_i, m, ws->y + r0 * ws->y_stride, ws->y_stride};
    gemm_for(t, e)(&g);
}

static void phase_combine(kt_moe_task *t, int item, int tid) {
    const kt_store *s = t->store;
    kt_workspace *ws = t->ws;
    const int H = s->hidden, k = t->top_k;
    const int t0 = item * 4, t1 = imin(t0 + 4, ws->num_tokens);
    float *acc = ws->scratch + (int64_t)tid * ws->scratch_stride;
    const float *rows[k > 0 ? k : 1]; /* k is small (top-k) */
    float w[k > 0 ? k : 1];
    for (int tok = t0; tok < t1; tok++) {
        int n = 0; /* the token's computed pairs, in top-k order */
        for (int j = 0; j < k; j++) {
            int r = ws->pair_row[tok * k + j];
            if (r < 0) continue;
            rows[n] = ws->y + r * ws->y_stride;
            w[n++] = t->topk_weights[tok * k + j];
        }
        float *of = t->x_dtype == KT_DT_FP32 ? (float *)t->out + (int64_t)tok * H : NULL;
        uint16_t *ob = of ? NULL : (uint16_t *)t->out + (int64_t)tok * H;
        if (t->path >= KT_PATH_AVX512) kt_combine_row_avx512(rows, w, n, H, of, ob);
        else kt_combine_row_generic(rows, w, n, H, acc, of, ob);
    }
}

/* Phase profile (kt_moe_profile): per worker and phase, nanoseconds spent on items and
 * waiting at the barrier after them, summed over the calls made while it is on. Off: one
 * relaxed load per call. */
#define PROFILE_THREADS 256
static _Atomic int profile_on;
static int64_t profile_ns[PROFILE_THREADS][PHASES][2];
static _Atomic int64_t profile_calls;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void kt_moe_profile(int on) {
    if (on) {
        memset(profile_ns, 0, sizeof(profile_ns));
        atomic_store(&profile_calls, 0);
    }
    atomic_store(&profile_on, on);
}

int64_t kt_moe_profile_read(int64_t *out, int max_threads) {
    const int n = max_threads < PROFILE_THREADS ? max_threads : PROFILE_THREADS;
    memcpy(out, profile_ns, sizeof(int64_t) * PHASES * 2 * (size_t)n);
    return atomic_load(&profile_calls);
}

/* Run by every worker and, when it helps, by the caller (tid = workers, joining at any
 * phase). A phase starts when every item of the one before has completed: counting items,
 * not threads, lets a thread arrive late (or be preempted between items) without holding
 * the others at a barrier. */
static void moe_job(void *ctx, int tid, int nthreads) {
    (void)nthreads;
    kt_moe_task *t = ctx;
    kt_workspace *ws = t->ws;
    const int prof = atomic_load_explicit(&profile_on, memory_order_relaxed) && tid < PROFILE_THREADS;
    int64_t t0 = prof ? now_ns() : 0;
    if (prof && tid == 0) atomic_fetch_add(&profile_calls, 1);
    for (int ph = 0; ph < PHASES; ph++) {
        const int n = ws->items[ph];
        if (n == 0) continue;
        for (;;) {
            int i = atomic_fetch_add_explicit(&ws->next[ph], 1, memory_order_relaxed);
            if (i >= n) break;
            switch (ph) {
            case 0: phase_gather(t, i, tid); break;
            case 1: phase_gate_up(t, i); break;
            case 2: phase_quant(t, i); break;
            case 3: phase_down(t, i); break;
            default: phase_combine(t, i, tid); break;
            }
            atomic_fetch_add_explicit(&ws->completed[ph], 1, memory_order_release);
        }
        int64_t t1 = prof ? now_ns() : 0;
        if (ph < ws->last_phase) /* barrier: the next phase reads what this one wrote */
            kt_spin_until((const int *)&ws->completed[ph], n);
        if (prof) {
            int64_t t2 = now_ns();
            profile_ns[tid][ph][0] += t1 - t0;
            profile_ns[tid][ph][1] += t2 - t1;
            t0 = t2;
        }
    }
}

/* ---------------------------------------------------------------- submit / sync */

int kt_moe_submit(kt_moe_task *t) {
    const kt_store *s = t->store;
    const int E = s->num_experts, k = t->top_k;
    const int T = t->live_tokens ? imax(0, imin(*t->live_tokens, t->num_tokens)) : t->num_tokens;
    t->helper = kt_pool_caller_may_help(t->pool); /* sync() computes too: scratch and split */
    const int nthreads = kt_pool_size(t->pool) + t->helper;
    if (!t->ws && !(t->ws = calloc(1, sizeof(kt_workspace)))) return t->status = -1;
    kt_workspace *ws = t->ws;
    if (ws_reserve(ws, s, T, k, 0, nthreads)) return t->status = -1;
    /* route: count the pairs of each CPU-resident expert */
    memset(ws->count, 0, 4 * E);
    for (int64_t i = 0; i < (int64_t)T * k; i++) {
        int64_t e = t->ids_int64 ? ((const int64_t *)t->topk_ids)[i] : ((const int32_t *)t->topk_ids)[i];
        int ok = e >= 0 && e < E && !(t->gpu_mask && t->gpu_mask[e]);
        ws->pair_row[i] = ok ? (int32_t)e : -1; /* the expert for now, its row below */
        if (ok) ws->count[e]++;
    }
    const int amx_ok = t->path == KT_PATH_AMX && (s->fmt == KT_BF16 || s->fmt == KT_INT8
                                                  || (s->fmt == KT_INT4 && s->group_size % 64 == 0));
    int rows = 0, n_active = 0, max_count = 0;
    for (int e = 0; e < E; e++) {
        if (!ws->count[e]) continue;
        ws->use_amx[e] = amx_ok && ws->count[e] >= t->amx_min_tokens;
        if (ws->use_amx[e]) rows = (int)roundup(rows, 16);
        ws->row_start[e] = rows;
        /* AMX reads and writes whole 16-row tiles, so an AMX expert owns its count rounded
         * up to 16: its tail tile must not land on the next expert's rows, which another
         * worker computes at the same time (that was a race: wrong, timing-dependent rows). */
        rows += ws->use_amx[e] ? (int)roundup(ws->count[e], 16) : ws->count[e];
        ws->active[n_active++] = e;
        max_count = imax(max_count, ws->count[e]);
    }
    if (n_active == 0) { /* every pair on the GPU, or no live row: zeros, without the pool
                          * (waking its threads costs more than a decode layer's GPU work) */
        memset(t->out, 0, (size_t)T * s->hidden * (t->x_dtype == KT_DT_FP32 ? 4 : 2));
        t->running = 0;
        return t->status = 0;
    }
    rows = (int)roundup(rows, 16); /* every AMX range already ends on a tile boundary */
    if (ws_reserve(ws, s, T, k, rows, nthreads)) return t->status = -1;
    ws->rows = rows;
    ws->num_tokens = T;
    for (int r = 0; r < rows; r++) ws->row_token[r] = -1;
    for (int e = 0; e < E; e++) ws->count[e] = 0; /* reused as a cursor */
    for (int64_t i = 0; i < (int64_t)T * k; i++) {
        int e = ws->pair_row[i];
        if (e < 0) continue;
        int r = ws->row_start[e] + ws->count[e]++;
        ws->pair_row[i] = r;
        ws->row_token[r] = (int)(i / k);
    }
    ws->n_active = n_active;
    /* split: about 8 items per thread in the big phases, in panel pairs (gate/up: a gate
     * panel and its up panel; down: AMX takes its panels two at a time) */
    ws->items[0] = n_active ? (T + 7) / 8 : 0;
    ws->items[1] = split_items(ws, s->gu.n_pad / 32, 8 * nthreads, ws->pre1, ws->size1);
    ws->fuse_quant = s->fmt >= KT_INT8 && ws->items[1] == n_active;
    ws->items[2] = n_active && s->fmt >= KT_INT8 && !ws->fuse_quant ? (rows + 15) / 16 : 0;
    ws->items[3] = split_items(ws, s->down.n_pad / 32, 8 * nthreads, ws->pre3, ws->size3);
    ws->items[4] = (T + 3) / 4;
    ws->last_phase = 4;
    for (int ph = 0; ph < PHASES; ph++) {
        atomic_store(&ws->next[ph], 0);
        atomic_store(&ws->completed[ph], 0);
    }
    (void)max_count;
    t->status = 0;
    t->running = 1;
    kt_pool_start(t->pool, moe_job, t);
    return 0;
}

void kt_moe_sync(kt_moe_task *t) {
    if (t->status == 0 && t->running) {
        if (t->helper) moe_job(t, kt_pool_size(t->pool), kt_pool_size(t->pool) + 1);
        kt_pool_wait(t->pool);
    }
    t->running = 0;
}

void kt_moe_submit_host(void *task) { kt_moe_submit((kt_moe_task *)task); }
void kt_moe_sync_host(void *task) { kt_moe_sync((kt_moe_task *)task); }
