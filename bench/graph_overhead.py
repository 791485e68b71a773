"""What each kind of node of a decode graph costs on this GPU, replayed.

    python bench/graph_overhead.py [--nodes 64] [--json]

Each row captures one graph of N nodes of one kind and reports the replay time per node
(median of several replays): the fixed latency a decode step pays per kernel, per copy to
or from pinned memory, per flag round trip with the CPU (stream writes a word in pinned
memory, a C thread spinning on it answers, the stream waits for the answer), and per
kernel that writes or reads pinned memory directly (zero-copy); and the host time of the
replay call itself per node (node kinds can slow the launch). Never asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from machine import describe

LAUNCH: dict[str, float] = {}  # host time of graph.replay() itself, us per node


def _replay_us(graph: torch.cuda.CUDAGraph, nodes: int, repeats: int = 20, name: str = "") -> float:
    graph.replay()
    torch.cuda.synchronize()
    times, launch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
        launch.append((t1 - t0) * 1e6)
    LAUNCH[name] = statistics.median(launch) / nodes
    return statistics.median(times) / nodes


def _capture(body) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    torch.cuda.synchronize()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/graph_overhead.py needs a CUDA device")
    from ktengine.cuda_host import (
        device_pointer,
        mapped_tensor,
        stream_wait_value32,
        stream_write_value32,
    )
    from ktengine_ext import _moe

    n, h = args.nodes, args.hidden
    dev = torch.empty(8, h, dtype=torch.bfloat16, device="cuda").normal_()
    pinned = torch.empty(8, h, dtype=torch.bfloat16).pin_memory()
    rows = {}

    def kernels():
        for _ in range(n):
            dev.add_(1)

    rows["kernel (add_, 8xH bf16)"] = _replay_us(_capture(kernels), n, name="kernel")

    def d2h():
        for _ in range(n):
            pinned.copy_(dev, non_blocking=True)

    rows["copy device->pinned (8xH bf16)"] = _replay_us(_capture(d2h), n, name="copy d2h")

    def h2d():
        for _ in range(n):
            dev.copy_(pinned, non_blocking=True)

    rows["copy pinned->device (8xH bf16)"] = _replay_us(_capture(h2d), n, name="copy h2d")

    view = mapped_tensor(pinned)

    def zc_write():
        for _ in range(n):
            torch.mul(dev, 1, out=view)

    rows["kernel writes pinned (zero-copy)"] = _replay_us(_capture(zc_write), n, name="zero-copy write")

    def zc_read():
        for _ in range(n):
            torch.add(dev, view, out=dev)

    rows["kernel reads pinned (zero-copy)"] = _replay_us(_capture(zc_read), n, name="zero-copy read")

    # flag round trips: the dispatcher thread answers each ready word with a done word
    flags = torch.zeros(2, n, dtype=torch.int32).pin_memory()
    host = flags.data_ptr()
    base = device_pointer(host)
    disp = _moe.Dispatcher(host, host + 4 * n, n)
    null_tasks = torch.zeros(n, dtype=torch.int64)  # no task: the thread only answers

    def round_trips():
        for i in range(n):
            stream_write_value32(base + 4 * i, 1)
            stream_wait_value32(base + 4 * (n + i), 1)
            stream_write_value32(base + 4 * (n + i), 0)

    disp.start(null_tasks.data_ptr(), n)
    graph = _capture(round_trips)
    disp.wait()
    times = []
    for _ in range(20):
        disp.start(null_tasks.data_ptr(), n)
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
        disp.wait()
    rows["flag round trip (write, thread answers, wait)"] = statistics.median(times) / n

    def writes_only():
        for i in range(n):
            stream_write_value32(base + 4 * i, 0)

    rows["stream write value (no wait)"] = _replay_us(_capture(writes_only), n, name="write value")
    disp.close()
    report = {"nodes": n, "hidden": h, "machine": describe(), "us_per_node": rows,
              "launch_us_per_node": LAUNCH}
    if args.json:
        print(json.dumps(report))
        return
    for name, us in rows.items():
        print(f"{us:8.2f} us  {name}")
    print("host time of graph.replay() per node (the launch call alone):")
    for name, us in LAUNCH.items():
        print(f"{us:8.2f} us  {name}")


if __name__ == "__main__":
    main()
