"""What every benchmark prints beside its figures: the machine, and its measured DRAM read rate."""
from __future__ import annotations

import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """CPU model, cores, GPU, versions: stored with every result."""
    import ktengine
    import ktengine_ext

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "instruction_sets": ktengine_ext.instruction_sets(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ktengine": ktengine.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def dram_read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N read bandwidth of a `gib` GiB array (several times any last-level cache),
    read with one torch thread per logical CPU whatever the engine set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return _read_gbps(gib, repeats)
    finally:
        torch.set_num_threads(threads)


class DramProbe:
    """dram_read_gbps with its buffer kept (faulted in once), for figures taken again and
    again during a run: the machine's bandwidth drifts, so a point's roofline wants the
    bandwidth measured around it."""

    def __init__(self, gib: float = 1.0) -> None:
        self.x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)

    def gbps(self, repeats: int = 3) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.x.sum()
                best = min(best, time.perf_counter() - t0)
            return self.x.numel() * 4 / best / 1e9
        finally:
            torch.set_num_threads(threads)


def _read_gbps(gib: float, repeats: int) -> float:
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def hbm_gbps(gib: float = 2.0, repeats: int = 5) -> float | None:
    """GPU memory bandwidth from a device-to-device copy (bytes read + written), or None."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * x.numel() / best / 1e9
