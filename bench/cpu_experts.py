"""CPU expert kernels: decode GB/s beside the DRAM read bandwidth, prefill TFLOP/s.

    python bench/cpu_experts.py [--quick] [--json] [--threads N] [--sweep-amx] [--kt-variants amx,avx512]

Shapes: a Qwen3-30B-A3B MoE layer (H 2048, I 768, 128 experts, top-8) and a 512-expert layer
(H 2048, I 512, top-10); decode T = 1, 4, 16, prefill T = 512, 2048; every weight format.
Weights are cold: each format is packed into enough layer copies that the footprint is several
times the last-level cache, and calls cycle through them; a decode call (T·k < experts) routes
to the next T·k experts of its layer in turn, so one cycle reads every expert of every copy
once (random routing would keep re-reading a few hundred MB, which a large LLC holds); prefill
routes at random, uniformly or, with --zipf s, with expert popularity 1/rank^s as real routers
skew (hot experts with many times the mean rows, which the workers must share). Decode
GB/s counts the packed bytes (weights + scales) of the distinct experts a call routes to,
beside the DRAM read bandwidth measured just before and after that point (`dram_gbps_around`:
a shared machine's drifts); TFLOP/s counts 6*H*I per (token, expert) pair. Never asserts.

kt-kernel (PyPI kt-kernel, KTransformers' CPU MoE kernels), when this interpreter can import it,
is timed the same way on the same shapes and formats (bf16, int8, int4; it has no fp32), once per
ISA variant (AMX, AVX512), each in a child process (bench/ktkernel_adapter.py), with the same
thread count; rows `impl: kt-kernel-amx` / `kt-kernel-avx512`. Each variant's output is first
checked against tests/reference.py on a small case (max relative error printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ktengine.moe.cpu_experts import (
    CpuExpertStore,
    CpuThreadPool,
    KernelPath,
    WeightFormat,
    available_paths,
    physical_cores,
)
from ktengine_ext import _moe, instruction_sets

SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "e512-i512": (512, 2048, 512, 10)}
DECODE_T = (1, 4, 16)
PREFILL_T = (512, 2048)


def llc_bytes() -> int:
    best = 32 << 20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        value = int(size.rstrip("KMG")) * mult
        if level >= 3:
            best = max(best, value)
    return best


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "llc_bytes": llc_bytes(), "ram_gib": round(mem / 2**30, 1), "gpu": gpu,
            "instruction_sets": instruction_sets(), "torch": torch.__version__,
            "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg()}


def dram_read_gbps(pool: CpuThreadPool, nbytes: int, reps: int = 5) -> float:
    buf = torch.ones(nbytes, dtype=torch.uint8)
    avx512 = KernelPath.AVX512 in available_paths()
    best = 0.0
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        _moe.read_buffer(pool._pool, buf.data_ptr(), nbytes, avx512)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def source_weights(shape_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bf16 gate, up [E, I, H] and down [E, H, I] every implementation packs (seeded)."""
    E, H, I, _ = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*s, generator=gen).mul_(0.02).bfloat16()
                 for s in ((E, I, H), (E, I, H), (E, H, I)))


def token_counts(quick: bool) -> tuple[int, ...]:
    if ARGS.tokens:
        return tuple(int(t) for t in ARGS.tokens.split(","))
    return (1, 16, 512) if quick else DECODE_T + PREFILL_T


ZIPF = 0.0  # --zipf s: prefill routing with expert popularity 1/rank^s; 0: uniform


