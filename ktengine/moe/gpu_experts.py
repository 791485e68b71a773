"""Routed experts computed with torch on the model's device (the GPU, or the CPU without one).

Experts are stacked: gate/up [E, I, H], down [E, H, I]. The loop visits only experts that
received tokens, so its cost follows the routed work, not the number of experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_experts_forward(
    x: torch.Tensor,  # [T, H]
    gate: torch.Tensor,  # [E, I, H]
    up: torch.Tensor,  # [E, I, H]
    down: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k] float32
    act,
    expert_allowed: torch.Tensor | None = None,  # bool[E]: only these experts are computed
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate.shape[0]).tolist()
    tokens = order // topk_ids.shape[1]  # token of each sorted (token, slot) pair
    weights = topk_weights.reshape(-1)[order]
    allowed = expert_allowed.tolist() if expert_allowed is not None else None
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        if allowed is None or allowed[e]:
            rows = tokens[start:end]
            xe = x[rows]
            he = act(F.linear(xe, gate[e])) * F.linear(xe, up[e])
            ye = F.linear(he, down[e])
            out.index_add_(0, rows, ye.float() * weights[start:end, None])
        start = end
    return out.to(x.dtype)
