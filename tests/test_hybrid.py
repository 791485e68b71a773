"""Hybrid CPU/GPU experts: any placement gives the all-GPU tokens; the recorder round trip."""
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
    RecorderConfig,
    SchedulerConfig,
)
from ktengine.engine import AsyncEngine, collect
from ktengine.moe.placement import load_statistics
from ktengine.request import SamplingParams

PROMPTS = [[3 + i, 40, 77 + i, 120, 9, 300 - 3 * i] * (2 + i) for i in range(3)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module", params=["Qwen2MoeForCausalLM", "Qwen3NextForCausalLM"])
def ckpt(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hybrid") / "ck", request.param)


def _generate(ckpt, placement=None, recorder=None, after=None, moe=None, chunk=16):
    async def main():
        engine = AsyncEngine(EngineConfig(
            model=str(ckpt), placement=placement or PlacementConfig(), moe=moe or MoEConfig(),
            recorder=recorder or RecorderConfig(), scheduler=SchedulerConfig(chunked_prefill_size=chunk),
        ), progress=False)
        try:
            if engine.recorder is not None:
                engine.recorder.start()
            outs = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in PROMPTS))
            extra = after(engine) if after else None
            return outs, engine.snapshot().gpu_expert_share, extra
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def all_gpu(ckpt):
    return _generate(ckpt, PlacementConfig(gpu_experts_ratio=1.0))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("strategy", list(PlacementStrategy))
def test_every_placement_gives_the_all_gpu_tokens(ckpt, all_gpu, strategy, ratio):
    ref, share_all, _ = all_gpu
    outs, share, _ = _generate(ckpt, PlacementConfig(strategy=strategy, gpu_experts_ratio=ratio))
    assert share_all == 1.0
    assert (share == 0.0) if ratio == 0.0 else (0.0 < share < 1.0)
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-4)


def test_stat_recording_round_trips_into_frequency_placement(ckpt, all_gpu, tmp_path):
    outs, _, path = _generate(ckpt, recorder=RecorderConfig(mode="stat"),
                              after=lambda e: e.recorder.dump(tmp_path))
    data = torch.load(path, weights_only=True)
    counts = data["logical_count"]
    config = _model_config(ckpt)
    assert config.num_moe_layers == 3
    assert counts.dtype == torch.int32 and counts.shape == (1, config.num_layers, 8)
    dense = [i for i in range(config.num_layers) if i not in config.moe_layer_ids]
    assert int(counts[0, dense].sum()) == 0  # dense layers' rows stay zero
    tokens = sum(len(p) for p in PROMPTS) + sum(len(o.token_ids) - 1 for o in outs)
    assert int(counts.sum()) == tokens * 2 * 3  # top-2 in each of 3 MoE layers
    stats = load_statistics(path, config)
    hot = _generate(ckpt, PlacementConfig(strategy=PlacementStrategy.FREQUENCY, gpu_experts_ratio=0.25,
                                          init_expert_location=str(path)))
    uni = _generate(ckpt, PlacementConfig(strategy=PlacementStrategy.UNIFORM, gpu_experts_ratio=0.25))
    assert [o.token_ids for o in hot[0]] == [o.token_ids for o in all_gpu[0]]
    assert hot[1] >= uni[1]  # the hottest experts serve at least as many pairs
    assert stats.shape == (3, 8)


def _model_config(ckpt):
    from ktengine.model.loader import load_model_config

    return load_model_config(ckpt)


