#ifndef KT_MEMBW_H
#define KT_MEMBW_H
#include <stdint.h>

#include "thread_pool.h"

/* Reads bytes of buf (64-byte aligned) once, split over the pool's workers. */
void kt_read_buffer(kt_pool *pool, const void *buf, int64_t bytes, int use_avx512);

#endif
