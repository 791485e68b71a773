# cython: language_level=3
"""Binding over the C kernels: converts types and releases the GIL; no logic lives here."""

cdef extern from "cpu_features.h":
    ctypedef struct kt_cpu_features:
        int avx2
        int avx512f
        int avx512bw
        int avx512vl
        int avx512_bf16
        int avx512_vnni
        int amx_tile
        int amx_bf16
        int amx_int8
        int amx_permitted
    void kt_detect_cpu(kt_cpu_features *out)


def detect_cpu() -> dict:
    """The instruction sets this CPU and OS let us use (AMX only when the kernel granted it)."""
    cdef kt_cpu_features f
    kt_detect_cpu(&f)
    return {
        "avx2": bool(f.avx2),
        "avx512f": bool(f.avx512f),
        "avx512bw": bool(f.avx512bw),
        "avx512vl": bool(f.avx512vl),
        "avx512_bf16": bool(f.avx512_bf16),
        "avx512_vnni": bool(f.avx512_vnni),
        "amx_tile": bool(f.amx_tile and f.amx_permitted),
        "amx_bf16": bool(f.amx_bf16 and f.amx_permitted),
        "amx_int8": bool(f.amx_int8 and f.amx_permitted),
    }


from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.string cimport memset


cdef extern from "thread_pool.h":
    ctypedef struct kt_pool:
        pass
    kt_pool *kt_pool_create(int num_threads, int spin_us) nogil
    void kt_pool_destroy(kt_pool *pool) nogil
    int kt_pool_size(const kt_pool *pool) nogil
    int kt_pool_caller_may_help(const kt_pool *pool) nogil
    void kt_pool_set_caller_helps(kt_pool *pool, int on) nogil


cdef extern from "moe.h":
    ctypedef struct kt_mat_layout:
        int n_pad, k_pad
        int64_t panel_bytes, w_bytes, s_bytes, z_bytes
    ctypedef struct kt_store:
        int fmt, group_size, asym, num_experts, hidden, inter
        kt_mat_layout gu, down
        uint8_t *gu_w
        uint8_t *gu_s
        uint8_t *gu_z
        uint8_t *down_w
        uint8_t *down_s
        uint8_t *down_z
    ctypedef struct kt_workspace:
        pass
    ctypedef struct kt_moe_task:
        const kt_store *store
        kt_pool *pool
        int path, amx_min_tokens
        const void *x
        int x_dtype, num_tokens, top_k
        const void *topk_ids
        int ids_int64
        const float *topk_weights
        const uint8_t *gpu_mask
        void *out
        const int32_t *live_tokens
        kt_workspace *ws
        int status
    void kt_store_init(kt_store *s, int fmt, int group_size, int asym, int E, int H, int I) nogil
    void kt_pack_layer(kt_pool *pool, const kt_store *s, const void *gate, const void *up,
                       const void *down, int src_dtype) nogil
    void kt_dequant_expert(const kt_store *s, int e, float *gate, float *up, float *down) nogil
    int kt_moe_submit(kt_moe_task *task) nogil
    void kt_moe_sync(kt_moe_task *task) nogil
    void kt_moe_free(kt_moe_task *task) nogil
    void kt_moe_submit_host(void *task) nogil
    void kt_moe_sync_host(void *task) nogil
    void kt_moe_profile(int on) nogil
    int64_t kt_moe_profile_read(int64_t *out, int max_threads) nogil


cdef extern from "dispatch.h":
    ctypedef struct kt_dispatch:
        pass
    kt_dispatch *kt_dispatch_create(int32_t *ready, int32_t *done, int capacity, int hold_hot) nogil
    uint32_t kt_dispatch_start(kt_dispatch *d, kt_moe_task **tasks, int n) nogil
    int kt_dispatch_wait_run(kt_dispatch *d, uint32_t id) nogil
    int kt_dispatch_wait(kt_dispatch *d) nogil
    void kt_dispatch_abort(kt_dispatch *d) nogil
    void kt_dispatch_destroy(kt_dispatch *d) nogil


