"""Top-k routing: softmax over all experts in fp32, top-k, optional renormalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns topk_ids [T, k] int64 and topk_weights [T, k] float32."""
    logits = F.linear(x, router_weight)  # [T, E], model dtype as in transformers
    probs = torch.softmax(logits.float(), dim=-1)
    # unsorted: the order of a token's k experts does not matter, and sorting them costs a
    # kernel per layer on CUDA
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1, sorted=False)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights
