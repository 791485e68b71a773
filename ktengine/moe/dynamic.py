"""Dynamic expert placement: GPU slots follow the experts the running workload uses.

Every MoE layer counts its routed (token, expert) pairs on the device, in every pass, eager or
replayed from a CUDA graph (padding rows excluded), without a host sync. An update runs after
a pass with at least `threshold` prefill tokens (a new prompt shifts the mix most) and after
every `interval` passes without one (long decodes drift too). It folds the counts since the
last update into an exponentially decayed count per (layer, expert), then each layer compares
its hottest CPU-resident experts with its coldest GPU-resident ones and swaps a pair only when

    (count_in − count_out) × cpu_seconds_per_pair × horizon  >  move_seconds   (worth the copy)
    count_in > (1 + hysteresis) × count_out                                    (no thrashing)

with both costs measured at start-up (the CPU kernel's time per routed pair, the time to
copy one expert into a slot) and horizon = 1 / (1 − decay), the number of update intervals
the decayed count remembers: a placement made now is expected to serve at least that long.
A swap never exposes half-copied weights: the evicted expert is handed to the CPU (which holds
every expert) at once, the incoming one's weights are copied into the freed slot on a copy
stream while serving continues, and its mask bit flips only at a later step boundary, after
the copy has finished.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ktengine.moe.hybrid import HybridSetup

log = logging.getLogger(__name__)


@dataclass
class _PendingLoad:
    layer: int
    slot: int
    expert: int
    event: object | None  # torch.cuda.Event, None when the copy was synchronous


class DynamicPlacer:
    def __init__(self, hybrid: HybridSetup, threshold: int, decay: float = 0.7,
                 hysteresis: float = 0.25, device: torch.device | None = None,
                 interval: int = 64) -> None:
        if hybrid.host_weights is None:
            raise ValueError("dynamic placement needs the host expert weights kept")
        self.hybrid = hybrid
        self.threshold = threshold
        self.decay = decay
        self.horizon = 1.0 / (1.0 - decay)
        self.hysteresis = hysteresis
        self.device = device or torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        num_layers, num_experts = hybrid.mask.shape
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.interval = interval
        self._passes = 0  # since the last update
        self._active = False
        # each layer counts its routed pairs on the device (HybridExperts.route_counts)
        self._routed = torch.zeros(num_layers, num_experts, dtype=torch.float32, device=self.device)
        for i, layer in enumerate(hybrid.layers):
            layer.route_counts = self._routed[i]
        self._pending: list[_PendingLoad] = []
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.cpu_seconds_per_pair = hybrid.costs.cpu_seconds_per_pair
        self.move_seconds = hybrid.costs.move_seconds
        self.num_updates = 0
        log.info("dynamic expert placement: threshold %d prefill tokens; CPU %.1f us per routed pair, "
                 "%.1f us to move one expert", threshold, self.cpu_seconds_per_pair * 1e6,
                 self.move_seconds * 1e6)

    # -- pass hooks (model thread) ---------------------------------------------------------

    def begin_pass(self, input_ids: torch.Tensor, num_prefill_tokens: int) -> None:
        self._finish_loads()
        self._active = num_prefill_tokens >= self.threshold

    def end_pass(self) -> None:
        self._passes += 1
        if not self._active and self._passes < self.interval:
            return
        self._active = False
        self._passes = 0
        routed = self._routed.to("cpu", torch.float64)  # the one sync, once per update
        self._routed.zero_()
        self.counts.mul_(self.decay).add_(routed)
        self.update()

    def quiet(self) -> bool:
        """True if neither the pass ending now nor the next one changes the placement (no
        update due, no load to finish): a decode step may then be launched while another is
        in flight, since both read the same mask and slots (ModelRunner.can_launch)."""
        return not self._active and not self._pending and self._passes + 2 < self.interval

    def close(self) -> None:
        """Stops the counting (the layers keep serving with the last placement)."""
        for layer in self.hybrid.layers:
            layer.route_counts = None

    # -- the update ------------------------------------------------------------------------

    def plan(self) -> list[tuple[int, int, int]]:
        """(layer, expert_in, expert_out) swaps worth making now: per layer, its CPU experts
        hottest first (ties: lower id) against its GPU experts coldest first, paired in order
        up to the first pair that fails the rule. Tensor ops per layer, no per-expert Python."""
        swaps = []
        mask = self.hybrid.mask
        free = ~mask  # CPU-resident and not already on its way to the GPU
        for p in self._pending:
            free[p.layer, p.expert] = False
        scale = self.cpu_seconds_per_pair * self.horizon
        for layer in range(mask.shape[0]):
            counts = self.counts[layer]
            gpu, cpu = mask[layer].nonzero().flatten(), free[layer].nonzero().flatten()
            n = min(gpu.numel(), cpu.numel())
            if n == 0:
                continue
            # stable sorts over ids in increasing order break count ties by the lower id
            coldest = gpu[torch.sort(counts[gpu], stable=True).indices[:n]]
            hottest = cpu[torch.sort(-counts[cpu], stable=True).indices[:n]]
            c_in, c_out = counts[hottest], counts[coldest]
            ok = (c_in > (1 + self.hysteresis) * c_out) & ((c_in - c_out) * scale > self.move_seconds)
            take = int(ok.to(torch.int32).cumprod(0).sum())
            swaps += [(layer, e_in, e_out) for e_in, e_out in
                      zip(hottest[:take].tolist(), coldest[:take].tolist(), strict=True)]
        return swaps

    def update(self) -> int:
        swaps = self.plan()
        if not swaps:
            return 0
        t0 = time.perf_counter()
        moved_bytes = 0
        for layer, e_in, e_out in swaps:
            hybrid_layer = self.hybrid.layers[layer]
            slots = hybrid_layer.slots
            slot = slots.expert_of_slot.index(e_out)
            self.hybrid.mask[layer, e_out] = False  # the CPU serves e_out from now on
            slots.slot_of_expert[e_out] = slots.capacity
            gate, up, down = (t[e_in] for t in self.hybrid.host_weights[layer])
            slots.load(slot, e_in, gate, up, down, stream=self.copy_stream)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self._pending.append(_PendingLoad(layer, slot, e_in, event))
            moved_bytes += sum(t.numel() * t.element_size() for t in (gate, up, down))
        if not self.cuda:
            self._finish_loads()
        self.num_updates += 1
        log.info("dynamic expert update %d: %d experts moved to the GPU (%.1f MiB) in %.1f ms",
                 self.num_updates, len(swaps), moved_bytes / 2**20, (time.perf_counter() - t0) * 1e3)
        return len(swaps)

    def _finish_loads(self) -> None:
        """Flips the mask for every expert whose weights have fully arrived in its slot."""
        still = []
        for p in self._pending:
            if p.event is not None and not p.event.query():
                still.append(p)
                continue
            slots = self.hybrid.layers[p.layer].slots
            slots.expert_of_slot[p.slot] = p.expert
            slots.slot_of_expert[p.expert] = p.slot
            self.hybrid.mask[p.layer, p.expert] = True
        self._pending = still
