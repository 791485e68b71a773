"""Each supported architecture against transformers on tiny random checkpoints."""
from __future__ import annotations

import asyncio

import pytest
import torch
import transformers
from checkpoints import ARCHS, make_checkpoint
from engine_utils import prefill_logits

from ktengine.config import EngineConfig, SchedulerConfig
from ktengine.engine import AsyncEngine, collect
from ktengine.model.loader import load_model, load_model_config
from ktengine.request import SamplingParams


def _hf(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tmp_path, arch, dtype, fused):
    path = make_checkpoint(tmp_path / "ck", arch, dtype=dtype, fused=fused)
    config = load_model_config(path)
    assert config.dtype == dtype
    model = load_model(path, config, torch.device("cpu"), progress=False)
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _hf(path, dtype)(ids[None]).logits[0].float()
    got = prefill_logits(model, ids.tolist())
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() <= 1e-4 * scale
    else:  # a few bf16 roundings through 3 layers; random routing may flip a near-tie expert
        err = (got - ref).abs()
        assert err.max().item() <= 0.1 * scale
        assert err.mean().item() <= 0.01 * scale
    chunked = prefill_logits(model, ids.tolist(), chunk=7)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (chunked - got).abs().max().item() <= tol * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_identical_to_transformers(tmp_path, arch):
    path = make_checkpoint(tmp_path / "ck", arch, dtype=torch.float32)
    hf = _hf(path, torch.float32)
    prompts = [[5 + i, 17, 33 + 2 * i, 101, 250 - i, 7] * (1 + i) for i in range(4)]

    async def run():
        engine = AsyncEngine(
            EngineConfig(model=str(path), scheduler=SchedulerConfig(chunked_prefill_size=9)),
            progress=False,
        )
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        try:
            return await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))
        finally:
            await engine.shutdown()

    outs = asyncio.run(run())
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_tied_embeddings_and_sharded_index(tmp_path):
    path = make_checkpoint(tmp_path / "ck", "Qwen3MoeForCausalLM", tie_word_embeddings=True)
    hf = _hf(path, torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config = load_model_config(tmp_path / "sharded")
    assert config.tie_word_embeddings
    model = load_model(tmp_path / "sharded", config, torch.device("cpu"), progress=False)
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = prefill_logits(model, ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "OlmoeForCausalLM"])
def test_attention_bias_includes_o_proj(tmp_path, arch):
    """Qwen3-MoE and OLMoE put attention_bias on o_proj too (Qwen2-MoE's qkv_bias does not)."""
    path = make_checkpoint(tmp_path / "ck", arch, attention_bias=True)
    config = load_model_config(path)
    assert config.o_proj_bias
    model = load_model(path, config, torch.device("cpu"), progress=False)
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _hf(path, torch.float32)(ids[None]).logits[0].float()
    got = prefill_logits(model, ids.tolist())
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_a_model_without_moe_layers_serves(tmp_path):
    path = make_checkpoint(tmp_path / "ck", "Qwen2MoeForCausalLM", mlp_only_layers=[0, 1, 2])
    hf = _hf(path, torch.float32)
    prompt = [5, 17, 33, 101, 250, 7]

    async def run():
        engine = AsyncEngine(EngineConfig(model=str(path)), progress=False)
        try:
            return await collect(engine.generate(prompt, SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True)))
        finally:
            await engine.shutdown()

    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert asyncio.run(run()).token_ids == ref


def test_cpu_experts_refuse_an_activation_they_do_not_compute(tmp_path):
    from ktengine.errors import ConfigError

    path = make_checkpoint(tmp_path / "ck", "OlmoeForCausalLM", hidden_act="gelu")
    with pytest.raises(ConfigError, match="SiLU experts.*'gelu'"):
        AsyncEngine(EngineConfig(model=str(path)), progress=False)
