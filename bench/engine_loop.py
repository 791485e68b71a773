"""The engine loop's own cost per step, with the model step replaced by a fake one.

    python bench/engine_loop.py [--batch 1 16] [--gen 200]

The fake step holds the GIL for `--prepare-us` (staging and launch), waits `--wait-us` with
the GIL released (a graph replay), holds it `--sample-us` more, and returns one token per
sequence. The figure is the time per step beyond the fake step's own (measured alone, the
same way), for the serial and the overlap schedule. Runs on the demo model's tokenizer, so
detokenizing and the streams are real. Never asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from machine import describe

from ktengine import AsyncEngine, EngineConfig, SamplingParams
from ktengine.engine import collect
from ktengine.model_runner import StepOutput
from ktengine.sampler import SampleResult


def _spin(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def fake_step(args):
    def step(batch, launched=None):
        _spin(args.prepare_us * 1e-6)
        if launched is not None:
            launched.set()
        time.sleep(args.wait_us * 1e-6)
        _spin(args.sample_us * 1e-6)
        seqs = [item.seq for item in batch.items if item.samples]
        for item in batch.items:
            item.seq.num_computed_tokens += item.num_new_tokens
        tokens = [(7 * len(s.output_token_ids) + 3) % 4000 + 5 for s in seqs]
        return StepOutput(seqs, SampleResult(tokens, [None] * len(seqs), [None] * len(seqs)))

    return step


async def per_step_ms(args, batch: int, overlap: bool) -> float:
    engine = AsyncEngine(EngineConfig(), progress=False)
    engine.runner.step = fake_step(args)
    engine.overlap_schedule = overlap
    params = SamplingParams(max_tokens=args.gen, temperature=0.0, ignore_eos=True)
    times = []
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            await asyncio.gather(*(collect(engine.generate([5 + i, 6, 7], params)) for i in range(batch)))
            times.append((time.perf_counter() - t0) / args.gen * 1e3)
    finally:
        await engine.shutdown()
    return statistics.median(times)


def fake_alone_ms(args, repeats: int = 300) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _spin(args.prepare_us * 1e-6)
        time.sleep(args.wait_us * 1e-6)
        _spin(args.sample_us * 1e-6)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--gen", type=int, default=200)
    ap.add_argument("--prepare-us", type=float, default=150.0)
    ap.add_argument("--wait-us", type=float, default=2000.0)
    ap.add_argument("--sample-us", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians printed)")
    args = ap.parse_args()
    base = fake_alone_ms(args)
    machine = describe()
    print(f"{machine['cpu']}, {machine['logical_cpus']} CPUs; the fake step alone: {base:.3f} ms")
    modes = (("serial", False), ("overlap", True))
    for batch in args.batch:
        got: dict[str, list[float]] = {name: [] for name, _ in modes}
        for _ in range(args.rounds):
            for name, overlap in modes:
                got[name].append(asyncio.run(per_step_ms(args, batch, overlap)))
        for name, _ in modes:
            ms = statistics.median(got[name])
            print(f"batch {batch:3d} {name:8s} {ms:.3f} ms per step: {1e3 * (ms - base):5.0f} us "
                  f"beyond the fake step (the limit: 0)")


if __name__ == "__main__":
    main()
