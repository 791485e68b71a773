"""Where a decode step's time goes, with CUDA graphs: the engine's step beside its parts.

    python bench/decode_step.py --preset qwen3-30b-a3b --num-layers 4 --ratio 0 --batch 1 8

For each batch size, after a warm-up request has captured the graph:
  step      engine decode time per step (scheduler, graph replay, sampling, output); also
            with the other schedule (overlap: outputs produced while the next step runs)
  replay    one graph replay, CPU experts included (the engine's inputs of its last step)
  cpu       the CPU experts alone: every layer's fused call on the same inputs, back to back
  gpu       one replay with the CPU experts given no rows (GPU kernels and host-node latency)
  kernels   GPU kernel time in one replay without CPU rows (profiler), and kernels per step
  idle      a replay's device time between CUDA events less its activities' (without, then
            with CPU rows), and the largest gaps of a profiled replay by the activity before them
The step is bound below by cpu + the GPU work the CPU cannot overlap; overhead is what the
step spends beyond replay (Python, sampling), and the replay beyond max(cpu, gpu). The line
"overhead" is step − cpu − kernels (a lower bound: it counts no overlap), the figure the
issue wants under 5%. Never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from machine import describe

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine.config import (
    MoEConfig,
    PlacementConfig,
    PlacementStrategy,
    SchedulerConfig,
    WeightFormat,
)

TEMPERATURE, TOP_P = 0.0, 1.0  # of the timed requests (--temperature, --top-p)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


async def engine_step_ms(engine: AsyncEngine, batch: int, prompt_len: int, gen: int) -> float:
    vocab = engine.model_config.vocab_size
    prompts = [[(7 * i + 13 * j) % (vocab - 1) + 1 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=gen, temperature=TEMPERATURE, top_p=TOP_P, seed=0, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in prompts]

    async def one(i, p):
        async for _ in engine.generate(p, params):
            stamps[i].append(time.perf_counter())

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    return (end - start) / (gen - 1) * 1e3


async def profile_step(engine: AsyncEngine, batch: int, prompt_len: int, gen: int, top: int = 25) -> None:
    """Prints where the Python time of decode steps goes over one generation (cProfile, own
    time; on Python 3.12+ it sees every thread: the engine loop and the step thread)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        await engine_step_ms(engine, batch, prompt_len, gen)
    finally:
        prof.disable()
    print(f"  cProfile over {gen} steps of batch {batch} (tottime ms, calls):")
    stats = pstats.Stats(prof)
    for (file, line, fn), (_, calls, tottime, _, _) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        print(f"    {tottime * 1e3:8.2f} {calls:6d}  {Path(file).name}:{line} {fn}")


async def timeline(engine: AsyncEngine, batch: int, prompt_len: int, gen: int) -> dict:
    """Medians (us) of the host-side segments of graph decode steps, from timestamps taken
    around the runner's calls, the graph launch and the waits (one generation of `gen`
    tokens). A step launched ahead (the overlap schedule, greedy rows):
      prepare   launch entry -> graph launch (staging, dispatcher start)
      launch    the graph launch call itself
      queue     launch return -> launch exit (the token copy, the done event)
      post      launch exit -> complete entry (the last step's tokens to the event loop)
      wait_gpu  complete entry -> the step before's end event reached
      finish    -> complete exit (the dispatcher's run joined, checks, tokens read)
      between   complete exit -> next launch entry (advance, post, schedule)
    A step one at a time (the serial schedule): prepare (from step entry) and launch as
    above; wait_gpu launch return -> end event; finish -> step exit (the dispatcher's run
    joined, sampling); between step exit -> next step entry.
    gpu_ms: the device time from a replay's start to its end event."""
    graphs, runner = engine.runner.graphs, engine.runner
    marks: list[tuple[str, float]] = []
    now = time.perf_counter
    starts: list = []
    ends: list = []

    class Graph:
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            starts.append(ev)
            marks.append(("launch", now()))
            self.graph.replay()
            marks.append(("launched", now()))

    class Done:
        def __init__(self, event):
            self.event = event

        def record(self):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ends.append(ev)
            self.event.record()

        def synchronize(self):
            self.event.synchronize()
            marks.append(("synced", now()))

    def wrap(name, fn):
        def timed(*a, **k):
            marks.append((name + "_in", now()))
            out = fn(*a, **k)
            marks.append((name + "_out", now()))
            return out
        return timed

    saved = dict(graphs.graphs), graphs.done
    graphs.graphs.update({k: (Graph(g), logits) for k, (g, logits) in graphs.graphs.items()})
    graphs.done = [Done(e) for e in graphs.done]
    runner.step, runner.launch, runner.complete = (wrap("step", runner.step), wrap("ahead", runner.launch),
                                                   wrap("complete", runner.complete))
    try:
        await engine_step_ms(engine, batch, prompt_len, gen)
    finally:
        graphs.graphs.clear()
        graphs.graphs.update(saved[0])
        graphs.done = saved[1]
        del runner.step, runner.launch, runner.complete
    names = [("prepare", "ahead_in", "launch"), ("prepare", "step_in", "launch"),
             ("launch", "launch", "launched"), ("queue", "launched", "ahead_out"),
             ("post", "ahead_out", "complete_in"), ("wait_gpu", "complete_in", "synced"),
             ("finish", "synced", "complete_out"), ("between", "complete_out", "ahead_in"),
             ("wait_gpu", "launched", "synced"), ("finish", "synced", "step_out"),
             ("between", "step_out", "step_in")]
    seg: dict[str, list[float]] = {}
    for (a, ta), (b, tb) in itertools.pairwise(marks):
        for n, x, y in names:
            if (a, b) == (x, y):
                seg.setdefault(n, []).append((tb - ta) * 1e6)
    out = {n: statistics.median(v) for n, v in seg.items() if v}
    torch.cuda.synchronize()
    gpu = [a.elapsed_time(b) for a, b in zip(starts, ends, strict=False)]
    out["gpu_ms"] = statistics.median(gpu) if gpu else 0.0
    return out


