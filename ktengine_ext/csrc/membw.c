/* Memory helpers: huge-page advice for the big buffers, and the DRAM read bandwidth probe,
 * measured the way the decode kernels read weights: every pool worker streams its own
 * contiguous slice with 64-byte loads (AVX512 when present). For benchmarks. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdatomic.h>
#include <stdint.h>

#include "membw.h"

#include <sys/mman.h>

int kt_advise_huge_pages(void *p, int64_t bytes) {
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi <= lo) return 0;
    return madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
}

typedef struct {
    const uint8_t *buf;
    int64_t bytes;
    int use_avx512;
    _Atomic uint64_t sink;
} read_job;

__attribute__((target("avx512f"))) static uint64_t read_avx512(const uint8_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a0);
}

static uint64_t read_generic(const uint8_t *p, int64_t n) {
    const uint64_t *q = (const uint64_t *)p;
    uint64_t acc = 0;
    for (int64_t i = 0; i < n / 8; i++) acc ^= q[i];
    return acc;
}

static void read_run(void *ctx, int tid, int nthreads) {
    read_job *j = ctx;
    int64_t chunk = (j->bytes / nthreads) & ~(int64_t)255;
    const uint8_t *p = j->buf + chunk * tid;
    uint64_t v = j->use_avx512 ? read_avx512(p, chunk) : read_generic(p, chunk);
    atomic_fetch_xor(&j->sink, v);
}

void kt_read_buffer(kt_pool *pool, const void *buf, int64_t bytes, int use_avx512) {
    read_job j = {buf, bytes, use_avx512, 0};
    kt_pool_run(pool, read_run, &j);
}
