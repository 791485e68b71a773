"""Qwen3-Next (Gated DeltaNet + gated attention + MoE) against transformers, and its state slots."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
import transformers
from checkpoints import make_checkpoint
from engine_utils import prefill_logits
from safetensors.torch import load_file, save_file

from ktengine.config import (
    CacheConfig,
    EngineConfig,
    LayerType,
    ModelConfig,
    PlacementConfig,
    PlacementStrategy,
    SchedulerConfig,
)
from ktengine.engine import AsyncEngine, collect
from ktengine.errors import ConfigError
from ktengine.kv_cache import BlockAllocator
from ktengine.model.loader import load_model, load_model_config
from ktengine.request import FinishReason, SamplingParams, Sequence
from ktengine.scheduler import Scheduler
from ktengine.state_cache import SlotAllocator

ARCH = "Qwen3NextForCausalLM"
PROMPTS = [[5 + i, 17, 33 + 2 * i, 101, 250 - i, 7] * (1 + i) for i in range(4)]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q3n") / "ck", ARCH, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_greedy(fp32_ckpt):
    """transformers' greedy 32-token continuation of each prompt."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(fp32_ckpt, dtype=torch.float32).eval()
    return [
        hf.generate(
            torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        for p in PROMPTS
    ]


def _generate(path, prompts, params=GREEDY, inspect=None, **config):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(path), **config), progress=False)
        try:
            outs = await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))
            return outs, (inspect(engine) if inspect else None)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_config_layer_types_and_moe_fields():
    hf = make_hf_dict(
        full_attention_interval=4,
        num_hidden_layers=8,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=512,
        decoder_sparse_step=1,
    )
    cfg = ModelConfig.from_hf(hf)
    assert cfg.layer_types[3] is LayerType.FULL_ATTENTION and cfg.kv_layer_ids == [3, 7]
    assert cfg.linear_layer_ids == [0, 1, 2, 4, 5, 6]
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size) == (512, 10, 512)
    assert cfg.moe_layers == (True,) * 8 and cfg.shared_expert_gate and cfg.norm_topk_prob
    assert cfg.expert_nbytes == 3 * 64 * 512 * 2  # bf16
    assert cfg.rope.partial_rotary_factor == 0.25  # transformers' default when the config is silent
    explicit = ModelConfig.from_hf({**hf, "layer_types": ["full_attention"] * 8})
    assert explicit.linear_layer_ids == [] and explicit.kv_layer_ids == list(range(8))
    with pytest.raises(ConfigError, match="layer type 'mamba'"):
        ModelConfig.from_hf({**hf, "layer_types": ["mamba"] * 8})
    with pytest.raises(ConfigError, match="layer_types has 2 entries for 8 layers"):
        ModelConfig.from_hf({**hf, "layer_types": ["full_attention"] * 2})


