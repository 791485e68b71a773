"""The decode steps' own Triton kernels beside the torch ops they replace, in CUDA graphs.

    python bench/decode_kernels.py [--json] [--split-keys 64 128 256 512]

Router (moe/router_triton.py): softmax, top-k and renormalisation of [T, E] bf16 logits in one
kernel, against torch's softmax + topk + divide (what route() ran before); Qwen3-30B-A3B's
E 128 / k 8 and Qwen3-Next's E 512 / k 10.

Decode attention (model/decode_attention_triton.py): one new token per row over a paged bf16
cache (32 query / 4 KV heads, D 128, blocks of 16 as Qwen3-30B-A3B), each row's context as
given and its block table padded to the context bucket decode graphs use (powers of two
blocks, at least 16); against decode_attention's torch path (gathered keys of the whole
bucket, SDPA under a mask; cuDNN inside a graph as in the engine). GB/s counts the K/V bytes
of the real contexts, beside the device's copy bandwidth measured in the same run.

Each figure is the median of 30 replays of a graph holding 20 calls, divided by 20 (a graph
step's kernels run back to back too). Never asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from gpu_experts import copy_gbps
from machine import describe

from ktengine.model import attention
from ktengine.model.attention import DecodeTables, decode_attention

CALLS = 20  # per graph


def graph_us(fn, repeats: int = 30) -> float:
    """Median time of one call of fn, CALLS of them captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles and initialises outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def router_rows() -> list[dict]:
    from ktengine.moe.router_triton import topk_softmax

    def torch_ops(logits, k):
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1, sorted=False)
        return ids, w / w.sum(dim=-1, keepdim=True)

    rows = []
    for e, k in ((128, 8), (512, 10)):
        for t in (1, 8, 64, 2048):
            logits = torch.randn(t, e, device="cuda").to(torch.bfloat16)
            rows.append({"experts": e, "top_k": k, "tokens": t,
                         "triton_us": graph_us(lambda x=logits, k=k: topk_softmax(x, k, True)),
                         "torch_us": graph_us(lambda x=logits, k=k: torch_ops(x, k))})
    return rows


def attention_rows(split_keys: list[int]) -> list[dict]:
    from ktengine.model.decode_attention_triton import paged_decode_attention

    heads, kv_heads, dim, block = 32, 4, 128, 16
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    for b in (1, 2, 8, 32):
        for ctx in (40, 300, 1000, 8192):
            blocks = max(16, 1 << (-(-ctx // block) - 1).bit_length())  # the context bucket
            num_slots = b * blocks * block
            k_cache = torch.randn(num_slots, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            v_cache = torch.randn(num_slots, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
            tables = torch.randperm(b * blocks, generator=gen).view(b, blocks).cuda()
            lens = torch.full((b,), ctx, dtype=torch.int64, device="cuda")
            q = torch.randn(b, heads, dim, device="cuda", dtype=torch.bfloat16)
            kv_bytes = 2 * b * ctx * kv_heads * dim * 2
            row = {"batch": b, "context": ctx, "bucket_keys": blocks * block,
                   "kv_mb": kv_bytes / 1e6}
            kernel = DecodeTables.build(tables, lens, block)  # as graph steps build them
            slots, mask = attention._gathered_keys(tables, lens, block, None)
            gathered = DecodeTables(tables, lens, block, None, slots, mask)  # the torch path
            for name, built in (("triton", kernel), ("torch", gathered)):
                if name == "triton" and not kernel.triton:
                    continue  # switched off (KTENGINE_TRITON_DECODE_ATTENTION=0)
                args = (q, k_cache, v_cache, built, dim**-0.5)
                row[f"{name}_us"] = graph_us(lambda a=args: decode_attention(*a))
            for n in split_keys if kernel.triton else ():
                args = (q, k_cache, v_cache, tables, lens, block, dim**-0.5, None, n)
                row.setdefault("split_us", {})[n] = graph_us(
                    lambda a=args: paged_decode_attention(*a))
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--split-keys", type=int, nargs="*", default=[],
                    help="also time the Triton attention with these keys per split")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode_kernels.py needs a CUDA device")
    bw = copy_gbps()
    report = {"machine": describe(), "copy_gbps": bw, "router": router_rows(),
              "attention": attention_rows(args.split_keys)}
    if args.json:
        print(json.dumps(report))
        return
    print(f"device copy bandwidth {bw:.0f} GB/s; per call, {CALLS} calls per graph")
    print("router (bf16 logits, renormalised): softmax + top-k + divide")
    for r in report["router"]:
        print(f"  E {r['experts']:3d} k {r['top_k']:2d} T {r['tokens']:5d}: Triton "
              f"{r['triton_us']:7.1f} us | torch {r['torch_us']:7.1f} us")
    print("decode attention (32/4 heads, D 128, bf16, blocks of 16)")
    for r in report["attention"]:
        tri = r.get("triton_us")
        tri_s = (f"Triton {tri:7.1f} us ({r['kv_mb'] / tri * 1e3:5.0f} GB/s of {bw:.0f})"
                 if tri else "Triton off")
        print(f"  B {r['batch']:2d} context {r['context']:5d} (bucket {r['bucket_keys']:5d}): "
              f"{tri_s} | torch {r['torch_us']:7.1f} us")
        if r.get("split_us"):
            print("      keys per split: " + ", ".join(
                f"{n} {us:.1f} us" for n, us in r["split_us"].items()))


if __name__ == "__main__":
    main()
