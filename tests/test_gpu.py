"""The hybrid path on a real CUDA device (run with `pytest -m gpu` on a GPU machine)."""
from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import make_checkpoint

from ktengine.config import (
    EngineConfig,
    MoEConfig,
    PlacementConfig,
    PlacementStrategy,
    SchedulerConfig,
)
from ktengine.engine import AsyncEngine, collect
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


def _run(ckpt, placement, moe=None, graphs=False):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(ckpt), device="cuda", placement=placement,
                                          moe=moe or MoEConfig(), disable_cuda_graph=not graphs,
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
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_hybrid_on_cuda_gives_the_all_gpu_tokens(ckpt, placement, graphs, monkeypatch):
    if placement.dynamic_update:  # decisions must not depend on the measured costs of tiny experts
        from ktengine.moe import hybrid

        monkeypatch.setattr(hybrid, "measure_costs", lambda *a: hybrid.TransferCosts(1e-5, 1e-4))
    ref, share, _ = _run(ckpt, PlacementConfig(gpu_experts_ratio=1.0))
    assert share == 1.0
    outs, share, engine = _run(ckpt, placement, graphs=graphs)
    assert engine.device.type == "cuda"
    if graphs:
        assert engine.runner.graphs.graphs and engine.runner.graphs.steps > 0
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-3)
    if placement.dynamic_update:
        assert engine.dynamic.num_updates >= 1


def test_prefill_moves_on_cuda_keep_tokens(ckpt):
    ref, _, _ = _run(ckpt, PlacementConfig(gpu_experts_ratio=1.0))
    outs, _, engine = _run(ckpt, PlacementConfig(gpu_experts_ratio=0.25), MoEConfig(prefill_move=True))
    assert engine.loaded.hybrid.costs.move_seconds > 0
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
