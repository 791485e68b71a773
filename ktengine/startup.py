"""Building everything a running engine needs from an EngineConfig.

All "auto" values (device, dtype, context length, KV cache size) are resolved here, in one
place, and each choice is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ktengine.config import EngineConfig, ModelConfig, parse_dtype
from ktengine.errors import ConfigError
from ktengine.kv_cache import KVCache
from ktengine.model.decoder import MoEForCausalLM
from ktengine.model.loader import load_model, load_model_config
from ktengine.model.tokenizer import Tokenizer
from ktengine.model_runner import ModelRunner
from ktengine.moe import placement
from ktengine.moe.dynamic import DynamicPlacer
from ktengine.moe.hybrid import HybridSetup, build_hybrid
from ktengine.moe.recorder import ExpertDistributionRecorder
from ktengine.state_cache import StateCache

if TYPE_CHECKING:
    from ktengine.parallel.workers import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_TOKENS = 65536


@dataclass
class LoadedModel:
    model_dir: Path
    default_name: str
    model_config: ModelConfig
    model: MoEForCausalLM
    tokenizer: Tokenizer
    kv_cache: KVCache
    device: torch.device
    max_model_len: int
    hybrid: HybridSetup
    recorder: ExpertDistributionRecorder | None
    dynamic: DynamicPlacer | None
    workers: WorkerPool | None = None  # tensor parallel: ranks 1.. (this process is rank 0)
    cuda_graph_max_bs: int = 0  # decode steps up to this batch replay CUDA graphs (0: eager)
    compile_decode: bool = False  # graph steps run MoE layers' attention + routing compiled

    @property
    def pass_hooks(self) -> list:
        return [h for h in (self.recorder, self.dynamic) if h is not None]

    def runner(self) -> ModelRunner:
        if self.workers is None:
            runner = ModelRunner(self.model, self.kv_cache, self.device, self.pass_hooks)
            if self.cuda_graph_max_bs:
                from ktengine.decode_graphs import DecodeGraphs

                runner.use_graphs(DecodeGraphs(
                    self.model, self.kv_cache, runner.layer_caches, self.hybrid, self.device,
                    self.cuda_graph_max_bs, self.max_model_len, compile=self.compile_decode))
            return runner
        from ktengine.parallel.runner import TensorParallelRunner

        return TensorParallelRunner(self.model, self.kv_cache, self.device, self.pass_hooks,
                                    self.workers)

    def close(self) -> None:
        """Releases what the model holds outside Python's memory (CPU expert threads, and
        the other tensor-parallel ranks' processes)."""
        try:
            self.hybrid.close()
        finally:
            if self.workers is not None:
                self.workers.close()