cdef class ThreadPool:
    """The extension's worker threads (pthreads); jobs run on them with the GIL released."""
    cdef kt_pool *pool

    def __cinit__(self, int num_threads, int spin_us=100):
        self.pool = kt_pool_create(num_threads, spin_us)
        if self.pool == NULL:
            raise MemoryError("cannot create the CPU thread pool")

    @property
    def num_threads(self) -> int:
        return kt_pool_size(self.pool) if self.pool != NULL else 0

    @property
    def caller_helps(self) -> bool:
        """Whether a thread waiting for a fused MoE call (sync) computes beside the workers:
        on by default, effective only when the workers leave a core free."""
        return self.pool != NULL and kt_pool_caller_may_help(self.pool) != 0

    @caller_helps.setter
    def caller_helps(self, bint on):
        if self.pool != NULL:
            kt_pool_set_caller_helps(self.pool, on)

    def close(self) -> None:
        if self.pool != NULL:
            with nogil:
                kt_pool_destroy(self.pool)
            self.pool = NULL

    def __dealloc__(self):
        self.close()


def layout(int fmt, int group_size, int asym, int E, int H, int I) -> dict:
    """Per-expert byte sizes of the packed arrays and the padded sizes."""
    cdef kt_store s
    kt_store_init(&s, fmt, group_size, asym, E, H, I)
    return {
        "gu_w": s.gu.w_bytes, "gu_s": s.gu.s_bytes, "gu_z": s.gu.z_bytes,
        "down_w": s.down.w_bytes, "down_s": s.down.s_bytes, "down_z": s.down.z_bytes,
        "hidden_pad": s.gu.k_pad, "inter_pad": s.down.k_pad,
    }


cdef void _fill_store(kt_store *s, int fmt, int group_size, int asym, int E, int H, int I,
                      tuple ptrs):
    kt_store_init(s, fmt, group_size, asym, E, H, I)
    s.gu_w = <uint8_t *><uintptr_t>ptrs[0]
    s.gu_s = <uint8_t *><uintptr_t>ptrs[1]
    s.gu_z = <uint8_t *><uintptr_t>ptrs[2]
    s.down_w = <uint8_t *><uintptr_t>ptrs[3]
    s.down_s = <uint8_t *><uintptr_t>ptrs[4]
    s.down_z = <uint8_t *><uintptr_t>ptrs[5]


def pack_layer(ThreadPool pool, int fmt, int group_size, int asym, int E, int H, int I,
               tuple dst_ptrs, uintptr_t gate, uintptr_t up, uintptr_t down, int src_dtype) -> None:
    """Packs a layer's gate/up [E, I, H] and down [E, H, I] into zeroed buffers at dst_ptrs."""
    cdef kt_store s
    _fill_store(&s, fmt, group_size, asym, E, H, I, dst_ptrs)
    with nogil:
        kt_pack_layer(pool.pool, &s, <const void *>gate, <const void *>up, <const void *>down,
                      src_dtype)


def dequant_expert(int fmt, int group_size, int asym, int E, int H, int I, tuple ptrs, int e,
                   uintptr_t gate, uintptr_t up, uintptr_t down) -> None:
    """Writes expert e's packed weights as fp32 gate, up [I, H] and down [H, I]."""
    cdef kt_store s
    _fill_store(&s, fmt, group_size, asym, E, H, I, ptrs)
    with nogil:
        kt_dequant_expert(&s, e, <float *>gate, <float *>up, <float *>down)


