"""Where the prefill steps of a ShareGPT-like burst go: step time beside its MoE time.

    python bench/prefill_steps.py --preset qwen3-30b-a3b --num-layers 8 --ratio 0 --runs 4
    python bench/prefill_steps.py ... --eager-attention any      # let SDPA pick cuDNN too
    python bench/prefill_steps.py ... --prefill-move             # --kt-prefill-move-experts

Each run sends `--requests` new prompts at once (bench/workload.py, a new seed per run, so
the chunk shapes are new every run as in real traffic) with max_tokens 1: the steps are
prefill chunks. Per step: its wall time (the engine's step, synced), the MoE layers' time
and, inside it, the wait for the CPU experts; the rest is attention, the dense layers and
host work. Beside the MoE time, its bound: the CPU-resident experts the step routes to, read
once from DRAM at the bandwidth measured at the start (the kernel reads each once per layer
whatever its token count). The first run also pays one-time compilations. The MoE timing
syncs the device at each layer (a few µs each). With --prefill-move, CPU-resident experts
that a chunk routes enough tokens to are copied to the GPU for that call (the rule of
moe/hybrid.py's PrefillMover); each run prints how many were. Never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from machine import describe, dram_read_gbps
from models import RoutingProfile, write_random_checkpoint
from torch.nn.attention import SDPBackend
from workload import sharegpt_like

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine import model_runner as runner_module
from ktengine.config import (
    MoEConfig,
    PlacementConfig,
    PlacementStrategy,
    SchedulerConfig,
    WeightFormat,
)
from ktengine.model import attention
from ktengine.moe import hybrid


class StepTimer:
    """Wraps ModelRunner.step and HybridExperts.__call__ of this process (eager calls only)."""

    def __init__(self, device: torch.device, expert_bytes: int) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps: list[dict] = []
        self.moe = self.cpu_wait = 0.0
        self.cpu_bytes = 0  # distinct CPU-resident experts' bytes the step's layers read
        step, call = runner_module.ModelRunner.step, hybrid.HybridExperts.__call__
        timer = self

        def timed_step(runner, batch, launched=None):
            row = {"tokens": batch.num_tokens, "seqs": len(batch.items),
                   "prompt": batch.num_prompt_tokens}
            timer.moe = timer.cpu_wait = 0.0
            timer.cpu_bytes = 0
            timer.sync()
            t0 = time.perf_counter()
            out = step(runner, batch, launched)
            timer.sync()
            row.update(ms=(time.perf_counter() - t0) * 1e3, moe_ms=timer.moe * 1e3,
                       cpu_wait_ms=timer.cpu_wait * 1e3, cpu_bytes=timer.cpu_bytes)
            if row["prompt"]:
                timer.steps.append(row)
            return out

        def timed_call(layer, x, topk_ids, topk_weights):
            if layer.graph_step is not None:
                return call(layer, x, topk_ids, topk_weights)
            sync = layer.store.sync

            def waited():
                t = time.perf_counter()
                try:
                    return sync()
                finally:
                    timer.cpu_wait += time.perf_counter() - t

            used = torch.unique(topk_ids).cpu()
            timer.cpu_bytes += int((~layer.mask_row[used]).sum()) * expert_bytes
            timer.sync()
            t0 = time.perf_counter()
            layer.store.sync = waited
            try:
                return call(layer, x, topk_ids, topk_weights)
            finally:
                del layer.store.sync
                timer.sync()
                timer.moe += time.perf_counter() - t0

        runner_module.ModelRunner.step = timed_step
        hybrid.HybridExperts.__call__ = timed_call


async def burst(engine: AsyncEngine, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    async def one(prompt):
        async for _ in engine.generate(prompt, params):
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0


async def main(args) -> None:
    profile = RoutingProfile()
    model_dir = write_random_checkpoint(Path(args.checkpoint_dir) / f"ktengine-bench-{args.preset}-"
                                        f"{args.num_layers or 'all'}", args.preset, args.num_layers,
                                        profile)
    if args.eager_attention == "any":  # every backend SDPA has, cuDNN's included
        attention.EAGER_BACKENDS = [b for b in SDPBackend.__members__.values() if b != SDPBackend.ERROR]
    placement = PlacementConfig(strategy=PlacementStrategy(args.strategy), gpu_experts_ratio=args.ratio,
                                init_expert_location=args.init_expert_location)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), placement=placement,
                                      scheduler=SchedulerConfig(chunked_prefill_size=args.chunk,
                                                                max_running_requests=args.requests),
                                      moe=MoEConfig(weight_format=WeightFormat(args.weight_format),
                                                    prefill_move=args.prefill_move)),
                         progress=False)
    layers = engine.loaded.hybrid.layers
    mover = layers[0].mover if layers else None  # one PrefillMover serves every layer
    # the bound counts an expert at the bytes the CPU kernels read in their weight format
    timer = StepTimer(engine.device, layers[0].store.expert_nbytes() if layers
                      else engine.model_config.expert_nbytes)
    engine.warm_up_kernels()
    dram = dram_read_gbps()
    print(f"{args.preset}, {engine.model_config.num_layers} layers, GPU expert ratio {args.ratio:g} "
          f"({args.strategy}), chunk {args.chunk}, eager attention: {args.eager_attention}, "
          f"CPU experts {layers[0].store.fmt.value if layers else '-'}"
          + (f", prefill moves above {mover.min_pairs:.0f} tokens" if mover else "") + "; "
          f"{describe()['cpu']}, GPU {describe()['gpu'] or 'none'}; DRAM read {dram:.1f} GB/s")
    walls = []
    try:
        for run in range(args.runs):
            work = sharegpt_like(args.requests, engine.model_config.vocab_size, profile.groups,
                                 seed=100 + run, scale=args.scale)
            timer.steps.clear()
            moved = mover.num_moved if mover else 0
            wall = await burst(engine, [r.prompt for r in work])
            moved = (mover.num_moved if mover else 0) - moved
            steps = timer.steps
            total = sum(s["ms"] for s in steps)
            moe = sum(s["moe_ms"] for s in steps)
            bound = sum(s["cpu_bytes"] for s in steps) / (dram * 1e6)
            print(f"run {run}: {sum(s['prompt'] for s in steps)} prompt tokens in {len(steps)} steps, "
                  f"{wall * 1e3:.0f} ms; steps {total:.0f} ms = MoE {moe:.0f} (CPU wait "
                  f"{sum(s['cpu_wait_ms'] for s in steps):.0f}; DRAM bound {bound:.0f}) "
                  f"+ other {total - moe:.0f}" + (f"; {moved} expert moves" if mover else ""))
            for s in steps:
                print(f"    {s['tokens']:4d} tokens, {s['seqs']:2d} sequences: {s['ms']:7.1f} ms, "
                      f"MoE {s['moe_ms']:6.1f} (CPU wait {s['cpu_wait_ms']:6.1f}; DRAM bound "
                      f"{s['cpu_bytes'] / (dram * 1e6):6.1f}), other {s['ms'] - s['moe_ms']:6.1f}")
            if run:
                walls.append(wall)
        if walls:
            print(f"median wall of runs 1..{args.runs - 1} (no one-time compilations): "
                  f"{statistics.median(walls) * 1e3:.0f} ms")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.0)
    ap.add_argument("--strategy", default="uniform", choices=[s.value for s in PlacementStrategy])
    ap.add_argument("--init-expert-location", default=None)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--scale", type=float, default=0.15)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--eager-attention", choices=["default", "any"], default="default",
                    help="default: the engine's (no cuDNN); any: every SDPA backend")
    ap.add_argument("--weight-format", default="auto", choices=[f.value for f in WeightFormat],
                    help="the CPU experts' weight format (--kt-weight-format; auto: the model's)")
    ap.add_argument("--prefill-move", action="store_true",
                    help="move-or-compute per expert for large chunks (--kt-prefill-move-experts)")
    ap.add_argument("--checkpoint-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
    asyncio.run(main(ap.parse_args()))