def resolve_model_dir(model: str | None) -> tuple[Path, str]:
    if model is None:
        from ktengine.model.demo import ensure_demo_model

        path = ensure_demo_model()
        log.info("no --model given: using the built-in demo model at %s", path)
        return path, "ktengine-demo"
    path = Path(model).expanduser()
    return path, path.name or str(path)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"invalid device {device!r}") from None
    if dev.type not in ("cpu", "cuda"):  # e.g. meta would crash the first step
        raise ConfigError(f"invalid device {device!r}: ktengine runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but torch sees "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def build_state_cache(config: EngineConfig, model_config: ModelConfig,
                      device: torch.device) -> StateCache | None:
    """The linear-attention layers' per-request state pool; None for models without them.

    One slot per running sequence, so the slot count also caps the running requests.
    """
    linear, layers = model_config.linear_attention, len(model_config.linear_layer_ids)
    if linear is None or layers == 0:
        return None
    num_slots = config.cache.max_state_slots or config.scheduler.max_running_requests
    if num_slots < 1:
        raise ConfigError(f"max_state_slots must be positive, got {num_slots}")
    per_slot = StateCache.bytes_per_slot(layers, linear, model_config.dtype)
    log.info("linear-attention state: %d slots of %.2f MiB (%.1f MiB) for %d layers; "
             "at most %d running requests", num_slots, per_slot / 2**20,
             num_slots * per_slot / 2**20, layers,
             min(num_slots, config.scheduler.max_running_requests))
    return StateCache(layers, num_slots, linear, model_config.dtype, device)


def resolve_model_config(config: EngineConfig, model_dir: Path) -> ModelConfig:
    model_config = load_model_config(model_dir, config.dtype)
    if config.dtype is not None:
        model_config = replace(model_config, dtype=parse_dtype(config.dtype))
    return model_config


def build_kv_cache(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                   num_kv_heads: int) -> tuple[KVCache, int]:
    """The KV cache (of `num_kv_heads` heads: fewer on a tensor-parallel rank) and the max
    model length."""
    cache = config.cache
    max_total = cache.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS
    max_model_len = cache.max_model_len or min(model_config.max_position_embeddings, max_total)
    if max_model_len > max_total:
        raise ConfigError(f"max model length {max_model_len} exceeds max total tokens {max_total}")
    num_blocks = cache.num_blocks or -(-max_total // cache.block_size)
    num_kv_layers = len(model_config.kv_layer_ids)  # linear-attention layers keep no K/V
    kv = KVCache(num_kv_layers, num_blocks, cache.block_size, num_kv_heads,
                 model_config.head_dim, model_config.dtype, device,
                 state=build_state_cache(config, model_config, device))
    per_token = KVCache.bytes_per_token(num_kv_layers, num_kv_heads,
                                        model_config.head_dim, model_config.dtype)
    log.info("KV cache: %d tokens in %d blocks of %d (%.1f MiB); max model length %d",
             num_blocks * cache.block_size, num_blocks, cache.block_size,
             per_token * num_blocks * cache.block_size / 2**20, max_model_len)
    return kv, max_model_len


def load(config: EngineConfig, progress: bool = True) -> LoadedModel:
    model_dir, name = resolve_model_dir(config.model)
    model_config = resolve_model_config(config, model_dir)
    device = resolve_device(config.device)
    log.info("model %s (%s): %d layers, %d MoE layers × %d experts, top-%d, %s on %s",
             name, model_config.architecture, model_config.num_layers, model_config.num_moe_layers,
             model_config.num_experts, model_config.top_k, str(model_config.dtype).replace("torch.", ""),
             device)
    placement.validate(config.placement)
    mask = placement.gpu_expert_mask(config.placement, model_config)  # before the slow load
    tokenizer = Tokenizer.from_dir(model_dir)
    if config.parallel.tp_size != 1:  # (sizes below 1 are refused there)
        from ktengine.parallel.workers import load_tensor_parallel

        model, hybrid, kv, max_model_len, workers = load_tensor_parallel(
            config, model_dir, model_config, mask, device, progress)
    else:
        workers = None
        model = load_model(model_dir, model_config, device, progress=progress,
                           fp8_gpu=config.fp8_gpu)
        hybrid = build_hybrid(model, model_config, config.moe, mask, device,
                              keep_host_weights=config.placement.dynamic_update, progress=progress)
        kv, max_model_len = build_kv_cache(config, model_config, device, model_config.num_kv_heads)
    recorder = dynamic = None
    if config.recorder.mode or config.recorder.record_gpu_masks:
        recorder = ExpertDistributionRecorder(model_config, config.recorder.mode,
                                              config.recorder.record_gpu_masks, hybrid.mask)
    if config.placement.dynamic_update:
        dynamic = DynamicPlacer(hybrid, config.placement.gpu_prefill_token_threshold, device=device)
    if recorder is not None:
        for block in model.moe_blocks():
            block.observer = recorder.observe
    return LoadedModel(model_dir, name, model_config, model, tokenizer, kv, device, max_model_len,
                       hybrid, recorder, dynamic, workers,
                       cuda_graph_max_bs=graph_batch_limit(config, model, kv, device, workers),
                       compile_decode=not config.disable_torch_compile)


def graph_batch_limit(config: EngineConfig, model: MoEForCausalLM, kv: KVCache,
                      device: torch.device, workers) -> int:
    """The largest decode batch replayed as a CUDA graph; 0 when decode runs eagerly."""
    from ktengine.decode_graphs import DecodeGraphs

    if config.disable_cuda_graph or config.cuda_graph_max_bs < 1:
        return 0
    why_not = "tensor parallel (eager only for now)" if workers is not None else \
        DecodeGraphs.supported(model, kv, device)
    if why_not is not None:
        if device.type == "cuda":
            log.info("CUDA graphs off: %s", why_not)
        return 0
    max_bs = min(config.cuda_graph_max_bs, config.scheduler.max_running_requests)
    log.info("CUDA graphs on: decode batches up to %d replay captured graphs", max_bs)
    return max_bs
