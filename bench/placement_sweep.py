"""The placement sweep: output tokens/s per GPU expert ratio (0%, 10%, ..., 100%) and strategy
(random, uniform, front-loading, frequency, dynamic update), the reference system's table.

    python bench/placement_sweep.py                           # Qwen3-30B-A3B shape, 8 layers
    python bench/placement_sweep.py --quick --preset medium --num-layers 4 --ratios 0 0.5 1

Each cell runs a ShareGPT-like workload (bench/workload.py: its length mix, prompts drawn
from the routing profile of bench/models.py) with every request sent at once, then one
request alone (a fixed 32-token prompt, `--decode-tokens` greedy tokens) for the batch-1
decode rate. `frequency` ranks experts by statistics our own recorder took on a separate
warm-up workload (another seed); `dynamic` is dynamic expert update on top of that same
initial placement (does turning it on ever cost throughput?), `dynamic-uniform` (on request)
dynamic expert update starting from `uniform` (what it learns by itself).
Ratios 0 and 1 leave no choice to make, so they run once.

Speed: the checkpoint is built once (on /dev/shm when there is one) and the model loaded
once, with host copies of the experts kept; between cells only the GPU expert mask and the
GPU slots change (`Replacer`), and a fresh AsyncEngine serves the same loaded model, so a
cell costs the copy of its GPU experts plus its own run. `timings` in the JSON tells what
the setup and each cell took.

Beside each row: the GPU share of routed (token, expert) pairs (engine.snapshot()), the
batch-1 decode roofline at that placement (GPU/CPU split of the experts the timed decode
steps really used, from the layers' pair counters; DRAM read bandwidth measured just before
and after the batch-1 run, as the machine's drifts), the roofline at the workload's mean
decode batch (distinct experts estimated from the warm-up statistics; DRAM measured at the
start), and the number of
dynamic updates; bench/roofline.py has the bound's formula. Writes JSON (machine, routing
profile, workload), a markdown table and a PNG plot to --out-dir. Never asserts: the
targets are printed as met / not met.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from machine import DramProbe, describe, dram_read_gbps, hbm_gbps
from models import RoutingProfile, write_random_checkpoint
from roofline import decode_tok_s, engine_step_bytes, expected_distinct
from sweep_report import ALL_STRATEGIES, STRATEGIES, markdown, plot, print_rows, targets
from workload import Request, sharegpt_like

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine.config import (
    MoEConfig,
    PlacementConfig,
    PlacementStrategy,
    RecorderConfig,
    SchedulerConfig,
    WeightFormat,
)
from ktengine.moe import placement
from ktengine.moe.dynamic import DynamicPlacer
from ktengine.moe.gpu_experts import GpuExpertSlots
from ktengine.moe.recorder import ExpertDistributionRecorder
from ktengine.startup import LoadedModel, load

B1_PROMPT_LEN = 32  # below the dynamic-update threshold: the batch-1 run never moves experts
B1_WARMUP_TOKENS = 4


class Replacer:
    """Re-places the experts of one loaded model between engines (no reload).

    The model is loaded with dynamic update on, so every layer keeps its experts in host
    memory (pinned on CUDA) beside the CPU store, which packs every expert whatever the mask.
    A new placement writes the shared mask in place (each layer's CPU call reads its row),
    rebuilds each layer's GPU slots from the host copies, zeroes the pair counters, and
    installs the cell's pass hooks and observers.
    """

    def __init__(self, loaded: LoadedModel, threshold: int) -> None:
        self.base, self.threshold = loaded, threshold
        self.device = loaded.device

    def apply(self, mask: torch.Tensor, dynamic: bool,
              recorder: ExpertDistributionRecorder | None = None) -> LoadedModel:
        hybrid = self.base.hybrid
        if self.device.type == "cuda":  # a dynamic update's copy may still write the old slots
            torch.cuda.synchronize(self.device)
        for layer in hybrid.layers:  # free the old slots before filling the new ones
            layer.slots = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        hybrid.mask.copy_(mask)
        num_experts = mask.shape[1]
        for i, layer in enumerate(hybrid.layers):
            resident = mask[i].nonzero().flatten().tolist()
            layer.slots = GpuExpertSlots(*hybrid.host_weights[i], resident, num_experts, self.device)
            layer.reset_counts()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.base.dynamic is not None:
            self.base.dynamic.close()
        for layer in hybrid.layers:
            layer.route_counts = None
        placer = DynamicPlacer(hybrid, self.threshold, device=self.device) if dynamic else None
        for block in self.base.model.moe_blocks():
            block.observer = recorder.observe if recorder is not None else None
        return replace(self.base, recorder=recorder, dynamic=placer)


class DecodeBatches:
    """Pass hook: decode tokens per step, for the workload's mean decode batch (no sync)."""

    def __init__(self) -> None:
        self.steps = self.tokens = 0

    def begin_pass(self, input_ids: torch.Tensor, num_prefill_tokens: int) -> None:
        decodes = input_ids.numel() - num_prefill_tokens
        if decodes > 0:
            self.steps, self.tokens = self.steps + 1, self.tokens + decodes

    def end_pass(self) -> None:
        pass

    def quiet(self) -> bool:
        """It changes nothing the device reads: decode steps may still be launched ahead (a
        hook without this method holds the engine to one step at a time)."""
        return True

    @property
    def mean(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def placement_config(strategy: str, ratio: float, stats: str | None,
                     threshold: int) -> PlacementConfig:
    if strategy.startswith("dynamic"):
        start = PlacementStrategy.FREQUENCY if strategy == "dynamic" and stats else PlacementStrategy.UNIFORM
        return PlacementConfig(strategy=start, gpu_experts_ratio=ratio, dynamic_update=True,
                               gpu_prefill_token_threshold=threshold,
                               init_expert_location=stats if start == PlacementStrategy.FREQUENCY else None)
    return PlacementConfig(strategy=PlacementStrategy(strategy), gpu_experts_ratio=ratio,
                           init_expert_location=stats if strategy == "frequency" else None)


async def generate(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> tuple[int, float, float]:
    """Tokens generated, time of the first one and of the last (perf_counter)."""
    n, first = 0, None
    async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True)):
        n += len(out.delta_token_ids)
        if first is None and n:
            first = time.perf_counter()
    return n, first or time.perf_counter(), time.perf_counter()


def pair_counts(engine: AsyncEngine) -> list[tuple[int, int]]:
    return [(layer.gpu_pairs, layer.num_pairs) for layer in engine.loaded.hybrid.layers]


async def batch1(engine: AsyncEngine, prompt: list[int], gen: int) -> dict:
    """Decode tok/s of one request alone, and the GPU/CPU split of the experts its timed
    decode steps used per layer (counters: warm-up run of B1_WARMUP_TOKENS minus the same
    prompt's prefill and first steps, which greedy decoding repeats exactly)."""
    c0 = pair_counts(engine)
    await generate(engine, prompt, B1_WARMUP_TOKENS)
    c1 = pair_counts(engine)
    n, t_first, t_end = await generate(engine, prompt, gen)
    c2 = pair_counts(engine)
    steps = gen - B1_WARMUP_TOKENS
    k = engine.model_config.top_k
    gpu = [((g2 - g1) - (g1 - g0)) / steps for (g0, _), (g1, _), (g2, _) in zip(c0, c1, c2)]
    pairs = [((p2 - p1) - (p1 - p0)) / steps for (_, p0), (_, p1), (_, p2) in zip(c0, c1, c2)]
    measured = steps > 0 and all(abs(p - k) < 1e-6 for p in pairs)
    return {"decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
            "gpu_experts": gpu if measured else None}


async def run_cell(rep: Replacer, cfg: EngineConfig, mask: torch.Tensor, dynamic: bool,
                   work: list[Request], b1_prompt: list[int], args, machine_bw: tuple,
                   counts: torch.Tensor | None) -> dict:
    loaded = rep.apply(mask, dynamic)
    engine = AsyncEngine(cfg, progress=False, loaded=loaded)
    batches = DecodeBatches()
    engine.runner.pass_hooks.append(batches)
    try:
        engine.warm_up_kernels()  # this cell's slot counts: compiled before the clock
        await generate(engine, b1_prompt, B1_WARMUP_TOKENS)  # untimed warm-up
        t_capture = time.perf_counter()
        if engine.runner.graphs is not None:  # every graph the cell can need, before the clock
            longest = max(len(r.prompt) + r.max_tokens for r in work)
            engine.runner.graphs.capture_all(len(work), max(longest, len(b1_prompt) + args.decode_tokens))
        t_capture = time.perf_counter() - t_capture
        for layer in loaded.hybrid.layers:
            layer.reset_counts()
        prefill0 = engine.stats.prefill_seconds_total, engine.stats.prefill_steps_total
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(generate(engine, r.prompt, r.max_tokens) for r in work))
        seconds = time.perf_counter() - t0
        prefill_s = engine.stats.prefill_seconds_total - prefill0[0]
        prefill_steps = engine.stats.prefill_steps_total - prefill0[1]
        share = engine.snapshot().gpu_expert_share
        before = args.probe.gbps()
        b1 = await batch1(engine, b1_prompt, args.decode_tokens)
        dram_b1 = (before + args.probe.gbps()) / 2  # the batch-1 roofline's, measured around it
        row = {"output_tok_s": sum(n for n, _, _ in outs) / seconds, "seconds": seconds,
               "capture_s": t_capture, "prefill_s": prefill_s,
               "prefill_steps": prefill_steps,
               "gpu_share": share, "mean_decode_batch": batches.mean,
               "dynamic_updates": loaded.dynamic.num_updates if loaded.dynamic else 0,
               "b1_decode_tok_s": b1["decode_tok_s"], "b1_dram_gbps": dram_b1}
        row.update(rooflines(engine, loaded.hybrid.mask, b1["gpu_experts"], batches.mean, work,
                             args.decode_tokens, machine_bw, counts, dram_b1))
        return row
    finally:
        await engine.shutdown()