def make_hf_dict(**overrides):
    return {
        "architectures": [ARCH],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "torch_dtype": "bfloat16",
        **overrides,
    }


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match_transformers_in_one_pass_chunks_and_decode(tmp_path, dtype, fused):
    path = make_checkpoint(tmp_path / "ck", ARCH, dtype=dtype, fused=fused)
    config = load_model_config(path)
    model = load_model(path, config, torch.device("cpu"), progress=False)
    ids = torch.randint(0, config.vocab_size, (80,), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    scale = ref.abs().max().item()
    got = prefill_logits(model, ids.tolist())  # chunked form over more than one 64-token chunk
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() <= 1e-4 * scale
    else:  # within the noise of transformers' own bf16 run, both measured against fp32
        exact = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            exact = exact.eval()(ids[None]).logits[0]
        ours, theirs = (got - exact).abs(), (ref - exact).abs()
        assert ours.max() <= 2 * theirs.max() + 1e-3 * scale
        assert ours.mean() <= 2 * theirs.mean() + 1e-4 * scale
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for chunk in (7, 1):  # prefill in chunks carrying the state; 1 = the recurrent (decode) form
        split = prefill_logits(model, ids.tolist(), chunk=chunk)
        assert (split - got).abs().max().item() <= tol * scale, chunk


def test_greedy_batched_matches_transformers_and_frees_slots(fp32_ckpt, hf_greedy):
    outs, free = _generate(
        fp32_ckpt,
        PROMPTS,
        scheduler=SchedulerConfig(chunked_prefill_size=9),
        inspect=lambda e: (e.scheduler.state_slots.num_free, e.scheduler.state_slots.num_slots),
    )
    assert [o.token_ids for o in outs] == hf_greedy
    assert free[0] == free[1]  # every slot back once the requests finished


@pytest.mark.parametrize("strategy", ["uniform", "random"])
def test_hybrid_placement_keeps_outputs(fp32_ckpt, hf_greedy, strategy):
    """Three of eight experts per MoE layer on the "GPU", the rest on the CPU kernels."""
    placement = PlacementConfig(strategy=PlacementStrategy(strategy), num_gpu_experts=3)
    outs, hybrid = _generate(fp32_ckpt, PROMPTS, placement=placement,
                             inspect=lambda e: e.loaded.hybrid)
    assert [o.token_ids for o in outs] == hf_greedy
    assert hybrid.mask.shape == (3, 8) and int(hybrid.mask.sum()) == 9
    assert 0.0 < hybrid.gpu_share < 1.0  # both sides computed


def test_few_slots_and_preemption_keep_outputs(fp32_ckpt, hf_greedy, monkeypatch):
    """Two slots for four requests (slots are reused, never cleared), and a KV cache so small
    that sequences are preempted and recompute from scratch: the tokens do not change."""
    preempted = []
    preempt = Scheduler._preempt
    monkeypatch.setattr(
        Scheduler, "_preempt", lambda self, seq: (preempted.append(seq), preempt(self, seq))
    )
    few, _ = _generate(
        fp32_ckpt,
        PROMPTS,
        cache=CacheConfig(max_state_slots=2),
        scheduler=SchedulerConfig(chunked_prefill_size=9),
    )
    assert [o.token_ids for o in few] == hf_greedy
    tight, _ = _generate(
        fp32_ckpt,
        PROMPTS,
        cache=CacheConfig(max_total_tokens=96, block_size=4),
        scheduler=SchedulerConfig(chunked_prefill_size=5),
    )
    assert [o.token_ids for o in tight] == hf_greedy
    assert all(o.finish_reason == FinishReason.LENGTH for o in tight) and preempted


def test_abort_frees_the_state_slot(fp32_ckpt):
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(fp32_ckpt)), progress=False)
        try:
            slots = engine.scheduler.state_slots
            stream = engine.generate(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True))
            async for out in stream:
                if len(out.token_ids) >= 3:
                    break
            held = slots.num_free
            await stream.aclose()
            for _ in range(100):
                if engine.snapshot().num_running == 0:
                    break
                await asyncio.sleep(0.01)
            return held, slots.num_free, slots.num_slots
        finally:
            await engine.shutdown()

    held, free, total = asyncio.run(main())
    assert held == total - 1 and free == total


def test_scheduler_takes_and_returns_slots():
    slots = SlotAllocator(2)
    s = Scheduler(
        SchedulerConfig(chunked_prefill_size=64, max_running_requests=8),
        BlockAllocator(64, 4),
        slots,
    )
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams()) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    batch = s.schedule()
    assert [i.seq.request_id for i in batch.items] == ["0", "1"]  # no third slot
    assert {seqs[0].state_slot, seqs[1].state_slot} == {0, 1} and slots.num_free == 0
    s._preempt(seqs[1])
    assert seqs[1].state_slot is None and slots.num_free == 1
    s.finish(seqs[0], FinishReason.STOP)
    assert seqs[0].state_slot is None and slots.num_free == 2


def test_mtp_weights_are_skipped_with_a_note(tmp_path, caplog):
    path = make_checkpoint(tmp_path / "ck", ARCH)
    weights = load_file(str(path / "model.safetensors"))
    weights["mtp.fc.weight"] = torch.zeros(64, 128)
    weights["mtp.layers.0.mlp.gate.weight"] = torch.zeros(8, 64)
    save_file(weights, str(path / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="ktengine.model.loader"):
        load_model(path, load_model_config(path), torch.device("cpu"), progress=False)
    assert "skipped 2 multi-token-prediction tensor(s)" in caplog.text
