"""Which slice of each weight a tensor-parallel rank keeps, and the layers that join the slices.

Megatron-style, over a model loaded whole on the host:
  attention    q/k/v keep this rank's heads (kv heads replicated when there are fewer than
               ranks); o_proj keeps the matching input columns and all-reduces its output
  dense MLP    gate/up keep a slice of the intermediate dim, down the matching columns, then
               an all-reduce
  MoE layer    the shared expert is sliced like the dense MLP (its sigmoid gate and the router
               stay whole); GPU-resident routed experts keep the same slice of their
               intermediate dim; the CPU experts run whole on rank 0 only. The routed and
               shared partial sums meet in one all-reduce per layer (MoEBlock.all_reduce).
  the rest     embeddings, norms, lm_head and rotary tables are replicated
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ktengine.config import ModelConfig, QKNorm
from ktengine.errors import ConfigError
from ktengine.model.attention import Attention
from ktengine.model.decoder import MoEBlock, MoEForCausalLM
from ktengine.model.layers import GatedMLP, Linear, empty_param
from ktengine.moe.gpu_experts import GpuExpertSlots

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks, in place


def check_shardable(config: ModelConfig, tp: int) -> None:
    """One-line ConfigError when `config` cannot be split over `tp` ranks."""
    if tp < 1:
        raise ConfigError(f"tensor parallel size must be at least 1, got {tp}")
    if config.linear_attention is not None:
        raise ConfigError(f"{config.architecture} (linear attention) does not support tensor "
                          f"parallelism yet; use --tp-size 1")
    if config.num_heads % tp:
        raise ConfigError(f"--tp-size {tp} does not divide the model's {config.num_heads} "
                          f"attention heads")
    kv = config.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ConfigError(f"--tp-size {tp} and the model's {kv} key/value heads do not divide "
                          f"one another")
    sizes = {"intermediate_size": config.intermediate_size,
             "moe_intermediate_size": config.moe_intermediate_size,
             "shared_expert_intermediate_size": config.shared_expert_intermediate_size}
    for name, size in sizes.items():
        if size % tp:
            raise ConfigError(f"--tp-size {tp} does not divide the model's {name} ({size})")


def local_kv_heads(config: ModelConfig, tp: int) -> int:
    """Key/value heads one rank holds (and caches)."""
    return max(1, config.num_kv_heads // tp)


def _span(size: int, rank: int, tp: int) -> tuple[int, int]:
    per = size // tp
    return rank * per, (rank + 1) * per


def expert_slicer(config: ModelConfig, rank: int, tp: int):
    """gate, up [E, I, H], down [E, H, I] → this rank's slice of I (views)."""
    lo, hi = _span(config.moe_intermediate_size, rank, tp)
    return lambda gate, up, down: (gate[:, lo:hi], up[:, lo:hi], down[:, :, lo:hi])


class RowParallelLinear(torch.nn.Module):
    """A linear layer holding some input columns; its partial outputs are summed over ranks."""

    def __init__(self, weight: torch.Tensor, all_reduce: AllReduce) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(F.linear(x, self.weight))


class ShardedRMSNorm(torch.nn.Module):
    """layers.RMSNorm over a projection split across ranks (OLMoE's whole-projection q/k norm).

    The sum of squares is all-reduced; with replicated kv heads every replica counts its
    heads again, so the mean divides by local size × ranks, which covers both cases.
    """

    def __init__(self, weight: torch.Tensor, eps: float, tp: int, all_reduce: AllReduce) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        self.eps, self.size, self.all_reduce = eps, weight.numel() * tp, all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        sum_sq = self.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        xf = xf * torch.rsqrt(sum_sq / self.size + self.eps)
        return self.weight * xf.to(dtype)


def _rows(linear: Linear, lo: int, hi: int) -> Linear:
    """The output rows [lo, hi) of a linear layer."""
    out = Linear(linear.weight.shape[1], hi - lo, linear.bias is not None, linear.weight.dtype)
    out.weight = torch.nn.Parameter(linear.weight[lo:hi].clone(), requires_grad=False)
    if linear.bias is not None:
        out.bias = torch.nn.Parameter(linear.bias[lo:hi].clone(), requires_grad=False)
    return out


