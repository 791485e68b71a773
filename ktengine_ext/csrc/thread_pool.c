#define _GNU_SOURCE
#include "thread_pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct kt_pool {
    int num_threads;
    int spin_us;
    int caller_spins;           /* fewer workers than usable CPUs */
    _Atomic int caller_helps;   /* a waiting caller may compute beside the workers */
    pthread_t *threads;
    _Atomic uint32_t gen;       /* futex word: bumped to start a job */
    _Atomic int sleepers;       /* workers inside futex_wait on gen */
    _Atomic int remaining;      /* workers still inside the current job */
    _Atomic uint32_t done;      /* futex word: 1 when no job runs */
    _Atomic int waiters;        /* callers inside futex_wait on done */
    _Atomic int stop;
    _Atomic int hot;            /* > 0: idle workers spin without sleeping (kt_pool_hold_hot) */
    kt_job_fn fn;
    void *ctx;
};

typedef struct {
    kt_pool *pool;
    int tid;
} worker_arg;

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Spins up to spin_us while *word == value; returns 1 if it changed. */
static int spin_while_equal(_Atomic uint32_t *word, uint32_t value, int spin_us) {
    int64_t deadline = -1;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != value) return 1;
        cpu_relax();
        if ((i & 255) == 255) {
            int64_t t = now_us();
            if (deadline < 0) deadline = t + spin_us;
            else if (t >= deadline) return 0;
        }
    }
}

static void *worker_main(void *p) {
    worker_arg *arg = p;
    kt_pool *pool = arg->pool;
    int tid = arg->tid;
    free(arg);
    uint32_t seen = 0;
    for (;;) {
        while (atomic_load(&pool->gen) == seen) {
            if (spin_while_equal(&pool->gen, seen, pool->spin_us)) break;
            if (atomic_load(&pool->hot) > 0 && !atomic_load(&pool->stop)) continue;
            atomic_fetch_add(&pool->sleepers, 1);
            /* seq_cst: kt_pool_hold_hot stores hot, then reads sleepers; this thread adds
             * itself to sleepers, then reads hot: one of the two sees the other */
            if (atomic_load(&pool->hot) > 0 && !atomic_load(&pool->stop)) {
                atomic_fetch_sub(&pool->sleepers, 1);
                continue;
            }
            futex_wait(&pool->gen, seen);
            atomic_fetch_sub(&pool->sleepers, 1);
        }
        seen = atomic_load(&pool->gen);
        if (atomic_load(&pool->stop)) break;
        pool->fn(pool->ctx, tid, pool->num_threads);
        if (atomic_fetch_sub(&pool->remaining, 1) == 1) {
            atomic_store(&pool->done, 1);
            if (atomic_load(&pool->waiters) > 0) futex_wake(&pool->done);
        }
    }
    return NULL;
}

kt_pool *kt_pool_create(int num_threads, int spin_us) {
    if (num_threads < 1) num_threads = 1;
    kt_pool *pool = calloc(1, sizeof(*pool));
    if (!pool) return NULL;
    pool->num_threads = num_threads;
    pool->spin_us = spin_us < 0 ? 0 : spin_us;
    cpu_set_t cpus;
    int usable = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
    pool->caller_spins = num_threads < usable;
    atomic_store(&pool->caller_helps, 1);
    atomic_store(&pool->done, 1);
    pool->threads = calloc(num_threads, sizeof(pthread_t));
    for (int i = 0; i < num_threads; i++) {
        worker_arg *arg = malloc(sizeof(*arg));
        arg->pool = pool;
        arg->tid = i;
        pthread_create(&pool->threads[i], NULL, worker_main, arg);
    }
    return pool;
}

void kt_pool_destroy(kt_pool *pool) {
    if (!pool) return;
    kt_pool_wait(pool);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->gen, 1);
    futex_wake(&pool->gen);
    for (int i = 0; i < pool->num_threads; i++) pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    free(pool);
}

int kt_pool_size(const kt_pool *pool) { return pool->num_threads; }

int kt_pool_caller_may_help(const kt_pool *pool) {
    return pool->caller_spins && atomic_load((_Atomic int *)&pool->caller_helps);
}

void kt_pool_set_caller_helps(kt_pool *pool, int on) { atomic_store(&pool->caller_helps, on); }

void kt_pool_hold_hot(kt_pool *pool, int on) {
    if (!pool->caller_spins) return; /* workers on every core: spinning would starve others */
    if (on) {
        if (atomic_fetch_add(&pool->hot, 1) == 0 && atomic_load(&pool->sleepers) > 0)
            futex_wake(&pool->gen); /* sleepers wake, see gen unchanged, spin while hot */
    } else {
        atomic_fetch_sub(&pool->hot, 1);
    }
}

void kt_pool_start(kt_pool *pool, kt_job_fn fn, void *ctx) {
    kt_pool_wait(pool);
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->remaining, pool->num_threads);
    atomic_store(&pool->done, 0);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: pairs with the sleepers check below */
    if (atomic_load(&pool->sleepers) > 0) futex_wake(&pool->gen);
}

void kt_pool_wait(kt_pool *pool) {
    /* With a core of its own the caller spins (lowest latency); when the workers take every
     * core it sleeps at once, so that it never takes a core from a worker mid-job. */
    if (pool->caller_spins) spin_while_equal(&pool->done, 0, pool->spin_us);
    while (atomic_load(&pool->done) == 0) {
        atomic_fetch_add(&pool->waiters, 1);
        futex_wait(&pool->done, 0);
        atomic_fetch_sub(&pool->waiters, 1);
    }
}

void kt_pool_run(kt_pool *pool, kt_job_fn fn, void *ctx) {
    kt_pool_start(pool, fn, ctx);
    kt_pool_wait(pool);
}

void kt_spin_until(const int *counter, int target) {
    const _Atomic int *c = (const _Atomic int *)counter;
    for (unsigned i = 0; atomic_load_explicit(c, memory_order_acquire) < target; i++) {
        cpu_relax();
        if ((i & 4095) == 4095) sched_yield(); /* oversubscribed machine: let others run */
    }
}
