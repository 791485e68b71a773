"""Hybrid MoE execution: each layer's (token, expert) pairs split by the GPU expert mask.

GPU-resident experts run on the model's device (GpuExpertSlots: a Triton kernel or torch); the
others run on the CPU kernels (CpuExpertStore), at the same time: the CPU call is submitted
first (it runs on the extension's own threads, GIL released), then the GPU experts are
launched, then the CPU result is awaited and added. With no CUDA device, the "GPU" side is
torch on the CPU.

The mask lives in host memory (pinned on CUDA) as bool[num_moe_layers, num_experts]; the CPU
kernels read their row at each call, so flipping it between steps needs no re-capture.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ktengine import env
from ktengine.config import ModelConfig, MoEConfig, WeightFormat
from ktengine.errors import ConfigError
from ktengine.moe.cpu_experts import BoundCall, CpuExpertStore, CpuThreadPool, host_functions
from ktengine.moe.cpu_experts import WeightFormat as CpuFormat
from ktengine.moe.gpu_experts import GpuExpertSlots, is_silu

log = logging.getLogger(__name__)


def share_cores(kernel_threads: int) -> None:
    """Gives torch's intra-op threads the cores the CPU expert pool leaves free (at least one).

    Both pools spin for a while after their parallel regions; when together they outnumber
    the cores, each steals the other's cores and small ops slow down severalfold (measured:
    2-core machine, demo model decode 13.0 → 8.0 ms per token). OMP_NUM_THREADS, when set,
    wins.
    """
    if env.torch_threads_set_by_user():
        return
    free = max(1, (os.cpu_count() or 1) - kernel_threads)
    if torch.get_num_threads() != free:
        log.info("torch intra-op threads: %d (the CPU expert pool has %d)", free, kernel_threads)
        torch.set_num_threads(free)


def cpu_format(config: MoEConfig, dtype: torch.dtype) -> CpuFormat:
    """AUTO keeps the checkpoint's precision (bf16 → bf16, fp32/fp16 → fp32): the exact path."""
    if config.weight_format != WeightFormat.AUTO:
        return CpuFormat(config.weight_format.value)
    return CpuFormat.BF16 if dtype == torch.bfloat16 else CpuFormat.FP32


class HostStaging:
    """Pinned host buffers the CPU experts read from and write to, for one CUDA device.

    Two sets, used by alternate MoE layers: layer L+1 cannot overwrite what layer L's
    device-bound copy may still be reading, because L+1 first waits on the compute stream,
    which orders it after L's copy. Grown on demand to the largest batch seen.
    """

    def __init__(self, hidden: int, top_k: int, dtype: torch.dtype) -> None:
        self.hidden, self.top_k, self.dtype = hidden, top_k, dtype
        self.rows = 0
        self.sets: list[dict[str, torch.Tensor]] = []

    def get(self, parity: int, rows: int) -> dict[str, torch.Tensor]:
        if rows > self.rows:
            self.rows = max(rows, 2 * self.rows, 16)
            self.sets = [self._alloc(self.rows) for _ in range(2)]
        return {k: v[:rows] for k, v in self.sets[parity].items()}

    def _alloc(self, rows: int) -> dict[str, torch.Tensor]:
        def pinned(*shape, dtype):
            return torch.empty(*shape, dtype=dtype).pin_memory()

        return {"x": pinned(rows, self.hidden, dtype=self.dtype),
                "ids": pinned(rows, self.top_k, dtype=torch.int64),
                "w": pinned(rows, self.top_k, dtype=torch.float32),
                "out": pinned(rows, self.hidden, dtype=self.dtype)}


@dataclass
class GraphStep:
    """What one MoE layer uses in a fixed-shape (CUDA graph) decode step.

    `call` computes the CPU experts from the pinned buffers (None: every expert is on the GPU),
    started and awaited through the dispatcher's flags or by host functions on the stream;
    `valid` [B] marks real rows."""

    call: BoundCall | None
    x: torch.Tensor  # [B, H] pinned
    ids: torch.Tensor  # [B, k] int64 pinned
    w: torch.Tensor  # [B, k] fp32 pinned
    out: torch.Tensor  # [B, H] pinned
    valid: torch.Tensor  # [B] bool, device
    # flag mode (kt_dispatch): device addresses of this layer's ready / done words in pinned
    # memory; None: host functions start and await the call
    flags: tuple[int, int] | None = None
    # kernel mode (before flags where both are set): the same flags written and awaited by
    # kernels (handoff_triton.py)
    handoff: HandOff | None = None