def routing(T: int, E: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if ZIPF > 0:  # a new order of the experts' popularity each call, k distinct per token
        rank = torch.randperm(E, generator=gen).double() + 1
        ids = torch.multinomial((1.0 / rank**ZIPF).expand(T, E), k, generator=gen).to(torch.int32)
    else:
        ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    return ids, torch.rand(T, k, generator=gen)


def cold_calls(T: int, E: int, k: int, num_layers: int, gen: torch.Generator,
               ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """A cycle of (layer, topk ids [T, k], weights [T, k]) that reads no expert twice: with
    T·k < E, call i uses layer i % num_layers and that layer's next T·k experts (each token k
    distinct ones), so the cycle covers every expert of every layer once; else random routing
    over max(8, num_layers) calls."""
    if T * k >= E:
        return [(i % num_layers, *routing(T, E, k, gen)) for i in range(max(8, num_layers))]
    per_layer = -(-E // (T * k))
    calls = []
    for i in range(num_layers * per_layer):
        base = (i // num_layers) * T * k
        ids = (base + torch.arange(T * k)).remainder(E).view(T, k).to(torch.int32)
        calls.append((i % num_layers, ids, torch.rand(T, k, generator=gen)))
    return calls


def time_calls(fn, calls: list, min_seconds: float, min_reps: int, warm: int = 2) -> float:
    for args in calls[:max(2, warm)]:  # every store's first call (its workspace's first touch)
        fn(*args)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_seconds:
        fn(*calls[reps % len(calls)])
        reps += 1
    return (time.perf_counter() - t0) / reps


def bench_format(results, shape_name, fmt, src, pool, args, dram, amx_min_tokens):
    E, H, I, k = SHAPES[shape_name]
    gate, up, down = src
    first = CpuExpertStore(gate, up, down, fmt, pool, amx_min_tokens=amx_min_tokens)
    num_layers = max(2, math.ceil(args.cold_factor * llc_bytes() / first.nbytes))
    stores = [first] + [CpuExpertStore(gate, up, down, fmt, pool, amx_min_tokens=amx_min_tokens)
                        for _ in range(num_layers - 1)]
    gen = torch.Generator().manual_seed(0)
    for T in token_counts(args.quick):
        calls = []
        for layer, ids, w in cold_calls(T, E, k, num_layers, gen):
            x = torch.randn(T, H).to(torch.bfloat16 if fmt is not WeightFormat.FP32 else torch.float32)
            calls.append((stores[layer], x, ids, w))
        bytes_read = sum(len(torch.unique(c[2])) * first.expert_nbytes() for c in calls) / len(calls)
        decode = T * k < E
        # a shared machine's bandwidth drifts: decode points get their own DRAM figure,
        # measured just before and after them
        before = dram_read_gbps(pool, ARGS.dram_bytes, reps=3) if decode else None
        sec = time_calls(lambda s, x, ids, w: s.forward(x, ids, w), calls,
                         args.seconds, 3 if T >= 512 else 20, warm=num_layers)
        row = {"impl": "ktengine", "format": fmt.value, "shape": shape_name, "tokens": T,
               "seconds": sec, "gbps": bytes_read / sec / 1e9,
               "tflops": 6 * H * I * T * k / sec / 1e12, "threads": pool.num_threads, "caller_helps": pool.caller_helps,
               "path": first.path.value,
               "layers_cycled": num_layers}
        if decode:
            row["dram_gbps_around"] = (before + dram_read_gbps(pool, ARGS.dram_bytes, reps=3)) / 2
        if args.phases:
            row["phases_us"] = phase_profile(calls, pool.num_threads, args.seconds)
        results.append(row)
        report(row, row.get("dram_gbps_around", dram))
        if args.phases:
            print("    per call, us: " + "; ".join(
                f"{name} work {v['work_mean']:.0f} (slowest worker {v['work_max']:.0f}), "
                f"barrier {v['wait_mean']:.0f}" for name, v in row["phases_us"].items()),
                flush=True, file=sys.stderr if args.json else sys.stdout)
    del stores, first


def phase_profile(calls: list, num_threads: int, seconds: float) -> dict:
    """Per phase of the fused call (over the same cycle of calls, timed again with the
    kernels' phase profile on), in us per call: the workers' mean and slowest time on items,
    and their mean wait at the barrier after the phase."""
    _moe.phase_profile(True)
    try:
        time_calls(lambda s, x, ids, w: s.forward(x, ids, w), calls, seconds, 3, warm=0)
    finally:
        _moe.phase_profile(False)
    n, per_worker = _moe.phase_profile_read(num_threads)
    out = {}
    for name in _moe.PHASE_NAMES:
        work = [w[name][0] for w in per_worker]
        wait = [w[name][1] for w in per_worker]
        if max(work) == 0:
            continue
        out[name] = {"work_mean": sum(work) / len(work) / n * 1e6, "work_max": max(work) / n * 1e6,
                     "wait_mean": sum(wait) / len(wait) / n * 1e6}
    return out


def bench_torch(results, shape_name, src, args, dram):
    """torch's own CPU loop over experts, bf16 weights (a single layer, 1.2+ GB: cold enough)."""
    E, H, I, k = SHAPES[shape_name]
    gate, up, down = src
    gen = torch.Generator().manual_seed(1)

    def moe(x, ids, w):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok]
            y = (torch.nn.functional.silu(xe @ gate[e].T) * (xe @ up[e].T)) @ down[e].T
            out.index_add_(0, tok, y * w[tok, slot, None].to(x.dtype))
        return out

    expert_bytes = 3 * H * I * 2
    for T in ((1, 2048) if not args.quick else (1,)):
        calls = [(torch.randn(T, H).bfloat16(), *routing(T, E, k, gen)) for _ in range(4)]
        sec = time_calls(moe, calls, args.seconds, 2)
        bytes_read = sum(len(torch.unique(c[1])) * expert_bytes for c in calls) / len(calls)
        row = {"impl": "torch-naive", "format": "bf16", "shape": shape_name, "tokens": T,
               "seconds": sec, "gbps": bytes_read / sec / 1e9,
               "tflops": 6 * H * I * T * k / sec / 1e12}
        results.append(row)
        report(row, dram)


def sweep_amx(results, src, pool, args, dram):
    """AVX512 vs AMX by tokens per expert: where the switch point (amx_min_tokens) lies."""
    E, H, I, k = SHAPES["qwen3-30b-a3b"]
    gate, up, down = src
    gen = torch.Generator().manual_seed(2)
    for fmt in (WeightFormat.BF16, WeightFormat.INT8, WeightFormat.INT4):
        store = CpuExpertStore(gate, up, down, fmt, pool, path="amx")
        for per_expert in (1, 2, 4, 8, 16, 32, 64):
            T = per_expert * E // k
            calls = [(torch.randn(T, H).bfloat16(), *routing(T, E, k, gen)) for _ in range(3)]
            for impl, threshold in (("ktengine-avx512", 1 << 30), ("ktengine-amx", 1)):
                store.amx_min_tokens = threshold
                sec = time_calls(store.forward, calls, args.seconds, 3)
                row = {"impl": impl, "format": fmt.value, "shape": "qwen3-30b-a3b", "tokens": T,
                       "tokens_per_expert": per_expert, "seconds": sec,
                       "gbps": store.nbytes / sec / 1e9,
                       "tflops": 6 * H * I * T * k / sec / 1e12}
                results.append(row)
                report(row, dram)


def check_ktengine(checks: list, formats: list[str], pool: CpuThreadPool) -> None:
    """ktengine on the small case kt-kernel is checked on (same reference, bf16 weights)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.reference import fused_moe_reference

    E, H, I, k = 16, 512, 256, 4
    for fmt in formats:
        if fmt not in ("bf16", "int8", "int4"):
            continue
        gen = torch.Generator().manual_seed(5)
        gate, up = (torch.randn(E, I, H, generator=gen).mul_(0.05).bfloat16() for _ in range(2))
        down = torch.randn(E, H, I, generator=gen).mul_(0.05).bfloat16()
        store = CpuExpertStore(gate, up, down, fmt, pool)
        row = {"impl": "ktengine", "format": fmt, "case": f"E{E} H{H} I{I} k{k}"}
        for T in (1, 64):
            x = torch.randn(T, H, generator=gen).bfloat16()
            ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
            w = torch.rand(T, k, generator=gen)
            out = store.forward(x, ids, w).float()
            ref = fused_moe_reference(x, gate, up, down, ids, w)
            row[f"T{T}_max_rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
            row[f"T{T}_rel_fro_err"] = ((out - ref).norm() / ref.norm()).item()
        checks.append(row)
        print(f"{'ktengine':16s} {fmt:5s} check {row['case']} vs tests/reference.py: max rel err "
              f"T=1 {row['T1_max_rel_err']:.2e}, T=64 {row['T64_max_rel_err']:.2e} "
              f"(rel Frobenius {row['T1_rel_fro_err']:.2e}, {row['T64_rel_fro_err']:.2e})",
              flush=True, file=sys.stderr if ARGS.json else sys.stdout)


def ktkernel_probe() -> dict | None:
    """kt-kernel's version if this interpreter imports it (in a child: its variant is chosen
    at import, and the parent never loads it), else None after one printed line."""
    code = "import kt_kernel; print(kt_kernel.__version__)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        proc = None
        why = repr(exc)
    if proc is not None and proc.returncode == 0:
        return {"version": proc.stdout.strip().splitlines()[-1], "variants": {}, "checks": []}
    if proc is not None:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}"
    print(f"kt-kernel: not importable by {sys.executable} ({why}); skipped", flush=True,
          file=sys.stderr if ARGS.json else sys.stdout)
    return None


def bench_ktkernel(results, kt: dict, shape_name, args, dram, threads, formats) -> None:
    """kt-kernel's variants on one shape, each in a child process (bench/ktkernel_adapter.py),
    with our thread count and then any other counts --kt-threads lists."""
    formats = [f for f in formats if f in ("bf16", "int8", "int4")]
    if not formats:
        return
    adapter = Path(__file__).resolve().parent / "ktkernel_adapter.py"
    counts = [int(n) for n in args.kt_threads.split(",")] if args.kt_threads else [threads]
    for variant, kt_threads in ((v, n) for n in counts for v in args.kt_variants.split(",")):
        label = f"kt-kernel-{variant}" + ("" if kt_threads == threads else f" {kt_threads}t")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(adapter), "--variant", variant, "--shape", shape_name,
                   "--formats", ",".join(formats),
                   "--tokens", ",".join(map(str, token_counts(args.quick))),
                   "--threads", str(kt_threads), "--label", label, "--seconds", str(args.seconds),
                   "--cold-factor", str(args.cold_factor), "--dram", str(dram), "--out", str(out),
                   "--zipf", str(args.zipf)]
            if args.json:
                cmd.append("--json")
            if variant not in kt["variants"]:
                cmd.append("--check")
            # the child's lines go where ours go; its stdout is ours unless --json
            proc = subprocess.run(cmd, stdout=sys.stderr if args.json else None, check=False)
            state = json.loads(out.read_text()) if out.exists() else {}
        if state.get("info"):
            kt["variants"].setdefault(variant, state["info"])
        kt["checks"] += state.get("checks", [])
        results += state.get("rows", [])
        if proc.returncode != 0 or "error" in state:
            print(f"{label}: {state.get('error') or f'child exited with {proc.returncode}'}"
                  f"; {len(state.get('rows', []))} rows kept", flush=True,
                  file=sys.stderr if args.json else sys.stdout)


def report(row: dict, dram: float) -> None:
    print(f"{row['impl']:16s} {row['format']:5s} {row['shape']:14s} T={row['tokens']:5d} "
          f"{row['seconds'] * 1e3:9.3f} ms  {row['gbps']:7.1f} GB/s ({row['gbps'] / dram:5.1%} "
          f"of DRAM {dram:.0f})  {row['tflops']:6.2f} TFLOP/s", flush=True,
          file=sys.stderr if ARGS.json else sys.stdout)


def main() -> None:
    global ARGS, ZIPF
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=None, help="worker threads")
    parser.add_argument("--caller-helps", action="store_true",
                        help="the waiting thread computes beside the workers (as the engine's "
                             "does; only with a core the workers leave free)")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--tokens", default=None, help="token counts, comma-separated "
                        "(default: decode 1, 4, 16 and prefill 512, 2048; --quick 1, 16, 512)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum timing per point")
    parser.add_argument("--cold-factor", type=float, default=4.0,
                        help="weights footprint per format, in multiples of the LLC")
    parser.add_argument("--amx-min-tokens", type=int, default=None)
    parser.add_argument("--zipf", type=float, default=0.0,
                        help="prefill routing skew: expert popularity 1/rank^s (0: uniform)")
    parser.add_argument("--sweep-amx", action="store_true", help="time AVX512 vs AMX per expert load")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase of the fused call per worker (work, barrier)")
    parser.add_argument("--kt-variants", default="amx,avx512",
                        help="kt-kernel ISA variants to time when importable ('' for none)")
    parser.add_argument("--kt-threads", default=None,
                        help="kt-kernel thread counts, comma-separated (default: --threads)")
    ARGS = args = parser.parse_args()
    ZIPF = args.zipf
    if args.quick:
        args.shapes = "qwen3-30b-a3b"
        args.seconds = min(args.seconds, 0.2)
        args.cold_factor = min(args.cold_factor, 2.0)
    pool = CpuThreadPool(args.threads, caller_helps=args.caller_helps)
    torch.set_num_threads(pool.num_threads)
    args.dram_bytes = (512 << 20) if args.quick else (2 << 30)
    dram = dram_read_gbps(pool, args.dram_bytes)
    info = machine() | {"threads": pool.num_threads, "zipf": args.zipf}
    print(f"{info['cpu']}, {info['physical_cores']} cores, {pool.num_threads} threads; "
              f"DRAM read {dram:.1f} GB/s", flush=True, file=sys.stderr if args.json else sys.stdout)
    amx_min = args.amx_min_tokens  # None: each format's default
    results: list[dict] = []
    formats = args.formats.split(",")
    checks: list[dict] = []
    kt = ktkernel_probe() if args.kt_variants else None
    if kt is not None:
        check_ktengine(checks, formats, pool)
    for shape_name in args.shapes.split(","):
        src = source_weights(shape_name)
        for fmt in formats:
            bench_format(results, shape_name, WeightFormat(fmt), src, pool, args, dram, amx_min)
        if shape_name == "qwen3-30b-a3b" and args.sweep_amx and KernelPath.AMX in available_paths():
            sweep_amx(results, src, pool, args, dram)
        if not args.no_torch:
            bench_torch(results, shape_name, src, args, dram)
        del src
        if kt is not None:
            bench_ktkernel(results, kt, shape_name, args, dram, pool.num_threads, formats)
    if args.json:
        info["loadavg_at_end"] = os.getloadavg()
        doc = {"dram_read_gbps": dram, "machine": info, "results": results}
        if kt is not None:
            doc["ktkernel"] = kt
            doc["checks"] = checks + kt["checks"]
        print(json.dumps(doc, indent=1))
    pool.close()


if __name__ == "__main__":
    main()