async def compare_helping(engine: AsyncEngine, batch: int, args) -> dict:
    """Step and CPU-expert times with the waiting thread (the dispatcher) computing beside the
    workers and without, alternating in this process."""
    pool = engine.loaded.hybrid.pool
    steps: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    was = pool.caller_helps
    try:
        for _ in range(3):
            for helps in (True, False):
                pool.caller_helps = helps
                steps[helps].append(await engine_step_ms(engine, batch, args.prompt_len, args.gen))
                cpus[helps].append(parts_ms(engine, batch, args.repeats, cpu_only=True)["cpu_ms"])
    finally:
        pool.caller_helps = was
    return {"step_ms": {j: statistics.median(v) for j, v in steps.items()},
            "cpu_ms": {j: statistics.median(v) for j, v in cpus.items()}}


def parts_ms(engine: AsyncEngine, batch: int, repeats: int, cpu_only: bool = False) -> dict:
    graphs = engine.runner.graphs
    key = max(k for k in graphs.graphs if k[0] >= batch and k[0] == min(
        b for b, _ in graphs.graphs if b >= batch))
    live = graphs._staging_np[graphs._live_at:]  # the live row count the replay copies in

    def replay():
        graphs.replay(key)

    live[0] = batch
    out = {"bucket": key[0], "context_blocks": key[1], "replay_ms": _median_ms(replay, repeats)}
    steps = graphs._layer_steps(key[0])
    calls = [(layer.store, layer.mask_row, step)
             for layer, step in zip(engine.loaded.hybrid.layers, steps, strict=True) if step.call is not None]

    def cpu():
        for store, mask, step in calls:
            store.forward(step.x[:batch], step.ids[:batch], step.w[:batch], mask, step.out[:batch])

    out["cpu_ms"] = _median_ms(cpu, repeats) if calls else 0.0
    if cpu_only:
        return out
    live[0] = 0
    out["gpu_ms"] = _median_ms(replay, repeats)
    calls, gaps = _profile(graphs, key, 5)
    kernels = [e for call in calls for e in call]
    out["kernel_ms"] = sum(e.device_time for e in kernels) / len(calls) / 1e3
    out["kernels_per_step"] = len(kernels) / len(calls)
    top: dict[str, float] = {}
    for e in kernels:
        top[e.name] = top.get(e.name, 0.0) + e.device_time / len(calls) / 1e3
    out["top_kernels_ms"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    out["idle_ms"], out["top_idle_after_ms"] = gaps
    live[0] = batch
    calls, (out["idle_ms_live"], out["top_idle_after_ms_live"]) = _profile(graphs, key, 5)
    # one replay's first activities in order: the gap before each, its duration (us)
    out["trace_live"] = [(e.name[:70], round(e.time_range.start - p.time_range.end, 1),
                          round(e.time_range.end - e.time_range.start, 1))
                         for p, e in itertools.pairwise(calls[0])][:80]
    return out


def _profile(graphs, key, repeats: int):
    """GPU activities of `repeats` replays of graph `key`, one list per replay, and the GPU's
    idle time in one: the graph's device time between CUDA events around its launch,
    unprofiled (median), less the time its profiled activities take; with the largest gaps
    inside the profiled replays by the activity that precedes them (where the stream waits).
    The profiler itself stalls a replay after its first device-to-host copy (about 0.3 ms on
    the H200 box, more than the unprofiled replay spends beyond its kernels), so the total
    comes from the events. Each profiled replay follows a marker kernel (torch.cuda._sleep),
    which tells the replays apart however many activities each has."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            torch.cuda._sleep(1)
            graphs.replay(key)
            torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    calls: list[list] = []
    for e in events:
        if "spin_kernel" in e.name:
            calls.append([])
        elif calls:  # anything before the first marker belongs to no call
            calls[-1].append(e)
    after: dict[str, float] = {}
    for call in calls:
        for a, b in itertools.pairwise(call):
            gap = b.time_range.start - a.time_range.end  # us
            if gap > 0:
                after[a.name[:60]] = after.get(a.name[:60], 0.0) + gap / len(calls) / 1e3
    busy_ms = sum(e.time_range.end - e.time_range.start for c in calls for e in c) / len(calls) / 1e3
    timed = []
    graph, logits = graphs.graphs[key]

    class Timed:  # events right around the graph's launch: its device time, no host work
        def replay(self):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            timed.append((start, end))

    graphs.graphs[key] = (Timed(), logits)
    try:
        for _ in range(max(repeats, 10)):
            graphs.replay(key)
    finally:
        graphs.graphs[key] = (graph, logits)
    torch.cuda.synchronize()
    timed = [s.elapsed_time(e) for s, e in timed]
    top = dict(sorted(after.items(), key=lambda kv: -kv[1])[:6])
    return calls, (max(0.0, statistics.median(timed) - busy_ms), top)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.0)
    ap.add_argument("--strategy", default="uniform", choices=[s.value for s in PlacementStrategy])
    ap.add_argument("--init-expert-location", default=None,
                    help="routing statistics for --strategy frequency (placement_sweep.py --save-stats)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--disable-torch-compile", action="store_true")
    ap.add_argument("--disable-overlap-schedule", action="store_true",
                    help="each step starts after the last one's outputs went out")
    ap.add_argument("--cpu-sync", choices=["flags", "kernels", "host"], default=None,
                    help="how graph steps start the CPU experts (KTENGINE_GRAPH_CPU_SYNC)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="of the timed requests (default greedy); sampled rows are drawn on the device")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--compare-helping", action="store_true",
                    help="also time steps and the CPU experts with the dispatcher thread computing "
                         "beside the workers and without, alternating")
    ap.add_argument("--cprofile", action="store_true", help="print where the Python time of a step goes")
    ap.add_argument("--trace", action="store_true", help="print one replay's GPU activities in order")
    ap.add_argument("--weight-format", default="auto", choices=[f.value for f in WeightFormat],
                    help="the CPU experts' weight format (--kt-weight-format; auto: the model's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_step.py needs a CUDA device")
    global TEMPERATURE, TOP_P
    TEMPERATURE, TOP_P = args.temperature, args.top_p
    if args.cpu_sync:
        os.environ["KTENGINE_GRAPH_CPU_SYNC"] = args.cpu_sync
    model = args.model
    if model is None:
        from models import write_random_checkpoint

        model = str(write_random_checkpoint(Path("/tmp/ktengine-bench") / args.preset, args.preset,
                                            args.num_layers))
    placement = PlacementConfig(strategy=PlacementStrategy(args.strategy), gpu_experts_ratio=args.ratio,
                                init_expert_location=args.init_expert_location)
    engine = AsyncEngine(EngineConfig(model=model, placement=placement,
                                      scheduler=SchedulerConfig(chunked_prefill_size=4096),
                                      disable_torch_compile=args.disable_torch_compile,
                                      disable_overlap_schedule=args.disable_overlap_schedule,
                                      moe=MoEConfig(weight_format=WeightFormat(args.weight_format))),
                         progress=False)
    rows = []
    try:
        if engine.runner.graphs is None:
            sys.exit("CUDA graphs are off for this model")
        for batch in args.batch:
            await engine_step_ms(engine, batch, args.prompt_len, 8)  # capture
            # alternating: the engine as configured, then the other schedule
            steps: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(3):
                for overlap in (engine.overlap_schedule, not engine.overlap_schedule):
                    engine.overlap_schedule = overlap
                    steps[overlap].append(await engine_step_ms(engine, batch, args.prompt_len, args.gen))
                engine.overlap_schedule = not args.disable_overlap_schedule
            step = statistics.median(steps[engine.overlap_schedule])
            row = {"batch": batch, "step_ms": step,
                   "step_ms_other_schedule": statistics.median(steps[not engine.overlap_schedule]),
                   **parts_ms(engine, batch, args.repeats)}
            # time in neither the CPU experts nor GPU kernels, counting them as if they never
            # overlapped (so this is a lower bound of the overhead)
            row["overhead_ms"] = max(0.0, step - row["cpu_ms"] - row["kernel_ms"])
            row["overhead_share"] = row["overhead_ms"] / step
            rows.append(row)
            for overlap in (True, False):
                engine.overlap_schedule = overlap
                row["timeline_" + ("overlap" if overlap else "serial")] = await timeline(
                    engine, batch, args.prompt_len, args.gen)
            engine.overlap_schedule = not args.disable_overlap_schedule
            if args.compare_helping:
                row["helping"] = await compare_helping(engine, batch, args)
            if args.cprofile:
                await profile_step(engine, batch, args.prompt_len, args.gen)
    finally:
        await engine.shutdown()
    report = {"model": model, "ratio": args.ratio, "strategy": args.strategy, "temperature": args.temperature, "top_p": args.top_p, "torch_compile": not args.disable_torch_compile,
              "overlap_schedule": not args.disable_overlap_schedule,
              "cpu_sync": os.environ.get("KTENGINE_GRAPH_CPU_SYNC", "kernels"),
              "machine": describe(), "results": rows}
    if args.json:
        print(json.dumps(report))
        return
    for r in rows:
        print(f"ratio {args.ratio} batch {r['batch']}: step {r['step_ms']:.2f} ms | replay {r['replay_ms']:.2f} "
              f"| cpu {r['cpu_ms']:.2f} | gpu {r['gpu_ms']:.2f} (kernels {r['kernel_ms']:.2f} ms, "
              f"{r['kernels_per_step']:.0f} per step)")
        other = "serial" if not args.disable_overlap_schedule else "overlap"
        print(f"  step with the {other} schedule instead: {r['step_ms_other_schedule']:.2f} ms")
        for name in ("overlap", "serial"):
            t = r["timeline_" + name]
            outside = sum(t.get(k, 0.0) for k in ("prepare", "queue", "post", "finish", "between"))
            print(f"  host timeline, {name} schedule (us): " + ", ".join(
                f"{k} {v:.0f}" for k, v in t.items() if k != "gpu_ms") + f"; replay on the GPU {t['gpu_ms']:.2f} ms"
                f"; host time outside the replay {outside:.0f} us")
        print(f"  overhead {r['overhead_ms']:.2f} ms = {100 * r['overhead_share']:.0f}% of the step "
              f"(the issue's target: under 5%)")
        if "helping" in r:
            j = r["helping"]
            print(f"  dispatcher computing beside the workers vs waiting (alternating, medians): "
                  f"step {j['step_ms'][True]:.2f} vs {j['step_ms'][False]:.2f} ms; "
                  f"cpu {j['cpu_ms'][True]:.2f} vs {j['cpu_ms'][False]:.2f} ms")
        for name, ms in r["top_kernels_ms"].items():
            print(f"    {ms:7.3f} ms  {name[:100]}")
        if args.trace:
            print("  one replay with CPU rows, in order (gap before, duration, us):")
            for name, gap, dur in r["trace_live"]:
                print(f"    {gap:8.1f} {dur:8.1f}  {name}")
        for live in ("", "_live"):
            print(f"  GPU idle in a replay{' with CPU rows' if live else ' without CPU rows'}: "
                  f"{r['idle_ms' + live]:.3f} ms; largest gaps when profiled, after:")
            for name, ms in r["top_idle_after_ms" + live].items():
                print(f"    {ms:7.3f} ms  {name}")


if __name__ == "__main__":
    asyncio.run(main())
