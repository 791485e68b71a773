/* The extension's own worker threads.
 *
 * A job is one function run once on every worker (fn(ctx, tid, nthreads)); the job splits
 * its work itself (moe.c hands out items through atomic counters). kt_pool_start() returns
 * at once; kt_pool_wait() blocks until every worker has returned from fn. Neither needs the
 * GIL or any Python object, so a CUDA host function can call them.
 *
 * Idle workers spin for spin_us microseconds after a job (the next MoE layer usually comes
 * within that time), then sleep on a futex, so an idle engine costs no CPU.
 */
#ifndef KT_THREAD_POOL_H
#define KT_THREAD_POOL_H

typedef void (*kt_job_fn)(void *ctx, int tid, int nthreads);
typedef struct kt_pool kt_pool;

kt_pool *kt_pool_create(int num_threads, int spin_us);
void kt_pool_destroy(kt_pool *pool);
int kt_pool_size(const kt_pool *pool);
/* on: idle workers wake now and spin until the matching off, instead of sleeping after
 * spin_us (a CUDA graph step holds them hot so that no layer waits for a wake-up). Nests. */
void kt_pool_hold_hot(kt_pool *pool, int on);
/* Starts fn on every worker; waits first for a job still running. */
void kt_pool_start(kt_pool *pool, kt_job_fn fn, void *ctx);
/* Waits for the job started last (returns at once if none runs). */
void kt_pool_wait(kt_pool *pool);
/* start + wait */
void kt_pool_run(kt_pool *pool, kt_job_fn fn, void *ctx);
/* 1 when a caller waiting for a job may take part in it (a job that supports it: moe.c):
 * the pool leaves a core free and kt_pool_set_caller_helps has not turned it off. */
int kt_pool_caller_may_help(const kt_pool *pool);
void kt_pool_set_caller_helps(kt_pool *pool, int on);
/* Spin-then-yield until *counter reaches target (a barrier helper for jobs). */
void kt_spin_until(const int *counter, int target);

#endif