cdef class MoeTask:
    """One fused MoE call's state (kt_moe_task) over a packed store; submit/sync pairs."""
    cdef kt_store store
    cdef kt_moe_task task
    cdef ThreadPool pool_ref
    cdef tuple args

    def __cinit__(self, ThreadPool pool, int fmt, int group_size, int asym, int E, int H, int I,
                  tuple ptrs, int path, int amx_min_tokens):
        self.args = (pool, fmt, group_size, asym, E, H, I, ptrs, path, amx_min_tokens)
        memset(&self.task, 0, sizeof(kt_moe_task))
        _fill_store(&self.store, fmt, group_size, asym, E, H, I, ptrs)
        self.pool_ref = pool
        self.task.store = &self.store
        self.task.pool = pool.pool
        self.task.path = path
        self.task.amx_min_tokens = amx_min_tokens
        self.task.status = -1

    @property
    def amx_min_tokens(self) -> int:
        return self.task.amx_min_tokens

    @amx_min_tokens.setter
    def amx_min_tokens(self, int value):
        self.task.amx_min_tokens = value

    @property
    def path(self) -> int:
        return self.task.path

    @property
    def status(self) -> int:
        """0 after a call that started; -1 before the first and after one that could not
        allocate its workspace (nothing computed)."""
        return self.task.status

    def submit(self, uintptr_t x, int x_dtype, int num_tokens, int top_k, uintptr_t topk_ids,
               bint ids_int64, uintptr_t topk_weights, uintptr_t gpu_mask, uintptr_t out) -> None:
        """Starts the call on the pool and returns; the buffers must live until sync()."""
        if self.pool_ref.pool == NULL:
            raise RuntimeError("the CPU thread pool is closed")
        cdef int rc
        self._set(x, x_dtype, num_tokens, top_k, topk_ids, ids_int64, topk_weights, gpu_mask, out, 0)
        with nogil:
            rc = kt_moe_submit(&self.task)
        if rc != 0:
            raise MemoryError("cannot allocate the CPU MoE workspace")

    def sync(self) -> None:
        """Waits for the call started by submit()."""
        with nogil:
            kt_moe_sync(&self.task)

    def clone(self) -> MoeTask:
        """A task over the same packed store and pool with its own inputs and workspace."""
        cdef MoeTask other = MoeTask(*self.args)
        other.task.amx_min_tokens = self.task.amx_min_tokens
        return other

    def bind(self, uintptr_t x, int x_dtype, int num_tokens, int top_k, uintptr_t topk_ids,
             bint ids_int64, uintptr_t topk_weights, uintptr_t gpu_mask, uintptr_t out,
             uintptr_t live_tokens) -> None:
        """Fixes the inputs for calls made through `address` (CUDA host functions): the
        buffers must outlive every such call; live_tokens (int32*, or 0) caps T per call."""
        self._set(x, x_dtype, num_tokens, top_k, topk_ids, ids_int64, topk_weights, gpu_mask, out,
                  live_tokens)

    cdef void _set(self, uintptr_t x, int x_dtype, int num_tokens, int top_k, uintptr_t topk_ids,
                   bint ids_int64, uintptr_t topk_weights, uintptr_t gpu_mask, uintptr_t out,
                   uintptr_t live_tokens):
        self.task.x = <const void *>x
        self.task.x_dtype = x_dtype
        self.task.num_tokens = num_tokens
        self.task.top_k = top_k
        self.task.topk_ids = <const void *>topk_ids
        self.task.ids_int64 = ids_int64
        self.task.topk_weights = <const float *>topk_weights
        self.task.gpu_mask = <const uint8_t *>gpu_mask
        self.task.out = <void *>out
        self.task.live_tokens = <const int32_t *>live_tokens

    @property
    def address(self) -> int:
        """Address of the kt_moe_task, for C callers (kt_moe_submit_host/kt_moe_sync_host)."""
        return <uintptr_t>&self.task

    def __dealloc__(self):
        if self.pool_ref is not None and self.pool_ref.pool != NULL:
            with nogil:
                kt_moe_sync(&self.task)
        kt_moe_free(&self.task)


def host_function_addresses() -> tuple:
    """(submit, sync) as C function addresses, void fn(void *task): CUDA host-function nodes."""
    return (<uintptr_t>&kt_moe_submit_host, <uintptr_t>&kt_moe_sync_host)


cdef extern from "membw.h":
    void kt_read_buffer(kt_pool *pool, const void *buf, int64_t bytes, int use_avx512) nogil
    int kt_advise_huge_pages(void *p, int64_t bytes) nogil


def advise_huge_pages(uintptr_t buf, int64_t nbytes) -> bool:
    """Asks for 2 MiB pages over the aligned part of a buffer not yet touched (advice only)."""
    return kt_advise_huge_pages(<void *>buf, nbytes) == 0


def read_buffer(ThreadPool pool, uintptr_t buf, int64_t nbytes, bint use_avx512) -> None:
    """Reads nbytes at buf once on the pool's workers (a DRAM read-bandwidth probe)."""
    with nogil:
        kt_read_buffer(pool.pool, <const void *>buf, nbytes, use_avx512)


cdef extern from "gemm_bench.h":
    double kt_time_gemm(const kt_store *s, int which, int path, int m, int e0, int n_experts,
                        int reps) nogil
    double kt_amx_peak_tflops(int int8) nogil


def time_gemm(int fmt, int group_size, int asym, int E, int H, int I, tuple ptrs, int which,
              int path, int m, int e0, int n_experts, int reps) -> float:
    """Seconds per call of one expert GEMM (which 0: gate/up, 1: down) on m random rows,
    cycling over experts [e0, e0 + n_experts), on the calling thread."""
    cdef kt_store s
    cdef double sec
    _fill_store(&s, fmt, group_size, asym, E, H, I, ptrs)
    with nogil:
        sec = kt_time_gemm(&s, which, path, m, e0, n_experts, reps)
    return sec


