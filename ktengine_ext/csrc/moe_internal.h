/* Helpers shared by moe.c (the call) and pack.c (the packed layout); private to csrc/. */
#ifndef KT_MOE_INTERNAL_H
#define KT_MOE_INTERNAL_H

#include <stdint.h>

#include "kernels.h"
#include "moe.h"

static inline int64_t roundup(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* Round to nearest even for |v| < 2^22 without a libm call (nearbyintf is a call on
 * baseline x86-64 and dominated prefill); the volatile-free form vectorizes. */
static inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* Element i of a checkpoint or activation row of dtype KT_DT_*, as fp32. */
static inline float src_at(const void *src, int dtype, int64_t i) {
    if (dtype == KT_DT_FP32) return ((const float *)src)[i];
    if (dtype == KT_DT_BF16) return kt_bf16_to_f32(((const uint16_t *)src)[i]);
    return kt_fp16_to_f32(((const uint16_t *)src)[i]);
}

#endif
