"""Routed experts computed on the model's device (the GPU, or the CPU without one).

Experts are stacked: gate/up [E, I, H], down [E, H, I]. On CUDA with a SiLU activation the
resident experts run as one Triton kernel pair (fused_moe_triton.py) that reads each routed
expert's weights once; otherwise torch: the loop visits only experts that received tokens, so
its cost follows the routed work, not the number of experts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ktengine import env


def torch_experts_forward(
    x: torch.Tensor,  # [T, H]
    gate: torch.Tensor,  # [E, I, H]
    up: torch.Tensor,  # [E, I, H]
    down: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k] ids into the stacks; ids >= E are skipped
    topk_weights: torch.Tensor,  # [T, k] float32
    act,
) -> torch.Tensor:
    num_experts = gate.shape[0]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts)[:num_experts].tolist()
    tokens = order // topk_ids.shape[1]  # token of each sorted (token, slot) pair
    weights = topk_weights.reshape(-1)[order]
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        rows = tokens[start:end]
        xe = x[rows]
        he = act(F.linear(xe, gate[e])) * F.linear(xe, up[e])
        ye = F.linear(he, down[e])
        out.index_add_(0, rows, ye.float() * weights[start:end, None])
        start = end
    return out.to(x.dtype)


@dataclass(frozen=True)
class Counters:
    """What a graph step counts in a layer, on the device and without a host sync: over the
    pairs of the rows `valid` marks (bool [T]; None: all rows), the resident ones into
    gpu_pairs (int64 [1]), and every one per expert id into routes (float32 [E])."""

    valid: torch.Tensor | None = None
    gpu_pairs: torch.Tensor | None = None
    routes: torch.Tensor | None = None

    def add_torch(self, ids: torch.Tensor, slots: torch.Tensor, num_slots: int) -> None:
        """The same counts with torch ops (a few launches each)."""
        live = None if self.valid is None else self.valid[:, None].expand(ids.shape)
        if self.gpu_pairs is not None:
            resident = slots < num_slots
            self.gpu_pairs.add_((resident if live is None else resident & live).sum())
        if self.routes is not None:
            ones = torch.ones(ids.numel(), device=ids.device) if live is None else \
                live.reshape(-1).float()
            self.routes.index_add_(0, ids.reshape(-1), ones)


FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_kernel(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """fused_moe_triton.fused_experts if it serves weights of `dtype` on `device`, else None.

    Needs KTENGINE_FUSED_MOE on (the default), triton, and CUDA or Triton's interpreter.
    """
    if not env.fused_moe() or dtype not in FUSED_DTYPES:
        return None
    if device.type != "cuda" and not env.triton_interpreter():
        return None  # checked before the import: a CPU run does not load triton
    try:
        from ktengine.moe import fused_moe_triton
    except ImportError:
        return None
    return fused_moe_triton.fused_experts if fused_moe_triton.available(device) else None


def is_silu(act) -> bool:
    """True for the activation the fused kernel computes (layers.activation gives F.silu)."""
    return act is F.silu or isinstance(act, torch.nn.SiLU)


GATHER_MAX_PAIRS = 64  # up to this many (token, expert) pairs on CUDA, the sync-free gathered path


class GpuExpertSlots:
    """The GPU-resident experts of one MoE layer: a fixed number of weight slots.

    slot_of_expert [E] (device) maps an expert to its slot, or to `capacity` (a sentinel the
    compute loop skips) when the expert is not resident. Dynamic placement rewrites slots
    and the map between steps, never during a forward pass.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 expert_ids: list[int], num_experts: int, device: torch.device) -> None:
        """gate/up [E, I, H], down [E, H, I] in host memory (pinned: the copies are async)."""
        self.capacity = len(expert_ids)
        self.num_experts = num_experts
        self.gate = torch.empty(self.capacity, *gate.shape[1:], dtype=gate.dtype, device=device)
        self.up = torch.empty(self.capacity, *up.shape[1:], dtype=up.dtype, device=device)
        self.down = torch.empty(self.capacity, *down.shape[1:], dtype=down.dtype, device=device)
        for slot, e in enumerate(expert_ids):  # one contiguous copy per expert, no host gather
            self.load(slot, e, gate[e], up[e], down[e])
        self.expert_of_slot = list(expert_ids)
        self.slot_of_expert = torch.full((num_experts,), self.capacity, dtype=torch.long, device=device)
        if expert_ids:
            idx = torch.tensor(expert_ids, dtype=torch.long, device=device)
            self.slot_of_expert[idx] = torch.arange(self.capacity, device=device)
        self.fused = fused_kernel(torch.device(device), self.gate.dtype)  # or None: the torch paths

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, act) -> torch.Tensor:
        """The resident experts' share of the layer output [T, H]."""
        if self.capacity == 0:
            return torch.zeros_like(x)
        slots = self.slot_of_expert[topk_ids]  # [T, k]; capacity = not resident
        if self._fuses(x, act):
            return self.fused(x, self.gate, self.up, self.down, slots, topk_weights)
        if x.is_cuda and topk_ids.numel() <= GATHER_MAX_PAIRS:  # on a CPU the copy costs more
            return self._gathered(x, slots, topk_weights, act)
        return torch_experts_forward(x, self.gate, self.up, self.down, slots, topk_weights, act)

    def forward_static(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       act, counter: torch.Tensor | None = None,
                       valid: torch.Tensor | None = None,
                       routes: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
        """Like forward, in fixed shapes and with no host sync (for CUDA graphs).

        The fused kernel where it applies. Otherwise, up to capacity/2 pairs gather each pair's
        weights (copied, then read); beyond, every slot runs over every token (each resident
        expert read once) and a [T, capacity] weight matrix combines them.
        counter (int64 [1], device) += resident pairs of the `valid` rows (bool [T]); routes
        (float32 [E], device) += their routed pairs per expert (dynamic placement's counts).
        reduce=False: the fused kernel may return its unreduced fp32 rows [T, k, H] instead
        (handoff_triton.collect sums them); the other paths always return [T, H].
        """
        counters = Counters(valid, counter, routes)
        if self._fuses(x, act) and self.capacity:  # the kernel counts, no torch op here
            return self.fused(x, self.gate, self.up, self.down, topk_ids, topk_weights,
                              slot_of_expert=self.slot_of_expert, counters=counters, reduce=reduce)
        slots = self.slot_of_expert[topk_ids]  # [T, k]
        counters.add_torch(topk_ids, slots, self.capacity)
        if self.capacity == 0:
            return torch.zeros_like(x)
        resident = slots < self.capacity
        if 2 * topk_ids.numel() <= self.capacity:  # a gathered pair's weights are read twice
            return self._gathered(x, slots, topk_weights, act)
        t = x.shape[0]
        w = (topk_weights * resident).float()
        comb = torch.zeros(t, self.capacity + 1, dtype=torch.float32, device=x.device)
        comb.scatter_add_(1, slots, w)  # non-resident pairs land in the sentinel column
        h = act(torch.matmul(x, self.gate.transpose(1, 2))) * torch.matmul(x, self.up.transpose(1, 2))
        y = torch.bmm(h, self.down.transpose(1, 2))  # [C, T, H]
        return (y.float() * comb[:, : self.capacity].t()[:, :, None]).sum(dim=0).to(x.dtype)

    def warm_up(self, top_k: int) -> int:
        """Runs the fused kernel once at each of its tile sizes (decode, middle, prefill) on
        zeros, at the sizes either side of each band's edge (a call with fewer pairs than
        slots launches its grid by pair, a larger one by slot: two variants), so that its
        one-time compilations (seconds each) happen now rather than in a user's first long
        prompt. Returns the calls made (0: no fused kernel here)."""
        if self.fused is None or self.capacity == 0 or self.gate.device.type != "cuda":
            return 0
        from ktengine.moe.fused_moe_triton import DECODE_MAX_PAIRS, MIDDLE_MAX_PAIRS

        calls = 0
        for pairs in (top_k, DECODE_MAX_PAIRS, DECODE_MAX_PAIRS + 1, MIDDLE_MAX_PAIRS,
                      MIDDLE_MAX_PAIRS + 1):
            t = -(-pairs // top_k)
            x = torch.zeros(t, self.gate.shape[2], dtype=self.gate.dtype, device=self.gate.device)
            slots = torch.arange(t * top_k, device=x.device).view(t, top_k) % self.capacity
            self.fused(x, self.gate, self.up, self.down, slots, torch.ones(t, top_k, device=x.device))
            calls += 1
        return calls

    def _fuses(self, x: torch.Tensor, act) -> bool:
        """The Triton kernel serves this call: it exists here, computes `act`, takes x's dtype."""
        return self.fused is not None and is_silu(act) and x.dtype == self.gate.dtype

    def _gathered(self, x, slots, topk_weights, act) -> torch.Tensor:
        """Few pairs (decode): gather each pair's weights and run batched products.

        No host sync and a fixed, small number of kernels: reading P experts' weights once
        more as a copy is cheaper than a per-expert loop at this size. Non-resident pairs
        point at slot 0 with weight 0.
        """
        t, k = slots.shape
        resident = slots < self.capacity
        idx = torch.where(resident, slots, torch.zeros_like(slots)).reshape(-1)  # [P]
        w = (topk_weights * resident).reshape(-1, 1, 1).float()  # [P, 1, 1]
        xp = x.repeat_interleave(k, dim=0)[:, None, :]  # [P, 1, H]
        h = act(torch.bmm(xp, self.gate[idx].transpose(1, 2))) * torch.bmm(xp, self.up[idx].transpose(1, 2))
        y = torch.bmm(h, self.down[idx].transpose(1, 2))  # [P, 1, H]
        return (y.float() * w).view(t, k, -1).sum(dim=1).to(x.dtype)

    def load(self, slot: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             stream=None) -> None:
        """Copies one expert's weights into a slot (asynchronously on `stream` if given)."""
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            self.gate[slot].copy_(gate, non_blocking=True)
            self.up[slot].copy_(up, non_blocking=True)
            self.down[slot].copy_(down, non_blocking=True)