@dataclass
class HandOff:
    """One MoE layer's buffers for handoff_triton's kernels: CUDA views of pinned memory."""

    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x [B, H], ids [B, k], w [B, k]
    out: torch.Tensor  # [B, H]: the CPU experts' output
    ready: torch.Tensor  # int32 [1]: the dispatcher's flags of this layer
    done: torch.Tensor  # int32 [1]
    counter: torch.Tensor  # int32 [1] in device memory: the hand-off's programs that are out


@dataclass(frozen=True)
class TransferCosts:
    """Costs measured at start-up on this machine, for move-or-compute decisions."""

    cpu_seconds_per_pair: float  # CPU kernel time per routed (token, expert) pair, prefill-sized
    move_seconds: float  # time to copy one expert's weights from host memory into GPU memory


def measure_costs(store: CpuExpertStore, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  device: torch.device) -> TransferCosts:
    tokens, k = 64, min(4, store.num_experts)
    x = torch.randn(tokens, store.hidden_size).to(host[0].dtype)
    ids = torch.arange(k).repeat(tokens, 1)
    w = torch.full((tokens, k), 1.0 / k)
    store.forward(x, ids, w)  # warm-up
    t0 = time.perf_counter()
    store.forward(x, ids, w)
    cpu = (time.perf_counter() - t0) / (tokens * k)
    dst = [torch.empty_like(t[0], device=device) for t in host]
    t0 = time.perf_counter()
    for _ in range(3):
        for d, t in zip(dst, host):
            d.copy_(t[0], non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TransferCosts(cpu, (time.perf_counter() - t0) / 3)


class PrefillMover:
    """Move-or-compute for large chunks: a CPU-resident expert that a chunk routes many tokens
    to is copied to the GPU for this one call when the copy takes less time than the CPU
    would spend on its tokens (n × cpu_seconds_per_pair > move_seconds, both measured at
    start-up). Its slot is temporary; the placement does not change.
    """

    def __init__(self, host_weights: list, costs: TransferCosts, device: torch.device,
                 min_tokens: int = 32) -> None:
        self.host_weights = host_weights
        self.costs = costs
        self.device = device
        self.min_tokens = min_tokens
        self.min_pairs = costs.move_seconds / max(costs.cpu_seconds_per_pair, 1e-12)
        self.num_moved = 0

    def choose(self, topk_ids_host: torch.Tensor, mask_row: torch.Tensor) -> list[int]:
        counts = torch.bincount(topk_ids_host.reshape(-1), minlength=mask_row.numel())
        worth = (counts > self.min_pairs) & ~mask_row
        return worth.nonzero().flatten().tolist()

    def warm_up(self, top_k: int) -> int:
        """Compiles now the GPU expert kernel's variants that borrowed slots need: Triton
        specializes the slot count (and it + 2) on 1 and on multiples of 16, and a chunk may
        move any number of experts, so one borrowed set of each kind runs slots.warm_up.
        Without this, the first large prompts after start-up compiled them (H200 box, ratio 0,
        2048-token chunks: the first burst's MoE layers 3.5 s, with it 0.4 s). Returns the
        calls made."""
        gate, up, down = self.host_weights[0]
        num_experts = gate.shape[0]
        return sum(GpuExpertSlots(gate, up, down, list(range(n)), num_experts, self.device).warm_up(top_k)
                   for n in (1, 5, 14, 16) if n <= num_experts)

    def slots(self, moe_index: int, experts: list[int], num_experts: int) -> GpuExpertSlots:
        self.num_moved += len(experts)
        gate, up, down = self.host_weights[moe_index]
        return GpuExpertSlots(gate, up, down, experts, num_experts, self.device)


class HybridExperts:
    """The compute hook of one MoE layer (RoutedExperts.compute)."""

    def __init__(self, moe_index: int, mask: torch.Tensor, slots: GpuExpertSlots,
                 store: CpuExpertStore, act, device: torch.device,
                 staging: HostStaging | None = None, mover: PrefillMover | None = None) -> None:
        self.moe_index = moe_index
        self.mask_row = mask[moe_index]  # bool [E], host memory, shared with the placement
        self.slots = slots
        self.store = store
        self.act = act
        self.device = device
        self.staging = staging  # pinned buffers on CUDA, None on a CPU-only run
        self.mover = mover  # move-or-compute for large chunks, or None
        self.num_gpu_pairs = 0  # (token, expert) pairs served on the GPU since start
        self.num_pairs = 0  # all pairs (fixed-shape steps add theirs from DecodeGraphs.run)
        # GPU pairs of fixed-shape steps, counted on the device (read when asked)
        self.graph_gpu_pairs = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph_step: GraphStep | None = None  # set while a CUDA graph step is built
        self.route_counts: torch.Tensor | None = None  # float32 [E] on the device (dynamic placement)

    @property
    def gpu_pairs(self) -> int:
        """(token, expert) pairs served on the GPU, fixed-shape steps included (syncs)."""
        return self.num_gpu_pairs + int(self.graph_gpu_pairs.item())

    def reset_counts(self) -> None:
        self.num_pairs = self.num_gpu_pairs = 0
        self.graph_gpu_pairs.zero_()

    @property
    def all_on_gpu(self) -> bool:
        return self.slots.capacity == self.mask_row.numel()

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.graph_step is not None:
            return self._stream_ordered(x, topk_ids, topk_weights, self.graph_step)
        if self.route_counts is not None:  # no host sync
            flat = topk_ids.reshape(-1)
            self.route_counts.index_add_(0, flat, torch.ones(flat.shape, device=flat.device))
        self.num_pairs += topk_ids.numel()
        if bool(self.mask_row.all()):  # every expert is on the GPU
            self.num_gpu_pairs += topk_ids.numel()
            return self.slots.forward(x, topk_ids, topk_weights, self.act)
        out_h = None
        if self.staging is not None:
            buf = self.staging.get(self.moe_index % 2, x.shape[0])
            buf["x"].copy_(x, non_blocking=True)
            buf["ids"].copy_(topk_ids, non_blocking=True)
            buf["w"].copy_(topk_weights, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the one wait per layer
            x_h, ids_h, w_h, out_h = buf["x"], buf["ids"], buf["w"], buf["out"]
        else:
            x_h, ids_h, w_h = x, topk_ids, topk_weights
        cpu_mask, moved = self.mask_row, []
        if self.mover is not None and x.shape[0] >= self.mover.min_tokens:
            moved = self.mover.choose(ids_h, self.mask_row)
            if moved:
                cpu_mask = self.mask_row.clone()
                cpu_mask[moved] = True  # the CPU skips them; the GPU computes them below
        self.store.submit(x_h, ids_h, w_h, cpu_mask, out=out_h)
        self.num_gpu_pairs += int(cpu_mask[ids_h].sum())
        out = self.slots.forward(x, topk_ids, topk_weights, self.act)  # overlaps the CPU work
        if moved:
            borrowed = self.mover.slots(self.moe_index, moved, self.mask_row.numel())
            out = out + borrowed.forward(x, topk_ids, topk_weights, self.act)
        cpu_out = self.store.sync()
        if self.staging is not None:
            cpu_out = cpu_out.to(self.device, non_blocking=True)
        return out + cpu_out

    def _stream_ordered(self, x, topk_ids, topk_weights, step: GraphStep) -> torch.Tensor:
        """No host sync and fixed shapes: the stream hands the inputs to the CPU call through
        pinned memory and starts it, runs the GPU experts meanwhile, awaits the CPU call and
        adds its output. Started and awaited by kernels on the dispatcher's flags (handoff),
        by stream memory operations on them (flags) or by host functions; without CUDA the
        host-function steps run in order."""
        from ktengine.cuda_host import call_host_func, launch_host_func

        launch = launch_host_func if self.device.type == "cuda" else call_host_func

        # the GPU experts' call also counts the step's resident pairs and, for dynamic
        # placement, its routed pairs per expert (real rows only)
        args = (x, topk_ids, topk_weights, self.act, self.graph_gpu_pairs, step.valid,
                self.route_counts)
        if step.call is None:
            return self.slots.forward_static(*args)
        if step.handoff is not None:
            from ktengine.moe.handoff_triton import collect, hand_off

            h = step.handoff
            hand_off((x, topk_ids, topk_weights.float()), h.inputs, h.ready, h.done, h.counter)
            out = self.slots.forward_static(*args, reduce=False)  # overlaps the CPU work
            return collect(out, h.out, h.done)  # sums the fused kernel's rows on the way
        step.x.copy_(x, non_blocking=True)
        step.ids.copy_(topk_ids, non_blocking=True)
        step.w.copy_(topk_weights, non_blocking=True)
        if step.flags is not None:  # the dispatcher thread runs the call (decode_graphs.py)
            from ktengine.cuda_host import stream_wait_value32, stream_write_value32

            ready, done = step.flags
            stream_write_value32(ready, 1)
            out = self.slots.forward_static(*args)  # overlaps the CPU work
            stream_wait_value32(done, 1)
            stream_write_value32(done, 0)
            return out + step.out.to(self.device, non_blocking=True)
        submit, sync = host_functions()
        launch(submit, step.call.address)
        out = self.slots.forward_static(*args)  # overlaps the CPU work
        launch(sync, step.call.address)
        return out + step.out.to(self.device, non_blocking=True)


@dataclass
class HybridSetup:
    mask: torch.Tensor  # bool [num_moe_layers, num_experts], host (pinned on CUDA)
    layers: list[HybridExperts]
    pool: CpuThreadPool
    host_weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # for moves
    costs: TransferCosts | None  # measured when host weights are kept

    @property
    def gpu_share(self) -> float:
        pairs = sum(layer.num_pairs for layer in self.layers)
        return sum(layer.gpu_pairs for layer in self.layers) / pairs if pairs else 0.0

    def close(self) -> None:
        self.pool.close()


def build_hybrid(model, model_config: ModelConfig, moe_config: MoEConfig, mask: torch.Tensor,
                 device: torch.device, keep_host_weights: bool, progress: bool = True,
                 slot_weights=None) -> HybridSetup:
    """Packs every MoE layer's experts for the CPU, fills the GPU slots, installs the hooks.

    The stacked torch expert weights are released afterwards, so the experts are held once in
    RAM, unless dynamic placement or prefill moves need them (pinned on CUDA) as the source
    of copies to the GPU. `slot_weights(gate, up, down)`, when given, picks what the GPU slots
    hold (tensor parallel: this rank's slice of the intermediate dim); the CPU gets every expert.
    """
    keep_host_weights = keep_host_weights or moe_config.prefill_move
    from tqdm import tqdm

    if device.type == "cuda":
        mask = mask.pin_memory()
    # on CUDA, decode graphs add a spinning dispatcher thread beside the Python thread: the
    # workers leave a core to each. Measured on the 16-core H200 host: 14 and 15 workers tie
    # within noise (8 layers, batch 1: replay 7.48 vs 7.73 ms, medians of 3), but with workers
    # that spin longer, 15 of them made a step 3x slower (every core busy)
    pool = CpuThreadPool(moe_config.num_cpu_threads, reserved_cores=2 if device.type == "cuda" else 1)
    share_cores(pool.num_threads)
    fmt = cpu_format(moe_config, model_config.dtype)
    blocks = model.moe_blocks()
    if blocks and not bool(mask.all()) and not is_silu(blocks[0].experts.act):
        raise ConfigError(
            f"the CPU expert kernels compute SiLU experts, and this model's hidden_act is "
            f"{model_config.hidden_act!r}: keep every expert on the model's device "
            f"(--kt-gpu-experts-ratio 1)")
    layers, host = [], []
    staging = None
    if device.type == "cuda":
        staging = HostStaging(model_config.hidden_size, model_config.top_k, model_config.dtype)
    for block in tqdm(blocks, desc=f"Packing CPU experts ({fmt.value})", unit="layer",
                      disable=not progress or len(blocks) < 8):
        ex = block.experts
        gate, up, down = (t.detach().to("cpu") for t in (ex.gate_proj, ex.up_proj, ex.down_proj))
        store = CpuExpertStore(gate, up, down, fmt, pool, group_size=moe_config.group_size,
                               path=moe_config.cpu_kernel_path)
        resident = mask[block.moe_index].nonzero().flatten().tolist()
        slot_src = (gate, up, down) if slot_weights is None else slot_weights(gate, up, down)
        slots = GpuExpertSlots(*slot_src, resident, model_config.num_experts, device)
        hybrid = HybridExperts(block.moe_index, mask, slots, store, ex.act, device, staging)
        ex.compute = hybrid
        if keep_host_weights:
            host.append(tuple(t.pin_memory() if device.type == "cuda" else t for t in (gate, up, down)))
        for name in ("gate_proj", "up_proj", "down_proj"):  # the store and slots hold them now
            setattr(ex, name, torch.nn.Parameter(torch.empty(0, dtype=gate.dtype), requires_grad=False))
        layers.append(hybrid)
    log.info("experts: %d of %d on the GPU side, the rest on the CPU in %s (%s kernels, %d threads)",
             int(mask.sum()), mask.numel(), fmt.value, layers[0].store.path.value if layers else "-",
             pool.num_threads)
    costs = None
    if keep_host_weights and layers:
        costs = measure_costs(layers[0].store, host[0], device)
        log.info("measured: CPU %.2f us per routed pair, %.1f us to move one expert to %s",
                 costs.cpu_seconds_per_pair * 1e6, costs.move_seconds * 1e6, device)
    if moe_config.prefill_move and costs is not None:
        mover = PrefillMover(host, costs, device)
        for layer in layers:
            layer.mover = mover
        log.info("prefill move-or-compute: an expert with more than %.0f tokens in a chunk moves",
                 mover.min_pairs)
    return HybridSetup(mask, layers, pool, host if keep_host_weights else None, costs)
