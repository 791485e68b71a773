"""The GPU-resident experts of one MoE layer: the fused Triton kernel beside the torch paths.

    python bench/gpu_experts.py [--tokens 1 8 32 256 2048] [--slots 64 128] [--json]
    python bench/gpu_experts.py --sweep-tiles [--tokens 1 4 8 32] [--slots 64 128] [--json]

Qwen3-30B-A3B's layer shape (hidden 2048, moe_intermediate 768, 128 experts, top-8), bf16,
uniform random routing over all experts, `slots` of them resident on the GPU. For each size:
median time of the fused kernel (fused_moe_triton.py; also replayed in a CUDA graph, with its
grid by slot and by pair), of the torch path the engine used
before it (gathered pair weights up to 64 pairs, else a loop over routed experts; the graph
path's gathered or every-slot product), and the GB/s of the distinct routed resident experts'
weights beside the device's copy bandwidth measured in the same run. Never asserts.

--sweep-tiles times the fused kernel in a CUDA graph with other block sizes (fused_moe_triton's
Tiles): each gate/up candidate with the default down tiles, each down candidate with the default
gate/up tiles, so that a change in the pair's time is the changed kernel's; prints the best few
beside the defaults.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
import torch.nn.functional as F
from machine import describe

from ktengine.moe.gpu_experts import GpuExpertSlots


def _time_us(fn, repeats: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _graph_us(fn, repeats: int = 30) -> float:
    """Median time of fn replayed as a CUDA graph (how decode steps run it: no launch gaps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time_us(graph.replay, repeats)


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    us = _time_us(lambda: b.copy_(a), 10)
    return 2 * a.numel() * a.element_size() / us / 1e3


def tile_candidates() -> list:
    from ktengine.moe.fused_moe_triton import Tiles

    return [Tiles(16, n, k, warps, stages) for n in (16, 32, 64) for k in (64, 128, 256)
            for warps, stages in ((4, 3), (4, 5), (8, 4))]


def sweep_tiles(w, tokens: list[int], slot_counts: list[int], gen) -> list[dict]:
    """Graph-replay time of the fused call per candidate tile set (see the module's notes)."""
    from triton.runtime.errors import OutOfResources

    from ktengine.moe.fused_moe_triton import fused_experts, pick_tiles

    E, H, K = w[0].shape[0], w[0].shape[2], 8
    rows = []
    for c in slot_counts:
        slots = GpuExpertSlots(*w, list(range(c)), E, torch.device("cuda"))
        for t in tokens:
            x = torch.randn(t, H, generator=gen).to("cuda", torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]).cuda()
            wts = torch.rand(t, K, generator=gen).cuda()
            nbytes = int((ids.unique() < c).sum()) * 3 * w[0].shape[1] * H * 2
            inputs = (x, slots.gate, slots.up, slots.down, slots.slot_of_expert[ids], wts)
            default = pick_tiles(t * K)

            def timed(tiles, inputs=inputs):
                try:
                    return _graph_us(lambda: fused_experts(*inputs, tiles=tiles))
                except OutOfResources as e:  # a tile set over an SM's shared memory
                    print(f"  skipped {tiles}: {type(e).__name__}", file=sys.stderr)
                    return None

            base = timed(default)
            res = {"slots": c, "tokens": t, "routed_resident_mb": nbytes / 1e6,
                   "default": [str(default[0]), str(default[1])], "default_us": base,
                   "gate_up": [], "down": []}
            for cand in tile_candidates():
                for kind, tiles in (("gate_up", (cand, default[1])), ("down", (default[0], cand))):
                    us = timed(tiles)
                    if us is not None:
                        res[kind].append({"tiles": str(cand), "us": us})
            for kind in ("gate_up", "down"):
                res[kind].sort(key=lambda r: r["us"])
            rows.append(res)
            print(f"slots {c:3d} T {t:4d} ({nbytes / 1e6:5.0f} MB): default {base:6.1f} us "
                  f"({nbytes / base / 1e3:5.0f} GB/s)", flush=True)
            for kind in ("gate_up", "down"):
                for r in res[kind][:4]:
                    print(f"   {kind:7s} {r['us']:6.1f} us ({nbytes / r['us'] / 1e3:5.0f} GB/s) "
                          f"{r['tiles']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 256, 2048])
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sweep-tiles", action="store_true",
                    help="time the fused kernel's candidate block sizes instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_experts.py needs a CUDA device")
    E, H, I, K = 128, 2048, 768, 8
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(E, *s, generator=gen, dtype=torch.bfloat16).mul_(0.02).pin_memory()
         for s in ((I, H), (I, H), (H, I))]
    bw = copy_gbps()
    if args.sweep_tiles:
        print(f"device copy bandwidth {bw:.0f} GB/s", flush=True)
        rows = sweep_tiles(w, args.tokens, args.slots, gen)
        if args.json:
            print(json.dumps({"copy_gbps": bw, "machine": describe(), "sweep": rows}))
        return
    rows = []
    for c in args.slots:
        slots = GpuExpertSlots(*w, list(range(c)), E, torch.device("cuda"))
        fused, slots.fused = slots.fused, None  # the torch paths while fused is None
        for t in args.tokens:
            x = torch.randn(t, H, generator=gen).to("cuda", torch.bfloat16)
            ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]).cuda()
            wts = torch.rand(t, K, generator=gen).cuda()
            routed = ids.unique()
            nbytes = int((routed < c).sum()) * 3 * H * I * 2
            res = {"slots": c, "tokens": t, "routed_resident_mb": nbytes / 1e6}
            call = (slots, x, ids, wts)
            res["torch_us"] = _time_us(lambda call=call: call[0].forward(*call[1:], F.silu))
            if t * K <= 256:
                res["torch_static_us"] = _time_us(
                    lambda call=call: call[0].forward_static(*call[1:], F.silu))
            if fused is not None:
                slots.fused = fused
                res["fused_us"] = _time_us(lambda call=call: call[0].forward(*call[1:], F.silu))
                slots.fused = None
                res["fused_gbps"] = nbytes / res["fused_us"] / 1e3
                inputs = (x, slots.gate, slots.up, slots.down, slots.slot_of_expert[ids], wts)
                for grid in ("slot", "pair"):
                    res[f"graph_by_{grid}_us"] = _graph_us(
                        lambda f=fused, a=inputs, g=grid: f(*a, by_pair=g == "pair"))
            rows.append(res)
    report = {"shape": {"experts": E, "hidden": H, "intermediate": I, "top_k": K, "dtype": "bf16"},
              "copy_gbps": bw, "machine": describe(), "results": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"device copy bandwidth {bw:.0f} GB/s")
    for r in rows:
        static = f" | torch static {r['torch_static_us']:8.1f} us" if "torch_static_us" in r else ""
        fused = (f" | fused {r['fused_us']:8.1f} us, {r['fused_gbps']:6.0f} GB/s of {bw:.0f}"
                 f" | in a graph, grid by slot {r['graph_by_slot_us']:7.1f} us, by pair "
                 f"{r['graph_by_pair_us']:7.1f} us ({r['routed_resident_mb'] / r['graph_by_pair_us'] * 1e3:5.0f} GB/s)"
                 if "fused_us" in r else "")
        print(f"slots {r['slots']:3d} T {r['tokens']:5d} ({r['routed_resident_mb']:6.0f} MB routed): "
              f"torch {r['torch_us']:8.1f} us{static}{fused}")


if __name__ == "__main__":
    main()