def _columns(linear: Linear, lo: int, hi: int) -> Linear:
    """The input columns [lo, hi) of a bias-free linear layer (no reduction)."""
    out = Linear(hi - lo, linear.weight.shape[0], False, linear.weight.dtype)
    out.weight = torch.nn.Parameter(linear.weight[:, lo:hi].contiguous(), requires_grad=False)
    return out


def _shard_attention(attn: Attention, config: ModelConfig, rank: int, tp: int,
                     all_reduce: AllReduce) -> None:
    d = config.head_dim
    q_lo, q_hi = _span(config.num_heads, rank, tp)
    kv = config.num_kv_heads
    kv_lo = rank * kv // tp if kv >= tp else rank // (tp // kv)  # replicas of one head in a row
    kv_hi = kv_lo + local_kv_heads(config, tp)
    attn.q_proj = _rows(attn.q_proj, q_lo * d, q_hi * d)
    attn.k_proj = _rows(attn.k_proj, kv_lo * d, kv_hi * d)
    attn.v_proj = _rows(attn.v_proj, kv_lo * d, kv_hi * d)
    attn.o_proj = RowParallelLinear(attn.o_proj.weight[:, q_lo * d:q_hi * d], all_reduce)
    attn.num_heads, attn.num_kv_heads = q_hi - q_lo, kv_hi - kv_lo
    if config.qk_norm == QKNorm.FULL:
        eps = config.rms_norm_eps
        attn.q_norm = ShardedRMSNorm(attn.q_norm.weight[q_lo * d:q_hi * d], eps, tp, all_reduce)
        attn.k_norm = ShardedRMSNorm(attn.k_norm.weight[kv_lo * d:kv_hi * d], eps, tp, all_reduce)


def _shard_mlp(mlp: GatedMLP, rank: int, tp: int, all_reduce: AllReduce | None) -> None:
    """Slices the intermediate dim; all_reduce None leaves the partial sum to the caller."""
    lo, hi = _span(mlp.gate_proj.weight.shape[0], rank, tp)
    mlp.gate_proj = _rows(mlp.gate_proj, lo, hi)
    mlp.up_proj = _rows(mlp.up_proj, lo, hi)
    if all_reduce is None:
        mlp.down_proj = _columns(mlp.down_proj, lo, hi)
    else:
        mlp.down_proj = RowParallelLinear(mlp.down_proj.weight[:, lo:hi], all_reduce)


def shard_model(model: MoEForCausalLM, rank: int, tp: int, all_reduce: AllReduce) -> None:
    """Replaces, in place, every split layer of a whole model (on the host) by rank's slice.

    Routed experts are left whole: build_hybrid (rank 0) or install_expert_shards (the other
    ranks) take their slices.
    """
    config = model.config
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, config, rank, tp, all_reduce)
        mlp = layer.mlp
        if isinstance(mlp, MoEBlock):
            if mlp.shared_expert is not None:
                _shard_mlp(mlp.shared_expert, rank, tp, None)
            mlp.all_reduce = all_reduce
        else:
            _shard_mlp(mlp, rank, tp, all_reduce)


class ShardedGpuExperts:
    """The compute hook of one MoE layer on ranks > 0: only this rank's slice of the
    GPU-resident experts (the CPU experts are rank 0's)."""

    def __init__(self, slots: GpuExpertSlots, act) -> None:
        self.slots, self.act = slots, act

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.slots.forward(x, topk_ids, topk_weights, self.act)


def install_expert_shards(model: MoEForCausalLM, mask: torch.Tensor, rank: int, tp: int,
                          device: torch.device) -> None:
    """Ranks > 0: each MoE layer keeps its slice of the resident experts; the rest is freed."""
    config = model.config
    sliced = expert_slicer(config, rank, tp)
    for block in model.moe_blocks():
        ex = block.experts
        resident = mask[block.moe_index].nonzero().flatten().tolist()
        gate, up, down = sliced(ex.gate_proj, ex.up_proj, ex.down_proj)
        slots = GpuExpertSlots(gate, up, down, resident, config.num_experts, device)
        ex.compute = ShardedGpuExperts(slots, ex.act)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(ex, name, empty_param(0, dtype=config.dtype))
