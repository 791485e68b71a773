"""One expert's GEMM alone on one thread (the prefill kernel), beside the core's bare AMX peak.

    python bench/amx_gemm.py [--formats bf16,int8] [--tokens 32,128] [--experts 48] [--repeats 5]

Qwen3-30B-A3B expert shapes: gate/up [2*768, 2048] and down [2048, 768]. `hot` runs one expert
over and over (its weights stay in L2/LLC); `cold` cycles through --experts experts (footprint
well past L2, and past the LLC's share when large). TFLOP/s counts 2*m*N*K per call, median of
--repeats timings; the peak is back-to-back TDPBF16PS / TDPBSSD with no loads. Never asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ktengine.moe.cpu_experts import (
    _FMT_CODE,
    _PATH_CODE,
    CpuExpertStore,
    CpuThreadPool,
    KernelPath,
    WeightFormat,
)
from ktengine_ext import _moe

H, I = 2048, 768


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="bf16,int8")
    parser.add_argument("--tokens", default="32,128", help="rows per expert, comma-separated")
    parser.add_argument("--experts", type=int, default=48, help="experts cycled when cold")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--path", default="amx", choices=[p.value for p in KernelPath])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    E, path = args.experts, KernelPath(args.path)
    rows = []
    with CpuThreadPool(1) as pool:
        gen = torch.Generator().manual_seed(0)
        gate, up = (torch.randn(E, I, H, generator=gen).mul_(0.02).bfloat16() for _ in range(2))
        down = torch.randn(E, H, I, generator=gen).mul_(0.02).bfloat16()
        for fmt in map(WeightFormat, args.formats.split(",")):
            store = CpuExpertStore(gate, up, down, fmt, pool)
            peak = _moe.amx_peak_tflops(fmt is WeightFormat.INT8)
            for which, name, (n, k) in ((0, "gate_up", (2 * I, H)), (1, "down", (H, I))):
                for m in map(int, args.tokens.split(",")):
                    for temp, n_exp in (("hot", 1), ("cold", E)):
                        reps = max(4, 2 * n_exp)
                        secs = [_moe.time_gemm(_FMT_CODE[fmt], 0, 0, E, H, I, store._ptrs(), which,
                                               _PATH_CODE[path], m, 0, n_exp, reps)
                                for _ in range(args.repeats)]
                        sec = statistics.median(secs)
                        row = {"format": fmt.value, "matrix": name, "m": m, "n": n, "k": k,
                               "weights": temp, "seconds": sec, "tflops": 2 * m * n * k / sec / 1e12,
                               "best_tflops": 2 * m * n * k / min(secs) / 1e12, "peak_tflops": peak}
                        rows.append(row)
                        print(f"{fmt.value:5s} {name:8s} m={m:4d} {temp:4s} {sec * 1e3:8.3f} ms "
                              f"{row['tflops']:5.2f} TFLOP/s (best {row['best_tflops']:5.2f}; "
                              f"AMX peak {peak:4.2f}, {row['tflops'] / peak:4.0%})", flush=True,
                              file=sys.stderr if args.json else sys.stdout)
            del store
    if args.json:
        print(json.dumps({"path": path.value, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
