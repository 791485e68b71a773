"""Top-k routing: softmax over all experts in fp32, top-k, optional renormalisation."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ktengine import env

# (logits [T, E], top_k, renormalize) -> (topk_ids [T, k] int64, topk_weights [T, k] float32)
TopK = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]


def fused_topk(top_k: int) -> TopK | None:
    """router_triton.topk_softmax where it can run (a CUDA device, KTENGINE_TRITON_ROUTER on,
    top_k within its limit), else None: torch's ops. Decided once, when a MoE block is built."""
    if not env.triton_router() or not torch.cuda.is_available():
        return None
    try:
        from ktengine.moe.router_triton import MAX_TOP_K, topk_softmax
    except ImportError:
        return None
    return topk_softmax if top_k <= MAX_TOP_K else None


def route(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
    topk: TopK | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns topk_ids [T, k] int64 and topk_weights [T, k] float32. `topk` (fused_topk),
    when given, takes the softmax, top-k and renormalisation of CUDA logits in one kernel."""
    logits = F.linear(x, router_weight)  # [T, E], model dtype as in transformers
    if topk is not None and logits.is_cuda:
        return topk(logits, top_k, norm_topk_prob)
    probs = torch.softmax(logits.float(), dim=-1)
    # unsorted: the order of a token's k experts does not matter, and sorting them costs a
    # kernel per layer on CUDA
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1, sorted=False)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_ids, topk_weights
