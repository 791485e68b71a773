/* A CUDA graph step's CPU experts without host functions.
 *
 * The stream writes ready[i] = 1 once MoE layer i's inputs are in pinned memory, and waits for
 * done[i] == 1 before it reads the layer's output; done[i] goes back to 0 before the next
 * ready[i]. The stream does this with kernels (ktengine/moe/handoff_triton.py: done[i] = 0 is
 * written before ready[i] = 1) or with stream memory writes and waits (done[i] = 0 written
 * after the wait). A dispatcher thread, given one run per
 * step, spins on ready[0..n-1] in order, runs each layer's fused call (kt_moe_submit + sync)
 * and writes done[i] = 1. Runs queue (up to 4): the host may launch the next step's graph, and
 * start its run, before the step in flight has ended. A spin on a flag in pinned memory answers within a microsecond or two;
 * a host function costs the driver's callback round trip, twice per layer.
 *
 * ready and done are int32 arrays in pinned (device-mapped) host memory, owned by the caller.
 */
#ifndef KT_DISPATCH_H
#define KT_DISPATCH_H

#include <stdint.h>

#include "moe.h"

typedef struct kt_dispatch kt_dispatch;

kt_dispatch *kt_dispatch_create(int32_t *ready, int32_t *done, int capacity, int hold_hot);
/* Queues a run of tasks[0..n-1] (n <= capacity), in order as their ready flags arrive, after
 * the runs queued before it; returns its id at once (waits only when 4 runs are queued). */
uint32_t kt_dispatch_start(kt_dispatch *d, kt_moe_task **tasks, int n);
/* Waits for run `id`; returns the number of layers it completed. */
int kt_dispatch_wait_run(kt_dispatch *d, uint32_t id);
/* Waits for the run started last (0 if none); returns the number of layers it completed. */
int kt_dispatch_wait(kt_dispatch *d);
/* Ends the queued runs whose flags will never come (the step failed). */
void kt_dispatch_abort(kt_dispatch *d);
void kt_dispatch_destroy(kt_dispatch *d);

#endif
