"""Offline engine throughput: prefill and decode tokens/s beside the bytes-per-step roofline.

    python bench/offline.py [--model DIR | --preset medium] [--batch 1 8] [--json]

Decode at batch B must read, every step: the dense weights (attention, norms, routers,
dense MLPs, lm_head), the distinct routed experts the B tokens pick (counted on an untimed
run of the same workload), and the KV cache. Those bytes at the bandwidths measured in this
run bound the step time from below: bench/roofline.py has the formula (per MoE layer, the
CPU's DRAM read and the GPU's HBM read overlap). Never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from machine import describe, dram_read_gbps, hbm_gbps
from roofline import DistinctExperts, decode_tok_s, engine_step_bytes

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine.config import ParallelConfig, PlacementConfig, SchedulerConfig


async def distinct_experts(engine: AsyncEngine, batch: int, prompt_len: int,
                           gen: int) -> tuple[list[float], list[float]]:
    """Mean distinct GPU- and CPU-resident experts per decode step, per MoE layer, measured
    on an untimed run (the observer syncs)."""
    blocks = engine.loaded.model.moe_blocks()
    counter = DistinctExperts(engine.loaded.hybrid.mask, batch)
    for block in blocks:
        block.observer = counter
    graphs, engine.runner.graphs = engine.runner.graphs, None  # replayed steps call no observer
    try:
        await measure(engine, batch, prompt_len, gen, 1)
    finally:
        engine.runner.graphs = graphs
        for block in blocks:
            block.observer = None
    return counter.per_step()


async def measure(engine: AsyncEngine, batch: int, prompt_len: int, gen: int, runs: int) -> dict:
    vocab = engine.model_config.vocab_size
    prefill, decode = [], []
    for run in range(runs):
        prompts = [[(7 * i + 13 * j + run) % (vocab - 1) + 1 for j in range(prompt_len)] for i in range(batch)]
        params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        first: list[float] = []
        last: list[float] = []

        async def one(p, params=params, first=first, last=last):
            async for out in engine.generate(p, params):
                if len(out.token_ids) == len(out.delta_token_ids):  # this request's first output
                    first.append(time.perf_counter())
            last.append(time.perf_counter())

        await asyncio.gather(*(one(p) for p in prompts))
        t_first, t_end = max(first), max(last)
        prefill.append(batch * prompt_len / (t_first - t0))
        decode.append(batch * (gen - 1) / (t_end - t_first))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    ap.add_argument("--preset", default=None, help="write and use a random checkpoint (bench/models.py)")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=None, help="GPU expert ratio (placement)")
    ap.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks (GPUs)")
    ap.add_argument("--disable-cuda-graph", action="store_true", help="eager decode steps")
    ap.add_argument("--also-eager", action="store_true",
                    help="with CUDA graphs, also measure the same engine's eager decode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if args.preset:
        from models import write_random_checkpoint

        model = str(write_random_checkpoint(Path("/tmp/ktengine-bench") / args.preset, args.preset, args.num_layers))
    bandwidth, hbm = dram_read_gbps(), hbm_gbps()
    engine = AsyncEngine(EngineConfig(model=model, scheduler=SchedulerConfig(chunked_prefill_size=4096),
                                      placement=PlacementConfig(gpu_experts_ratio=args.ratio),
                                      parallel=ParallelConfig(tp_size=args.tp_size),
                                      disable_cuda_graph=args.disable_cuda_graph),
                         progress=False)
    rows = []
    try:
        engine.warm_up_kernels()  # the prefill tile sizes too, not only the warm-up's
        await measure(engine, 1, 16, 4, 1)  # warm-up
        for batch in args.batch:
            r = await measure(engine, batch, args.prompt_len, args.gen, args.runs)
            if args.also_eager and engine.runner.graphs is not None:
                graphs, engine.runner.graphs = engine.runner.graphs, None
                try:
                    eager = await measure(engine, batch, args.prompt_len, args.gen, args.runs)
                finally:
                    engine.runner.graphs = graphs
                r["eager_decode_tok_s"] = eager["decode_tok_s"]
            gpu, cpu = await distinct_experts(engine, batch, args.prompt_len, args.gen)
            step = engine_step_bytes(engine, batch, args.prompt_len + args.gen, gpu, cpu)
            bound = decode_tok_s(batch, step, bandwidth, hbm if engine.device.type == "cuda" else None)
            rows.append({"batch": batch, "prompt_len": args.prompt_len, **r, "decode_roofline_tok_s": bound,
                         "distinct_experts_per_step": {"gpu": sum(gpu), "cpu": sum(cpu)}})
    finally:
        await engine.shutdown()
    result = {"model": engine.model_name, "device": str(engine.device), "dram_read_gbps": bandwidth,
              "hbm_gbps": hbm, "gpu_expert_ratio": args.ratio, "tp_size": args.tp_size,
              "cuda_graphs": engine.runner.graphs is not None,
              "machine": describe(), "results": rows}
    if args.json:
        print(json.dumps(result))
        return
    hbm_text = f", HBM {hbm:.0f} GB/s" if hbm else ""
    print(f"model {engine.model_name} on {engine.device}, GPU expert ratio {args.ratio or 0}; "
          f"DRAM read {bandwidth:.1f} GB/s{hbm_text} (measured)")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'roofline tok/s':>15} {'share':>6}")
    for r in rows:
        share = r["decode_tok_s"] / r["decode_roofline_tok_s"]
        eager = f"  (eager {r['eager_decode_tok_s']:.1f})" if "eager_decode_tok_s" in r else ""
        print(f"{r['batch']:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['decode_roofline_tok_s']:>15.1f} {share:>6.0%}{eager}")


if __name__ == "__main__":
    asyncio.run(main())
