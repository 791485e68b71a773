"""Tensor parallelism: 2 ranks (gloo, CPU) give the tp=1 tokens; workers stop and fail cleanly.

The NCCL run on several GPUs is the `gpu`-marked test at the end (docs/tensor_parallel.md).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from checkpoints import make_checkpoint

from ktengine.cli import main as cli_main
from ktengine.config import (
    EngineConfig,
    MoEConfig,
    ParallelConfig,
    PlacementConfig,
    SchedulerConfig,
)
from ktengine.engine import AsyncEngine, EngineError, collect
from ktengine.errors import ConfigError
from ktengine.model.loader import load_model_config
from ktengine.parallel.shard import check_shardable
from ktengine.request import SamplingParams

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch has no gloo backend")

PROMPTS = [[3 + i, 40, 77 + i, 120, 9, 300 - 3 * i] * (1 + i) for i in range(4)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)

# (architecture, checkpoint overrides, GPU-side expert ratio)
CASES = {
    "qwen3_moe-all_cpu": ("Qwen3MoeForCausalLM", {}, 0.0),
    "qwen3_moe-half_gpu": ("Qwen3MoeForCausalLM", {}, 0.5),
    "qwen2_moe-all_cpu": ("Qwen2MoeForCausalLM", {}, 0.0),  # shared expert with a sigmoid gate
    "qwen2_moe-half_gpu": ("Qwen2MoeForCausalLM", {}, 0.5),
    "mixtral-all_cpu": ("MixtralForCausalLM", {}, 0.0),
    "mixtral-half_gpu": ("MixtralForCausalLM", {}, 0.5),
    "olmoe-half_gpu": ("OlmoeForCausalLM", {}, 0.5),  # q/k norm over the whole split projection
    "one_kv_head-half_gpu": ("Qwen3MoeForCausalLM", {"num_key_value_heads": 1}, 0.5),  # replicated
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("tp"), {}

    def get(arch: str, overrides: dict) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_checkpoint(root / f"ck{len(made)}", arch, **overrides)
        return made[key]

    return get


def _config(ckpt: Path, tp: int, ratio: float = 0.0, device: str = "cpu") -> EngineConfig:
    return EngineConfig(model=str(ckpt), device=device,
                        placement=PlacementConfig(gpu_experts_ratio=ratio),
                        moe=MoEConfig(num_cpu_threads=1),  # two ranks share this machine's cores
                        scheduler=SchedulerConfig(chunked_prefill_size=16),
                        parallel=ParallelConfig(tp_size=tp))


def _generate(config: EngineConfig, inspect=None):
    async def main():
        engine = AsyncEngine(config, progress=False)
        try:
            outs = await asyncio.gather(*(collect(engine.generate(p, GREEDY)) for p in PROMPTS))
            return outs, inspect(engine) if inspect else None
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def _gone(pid: int) -> bool:
    """The process is neither running nor a zombie left for us to reap."""
    return not Path(f"/proc/{pid}").exists()


def _shape(engine) -> dict:
    layer = engine.loaded.model.model.layers[0]
    return {"heads": layer.self_attn.num_heads, "kv_heads": layer.self_attn.num_kv_heads,
            "cache_heads": engine.loaded.kv_cache.layers[0][0].shape[1],
            "pids": engine.loaded.workers.pids if engine.loaded.workers else []}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_rank_tokens(checkpoints, case):
    arch, overrides, ratio = CASES[case]
    ckpt = checkpoints(arch, overrides)
    ref, _ = _generate(_config(ckpt, 1, ratio))
    outs, shape = _generate(_config(ckpt, 2, ratio), inspect=_shape)
    model = load_model_config(ckpt)
    assert shape["heads"] == model.num_heads // 2  # rank 0 really holds half the heads
    assert shape["kv_heads"] == shape["cache_heads"] == max(1, model.num_kv_heads // 2)
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-4)
    assert len(shape["pids"]) == 1 and all(_gone(pid) for pid in shape["pids"])


def test_a_dead_worker_fails_requests_with_a_clear_error_and_shutdown_is_clean(checkpoints):
    ckpt = checkpoints("Qwen2MoeForCausalLM", {})
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def kill_while_decoding(engine, pid):
        seen = 0
        async for _ in engine.generate(PROMPTS[0], long):
            seen += 1
            if seen == 3:  # steps run back to back: most likely inside one, or the next
                os.kill(pid, signal.SIGKILL)
        return seen

    async def main():
        engine = AsyncEngine(_config(ckpt, 2, 0.5), progress=False)
        pid = engine.loaded.workers.pids[0]
        try:
            first = await collect(engine.generate(PROMPTS[1], GREEDY))
            errors = []
            with pytest.raises(EngineError) as info:
                await asyncio.wait_for(kill_while_decoding(engine, pid), timeout=60)
            errors.append(str(info.value))
            with pytest.raises(EngineError) as info:  # the group stays failed: at once
                await asyncio.wait_for(collect(engine.generate(PROMPTS[2], GREEDY)), timeout=5)
            errors.append(str(info.value))
            return first, errors, pid
        finally:
            await engine.shutdown()

    first, errors, pid = asyncio.run(main())
    assert len(first.token_ids) == GREEDY.max_tokens
    for error in errors:
        assert "tensor-parallel rank 1 exited with code -9" in error and "\n" not in error
    assert _gone(pid)


def test_a_rank_0_failure_fails_the_group_and_shutdown_does_not_wait_for_stuck_workers(checkpoints):
    ckpt = checkpoints("Qwen3MoeForCausalLM", {})

    def boom(moe_index, topk_ids):  # rank 0 fails inside a step; rank 1 waits in a collective
        raise RuntimeError("boom")

    async def main():
        engine = AsyncEngine(_config(ckpt, 2), progress=False)
        pid = engine.loaded.workers.pids[0]
        try:
            await collect(engine.generate(PROMPTS[0], GREEDY))
            engine.loaded.model.moe_blocks()[1].observer = boom
            errors = []
            for prompt in PROMPTS[:2]:
                with pytest.raises(EngineError) as info:
                    await asyncio.wait_for(collect(engine.generate(prompt, GREEDY)), timeout=30)
                errors.append(str(info.value))
            return errors, pid
        finally:
            t0 = time.monotonic()
            await engine.shutdown()
            assert time.monotonic() - t0 < 5

    errors, pid = asyncio.run(main())
    assert errors == ["model step failed: tensor-parallel rank 0 failed: RuntimeError: boom"] * 2
    assert _gone(pid)


def test_cli_generate_with_two_ranks(checkpoints, capsys):
    ckpt = checkpoints("Qwen3MoeForCausalLM", {})
    args = ["generate", "--model", str(ckpt), "--device", "cpu", "--prompt-token-ids",
            ",".join(map(str, PROMPTS[1])), "--max-tokens", "6", "--ignore-eos", "--json"]
    assert cli_main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert cli_main(args + ["--tp-size", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["token_ids"] == one["token_ids"] and len(two["token_ids"]) == 6


def test_bad_tensor_parallel_sizes_are_one_line_errors(checkpoints, capsys):
    ckpt = checkpoints("Qwen3MoeForCausalLM", {})
    base = load_model_config(ckpt)  # 4 heads, 2 kv heads, intermediate sizes 96 and 32
    cases = [
        (base, 0, "must be at least 1"),
        (base, 3, "--tp-size 3 does not divide the model's 4 attention heads"),
        (replace(base, num_heads=6, num_kv_heads=3), 2, "3 key/value heads"),
        (replace(base, num_heads=8, num_kv_heads=3), 4, "3 key/value heads"),
        (replace(base, moe_intermediate_size=30), 4, "moe_intermediate_size (30)"),
    ]
    for config, tp, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)) as info:
            check_shardable(config, tp)
        assert "\n" not in str(info.value)
    for tp in (0, 3):  # through the engine: refused before any worker starts
        with pytest.raises(ConfigError) as info:
            AsyncEngine(_config(ckpt, tp), progress=False)
        assert "\n" not in str(info.value)
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "hi", "--tp-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ktengine: error: --tp-size must be at least 1, got 0"


def test_linear_attention_and_dynamic_placement_refuse_tensor_parallel(checkpoints):
    next_config = load_model_config(checkpoints("Qwen3NextForCausalLM", {}))
    with pytest.raises(ConfigError, match="linear attention.*--tp-size 1"):
        check_shardable(next_config, 2)
    ckpt = checkpoints("Qwen3MoeForCausalLM", {})
    dynamic = replace(_config(ckpt, 2), placement=PlacementConfig(
        gpu_experts_ratio=0.25, dynamic_update=True, gpu_prefill_token_threshold=8))
    with pytest.raises(ConfigError, match="dynamic expert update does not support --tp-size"):
        AsyncEngine(dynamic, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_nccl_two_gpus_give_the_one_gpu_tokens(checkpoints, ratio):
    ckpt = checkpoints("Qwen2MoeForCausalLM", {})
    ref, _ = _generate(_config(ckpt, 1, ratio, device="cuda"))
    outs, shape = _generate(_config(ckpt, 2, ratio, device="cuda"), inspect=_shape)
    for got, want in zip(outs, ref):
        assert got.token_ids == want.token_ids
        assert got.delta_logprobs == pytest.approx(want.delta_logprobs, abs=1e-3)
    assert all(_gone(pid) for pid in shape["pids"])
