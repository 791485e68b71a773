#ifndef KT_MEMBW_H
#define KT_MEMBW_H
#include <stdint.h>

#include "thread_pool.h"

/* Asks for 2 MiB pages over the 2 MiB-aligned part of [p, p + bytes), before it is first
 * touched: the prefill kernels stream weights and activations with AMX tile loads, 16 rows
 * at a time, and on 4 KiB pages the page walks cost them about a third of their speed
 * (bench/amx_gemm.py, cold weights). Advice only: returns 0, or -1 if the kernel refused. */
int kt_advise_huge_pages(void *p, int64_t bytes);

/* Reads bytes of buf (64-byte aligned) once, split over the pool's workers. */
void kt_read_buffer(kt_pool *pool, const void *buf, int64_t bytes, int use_avx512);

#endif
