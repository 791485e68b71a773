/* The fused MoE call over packed CPU experts, its packed weight layout and its task.
 *
 * out[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t),  e = ids[t,j] not on the GPU.
 *
 * Packed layout ("panels"). A matrix W [N, K] (out x in, as in Hugging Face) is padded to
 * [n_pad, k_pad] and cut into panels of 16 output columns. A panel is a run of 64-byte rows;
 * row r holds the 16 columns for a few consecutive k (kpack: fp32 1, bf16 2, int8 4):
 *     byte (r * 64 + n * 4 + j * elem) = W[p*16 + n][r*kpack + j]
 * which is exactly an AMX B tile (16 rows = 32 bf16 or 64 int8 k) and what AVX512 wants:
 * one 64-byte load times a broadcast of x's kpack values gives 16 outputs, no horizontal sums.
 * int4 stores two int8 rows in one: low nibbles row 2c, high nibbles row 2c+1 (unsigned q in
 * 0..15, w = scale * (q - zero); symmetric: zero = 8).
 * gate and up are packed as one matrix of 2 * i_pad columns with panels interleaved
 * (gate panel q, up panel q, ...), so one stream of weights gives 16 activations at a time.
 * Panels are contiguous, so an item's block of panels is one sequential read.
 *
 * Per-column data: int8: fp32 scale [n_pad], int32 column sum [n_pad] (for the u8 trick of
 * VNNI); int4: fp16 scale [n_pad/16][k_pad/G][16] and, if asymmetric, u8 zero, same shape.
 */
#ifndef KT_MOE_H
#define KT_MOE_H

#include <stdint.h>

#include "thread_pool.h"

enum { KT_FP32 = 0, KT_BF16 = 1, KT_INT8 = 2, KT_INT4 = 3 };          /* weight formats */
enum { KT_PATH_GENERIC = 0, KT_PATH_AVX512 = 1, KT_PATH_AMX = 2 };     /* kernel paths */
enum { KT_DT_FP32 = 0, KT_DT_BF16 = 1, KT_DT_FP16 = 2 };               /* tensor dtypes */

typedef struct {
    int fmt, group_size, asym;
    int n, k;             /* logical sizes */
    int n_pad, k_pad;     /* n_pad % 64 == 0, k_pad % max(64, group) == 0 */
    int64_t panel_bytes;  /* bytes of one 16-column panel */
    int64_t w_bytes;      /* packed weight bytes per expert */
    int64_t s_bytes;      /* scale bytes per expert (0 for fp32/bf16) */
    int64_t z_bytes;      /* column sums (int8) or zeros (int4 asym) per expert */
} kt_mat_layout;

typedef struct {
    int fmt, group_size, asym;
    int num_experts, hidden, inter;
    kt_mat_layout gu, down;
    /* [num_experts * bytes] each, 64-byte aligned */
    uint8_t *gu_w, *gu_s, *gu_z, *down_w, *down_s, *down_z;
} kt_store;

/* Fills a layout; returns 0, or -1 for a bad format/group. */
int kt_mat_layout_init(kt_mat_layout *L, int fmt, int group_size, int asym, int n, int k);
void kt_store_init(kt_store *s, int fmt, int group_size, int asym, int E, int H, int I);

/* Packs experts [e0, e1) of one layer from Hugging Face tensors gate/up [E, I, H], down [E, H, I]
 * of dtype src_dtype into the store's buffers (zeroed beforehand by the caller). Runs on the pool. */
void kt_pack_layer(kt_pool *pool, const kt_store *s, const void *gate, const void *up,
                   const void *down, int src_dtype);
/* What the packed weights of expert e are: gate, up [I, H], down [H, I] in fp32. */
void kt_dequant_expert(const kt_store *s, int e, float *gate, float *up, float *down);

/* One fused call. Python (or a CUDA host function) fills the inputs, then submit/sync. */
typedef struct kt_workspace kt_workspace;
typedef struct {
    /* set once */
    const kt_store *store;
    kt_pool *pool;
    int path;             /* KT_PATH_*: the best path allowed */
    int amx_min_tokens;   /* experts with at least this many tokens use AMX (path AMX only) */
    /* set per call */
    const void *x;        /* [T, H] */
    int x_dtype;          /* KT_DT_FP32 or KT_DT_BF16; out has the same */
    int num_tokens, top_k;
    const void *topk_ids; /* [T, k] */
    int ids_int64;
    const float *topk_weights;  /* [T, k] */
    const uint8_t *gpu_mask;    /* [E] bool, or NULL; read at submit */
    void *out;                  /* [T, H] */
    const int32_t *live_tokens; /* or NULL; else T = min(*live_tokens, num_tokens), read at
                                 * submit: a CUDA graph captured for T rows runs fewer */
    /* private */
    kt_workspace *ws;
    int status;
    int running;                /* the pool runs this call (sync waits for it) */
    int helper;                 /* sync may compute beside the workers (room made at submit) */
} kt_moe_task;

int kt_moe_submit(kt_moe_task *task);  /* returns 0, or -1 when out of memory (nothing started) */
/* Waits for the call; when the pool leaves a core free (kt_pool_caller_may_help at submit),
 * the calling thread first takes the items still open, as one more worker. */
void kt_moe_sync(kt_moe_task *task);
void kt_moe_free(kt_moe_task *task);   /* frees the workspace */
/* For a CUDA host function: void fn(void *task). */
void kt_moe_submit_host(void *task);
void kt_moe_sync_host(void *task);

/* Phase profile, for benchmarks: on (resets the sums) or off; read copies, per worker
 * [max_threads][5 phases][work ns, barrier wait ns], the sums over the calls made while on
 * (gather, gate/up, quant, down, combine) and returns how many calls that was. */
void kt_moe_profile(int on);
int64_t kt_moe_profile_read(int64_t *out, int max_threads);

#endif
