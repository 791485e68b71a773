"""Which routed experts live on the GPU: pure functions from (strategy, budget, statistics)
to the GPU expert mask bool[num_moe_layers, num_experts].

Budget: `--kt-num-gpu-experts N` is N per MoE layer; `--kt-gpu-experts-ratio r` is
int(r × layers × experts) in total and overrides N. Strategies follow the reference system:
  uniform        budget // L per layer (+1 for the first budget % L layers), lowest ids
  front-loading  fill layers in order with their lowest ids until the budget is spent
  random         `budget` cells drawn uniformly with a generator seeded 42
  frequency      the `budget` hottest cells of the statistics, ranked across layers; ties go
                 to the lower layer, then the lower expert id
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch

from ktengine.config import ModelConfig, PlacementConfig, PlacementStrategy
from ktengine.errors import ConfigError

log = logging.getLogger(__name__)

RANDOM_SEED = 42


def total_budget(config: PlacementConfig, num_layers: int, num_experts: int) -> int:
    """GPU expert slots in all MoE layers together."""
    if config.gpu_experts_ratio is not None:
        r = config.gpu_experts_ratio
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"--kt-gpu-experts-ratio must be between 0 and 1, got {r}")
        # floor, but 0.3 x 24 x 60 = 431.99999... is 432
        return math.floor(r * num_layers * num_experts + 1e-9)
    n = config.num_gpu_experts or 0
    if not 0 <= n <= num_experts:
        raise ConfigError(
            f"--kt-num-gpu-experts must be between 0 and the {num_experts} experts per layer, got {n}"
        )
    return n * num_layers


def uniform(budget: int, num_layers: int, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    if num_layers == 0:  # a model without MoE layers: nothing to place
        return mask
    per_layer, extra = divmod(budget, num_layers)
    for layer in range(num_layers):
        mask[layer, : min(num_experts, per_layer + (layer < extra))] = True
    return mask


def front_loading(budget: int, num_layers: int, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for layer in range(num_layers):
        take = min(budget, num_experts)
        mask[layer, :take] = True
        budget -= take
    return mask


def random(budget: int, num_layers: int, num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(RANDOM_SEED)
    cells = torch.randperm(num_layers * num_experts, generator=g)[:budget]
    mask = torch.zeros(num_layers * num_experts, dtype=torch.bool)
    mask[cells] = True
    return mask.view(num_layers, num_experts)


def frequency(budget: int, counts: torch.Tensor) -> torch.Tensor:
    """counts [num_layers, num_experts]: the `budget` largest cells (stable: lower index wins)."""
    flat = counts.reshape(-1).to(torch.float64)
    order = torch.sort(flat, descending=True, stable=True).indices[:budget]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(counts.shape)


def load_statistics(path: str | Path, model: ModelConfig) -> torch.Tensor:
    """Counts [num_moe_layers, num_experts] from a recorder dump (ours or SGLang's).

    Accepts a dict with `logical_count` [buffer, layers, experts] (summed over the buffer) or
    [layers, experts], or a bare tensor of those shapes; `layers` may count every hidden layer
    (dense layers' rows are dropped) or only the MoE layers.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-expert-location: file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the format before failing on it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (torch raises many kinds for a corrupt or foreign file)
        raise ConfigError(f"--init-expert-location: {path} is not a statistics file saved by "
                          "torch (a recorder dump, or a tensor)") from None
    counts = data.get("logical_count") if isinstance(data, dict) else data
    if not isinstance(counts, torch.Tensor):
        raise ConfigError(f"--init-expert-location: {path} holds no 'logical_count' tensor")
    if counts.dim() == 3:
        counts = counts.sum(dim=0)
    if counts.dim() != 2:
        raise ConfigError(f"--init-expert-location: logical_count has shape {tuple(counts.shape)}, "
                          f"expected [buffer, layers, experts]")
    if counts.dtype == torch.bool or counts.is_complex() or not bool(torch.isfinite(counts.double()).all()) \
            or bool((counts < 0).any()):
        raise ConfigError(f"--init-expert-location: {path} holds {counts.dtype} counts that are "
                          "not all finite and >= 0")
    layers, experts = counts.shape
    if experts != model.num_experts:
        raise ConfigError(f"--init-expert-location: statistics have {experts} experts per layer, "
                          f"the model has {model.num_experts}")
    if layers == model.num_layers:
        counts = counts[model.moe_layer_ids]
    elif layers != model.num_moe_layers:
        raise ConfigError(f"--init-expert-location: statistics have {layers} layers, the model has "
                          f"{model.num_layers} ({model.num_moe_layers} MoE)")
    if not bool(counts.any()):
        raise ConfigError(f"--init-expert-location: {path} counts no routed token (all zero): "
                          "record some traffic before dumping")
    return counts.to(torch.float64)


def gpu_expert_mask(config: PlacementConfig, model: ModelConfig) -> torch.Tensor:
    """The initial GPU expert mask bool[num_moe_layers, num_experts] for this config."""
    layers, experts = model.num_moe_layers, model.num_experts
    budget = total_budget(config, layers, experts)
    strategy = config.strategy
    counts = load_statistics(config.init_expert_location, model) if config.init_expert_location else None
    if strategy == PlacementStrategy.FREQUENCY and counts is None:
        log.warning("placement strategy 'frequency' needs --init-expert-location; using 'uniform'")
        strategy = PlacementStrategy.UNIFORM
    if strategy == PlacementStrategy.UNIFORM:
        return uniform(budget, layers, experts)
    if strategy == PlacementStrategy.FRONT_LOADING:
        return front_loading(budget, layers, experts)
    if strategy == PlacementStrategy.RANDOM:
        return random(budget, layers, experts)
    return frequency(budget, counts)


def validate(config: PlacementConfig) -> None:
    """Checks that do not need the model."""
    if config.dynamic_update and config.gpu_prefill_token_threshold is None:
        raise ConfigError("--kt-enable-dynamic-expert-update needs --kt-gpu-prefill-token-threshold")
    t = config.gpu_prefill_token_threshold
    if t is not None and t < 1:
        raise ConfigError(f"--kt-gpu-prefill-token-threshold must be at least 1, got {t}")
