"""Placement strategies compared: output tokens/s and the share of routed (token, expert)
pairs served by GPU-resident experts, per strategy and GPU expert ratio.

    python bench/placement.py [--models demo medium] [--ratios 0 0.25 0.5 1.0] [--json]

`frequency` uses statistics our own recorder wrote on a separate warm-up workload; `dynamic`
starts from `uniform` with dynamic expert update on. Without a GPU the "GPU" side is torch on
the CPU, so only the GPU share carries over to a real machine; tokens/s there is the point of
running this on one. Never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from machine import describe
from models import RoutingProfile, write_random_checkpoint
from workload import sharegpt_like

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine.config import PlacementConfig, PlacementStrategy, RecorderConfig, SchedulerConfig

STRATEGIES = ["random", "uniform", "front-loading", "frequency", "dynamic"]


async def run_workload(config: EngineConfig, requests, record_to: Path | None = None) -> dict:
    engine = AsyncEngine(config, progress=False)
    try:
        if record_to is not None:
            engine.recorder.start()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(
            _one(engine, r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))
            for r in requests))
        elapsed = time.perf_counter() - t0
        dump = str(engine.recorder.dump(record_to)) if record_to is not None else None
        snap = engine.snapshot()
        return {"output_tok_s": sum(outs) / elapsed, "gpu_share": snap.gpu_expert_share,
                "seconds": elapsed, "stats_file": dump,
                "dynamic_updates": engine.dynamic.num_updates if engine.dynamic else 0}
    finally:
        await engine.shutdown()


async def _one(engine, prompt, params) -> int:
    n = 0
    async for out in engine.generate(prompt, params):
        n += len(out.delta_token_ids)
    return n


def placement_for(strategy: str, ratio: float, stats: str, threshold: int) -> PlacementConfig:
    if strategy == "dynamic":
        return PlacementConfig(strategy=PlacementStrategy.UNIFORM, gpu_experts_ratio=ratio,
                               dynamic_update=True, gpu_prefill_token_threshold=threshold)
    return PlacementConfig(strategy=PlacementStrategy(strategy), gpu_experts_ratio=ratio,
                           init_expert_location=stats if strategy == "frequency" else None)


async def bench_model(name: str, model_dir: str | None, args, profile: RoutingProfile | None) -> dict:
    vocab = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"] if model_dir else 4096
    groups = profile.groups if profile else 8
    warmup = sharegpt_like(args.requests, vocab, groups, seed=1, scale=args.scale)
    work = sharegpt_like(args.requests, vocab, groups, seed=2, scale=args.scale)
    base = {"model": model_dir, "scheduler": SchedulerConfig(chunked_prefill_size=args.chunk,
                                                           max_running_requests=args.requests)}
    stats_dir = Path(tempfile.mkdtemp(prefix="ktengine-stats-"))
    rec = await run_workload(EngineConfig(**base, recorder=RecorderConfig(mode="stat")), warmup, stats_dir)
    rows = []
    for ratio in args.ratios:
        for strategy in STRATEGIES:
            if ratio in (0.0, 1.0) and strategy != STRATEGIES[0]:
                # no choice to make: every strategy places nothing, or everything, on the GPU
                rows.append({**rows[-1], "strategy": strategy})
                continue
            runs = [await run_workload(EngineConfig(**base, placement=placement_for(
                strategy, ratio, rec["stats_file"], args.threshold)), work) for _ in range(args.runs)]
            row = {"strategy": strategy, "ratio": ratio,
                   "output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
                   "gpu_share": statistics.median(r["gpu_share"] for r in runs),
                   "dynamic_updates": runs[0]["dynamic_updates"]}
            rows.append(row)
            print(f"  {name:8s} ratio {ratio:4.2f} {strategy:14s} {row['output_tok_s']:8.1f} tok/s  "
                  f"GPU share {row['gpu_share']:6.1%}", file=sys.stderr)
    return {"model": name, "profile": profile.describe() if profile else "demo (random router)",
            "workload": {"requests": args.requests, "scale": args.scale}, "results": rows}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "medium"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.25, help="length scale of the workload")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threshold", type=int, default=64, help="dynamic update prefill threshold")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    for name in args.models:
        if name == "demo":
            results.append(await bench_model("demo", None, args, None))
        else:
            profile = RoutingProfile()
            path = write_random_checkpoint(Path(tempfile.gettempdir()) / f"ktengine-bench-{name}", name,
                                           args.num_layers, profile)
            results.append(await bench_model(name, str(path), args, profile))
    report = {"machine": describe(), "models": results}
    if args.json:
        print(json.dumps(report))
        return
    for model in results:
        print(f"\n{model['model']}: output tokens/s (GPU share of routed pairs)")
        print("ratio  " + "  ".join(f"{s:>18s}" for s in STRATEGIES))
        for ratio in args.ratios:
            cells = {r["strategy"]: r for r in model["results"] if r["ratio"] == ratio}
            print(f"{ratio:5.2f}  " + "  ".join(
                f"{cells[s]['output_tok_s']:9.1f} ({cells[s]['gpu_share']:5.1%})" for s in STRATEGIES))


if __name__ == "__main__":
    asyncio.run(main())
