"""The hybrid path on a real CUDA device (run with `pytest -m gpu` on a GPU machine)."""
from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from checkpoints import FP8_SHAPES, FP8_STD, make_checkpoint, make_fp8_checkpoint
from engine_utils import check_fp8_logits, prefill_logits

from ktengine.config import (
    EngineConfig,
    MoEConfig,
    PlacementConfig,
    PlacementStrategy,
    SchedulerConfig,
)
from ktengine.engine import AsyncEngine, collect
from ktengine.model import loader
from ktengine.model.fp8 import dequantize, quantize
from ktengine.model.fp8_linear import Fp8Backend, Fp8Linear, fp8_backend, probe, w8a8_reference
from ktengine.model.loader import load_model, load_model_config
from ktengine.request import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[3 + i, 40, 77 + i, 120, 9, 300 - 3 * i] * (2 + i) for i in range(4)]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpu") / "ck", "Qwen2MoeForCausalLM")


def _run(ckpt, placement, moe=None, graphs=False, compiled=False):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), device="cuda", placement=placement,
                                          moe=moe or MoEConfig(), disable_cuda_graph=not graphs,
                                          disable_torch_compile=not compiled,
                                          scheduler=SchedulerConfig(chunked_prefill_size=64)),
                             progress=False)
        assert (engine.runner.graphs is not None) == graphs
        try:
            outs = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in PROMPTS))
            return outs, engine.snapshot().gpu_expert_share, engine
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.mark.parametrize("placement", [
    PlacementConfig(gpu_experts_ratio=0.0),
    PlacementConfig(strategy=PlacementStrategy.RANDOM, gpu_experts_ratio=0.5),
    PlacementConfig(gpu_experts_ratio=0.25, dynamic_update=True, gpu_prefill_token_threshold=8),
], ids=["all_cpu", "random_half", "dynamic"])
@pytest.mark.parametrize("graphs,compiled,sync", [
    (False, False, "flags"), (True, False, "flags"), (True, False, "host"), (True, True, "flags"),
    (True, False, "kernels"), (True, True, "kernels"),
], ids=["eager", "graphs", "graphs_hostfunc", "graphs_compiled", "graphs_handoff_kernels",
        "graphs_compiled_handoff_kernels"])
def test_hybrid_on_cuda_gives_the_all_gpu_tokens(ckpt, placement, graphs, compiled, sync, monkeypatch):
    monkeypatch.setenv("KTENGINE_GRAPH_CPU_SYNC", sync)
    if placement.dynamic_update:  # decisions must not depend on the measured costs of tiny experts
        from ktengine.moe import hybrid

        monkeypatch.setattr(hybrid, "measure_costs", lambda *a: hybrid.TransferCosts(1e-5, 1e-4))
    ref, share, _ = _run(ckpt, PlacementConfig(gpu_experts_ratio=1.0))
    assert share == 1.0
    outs, share, engine = _run(ckpt, placement, graphs=graphs, compiled=compiled)
    assert engine.device.type == "cuda"
    if graphs:
        assert engine.runner.graphs.graphs and engine.runner.graphs.steps > 0
        assert engine.runner.graphs.compile == compiled
        assert engine.runner.graphs.cpu_sync == sync
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-3)
    if placement.dynamic_update:
        assert engine.dynamic.num_updates >= 1


@pytest.mark.parametrize("sync", ["flags", "kernels"])
def test_a_failed_hybrid_graph_step_ends_its_requests_and_the_next_ones_are_exact(ckpt, sync, monkeypatch):
    """A step that fails after its graph was launched (here: the device sampler, on the 3rd
    call) aborts the CPU experts' queued layers while the stream may wait on them: the engine
    must neither hang nor serve wrong tokens afterwards."""
    from ktengine import model_runner

    monkeypatch.setenv("KTENGINE_GRAPH_CPU_SYNC", sync)
    real, calls = model_runner.sample_on_device, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected sampler failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_runner, "sample_on_device", flaky)
    ref, _, _ = _run(ckpt, PlacementConfig(gpu_experts_ratio=1.0))
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)

    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), device="cuda",
                                          placement=PlacementConfig(strategy=PlacementStrategy.RANDOM,
                                                                    gpu_experts_ratio=0.5),
                                          disable_torch_compile=True,
                                          scheduler=SchedulerConfig(chunked_prefill_size=64)),
                             progress=False)
        try:
            assert engine.runner.graphs.cpu_sync == sync
            first = await asyncio.wait_for(asyncio.gather(
                *(collect(engine.generate(p, sampled)) for p in PROMPTS), return_exceptions=True), 120)
            assert any(isinstance(r, Exception) for r in first) and len(calls) >= 3
            return await asyncio.wait_for(asyncio.gather(
                *(collect(engine.generate(p, GREEDY)) for p in PROMPTS)), 120)
        finally:
            await engine.shutdown()

    for got, want in zip(asyncio.run(main()), ref):
        assert got.token_ids == want.token_ids


