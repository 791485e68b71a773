"""CPU expert kernels: every format x path x odd shape against tests/reference.py.

Bounds (relative Frobenius error against the fp32 reference computed on the weights as
packed, i.e. `store.dequantized()`; random Gaussian weights and activations):
- fp32: 1e-5 (fp32 end to end; only the summation order differs).
- bf16: 1e-2. x, the activation silu(g)*u and the output are each rounded to bf16
  (relative 2^-9 each), products are exact and sums fp32: a few 1e-3 in practice.
- int8 / int4: 4e-2. The weights are exactly what dequantized() returns; the remaining error
  is the int8 quantization of the activations (x per token, silu(g)*u per row, max -> 127:
  about 0.5% rms each on Gaussian data, so 1-2% on the output).
Fast paths against the generic C path: 1e-2 for bf16 (different bf16 rounding points of the
fast exp), 5e-3 for int (same integer products; an act value may round to the next int8).
Determinism is exact: the same call gives the same bits every time and for 1, 2 or 4 threads.
"""
from __future__ import annotations

import io
import time

import pytest
import torch
from reference import fused_moe_reference

from ktengine.moe.cpu_experts import (
    CpuExpertStore,
    CpuThreadPool,
    KernelPath,
    WeightFormat,
    available_paths,
)

PATHS = [p for p in KernelPath]
FORMATS = [f for f in WeightFormat]
REF_BOUND = {WeightFormat.FP32: 1e-5, WeightFormat.BF16: 1e-2,
             WeightFormat.INT8: 4e-2, WeightFormat.INT4: 4e-2}

# (E, H, I, T, k): odd H/I, T from 1 to 600, top-k 1 to 8, experts left without tokens
SHAPES = [
    (8, 80, 40, 1, 2),
    (8, 64, 64, 37, 8),
    (16, 200, 96, 17, 1),
    (32, 128, 72, 600, 4),
]


@pytest.fixture(scope="module")
def pool():
    with CpuThreadPool(2) as p:
        yield p


def make_layer(E: int, H: int, I: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return gate, up, down


def make_routing(T: int, E: int, k: int, seed: int = 1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dtype)
    weights = torch.rand(T, k, generator=g)
    return ids, weights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def skip_unavailable(path: KernelPath) -> None:
    if path not in available_paths():
        pytest.skip(f"{path.value} not supported on this CPU")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}H{}I{}T{}k{}".format(*s))
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_matches_reference_on_every_path(pool, fmt, shape):
    E, H, I, T, k = shape
    gate, up, down = make_layer(E, H, I)
    ids, weights = make_routing(T, E, k)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[::3] = True  # a third of the experts live on the GPU
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    outs = {}
    for path in available_paths():
        # amx_min_tokens=1: on the amx path every expert takes AMX (bf16, int8, int4 groups of 64)
        store = CpuExpertStore(gate, up, down, fmt, pool, path=path.value, amx_min_tokens=1)
        ref = fused_moe_reference(x, *store.dequantized(), ids, weights, mask)
        outs[path] = store.forward(x, ids, weights, mask)
        assert outs[path].dtype == torch.float32 and outs[path].shape == (T, H)
        assert rel_err(outs[path], ref) < REF_BOUND[fmt], path
    for path, out in outs.items():
        bound = 1e-5 if fmt is WeightFormat.FP32 else 1e-2 if fmt is WeightFormat.BF16 else 5e-3
        assert rel_err(out, outs[KernelPath.GENERIC]) < bound, path


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize("fmt", [WeightFormat.BF16, WeightFormat.INT8], ids=lambda f: f.value)
def test_bf16_activations(pool, fmt, path):
    skip_unavailable(path)
    E, H, I, T, k = 12, 96, 80, 50, 6
    gate, up, down = make_layer(E, H, I, seed=3)
    ids, weights = make_routing(T, E, k, seed=4, dtype=torch.int32)
    x = torch.randn(T, H).to(torch.bfloat16)
    store = CpuExpertStore(gate.bfloat16(), up.bfloat16(), down.bfloat16(), fmt, pool,
                           path=path.value, amx_min_tokens=8)
    out = store.forward(x, ids, weights)
    assert out.dtype == torch.bfloat16
    ref = fused_moe_reference(x, *store.dequantized(), ids, weights)
    assert rel_err(out, ref) < REF_BOUND[fmt]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize("group_size,asymmetric", [(32, False), (64, True), (128, False), (128, True)])