def rooflines(engine: AsyncEngine, mask: torch.Tensor, b1_gpu: list[float] | None, batch: float,
              work: list[Request], gen: int, bw: tuple, counts: torch.Tensor | None,
              dram_b1: float) -> dict:
    """Batch-1 roofline (measured expert split, or the statistics' estimate; DRAM measured
    around the batch-1 run) and the roofline at the workload's mean decode batch (statistics'
    estimate; DRAM measured at the start)."""
    dram, hbm = bw
    k = engine.model_config.top_k
    split = "measured"
    if b1_gpu is None:
        split = "statistics"
        b1_gpu = expected_distinct(counts, mask, 1, k)[0] if counts is not None else \
            (mask.sum(dim=1) * k / mask.shape[1]).tolist()
    b1_cpu = [k - g for g in b1_gpu]
    b1 = decode_tok_s(1, engine_step_bytes(engine, 1, B1_PROMPT_LEN + gen / 2, b1_gpu, b1_cpu),
                      dram_b1, hbm)
    out = {"b1_roofline_tok_s": b1, "b1_split": split, "b1_gpu_experts_per_layer": sum(b1_gpu) / len(b1_gpu),
           "batch_roofline_tok_s": None}
    if counts is not None and batch > 0:
        context = statistics.fmean(len(r.prompt) + r.max_tokens / 2 for r in work)
        gpu, cpu = expected_distinct(counts, mask, batch, k)
        out["batch_roofline_tok_s"] = decode_tok_s(
            batch, engine_step_bytes(engine, batch, context, gpu, cpu), dram, hbm)
    return out


