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

struct kt_dispatch {
    volatile int32_t *ready, *done;
    int capacity;
    kt_moe_task *tasks[MAX_LAYERS];
    int n;
    _Atomic uint32_t gen;     /* futex word: bumped to start a run */
    _Atomic uint32_t idle;    /* futex word: 1 when no run is in progress */
    _Atomic int completed;    /* layers of the current run done */
    _Atomic int abort_run, stop;
    int hold_hot;             /* keep the experts' workers awake for a whole run */
    pthread_t thread;
};

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static void run_layers(kt_dispatch *d) {
    for (int i = 0; i < d->n; i++) {
        while (__atomic_load_n(&d->ready[i], __ATOMIC_ACQUIRE) != 1) {
            if (atomic_load_explicit(&d->abort_run, memory_order_relaxed)) return;
            cpu_relax();
        }
        d->ready[i] = 0;
        if (d->tasks[i] && kt_moe_submit(d->tasks[i]) == 0) kt_moe_sync(d->tasks[i]);
        __atomic_store_n(&d->done[i], 1, __ATOMIC_RELEASE);
        atomic_store_explicit(&d->completed, i + 1, memory_order_release);
    }
}

static void *dispatcher_main(void *arg) {
    kt_dispatch *d = arg;
    /* gen is 0 at creation; reading it here instead would lose a run started before this
     * thread got going (its caller would then wait for it forever) */
    uint32_t seen = 0;
    for (;;) {
        while (atomic_load_explicit(&d->gen, memory_order_acquire) == seen) {
            if (atomic_load(&d->stop)) return NULL;
            futex_wait(&d->gen, seen);
        }
        seen = atomic_load(&d->gen);
        if (atomic_load(&d->stop)) return NULL;
        /* the experts' workers stay awake for the whole step: between two layers the GPU
         * works for longer than they spin, and a futex wake-up per layer cost more than the
         * layer's CPU work at high GPU ratios; starting them now also hides the first one's */
        kt_pool *pool = NULL;
        for (int i = 0; i < d->n && !pool && d->hold_hot; i++)
            if (d->tasks[i]) pool = d->tasks[i]->pool;
        if (pool) kt_pool_hold_hot(pool, 1);
        run_layers(d);
        if (pool) kt_pool_hold_hot(pool, 0);
        atomic_store_explicit(&d->idle, 1, memory_order_release);
        futex_wake(&d->idle);
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
    atomic_store(&d->idle, 1);
    if (pthread_create(&d->thread, NULL, dispatcher_main, d) != 0) {
        free(d);
        return NULL;
    }
    return d;
}

int kt_dispatch_wait(kt_dispatch *d) {
    while (atomic_load_explicit(&d->idle, memory_order_acquire) == 0) futex_wait(&d->idle, 0);
    return atomic_load(&d->completed);
}

void kt_dispatch_start(kt_dispatch *d, kt_moe_task **tasks, int n) {
    kt_dispatch_wait(d);
    if (n > d->capacity) n = d->capacity;
    memcpy(d->tasks, tasks, sizeof(tasks[0]) * (size_t)n);
    d->n = n;
    atomic_store(&d->completed, 0);
    atomic_store(&d->abort_run, 0);
    atomic_store_explicit(&d->idle, 0, memory_order_release);
    atomic_fetch_add_explicit(&d->gen, 1, memory_order_release);
    futex_wake(&d->gen);
}

void kt_dispatch_abort(kt_dispatch *d) {
    atomic_store(&d->abort_run, 1);
    kt_dispatch_wait(d);
}

void kt_dispatch_destroy(kt_dispatch *d) {
    if (!d) return;
    kt_dispatch_abort(d);
    atomic_store(&d->stop, 1);
    atomic_fetch_add(&d->gen, 1);
    futex_wake(&d->gen);
    pthread_join(d->thread, NULL);
    free(d);
}