def _warm_up_then_run(config: EngineConfig):
    """engine.warm_up_kernels(), then PROMPTS greedily: (calls, outputs, model config)."""
    async def main():
        engine = AsyncEngine(config, progress=False)
        try:
            calls = engine.warm_up_kernels()
            outs = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in PROMPTS))
            return calls, outs, engine.model_config
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_prefill_moves_on_cuda_keep_tokens(ckpt):
    ref, _, _ = _run(ckpt, PlacementConfig(gpu_experts_ratio=1.0))
    outs, _, engine = _run(ckpt, PlacementConfig(gpu_experts_ratio=0.25), MoEConfig(prefill_move=True))
    assert engine.loaded.hybrid.costs.move_seconds > 0
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids


def test_warm_up_covers_the_slots_prefill_moves_borrow(ckpt):
    calls, outs, model_config = _warm_up_then_run(EngineConfig(
        model=str(ckpt), device="cuda", placement=PlacementConfig(gpu_experts_ratio=0.0),
        moe=MoEConfig(prefill_move=True), disable_cuda_graph=True))
    # no resident slots at 0%: only the borrowed sets
    assert calls == 5 * sum(n <= model_config.num_experts for n in (1, 5, 14, 16))
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)


# ---- fp8 checkpoints: dense layers kept in fp8 (model/fp8_linear.py) ----

CUDA = torch.device("cuda")


def _require(backend: Fp8Backend) -> None:
    why = probe(backend, CUDA)
    if why is not None:
        pytest.skip(f"fp8 backend {backend.value} unusable here: {why}")


def test_fp8_backend_chosen_for_this_gpu():
    backend = fp8_backend(CUDA)
    cc = torch.cuda.get_device_capability()
    if cc < (8, 9):
        assert backend is None
    elif cc[0] == 9:  # Hopper: cuBLAS's block-scaled fp8 GEMM through torch
        assert backend in (Fp8Backend.SCALED_MM, Fp8Backend.SCALED_MM_V1), (
            probe(Fp8Backend.SCALED_MM, CUDA), probe(Fp8Backend.SCALED_MM_V1, CUDA))
    else:
        assert backend is Fp8Backend.TRITON, probe(Fp8Backend.TRITON, CUDA)


def _fp8_layer(out_features, in_features, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    w, scale = quantize(torch.randn(out_features, in_features, generator=gen) * 0.02, (128, 128))
    layer = Fp8Linear(in_features, out_features, False, torch.bfloat16, backend)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.weight_scale_inv.copy_(scale)
    layer.to(CUDA).prepare()
    return layer


def _row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to its row's largest value."""
    got, want = got.float(), want.float()
    return ((got - want).abs() / want.abs().amax(dim=1, keepdim=True)).max().item()


@pytest.mark.parametrize("backend", list(Fp8Backend))
@pytest.mark.parametrize("rows", [1, 7, 128])
def test_fp8_linear_on_cuda_matches_the_reference(backend, rows):
    _require(backend)
    layer = _fp8_layer(768, 2048, backend, rows)
    gen = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, 2048, generator=gen).to(CUDA, torch.bfloat16)
    got = layer(x)
    assert got.shape == (rows, 768) and got.dtype == torch.bfloat16
    # the reference's products, summed in another order and rounded once to bf16 (2^-8)
    want = w8a8_reference(x, layer.weight, layer.weight_scale_inv, torch.float32)
    assert _row_error(got, want) < 1e-2
    # and the layer on its dequantized weights, within the activations' fp8 rounding
    exact = F.linear(x.float(), dequantize(layer.weight, layer.weight_scale_inv, (128, 128),
                                           torch.float32))
    assert ((got.float() - exact).norm() / exact.norm()).item() < 0.05
    # decode steps replay CUDA graphs: the layer captures, and replays the same products
    static = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = layer(static)
    x2 = torch.randn(rows, 2048, generator=gen).to(CUDA, torch.bfloat16)
    static.copy_(x2)
    graph.replay()
    assert _row_error(replayed, layer(x2)) < 1e-2


