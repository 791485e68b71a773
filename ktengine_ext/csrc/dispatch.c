#define _GNU_SOURCE
#include "dispatch.h"
#include "thread_pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_LAYERS 1024
#define RING 4 /* runs queued at once: a step in flight and the next one launched */

struct kt_run {
    kt_moe_task *tasks[MAX_LAYERS];
    int n;
    _Atomic int completed; /* layers of this run done */
};

struct kt_dispatch {
    volatile int32_t *ready, *done;
    int capacity;
    struct kt_run runs[RING];
    _Atomic uint32_t submitted; /* futex word: runs started */
    _Atomic uint32_t finished;  /* futex word: runs ended */
    _Atomic int abort_run, stop;
    int hold_hot;               /* keep the experts' workers awake while runs are queued */
    pthread_t thread;
};

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static void run_layers(kt_dispatch *d, struct kt_run *r) {
    for (int i = 0; i < r->n; i++) {
        while (__atomic_load_n(&d->ready[i], __ATOMIC_ACQUIRE) != 1) {
            if (atomic_load_explicit(&d->abort_run, memory_order_relaxed)) return;
            cpu_relax();
        }
        d->ready[i] = 0;
        if (r->tasks[i] && kt_moe_submit(r->tasks[i]) == 0) kt_moe_sync(r->tasks[i]);
        __atomic_store_n(&d->done[i], 1, __ATOMIC_RELEASE);
        atomic_store_explicit(&r->completed, i + 1, memory_order_release);
    }
}

static kt_pool *pool_of(struct kt_run *r) {
    for (int i = 0; i < r->n; i++)
        if (r->tasks[i]) return r->tasks[i]->pool;
    return NULL;
}

static void *dispatcher_main(void *arg) {
    kt_dispatch *d = arg;
    kt_pool *hot = NULL;
    for (;;) {
        uint32_t f = atomic_load_explicit(&d->finished, memory_order_relaxed);
        while (atomic_load_explicit(&d->submitted, memory_order_acquire) == f) {
            if (atomic_load(&d->stop)) return NULL;
            futex_wait(&d->submitted, f);
        }
        if (atomic_load(&d->stop)) return NULL;
        struct kt_run *r = &d->runs[f % RING];
        /* the experts' workers stay awake while runs follow each other: between two layers
         * the GPU works for longer than they spin, and a futex wake-up per layer cost more
         * than the layer's CPU work at high GPU ratios; starting them now also hides the
         * first one's */
        kt_pool *pool = d->hold_hot ? pool_of(r) : NULL;
        if (pool != hot) {
            if (hot) kt_pool_hold_hot(hot, 0);
            if (pool) kt_pool_hold_hot(pool, 1);
            hot = pool;
        }
        run_layers(d, r);
        if (hot && atomic_load_explicit(&d->submitted, memory_order_acquire) == f + 1) {
            kt_pool_hold_hot(hot, 0); /* nothing queued behind this run */
            hot = NULL;
        }
        atomic_store_explicit(&d->finished, f + 1, memory_order_release);
        futex_wake(&d->finished);
    }
}

kt_dispatch *kt_dispatch_create(int32_t *ready, int32_t *done, int capacity, int hold_hot) {
    if (capacity < 0 || capacity > MAX_LAYERS) return NULL;
    kt_dispatch *d = calloc(1, sizeof(*d));
    if (!d) return NULL;
    d->ready = ready;
    d->done = done;
    d->capacity = capacity;
    d->hold_hot = hold_hot;
    if (pthread_create(&d->thread, NULL, dispatcher_main, d) != 0) {
        free(d);
        return NULL;
    }
    return d;
}

/* true while run `id` has not ended (ids wrap around with the counters) */
static int pending(kt_dispatch *d, uint32_t id) {
    return (int32_t)(atomic_load_explicit(&d->finished, memory_order_acquire) - id) <= 0;
}

static void wait_finished_past(kt_dispatch *d, uint32_t id) {
    for (;;) {
        uint32_t f = atomic_load_explicit(&d->finished, memory_order_acquire);
        if ((int32_t)(f - id) > 0) return;
        futex_wait(&d->finished, f);
    }
}

int kt_dispatch_wait_run(kt_dispatch *d, uint32_t id) {
    if (pending(d, id)) wait_finished_past(d, id);
    return atomic_load(&d->runs[id % RING].completed);
}

int kt_dispatch_wait(kt_dispatch *d) {
    uint32_t s = atomic_load(&d->submitted);
    if (s == 0) return 0;
    return kt_dispatch_wait_run(d, s - 1);
}

uint32_t kt_dispatch_start(kt_dispatch *d, kt_moe_task **tasks, int n) {
    uint32_t s = atomic_load(&d->submitted);
    if (s - atomic_load(&d->finished) >= RING) wait_finished_past(d, s - RING);
    if (n > d->capacity) n = d->capacity;
    struct kt_run *r = &d->runs[s % RING];
    memcpy(r->tasks, tasks, sizeof(tasks[0]) * (size_t)n);
    r->n = n;
    atomic_store(&r->completed, 0);
    atomic_store_explicit(&d->submitted, s + 1, memory_order_release);
    futex_wake(&d->submitted);
    return s;
}

void kt_dispatch_abort(kt_dispatch *d) {
    atomic_store(&d->abort_run, 1);
    kt_dispatch_wait(d); /* every queued run returns at its first missing flag */
    atomic_store(&d->abort_run, 0);
}

void kt_dispatch_destroy(kt_dispatch *d) {
    if (!d) return;
    kt_dispatch_abort(d);
    atomic_store(&d->stop, 1);
    atomic_fetch_add(&d->submitted, 1);
    futex_wake(&d->submitted);
    pthread_join(d->thread, NULL);
    free(d);
}
