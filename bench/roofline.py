"""The decode roofline: a lower bound on one decode step's time from the bytes it must read.

A decode step at batch B reads, at least once each:
  - the dense weights D (attention, norms, routers, dense MLPs, lm_head; one embedding row
    per token is negligible), from GPU memory;
  - the KV cache the B sequences attend to, KV = B × context × K/V bytes per token, from GPU
    memory;
  - in MoE layer l, the distinct routed experts the B tokens pick: g_l of them resident on
    the GPU (read from HBM), c_l on the CPU (read from DRAM by the CPU kernels).

CPU and GPU experts of one layer run at the same time (the CPU call is submitted, the GPU
experts launched, then the CPU result awaited), so a layer's routed part takes at least the
longer of the two reads. Nothing else overlaps: layer l's experts need layer l's attention
output, and layer l+1's attention needs layer l's expert output. Hence, with e the bytes of
one expert (gate, up and down),

    t_step ≥ (D + KV) / HBM  +  Σ_l max(c_l · e / DRAM,  g_l · e / HBM)

with DRAM the CPU's read bandwidth and HBM the GPU's, both measured in the same run
(bench/machine.py); a CPU-resident expert's e is its size in the CPU kernels' weight format. Without a CUDA device every byte streams from the same DRAM, whichever
side computes it: t_step ≥ (D + KV + Σ_l (c_l + g_l) · e) / DRAM. With tensor parallelism
the GPUs read at once: D, KV and the GPU-expert bytes are rank 0's share (its slice of the
dense weights, KV heads and GPU-expert slices; replicated weights in full); the CPU experts
run on rank 0 only and are read whole. The decode roofline in tokens/s is B / t_step.

Distinct experts per step come either from counting the routing of a real run
(`DistinctExperts`, an observer that syncs, so use it on an untimed run, or counters
subtracted between runs) or from routing statistics (`expected_distinct`: token choices
drawn independently with the recorded per-expert frequencies; it ignores per-prompt
locality, which only concentrates a batch on fewer experts, so it errs high on bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBytes:
    """What one decode step reads: GPU-side dense + KV bytes and per-MoE-layer expert bytes."""

    dense: float  # dense weights on (rank 0's) GPU
    kv: float  # KV cache entries read by attention
    gpu_experts: tuple[float, ...]  # [num_moe_layers] distinct GPU-resident expert bytes
    cpu_experts: tuple[float, ...]  # [num_moe_layers] distinct CPU-resident expert bytes

    @property
    def total(self) -> float:
        return self.dense + self.kv + sum(self.gpu_experts) + sum(self.cpu_experts)


def step_seconds(b: StepBytes, dram_gbps: float, hbm_gbps: float | None) -> float:
    """Lower bound on one decode step's time (the module docstring's formula)."""
    dram = dram_gbps * 1e9
    if hbm_gbps is None:  # CPU-only: one memory serves both sides
        return b.total / dram
    hbm = hbm_gbps * 1e9
    routed = sum(max(c / dram, g / hbm) for g, c in zip(b.gpu_experts, b.cpu_experts))
    return (b.dense + b.kv) / hbm + routed


def decode_tok_s(batch: float, b: StepBytes, dram_gbps: float, hbm_gbps: float | None) -> float:
    """The decode roofline in tokens/s at `batch` sequences."""
    return batch / step_seconds(b, dram_gbps, hbm_gbps)


# -- the byte counts of a loaded model ----------------------------------------------------


def dense_bytes(model: torch.nn.Module, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                tied: bool) -> int:
    """Parameter bytes a decode step reads on the GPU: every parameter but the embedding table
    (routed experts are no longer parameters once packed: the CPU store and GPU slots hold
    them). With tied embeddings the table is lm_head too, so it stays."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = vocab_size * hidden_size * torch.empty((), dtype=dtype).element_size()
    return total if tied else total - embed


def kv_bytes_per_token(kv_layers: list) -> int:
    """K and V bytes of one token over all attention layers ([(k, v)] of [slots, heads, dim])."""
    return sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size()
               for k, v in kv_layers)


def engine_step_bytes(engine, batch: float, context: float, gpu_experts: list[float],
                      cpu_experts: list[float]) -> StepBytes:
    """StepBytes of a running AsyncEngine at `batch` sequences of mean `context` tokens, given
    the distinct GPU- and CPU-resident experts per MoE layer and step."""
    cfg = engine.model_config
    tp = engine.config.parallel.tp_size
    dense = dense_bytes(engine.loaded.model, cfg.vocab_size, cfg.hidden_size, cfg.dtype,
                        cfg.tie_word_embeddings)
    kv = batch * context * kv_bytes_per_token(engine.loaded.kv_cache.layers)
    e = cfg.expert_nbytes
    return StepBytes(dense, kv, tuple(g * e / tp for g in gpu_experts),
                     tuple(c * cpu_expert_nbytes(engine) for c in cpu_experts))


def cpu_expert_nbytes(engine) -> int:
    """Bytes of one expert as the CPU kernels read it: its packed size in the CPU store's
    weight format (int8 / int4 with their scales, or the model's dtype)."""
    hybrid = engine.loaded.hybrid
    if hybrid is None or not hybrid.layers:
        return engine.model_config.expert_nbytes
    return hybrid.layers[0].store.expert_nbytes()


# -- distinct experts per step ------------------------------------------------------------


class DistinctExperts:
    """Observer counting, per decode pass and MoE layer, the distinct experts the batch uses
    (split by the GPU mask): the routed bytes a step must read, whatever the routing skew.
    Passes of more than `max_tokens` tokens (prefills) are skipped. Syncs at every layer."""

    def __init__(self, mask: torch.Tensor, max_tokens: int) -> None:
        self.mask, self.max_tokens = mask, max_tokens  # mask: bool [num_moe_layers, E], host
        layers = mask.shape[0]
        self.gpu, self.cpu, self.calls = [0] * layers, [0] * layers, [0] * layers

    def __call__(self, moe_index: int, topk_ids: torch.Tensor) -> None:
        if topk_ids.shape[0] > self.max_tokens:
            return
        used = torch.unique(topk_ids).cpu()
        on_gpu = int(self.mask[moe_index][used].sum())
        self.gpu[moe_index] += on_gpu
        self.cpu[moe_index] += used.numel() - on_gpu
        self.calls[moe_index] += 1

    def per_step(self) -> tuple[list[float], list[float]]:
        """Mean distinct (GPU, CPU) experts per decode step, per MoE layer."""
        steps = [max(1, c) for c in self.calls]
        return ([g / s for g, s in zip(self.gpu, steps)], [c / s for c, s in zip(self.cpu, steps)])


def expected_distinct(counts: torch.Tensor, mask: torch.Tensor, batch: float,
                      top_k: int) -> tuple[list[float], list[float]]:
    """Expected distinct (GPU, CPU) experts per MoE layer for `batch` tokens, each token
    picking expert e with probability q_e = k · count_e / Σ count (routing statistics
    [num_moe_layers, E]), independently: E[distinct] = Σ_e 1 − (1 − q_e)^B."""
    counts = counts.to(torch.float64)
    q = (top_k * counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).clamp(0, 1)
    used = 1 - (1 - q) ** batch  # [L, E]
    return ((used * mask).sum(dim=1).tolist(), (used * ~mask).sum(dim=1).tolist())