@pytest.fixture(scope="module", params=list(FP8_SHAPES))
def fp8_dirs(request, tmp_path_factory):
    """(unquantized bf16 checkpoint, the same quantized to fp8 128 x 128 blocks), sized so that
    the attention and dense MLP weights are multiples of 128."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"fp8-{arch}")
    src = make_checkpoint(tmp / "src", arch, dtype=torch.bfloat16, init_std=FP8_STD,
                          **FP8_SHAPES[arch])
    return src, make_fp8_checkpoint(src, tmp, (128, 128))[0]


@pytest.mark.parametrize("backend", list(Fp8Backend))
def test_fp8_checkpoint_on_cuda_keeps_fp8_layers(fp8_dirs, backend, monkeypatch):
    _require(backend)
    monkeypatch.setattr(loader, "fp8_backend", lambda device: backend)
    src, path = fp8_dirs
    config = load_model_config(path)
    model = load_model(path, config, CUDA, progress=False)
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) >= 3 * config.num_layers
    for layer in layers:
        assert layer.backend is backend and layer.weight.device.type == CUDA.type
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert layer.weight_scale_inv.dtype == torch.float32
    plain = load_model(path, config, CUDA, progress=False, fp8_gpu=False)
    assert not any(isinstance(m, Fp8Linear) for m in plain.modules())
    original = load_model(src, load_model_config(src), CUDA, progress=False)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    logits = []
    for m in (model, plain, original):
        m.to(CUDA)  # the routed experts too: no hybrid executor here
        logits.append(prefill_logits(m, ids.tolist(), device=CUDA).cpu())
    check_fp8_logits(*logits)


def test_engine_decodes_the_fp8_models_greedy_tokens(tmp_path):
    """The engine's decode path (batched, CUDA graphs, CPU experts) over fp8 layers emits the
    tokens the fp8 model predicts for its own output, run as one prefill."""
    arch = "Qwen3MoeForCausalLM"
    src = make_checkpoint(tmp_path / "src", arch, dtype=torch.bfloat16, init_std=FP8_STD,
                          **FP8_SHAPES[arch])
    path = make_fp8_checkpoint(src, tmp_path, (128, 128))[0]
    outs, _, engine = _run(path, PlacementConfig(gpu_experts_ratio=0.5))
    assert any(isinstance(m, Fp8Linear) for m in engine.loaded.model.modules())
    model = load_model(path, load_model_config(path), CUDA, progress=False).to(CUDA)
    hits = total = 0
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.token_ids) == GREEDY.max_tokens
        logits = prefill_logits(model, prompt + out.token_ids, device=CUDA)
        predicted = logits[len(prompt) - 1:-1].argmax(-1).tolist()
        hits += sum(p == t for p, t in zip(predicted, out.token_ids))
        total += len(out.token_ids)
    # other kernels for the experts and other batch shapes can flip these random models'
    # near-ties (on the CPU, with the torch reference for the fp8 layers: 63 of 64)
    assert hits / total >= 0.85


def test_warm_up_compiles_every_tile_size_and_changes_no_token(ckpt):
    placement = PlacementConfig(strategy=PlacementStrategy.RANDOM, gpu_experts_ratio=0.5)
    cold, _, _ = _run(ckpt, placement)

    calls, warm, model_config = _warm_up_then_run(EngineConfig(
        model=str(ckpt), device="cuda", placement=placement, disable_cuda_graph=True,
        scheduler=SchedulerConfig(chunked_prefill_size=64)))
    assert calls == 5 * model_config.num_moe_layers
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]


def test_contexts_past_the_captured_bucket_compile_nothing_new(ckpt):
    """Start-up captures the smallest context bucket; a longer context then needs a new
    graph but no new torch.compile variant (the decode attention's several-splits kernels
    were compiled at start-up), which would stall every running request for seconds."""
    from torch._dynamo.utils import counters

    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), device="cuda",
                                          placement=PlacementConfig(gpu_experts_ratio=0.5),
                                          scheduler=SchedulerConfig(chunked_prefill_size=64)),
                             progress=False)
        try:
            assert engine.capture_decode_graphs() > 0
            compiled = counters["stats"]["unique_graphs"], counters["frames"]["total"]
            long = [[5 + i % 200 for i in range(n)] for n in (240, 300)]  # crosses 256; past it
            params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
            outs = [await collect(engine.generate(long[1], params))]  # batch 1
            outs += await asyncio.gather(*(collect(engine.generate(p, params)) for p in long))
            return compiled, (counters["stats"]["unique_graphs"], counters["frames"]["total"]), outs
        finally:
            await engine.shutdown()

    before, after, outs = asyncio.run(main())
    assert all(len(o.token_ids) == 40 for o in outs)
    assert outs[0].token_ids == outs[2].token_ids
    assert after == before