@pytest.mark.parametrize("mode", ["stat_approx", "per_pass", "per_token"])
def test_recorder_modes(ckpt, tmp_path, mode):
    _, _, path = _generate(ckpt, PlacementConfig(num_gpu_experts=2),
                           recorder=RecorderConfig(mode=mode, record_gpu_masks=True),
                           after=lambda e: e.recorder.dump(tmp_path))
    data = torch.load(path, weights_only=True)
    counts = data["logical_count"]
    masks = data["gpu_expert_masks"]
    assert masks.dtype == torch.bool and masks.shape[1:] == (3, 8)
    assert masks.sum(dim=(1, 2)).eq(6).all()  # 2 per layer in every pass
    if mode == "stat_approx":
        assert counts.shape[0] == 1 and int(counts.sum()) > 0
    else:
        assert counts.shape[0] == masks.shape[0] and counts.shape[2] == 8
    if mode == "per_token":
        assert len(data["input_ids"]) == counts.shape[0]
        first = data["topk_ids"][0]  # [MoE layers, tokens of pass 0, k]
        assert first.shape == (3, len(data["input_ids"][0]), 2)
        layer0 = _model_config(ckpt).moe_layer_ids[0]
        assert torch.equal(torch.bincount(first[0].flatten().long(), minlength=8), counts[0, layer0].long())


@pytest.fixture
def fixed_costs(monkeypatch):
    """Start-up cost measurements replaced by fixed ones, so decisions do not follow the load
    on the test machine: moving an expert costs as much as 10 routed pairs on the CPU."""
    from ktengine.moe import hybrid

    monkeypatch.setattr(hybrid, "measure_costs", lambda *a: hybrid.TransferCosts(1e-5, 1e-4))


def test_dynamic_update_moves_hot_experts_and_keeps_tokens(ckpt, all_gpu, caplog, fixed_costs):
    import logging

    def inspect(engine):
        placer = engine.dynamic
        return placer.num_updates, engine.loaded.hybrid.mask.clone(), placer.plan()

    with caplog.at_level(logging.INFO, logger="ktengine.moe.dynamic"):
        outs, _, (updates, mask, replan) = _generate(
            ckpt, PlacementConfig(gpu_experts_ratio=0.25, dynamic_update=True, gpu_prefill_token_threshold=8),
            after=inspect)
    assert updates >= 1 and "experts moved to the GPU" in caplog.text
    assert mask.sum(dim=1).tolist() == [2, 2, 2]  # slots are kept, their tenants change
    assert not torch.equal(mask[:, :2], torch.ones(3, 2, dtype=torch.bool))
    assert replan == []  # hysteresis: the same counts never swap back
    for got, want in zip(outs, all_gpu[0]):
        assert got.token_ids == want.token_ids


def test_prefill_move_or_compute_keeps_tokens(ckpt, all_gpu, fixed_costs):
    def moved(engine):
        mover = engine.loaded.hybrid.layers[0].mover
        return mover.num_moved, mover.min_pairs

    outs, _, (num_moved, min_pairs) = _generate(
        ckpt, PlacementConfig(gpu_experts_ratio=0.25), moe=MoEConfig(prefill_move=True), chunk=64,
        after=moved)
    assert num_moved > 0, f"no expert moved (threshold {min_pairs:.1f} pairs)"
    for got, want in zip(outs, all_gpu[0]):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-4)


def test_gathered_decode_path_matches_the_expert_loop():
    """The sync-free path CUDA takes for few pairs, against the per-expert loop (fp32, CPU)."""
    from ktengine.moe.gpu_experts import GpuExpertSlots, torch_experts_forward

    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 8, 32, 16, 5, 2
    gate, up, down = (torch.randn(*s, generator=g) for s in ((e, i, h), (e, i, h), (e, h, i)))
    slots = GpuExpertSlots(gate, up, down, [1, 4, 6], e, torch.device("cpu"))
    x = torch.randn(t, h, generator=g)
    ids = torch.randint(0, e, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    act = torch.nn.functional.silu
    got = slots._gathered(x, slots.slot_of_expert[ids], w, act)
    resident = torch.zeros(e, dtype=torch.bool)
    resident[[1, 4, 6]] = True
    ref = torch_experts_forward(x, gate, up, down, torch.where(resident[ids], ids, e), w, act)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-4)
    assert torch.allclose(slots.forward(x, ids, w, act), ref, atol=1e-3, rtol=1e-4)