def test_int4_groups(pool, path, group_size, asymmetric):
    skip_unavailable(path)
    E, H, I, T, k = 6, 160, 136, 9, 3
    gate, up, down = make_layer(E, H, I, seed=5)
    ids, weights = make_routing(T, E, k, seed=6)
    x = torch.randn(T, H)
    # amx_min_tokens=1: on the amx path every expert takes AMX where the group allows (64, 128)
    store = CpuExpertStore(gate, up, down, "int4", pool, group_size=group_size, path=path.value,
                           asymmetric=asymmetric, amx_min_tokens=1)
    deq = store.dequantized()
    assert rel_err(deq[0], gate) < 0.15  # 4-bit weights: ~10% rms error on Gaussians
    ref = fused_moe_reference(x, *deq, ids, weights)
    out = store.forward(x, ids, weights)
    assert rel_err(out, ref) < REF_BOUND[WeightFormat.INT4]
    generic = CpuExpertStore(gate, up, down, "int4", pool, group_size=group_size, path="generic",
                             asymmetric=asymmetric)
    assert rel_err(out, generic.forward(x, ids, weights)) < 5e-3  # the same integer products


@pytest.mark.parametrize("fmt,bound", [("fp32", 0.0), ("bf16", 4e-3), ("int8", 1e-2), ("int4", 0.15)])
def test_dequantized_is_close_to_the_checkpoint(pool, fmt, bound):
    gate, up, down = make_layer(4, 72, 48)
    store = CpuExpertStore(gate, up, down, fmt, pool)
    for got, want in zip(store.dequantized(), (gate, up, down)):
        assert rel_err(got, want) <= bound


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_every_expert_masked_gives_zero(pool, path):
    skip_unavailable(path)
    gate, up, down = make_layer(8, 64, 64)
    ids, weights = make_routing(5, 8, 2)
    store = CpuExpertStore(gate, up, down, "bf16", pool, path=path.value)
    out = store.forward(torch.randn(5, 64), ids, weights, torch.ones(8, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(5, 64))


def test_mask_row_is_read_at_each_call(pool):
    E, H, I, T, k = 8, 64, 32, 4, 3
    gate, up, down = make_layer(E, H, I)
    ids, weights = make_routing(T, E, k)
    x = torch.randn(T, H)
    store = CpuExpertStore(gate, up, down, "fp32", pool)
    mask = torch.zeros(E, dtype=torch.bool)
    first = store.forward(x, ids, weights, mask)
    mask[ids[0, 0]] = True  # flipped in place, as dynamic placement does
    second = store.forward(x, ids, weights, mask)
    assert rel_err(second, fused_moe_reference(x, gate, up, down, ids, weights, mask)) < 1e-5
    assert not torch.allclose(first[0], second[0])


def test_submit_sync_and_out_buffer(pool):
    E, H, I, T, k = 8, 64, 32, 3, 2
    gate, up, down = make_layer(E, H, I)
    ids, weights = make_routing(T, E, k)
    x = torch.randn(T, H)
    store = CpuExpertStore(gate, up, down, "fp32", pool)
    out = torch.full((T, H), float("nan"))
    store.submit(x, ids, weights, out=out)
    with pytest.raises(RuntimeError):
        store.submit(x, ids, weights)
    assert store.sync() is out
    assert rel_err(out, fused_moe_reference(x, gate, up, down, ids, weights)) < 1e-5
    with pytest.raises(RuntimeError):
        store.sync()


@pytest.mark.parametrize("fmt", [WeightFormat.BF16, WeightFormat.INT8], ids=lambda f: f.value)
def test_bound_call_through_the_c_host_functions(pool, fmt):
    """What a CUDA graph's host nodes do: fixed buffers, T capped per call by live_tokens."""
    import ctypes

    from ktengine.moe.cpu_experts import host_functions

    E, H, I, T, k = 16, 128, 64, 8, 4
    gate, up, down = make_layer(E, H, I)
    store = CpuExpertStore(gate, up, down, fmt, pool)
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, weights = make_routing(T, E, k)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[ids[0, 0]] = True
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    live = torch.tensor([T], dtype=torch.int32)
    call = store.bind(x, ids, weights, mask, out, live)
    submit, sync = (ctypes.CFUNCTYPE(None, ctypes.c_void_p)(a) for a in host_functions())
    for n in (T, 3, 1):
        out.fill_(float("nan"))
        live[0] = n
        submit(call.address)
        sync(call.address)
        want = store.forward(x[:n], ids[:n], weights[:n], mask)
        assert torch.equal(out[:n], want)
        assert out[n:].isnan().all()  # rows past the live count are left alone
    with pytest.raises(ValueError):
        store.bind(x, ids.int(), weights, mask, out, live)


def test_bound_call_with_no_cpu_pair_writes_zeros_without_the_pool(pool):
    """A graph step's call with no live row, or whose experts are all on the GPU, returns at
    once (the pool is not woken): zeros in the live rows, nothing past them; the next real
    call is unaffected."""
    import ctypes

    from ktengine.moe.cpu_experts import host_functions

    E, H, I, T, k = 8, 64, 32, 4, 2
    store = CpuExpertStore(*make_layer(E, H, I), "bf16", pool)
    x = torch.randn(T, H).to(torch.bfloat16)
    ids, weights = make_routing(T, E, k)
    mask = torch.zeros(E, dtype=torch.bool)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    live = torch.tensor([0], dtype=torch.int32)
    call = store.bind(x, ids, weights, mask, out, live)
    submit, sync = (ctypes.CFUNCTYPE(None, ctypes.c_void_p)(a) for a in host_functions())
    submit(call.address)
    sync(call.address)
    assert call.ok and out.isnan().all()
    live[0] = 3
    mask.fill_(True)
    for _ in range(2):  # sync after such a call waits for nothing, twice over
        submit(call.address)
        sync(call.address)
        assert call.ok and torch.equal(out[:3], torch.zeros(3, H, dtype=torch.bfloat16))
        assert out[3:].isnan().all()
    mask.fill_(False)
    submit(call.address)
    sync(call.address)
    assert torch.equal(out[:3], store.forward(x[:3], ids[:3], weights[:3], mask))


def test_a_dispatched_step_holds_sleeping_workers_awake():
    """One worker that would sleep at once (spin 0) on a machine with a core to spare: the
    dispatcher wakes it at the start of each run and keeps it spinning until the run ends;
    many short runs in a row neither hang nor compute wrong rows."""
    import os

    from ktengine_ext import _moe

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs a spare core")
    E, H, I, T, k = 8, 64, 32, 2, 2
    with CpuThreadPool(1, spin_us=0) as pool1:
        stores = [CpuExpertStore(*make_layer(E, H, I, seed=s), "fp32", pool1) for s in range(2)]
        x = torch.randn(T, H)
        ids, weights = make_routing(T, E, k)
        mask = torch.zeros(E, dtype=torch.bool)
        live = torch.tensor([T], dtype=torch.int32)
        outs = [torch.zeros(T, H) for _ in stores]
        calls = [st.bind(x, ids, weights, mask, o, live) for st, o in zip(stores, outs)]
        wants = [st.forward(x, ids, weights, mask) for st in stores]
        flags = torch.zeros(2, 2, dtype=torch.int32)
        dispatcher = _moe.Dispatcher(flags.data_ptr(), flags.data_ptr() + 8, 2)
        program = torch.tensor([c.address for c in calls], dtype=torch.int64)
        try:
            for _ in range(60):
                dispatcher.start(program.data_ptr(), 2)
                for layer in range(2):
                    flags[0, layer] = 1
                    while int(flags[1, layer]) != 1:
                        pass
                    flags[1, layer] = 0
                assert dispatcher.wait() == 2
            assert all(torch.equal(o, w) for o, w in zip(outs, wants))
        finally:
            dispatcher.close()


def test_default_thread_counts_leave_cores_to_other_busy_threads(monkeypatch):
    from ktengine.moe import cpu_experts

    monkeypatch.setattr(cpu_experts, "physical_cores", lambda: 16)
    assert cpu_experts.default_num_threads() == 15
    assert cpu_experts.default_num_threads(2) == 14  # a CUDA engine: Python + graph dispatcher
    monkeypatch.setattr(cpu_experts, "physical_cores", lambda: 2)
    assert cpu_experts.default_num_threads(2) == 2  # small machines use every core
    monkeypatch.setenv("KTENGINE_CPU_SPIN_US", "250")
    from ktengine import env

    assert env.cpu_spin_us() == 250
    monkeypatch.setenv("KTENGINE_CPU_CALLER_HELPS", "0")
    with CpuThreadPool(1) as one:
        assert not one.caller_helps  # the waiting thread only waits


def test_dispatcher_runs_layers_as_their_flags_arrive(pool):
    """What a CUDA graph step does in flag mode, the stream's side played by this thread:
    ready[i] = 1 once layer i's inputs are in place, wait for done[i] == 1, reset it."""
    import time

    from ktengine_ext import _moe

    E, H, I, T, k = 8, 64, 32, 3, 2
    stores, calls, wants = [], [], []
    x = torch.randn(T, H)
    ids, weights = make_routing(T, E, k)
    mask = torch.zeros(E, dtype=torch.bool)
    live = torch.tensor([T], dtype=torch.int32)
    outs = [torch.zeros(T, H) for _ in range(3)]
    for layer in range(3):
        store = CpuExpertStore(*make_layer(E, H, I, seed=layer), "fp32", pool)
        stores.append(store)
        calls.append(store.bind(x, ids, weights, mask, outs[layer], live))
        wants.append(store.forward(x, ids, weights, mask))
    flags = torch.zeros(2, 3, dtype=torch.int32)  # ready, done
    dispatcher = _moe.Dispatcher(flags.data_ptr(), flags.data_ptr() + 12, 3)
    program = torch.tensor([c.address for c in calls], dtype=torch.int64)
    try:
        for _ in range(2):  # two steps: the flags come back to zero in between
            for out in outs:
                out.zero_()
            dispatcher.start(program.data_ptr(), 3)
            for layer in range(3):
                time.sleep(0.002)
                assert int(flags[1, layer]) == 0 and not outs[layer].any()  # waits for ready
                flags[0, layer] = 1
                deadline = time.monotonic() + 10
                while int(flags[1, layer]) != 1:
                    assert time.monotonic() < deadline
                flags[1, layer] = 0
                assert torch.equal(outs[layer], wants[layer])
            assert dispatcher.wait() == 3
            assert not flags.any()
        dispatcher.start(program.data_ptr(), 3)  # a step whose flags never come
        dispatcher.abort()
        assert dispatcher.wait() == 0
        with pytest.raises(ValueError):
            dispatcher.start(program.data_ptr(), 4)
    finally:
        dispatcher.close()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_a_waiting_thread_that_helps_computes_the_same_bits(fmt):
    """The thread that waits for a call (sync, or the graph steps' dispatcher) computing
    beside the workers, as one more (one worker and the spare core of a 2-core machine),
    whenever it comes (sync after GPU work: late, at any phase): the outputs equal those of
    the workers alone, bit for bit, from 1 to 300 tokens."""
    import os

    from ktengine_ext import _moe

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs a spare core")
    E, H, I, k = 16, 200, 72, 4
    x_all = torch.randn(300, H, generator=torch.Generator().manual_seed(3))
    with CpuThreadPool(1, caller_helps=False) as pool1:
        assert not pool1.caller_helps
        store = CpuExpertStore(*make_layer(E, H, I, seed=5), fmt, pool1)
        mask = torch.zeros(E, dtype=torch.bool)
        mask[2] = True
        for T in (1, 3, 17, 300):
            ids, weights = make_skewed_routing(T, E, k, seed=T)
            x = x_all[:T].contiguous()
            pool1.caller_helps = False
            want = store.forward(x, ids, weights, mask)
            pool1.caller_helps = True
            assert pool1.caller_helps
            for _ in range(5):
                assert torch.equal(store.forward(x, ids, weights, mask), want), T
            for delay in (0.0, 0.0005, 0.003):  # the helper joins at some phase, or after all
                store.submit(x, ids, weights, mask)
                time.sleep(delay)
                assert torch.equal(store.sync(), want), (T, delay)
            live = torch.tensor([T], dtype=torch.int32)
            out = torch.full((T, H), float("nan"))
            call = store.bind(x, ids, weights, mask, out, live)
            flags = torch.zeros(2, 1, dtype=torch.int32)
            program = torch.tensor([call.address], dtype=torch.int64)
            dispatcher = _moe.Dispatcher(flags.data_ptr(), flags.data_ptr() + 4, 1)
            try:
                for _ in range(5):
                    out.fill_(float("nan"))
                    dispatcher.start(program.data_ptr(), 1)
                    flags[0, 0] = 1
                    assert dispatcher.wait() == 1
                    flags[1, 0] = 0
                    assert torch.equal(out, want), T
            finally:
                dispatcher.close()


def test_dispatcher_queues_the_next_steps_run_behind_the_one_in_flight(pool):
    """Pipelined decode: the host starts step k+1's run (with another program) before step
    k's flags have come; each run's layers follow their own flags, in order, and each run
    is waited for by its id."""
    from ktengine_ext import _moe

    E, H, I, T, k = 8, 64, 32, 2, 2
    x = torch.randn(T, H)
    ids, weights = make_routing(T, E, k)
    mask = torch.zeros(E, dtype=torch.bool)
    live = torch.tensor([T], dtype=torch.int32)
    stores = [CpuExpertStore(*make_layer(E, H, I, seed=layer), "fp32", pool) for layer in range(2)]
    outs = [torch.zeros(T, H) for _ in range(2)]
    calls = [s.bind(x, ids, weights, mask, o, live) for s, o in zip(stores, outs, strict=True)]
    wants = [s.forward(x, ids, weights, mask) for s in stores]
    flags = torch.zeros(2, 2, dtype=torch.int32)
    dispatcher = _moe.Dispatcher(flags.data_ptr(), flags.data_ptr() + 8, 2)
    both = torch.tensor([c.address for c in calls], dtype=torch.int64)
    second = torch.tensor([0, calls[1].address], dtype=torch.int64)  # layer 0 on the GPU
    runs = []

    def play(layer):
        flags[0, layer] = 1
        deadline = time.monotonic() + 10
        while int(flags[1, layer]) != 1:
            assert time.monotonic() < deadline
        flags[1, layer] = 0

    try:
        programs = [both if step % 2 == 0 else second for step in range(6)]
        runs.append(dispatcher.start(programs[0].data_ptr(), 2))
        for step in range(6):
            if step + 1 < 6:  # the next step is launched before this one's flags come
                runs.append(dispatcher.start(programs[step + 1].data_ptr(), 2))
            for out in outs:
                out.zero_()
            for layer in range(2):
                play(layer)
            assert dispatcher.wait(runs[step]) == 2
            assert torch.equal(outs[0], wants[0]) == (step % 2 == 0)
            assert torch.equal(outs[1], wants[1])
        assert runs == list(range(runs[0], runs[0] + 6))
        runs = [dispatcher.start(both.data_ptr(), 2) for _ in range(2)]  # flags never come
        dispatcher.abort()
        assert dispatcher.wait(runs[0]) == 0 and dispatcher.wait(runs[1]) == 0
        run = dispatcher.start(both.data_ptr(), 2)  # the dispatcher serves again after that
        play(0)
        play(1)
        assert dispatcher.wait(run) == 2
    finally:
        dispatcher.close()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_save_load_roundtrip(pool, fmt):
    E, H, I, T, k = 4, 80, 40, 3, 2
    gate, up, down = make_layer(E, H, I)
    ids, weights = make_routing(T, E, k)
    x = torch.randn(T, H)
    store = CpuExpertStore(gate, up, down, fmt, pool, group_size=32)
    buf = io.BytesIO()
    store.save(buf)
    buf.seek(0)
    loaded = CpuExpertStore.load(buf, pool)
    assert (loaded.fmt, loaded.nbytes, loaded.group_size) == (store.fmt, store.nbytes, 32)
    assert torch.equal(loaded.forward(x, ids, weights), store.forward(x, ids, weights))


def test_fp16_checkpoint_and_shape_errors(pool):
    gate, up, down = make_layer(4, 64, 32)
    store = CpuExpertStore(gate.half(), up.half(), down.half(), "bf16", pool)
    assert store.num_experts == 4 and store.hidden_size == 64 and store.intermediate_size == 32
    with pytest.raises(ValueError):
        CpuExpertStore(gate, up, down.transpose(1, 2), "bf16", pool)
    with pytest.raises(ValueError):
        CpuExpertStore(gate, up, down, "int4", pool, group_size=48)


# Determinism: every output element must come from one fixed sequence of operations, whatever
# the thread timing and the thread count. Routing is skewed so that on the amx path experts
# with many tokens (AMX) sit next to experts with few (AVX512) in the row buffers.
DETERMINISM_SHAPES = [  # (E, H, I, T, k, calls)
    (16, 200, 72, 1, 4, 200),
    (16, 200, 72, 3, 4, 200),
    (16, 200, 72, 4, 8, 200),
    (16, 72, 40, 64, 4, 50),
    (24, 72, 40, 300, 6, 50),
]


def make_skewed_routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # popularity 1/rank^3 in a shuffled order: experts with T tokens beside ones with 1
    rank = torch.randperm(E, generator=g).float() + 1
    ids = torch.multinomial((1.0 / rank**3).expand(T, E), k, generator=g)
    return ids, torch.rand(T, k, generator=g)


@pytest.fixture(scope="module")
def pools():
    made = {n: CpuThreadPool(n) for n in (1, 2, 4)}  # 4 workers on 2 cores: more interleavings
    yield made
    for p in made.values():
        p.close()


@pytest.mark.parametrize("shape", DETERMINISM_SHAPES, ids=lambda s: "E{}H{}I{}T{}k{}".format(*s))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_bitwise_deterministic_across_calls_and_thread_counts(pools, fmt, path, shape):
    skip_unavailable(path)
    E, H, I, T, k, calls = shape
    if path is KernelPath.GENERIC:
        calls = max(5, calls // 10)  # scalar C: slow, and the race it could show is the same
    gate, up, down = make_layer(E, H, I, seed=7)
    ids, weights = make_skewed_routing(T, E, k, seed=8)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(E, dtype=torch.bool)
    mask[5] = True
    stores = {n: CpuExpertStore(gate, up, down, fmt, p, path=path.value)
              for n, p in pools.items()}
    first = {n: s.forward(x, ids, weights, mask) for n, s in stores.items()}
    assert torch.equal(first[2], first[1]) and torch.equal(first[4], first[1])
    out = torch.empty(T, H)
    diffs = 0
    for _ in range(calls):
        out.fill_(float("nan"))
        diffs += not torch.equal(stores[4].forward(x, ids, weights, mask, out=out), first[1])
    assert diffs == 0, f"{diffs} of {calls} calls differ from the 1-thread result"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_hot_experts_split_over_the_workers_match_the_reference(pools, fmt):
    """Skewed prefill routing: a hot expert's panels are split into several items (its share
    of the work: here up to 8 of its 16 panel pairs each), a cold one's are one item; the
    output is the reference's on every path."""
    E, H, I, T, k = 16, 128, 256, 300, 4
    gate, up, down = make_layer(E, H, I, seed=3)
    ids, weights = make_skewed_routing(T, E, k, seed=4)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(E, dtype=torch.bool)
    for path in available_paths():
        store = CpuExpertStore(gate, up, down, fmt, pools[4], path=path.value)
        ref = fused_moe_reference(x, *store.dequantized(), ids, weights, mask)
        assert rel_err(store.forward(x, ids, weights, mask), ref) < REF_BOUND[fmt], path


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.value)
def test_back_to_back_calls_see_no_stale_buffers(pools, path):
    skip_unavailable(path)
    E, H, I, k = 16, 72, 40, 4
    gate, up, down = make_layer(E, H, I, seed=10)
    calls = []
    for i, T in enumerate((300, 1, 64, 3, 300, 2)):  # the workspace shrinks and grows again
        ids, weights = make_skewed_routing(T, E, k, seed=20 + i)
        calls.append((torch.randn(T, H, generator=torch.Generator().manual_seed(30 + i)), ids,
                      weights))
    for fmt in (WeightFormat.BF16, WeightFormat.INT8):
        # each input alone, on a fresh store, is what the same input must give in a sequence
        alone = [CpuExpertStore(gate, up, down, fmt, pools[1], path=path.value).forward(*c)
                 for c in calls]
        store = CpuExpertStore(gate, up, down, fmt, pools[4], path=path.value)
        for _ in range(3):
            for c, want in zip(calls, alone):
                store.submit(*c)
                assert torch.equal(store.sync(), want)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_avx512_combine_gives_the_generic_bits(out_dtype):
    """The AVX512 combine (a token's k weighted fp32 rows -> its output row) against the
    generic one, bit for bit: odd H (masked tails), n = 0..9 rows, tiny, huge, signed-zero,
    denormal, inf and NaN values, and bf16 rounding ties."""
    skip_unavailable(KernelPath.AVX512)
    from ktengine_ext import _moe

    g = torch.Generator().manual_seed(3)
    for H in (1, 15, 16, 17, 63, 64, 65, 200, 2048, 2049):
        for n in range(10):
            y = torch.randn(max(n, 1), H + 3, generator=g) * torch.exp(4 * torch.randn(1, H + 3, generator=g))
            special = torch.tensor([0.0, -0.0, 1e-40, -1e-39, float("inf"), float("-inf"),
                                    float("nan"), 1.00390625, 1.01171875, 3e38])
            idx = torch.randint(0, y.numel(), (min(y.numel(), 40),), generator=g)
            y.view(-1)[idx] = special[torch.randint(0, len(special), (len(idx),), generator=g)]
            w = torch.rand(max(n, 1), generator=g)
            if n % 3 == 0:
                w[0] = 1.0  # passes rows through: ties and denormals reach the rounding as they are
            outs = []
            for avx512 in (False, True):
                out = torch.full((H,), float("nan"), dtype=out_dtype)
                _moe.combine_row(avx512, y.data_ptr(), y.stride(0), w.data_ptr(), n, H,
                                 out.data_ptr(), out_dtype == torch.bfloat16)
                outs.append(out)
            assert torch.equal(outs[0].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
                               outs[1].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32)), (H, n)


def test_phase_profile_sums_each_workers_phases(pool):
    from ktengine_ext import _moe

    E, H, I, k = 8, 64, 48, 2
    store = CpuExpertStore(*make_layer(E, H, I), "int8", pool)
    x = torch.randn(5, H)
    ids, w = make_routing(5, E, k)
    want = store.forward(x, ids, w)
    _moe.phase_profile(True)
    try:
        for _ in range(3):
            got = store.forward(x, ids, w)
    finally:
        _moe.phase_profile(False)
    store.forward(x, ids, w)  # off again: not counted
    calls, workers = _moe.phase_profile_read(pool.num_threads)
    assert calls == 3 and len(workers) == pool.num_threads
    assert torch.equal(got, want)  # profiling changes nothing
    assert all(work >= 0 and wait >= 0 for wk in workers for work, wait in wk.values())
    assert sum(wk["gate_up"][0] for wk in workers) > 0 and sum(wk["down"][0] for wk in workers) > 0
