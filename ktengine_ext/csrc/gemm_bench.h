#ifndef KT_GEMM_BENCH_H
#define KT_GEMM_BENCH_H
#include <stdint.h>

#include "moe.h"

/* Times the expert GEMM alone on the calling thread: m activation rows (random, laid out as
 * moe.c lays them out) times matrix `which` (0: gate/up, 1: down) of experts e0, e0+1, ...,
 * e0+n_experts-1 in turn, reps calls; path KT_PATH_*. Returns seconds per call, or -1. */
double kt_time_gemm(const kt_store *s, int which, int path, int m, int e0, int n_experts, int reps);
/* Back-to-back TDPBF16PS (int8: TDPBSSD) on four accumulators, no loads: the core's AMX peak
 * in TFLOP/s (0 without AMX permission). */
double kt_amx_peak_tflops(int int8);

#endif