def amx_peak_tflops(bint int8) -> float:
    """Back-to-back AMX dot products, no loads: one core's peak (call only with AMX)."""
    cdef double v
    with nogil:
        v = kt_amx_peak_tflops(int8)
    return v


cdef class Dispatcher:
    """A thread that runs a step's MoE tasks as flags in pinned memory announce their inputs
    (ready[i] = 1) and answers with done[i] = 1 (dispatch.h). hold_hot: the experts' workers
    stay awake from a run's start to its end instead of sleeping between layers."""
    cdef kt_dispatch *d
    cdef int capacity

    def __cinit__(self, uintptr_t ready, uintptr_t done, int capacity, bint hold_hot=True):
        self.capacity = capacity
        self.d = kt_dispatch_create(<int32_t *>ready, <int32_t *>done, capacity, hold_hot)
        if self.d == NULL:
            raise MemoryError("cannot start the dispatcher thread")

    def start(self, uintptr_t tasks, int n) -> int:
        """Queues a run of the n tasks whose addresses are at `tasks` (an array of pointers)
        behind the runs queued before; returns its id at once."""
        cdef uint32_t run = 0
        if self.d == NULL:
            raise RuntimeError("the dispatcher is closed")
        if n < 0 or n > self.capacity:
            raise ValueError(f"{n} tasks for a dispatcher of {self.capacity} flags")
        with nogil:
            run = kt_dispatch_start(self.d, <kt_moe_task **>tasks, n)
        return run

    def wait(self, run=None) -> int:
        """Waits for run `run` (default: the one started last); returns the number of tasks
        it completed."""
        cdef int done = 0
        cdef uint32_t rid = 0 if run is None else <uint32_t>run
        cdef bint last = run is None
        if self.d != NULL:
            with nogil:
                done = kt_dispatch_wait(self.d) if last else kt_dispatch_wait_run(self.d, rid)
        return done

    def abort(self) -> None:
        if self.d != NULL:
            with nogil:
                kt_dispatch_abort(self.d)

    def close(self) -> None:
        if self.d != NULL:
            with nogil:
                kt_dispatch_destroy(self.d)
            self.d = NULL

    def __dealloc__(self):
        self.close()


cdef extern from "kernels.h":
    void kt_combine_row_generic(const float *const *y, const float *w, int n, int H, float *acc,
                                float *out_f32, uint16_t *out_bf16) nogil
    void kt_combine_row_avx512(const float *const *y, const float *w, int n, int H,
                               float *out_f32, uint16_t *out_bf16) nogil


def combine_row(bint avx512, uintptr_t y, int64_t y_stride, uintptr_t w, int n, int H,
                uintptr_t out, bint out_bf16) -> None:
    """Test hook: out[h] = sum_j w[j] * y[j][h] (fp32 rows y_stride floats apart), written as
    fp32 or bf16, by the generic or the AVX512 combine of the fused call (call the AVX512 one
    only where the CPU has it)."""
    cdef const float *rows[64]
    cdef int j
    cdef float acc[4096]
    cdef float *of = NULL if out_bf16 else <float *>out
    cdef uint16_t *ob = <uint16_t *>out if out_bf16 else NULL
    if n > 64 or H > 4096:
        raise ValueError("combine_row: at most 64 rows of 4096")
    for j in range(n):
        rows[j] = <const float *>y + j * y_stride
    with nogil:
        if avx512:
            kt_combine_row_avx512(rows, <const float *>w, n, H, of, ob)
        else:
            kt_combine_row_generic(rows, <const float *>w, n, H, acc, of, ob)


PHASE_NAMES = ("gather", "gate_up", "quant", "down", "combine")


def phase_profile(bint on) -> None:
    """Starts (and zeroes) or stops the fused calls' phase profile (a benchmark's tool)."""
    kt_moe_profile(on)


def phase_profile_read(int num_threads):
    """(calls, per worker [num_threads] a dict phase -> (work s, barrier wait s)): the sums
    over the fused calls made since phase_profile(True)."""
    import numpy as np
    buf = np.zeros((num_threads, 5, 2), dtype=np.int64)
    cdef int64_t[:, :, ::1] view = buf
    cdef int64_t calls = kt_moe_profile_read(&view[0, 0, 0], num_threads)
    return calls, [{name: (buf[t, i, 0] / 1e9, buf[t, i, 1] / 1e9) for i, name in enumerate(PHASE_NAMES)}
                   for t in range(num_threads)]