def median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in runs)
    row["runs"] = [r["output_tok_s"] for r in runs]
    return row


async def sweep(args, save) -> dict:
    """Runs the sweep; calls save(report) after every cell, so a cut-short run keeps its rows."""
    start = time.perf_counter()
    timings: dict = {}
    t = time.perf_counter()
    profile = None if args.preset == "demo" else RoutingProfile()
    model_dir = None
    if profile is not None:
        root = Path(args.checkpoint_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
        name = f"ktengine-bench-{args.preset}-{args.num_layers or 'all'}"
        name += f"-seed{args.model_seed}" if args.model_seed else ""
        model_dir = str(write_random_checkpoint(root / name, args.preset, args.num_layers, profile,
                                                seed=args.model_seed))
    timings["checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bw = (dram_read_gbps(), hbm_gbps())
    args.probe = DramProbe()
    timings["bandwidth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sched = SchedulerConfig(chunked_prefill_size=args.chunk, max_running_requests=args.requests)
    base = EngineConfig(model=model_dir, scheduler=sched,
                        placement=PlacementConfig(gpu_experts_ratio=0.0, dynamic_update=True,
                                                  gpu_prefill_token_threshold=args.threshold),
                        disable_cuda_graph=args.disable_cuda_graph,
                        moe=MoEConfig(weight_format=WeightFormat(args.weight_format)))
    loaded = load(base, progress=False)
    rep = Replacer(loaded, args.threshold)
    timings["load_s"] = time.perf_counter() - t
    mc = loaded.model_config
    groups = profile.groups if profile else 8
    warm = sharegpt_like(args.requests, mc.vocab_size, groups, seed=1, scale=args.scale)
    work = sharegpt_like(args.requests, mc.vocab_size, groups, seed=2, scale=args.scale)
    lo, hi = mc.vocab_size // groups, 2 * mc.vocab_size // groups  # group 1's tokens
    b1_prompt = [lo + (37 * i) % (hi - lo) for i in range(B1_PROMPT_LEN)]
    try:
        # routing statistics for `frequency`, from our recorder on the warm-up workload
        t = time.perf_counter()
        stats_dir = Path(tempfile.mkdtemp(prefix="ktengine-stats-"))
        recorder = ExpertDistributionRecorder(mc, "stat", gpu_mask=loaded.hybrid.mask)
        engine = AsyncEngine(replace(base, recorder=RecorderConfig(mode="stat")), progress=False,
                             loaded=rep.apply(placement.uniform(0, mc.num_moe_layers, mc.num_experts),
                                              False, recorder))
        recorder.start()
        await asyncio.gather(*(generate(engine, r.prompt, r.max_tokens) for r in warm))
        stats = str(recorder.dump(stats_dir))
        if args.save_stats:  # for bench/decode_step.py --strategy frequency --init-expert-location
            shutil.copy(stats, args.save_stats)
        await engine.shutdown()
        counts = placement.load_statistics(stats, mc)
        timings["warmup_s"] = time.perf_counter() - t

        rows, cells = [], []
        report = {
            "benchmark": "bench/placement_sweep.py " + " ".join(sys.argv[1:]),
            "machine": describe(), "dram_read_gbps": bw[0], "hbm_gbps": bw[1],
            "model": {"preset": args.preset, "num_layers": mc.num_layers, "seed": args.model_seed, "experts": mc.num_experts,
                      "top_k": mc.top_k, "expert_mib": mc.expert_nbytes / 2**20,
                      "cpu_weight_format": loaded.hybrid.layers[0].store.fmt.value
                      if loaded.hybrid.layers else None,
                      "dir": model_dir, "device": str(loaded.device)},
            "profile": profile.describe() if profile else "demo (random router)",
            "workload": {"requests": args.requests, "scale": args.scale, "chunk": args.chunk,
                         "mean_prompt": statistics.fmean(len(r.prompt) for r in work),
                         "mean_output": statistics.fmean(r.max_tokens for r in work),
                         "max_output": max(r.max_tokens for r in work),
                         "warmup_seed": 1, "seed": 2, "b1_prompt_len": B1_PROMPT_LEN,
                         "decode_tokens": args.decode_tokens},
            "dynamic_threshold": args.threshold, "disable_cuda_graph": args.disable_cuda_graph,
            "runs": args.runs, "timings": timings, "skipped": [], "results": rows}
        # the two ends first: a time budget that runs out leaves middle cells out, not the
        # 0% and 100% rows every other cell is read against
        ends = [r for r in args.ratios if r in (0.0, 1.0)]
        for ratio in ends + [r for r in args.ratios if r not in ends]:
            for strategy in args.strategies:
                if ratio in (0.0, 1.0) and cells and cells[-1]["ratio"] == ratio:
                    # no choice to make: every strategy places nothing, or everything, on the GPU
                    rows.append({**rows[-1], "strategy": strategy, "copied": True})
                    continue
                spent = time.perf_counter() - start
                # the first cell also compiles the kernels: the others tell what a cell costs
                if cells and spent + max(c["cell_s"] for c in cells[1:] or cells) > args.time_budget:
                    report["skipped"].append([ratio, strategy])
                    continue
                t = time.perf_counter()
                pcfg = placement_config(strategy, ratio, stats, args.threshold)
                mask = placement.gpu_expert_mask(pcfg, mc)
                cfg = replace(base, placement=pcfg)
                runs = [await run_cell(rep, cfg, mask, strategy.startswith("dynamic"), work, b1_prompt,
                                       args, bw, counts) for _ in range(args.runs)]
                row = {"ratio": ratio, "strategy": strategy, **median_row(runs),
                       "cell_s": time.perf_counter() - t}
                rows.append(row)
                cells.append(row)
                print_rows([row], header=len(cells) == 1)
                timings["cells_s"] = sum(r["cell_s"] for r in cells)
                timings["total_s"] = time.perf_counter() - start
                save(report)
        order = {s: i for i, s in enumerate(args.strategies)}
        rows.sort(key=lambda r: (r["ratio"], order.get(r["strategy"], len(order))))
        save(report)
    finally:
        loaded.close()
    if report["skipped"]:
        print(f"time budget ({args.time_budget:.0f} s) spent: skipped {len(report['skipped'])} cells "
              f"{report['skipped']}", flush=True)
    return report


FULL = {"ratios": [i / 10 for i in range(11)], "requests": 24, "scale": 0.15, "decode_tokens": 48}
# 24 requests x0.15: 1.1k output tokens, the longest 130 (x0.25 had one of 373: a batch-1 tail)
QUICK = {"ratios": [0.0, 0.5, 1.0], "requests": 4, "scale": 0.1, "decode_tokens": 16}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", help="bench/models.py preset, or demo")
    ap.add_argument("--num-layers", type=int, default=8, help="cut the preset to this many layers")
    ap.add_argument("--ratios", type=float, nargs="+", default=None, help="default 0, 0.1, ..., 1")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=ALL_STRATEGIES)
    ap.add_argument("--requests", type=int, default=None, help="workload requests (default 24)")
    ap.add_argument("--scale", type=float, default=None, help="workload length scale (default 0.15)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="batch-1 tokens (default 48)")
    ap.add_argument("--runs", type=int, default=1, help="runs per cell (the median is reported)")
    ap.add_argument("--chunk", type=int, default=512, help="chunked prefill size")
    ap.add_argument("--threshold", type=int, default=64, help="dynamic update prefill threshold")
    ap.add_argument("--quick", action="store_true", help="ratios 0 0.5 1, 4 short requests")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds: cells that would end later are skipped (the rest is reported)")
    ap.add_argument("--model-seed", type=int, default=0,
                    help="the random checkpoint's seed: another draw of weights and hot experts")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--weight-format", default="auto", choices=[f.value for f in WeightFormat],
                    help="the CPU experts' weight format (--kt-weight-format; auto: the model's)")
    ap.add_argument("--checkpoint-dir", default=None, help="default /dev/shm (tmpfs), else the temp dir")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default: from model and machine)")
    ap.add_argument("--save-stats", default=None,
                    help="also write the warm-up's routing statistics (the frequency strategy's) here")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.decode_tokens = max(args.decode_tokens, B1_WARMUP_TOKENS + 2)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    gpu = "h200" if "H200" in (machine["gpu"] or "") else \
        (machine["gpu"] or f"{machine['logical_cpus']}core").replace(" ", "_")
    stem = args.tag or f"placement_sweep_{gpu}_{args.preset}_{args.num_layers or 'all'}layers"
    if args.weight_format != "auto" and not args.tag:
        stem += f"_cpu_{args.weight_format}"

    def save(report: dict) -> None:
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))

    report = asyncio.run(sweep(args, save))
    save(report)
    table = markdown(report)
    (out / f"{stem}.md").write_text(table)
    print("\n" + table)
    for line in targets(report):
        print(line)
    timings = ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())
    print(f"\ntimings (s): {timings}")
    print(f"wrote {out / stem}.json, .md" + plot(report, out / f"{stem}.png"))


if __name__ == "__main__":
    main()
